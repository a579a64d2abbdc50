"""`cpt export`: a resume checkpoint (or a run directory's latest valid one) of any layout written as an HF model
directory on one CPU process (:func:`export_checkpoint`: the base built as the run built it, the checkpoint's weights
read by cpt/consolidate.py loaded over it, a LoRA adapter merged or kept); :func:`model_dir_of` does the same into a
scratch folder for the commands that read a checkpoint as a model (`cpt eval`, `cpt average`, `cpt interpolate`)."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from cpt import consolidate
from cpt.adapter_checkpoint import AdapterCheckpointError, check_fits, is_adapter_layout, read_base_record
from cpt.consolidate import ConsolidateError


def checkpoint_config(ckpt: str | os.PathLike):
    """The RunConfig a checkpoint was written with (its config.yaml)."""
    from cpt.config import load_config

    p = Path(ckpt) / "config.yaml"
    if not p.is_file():
        raise ConsolidateError(f"{ckpt}: no config.yaml (not a cpt checkpoint)")
    from cpt.resume import as_the_run_read_it, run_dir_of

    return as_the_run_read_it(load_config(str(p)), run_dir_of(ckpt))  # (relative paths: from where the run started)


def run_export(path):
    """A cpt run directory stands for its final export (``RUN/export``); anything else (an export, an adapter, a
    checkpoint, a hub id) as given."""
    p = Path(path)
    if not (p / "config.json").exists() and not (p / "adapter_config.json").exists() and (p / "export").is_dir():
        return p / "export"
    return path


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    from cpt.checkpoint import TRAINER_STATE

    p = Path(path)
    return (p / TRAINER_STATE).is_file() or (p / "checkpoints").is_dir() and not (p / "export").is_dir()


def export_checkpoint(path: str | os.PathLike, out_dir: str | os.PathLike, adapter: bool | None = False, echo=print,
                      dtype: str | None = None, max_shard_size: str | int | None = None, ema: bool = False) -> Path:
    """Write a checkpoint (or a run directory's latest valid one) as an HF model directory on one CPU process:
    the full model (a LoRA run's adapter merged in), or with ``adapter`` the peft adapter of a LoRA run (None: the
    adapter of a LoRA run, the full model of any other). ``dtype``, ``max_shard_size``: the weight files (None: the
    run's ``checkpoint.export_dtype`` and ``checkpoint.max_shard_size``). ``ema``: the run's EMA (``train.ema_decay``)."""
    from cpt.checkpoint import STATE_TENSORS
    from cpt.ema import load_ema_weights
    from cpt.export import check_export_target, dtype_note, export_options, write_hf
    from cpt.model import build_model, load_tokenizer, prepare_model

    out_dir = check_export_target(out_dir)
    replacing = out_dir.is_dir() and any(out_dir.iterdir())
    ckpt, cfg, weights, kind, base_record = read_checkpoint_for_export(path, echo)
    if adapter is None:
        adapter = cfg.model.lora is not None
    if adapter and cfg.model.lora is None:
        raise ConsolidateError(f"{ckpt}: --adapter needs a LoRA run's checkpoint; this run trained the full model")
    tokenizer = load_tokenizer(cfg.model)
    from cpt.resume import base_model_dir, run_dir_of

    base_from = base_model_dir(cfg, run_dir_of(ckpt))  # the model (a LoRA run: the base) built as the run built it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)  # (a base from model.arch: the run's initialisation)
        model = build_model(cfg.model, tokenizer, weights_from=base_from)  # the base (architecture, or pretrained)
        model, tokenizer, _ = prepare_model(cfg.model, model, tokenizer, log_fn=lambda *a, **k: None, weights_from=base_from,
                                            checkpoint=ckpt)  # (PiSSA/OLoRA: the residual from its stored factors)
    if base_record is not None:
        try:
            check_fits(ckpt, model, base_record)
        except AdapterCheckpointError as e:
            raise ConsolidateError(f"{ckpt}: {e}") from None
    consolidate.check_weight_keys(model, weights, f"cpt export {ckpt}", adapter=base_record is not None)
    model.load_state_dict(weights, strict=False)
    if ema:
        try:
            load_ema_weights(ckpt / STATE_TENSORS, model, cfg.train.ema_decay)
        except ValueError as e:
            raise ConsolidateError(f"{ckpt}: --ema: {e}") from None
    if cfg.model.lora is not None and not adapter:
        from cpt.adapters import merge_lora

        model = merge_lora(model)
    options = export_options(cfg.checkpoint)
    options.update({k: v for k, v in (("dtype", dtype), ("max_shard_size", max_shard_size)) if v is not None})
    note = dtype_note(model, options.get("dtype")) if dtype is None else None  # (a --dtype given: no note)
    out = write_hf(model, tokenizer, out_dir, **options)
    echo(f"exported {ckpt} ({kind} layout{', its EMA weights' if ema else ''}) to {out}"
         + (" (the earlier export there replaced whole)" if replacing else "") + (f"\n{note}" if note else ""))
    return out


def read_checkpoint_for_export(path: str | os.PathLike, echo=print, attempts: int = 3):
    """``(checkpoint, its RunConfig, its full weights, its layout, its adapter_base.json record or None)``, all read
    first: building the base to export onto takes a while. A run still writing prunes its older checkpoints
    (``checkpoint.keep``): one pruned while being read is reported and, when ``path`` is a run directory, its newer
    checkpoint is read instead (else the read failed with a misleading error)."""
    from cpt.checkpoint import resolve_checkpoint

    for attempt in range(attempts):
        ckpt = resolve_checkpoint(path)
        try:
            kind = consolidate.layout(ckpt)
            record = read_base_record(ckpt) if is_adapter_layout(ckpt) else None
            return ckpt, checkpoint_config(ckpt), consolidate.read_model_state(ckpt), kind, record
        except (ConsolidateError, OSError, RuntimeError):  # safetensors: RuntimeError "unable to open file"
            if ckpt.is_dir():
                raise
            gone = f"{ckpt} was removed while being read (pruned by the run writing it: checkpoint.keep)"
            if ckpt == Path(path) or attempt == attempts - 1:
                raise ConsolidateError(gone) from None
            echo(f"{gone}; reading the run's newest checkpoint again")


@contextmanager
def model_dir_of(path: str | os.PathLike, prefix: str = ".cpt-export-"):
    """``path`` as an HF model or adapter directory to read: itself if it is one; a cpt checkpoint (or a run
    directory's latest) exported into a hidden scratch folder of its run directory, removed on leaving (an error
    included). Not /tmp: on a cluster that is small and node-local, and an 8B model's export is 16 GB."""
    p = Path(path)
    if (p / "config.json").is_file() or (p / "adapter_config.json").is_file() or not is_checkpoint_dir(p):
        yield p
        return
    from cpt.resume import run_dir_of

    run = run_dir_of(p) or p.parent
    try:
        work = tempfile.mkdtemp(prefix=prefix, dir=run)
    except OSError as e:
        raise ConsolidateError(f"cannot export {p} for reading into its run directory {run}: {e.strerror or e}") from None
    try:
        # (fp32 whatever checkpoint.export_dtype says: what is read here is the checkpoint's weights exactly)
        yield export_checkpoint(p, Path(work) / "export", echo=lambda *a, **k: None, dtype="fp32")
    finally:
        shutil.rmtree(work, ignore_errors=True)
