"""Range reads from remote storage (fsspec) that survive a transient failure.

A job streaming shards from S3/GCS/HTTP for days meets the odd network or storage hiccup: a connection reset, a
timeout, a 5xx/429, a response cut short. :func:`read_ranges` asks fsspec's ``cat_ranges`` for a batch of byte
ranges and retries the ranges that failed (only those), up to ``read_retries`` times with doubling waits from
``retry_wait_s`` (at most ``retry_max_wait_s`` a wait: about 3 minutes in all with the defaults), each retry one
warning line on the ``cpt.data`` logger and counted (the caller adds the count to its ``read_retries``: the
loader's ``data/read_retries/<source>`` metric). A range that still fails, and at once a missing file, a denied access
or a server that ignores Range (more bytes than asked), is one :class:`RangeReadError` line naming the file. A range
never comes back shorter or longer than asked: a short read is retried, never turned into tokens.

The retry settings are the run's ``data.remote`` (:class:`cpt.config.RemoteConfig`), which the loader hands to each
source it opens; :data:`DEFAULT` (the config's defaults) where none is given (`cpt verify`, `cpt prepare`).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any

from cpt.config.data import RemoteConfig
from cpt.data.manifest import ShardError

logger = logging.getLogger("cpt.data")

DEFAULT = RemoteConfig()  # (read at each call: tests replace it)


class RangeReadError(ValueError):
    """A range that could not be read (after the retries, or a failure that retrying cannot mend)."""

    def __init__(self, retries: int, message: str):
        super().__init__(message)
        self.retries = retries  # (the retries made before giving up)


def transient(e: BaseException) -> bool:
    """A read error worth retrying: a network or storage failure or a timeout (OSError, aiohttp/botocore client
    errors, an HTTP 5xx, 408 or 429), not a missing file or a denied access."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(e, OSError):  # (ConnectionError, TimeoutError, fsspec's FSTimeoutError, s3fs's translated errors)
        return True
    code = getattr(e, "code", None) or getattr(e, "status", None)
    if isinstance(code, int):
        return code in (408, 429) or code >= 500
    return any(c.__module__.split(".")[0] in ("aiohttp", "botocore", "urllib3", "requests") for c in type(e).__mro__)


def read_ranges(fs: Any, paths: list[str], begins: list[int], ends: list[int],
                policy: RemoteConfig | None = None) -> tuple[list[bytes], int]:
    """(the bytes ``[begins[k], ends[k])`` of ``paths[k]`` for each k, how many retries it took); retries per ``policy``
    (None: :data:`DEFAULT`)."""
    policy = policy or DEFAULT
    tries = policy.read_retries
    blobs: list[Any] = [b"" if e <= b else None for b, e in zip(begins, ends)]  # (empty ranges: no request)
    todo, retries = [k for k, blob in enumerate(blobs) if blob is None], 0
    for attempt in range(tries + 1):
        if not todo:
            return blobs, retries
        try:
            got = fs.cat_ranges([paths[k] for k in todo], [begins[k] for k in todo], [ends[k] for k in todo])
        except Exception as e:  # noqa: BLE001 - the whole request failed (e.g. a timeout of the batch)
            got = [e] * len(todo)
        failed = []
        for k, blob in zip(todo, got):
            want = ends[k] - begins[k]
            if isinstance(blob, BaseException):
                if not transient(blob):
                    raise RangeReadError(retries, f"{paths[k]}: range read failed: {type(blob).__name__}: {blob}")
                failed.append((k, f"{type(blob).__name__}: {blob}"))
            elif len(blob) > want:  # e.g. an HTTP server that ignores Range and sends the whole file
                raise RangeReadError(retries, f"{paths[k]}: asked for {want} bytes, got {len(blob)}: the storage does not "
                                     "serve byte ranges (HTTP servers must support Range requests)")
            elif len(blob) < want:  # a response cut short (or a file shortened since `cpt prepare`)
                failed.append((k, f"short read: {len(blob)} of {want} bytes at offset {begins[k]}"))
            else:
                blobs[k] = blob
        if not failed:
            return blobs, retries
        todo = [k for k, _ in failed]
        k, why = failed[0]
        if attempt == tries:
            raise RangeReadError(retries, f"{paths[k]}: range read failed {tries + 1} times ({why}; {len(failed)} of "
                                 f"{len(paths)} ranges): the storage is unreachable, or the file was truncated or "
                                 "replaced since `cpt prepare` (`cpt verify` checks it); `--resume` continues from the "
                                 "last checkpoint")
        retries += 1
        _wait_to_retry(policy, attempt, f"{paths[k]}: range read failed ({why}; {len(failed)} of {len(paths)} ranges)")
    raise AssertionError("unreachable")


def retrying(fn: Any, what: str, policy: RemoteConfig | None = None) -> Any:
    """``fn()`` (a whole-file read, e.g. a manifest), its transient failures retried as :func:`read_ranges` does; one
    that does not mend raises as it came (a missing file: the caller's message), the last transient one a ShardError."""
    policy = policy or DEFAULT
    for attempt in range(policy.read_retries + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - sorted below
            if not transient(e):
                raise
            if attempt == policy.read_retries:
                raise ShardError(f"{what}: read failed {policy.read_retries + 1} times ({type(e).__name__}: {e}): the storage "
                                 "is unreachable") from None
            _wait_to_retry(policy, attempt, f"{what}: read failed ({type(e).__name__}: {e})")


def _wait_to_retry(policy: RemoteConfig, attempt: int, why: str) -> None:
    """The warning line of retry ``attempt + 1`` and its wait: from retry_wait_s, doubling, at most retry_max_wait_s."""
    wait = min(policy.retry_wait_s * 2**attempt, policy.retry_max_wait_s)
    logger.warning(f"{why}; retry {attempt + 1}/{policy.read_retries} in {wait:g} s")
    time.sleep(wait)


def listed_mtime_ns(entry: dict) -> int | None:
    """A file's modification time (ns) from an fsspec listing entry: s3fs ``LastModified``, gcsfs ``updated``/``mtime``,
    memory:// ``created``, a local ``mtime``; None when the store gives none (HTTP)."""
    for key in ("LastModified", "updated", "mtime", "last_modified", "created"):
        t = entry.get(key)
        try:
            if isinstance(t, str):
                t = datetime.fromisoformat(t.replace("Z", "+00:00"))
            if isinstance(t, datetime):
                return int(t.timestamp() * 1e9)
            if isinstance(t, (int, float)) and not isinstance(t, bool):
                return int(t * 1e9)
        except (ValueError, OverflowError, OSError):
            continue
    return None


def changed_on_store(shards: Any, since_ns: int) -> tuple[list[str], list[str]]:
    """(problems, files changed but not checksummed) of a remote source during a run: its folder listed again (one LIST);
    a file whose size no longer matches the manifest, or one modified after ``since_ns`` whose checksum differs (up to
    8 are checksummed, as at a resume), is a problem; more changed files are returned unchecked."""
    problems = [f"{n} has {got} bytes on the store now, the manifest expects {size} (replaced during the run)"
                for n, got, size in shards.size_changes_on_store()]
    changed, bad = shards.changed_since(since_ns)
    return problems + [f"{b} (replaced during the run)" for b in bad], ([] if bad or len(changed) <= 8 else changed)
