"""Files that survive faults: hashing while writing, fsync, I/O errors in plain words, and the crash-test hook.

Imports nothing from cpt, so every layer (checkpoints, metrics, HF exports) can use it.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import time
from pathlib import Path

FAULT_ENV = "CPT_FAULT_INJECT"


def fault_point(name: str) -> None:
    """Test hook: SIGKILL this process when ``CPT_FAULT_INJECT`` (a point, or several separated by commas) names
    ``name``; raise a disk-full OSError when it names ``enospc:<name>``; never return (a hang) for ``hang:<name>``.

    The save and export code names its file boundaries (``save:begin@8``, ``model.safetensors:partial@8``,
    ``save:renamed@8``, ``export:written``, one rank's ``save_state:rank1@8``...; see tests/test_crash_consistency.py),
    so a test can kill the process at each one deterministically. Unset (always, outside tests) it costs one dict lookup.
    """
    want = os.environ.get(FAULT_ENV)
    if not want:
        return
    points = want.split(",")
    if name in points:
        os.kill(os.getpid(), signal.SIGKILL)
    elif f"enospc:{name}" in points:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
    elif f"hang:{name}" in points:
        while True:
            time.sleep(1)


def new_hasher():
    try:
        import xxhash

        return xxhash.xxh64()
    except ImportError:  # pragma: no cover - xxhash comes with datasets
        import hashlib

        return hashlib.sha256()


class HashingFile:
    """A binary file that hashes and counts what is written to it, so nothing is re-read to checksum it.

    Accepted by ``torch.save`` (it needs ``write`` and ``flush``). ``close()`` fsyncs. After the first
    write the fault point ``partial_fault`` fires, so a test can leave a truncated file behind.
    """

    def __init__(self, path: str | os.PathLike, partial_fault: str | None = None):
        self.path = Path(path)
        self.partial_fault = partial_fault
        self.size = 0
        self._hash = new_hasher()
        self._f = open(self.path, "wb")

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._f.write(view)
        self._hash.update(view)
        first = self.size == 0
        self.size += len(view)
        if first and self.partial_fault:
            self._f.flush()
            fault_point(self.partial_fault)
        return len(view)

    def flush(self) -> None:
        self._f.flush()

    def write_all(self, data: bytes, chunk: int = 1 << 24) -> None:
        """Write a whole payload in pieces (at least two, so there is a 'partial' point)."""
        view = memoryview(data)
        step = max(1, min(chunk, (len(view) + 1) // 2))
        for i in range(0, len(view), step):
            self.write(view[i : i + step])

    def close(self) -> None:
        if self._f.closed:
            return
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
        finally:
            self._f.close()

    @property
    def digest(self) -> str:
        return self._hash.hexdigest()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self._f.close()


def file_digest(path: str | os.PathLike) -> str:
    h = new_hasher()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def readable_as_umask_allows(folder: str | os.PathLike, pattern: str = "*.safetensors") -> None:
    """Give the files matching ``pattern`` in ``folder`` the mode a plain ``open()`` would have given them
    (``0o666`` less the umask). safetensors 0.8 writes through a temporary file and keeps its ``0o600``
    (safetensors/safetensors#782), so an exported model's weights were readable by their owner only while its
    config and tokenizer were not: another user of a shared folder could open the config but not the weights."""
    mask = os.umask(0o077)  # read the umask (set a restrictive one for the instant it takes)
    os.umask(mask)
    for f in Path(folder).glob(pattern):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, 0o666 & ~mask)


_PLAIN = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.EIO: "input/output error (failing disk or network storage)",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a path component is a file, not a directory",
    errno.EEXIST: "already exists",
}


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def describe_io_error(error: BaseException, where: str | os.PathLike) -> str:
    """The cause of a failed write in plain words, with its path: 'no space left on device (/runs/x/...)'.

    Looks through wrapped errors (torch's zip writer reports a full disk as 'unexpected pos', with the
    OSError as its context; safetensors as 'os error 28') and, when nothing names the cause, at the free
    space left on ``where``'s filesystem.
    """
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in _PLAIN:
            return f"{_PLAIN[e.errno]} ({e.filename or where})"
        m = re.search(r"os error (\d+)", str(e))
        if m and int(m.group(1)) in _PLAIN:
            return f"{_PLAIN[int(m.group(1))]} ({where})"
    free = free_bytes(where)
    if free is not None and free < (64 << 20):
        return f"no space left on device ({where}: {free / 2**20:.1f} MiB free; {type(error).__name__}: {error})"
    return f"{type(error).__name__}: {error} ({where})"


def free_bytes(path: str | os.PathLike) -> int | None:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """The file that stops a folder from being made at ``path``: ``path`` itself or the nearest existing path above it,
    when that is not a folder; None when the folder exists or can be made."""
    p = Path(path)
    found = next((a for a in (p, *p.parents) if a.exists()), None)
    return found if found is not None and not found.is_dir() else None


def safetensors_damage(path: str | os.PathLike) -> str | None:
    """What is wrong with a ``.safetensors`` file, in words, or None when its header is whole and its size is the one
    the header promises (reads the header only: a truncated download or copy, an empty file, a file of another
    kind). The safetensors library reports these as "Error while deserializing header" without naming the file."""
    import json

    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                return f"{p.name} is truncated or not a safetensors file ({size:,} bytes)"
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        return f"{p.name} has a damaged safetensors header ({type(e).__name__})"
    if size != 8 + n + end:
        return f"{p.name} has {size:,} bytes, its header says {8 + n + end:,} (truncated?)"
    return None
