"""A LoRA run started from a full model's cpt checkpoint (``train.init_from``: a full CPT run's checkpoint or run
directory, any backend's layout and number of processes; also a ``model.freeze`` run's): the two-stage CPT workflow, full continual pre-training and
then an adapter on its result.

A LoRA run's checkpoints leave its frozen base out (cpt/adapter_checkpoint.py), so whoever reads them (``--resume``,
``cpt export`` / ``eval`` / ``interpolate`` / ``average``, a later stage) must be able to build that base again, also
after the earlier run pruned the checkpoint (``checkpoint.keep``) or was moved or deleted. The base is therefore written
once, when the run starts, as an HF model into the run's own directory, ``RUN/base/`` (the checkpoint exported by
:func:`cpt.checkpoint_export.export_checkpoint` in fp32: its weights exactly, the documented manual path ``cpt export CKPT
--out DIR`` + ``train.init_from: DIR``), with ``cpt_base.json`` naming the checkpoint it came from. The run then starts
exactly as from that export: from step 0, a fresh optimizer, LoRA on top. Its checkpoints' ``adapter_base.json`` records
that base (``base_from``), and :func:`cpt.resume.base_model_dir` finds ``RUN/base`` next to the checkpoints wherever the
run directory now lies. Disk cost: one copy of the base's weights in fp32 (4 bytes a parameter: 32 GB for an 8B model).

The main process writes it (the other processes wait, within ``train.distributed_timeout_s``); a restart before the
first checkpoint reuses it when it is still the same checkpoint's; a ``--resume`` whose ``base/`` was deleted writes it
again from the checkpoint if that still exists (the fingerprint check then compares it). A ``model.freeze`` run from a
full model's checkpoint needs none of this: its checkpoints hold the whole model (cpt/adapter_checkpoint.py).

A full or ``model.freeze`` run with ``model.vocab`` from a checkpoint whose run did not extend the vocabulary so (a stage
adding tokens) takes the same path: the vocabulary is extended on the checkpoint's model (the new rows from its
embeddings), which ``RUN/base`` holds; loading the checkpoint over a model built and extended from the first base did
not fit (other embedding rows), and would have initialised the new rows from the first base's embeddings.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from cpt.adapter_checkpoint import STAGE_BASE_DIR, STAGE_BASE_SOURCE, is_adapter_layout, read_base_record
from cpt.checkpoint import CHECKSUMS, CheckpointError, saved_step
from cpt.config import RunConfig, load_config
from cpt.distributed import from_main_process
from cpt.fileio import fsync_dir
from cpt.resume import Start, resolve_start


def start_for_run(cfg: RunConfig, resume: bool, allow_config_change: bool, acc, say=print) -> Start:
    """Where the run starts (:func:`cpt.resume.resolve_start`), then :func:`full_checkpoint_as_base` (collective)."""
    return full_checkpoint_as_base(cfg, resolve_start(cfg, resume, allow_config_change, acc, say), acc, say)


def full_checkpoint_as_base(cfg: RunConfig, start: Start, acc, say=print) -> Start:
    """``start`` (:func:`cpt.resume.resolve_start`'s) with a full model's checkpoint under a LoRA run turned into the HF
    base ``RUN/base`` that the run builds (written here when needed; collective: every rank calls it)."""
    if (cfg.model.lora is None and cfg.model.vocab is None) or cfg.train.init_from is None:
        return start
    run_dir = Path(cfg.run.output_dir)
    if start.resume is None:
        if start.init is None or _holds_an_adapter(start.init):  # an HF model, or a LoRA checkpoint over its own base
            return start
        if cfg.model.lora is None and _same_vocab(cfg, start.init):  # (its weights fit the model built: loaded over it)
            return start
        _refuse_what_a_base_cannot_carry(cfg, start)
        start.init_hf, start.init = write_base(start.init, run_dir, acc, say), None
    elif cfg.model.lora is not None and start.init_hf != str((run_dir / STAGE_BASE_DIR).absolute()) and \
            not _written_from(start.init_hf, start.resume):
        # base/ not there (base_model_dir looked), nor is the base the run builds that checkpoint's (a later LoRA stage
        # from a LoRA stage's checkpoint builds that stage's base/: it has none of its own)
        source = _source_of(start.resume)  # (still that checkpoint: else the fingerprint check refuses, saying why)
        if source is not None and _unchanged(source, start.resume) and not _holds_an_adapter(source):
            say(f"{run_dir / STAGE_BASE_DIR} (this LoRA run's base) is missing: writing it again from {source}")
            start.init_hf = write_base(source, run_dir, acc, say)
    return start


def _same_vocab(cfg: RunConfig, ckpt: Path) -> bool:
    """Whether the checkpoint's run extended the vocabulary as ``cfg`` does (its weights then have the new rows)."""
    try:
        return load_config(ckpt / "config.yaml").model.vocab == cfg.model.vocab
    except (OSError, ValueError):
        return False


def _refuse_what_a_base_cannot_carry(cfg: RunConfig, start: Start) -> None:
    """An anneal branch continues its trunk's whole state, and an optimizer state loads only for the parameters it was
    saved with: neither crosses from a full model to a LoRA adapter, nor to a model with new vocabulary rows."""
    what = "model.lora" if cfg.model.lora is not None else "model.vocab (rows its run did not have)"
    if start.branch:
        raise CheckpointError(
            f"--anneal (train.anneal_steps) with {what}: {start.init} is a full model's checkpoint, and an anneal "
            "branch continues its trunk's whole state (optimizer included); train on it as a new stage "
            "instead (train.init_from without --anneal: it starts from step 0 with a fresh optimizer)")
    if cfg.train.init_optimizer:
        raise CheckpointError(
            f"train.init_optimizer with {what}: {start.init} is a full model's checkpoint, whose optimizer state is "
            "for its own parameters; this run from it starts with a fresh optimizer: set train.init_optimizer: false")


def _holds_an_adapter(ckpt: Path) -> bool:
    """Whether ``ckpt`` is a LoRA run's (its base is built as that run built it); a full run's and a ``model.freeze``
    run's checkpoints hold a whole model (the latter without its frozen base, which its export builds)."""
    return is_adapter_layout(ckpt) and read_base_record(ckpt)["kind"] == "lora"


def _unchanged(source: Path, ckpt: Path) -> bool:
    """Whether the checkpoint ``source`` is still the one ``ckpt``'s base was written from (its CHECKSUMS.json)."""
    try:
        return source_record(source)["checksums_sha256"] == read_base_record(ckpt)["base_from"]["checksums_sha256"]
    except (OSError, ValueError, KeyError, TypeError, CheckpointError):
        return False


def _written_from(base: str | None, ckpt: Path) -> bool:
    """Whether the HF model directory ``base`` is a base written from the checkpoint ``ckpt``'s base was written from."""
    try:
        return base is not None and json.loads((Path(base) / STAGE_BASE_SOURCE).read_text()) == \
            read_base_record(ckpt)["base_from"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _source_of(ckpt: Path) -> Path | None:
    """The checkpoint a LoRA checkpoint's base was written from (its adapter_base.json), or None."""
    try:
        return Path(read_base_record(ckpt)["base_from"]["checkpoint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def source_record(ckpt: Path) -> dict:
    """What ``cpt_base.json`` says of the checkpoint a base was written from: its path, step and a digest of its
    CHECKSUMS.json (which names every file's digest: another checkpoint at the same path differs)."""
    digest = hashlib.sha256((ckpt / CHECKSUMS).read_bytes()).hexdigest()
    return {"checkpoint": str(ckpt.absolute()), "step": saved_step(ckpt), "checksums_sha256": digest}


def write_base(ckpt: Path, run_dir: Path, acc, say=print) -> str:
    """``RUN/base``, the full model of ``ckpt`` as an HF model in fp32, written by the main process unless it already
    holds that checkpoint's (a restart); every process returns its path. A failure is one CheckpointError on all."""
    target = (run_dir / STAGE_BASE_DIR).absolute()
    error = None
    if acc.is_main_process:
        try:
            _write(ckpt, target, say)
        except Exception as e:  # every rank must hear of it: the others wait below
            if acc.num_processes == 1:
                raise CheckpointError(f"train.init_from {ckpt}: writing its model as this run's base "
                                      f"({target}) failed: {e}") from e
            error = f"{type(e).__name__}: {e}"
    error = from_main_process(acc, error)
    if error is not None:
        raise CheckpointError(f"train.init_from {ckpt}: writing its model as this run's base ({target}) failed "
                              f"on the main process: {error}")
    return str(target)


def _write(ckpt: Path, target: Path, say) -> None:
    from cpt.checkpoint_export import export_checkpoint

    record = source_record(ckpt)
    marker = target / STAGE_BASE_SOURCE
    if marker.is_file() and (target / "config.json").is_file():
        try:
            same = json.loads(marker.read_text()) == record
        except ValueError:
            same = False
        if same:
            say(f"train.init_from {ckpt}: this LoRA run's base, {target}, was written from it before: reused")
            return
    tmp = target.with_name(".tmp-" + target.name)
    shutil.rmtree(tmp, ignore_errors=True)
    export_checkpoint(ckpt, tmp, echo=lambda *a, **k: None, dtype="fp32")  # its weights exactly, whatever export_dtype
    (tmp / STAGE_BASE_SOURCE).write_text(json.dumps(record, indent=1))
    if target.exists():  # an earlier start's base of another checkpoint (no checkpoint of this run refers to it)
        shutil.rmtree(target)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    size = sum(p.stat().st_size for p in target.rglob("*.safetensors"))
    say(f"train.init_from {ckpt} holds a full model and this run trains a LoRA adapter or adds vocabulary rows: its "
        f"model is this run's base, written once to {target} (HF format, fp32, {size / 2**20:,.1f} MiB); this run's "
        "checkpoints, `cpt export` and `cpt eval` rebuild the base from there, whatever becomes of the earlier run")

