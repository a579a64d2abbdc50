"""The memory maps of local shard files that a process keeps open (:data:`OPEN_MAPS`, used by
:class:`cpt.data.shards.TokenShards`): a bounded cache, least recently used dropped first, so the open files and
mappings of a run do not grow with the number of shards it reads; :func:`map_tokens` opens one, :func:`check_size`
finds a file removed or cut short under a run (one ShardError naming it)."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from cpt.data.manifest import ShardError


class OpenMaps:
    """The shard memory maps kept open by this process, least recently used dropped first, at most ``limit`` for all
    sources together. Each map holds a file descriptor and one of the kernel's ``vm.max_map_count`` mappings: keeping
    every shard a run touched open stopped a source of more shards than ``ulimit -n`` (1,024 on many clusters; shards
    are read in random order, so all are touched within an epoch) with "Too many open files". A map dropped while a
    reader still slices it stays valid until that slice is gone (the view holds it)."""

    def __init__(self, limit: int):
        self.limit, self.maps, self.opened, self._lock = limit, OrderedDict(), 0, threading.Lock()

    def get(self, key: tuple[int, int], make: Any) -> np.ndarray:
        with self._lock:
            a = self.maps.get(key)
            if a is not None:
                self.maps.move_to_end(key)
                return a
        a = make()
        with self._lock:
            self.maps[key], self.opened = a, self.opened + 1
            while len(self.maps) > self.limit:
                self.maps.popitem(last=False)
        return a


def _open_maps_limit() -> int:
    """A quarter of the soft open-files limit (``ulimit -n``; the rest is left to checkpoints, sockets, workers), from 16
    to 4,096 (far below the kernel's ``vm.max_map_count``, 65,530 by default): 256 under the common limit of 1,024."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 256
    return 4096 if soft == resource.RLIM_INFINITY else max(16, min(4096, soft // 4))


OPEN_MAPS = OpenMaps(_open_maps_limit())


def map_tokens(path: str, dtype: np.dtype, num_tokens: int) -> np.ndarray:
    """A tokens file's memory map as a plain ndarray (slicing a ``np.memmap`` costs a Python-level hook)."""
    if num_tokens == 0:
        return np.zeros(0, dtype=dtype)
    check_size(path, num_tokens, dtype.itemsize)  # (np.memmap of a short file: "mmap length is greater than file size")
    try:
        return np.memmap(path, dtype=dtype, mode="r", shape=(num_tokens,)).view(np.ndarray)
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: cannot be read ({e}); it was readable when the run started: changed since?") from None


def check_size(path: str, num_tokens: int, itemsize: int) -> None:
    """The tokens file still holds the manifest's tokens (one stat): removed or cut short during the run is one
    ShardError naming it, not a traceback without the file, nor a SIGBUS (no message at all) in its open map."""
    want = num_tokens * itemsize
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise ShardError(f"{path}: {e.strerror or e}: removed or moved during the run? (the manifest lists it with "
                         f"{num_tokens:,} tokens)") from None
    if size < want:
        raise ShardError(f"{path}: {size:,} bytes, but the manifest's {num_tokens:,} tokens need {want:,}: the file was "
                         "cut short during the run (a partial copy, a full disk?); restore it, then --resume")
