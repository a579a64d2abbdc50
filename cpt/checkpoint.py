"""Resume checkpoints: written atomically, verified on load, the last K kept.

Layout of a run directory::

    <run_dir>/checkpoints/step_00000100/   accelerate state (model, optimizer, every rank's RNG),
                                           trainer_state.json (step, tokens, data/mixer and evaluator state),
                                           config.yaml, CHECKSUMS.json (written last: the "complete" mark)
    <run_dir>/checkpoints/.tmp-step_...    a save in progress; never read, removed on the next save

A save goes to a temporary directory that is renamed into place only once every rank has
finished and the checksums are written, so a kill at any moment leaves the previous checkpoint
intact. On resume the newest checkpoint whose files match CHECKSUMS.json is used; a truncated or
corrupt one is skipped with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("cpt.checkpoint")

CHECKSUMS = "CHECKSUMS.json"
TRAINER_STATE = "trainer_state.json"
PREFIX = "step_"


class CheckpointError(RuntimeError):
    pass


def _file_digest(path: Path) -> str:
    try:
        import xxhash

        h = xxhash.xxh64()
    except ImportError:  # pragma: no cover - xxhash comes with datasets
        import hashlib

        h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_checksums(ckpt: Path) -> None:
    files = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != CHECKSUMS:
            files[str(p.relative_to(ckpt))] = {"size": p.stat().st_size, "digest": _file_digest(p)}
    tmp = ckpt / (CHECKSUMS + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt / CHECKSUMS)


def verify_checkpoint(ckpt: Path) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not."""
    manifest = ckpt / CHECKSUMS
    if not manifest.is_file():
        return f"{CHECKSUMS} missing (incomplete save)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"{CHECKSUMS} unreadable: {e}"
    for rel, meta in files.items():
        p = ckpt / rel
        if not p.is_file():
            return f"{rel} missing"
        if p.stat().st_size != meta["size"]:
            return f"{rel} has {p.stat().st_size} bytes, expected {meta['size']} (truncated?)"
        if _file_digest(p) != meta["digest"]:
            return f"{rel} checksum mismatch (corrupt)"
    return None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_valid_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint that verifies; broken ones are reported and skipped."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        msg = f"checkpoint {ckpt} is not usable ({problem}); trying the previous one"
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run directory (its latest valid checkpoint)."""
    p = Path(path)
    if (p / TRAINER_STATE).is_file():
        problem = verify_checkpoint(p)
        if problem:
            raise CheckpointError(f"checkpoint {p} is not usable: {problem}")
        return p
    ckpt = latest_valid_checkpoint(p)
    if ckpt is None:
        raise CheckpointError(f"no valid checkpoint found in {p}")
    return ckpt


class CheckpointManager:
    """Saves and loads full resume state through accelerate (DDP, FSDP and DeepSpeed all supported)."""

    def __init__(self, run_dir: str | os.PathLike, keep: int, accelerator):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.acc = accelerator

    def save(self, step: int, trainer_state: dict[str, Any], config_yaml: str, extra_tensors: dict[str, torch.Tensor] | None = None) -> Path | None:
        """Save on every rank (collective). Returns the checkpoint path, or None if saving failed.

        A failure (disk full, permissions) on any rank is reported, the partial save removed, and
        the previous checkpoints are left as they were.
        """
        acc = self.acc
        final = self.root / f"{PREFIX}{step:08d}"
        tmp = self.root / f".tmp-{PREFIX}{step:08d}"
        error = None
        try:
            if acc.is_main_process:
                self.root.mkdir(parents=True, exist_ok=True)
                for stale in self.root.glob(".tmp-*"):
                    shutil.rmtree(stale, ignore_errors=True)
        except OSError as e:
            error = e
        acc.wait_for_everyone()
        if error is None:
            try:
                acc.save_state(str(tmp), safe_serialization=True)
                if acc.is_main_process:
                    (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1, default=_json_default))
                    (tmp / "config.yaml").write_text(config_yaml)
                    if extra_tensors:
                        from safetensors.torch import save_file

                        save_file({k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()}, str(tmp / "extra.safetensors"))
            except Exception as e:  # noqa: BLE001 - any failure must leave the old checkpoints intact
                error = e
        if not _all_ok(acc, error is None):
            error = error or CheckpointError("another rank failed while saving")
        if error is None and acc.is_main_process:
            try:
                write_checksums(tmp)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _fsync_dir(self.root)
                self._prune()
            except Exception as e:  # noqa: BLE001
                error = e
        if not _all_ok(acc, error is None):
            error = error or CheckpointError("saving failed on the main process")
        if error is not None:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                msg = f"checkpoint at step {step} FAILED ({type(error).__name__}: {error}); previous checkpoints are intact"
                log.error(msg)
                warnings.warn(msg, stacklevel=2)
            return None
        acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        ckpts = list_checkpoints(self.root.parent)
        for old in ckpts[: max(0, len(ckpts) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, ckpt: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Restore model, optimizer and RNG states in place; return (trainer_state, extra tensors).

        A checkpoint of another backend or ZeRO world size goes through cpt.consolidate (weights and Adam state
        carried over, RNG states not)."""
        from cpt.consolidate import load_portable, needs_portable_load

        if needs_portable_load(ckpt, self.acc):
            log.warning("%s was written with another backend or number of processes: loading it through "
                        "cpt.consolidate (weights and optimizer state; RNG states are not carried over)", ckpt)
            load_portable(self.acc, self.acc._models[0], self.acc._optimizers[0], ckpt)
        else:
            self.acc.load_state(str(ckpt))
        # accelerate restores its micro-step counter, which places the gradient-accumulation boundaries; a checkpoint
        # is always at an optimizer-step boundary, and another world size accumulates another number of micro-steps
        self.acc.step = 0
        state = json.loads((ckpt / TRAINER_STATE).read_text())
        extra = {}
        if (ckpt / "extra.safetensors").is_file():
            from safetensors.torch import load_file

            extra = load_file(str(ckpt / "extra.safetensors"))
        return state, extra


def _all_ok(acc, ok: bool) -> bool:
    """True on every rank only if `ok` is true on every rank."""
    if acc.num_processes == 1:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=acc.device)
    return float(acc.reduce(flag, reduction="sum").item()) == 0.0


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable in trainer state: {type(obj)}")
