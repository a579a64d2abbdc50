"""Host memory for non-blocking checkpoint saves (``checkpoint.async_save``): does a save's staging fit?

A non-blocking save copies each rank's saved state into host buffers kept between saves (cpt/checkpoint_files.py,
cpt/sharded_save.py, cpt/zero_save.py): a second copy of the model and optimizer state (12-16 bytes per parameter for
full fine-tuning, divided by the world size where sharded), on every rank of a node at once. Where that does not fit,
the kernel's OOM killer would take the job down at the first checkpoint; instead the save that would grow the buffers
past the host's available memory is written synchronously, from the live tensors (what ``async_save: false`` does),
with one warning naming the numbers.

Available memory: the tighter of ``/proc/meminfo``'s MemAvailable and, under a cgroup (a SLURM job, a container), its
limit minus its usage plus its inactive page cache (the kernel reclaims that first), for the process's cgroup and every
cgroup above it (v2: ``memory.max``/``memory.current``/``memory.stat``; v1: ``memory.limit_in_bytes``/
``memory.usage_in_bytes``/``memory.stat``). Of that, :func:`usable` keeps a margin free: a tenth, at least 2 GiB.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

log = logging.getLogger("cpt.checkpoint")

GiB = 1 << 30
NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded LONG_MAX


def available(root: str | os.PathLike | None = None) -> tuple[int | None, str]:
    """(bytes this process can still allocate, which limit says so), the tightest of MemAvailable and the cgroup
    limits above the process; (None, "") when none can be read (not Linux). ``root``: where ``proc/`` and ``sys/`` are
    (tests); default ``$CPT_HOST_MEMORY_ROOT`` or ``/``."""
    root = Path(root or os.environ.get("CPT_HOST_MEMORY_ROOT") or "/")
    found: list[tuple[int, str]] = []
    for line in _read(root / "proc" / "meminfo").splitlines():
        if line.startswith("MemAvailable:"):
            found.append((int(line.split()[1]) * 1024, "MemAvailable (/proc/meminfo)"))
    for line in _read(root / "proc" / "self" / "cgroup").splitlines():
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":  # v2
            found += _cgroup_room(root / "sys/fs/cgroup", path, "memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # v1
            found += _cgroup_room(root / "sys/fs/cgroup/memory", path, "memory.limit_in_bytes", "memory.usage_in_bytes",
                                  "total_inactive_file")
    return min(found) if found else (None, "")


def _cgroup_room(base: Path, path: str, limit_file: str, usage_file: str, inactive_key: str) -> list[tuple[int, str]]:
    """limit - usage + inactive page cache of the cgroup at ``path`` and of each one above it that has a limit."""
    out = []
    parts = [p for p in path.strip().split("/") if p]
    for depth in range(len(parts), -1, -1):
        folder = base.joinpath(*parts[:depth])
        limit = _read(folder / limit_file).strip()
        if not limit or limit == "max" or int(limit) >= NO_LIMIT:
            continue
        usage = int(_read(folder / usage_file).strip() or 0)
        stat = dict(line.split()[:2] for line in _read(folder / "memory.stat").splitlines() if len(line.split()) >= 2)
        room = int(limit) - usage + int(stat.get(inactive_key, 0))
        out.append((max(room, 0), f"the cgroup limit ({folder / limit_file}: {int(limit) / GiB:.1f} GB)"))
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, ValueError):
        return ""


def usable(avail: int) -> int:
    """What a save may take of ``avail`` bytes: a tenth, at least 2 GiB, stays free."""
    return max(avail - max(2 * GiB, avail // 10), 0)


def tensor_bytes(obj, reused=lambda path, t: False, path: tuple = ()) -> int:
    """Bytes of the host copies of the tensors in ``obj`` (dicts, lists, tuples walked; a tensor under several keys
    once; a DTensor's local shard), but those ``reused(path, tensor)`` says a kept buffer already holds."""
    import torch

    seen: set[int] = set()

    def walk(o, p) -> int:
        if isinstance(o, torch.Tensor):
            if id(o) in seen:
                return 0
            seen.add(id(o))
            local = o.to_local() if hasattr(o, "to_local") else o
            return 0 if reused(p, local) else local.numel() * local.element_size()
        if isinstance(o, dict):
            return sum(walk(v, (*p, k)) for k, v in o.items())
        if isinstance(o, (list, tuple)):
            return sum(walk(v, (*p, i)) for i, v in enumerate(o))
        return 0

    return walk(obj, path)


class Guard:
    """One run's check of its non-blocking saves (held by the saver; says once why a save went synchronous)."""

    def __init__(self, acc):
        self.acc, self.warned = acc, False

    def fits(self, need: int, error: BaseException | None = None) -> bool:
        """Whether every node has room for what its ranks' staging adds (``need``: this rank's new bytes). Collective
        with several processes (one small gather: every rank saves); the same answer on every rank. ``error``: this
        rank failed before (it joins the gather all the same); raised here, on the others "another rank failed"."""
        from cpt.distributed import from_every_rank

        mine = (socket.gethostname(), need, *(available() if need else (None, "")), error is not None)
        every = from_every_rank(self.acc, mine)
        if error is not None:
            raise error
        if any(failed for *_, failed in every):
            raise RuntimeError("another rank failed while saving")
        nodes: dict[str, list] = {}
        for host, n, avail, source, _ in every:
            node = nodes.setdefault(host, [0, None, ""])
            node[0] += n
            if avail is not None and (node[1] is None or avail < node[1]):
                node[1], node[2] = avail, source
        short = [(h, n, a, s) for h, (n, a, s) in sorted(nodes.items()) if n and a is not None and n > usable(a)]
        if short:
            host, n, avail, source = short[0]
            self.say(self.acc.is_main_process, f"this save needs {n / GiB:.2f} GB more host memory on {host} (its ranks "
                     f"together) and {avail / GiB:.2f} GB is available there ({source}), less a margin")
        return not short

    def rank_share(self) -> int | None:
        """This rank's part of its node's usable host memory (an equal part per local rank: LOCAL_WORLD_SIZE), for a
        saver whose ranks decide alone (cpt/zero_save.py: each writes its own files); None: unknown."""
        avail, self.source = available()
        if avail is None:
            return None
        self.avail = avail
        return usable(avail) // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)

    def say(self, speaker: bool, why: str) -> None:
        if speaker and not self.warned:
            log.warning("checkpoint.async_save: %s: writing this save synchronously (the loop waits for it; so does each "
                        "later save that does not fit, not said again). Set checkpoint.async_save: false, or give the "
                        "job more host memory (e.g. SLURM --mem)", why)
        self.warned = self.warned or speaker
