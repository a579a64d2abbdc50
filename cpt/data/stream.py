"""Packed streams: a prepared source seen as fixed-length sequences in a deterministic order.

Packing: the source's token stream (documents joined by EOS, see :mod:`cpt.data.shards`) is cut into
``N = num_tokens // seq_len`` sequences; sequence ``i`` is tokens ``[i * seq_len, (i + 1) * seq_len)``
(the last partial sequence is dropped). Documents longer than ``seq_len`` continue in the next sequence.

Order: the stream is an endless list of *positions* ``p = 0, 1, 2, ...``; position ``p`` is epoch
``p // N`` and sequence ``perm(seed, name, epoch)[p % N]``. The permutation is a keyed Feistel
bijection on ``[0, N)`` (cycle walking), so it needs O(1) memory for any corpus size, any position
is computed directly, and every epoch has its own order: a pure function of (seed, source name, epoch).

A stream holds no position: its reader (``cpt.data.loader.CPTDataLoader``) keeps one counter per source and
asks for the sequences at any positions, so a resume is O(1) and nothing is re-read.
"""

from __future__ import annotations

import hashlib

import numpy as np

from cpt.data.shards import ShardError, TokenShards

_M64 = (1 << 64) - 1
_ROUNDS = 6
_BLOCK = 4096  # stream positions whose permuted sequence ids are computed together and cached


def _key(seed: int, name: str, epoch: int) -> int:
    data = f"{seed}\x00{name}\x00{epoch}".encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _mix(x: np.ndarray, k: np.uint64) -> np.ndarray:
    """A splitmix64-style round function on uint64 arrays (wrapping arithmetic)."""
    z = (x + k) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class Permutation:
    """A keyed bijection of ``[0, n)``: ``perm(idx)`` for arrays of indices, O(1) memory.

    A balanced Feistel network on ``2 * half`` bits (the smallest even width covering ``n``) with
    cycle walking: values that land outside ``[0, n)`` are permuted again until they fall inside,
    which keeps it a bijection of ``[0, n)`` (at most four tries on average).
    """

    def __init__(self, n: int, key: int):
        if n <= 0:
            raise ValueError(f"cannot permute an empty range (n={n})")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2
        self.half = bits // 2
        self.mask = np.uint64((1 << self.half) - 1)
        rng = np.random.Generator(np.random.PCG64(key))
        self.keys = [np.uint64(k) for k in rng.integers(0, 2**63, size=_ROUNDS, dtype=np.int64)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        with np.errstate(over="ignore"):
            for k in self.keys:
                left, right = right, left ^ (_mix(right, k) & self.mask)
        return (left << h) | right

    def __call__(self, idx: np.ndarray | int) -> np.ndarray:
        x = np.asarray(idx, dtype=np.uint64).copy()
        if x.size and (x.max() >= self.n):
            raise IndexError(f"index out of range [0, {self.n})")
        x = self._feistel(x)
        out = x >= np.uint64(self.n)
        while out.any():
            x[out] = self._feistel(x[out])
            out = x >= np.uint64(self.n)
        return x.astype(np.int64)


class PackedStream:
    """Fixed-length sequences of one prepared source, in a deterministic order.

    ``sequences(positions)`` gives the sequences at any positions (random access, used by the loader).
    """

    def __init__(self, shards: TokenShards, seq_len: int, seed: int = 0, name: str = ""):
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive (got {seq_len})")
        self.shards, self.seq_len, self.seed, self.name = shards, seq_len, seed, name
        self.num_sequences = shards.num_tokens // seq_len
        if self.num_sequences == 0:
            raise ShardError(  # (a user's mistake: one error line from cpt train, not a traceback)
                f"source {name or shards.path!r} has {shards.num_tokens} tokens, fewer than one sequence of {seq_len}"
            )
        self._perms: dict[int, Permutation] = {}
        self._blocks: dict[tuple[int, int], np.ndarray] = {}  # (epoch, block) -> sequence ids

    # ------------------------------------------------------------ random access

    def permutation(self, epoch: int) -> Permutation:
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) > 4:
                self._perms.clear()
            perm = self._perms[epoch] = Permutation(self.num_sequences, _key(self.seed, self.name, epoch))
        return perm

    def _perm_block(self, epoch: int, block: int) -> np.ndarray:
        """``permutation(epoch)`` of the offsets ``[block * _BLOCK, (block + 1) * _BLOCK)``, computed once for all
        (positions are consumed in order, so one vectorised Feistel pass serves many batches)."""
        key = (epoch, block)
        ids = self._blocks.get(key)
        if ids is None:
            if len(self._blocks) >= 8:
                self._blocks.clear()
            lo = block * _BLOCK
            ids = self._blocks[key] = self.permutation(epoch)(np.arange(lo, min(lo + _BLOCK, self.num_sequences)))
        return ids

    def sequence_ids(self, positions: np.ndarray) -> np.ndarray:
        """The sequence index (into the packed source) at each stream position."""
        positions = np.asarray(positions, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_sequences)
        blocks, within = np.divmod(offsets, _BLOCK)
        if len(positions) and (epochs == epochs[0]).all() and (blocks == blocks[0]).all():  # usual: one block
            return self._perm_block(int(epochs[0]), int(blocks[0]))[within]
        out = np.empty(len(positions), dtype=np.int64)
        for e, b in set(zip(epochs.tolist(), blocks.tolist())):
            sel = (epochs == e) & (blocks == b)
            out[sel] = self._perm_block(e, b)[within[sel]]
        return out

    def sequences(self, positions: np.ndarray, out: np.ndarray | None = None, rows: np.ndarray | None = None) -> np.ndarray:
        """Token arrays ``[len(positions), seq_len]`` (shard dtype) for the given stream positions, or written into
        rows ``rows`` of ``out`` (converted to its dtype on the way: no intermediate copy)."""
        ids = self.sequence_ids(positions)
        return self.shards.read_many(ids * self.seq_len, self.seq_len, out=out, rows=rows)

    def epoch_of(self, position: int) -> float:
        """Epochs completed (fractional) after consuming ``position`` sequences."""
        return position / self.num_sequences
