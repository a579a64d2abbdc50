"""The idempotency key of a `cpt prepare` job (the manifest's ``prepare_key``): a re-run with the same key finds the
output up to date and does nothing. Local inputs count by path, size and modification time; remote ones by size and
the version their store reports; with --hf, the local files behind a spec, and a hub dataset by its name and the
commit `datasets` resolves it to (:func:`hub_revision`)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from cpt.data.shards import filesystem, is_remote

# what a store says about an object's version (s3: ETag/VersionId, gcs: generation/etag, hf://: blob_id, http: ETag or
# Last-Modified, file:// and others: mtime/created), for the idempotency key of remote inputs
VERSION_KEYS = ("ETag", "etag", "VersionId", "generation", "blob_id", "md5Hash", "LastModified", "Last-Modified",
                "last_modified", "updated", "mtime", "created")


def remote_identity(path: str) -> list[Any]:
    """A remote input by name, size and the version fields its store gives (by name alone, a changed object was
    'up to date': the old shards kept, silently)."""
    fs, root = filesystem(path)
    try:
        info = fs.info(root)
    except Exception:  # noqa: BLE001 - a store that cannot say: the name alone, as before
        return [path]
    return [path, info.get("size")] + [f"{k}={info[k]}" for k in VERSION_KEYS if info.get(k) is not None]


def input_identity(files: list[str]) -> list[Any]:
    """What the inputs are, for the idempotency key: local files by size and mtime, remote ones by size and version."""
    out: list[Any] = []
    for path in files:
        if is_remote(path):
            out.append(remote_identity(path))
        else:
            st = os.stat(path)
            out.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
    return out


def is_hub_dataset(path: str) -> bool:
    """Whether a `datasets` path names a hub dataset: ``hf://datasets/...``, or (as `datasets` decides) a relative
    path with at most one ``/`` that is no local file or folder and no builder (json, parquet, ...)."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    if path.startswith("hf://datasets/"):
        return True
    return (not is_remote(path) and not os.path.isabs(path) and path.count("/") <= 1 and not os.path.exists(path)
            and path not in _PACKAGED_DATASETS_MODULES)


def hub_revision(path: str, name: str | None = None, data_files: Any = None, revision: str | None = None) -> str | None:
    """The commit of a hub dataset as `datasets` resolves it (``revision``: a branch, tag or commit; None: the latest):
    online the hub's, offline that of the newest copy in the local cache (``HF_DATASETS_CACHE``), the one
    ``load_dataset`` then reads. None for local data (a file, a folder, a builder such as json) or when it cannot be
    resolved (``load_dataset`` says why)."""
    import datasets

    if not is_hub_dataset(path):
        return None
    try:
        return datasets.load_dataset_builder(path, name=name, data_files=data_files, revision=revision).hash or None
    except Exception:  # noqa: BLE001 - unreachable, unknown: loading it fails next, with its own message
        return None


def hf_identity(specs: list[str], data_files: Any, dataset_name: str | None = None) -> list[Any]:
    """--hf inputs for the idempotency key: the specs, and the files behind the local ones (a folder, or data_files
    given to a builder such as json) as :func:`input_identity` describes them (by name alone, a changed local file
    was 'up to date'); a hub dataset by its name and resolved commit (:func:`hub_revision`)."""
    revisions = [f"revision={r}" for r in (hub_revision(s, dataset_name, data_files) for s in specs) if r]
    named = list(specs) + ([data_files] if isinstance(data_files, str) else list(data_files or []))
    files = []
    for p in map(str, named):
        if is_remote(p) or not os.path.exists(p):
            continue
        if os.path.isdir(p):
            files += sorted(os.path.join(d, f) for d, _, names in os.walk(p, followlinks=True) for f in names)
        else:
            files.append(p)
    return list(specs) + revisions + input_identity(files)


def prepare_key(inputs: list[str], files: list[str] | None, tok_hash: str, options: dict) -> str:
    """The job's identity: its inputs (``files``: what is read, or None with --hf), the tokenizer's vocabulary hash and
    the options that decide what the shards hold."""
    identity = hf_identity(inputs, options.get("data_files"), options.get("dataset_name")) if files is None else input_identity(files)
    blob = json.dumps({"inputs": identity, "tokenizer": tok_hash, "options": options}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]
