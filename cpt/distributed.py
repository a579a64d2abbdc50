"""What cpt needs to know about the processes of a run, in one place: which backend accelerate set up, whether all
ranks agree on a decision, sums over ranks, the model inside the wrappers, and refusing sharded weights.

Every function takes the ``Accelerator`` (``acc``) the loop built (or ``None``: one process, no accelerator where
noted). Collectives must be called by every rank at the same point, like any collective.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import nn


class Backend(Enum):
    """How the processes of a run share the model (from accelerate's ``distributed_type``)."""

    SINGLE = "single"  # no distributed backend (accelerate's NO): one process
    DDP = "ddp"  # data parallel with the full weights on every rank (MULTI_GPU, MULTI_CPU, MULTI_XPU, ...)
    FSDP = "fsdp"
    DEEPSPEED = "deepspeed"  # any ZeRO stage: see zero_stage()
    OTHER = "other"  # XLA, Megatron-LM: nothing in cpt is specialised for them


def backend(acc) -> Backend:
    """The backend of ``acc`` (``None``: no accelerator, one process)."""
    if acc is None:
        return Backend.SINGLE
    kind = acc.distributed_type.value
    if kind == "NO":
        return Backend.SINGLE
    if kind.startswith("MULTI_"):
        return Backend.DDP
    if kind == "FSDP":
        return Backend.FSDP
    if kind == "DEEPSPEED":
        return Backend.DEEPSPEED
    return Backend.OTHER


def zero_stage(acc) -> int:
    """The DeepSpeed ZeRO stage of ``acc`` (0 when it is not DeepSpeed)."""
    if backend(acc) is not Backend.DEEPSPEED:
        return 0
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    return int(getattr(plugin, "zero_stage", None) or 0) if plugin is not None else 0


def shards_weights(acc) -> bool:
    """Whether no rank holds the full weights between steps: FSDP or DeepSpeed ZeRO-3."""
    return backend(acc) is Backend.FSDP or zero_stage(acc) == 3


# ---------------------------------------------------------------- collectives


def all_ranks_agree(acc, ok: bool) -> bool:
    """True on every rank only if ``ok`` is true on every rank (so all ranks take the same branch); one collective
    and one host read with several processes, nothing with one."""
    if acc.num_processes == 1:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=acc.device)
    return float(acc.reduce(flag, reduction="sum").item()) == 0.0


def any_rank(acc, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    return not all_ranks_agree(acc, not flag)


def rank_and_world(acc) -> tuple[int, int]:
    """(rank, world size): of ``acc``; without one, of an initialised ``torch.distributed`` group, else (0, 1)."""
    if acc is not None:
        return acc.process_index, acc.num_processes
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def sum_across_ranks(t: torch.Tensor, acc) -> torch.Tensor:
    """``t`` summed over the ranks (a device collective, no host read); ``t`` itself with one process. Without an
    accelerator, over an initialised ``torch.distributed`` group (on a copy)."""
    if acc is not None:
        if acc.num_processes > 1:
            return acc.reduce(t, reduction="sum")
        return t
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        t = t.clone()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


# ---------------------------------------------------------------- the model inside the wrappers


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / accelerate wrappers (kept in .module); parameter names then match the bare model's."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def refuse_sharded(named_params, feature: str, advice: str) -> None:
    """ZeRO-3 and sharded FSDP leave placeholders or local shards instead of the weights: a ``feature`` that reads
    or rewrites whole weights (EMA, Reptile) would be silently wrong there, so it stops with ``advice``."""
    for n, p in named_params:
        if hasattr(p, "ds_id") or (p.numel() == 0 and getattr(p, "ds_numel", 0)):
            raise RuntimeError(f"{feature}: parameter {n} is partitioned (sharded) by DeepSpeed ZeRO-3, so {feature} "
                               f"cannot use it; {advice}")
        if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor":
            raise RuntimeError(f"{feature}: parameter {n} is sharded (FSDP2 DTensor); {advice}")
