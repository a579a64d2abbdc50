"""LoRA initialisations that rewrite the base weights (``model.lora.init_lora_weights``: ``pissa``,
``pissa_niter_N``, ``olora``): peft initialises A and B from the base weight ``W`` (its principal singular vectors,
or a QR decomposition) and replaces ``W`` by the residual ``W_res = W - s B0 A0``, so that the model still starts as the
base.

What cpt does about the rewritten base:

* resume checkpoints hold the adapter and the fingerprint of the residual base (cpt/adapter_checkpoint.py): whoever
  reads a checkpoint builds the base and initialises the adapter again (the SVD or QR of the same weights), and a base
  that comes out different (another device's SVD) is refused in one line as any other base;
* the initial factors ``A0, B0`` are kept on the model (:func:`keep_initial_factors`, an adapter's size) and every
  exported adapter is converted to a plain LoRA against the *original* base (:func:`as_plain_lora`), as peft's
  ``save_pretrained(path_initial_model_for_weight_conversion=...)`` does: ``BA - B0A0 = [B | -B0][A ; A0]``, rank 2r,
  alpha raised to keep the scale, ``init_lora_weights: true``. Without it the adapter would hold factors meant for
  ``W_res`` while its ``base_model_name_or_path`` names ``W``: `cpt merge`, peft and `cpt average` would silently apply
  it to the wrong base;
* only linear layers (peft initialises no other layer type this way) and one process, DDP and FSDP2 (tested);
  DeepSpeed is refused (:func:`refuse_unsupported`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from cpt.config import ConfigError

INIT_FACTORS = "_cpt_initial_factors"


def mutates_base(init: str | bool | None) -> bool:
    """Whether a peft ``init_lora_weights`` value rewrites the base weights (PiSSA, OLoRA, CorDA)."""
    return isinstance(init, str) and (init.lower().startswith(("pissa", "corda")) or init.lower() == "olora")


def _saved_key(name: str, adapter: str) -> str:
    """A parameter's name as peft saves it: without the adapter's name (``...lora_A.default.weight`` -> ``lora_A.weight``)."""
    return name.replace(f".{adapter}.", ".")


def keep_initial_factors(peft_model, field: str = "model.lora.init_lora_weights") -> None:
    """After ``get_peft_model`` with a base-rewriting init: refuse a LoRA layer that is not a Linear (one line naming
    the field), and keep a copy of every initial factor on the model for :func:`as_plain_lora`."""
    from peft.tuners.lora import Linear, LoraLayer

    adapter = peft_model.active_adapter
    others = sorted({type(m).__name__ for m in peft_model.modules() if isinstance(m, LoraLayer) and not isinstance(m, Linear)})
    if others:
        raise ConfigError(f"{field}: {peft_model.peft_config[adapter].init_lora_weights} initialises linear layers "
                          f"only, and model.lora.target_modules also selects {', '.join(others)} layers (embeddings, "
                          "fused MoE experts): name only linear projections in target_modules, or use init default")
    factors = {_saved_key(n, adapter): p.detach().clone() for n, p in peft_model.named_parameters()
               if re.search(rf"\.lora_[AB]\.{re.escape(adapter)}\.weight$", n)}
    setattr(peft_model, INIT_FACTORS, factors)


def as_plain_lora(model, out: Path) -> bool:
    """Rewrite the adapter peft saved in ``out`` (``adapter_model.safetensors``, ``adapter_config.json``) as a plain LoRA
    against the original base, when ``model`` was initialised by a base-rewriting init; False otherwise (nothing done).
    The same tensors and config as peft's ``save_pretrained(path_initial_model_for_weight_conversion=...)``."""
    from safetensors.torch import load_file, save_file

    factors = getattr(model, INIT_FACTORS, None)
    if factors is None:
        return False
    weights = load_file(str(out / "adapter_model.safetensors"))
    missing = [k for k in weights if ".lora_A." in k or ".lora_B." in k if k not in factors]
    if missing:  # (cannot happen for an adapter of this model; a wrong conversion must not be written)
        raise RuntimeError(f"no initial factor for {missing[0]}: the adapter cannot be converted to a plain LoRA")
    for k, t in weights.items():
        if ".lora_A." in k:
            weights[k] = torch.cat([t, factors[k].to(t)], dim=0).contiguous()
        elif ".lora_B." in k:
            weights[k] = torch.cat([t, -factors[k].to(t)], dim=1).contiguous()
    save_file(weights, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg_file = out / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["init_lora_weights"] = True
    cfg["r"] *= 2
    cfg["lora_alpha"] *= math.sqrt(2) if cfg.get("use_rslora") else 2
    for pattern in ("rank_pattern", "alpha_pattern"):
        if cfg.get(pattern):
            cfg[pattern] = {k: 2 * v for k, v in cfg[pattern].items()}
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return True


def mismatch_hint(model) -> str:
    """For a checkpoint whose base fingerprint differs from this model's: what a base-rewriting init adds to the
    refusal (its decomposition, redone when the base is built, is the same bits only with the same threads and
    hardware), else ""."""
    if getattr(model, INIT_FACTORS, None) is None:
        return ""
    init = model.peft_config[model.active_adapter].init_lora_weights
    return (f"; model.lora.init_lora_weights {init} rewrites the base with a decomposition (SVD/QR) redone whenever the "
            "base is built, whose bits depend on the number of CPU threads (torch.get_num_threads(), OMP_NUM_THREADS: "
            f"1 per process under a multi-process launch; now {torch.get_num_threads()}) and the hardware: build it as "
            "the run that wrote the checkpoint did (the same OMP_NUM_THREADS and number of processes)")


def refuse_unsupported(model, acc) -> None:
    """A base-rewriting init under DeepSpeed: refused in one line naming the field (not tested there: ZeRO-3's
    partitioned base, ZeRO-2's broadcast of the rewritten weights)."""
    from cpt.distributed import Backend, backend

    if getattr(model, INIT_FACTORS, None) is not None and backend(acc) is Backend.DEEPSPEED:
        init = model.peft_config[model.active_adapter].init_lora_weights
        raise ConfigError(f"model.lora.init_lora_weights: {init} is not supported under DeepSpeed (it rewrites the base "
                          "weights, which cpt tests on one process, DDP and FSDP2 only); launch with DDP or FSDP2, or "
                          "use init_lora_weights: default or gaussian")
