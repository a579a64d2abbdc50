"""Writing the token-shard format (:mod:`cpt.data.shards` describes it and reads it): :class:`ShardWriter` appends
documents to fixed-size shard files, checksums computed while writing, and :func:`shard_manifest` describes what it
wrote. `cpt prepare` (:mod:`cpt.data.prepare`) stages, verifies and commits them.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from cpt.data.shards import CHECKSUM_ALGO, FORMAT_NAME, FORMAT_VERSION, new_hasher, shard_names
from cpt.data.tokenizer_identity import tokenizer_name, vocab_size


class ShardWriter:
    """Appends documents to fixed-size shard files in ``folder``; ``finish()`` returns the shard entries."""

    def __init__(self, folder: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.dtype, self.shard_tokens = folder, np.dtype(dtype), shard_tokens
        os.makedirs(folder, exist_ok=True)
        self.shards: list[dict] = []
        self.num_tokens = 0
        self.num_documents = 0
        self._f: Any = None
        self._h: Any = None
        self._n = 0  # tokens in the open shard
        self._doc_starts: list[np.ndarray] = []

    def _open(self) -> None:
        tokens_file, _ = shard_names(len(self.shards))
        self._f = open(os.path.join(self.folder, tokens_file), "wb")
        self._h, self._n, self._doc_starts = new_hasher(), 0, []

    def _close(self) -> None:
        i = len(self.shards)
        tokens_file, docs_file = shard_names(i)
        self._f.close()
        starts = np.concatenate(self._doc_starts).astype("<u8") if self._doc_starts else np.zeros(0, "<u8")
        blob = starts.tobytes()
        with open(os.path.join(self.folder, docs_file), "wb") as f:
            f.write(blob)
        dh = new_hasher()
        dh.update(blob)
        self.shards.append({
            "tokens_file": tokens_file, "docs_file": docs_file, "num_tokens": self._n,
            "num_documents": int(len(starts)), "tokens_checksum": self._h.hexdigest(), "docs_checksum": dh.hexdigest(),
        })
        self._f = None

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given back to back in ``flat`` with sizes ``lengths``."""
        if len(lengths) == 0:
            return
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        pos = 0
        while pos < len(flat):
            if self._f is None:
                self._open()
            take = min(self.shard_tokens - self._n, len(flat) - pos)
            chunk = np.ascontiguousarray(flat[pos : pos + take], dtype=self.dtype)
            self._f.write(chunk.data)
            self._h.update(chunk.data)
            sel = starts[(starts >= pos) & (starts < pos + take)]
            if len(sel):
                self._doc_starts.append(sel - pos + self._n)
            self._n += take
            pos += take
            if self._n == self.shard_tokens:
                self._close()
        self.num_tokens += len(flat)
        self.num_documents += len(lengths)

    def finish(self) -> list[dict]:
        if self._f is not None:
            self._close()
        return self.shards


def shard_manifest(writer: ShardWriter, tokenizer: Any, tok_hash: str, split: str, bos_id: int | None) -> dict:
    """The manifest of what ``writer`` wrote (after ``finish()``): format, tokenizer, dtype, counts, shard entries."""
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "split": split,
        "tokenizer": {"name": tokenizer_name(tokenizer), "hash": tok_hash, "vocab_size": vocab_size(tokenizer),
                      "eos_token_id": int(tokenizer.eos_token_id), "bos_token_id": bos_id},
        "dtype": writer.dtype.name,
        "num_tokens": writer.num_tokens,
        "num_documents": writer.num_documents,
        "eos_after_each_document": True,
        "bos_before_each_document": bos_id is not None,
        "checksum_algo": CHECKSUM_ALGO,
        "shards": writer.shards,
    }
