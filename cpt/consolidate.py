"""Resume checkpoints read without the world size or backend that wrote them.

A checkpoint is written by accelerate in the layout of its backend:

* ``plain`` (one process, DDP): ``model.safetensors`` (full weights) and ``optimizer.bin`` (full AdamW state);
* ``adapter`` (a LoRA or ``model.freeze`` run on one process or DDP): ``adapter_state.safetensors`` (the adapter or
  the trainable part alone: the reader builds the frozen base, cpt/adapter_checkpoint.py) and ``optimizer.bin``;
* ``fsdp`` (FSDP2, sharded state dict): DCP directories ``pytorch_model_fsdp_0/`` and ``optimizer_0/``;
* ``deepspeed`` (ZeRO-2/3): ``pytorch_model/`` with one ``zero_pp_rank_R_..._optim_states.pt`` per rank,
  holding that rank's flat partition of the fp32 weights and of the Adam moments.

A LoRA run's ``fsdp`` and ``deepspeed`` checkpoints hold the adapter alone too (cpt/adapter_shards.py; their
``adapter_base.json`` says so): as with ``adapter``, the reader builds the base and loads the adapter over it.

This module turns any of them into one name-keyed, full, fp32 state on the CPU of a single process: the weights
(:func:`read_model_state`; an ``adapter`` checkpoint's adapter tensors) and the Adam state per parameter
(:func:`read_optimizer_state`). ``cpt export`` writes
the weights as an HF model (cpt/checkpoint_export.py); :func:`load_portable` puts weights and Adam state into a run of any backend and world
size (plain, DDP, FSDP2, ZeRO-2/3), which is how a checkpoint written by N ranks resumes on M.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import torch

from cpt.adapter_checkpoint import (ADAPTER_STATE, DEEPSPEED_TAG, FSDP_MODEL, AdapterCheckpointError, check_keys,
                                    is_adapter_layout, read_adapter_state)
from cpt.checkpoint import CheckpointError
from cpt.compiling import COMPILE_PREFIX, without_compile_prefix
from cpt.pickle_scan import PickleCheckError, check_zero_pickles, read_dcp_metadata, zero_safe_classes

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


class ConsolidateError(CheckpointError):
    """A checkpoint that cannot be read or does not fit the model (`cpt train` and `cpt export` print one line)."""


# ------------------------------------------------------------------------------------------ layout


def layout(ckpt: str | os.PathLike) -> str:
    """``plain``, ``adapter``, ``fsdp`` or ``deepspeed``: the backend layout a checkpoint directory was written in."""
    p = Path(ckpt)
    if (p / ADAPTER_STATE).is_file():
        return "adapter"
    if (p / DEEPSPEED_TAG).is_dir() and glob.glob(str(p / DEEPSPEED_TAG / "*optim_states.pt")):
        return "deepspeed"
    if (p / FSDP_MODEL).is_dir():
        return "fsdp"
    if (p / "model.safetensors").is_file():
        return "plain"
    raise ConsolidateError(f"{p}: not a cpt resume checkpoint (no model.safetensors, {ADAPTER_STATE}, "
                           f"{FSDP_MODEL}/ or {DEEPSPEED_TAG}/ with ZeRO optimizer shards)")


def deepspeed_world_size(ckpt: str | os.PathLike) -> int:
    return len(glob.glob(str(Path(ckpt) / DEEPSPEED_TAG / "*optim_states.pt")))


def deepspeed_zero3(ckpt: str | os.PathLike) -> bool:
    """Whether a DeepSpeed checkpoint was written by ZeRO-3 (model states per rank) rather than ZeRO-1/2 (one file)."""
    return bool(glob.glob(str(Path(ckpt) / DEEPSPEED_TAG / "zero_pp_rank_*_model_states.pt")))


def current_layout(acc) -> str:
    from cpt.distributed import Backend, backend

    return {Backend.DEEPSPEED: "deepspeed", Backend.FSDP: "fsdp"}.get(backend(acc), "plain")


def needs_portable_load(ckpt: str | os.PathLike, acc) -> bool:
    """True when accelerate's own ``load_state`` cannot restore ``ckpt`` into this run: another backend, or a
    ZeRO checkpoint of another data-parallel world size (ZeRO partitions are tied to it) or of another ZeRO stage
    (ZeRO-3 partitions the weights, ZeRO-1/2 do not: DeepSpeed reads only its own stage's files), or a full state
    keyed by torch.compile's wrapper (``model.compile: true``) on one side only. Full (plain) states load on any
    number of processes, and FSDP2's DCP checkpoints reshard themselves on load."""
    from cpt.distributed import zero_stage

    saved, now = layout(ckpt), current_layout(acc)
    if saved == now == "plain" and acc._models and _compile_keyed(ckpt) != _compile_keyed_model(acc):
        return True  # torch.compile's wrapper (model.compile: true) on one side only: its keys are `_orig_mod.<name>`
    saved = "plain" if saved == "adapter" else saved  # (accelerate's load_state, the models from the adapter state)
    if saved != now:
        return True
    return saved == "deepspeed" and (deepspeed_world_size(ckpt) != acc.num_processes
                                     or deepspeed_zero3(ckpt) != (zero_stage(acc) == 3))


def _compile_keyed(ckpt: str | os.PathLike) -> bool:
    from safetensors import safe_open

    with safe_open(str(Path(ckpt) / "model.safetensors"), framework="pt") as f:
        return any(k.startswith(COMPILE_PREFIX) for k in f.keys())


def _compile_keyed_model(acc) -> bool:
    return any(k.startswith(COMPILE_PREFIX) for k in acc.unwrap_model(acc._models[0]).state_dict())


# ------------------------------------------------------------------------------------------ reading


def _dcp_read(path: Path) -> dict:
    """A whole DCP checkpoint directory as one nested dict of full tensors (no process group needed); its pickles
    checked first (:func:`cpt.pickle_scan.read_dcp_metadata`)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    try:
        read_dcp_metadata(path)
    except PickleCheckError as e:
        raise ConsolidateError(str(e)) from None
    sd: dict = {}
    _load_state_dict(sd, storage_reader=FileSystemReader(str(path)), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return sd


def _ds_files(ckpt: Path) -> tuple[list[str], list[str]]:
    """The ZeRO model-state and optimizer files, each checked by :func:`cpt.pickle_scan.check_zero_pickles`
    (DeepSpeed's own readers, used below, unpickle with weights_only=False)."""
    from deepspeed.utils.zero_to_fp32 import get_model_state_files, get_optim_files

    d = str(ckpt / DEEPSPEED_TAG)
    model_files, optim_files = get_model_state_files(d), get_optim_files(d)
    try:
        check_zero_pickles(model_files + optim_files)
    except PickleCheckError as e:
        raise ConsolidateError(str(e)) from None
    return model_files, optim_files


def read_model_state(ckpt: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a checkpoint, keyed as the (unwrapped) model's ``state_dict`` (an ``adapter``
    checkpoint: its adapter tensors alone)."""
    p = Path(ckpt)
    kind = layout(p)
    if kind == "adapter":
        return read_adapter_state(p)
    if kind == "plain":
        from safetensors.torch import load_file

        return without_compile_prefix(load_file(str(p / "model.safetensors")))  # (a model.compile: true run's keys)
    if kind == "fsdp":
        return {k: v for k, v in _dcp_read(p / FSDP_MODEL)["model"].items() if isinstance(v, torch.Tensor)}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    import contextlib
    import io

    _ds_files(p)
    # the fp32 master weights, merged from every rank's partition (DeepSpeed's own zero_to_fp32, which prints)
    with contextlib.redirect_stdout(io.StringIO()):
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(p), tag=DEEPSPEED_TAG))


def read_optimizer_state(ckpt: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """The AdamW state per trainable parameter name: ``{name: {"step", "exp_avg", "exp_avg_sq"}}`` (full tensors)."""
    p = Path(ckpt)
    kind = layout(p)
    if kind in ("plain", "adapter"):
        sd = torch.load(p / "optimizer.bin", map_location="cpu", weights_only=True)
        out = {}
        for group in sd["param_groups"]:
            names = group.get("param_names")
            if names is None or len(names) != len(group["params"]):
                raise ConsolidateError(f"{p / 'optimizer.bin'}: parameter groups without names; cannot map the state")
            for idx, name in zip(group["params"], names):
                if idx in sd["state"]:
                    out[name] = dict(sd["state"][idx])
        return out
    if kind == "fsdp":
        state = _dcp_read(p / "optimizer_0")["optimizer"]["state"]
        return {name: dict(s) for name, s in state.items()}
    return _read_zero_optimizer_state(p)


def _read_zero_optimizer_state(p: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Adam moments from ZeRO partitions: laid out exactly like the fp32 master partitions, so DeepSpeed's
    zero_to_fp32 merge (run on the moments instead of the weights) reassembles them per parameter."""
    from deepspeed.utils import zero_to_fp32 as z

    model_files, optim_files = _ds_files(p)
    model_states = z.parse_model_states(model_files)
    with torch.serialization.safe_globals(zero_safe_classes()):
        shards = [torch.load(f, map_location="cpu", weights_only=True) for f in optim_files]
    osd = [s["optimizer_state_dict"] for s in shards]
    stage = osd[0]["zero_stage"]
    world = osd[0]["partition_count"]
    world = max(world) if isinstance(world, list) else world
    if world != len(shards):
        raise ConsolidateError(f"{p / DEEPSPEED_TAG}: {len(shards)} optimizer shards for a world size of {world}")
    inner = "base_optimizer_state" if stage <= 2 else "optimizer_state_dict"
    per_key: dict[str, dict[str, torch.Tensor]] = {}
    step = None
    for key in ADAM_KEYS:
        flats = [[st[key] for _, st in sorted(o[inner]["state"].items())] for o in osd]
        merged: dict = {}
        if stage <= 2:
            z._zero2_merge_trainable_params(merged, world, flats, model_states, osd[0].get("param_alignment_paddings"))
        else:
            z._zero3_merge_trainable_params(merged, world, flats, model_states)
        per_key[key] = z.to_torch_tensor(merged)
        step = next(iter(osd[0][inner]["state"].values())).get("step")
    names = per_key[ADAM_KEYS[0]].keys()
    return {n: {"step": torch.as_tensor(step, dtype=torch.float32), **{k: per_key[k][n] for k in ADAM_KEYS}} for n in names}


# ------------------------------------------------------------------------------------------ loading into a run


def load_portable(acc, model, optimizer, ckpt: str | os.PathLike, load_optimizer: bool = True) -> None:
    """Restore weights (and Adam state) from a checkpoint of any layout and world size into this run's prepared
    model and optimizer, on every rank (collective). RNG states are not carried over (cpt's data order is
    arithmetic; nothing else in the loop draws random numbers unless the model has dropout)."""
    weights = read_model_state(ckpt)  # (an adapter checkpoint: the adapter alone; its base is the model's, as built)
    adam = read_optimizer_state(ckpt) if load_optimizer else {}
    now, adapter = current_layout(acc), is_adapter_layout(ckpt)
    if now == "deepspeed":
        _load_into_deepspeed(model, weights, adam, adapter)
    elif now == "fsdp":
        _load_into_fsdp(model, optimizer, weights, adam, adapter)
    else:
        _load_into_plain(acc.unwrap_model(model, keep_torch_compile=False), optimizer, weights, adam, adapter)
    acc.wait_for_everyone()


def check_weight_keys(module: torch.nn.Module, weights: dict, where: str, adapter: bool = False) -> None:
    """``weights`` must be the whole state of ``module`` or, from an ``adapter`` checkpoint, its adapter state."""
    if adapter:
        try:
            check_keys(module, weights)
        except AdapterCheckpointError as e:
            raise ConsolidateError(f"{where}: {e}") from None
        return
    expected = set(module.state_dict())
    missing = sorted(expected - set(weights) - _tied_names(module))
    unexpected = sorted(set(weights) - expected)
    if missing or unexpected:
        raise ConsolidateError(f"{where}: the checkpoint does not fit this model (missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}); was it written with another model config?")


def _tied_names(module) -> set[str]:
    seen, tied = {}, set()
    for n, p in module.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(n)
        seen.setdefault(id(p), n)
    return tied


def _adam(state: dict, param: torch.Tensor) -> dict:
    return {"step": torch.as_tensor(state["step"], dtype=torch.float32).reshape(()).clone(),
            **{k: state[k].to(param.device, param.dtype).reshape(param.shape).clone() for k in ADAM_KEYS}}


def _load_into_plain(module, optimizer, weights, adam, adapter: bool = False) -> None:
    check_weight_keys(module, weights, "resume", adapter)
    module.load_state_dict(weights, strict=False)
    if not adam:
        return
    inner = getattr(optimizer, "optimizer", optimizer)
    names = {id(p): n for n, p in module.named_parameters()}
    for group in inner.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            if name not in adam:
                raise ConsolidateError(f"resume: no optimizer state for {name} in the checkpoint")
            inner.state[p] = _adam(adam[name], p)


def _load_into_fsdp(model, optimizer, weights, adam, adapter: bool = False) -> None:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    full = StateDictOptions(full_state_dict=True)
    check_weight_keys(model, weights, "resume", adapter)
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    if not adam:
        return
    inner = getattr(optimizer, "optimizer", optimizer)
    osd = get_optimizer_state_dict(model, inner, options=full)  # param_groups keyed by parameter name
    names = [n for g in osd["param_groups"] for n in g["params"]]
    osd["state"] = {n: {"step": torch.as_tensor(adam[n]["step"], dtype=torch.float32).reshape(()).clone(),
                        **{k: adam[n][k].float() for k in ADAM_KEYS}} for n in names}
    set_optimizer_state_dict(model, inner, osd, options=full)


def _load_into_deepspeed(engine, weights, adam, adapter: bool = False) -> None:
    import deepspeed

    module = engine.module
    check_weight_keys(module, weights, "resume", adapter)
    params = dict(module.named_parameters())
    stage3 = engine.zero_optimization_partition_weights()
    # the module's (partitioned, for ZeRO-3) weights, frozen ones included; an adapter checkpoint's alone, gathered
    # alone (the frozen base stays as built, partitioned: gathering it whole on every rank is what ZeRO-3 avoids)
    loaded = {name: p for name, p in params.items() if name in weights}
    with deepspeed.zero.GatheredParameters(list(loaded.values()), modifier_rank=0, enabled=stage3):
        for name, p in loaded.items():
            p.data.copy_(weights[name].to(p.device, p.dtype).reshape(p.shape))
    for name, buf in module.named_buffers():
        if name in weights:
            buf.data.copy_(weights[name])
    # the fp32 master partitions and Adam moments the optimizer steps on; torch AdamW creates its state at the
    # first step, so create it (zeros) on the flat partitions first and let DeepSpeed link its per-parameter views
    opt = engine.optimizer
    if adam:
        flats = opt.fp32_partitioned_groups_flat if stage3 else opt.single_partition_of_fp32_groups
        for hp in flats:
            if "exp_avg" not in opt.optimizer.state.get(hp, {}):
                opt.optimizer.state[hp] = {"step": torch.zeros((), dtype=torch.float32),
                                           **{k: torch.zeros_like(hp) for k in ADAM_KEYS}}
        if not stage3:
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()
    set_full = _z3_set_full if stage3 else _zero12_set_full
    step = None
    for name, p in params.items():
        if not p.requires_grad:
            continue
        set_full(p, weights[name].to(torch.float32).reshape(-1 if stage3 else p.shape))
        if adam:
            if name not in adam:
                raise ConsolidateError(f"resume: no optimizer state for {name} in the checkpoint")
            for k in ADAM_KEYS:
                set_full(p, adam[name][k].to(torch.float32).reshape(-1 if stage3 else p.shape), k)
            step = adam[name]["step"]
    if step is not None:
        for st in opt.optimizer.state.values():
            st["step"] = torch.as_tensor(step, dtype=torch.float32).reshape(()).clone()
    if stage3:  # the partitioned weights the forward gathers come from the fp32 masters after each step
        for i in range(len(opt.fp16_partitioned_groups_flat)):
            opt.fp16_partitioned_groups_flat[i].data.copy_(opt.fp32_partitioned_groups_flat[i].data)


def _zero12_set_full(p, value: torch.Tensor, key: str | None = None) -> None:
    """Set a ZeRO-1/2 parameter's fp32 master (``key=None``) or Adam moment from its full value (DeepSpeed's own)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if key is None:
        safe_set_full_fp32_param(p, value)
    else:
        safe_set_full_optimizer_state(p, value, key)


def _z3_set_full(p, value: torch.Tensor, key: str | None = None) -> None:
    """Set this rank's partition of a ZeRO-3 parameter's fp32 master (``key=None``) or Adam moment from its full,
    flat ``value``. DeepSpeed's own ``set_full_hp_param`` (0.19) reads ``partition_size`` elements at
    ``rank * partition_size`` of the value, past its end on the last ranks when the world size does not divide the
    parameter's size (their partitions end in padding): a checkpoint resumed on 3 processes failed so. Here the
    padding is zeros, as DeepSpeed's partitioning leaves it."""
    opt = p._z3_optimizer
    part, group = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
    n = part.numel()
    piece = value.reshape(-1)[n * opt._get_param_partition_rank(p):][:n]
    part.data[: piece.numel()].copy_(piece)
    part.data[piece.numel():].zero_()
    if opt._swappable_optimizer_subgroup(group):
        opt._optimizer_states_and_gradient_swap_out(group)
