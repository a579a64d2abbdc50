"""A LoRA run's frozen base Linear weights stored in the compute dtype (``model.lora.base_in_compute_dtype``).

cpt builds the model in fp32 and trains under accelerate's autocast (``train.precision`` bf16/fp16), which casts a
Linear's fp32 weight and bias to the compute dtype before every matmul (round to nearest even). A frozen weight never
changes, so storing it already cast gives every matmul the same inputs, bit for bit: half the memory of those weights
(an 8B base: about 16 GB instead of 32 GB per GPU) and no cast of them per micro-batch.

What is cast: the ``base_layer`` of each of peft's LoRA layers and every other frozen ``nn.Linear`` outside peft's
wrappers (a frozen, untied ``lm_head``), when none of their tensors is trainable or shared with another module (tied
embeddings). Everything else stays fp32: embeddings (a lookup is not an autocast op: a bf16 table would change the
hidden states), norms, LoRA A/B (also those ``model.freeze`` froze), ``modules_to_save`` (the trained copies and the
originals they replace), and the ``trainable_token_indices`` rows with the layers they overlay.

Where: one process and DDP (frozen parameters are outside DDP's gradient buckets). Not under FSDP2 (its mixed
precision shards and casts the parameters itself, and the fp32 and bf16 tensors of one layer would share one sharded
group) nor DeepSpeed (which casts the whole model to its own dtype): there the base stays fp32.

The base fingerprint (:func:`cpt.adapters.note_base`) is taken before the cast, of the fp32 base as built: adapter
checkpoints resume across the setting. A whole-model checkpoint is loaded into the fp32 base (:func:`in_fp32`), so
its fingerprint is that of its fp32 weights, then cast again. The model's own forward runs under autocast (accelerate
wraps the prepared model's ``forward``: the training step, held-out evaluation, EMA evaluation, lm-eval's scoring);
what reaches the inner model's forward another way (lm-eval's ``generate``) runs under :func:`autocast_for`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

MARK = "_cpt_base_dtype"  # set on the model: the dtype its frozen Linear weights are stored in
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def frozen_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, layer) of the Linear layers whose weights may be stored in the compute dtype (the module docstring)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    holders: dict[int, int] = {}  # how many modules hold each tensor (tied weights: several)
    for _, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            holders[id(p)] = holders.get(id(p), 0) + 1

    def frozen_alone(layer: nn.Module) -> bool:  # (exactly nn.Linear: no quantized or custom subclass)
        return type(layer) is nn.Linear and all(not p.requires_grad and holders[id(p)] == 1 for p in layer.parameters())

    found: list[tuple[str, nn.Linear]] = []
    for name, m in model.named_modules():
        if _inside(model, name, AuxiliaryTrainingWrapper):  # modules_to_save, trainable_token_indices: all fp32
            continue
        if isinstance(m, LoraLayer):  # its base layer, not its adapters
            base = getattr(m, "base_layer", None)
            if base is not None and frozen_alone(base):
                found.append((f"{name}.base_layer", base))
        elif frozen_alone(m) and not _inside(model, name, BaseTunerLayer):  # (not LoRA A/B, not a base layer again)
            found.append((name, m))
    return found


def _inside(model: nn.Module, name: str, wrappers) -> bool:
    """Whether a module sits inside one of peft's layers or wrappers (``wrappers``: their classes)."""
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), wrappers) for i in range(1, len(parts)))


def cast_frozen_linears(model: nn.Module, dtype: torch.dtype) -> tuple[int, int]:
    """Store the weights of :func:`frozen_linears` in ``dtype`` (in place: the same Parameter objects); returns the
    number of tensors cast and the bytes of memory this frees (negative when widening)."""
    n = freed = 0
    for _, layer in frozen_linears(model):
        for p in layer.parameters(recurse=False):
            if p.dtype != dtype:
                freed += p.numel() * (p.element_size() - torch.empty((), dtype=dtype).element_size())
                p.data = p.data.to(dtype)
                n += 1
    return n, freed


def cast_frozen_base(model: nn.Module, cfg, acc, say=print) -> None:
    """``model.lora.base_in_compute_dtype`` for a run (``cfg``: its RunConfig) before ``accelerator.prepare``: the
    frozen base's Linear weights in ``train.precision``'s dtype when autocast runs the forward (one process, DDP)."""
    from cpt.distributed import Backend, backend

    lora = cfg.model.lora
    if lora is None or not lora.base_in_compute_dtype or cfg.train.precision not in DTYPES:
        return
    if backend(acc) not in (Backend.SINGLE, Backend.DDP) or not getattr(acc, "native_amp", False):
        say(f"model.lora.base_in_compute_dtype: the frozen base stays fp32 under {backend(acc).value} "
            "(its mixed precision casts the weights itself)")
        return
    if lora.use_dora:  # DoRA adds the base weight to B A and takes its norm outside autocast's casts: not bitwise
        say("model.lora.base_in_compute_dtype: the frozen base stays fp32 with use_dora (DoRA's weight norms read the "
            "base weight in its stored dtype)")
        return
    dtype = DTYPES[cfg.train.precision]
    n, freed = cast_frozen_linears(model, dtype)
    setattr(model, MARK, dtype)
    say(f"model.lora: the frozen base's Linear weights are stored in {cfg.train.precision} ({n} tensors, "
        f"{freed / 2**20:,.1f} MiB less; training numerics unchanged: autocast casts them to "
        f"{cfg.train.precision} anyway)")


@contextlib.contextmanager
def in_fp32(model: nn.Module):
    """Within: a cast base's Linear weights in fp32 again (a whole-model checkpoint's fp32 base loads exactly and is
    fingerprinted as such); cast back to the compute dtype on exit. Nothing for a model that was not cast."""
    dtype = getattr(model, MARK, None)
    if dtype is None:
        yield
        return
    cast_frozen_linears(model, torch.float32)
    try:
        yield
    finally:
        cast_frozen_linears(model, dtype)


def autocast_for(model: nn.Module, device: torch.device | None = None):
    """``torch.autocast`` in the dtype of a cast base (for forwards that accelerate's autocast wrapper does not
    reach, e.g. ``generate``); a null context for a model that was not cast."""
    dtype = getattr(model, MARK, None)
    if dtype is None:
        return contextlib.nullcontext()
    device = device or next(model.parameters()).device
    return torch.autocast(device.type, dtype=dtype)
