"""The memory maps of local shard files that a process keeps open (:data:`OPEN_MAPS`, used by
:class:`cpt.data.shards.TokenShards`): a bounded cache, least recently used dropped first, so the open files and
mappings of a run do not grow with the number of shards it reads."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np


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
