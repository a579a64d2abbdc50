"""The checkpoints folder of a run directory: what counts as a checkpoint (a committed ``step_N`` folder), its
CHECKSUMS.json (written last: the "complete" mark) and its verification, the newest valid one, a checkpoint's saved
step, and removing what interrupted saves leave. Writing and loading checkpoints: cpt/checkpoint.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from cpt.fileio import file_digest
from cpt.state import StateError, check_format

log = logging.getLogger("cpt.checkpoint")

CHECKSUMS = "CHECKSUMS.json"
TRAINER_STATE = "trainer_state.json"
STATE_TENSORS = "state.safetensors"
TRAINABLE = "trainable.json"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
UNUSABLE_PREFIX = "unusable-"
HASH_THREADS = 8  # files read and hashed at a time when a checkpoint is verified


class CheckpointError(RuntimeError):
    pass


def write_checksums(ckpt: Path, digests: dict[str, str] | None = None) -> None:
    """CHECKSUMS.json: every file's size, and its digest where it was hashed while written (``digests``).

    ``digests`` holds every file the save wrote: cpt's own hashed as written, the backends' hashed by the rank that
    wrote them (cpt/sharded_save.py, cpt/zero_save.py, cpt/checkpoint_files.py's ``backend_file_digests``); a file
    it lacks is recorded by its size alone.
    """
    digests = digests or {}
    files = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != CHECKSUMS:
            rel = str(p.relative_to(ckpt))
            files[rel] = {"size": p.stat().st_size, "digest": digests.get(rel)}
    tmp = ckpt / (CHECKSUMS + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt / CHECKSUMS)


def verify_checkpoint(ckpt: Path, part: tuple[int, int] = (0, 1), every_problem: bool = False) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not (the first broken file in
    CHECKSUMS.json's order; ``every_problem``: every broken file, ``; ``-separated, as `cpt verify` lists them). Every
    file's size first, then the digests: the whole checkpoint read once, up to
    :data:`HASH_THREADS` files at a time (a sharded checkpoint is many files, on storage that serves parallel reads
    faster; reading releases the GIL). ``part=(i, n)``: only reader ``i`` of ``n``'s share of the files
    (:func:`reader_share`; the ranks of a run share the reading: cpt/resume.py's ``SharedCheck``)."""
    from concurrent.futures import ThreadPoolExecutor

    manifest = ckpt / CHECKSUMS
    if not manifest.is_file():
        return f"{CHECKSUMS} missing (incomplete save)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{CHECKSUMS} unreadable: {e}"
    problem = _listing_problem(files)
    if problem:  # (an edited or damaged listing: a KeyError traceback on every --resume, which never fell back)
        return f"{CHECKSUMS} unreadable: {problem}"
    mine, problems = reader_share(files, *part), []
    for rel in mine:
        p, meta = ckpt / rel, files[rel]
        if not p.is_file():
            problems.append(f"{rel} missing")
        elif p.stat().st_size != meta["size"]:
            got = p.stat().st_size
            problems.append(f"{rel} has {got} bytes, expected {meta['size']} "
                            f"({'truncated?' if got < meta['size'] else 'written to after the save?'})")
        if problems and not every_problem:
            return problems[0]
    broken = {x.split(" ", 1)[0] for x in problems}
    hashed = [rel for rel in mine if files[rel].get("digest") and rel not in broken]
    pool = ThreadPoolExecutor(max_workers=max(1, min(HASH_THREADS, len(hashed))))
    try:
        for rel, digest in zip(hashed, pool.map(lambda rel: file_digest(ckpt / rel), hashed)):
            if digest != files[rel]["digest"]:
                problems.append(f"{rel} checksum mismatch (corrupt)")
                if not every_problem:
                    break
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # (a broken file: the files not yet read are not)
    return "; ".join(problems) if problems else None


def _listing_problem(files) -> str | None:
    """What makes CHECKSUMS.json's ``files`` unusable: not a mapping of file -> {size, digest}, or empty (a save lists
    every file it wrote: an empty listing verified as 0 files)."""
    if not isinstance(files, dict) or not files:
        return "'files' is not a mapping of the checkpoint's files" if not isinstance(files, dict) else "it lists no file"
    for rel, meta in files.items():
        if (not isinstance(meta, dict) or type(meta.get("size")) is not int
                or not isinstance(meta.get("digest"), (str, type(None)))):
            return f"the entry of {rel!r} is not {{size: int, digest: str}}: {meta!r}"[:300]
    return None


def checkpoint_size(ckpt: Path) -> tuple[int, int]:
    """(files, bytes) of a verified checkpoint, from its CHECKSUMS.json."""
    files = json.loads((ckpt / CHECKSUMS).read_text())["files"]
    return len(files), sum(int(meta["size"]) for meta in files.values())


def reader_share(files: dict[str, dict], reader: int, readers: int) -> list[str]:
    """The files (CHECKSUMS.json's entries) reader ``reader`` of ``readers`` checks, in CHECKSUMS.json's order: the
    largest first, each to the reader with the fewest bytes so far (the lowest-numbered on a tie), so that every
    reader reads about as much whatever the files' sizes; the same split on every reader. All of them for one."""
    if readers == 1:
        return list(files)
    load, owner = [0] * readers, {}
    for rel in sorted(files, key=lambda rel: (-int(files[rel]["size"]), rel)):
        least = min(range(readers), key=lambda r: (load[r], r))
        owner[rel] = least
        load[least] += int(files[rel]["size"])
    return [rel for rel in files if owner[rel] == reader]


class LocalCheck:
    """How :func:`latest_valid_checkpoint` and :func:`resolve_checkpoint` find and check checkpoints in one process:
    list the folder, verify every file here, warn about a broken checkpoint. In a multi-process run every rank makes
    the same calls with cpt/resume.py's ``SharedCheck``, which lists on the main process and shares the reading."""

    warns = True

    def listing(self, run_dir: str | os.PathLike) -> list[Path]:
        return list_checkpoints(run_dir)

    def verify(self, ckpt: Path) -> str | None:
        return verify_checkpoint(ckpt)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_valid_checkpoint(run_dir: str | os.PathLike, unusable: list[Path] | None = None,
                            check: LocalCheck = LocalCheck()) -> Path | None:
    """The newest checkpoint that verifies; each broken one newer than it is reported once (a warning) and,
    when ``unusable`` is given, appended to it."""
    for ckpt in reversed(check.listing(run_dir)):
        problem = check.verify(ckpt)
        if problem is None:
            return ckpt
        if check.warns:
            log.warning(f"checkpoint {ckpt} is not usable ({problem}); trying the previous one")
        if unusable is not None:
            unusable.append(ckpt)
    return None


def interrupted_replaces(root: Path) -> list[Path]:
    """The checkpoints a save of their own step was replacing when it was killed between its two renames
    (``step_N`` -> ``.trash-step_N``, then ``.tmp-step_N`` -> ``step_N``): the earlier copy, committed and whole, lies
    as ``.trash-step_N`` beside the new one's ``.tmp-step_N``, and no ``step_N`` is listed (a ``--resume`` went back to
    an older checkpoint, or, with ``keep: 1``, started from scratch, and the next save deleted both). A prune's
    ``.trash-`` (possibly half deleted) has no ``.tmp-`` of its step beside it."""
    if not root.is_dir():
        return []
    return sorted(t for t in root.glob(TRASH_PREFIX + PREFIX + "*")
                  if not (root / t.name[len(TRASH_PREFIX):]).exists()
                  and (root / (TMP_PREFIX + t.name[len(TRASH_PREFIX):])).is_dir())


def restore_interrupted_replaces(root: Path) -> list[Path]:
    """Put each of :func:`interrupted_replaces` back as ``step_N`` (main process, before the checkpoints are listed);
    returns the checkpoints restored."""
    restored = []
    for trash in interrupted_replaces(root):
        final = root / trash.name[len(TRASH_PREFIX):]
        os.replace(trash, final)
        restored.append(final)
    return restored


def remove_partial_saves(root: Path) -> list[Path]:
    """Remove what interrupted saves and prunes leave behind (``.tmp-*``, ``.trash-*``), after putting back a
    checkpoint an interrupted same-step save was replacing (:func:`restore_interrupted_replaces`); returns the
    checkpoints put back."""
    restored = restore_interrupted_replaces(root)
    for stale in [*root.glob(TMP_PREFIX + "*"), *root.glob(TRASH_PREFIX + "*")]:
        shutil.rmtree(stale, ignore_errors=True)
    return restored


def discard(ckpt: Path) -> None:
    """Remove a checkpoint: renamed out of the listing first (atomic), then deleted."""
    trash = ckpt.with_name(TRASH_PREFIX + ckpt.name)
    os.replace(ckpt, trash)
    shutil.rmtree(trash, ignore_errors=True)


def resolve_checkpoint(path: str | os.PathLike, check: LocalCheck = LocalCheck()) -> Path:
    """A checkpoint directory, or a run directory (its latest valid checkpoint)."""
    p = Path(path)
    if (p / TRAINER_STATE).is_file():
        problem = check.verify(p)
        if problem:
            raise CheckpointError(f"checkpoint {p} is not usable: {problem}")
        return p
    ckpt = latest_valid_checkpoint(p, check=check)
    if ckpt is None:
        raise CheckpointError(f"no valid checkpoint found in {p}")
    return ckpt


def saved_train_state(ckpt: Path) -> dict:
    """A checkpoint's ``train`` state (:class:`cpt.state.TrainState`: step, tokens, anneal_from)."""
    doc = json.loads((ckpt / TRAINER_STATE).read_text())
    try:
        check_format(doc)
    except StateError as e:
        raise CheckpointError(f"checkpoint {ckpt}: {e}") from None
    return doc["train"]


def saved_step(ckpt: Path) -> int:
    """The optimizer step a checkpoint was written at (its ``train`` state)."""
    return int(saved_train_state(ckpt)["step"])
