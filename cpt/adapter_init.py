"""LoRA initialisations that rewrite the base weights (``model.lora.init_lora_weights``: ``pissa``,
``pissa_niter_N``, ``olora``): A and B start from the base weight ``W`` (peft's ``pissa_init``: its principal singular
vectors; ``olora_init``: a QR decomposition) and ``W`` is replaced by the residual ``W_res = W - s B0 A0``, so that the
model still starts as the base.

What cpt does about the rewritten base:

* the residual is cpt's (:func:`residual`), not peft's matmul: fixed-order elementwise products and sums, the same
  bits whatever the number of CPU threads (a BLAS matmul's are not guaranteed to be);
* the initial factors ``A0, B0`` are kept on the model (:func:`keep_initial_factors`, an adapter's size) and stored in
  every resume checkpoint (``lora_init_factors.safetensors``, :func:`factors_items`). Whoever reads a checkpoint (a
  resume, a new stage or anneal branch, `cpt export`) builds the base and the residual from the *original* base
  weights and the stored factors (:func:`init_peft_model`): no SVD/QR, whose bits depend on the number of threads and
  the hardware, so a run requeued on another number of processes or OMP_NUM_THREADS gets the residual it trained on,
  and the base fingerprint (cpt/adapter_checkpoint.py) still refuses a different base. A checkpoint written before
  cpt stored them: the decomposition is redone as peft does it (refused, saying why, when it comes out different);
* every exported adapter is converted to a plain LoRA against the *original* base (:func:`as_plain_lora`), as peft's
  ``save_pretrained(path_initial_model_for_weight_conversion=...)`` does: ``BA - B0A0 = [B | -B0][A ; A0]``, rank 2r,
  alpha raised to keep the scale, ``init_lora_weights: true``. Without it the adapter would hold factors meant for
  ``W_res`` while its ``base_model_name_or_path`` names ``W``: `cpt merge`, peft and `cpt average` would silently apply
  it to the wrong base;
* only linear layers (peft initialises no other layer type this way) and one process, DDP, FSDP2 and
  DeepSpeed ZeRO-2 (tested); ZeRO-3 is refused (:func:`refuse_unsupported`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from cpt.config import ConfigError

INIT_FACTORS = "_cpt_initial_factors"
RESIDUAL = "_cpt_residual"  # how the model's residual base was made: "cpt" (:func:`residual`) or "peft" (its own matmul)
FACTORS_FILE = "lora_init_factors.safetensors"  # in a resume checkpoint: A0, B0 (keyed as peft saves the adapter)
ADAPTER_BASE = "adapter_base.json"  # a checkpoint without the frozen base (cpt/adapter_checkpoint.py)


def mutates_base(init: str | bool | None) -> bool:
    """Whether a peft ``init_lora_weights`` value rewrites the base weights (PiSSA, OLoRA, CorDA)."""
    return isinstance(init, str) and (init.lower().startswith(("pissa", "corda")) or init.lower() == "olora")


def _saved_key(name: str, adapter: str) -> str:
    """A parameter's name as peft saves it: without the adapter's name (``...lora_A.default.weight`` -> ``lora_A.weight``)."""
    return name.replace(f".{adapter}.", ".")


def residual(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``weight - scaling * b @ a`` in fp32 (cast back to ``weight``'s dtype), the same bits for any number of CPU
    threads: the rank-r product is summed as r outer products in a fixed order, each element by separately rounded
    IEEE multiplies and adds (no matmul, whose BLAS kernel and summation order may change with the threads; no fused
    multiply-add, which vectorised and scalar loops would round differently). Row blocks of ~256K elements (the result
    does not depend on them) keep it near a matmul's speed (measured on one thread: 0.13-0.55 s for a 4096x4096
    weight at r=16, peft's matmul 0.3-0.4 s)."""
    w = weight.detach().to(torch.float32)
    sb = b.detach().to(w.device, torch.float32) * scaling
    a = a.detach().to(w.device, torch.float32)
    out = torch.empty_like(w)
    rows = max(1, (1 << 18) // max(1, w.shape[1]))
    for i in range(0, w.shape[0], rows):
        block = sb[i:i + rows]
        acc = block[:, :1] * a[:1]
        for k in range(1, a.shape[0]):
            acc = acc + block[:, k:k + 1] * a[k:k + 1]
        torch.sub(w[i:i + rows], acc, out=out[i:i + rows])
    return out.to(weight.dtype)


def read_factors(ckpt: str | Path | None) -> dict[str, torch.Tensor] | bool | None:
    """What the checkpoint a run loads from says about a base-rewriting init: its stored factors (a dict); False for a
    checkpoint without the base that has none (written before cpt stored them: the decomposition is redone as peft
    does it); None for no checkpoint or a whole-model one (a fresh initialisation)."""
    if ckpt is None:
        return None
    if (Path(ckpt) / FACTORS_FILE).is_file():
        from safetensors.torch import load_file

        return load_file(str(Path(ckpt) / FACTORS_FILE))
    return False if (Path(ckpt) / ADAPTER_BASE).is_file() else None


def init_peft_model(model, pcfg, factors_from: str | Path | None = None):
    """``get_peft_model(model, pcfg)``; with a base-rewriting ``pcfg.init_lora_weights``, the factors and residual as
    the run that wrote ``factors_from`` (the checkpoint the weights will be loaded from, if any) made them: its stored
    factors over the original base, else peft's decomposition with cpt's :func:`residual` (a checkpoint written before
    cpt stored factors: peft's own, as that run made it). Keeps the factors on the model (:func:`keep_initial_factors`)."""
    from peft import get_peft_model
    from peft.tuners.lora import Linear

    init = pcfg.init_lora_weights
    if not mutates_base(init):
        return get_peft_model(model, pcfg)
    stored = read_factors(factors_from)
    if stored is False or any(getattr(p, "ds_numel", 0) for p in model.parameters()):  # (ZeRO-3: refused later)
        peft_model = get_peft_model(model, pcfg)
        keep_initial_factors(peft_model, how="peft")
        return peft_model
    pcfg.init_lora_weights = False  # the adapter's layers only: A and B are set below
    try:
        peft_model = get_peft_model(model, pcfg)
    finally:
        pcfg.init_lora_weights = init
    adapter = peft_model.active_adapter
    peft_model.peft_config[adapter].init_lora_weights = init
    _refuse_other_layers(peft_model)
    layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, Linear) and adapter in m.lora_A}
    if stored is not None:
        _check_stored(stored, layers, adapter, factors_from)
    for name, layer in layers.items():
        base = layer.get_base_layer()
        if base.weight.is_meta:  # (FSDP2's cpu_ram_efficient_loading: rank 0's weights are broadcast into these)
            continue
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        if stored is None:
            original = base.weight.detach().clone()
            if init.lower() == "olora":
                layer.olora_init(adapter)
            else:
                layer.pissa_init(adapter, init)  # (its residual, a matmul, is replaced by cpt's below)
        else:
            original = base.weight.detach()
            key = _saved_key(f"{name}.lora_A.{adapter}.weight", adapter)
            a.data = stored[key].to(a.device, a.dtype, copy=True).contiguous()  # (copies: training moves a, b, not A0, B0)
            b.data = stored[key.replace(".lora_A.", ".lora_B.")].to(b.device, b.dtype, copy=True).contiguous()
        pissa_t = init.lower().startswith("pissa") and layer.fan_in_fan_out  # (peft's olora ignores fan_in_fan_out)
        w = original.T if pissa_t else original
        res = residual(w, a, b, layer.scaling[adapter])
        base.weight.data = (res.T if pissa_t else res).contiguous()
    keep_initial_factors(peft_model, how="cpt", stored=stored)
    return peft_model


def _check_stored(stored: dict, layers: dict, adapter: str, ckpt) -> None:
    """ConfigError unless the stored factors are those of this model's LoRA layers (names and shapes)."""
    want = {}
    for name, layer in layers.items():
        for side in ("lora_A", "lora_B"):
            want[_saved_key(f"{name}.{side}.{adapter}.weight", adapter)] = tuple(getattr(layer, side)[adapter].weight.shape)
    got = {k: tuple(v.shape) for k, v in stored.items()}
    if got != want:
        first = next(iter(sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]))
        raise ConfigError(f"model.lora: the initial factors stored in {Path(ckpt) / FACTORS_FILE} do not fit this run's "
                          f"LoRA layers (first difference: {first}, {got.get(first)} vs {want.get(first)}): model.lora "
                          "(r, target_modules) must be those the checkpoint was trained with")


def _refuse_other_layers(peft_model, field: str = "model.lora.init_lora_weights") -> None:
    """A base-rewriting init on a LoRA layer that is not a Linear: refused in one line naming the field."""
    from peft.tuners.lora import Linear, LoraLayer

    adapter = peft_model.active_adapter
    others = sorted({type(m).__name__ for m in peft_model.modules() if isinstance(m, LoraLayer) and not isinstance(m, Linear)})
    if others:
        raise ConfigError(f"{field}: {peft_model.peft_config[adapter].init_lora_weights} initialises linear layers "
                          f"only, and model.lora.target_modules also selects {', '.join(others)} layers (embeddings, "
                          "fused MoE experts): name only linear projections in target_modules, or use init default")


def keep_initial_factors(peft_model, how: str = "peft", stored: dict | None = None) -> None:
    """After the peft model is built with a base-rewriting init: refuse a LoRA layer that is not a Linear, and keep
    the initial factors on the model (``stored``, else a copy of the adapter's) for :func:`as_plain_lora` and the
    checkpoints (:func:`factors_items`); ``how``: how its residual was made (:data:`RESIDUAL`)."""
    _refuse_other_layers(peft_model)
    adapter = peft_model.active_adapter
    factors = stored if stored is not None else {
        _saved_key(n, adapter): p.detach().clone() for n, p in peft_model.named_parameters()
        if re.search(rf"\.lora_[AB]\.{re.escape(adapter)}\.weight$", n)}
    setattr(peft_model, INIT_FACTORS, factors)
    setattr(peft_model, RESIDUAL, how)


def factors_items(model) -> list[tuple[str, str, dict]]:
    """A resume checkpoint's :data:`FACTORS_FILE` as a ``(file name, kind, payload)`` item: the initial factors of a
    model whose residual is cpt's (none otherwise: a residual made by peft's matmul is not remade from them)."""
    factors = getattr(model, INIT_FACTORS, None)
    if factors is None or getattr(model, RESIDUAL, None) != "cpt" or any(t.is_meta for t in factors.values()):
        return []
    return [(FACTORS_FILE, "safetensors", {k: t.contiguous() for k, t in factors.items()})]


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
    hardware: a checkpoint written before cpt stored the initial factors), else "" (a model built from a checkpoint's
    stored factors has the run's residual over the same base: a mismatch is another base)."""
    if getattr(model, INIT_FACTORS, None) is None or getattr(model, RESIDUAL, None) != "peft":
        return ""
    init = model.peft_config[model.active_adapter].init_lora_weights
    return (f"; model.lora.init_lora_weights {init} rewrites the base with a decomposition (SVD/QR) redone whenever the "
            "base is built, whose bits depend on the number of CPU threads (torch.get_num_threads(), OMP_NUM_THREADS: "
            f"1 per process under a multi-process launch; now {torch.get_num_threads()}) and the hardware: build it as "
            "the run that wrote the checkpoint did (the same OMP_NUM_THREADS and number of processes)")


def refuse_unsupported(model, acc) -> None:
    """A base-rewriting init under DeepSpeed ZeRO-3: refused in one line naming the field (ZeRO-3 partitions the base
    weights the residual is computed on; ZeRO-1/2 keep them whole on every rank, as DDP: tested)."""
    from cpt.distributed import zero_stage

    if getattr(model, INIT_FACTORS, None) is not None and zero_stage(acc) == 3:
        init = model.peft_config[model.active_adapter].init_lora_weights
        raise ConfigError(f"model.lora.init_lora_weights: {init} is not supported under DeepSpeed ZeRO-3 (it rewrites "
                          "the base weights, which ZeRO-3 partitions); launch with DDP, FSDP2 or ZeRO-2, or use "
                          "init_lora_weights: default or gaussian")
