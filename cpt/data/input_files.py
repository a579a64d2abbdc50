"""Which files an input list names: folders walked recursively (symlinked folders too, each once, sorted by path),
glob patterns expanded, dot-files, ``__pycache__`` and folders `cpt prepare` wrote left out, a `datasets`
``save_to_disk`` folder read as its arrow files, a file named twice (or reached by two links) kept once, with a
warning; local paths and fsspec URLs. What each file holds is read by :mod:`cpt.data.readers`."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from typing import Any, Iterable

from cpt.data.shards import FORMAT_NAME, MANIFEST, ShardError, filesystem, is_remote

logger = logging.getLogger("cpt.data")


class ReadError(ValueError):
    """An input that cannot be read at all (printed as one line, without a traceback)."""


def _hidden(name: str) -> bool:
    """Dot-files and caches are skipped when walking folders (not `_private.py` or `__init__.py`)."""
    return name.startswith(".") or name == "__pycache__"


def _matches(path: str, pattern: str | None) -> bool:
    """--glob matches the file name (`*.py`) or, with a `/` or `**`, the path (`**/*.py`, `src/*.py`)."""
    if not pattern:
        return True
    if "/" in pattern:
        return fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, "*/" + pattern.removeprefix("**/"))
    return fnmatch.fnmatch(path.rsplit("/", 1)[-1], pattern)


def resolve_files(inputs: Iterable[str], glob: str | None = None, warn: bool = True, out: str | None = None) -> list[str]:
    """Expand folders (recursively, sorted) and glob patterns (`src/**/*.h`) into files, each once (``warn``: log the
    repeats and the prepared folders left out, but for ``out``, the caller's own output); error for anything that does
    not exist."""
    import glob as globlib

    files: list[str] = []
    for item in inputs:
        item = str(item)
        if not is_remote(item) and any(c in item for c in "*?[") and not os.path.exists(item):
            matched = sorted(p for p in globlib.glob(item, recursive=True) if os.path.isfile(p) and _matches(p, glob))
            files += _outside_prepared(item, matched, prepared_folder, os.path.dirname, warn)
        elif is_remote(item):
            files += _remote_files(item, glob, warn)
        elif os.path.isdir(item) and (saved := saved_dataset_files(item)) is not None:
            files += [f for f in saved if _matches(f, glob)]
        elif os.path.isdir(item) and prepared_folder(item):
            raise ReadError(f"{item} holds token shards written by `cpt prepare` (manifest.json), not text: name the "
                            "raw files it was prepared from")
        elif os.path.isdir(item):
            found, again = [], []
            seen = {os.path.realpath(item): item}
            for dirpath, dirnames, filenames in os.walk(item, followlinks=True):  # symlinked folders are read too
                dirnames[:] = sorted(d for d in dirnames
                                     if not _hidden(d) and _first_visit(os.path.join(dirpath, d), seen, again))
                shards = [d for d in dirnames if prepared_folder(os.path.join(dirpath, d))]
                others = [os.path.join(dirpath, d) for d in shards  # `cpt prepare data/ --out data/tokens` beside
                          if not out or os.path.realpath(os.path.join(dirpath, d)) != os.path.realpath(out)]  # data/prepared/*
                if others and warn:  # (their shards, read as text, were skipped or garbage documents)
                    logger.warning("not reading %s: token shards written by `cpt prepare`, not text", ", ".join(others))
                dirnames[:] = [d for d in dirnames if d not in shards]
                found += [os.path.join(dirpath, f) for f in filenames if not _hidden(f) and _matches(os.path.join(dirpath, f), glob)]
            files += sorted(found)
            if again and warn:
                logger.warning("%d folder(s) reached a second time through symbolic links are read once: %s",
                               len(again), ", ".join(sorted(again)[:5]) + (" ..." if len(again) > 5 else ""))
        elif os.path.isfile(item):
            files.append(item)
        elif os.path.islink(item):
            raise ReadError(f"input not found: {item} is a broken symbolic link (to {os.readlink(item)})")
        else:
            raise ReadError(f"input not found: {item} (to load a `datasets.load_dataset` spec, pass --hf)")
    if not files:
        raise ReadError(f"no input files found in {list(inputs)}" + (f" matching {glob!r}" if glob else ""))
    return _read_once(files, warn)


def _remote_files(item: str, glob: str | None, warn: bool) -> list[str]:
    """The files an fsspec URL names, as for a local path: a pattern expanded (it was "input not found"), a folder
    walked without the folders `cpt prepare` wrote (their manifest and shards were read as text: garbage documents
    trained on), a prepared folder named itself refused."""
    try:
        fs, root = filesystem(item)
    except ShardError as e:  # s3:// or gs:// without its extra: one line naming it
        raise ReadError(str(e)) from None
    protocol = item.split("://", 1)[0]

    def url(p: str) -> str:
        return p if "://" in p else f"{protocol}://{p}"

    if any(c in root for c in "*?[") and not fs.exists(root):
        matched = sorted(p for p in fs.glob(root) if fs.isfile(p) and _matches(p, glob))
        kept = _outside_prepared(item, matched, lambda d: _remote_prepared(fs, d), lambda p: p.rsplit("/", 1)[0]
                                 if "/" in p.strip("/") else "", warn)
        return [url(p) for p in kept]
    if not fs.exists(root):
        raise ReadError(_missing(fs, root, item))
    if not fs.isdir(root):
        return [item]
    if _remote_prepared(fs, root):
        raise ReadError(f"{item} holds token shards written by `cpt prepare` (manifest.json), not text: name the raw "
                        "files it was prepared from")
    found = sorted(p for p in fs.find(root) if not _hidden(p.rsplit("/", 1)[-1]))
    shards = sorted({p.rsplit("/", 1)[0] for p in found if p.rsplit("/", 1)[-1] == MANIFEST
                     and _remote_prepared(fs, p.rsplit("/", 1)[0])})
    if shards and warn:
        logger.warning("not reading %s: token shards written by `cpt prepare`, not text", ", ".join(map(url, shards)))
    found = [p for p in found if not any(p.startswith(d + "/") for d in shards)]
    return [url(p) for p in found if _matches(p, glob)]


def _outside_prepared(pattern: str, matched: list[str], is_prepared, parent, warn: bool) -> list[str]:
    """The files a pattern matched, but those inside a folder `cpt prepare` wrote (``data/**``: their manifest was read
    as jsonl, their shards as text documents), left out with the folder walk's warning."""
    known: dict[str, bool] = {}

    def prepared_above(path: str) -> str | None:
        folder = parent(path)
        while folder and folder not in ("/", "."):
            if folder not in known:
                known[folder] = is_prepared(folder)
            if known[folder]:
                return folder
            up = parent(folder)
            if up == folder:
                break
            folder = up
        return None

    kept, left = [], set()
    for p in matched:
        (left.add(d) if (d := prepared_above(p)) is not None else kept.append(p))
    if left and warn:
        logger.warning("not reading %s: token shards written by `cpt prepare`, not text", ", ".join(sorted(left)))
    if not kept:
        raise ReadError(f"input pattern matched no files: {pattern}" + (" outside folders `cpt prepare` wrote" if left else ""))
    return kept


def _remote_prepared(fs: Any, folder: str) -> bool:
    """:func:`prepared_folder` on an fsspec filesystem."""
    try:
        return json.loads(fs.cat_file(f"{folder.rstrip('/')}/{MANIFEST}")).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def _missing(fs: Any, root: str, url: str) -> str:
    """Why a remote input does not exist: fsspec's http ``exists`` is also False for a server it cannot reach."""
    try:
        fs.info(root)
    except Exception as e:  # noqa: BLE001 - http: FileNotFoundError from the client's error (a 404 or no connection)
        cause = e.__cause__
        if cause is not None and getattr(cause, "status", None) not in (404, 410) and not isinstance(cause, FileNotFoundError):
            return f"cannot reach {url}: {type(cause).__name__}: {cause}"
    return f"input not found: {url}"


def saved_dataset_files(folder: str) -> list[str] | None:
    """The arrow files of a folder written by `datasets`' ``Dataset.save_to_disk``, in order (None: not such a folder).
    Walked like any folder, its ``state.json`` and ``dataset_info.json`` were read as jsonl (skipped as malformed) and
    its arrow files as plain text (skipped as non-UTF-8): 'no valid documents'. A ``DatasetDict``'s folder holds one
    such folder per split: which one to read is the user's choice (the others are often test splits)."""
    if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
        try:
            with open(os.path.join(folder, "dataset_dict.json"), encoding="utf-8") as f:
                splits = json.load(f).get("splits")
        except (OSError, ValueError, AttributeError):
            splits = None
        raise ReadError(f"{folder} is a `datasets` DatasetDict saved with save_to_disk (splits {splits}): give one "
                        f"split's folder (e.g. {os.path.join(folder, 'train')}), or --hf --split NAME")
    state = os.path.join(folder, "state.json")
    if not os.path.isfile(state) or not os.path.isfile(os.path.join(folder, "dataset_info.json")):
        return None
    try:
        with open(state, encoding="utf-8") as f:
            names = [entry["filename"] for entry in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ReadError(f"{folder}: a `datasets` save_to_disk folder with an unreadable state.json ({e})") from None
    return [os.path.join(folder, name) for name in names]


def prepared_folder(folder: str) -> bool:
    """A folder `cpt prepare` wrote: its manifest.json names the token-shard format."""
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def _first_visit(folder: str, seen: dict[str, str], again: list[str]) -> bool:
    """False for a folder already walked (a symlink back up the tree, or two links to one folder), then named in
    ``again`` with the path it was read by; ``seen``: real path -> the path walked."""
    real = os.path.realpath(folder)
    if real in seen:
        again.append(f"{folder} (= {seen[real]})")
        return False
    seen[real] = folder
    return True


def _read_once(files: list[str], warn: bool) -> list[str]:
    """Each file once (local ones by their real path: a file given twice, or linked into a folder also given, is
    read once, with a warning); a broken symbolic link is a :class:`ReadError`."""
    out, seen, repeats = [], set(), []
    for path in files:
        if is_remote(path):
            key = path
        elif not os.path.exists(path):
            raise ReadError(f"input not found: {path} is a broken symbolic link (to {os.readlink(path)})"
                            if os.path.islink(path) else f"input not found: {path}")
        else:
            key = os.path.realpath(path)
        if key in seen:
            repeats.append(path)
            continue
        seen.add(key)
        out.append(path)
    if repeats and warn:
        logger.warning("%d input file(s) named more than once are read once: %s", len(repeats),
                       ", ".join(repeats[:5]) + (" ..." if len(repeats) > 5 else ""))
    return out
