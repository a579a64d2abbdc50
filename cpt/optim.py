"""Parameter groups and the AdamW optimizer; the global gradient norm (clipped) of a step.

* No weight decay for biases, norm weights and every other parameter with fewer than 2 dimensions
  (and, optionally, for embeddings).
* Optional LR multipliers: ``{regex: multiplier}`` matched with ``re.search`` against full
  parameter names (``model.embed_tokens.weight``, ``lm_head.weight``, ``model.layers.3.mlp...``),
  and ``{"below": K, "multiplier": m}`` for decoder layers with index ``< K``. When several apply,
  they multiply. A tied weight matches through any of its names (``lm_head.weight`` and
  ``model.embed_tokens.weight`` are one tensor: both patterns apply to it). Each group carries ``lr_mult``; :func:`set_lr` sets ``lr = plan_lr * lr_mult``.

Group order is a pure function of the model's parameter order, so optimizer state dicts line up
on resume.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch
from torch import nn

from cpt.config import ConfigError
from cpt.distributed import unwrap

# "model.layers.3.", "transformer.h.3.", "encoder.layer.3.", "blocks.3." -> 3
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
NORM_NAME = re.compile(r"norm", re.IGNORECASE)


def layer_index(name: str) -> int | None:
    """The decoder-layer index in a parameter name (``model.layers.3.mlp.up_proj.weight`` -> 3), else None."""
    m = LAYER_INDEX.search(name)
    return int(m.group(1)) if m else None


def is_no_decay(name: str, param: torch.Tensor, embedding_ids: set[int] = frozenset(), decay_embeddings: bool = True) -> bool:
    """Biases, norms and other <2-D parameters take no weight decay; embeddings only if ``decay_embeddings`` is False."""
    ndim = len(getattr(param, "ds_shape", param.shape))  # ZeRO-3 (zero.Init) leaves [0]-shaped placeholders
    if ndim < 2 or name.endswith(".bias") or name == "bias" or NORM_NAME.search(name):
        return True
    return not decay_embeddings and id(param) in embedding_ids


def _check_lower_layers(lower_layers: Mapping[str, float] | None) -> tuple[int, float] | None:
    if lower_layers is None:
        return None
    keys = set(lower_layers)
    if keys != {"below", "multiplier"}:
        raise ConfigError(f"optim.lower_layers: expected keys 'below' and 'multiplier' (got {sorted(keys)})")
    below, mult = lower_layers["below"], float(lower_layers["multiplier"])
    if below != int(below) or below < 0:
        raise ConfigError(f"optim.lower_layers.below: must be a non-negative whole number of layers (got {below})")
    if mult < 0:
        raise ConfigError(f"optim.lower_layers.multiplier: must be >= 0 (got {mult:g})")
    return int(below), mult


def _compile_multipliers(lr_multipliers: Mapping[str, float] | None) -> list[tuple[str, re.Pattern, float]]:
    out = []
    for pattern, mult in (lr_multipliers or {}).items():
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"optim.lr_multipliers: {pattern!r} is not a valid regex ({e})") from None
        if float(mult) < 0:
            raise ConfigError(f"optim.lr_multipliers.{pattern}: must be >= 0 (got {mult})")
        out.append((pattern, rx, float(mult)))
    return out


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr_multipliers: Mapping[str, float] | None = None,
    lower_layers: Mapping[str, float] | None = None,
    decay_embeddings: bool = True,
) -> list[dict[str, Any]]:
    """AdamW parameter groups for the trainable parameters of ``model``.

    Returns ``[{"params", "param_names", "weight_decay", "lr_mult"}, ...]``, one group per distinct
    (decay, multiplier) pair, in order of first appearance. Raises ``ValueError`` naming the
    ``optim.*`` field when a multiplier pattern matches no parameter at all (frozen ones count) or
    ``lower_layers`` applies to a model without numbered layers.
    """
    rules = _compile_multipliers(lr_multipliers)
    lower = _check_lower_layers(lower_layers)
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    named = list(model.named_parameters())  # deduplicated: a tied weight appears once, under its first name
    aliases: dict[int, list[str]] = {}  # every name of each tensor (tied lm_head/embeddings share one)
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)

    for pattern, rx, _ in rules:
        if not any(rx.search(n) for names in aliases.values() for n in names):
            raise ConfigError(f"optim.lr_multipliers: pattern {pattern!r} matches no parameter of the model")
    if lower is not None:
        layers = {layer_index(n) for names in aliases.values() for n in names} - {None}
        if not layers:
            raise ConfigError("optim.lower_layers: the model has no numbered layers (expected names like 'model.layers.3.')")
        if lower[0] > max(layers) + 1:
            raise ConfigError(f"optim.lower_layers.below: {lower[0]} is more than the model's {max(layers) + 1} layers "
                             "(every layer would take the multiplier)")

    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    for name, p in named:
        if not p.requires_grad:
            continue
        mult = 1.0
        for _, rx, m in rules:
            if any(rx.search(n) for n in aliases[id(p)]):
                mult *= m
        if lower is not None:
            idx = layer_index(name)
            if idx is not None and idx < lower[0]:
                mult *= lower[1]
        mult *= loraplus_multiplier(model, name, p)
        decay = not is_no_decay(name, p, embedding_ids, decay_embeddings)
        group = groups.setdefault(
            (decay, mult), {"params": [], "param_names": [], "weight_decay": weight_decay if decay else 0.0, "lr_mult": mult}
        )
        group["params"].append(p)
        group["param_names"].append(name)
    if not groups:
        raise ConfigError("the model has no trainable parameters")
    return list(groups.values())


LORA_B = re.compile(r"\.lora_(?:embedding_)?B(?:\.|$)")


def loraplus_multiplier(model: nn.Module, name: str, param: torch.Tensor) -> float:
    """LoRA+ (``model.lora.loraplus_lr_ratio``, recorded on the peft model by :func:`cpt.adapters.apply_lora`): the ratio
    for a B factor (``...lora_B.default.weight``, ``lora_embedding_B``) and, as peft's ``create_loraplus_optimizer``
    and LLaMA-Factory do, for every other trained 1-D tensor (DoRA's magnitudes, norms of train_norms); 1 otherwise.
    As a group multiplier it follows the schedule at every step (:func:`set_lr`) and is part of the resume state."""
    ratio = getattr(model, "_cpt_loraplus_lr_ratio", None)
    if not ratio:
        return 1.0
    ndim = len(getattr(param, "ds_shape", param.shape))
    return float(ratio) if LORA_B.search(name) or ndim == 1 else 1.0


def param_shapes(acc) -> dict[str, list[int]]:
    """Every parameter of the prepared model(s) by its bare model's name (no DDP, DeepSpeed or torch.compile prefix),
    with its full shape (a DTensor's global shape, ZeRO-3's ``ds_shape``)."""
    return {n: list(getattr(p, "ds_shape", p.shape)) for m in acc._models for n, p in unwrap(m).named_parameters()}


def trainable_layout(acc) -> list[list[list]] | None:
    """Each optimizer group's trainable parameters as ``[name, shape]``, in the order the optimizer holds them (the
    order its Adam moments are saved in and, by torch, loaded in); None when a group has no names (an optimizer not
    built by :func:`param_groups`). The same after ``accelerate.prepare`` under every strategy: FSDP2 and DeepSpeed
    replace only a group's ``params`` (by shards, flat partitions), its ``param_names`` stay; shapes as
    :func:`param_shapes`."""
    shapes = param_shapes(acc)
    groups = [g.get("param_names") for opt in acc._optimizers for g in opt.param_groups]
    if not groups or not all(groups):
        return None
    return [[[n, shapes.get(n)] for n in names] for names in groups]


def layout_difference(saved: list, now: list, shapes: dict[str, list[int]]) -> str | None:
    """None when two :func:`trainable_layout` results match, else their first difference in words. Also None when
    the saved layout names a parameter the model (``shapes``: :func:`param_shapes`) lacks or has in another shape:
    the checkpoint is another model's, which loading its weights reports."""
    if saved == now or any(shapes.get(n) != s for g in saved for n, s in g):
        return None
    then_, now_ = ([f"{n} {s}" for g in layout for n, s in g] for layout in (saved, now))
    first = next((f"{a} vs {b}" for a, b in zip(now_, then_) if a != b), None)
    if first is None and len(now_) != len(then_):
        first = f"{len(now_)} vs {len(then_)} parameters"
    return first or f"the number or sizes of the parameter groups ({[len(g) for g in now]} vs {[len(g) for g in saved]})"


def group_settings(acc) -> list[dict]:
    """Each optimizer group's settings, all but its parameters (weight decay, lr multiplier, betas, eps)."""
    return [{k: v for k, v in g.items() if k != "params"} for opt in acc._optimizers for g in opt.param_groups]


def restore_group_settings(acc, settings: list[dict]) -> None:
    """torch's Optimizer.load_state_dict (under every strategy) replaces each group's settings by the checkpoint's:
    a --resume --allow-config-change of optim.weight_decay, betas or an lr multiplier's value, or a new stage from
    train.init_from, trained on with the old ones, silently. This run's (its config's) are put back."""
    groups = [g for opt in acc._optimizers for g in opt.param_groups]
    if len(groups) == len(settings):
        for group, own in zip(groups, settings):
            group.update(own)


def build_optimizer(model: nn.Module, optim_cfg: Any, device_type: str = "cpu", lr: float = 0.0,
                    decay_embeddings: bool | None = None) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` from a ``cpt.config.OptimConfig``.

    ``lr`` is the initial base LR (the loop sets the LR of every step with :func:`set_lr`).
    ``optim_cfg.fused``: None = fused kernels on CUDA, True = fused (CUDA or CPU), False = foreach.
    ``decay_embeddings`` (None: ``optim_cfg.decay_embeddings`` if the config has it, else True).
    """
    if decay_embeddings is None:
        decay_embeddings = bool(getattr(optim_cfg, "decay_embeddings", True))
    groups = param_groups(model, optim_cfg.weight_decay, optim_cfg.lr_multipliers, optim_cfg.lower_layers, decay_embeddings)
    for g in groups:
        g["lr"] = lr * g["lr_mult"]
    fused = optim_cfg.fused
    if fused is None:
        fused = device_type == "cuda" and torch.cuda.is_available()
    kwargs: dict[str, Any] = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's LR to ``lr * group["lr_mult"]`` (groups without a multiplier take ``lr``).

    Works through wrappers that expose ``param_groups`` (accelerate's AcceleratedOptimizer).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def reset_state(optimizer) -> bool:
    """Forget the AdamW moments and step counts (a stage may start with a fresh optimizer); False if there is no
    torch optimizer state to clear. Through accelerate's wrapper, and under DeepSpeed ZeRO the torch optimizer over
    its flat fp32 partitions (DeepSpeed's wrapper keeps it as ``.optimizer``; its state is rebuilt at the next step,
    as in a fresh run)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    if inner.__class__.__module__.startswith("deepspeed"):  # ZeRO's wrapper
        inner = getattr(inner, "optimizer", None)
    if not isinstance(inner, torch.optim.Optimizer):
        return False
    inner.state.clear()
    return True


def clip_grad_norm(acc, model: nn.Module, max_norm: float | None) -> torch.Tensor:
    """The global gradient norm before clipping, as a 0-d tensor on the device (no host read), every gradient
    clipped to ``max_norm`` when it is set (through accelerate: DDP, FSDP and DeepSpeed alike; fp16's loss scale
    taken out first). Without clipping the same call with an infinite ``max_norm`` (each gradient x 1.0): cpt summed
    ``p.grad`` itself, which said 0.0 at every step under DeepSpeed (it steps inside the last backward, its gradients
    gone from the parameters; its engine's norm now) and stopped FSDP2 at the first step (a DTensor gradient added to
    a plain tensor)."""
    norm = acc.clip_grad_norm_(model.parameters(), max_norm if max_norm is not None else math.inf)
    if norm is None:
        return torch.full((), float("nan"), device=acc.device)
    if hasattr(norm, "full_tensor"):  # FSDP2: a replicated DTensor; the plain tensor for the all-rank checks
        norm = norm.full_tensor()
    return torch.as_tensor(norm, device=acc.device, dtype=torch.float32).reshape(())


def zero_grad_loss(model: nn.Module) -> torch.Tensor:
    """A loss whose gradients are all zero (what DeepSpeed, which steps inside backward, is fed for a skipped step)."""
    return sum((p * 0.0).sum() for p in model.parameters() if p.requires_grad)
