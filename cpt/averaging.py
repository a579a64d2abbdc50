"""Weight averaging of finished models: uniform checkpoint averaging, base-CPT interpolation (the EMA of the
weights during training is cpt/ema.py).

* :func:`average_checkpoints`: the uniform (or weighted) mean of HF checkpoints (or peft adapters) with identical
  keys, streamed tensor by tensor from safetensors (LoRA factors side by side: the mean of the adapters' products).
* :func:`interpolate` / :func:`interpolation_sweep`: ``(1 - alpha) * base + alpha * cpt``; the sweep reports the
  upstream and downstream held-out loss at each alpha (MagMax-style trade-off between adaptation and forgetting).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

# ----------------------------------------------------------------------------- reading HF checkpoints

_WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors")
_INDEX_FILE = "model.safetensors.index.json"
_SKIP_COPY = {"model.safetensors", "adapter_model.safetensors", _INDEX_FILE}


def weight_files(ckpt: str | Path) -> tuple[str, dict[str, Path]]:
    """The kind of a checkpoint directory ('model' or 'adapter') and a map tensor name -> file holding it."""
    d = Path(ckpt)
    from safetensors import safe_open

    from cpt.model import check_weight_files  # a truncated file: one ModelLoadError line naming it

    check_weight_files(sorted(d.glob("*.safetensors")) if d.is_dir() else [], f"checkpoint {d}")
    if (d / _INDEX_FILE).is_file():
        index = json.loads((d / _INDEX_FILE).read_text())
        return "model", {k: d / v for k, v in index["weight_map"].items()}
    for kind, fname in (("model", "model.safetensors"), ("adapter", "adapter_model.safetensors")):
        if (d / fname).is_file():
            with safe_open(str(d / fname), framework="pt") as f:
                return kind, {k: d / fname for k in f.keys()}
    pickles = sorted(f.name for f in d.glob("*.bin")) if d.is_dir() else []
    found = f"; it holds {', '.join(pickles[:3])} (pickle), convert it with save_pretrained(safe_serialization=True)" if pickles else ""
    raise FileNotFoundError(f"{d}: no model.safetensors, model.safetensors.index.json or adapter_model.safetensors "
                            f"(only safetensors checkpoints are read){found}")


class _Reader:
    """Lazily opened safetensors files of one checkpoint."""

    def __init__(self, ckpt: str | Path):
        self.kind, self.where = weight_files(ckpt)
        self._open: dict[Path, object] = {}
        self._stack = contextlib.ExitStack()

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.where[name]
        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._open[path].get_tensor(name)

    def close(self) -> None:
        self._stack.close()


def _copy_side_files(src: Path, dst: Path) -> None:
    """config, generation config, tokenizer files, adapter config: everything that is not a weight file."""
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in _SKIP_COPY and not (f.name.startswith("model-") and f.suffix == ".safetensors"):
            shutil.copy2(f, dst / f.name)


def _write_sharded(tensors: Iterable[tuple[str, torch.Tensor]], out: Path, kind: str,
                   total_bytes: int, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    if kind == "adapter" or total_bytes <= max_shard_bytes:
        fname = "adapter_model.safetensors" if kind == "adapter" else "model.safetensors"
        save_file(dict(tensors), str(out / fname), metadata={"format": "pt"})
        return
    n_shards = math.ceil(total_bytes / max_shard_bytes)
    shard: dict[str, torch.Tensor] = {}
    size, i, weight_map = 0, 0, {}

    def flush():
        nonlocal shard, size, i
        if shard:
            i += 1
            name = f"model-{i:05d}-of-{n_shards:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for k, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        shard[k] = t
        size += nbytes
    flush()
    if i != n_shards:  # fix up the names if the greedy packing needed a different count
        for old in sorted(set(weight_map.values())):
            j = int(old.split("-")[1])
            new = f"model-{j:05d}-of-{i:05d}.safetensors"
            (out / old).rename(out / new)
            weight_map = {k: (new if v == old else v) for k, v in weight_map.items()}
    (out / _INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map},
                                              indent=2))


# ----------------------------------------------------------------------------- checkpoint averaging


def average_checkpoints(paths: list[str | Path], out_dir: str | Path, weights: list[float] | None = None,
                        max_shard_bytes: int = 5 * 2**30) -> Path:
    """Average HF checkpoints (or peft adapters; cpt checkpoints exported first) with identical tensor names and shapes,
    tensor by tensor.

    The mean is computed in fp32 and stored in each tensor's original dtype; config and tokenizer files are
    copied from the first checkpoint. ``weights`` (normalised to sum 1) turns the uniform mean into a weighted one.
    """
    if len(paths) < 2:
        raise ValueError("average_checkpoints needs at least two checkpoints")
    w = [1.0] * len(paths) if weights is None else [float(x) for x in weights]
    if len(w) != len(paths) or any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError("weights: one non-negative weight per checkpoint, not all zero")
    w = [x / sum(w) for x in w]
    beside = Path(out_dir).resolve().parent  # (cpt checkpoints are exported there first: the disk OUT is on, not /tmp)
    beside.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".cpt-average-", dir=beside) as work:
        sources = [_exported(p, Path(work) / str(i)) for i, p in enumerate(paths)]
        return _average(paths, sources, out_dir, w, max_shard_bytes)


def _exported(path: str | Path, work: Path) -> Path:
    """An HF export or adapter directory as given; a run directory's final export (RUN/export); a cpt resume checkpoint
    (or a run directory without export/) exported into ``work`` through ``cpt export``'s path: a LoRA run's as its
    adapter (its resume checkpoints hold the adapter alone: cpt/adapter_checkpoint.py), any other as the full model."""
    from cpt.checkpoint_export import export_checkpoint, is_checkpoint_dir, run_export

    p = Path(run_export(path))
    if not is_checkpoint_dir(p):
        return p
    return export_checkpoint(p, work / "export", adapter=None, echo=lambda *a, **k: None)


def _average(paths: list, sources: list[Path], out_dir, w: list[float], max_shard_bytes: int) -> Path:
    readers = [_Reader(p) for p in sources]
    try:
        kinds = {r.kind for r in readers}
        if len(kinds) != 1:
            raise ValueError("cannot average a full model with an adapter")
        keys = sorted(readers[0].where)
        for p, r in zip(paths[1:], readers[1:]):
            if set(r.where) != set(keys):
                diff = sorted(set(r.where) ^ set(keys))
                raise ValueError(f"{p} has different tensors than {paths[0]}: {diff[:5]}")
        # written like every export: a hidden folder renamed into place (an earlier export there replaced whole)
        from cpt.export import check_export_target, publish_dir, staging_dir

        out = check_export_target(out_dir, paths, "one of the checkpoints being averaged (OUT comes first)")
        tmp = staging_dir(out)
        tmp.mkdir(parents=True)

        lora = readers[0].kind == "adapter" and any(_lora_factor(k) for k in keys)
        if lora:
            _check_lora_configs(paths, sources)

        def averaged() -> Iterator[tuple[str, torch.Tensor]]:
            for k in keys:
                first = readers[0].get(k)
                factor = _lora_factor(k) if lora else None
                if factor is not None:  # sum_i w_i B_i A_i exactly: the factors side by side (rank k*r), B_i scaled
                    parts = [r.get(k).float() * (wi if factor == "B" else 1.0) for r, wi in zip(readers, w)]
                    yield k, torch.cat(parts, dim=0 if factor == "A" else 1).to(first.dtype).contiguous()
                    continue
                acc = first.float() * w[0]
                for p, r, wi in zip(paths[1:], readers[1:], w[1:]):
                    t = r.get(k)
                    if t.shape != first.shape:
                        raise ValueError(f"{k}: shape {tuple(t.shape)} in {p} vs {tuple(first.shape)} in {paths[0]}")
                    acc += t.float() * wi
                yield k, (acc.to(first.dtype) if first.is_floating_point() else first).contiguous()

        total = 0
        for k in keys:
            t = readers[0].get(k)
            total += t.numel() * t.element_size()
        try:
            _write_sharded(averaged(), tmp, readers[0].kind, total, max_shard_bytes)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written left behind
            raise
    finally:
        for r in readers:
            r.close()
    _copy_side_files(sources[0], tmp)
    if lora:
        _scale_lora_rank(tmp / "adapter_config.json", len(paths))
    return publish_dir(tmp, out)


# LoRA adapters: the mean of the factors is not the mean of the adapters (mean(B) mean(A) != mean(B A)); the average
# adapter holds every adapter's factors side by side instead, with rank k*r and the same scale (peft's "cat").
_LORA_FACTORS = {".lora_A.": "A", ".lora_B.": "B", ".lora_embedding_A": "A", ".lora_embedding_B": "B"}


def _lora_factor(name: str) -> str | None:
    """"A" or "B" for the tensor of a LoRA factor (peft's saved names), else None."""
    return next((f for key, f in _LORA_FACTORS.items() if key in name), None)


def _check_lora_configs(paths: list[str | Path], sources: list[Path]) -> None:
    fields = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")
    from cpt.adapters import adapter_base_identity

    cfgs = [json.loads((Path(p) / "adapter_config.json").read_text()) for p in sources]
    from cpt.adapter_init import mutates_base

    residual = [(str(p), c["init_lora_weights"]) for p, c in zip(paths, cfgs) if mutates_base(c.get("init_lora_weights"))]
    if residual:  # (cpt's exports are converted: cpt/adapter_init.py)
        raise ValueError(f"{residual[0][0]}: an adapter of a {residual[0][1]} residual base (its init_lora_weights), not "
                         "of the base it names: convert it to a plain LoRA first (peft's save_pretrained with "
                         "path_initial_model_for_weight_conversion; cpt's exports are converted already)")
    dora = [str(p) for p, c in zip(paths, cfgs) if c.get("use_dora")]
    if dora:  # each row is magnitude * (W + BA) / ||W + BA||: not linear in the factors, no side-by-side sum
        raise ValueError(f"{dora[0]}: a DoRA adapter (model.lora.use_dora) cannot be averaged factor by factor (its "
                         "magnitudes rescale each adapter's whole weight): merge each adapter into its base (cpt merge), "
                         "then average the merged models")
    for p, c, src in zip(paths[1:], cfgs[1:], sources[1:]):
        diff = [f for f in fields if c.get(f) != cfgs[0].get(f)]
        if diff:
            raise ValueError(f"{p}: adapter_config.json differs from {paths[0]}'s in {', '.join(diff)}: the adapters "
                             "must have the same LoRA rank and scale to be averaged")
        if adapter_base_identity(src) != adapter_base_identity(sources[0]):  # the mean update would sit on one base
            raise ValueError(f"{p} was trained on another base ({c.get('base_model_name_or_path')}) than {paths[0]} "
                             f"({cfgs[0].get('base_model_name_or_path')}): merge each (cpt merge), then average those")
    if cfgs[0].get("target_parameters"):  # (their factors hold every expert's rank rows interleaved: not a plain cat)
        raise ValueError(f"{paths[0]}: an adapter of fused expert weights (peft target_parameters "
                         f"{sorted(cfgs[0]['target_parameters'])}) cannot be averaged factor by factor: merge each "
                         "adapter into its base (cpt merge), then average the merged models (the same mean update)")
    if cfgs[0].get("rank_pattern") or cfgs[0].get("alpha_pattern"):
        raise ValueError(f"{paths[0]}: adapters with a rank_pattern or alpha_pattern cannot be averaged")


def _scale_lora_rank(config_file: Path, k: int) -> None:
    """k adapters' factors side by side: rank k*r, alpha raised so that the scale (alpha/r, rsLoRA alpha/sqrt(r))
    stays that of each adapter."""
    cfg = json.loads(config_file.read_text())
    cfg["r"] *= k
    cfg["lora_alpha"] *= math.sqrt(k) if cfg.get("use_rslora") else k
    config_file.write_text(json.dumps(cfg, indent=2))


# ----------------------------------------------------------------------------- interpolation


def interpolate_state_dicts(base: dict[str, torch.Tensor], cpt: dict[str, torch.Tensor],
                            alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * base + alpha * cpt`` for every tensor (fp32 math, CPT dtype).

    Tensors that the CPT model grew along dim 0 (vocabulary extension) interpolate the shared rows and take the
    extra rows from the CPT model (the base has no such tokens). Integer buffers are taken from the CPT model.
    """
    if set(base) != set(cpt):
        diff = sorted(set(base) ^ set(cpt))
        raise ValueError(f"base and CPT models have different tensors: {diff[:5]}")
    out = {}
    for k, c in cpt.items():
        b = base[k]
        if not c.is_floating_point():
            out[k] = c.clone()
            continue
        if b.shape == c.shape:
            out[k] = torch.lerp(b.float(), c.float(), alpha).to(c.dtype)
        elif b.dim() == c.dim() and b.shape[1:] == c.shape[1:] and b.shape[0] < c.shape[0]:
            t = c.float().clone()
            n = b.shape[0]
            t[:n] = torch.lerp(b.float(), c[:n].float(), alpha)
            out[k] = t.to(c.dtype)
        else:
            raise ValueError(f"{k}: base shape {tuple(b.shape)} vs CPT shape {tuple(c.shape)}")
    return out


def load_model_dir(path: str | Path, dtype: torch.dtype | None = torch.float32):
    """(model, tokenizer) from an HF model directory, or from a peft adapter directory (merged in memory)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    from cpt.checkpoint_export import is_checkpoint_dir

    if is_checkpoint_dir(p):  # a cpt resume checkpoint (any backend): exported through `cpt export`'s path into
        from cpt.checkpoint_export import model_dir_of  # its run directory (not /tmp), removed once loaded

        with model_dir_of(p, prefix=".cpt-load-") as exported:
            return load_model_dir(exported, dtype)
    if (p / "adapter_config.json").is_file():
        from cpt.adapters import merge_lora
        from cpt.model import load_adapter_model

        peft_model, tok = load_adapter_model(p, dtype=dtype)
        return merge_lora(peft_model), tok
    from cpt.model import load_or_explain, require_safetensors  # (a missing model or hub id: one ModelLoadError line)

    model = load_or_explain("model", str(p), AutoModelForCausalLM.from_pretrained, str(p), dtype=dtype,
                            trust_remote_code=False, use_safetensors=require_safetensors(p))
    tok = load_or_explain("tokenizer", str(p), AutoTokenizer.from_pretrained, str(p), trust_remote_code=False)
    return model, tok


def _as_model(x, dtype=torch.float32):
    if isinstance(x, nn.Module):
        return x, None
    return load_model_dir(x, dtype=dtype)


def interpolate(base, cpt, alpha: float, out_dir: str | Path | None = None):
    """The model ``(1 - alpha) * base + alpha * cpt`` (alpha 0: the base, 1: the CPT model).

    ``base``/``cpt``: models or directories (HF model or peft adapter). Returns a model with the CPT model's
    architecture (the CPT model object itself is modified when a model is passed); with ``out_dir`` it is saved
    there (safetensors) with the CPT tokenizer.
    """
    base_model, _ = _as_model(base)
    cpt_model, cpt_tok = _as_model(cpt)
    sd = interpolate_state_dicts(base_model.state_dict(), cpt_model.state_dict(), alpha)
    cpt_model.load_state_dict(sd)
    if out_dir is not None:
        from cpt.export import write_hf

        write_hf(cpt_model, cpt_tok, out_dir)
    return cpt_model


def default_loss_fn(model: nn.Module, tokens: torch.Tensor) -> float:
    from cpt.evaluate import heldout_loss

    return float(heldout_loss(model, tokens, batch_size=8))


def interpolation_sweep(base_model: nn.Module, cpt_model: nn.Module, alphas: list[float],
                        sets: dict[str, tuple[str, torch.Tensor]],
                        loss_fn: Callable[[nn.Module, torch.Tensor], float] | None = None) -> list[dict]:
    """Held-out loss of every set at every alpha: ``[{"alpha": a, "loss/<name>": x, "tag/<name>": t, ...,
    "upstream_mean": ..., "downstream_mean": ...}]``. ``sets``: name -> (tag, tokens[n, L]).

    The CPT model object is used as the working copy and holds the CPT weights again at the end.
    """
    loss_fn = loss_fn or default_loss_fn
    for name, (tag, _) in sets.items():
        if tag not in ("upstream", "downstream"):
            raise ValueError(f"held-out set {name!r}: tag must be upstream or downstream, not {tag!r}")
    base_sd = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    cpt_sd = {k: v.detach().clone() for k, v in cpt_model.state_dict().items()}
    rows = []
    was_training = cpt_model.training
    cpt_model.eval()
    try:
        for a in alphas:
            cpt_model.load_state_dict(interpolate_state_dicts(base_sd, cpt_sd, float(a)))
            row: dict = {"alpha": float(a)}
            by_tag: dict[str, list[float]] = {"upstream": [], "downstream": []}
            with torch.no_grad():
                for name, (tag, tokens) in sets.items():
                    loss = float(loss_fn(cpt_model, tokens))
                    row[f"loss/{name}"] = loss
                    row[f"tag/{name}"] = tag
                    by_tag[tag].append(loss)
            for tag, vals in by_tag.items():
                if vals:
                    row[f"{tag}_mean"] = sum(vals) / len(vals)
            rows.append(row)
    finally:
        cpt_model.load_state_dict(cpt_sd)
        cpt_model.train(was_training)
    return rows


def format_sweep(rows: list[dict]) -> str:
    """A plain-text table: alpha, then each set's loss (upstream sets first), then the per-tag means."""
    if not rows:
        return ""
    names = [k[5:] for k in rows[0] if k.startswith("loss/")]
    names.sort(key=lambda n: (rows[0][f"tag/{n}"] != "upstream", n))
    cols = ["alpha"] + [f"{n} ({'up' if rows[0][f'tag/{n}'] == 'upstream' else 'down'})" for n in names]
    cols += [c for c in ("upstream_mean", "downstream_mean") if c in rows[0]]
    width = max(14, *(len(c) for c in cols))
    lines = ["  ".join(f"{c:>{width}}" for c in cols)]
    for r in rows:
        vals = [r["alpha"]] + [r[f"loss/{n}"] for n in names]
        vals += [r[c] for c in ("upstream_mean", "downstream_mean") if c in r]
        lines.append("  ".join(f"{v:>{width}.4f}" for v in vals))
    return "\n".join(lines)
