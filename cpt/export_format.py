"""The format of an HF export's weights: their dtype and how they are split into files.

Every export (the run's ``export/`` and ``exports/step_N``, ``cpt export``, ``cpt merge``, ``cpt interpolate
--save-alpha``) goes through :func:`cpt.model.write_hf`, which takes these from ``checkpoint.export_dtype`` and
``checkpoint.max_shard_size`` (or the commands' ``--dtype`` / ``--max-shard-size``):

* dtype: fp32 writes the trained master weights exactly; bf16/fp16 cast every floating-point tensor once, at
  write time, and config.json's ``dtype`` says what the tensors are, so
  ``from_pretrained(dtype="auto")`` and serving stacks that read it get the tensors' own dtype.
* shards: transformers 5's ``save_pretrained`` writes files of up to 50 GB by default (4.x: 5 GB): an 8B model in
  fp32 was one 32 GB file. cpt passes ``max_shard_size`` (default 5GB, what published checkpoints use: parallel,
  resumable downloads), and a larger model becomes ``model-0000k-of-0000n.safetensors`` plus
  ``model.safetensors.index.json``, which ``from_pretrained``, vLLM, TGI and the hub read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_MAX_SHARD_SIZE = "5GB"


def export_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``fp32``/``bf16``/``fp16`` (or a torch dtype, or None: as the model holds them) as a torch dtype."""
    if name is None or isinstance(name, torch.dtype):
        return name
    return DTYPES[name]


def cast_state(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Every floating-point tensor of ``state`` in ``dtype`` (a tensor already in it is not copied)."""
    if dtype is None:
        return state
    cast: dict = {}  # tensors that share storage (tied embeddings) stay one tensor: save_pretrained writes it once
    return {k: cast.setdefault((v.data_ptr(), v.shape, v.stride()), v.to(dtype))
            if torch.is_tensor(v) and v.is_floating_point() else v for k, v in state.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def set_config_dtype(model_dir: str | os.PathLike, dtype: torch.dtype) -> None:
    """Make a written config.json's dtype (transformers 5: ``dtype``; 4.x: ``torch_dtype``) name ``dtype``:
    save_pretrained records the model's parameter dtype, not that of the state it was given."""
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
    for k in keys:
        config[k] = dtype_name(dtype)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def with_master_weights(acc, model, state: dict | None) -> dict | None:
    """``state`` (``accelerator.get_state_dict``'s, on the main process) with every trainable parameter's fp32
    master weights, under DeepSpeed with bf16/fp16 (ZeRO-1/2/3): accelerate gathers the engine's 16-bit copies, and
    the run's exports held the fp32 masters rounded to bf16 (stored as float32, e.g. a norm weight off by 4e-3
    from what `cpt export` of the same step's checkpoint writes). DeepSpeed's ``safe_get_full_fp32_param`` is
    collective: every rank calls this, one parameter at a time (no rank holds more than one full master at once
    beyond the main process's ``state``). Frozen parameters have no master and stay as gathered."""
    from cpt.distributed import Backend, backend

    if backend(acc) is not Backend.DEEPSPEED or acc.mixed_precision == "no":
        return state
    from deepspeed.utils import safe_get_full_fp32_param

    names: dict[int, list[str]] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for name, p in acc.unwrap_model(model, keep_torch_compile=False).named_parameters(remove_duplicate=False):
        if p.requires_grad:
            names.setdefault(id(p), []).append(name)
            params[id(p)] = p
    for key, p in params.items():
        full = safe_get_full_fp32_param(p)
        if state and full is not None:  # (one tensor for all the names of a tied parameter: written once)
            full = full.detach().to("cpu", copy=True)
            for name in names[key]:
                if name in state:
                    state[name] = full.reshape(state[name].shape)
    return state


def without_tied_copies(model, state_dict: dict) -> dict:
    """``state_dict`` without the second name of a tied parameter (a tied head's ``lm_head.weight``), as
    ``save_pretrained`` writes the model's own state dict, whose tied names share one storage. A gathered state (ZeRO-1/2's
    cloned tensors) shares none, so a ZeRO-2 export held the tied head twice: other tensors than a 1-process export's,
    which `cpt average` refused to average with it."""
    first, tied = {}, set()
    for name, param in model.named_parameters(remove_duplicate=False):
        (tied.add(name) if id(param) in first else first.setdefault(id(param), name))
    return {k: v for k, v in state_dict.items() if k not in tied}
