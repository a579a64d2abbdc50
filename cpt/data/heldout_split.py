"""The held-out split of `cpt prepare` (``--heldout-docs N`` / ``--heldout-fraction F``): whole documents routed to
train or held-out, deterministically from (seed, document index)."""

from __future__ import annotations

import heapq

import numpy as np

from cpt.data.shard_writer import ShardWriter


def _doc_hash(seed: int, index: np.ndarray) -> np.ndarray:
    """A splitmix64 hash of (seed, document index): uniform uint64 keys, the same on every machine."""
    with np.errstate(over="ignore"):
        z = index.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & (2**64 - 1))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class HeldoutSplitter:
    """Routes documents to train or held-out, deterministically from (seed, document index).

    ``fraction``: a document is held out when its hash falls below ``fraction * 2**64``.
    ``count``: the ``count`` documents with the smallest hashes are held out; candidates are kept in a
    heap, and a candidate pushed out by a smaller hash goes to train (later than its position, which
    is harmless since the stream shuffles sequences).
    """

    def __init__(self, train: ShardWriter, heldout: ShardWriter | None, seed: int,
                 count: int | None = None, fraction: float | None = None):
        self.train, self.heldout, self.seed = train, heldout, seed
        self.count, self.fraction = count, fraction
        self._index = 0
        self._heap: list[tuple[int, int, np.ndarray]] = []  # (-hash, index, tokens)

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        n = len(lengths)
        keys = _doc_hash(self.seed, np.arange(self._index, self._index + n, dtype=np.uint64))
        if self.heldout is None:
            self.train.add(flat, lengths)
        elif self.fraction is not None:
            held = keys < np.uint64(min(int(self.fraction * 2.0**64), 2**64 - 1))
            self._route(flat, lengths, held)
        else:
            self._add_count(flat, lengths, keys)
        self._index += n

    def _route(self, flat: np.ndarray, lengths: np.ndarray, held: np.ndarray) -> None:
        mask = np.repeat(held, lengths)
        self.train.add(flat[~mask], lengths[~held])
        assert self.heldout is not None
        self.heldout.add(flat[mask], lengths[held])

    def _add_count(self, flat: np.ndarray, lengths: np.ndarray, keys: np.ndarray) -> None:
        assert self.count is not None
        if len(self._heap) >= self.count:
            threshold = -self._heap[0][0] if self._heap else 0
            cand = keys < np.uint64(threshold)
        else:
            cand = np.ones(len(keys), dtype=bool)
        if not cand.any():
            self.train.add(flat, lengths)
            return
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        evicted: list[np.ndarray] = []
        for j in np.flatnonzero(cand).tolist():
            key = int(keys[j])
            tokens = flat[starts[j] : starts[j] + lengths[j]].copy()
            item = (-key, self._index + j, tokens)
            if len(self._heap) < self.count:
                heapq.heappush(self._heap, item)
            elif key < -self._heap[0][0]:
                evicted.append(heapq.heapreplace(self._heap, item)[2])
            else:
                evicted.append(tokens)
        mask = np.repeat(~cand, lengths)
        self.train.add(flat[mask], lengths[~cand])
        if evicted:
            self.train.add(np.concatenate(evicted), np.array([len(e) for e in evicted], dtype=np.int64))

    def finish(self) -> None:
        if self.heldout is not None and self._heap:
            docs = [tokens for _, _, tokens in sorted(self._heap, key=lambda item: item[1])]
            self.heldout.add(np.concatenate(docs), np.array([len(d) for d in docs], dtype=np.int64))
