"""Tokenizing documents for `cpt prepare`: texts -> :class:`EncodedBatch` (each document's ids, then EOS).

Every document is tokenized without special tokens (plus BOS when a ``bos_id`` is given: by default where the tokenizer
adds one itself, :func:`bos_by_convention`) and followed by EOS;
documents over ``max_doc_tokens`` are truncated or skipped (``too_long``), documents the tokenizer maps to nothing
are skipped (``empty``). :func:`encode_documents` streams a document iterator through the encoder in input order:
reading runs in a background thread, and the encoding in this process (``num_proc == 1``: the tokenizer's own
threads) or in ``num_proc`` worker processes (one tokenizer thread each). Both give the same batches.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import queue
import signal
import threading
from collections import Counter, deque
from dataclasses import dataclass
from itertools import chain
from typing import Any, Iterator

import numpy as np

from cpt.stop_signals import signal_at_parent_exit


def bos_by_convention(tokenizer: Any) -> int | None:
    """The BOS id when ``tokenizer`` itself starts every encoding with its BOS token (Llama 3's
    ``<|begin_of_text|>``, Gemma's and Mistral's ``<bos>``: the models were pre-trained with it before each document),
    else None (GPT-2 and Pythia, whose BOS is their EOS; Qwen, which has none; a tokenizer that adds no BOS). What
    `cpt prepare` and a streamed `hf` source put before each document unless told (``--add-bos`` / ``--no-add-bos``)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or bos == getattr(tokenizer, "eos_token_id", None):
        return None
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer that cannot say: no convention to follow
        return None
    return int(bos) if list(ids[:1]) == [bos] else None


class EncodeError(RuntimeError):
    """Tokenizing could not go on (a worker process died): one line from `cpt prepare`."""


@dataclass
class EncodedBatch:
    """Tokenized documents: ``flat`` holds them back to back (each ending in EOS), ``lengths`` their sizes."""

    flat: np.ndarray
    lengths: np.ndarray
    skipped: Counter
    truncated: int
    special: int = 0  # documents whose text held a special token's text, encoded as that token (not as_text)


class Encoder:
    """Batch tokenizer: texts -> :class:`EncodedBatch` (multithreaded ``encode_batch_fast``)."""

    def __init__(self, backend: Any, eos_id: int, bos_id: int | None, dtype: np.dtype,
                 max_doc_tokens: int | None, long_docs: str, special_as_text: bool = False):
        """``special_as_text``: the text of a special token in a document ('<|endoftext|>' in code about tokenizers)
        is encoded as plain text; otherwise as that token (as transformers does), and such documents are counted."""
        if special_as_text:  # (on a copy: the caller's tokenizer is left as it is)
            backend = type(backend).from_str(backend.to_str())
            backend.encode_special_tokens = True
        self.backend, self.special_as_text = backend, special_as_text
        self.eos_id, self.bos_id, self.dtype = eos_id, bos_id, np.dtype(dtype)
        self.max_doc_tokens, self.long_docs = max_doc_tokens, long_docs
        special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        unk = getattr(backend.model, "unk_token", None)  # (an unknown word maps to it: no special token's text)
        special.discard(backend.token_to_id(unk) if isinstance(unk, str) else None)
        self._special = np.array(sorted(special), dtype=np.int64)
        encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
        self._encode = encode

    def __call__(self, texts: list[str]) -> EncodedBatch:
        ids = [e.ids for e in self._encode(texts, add_special_tokens=False)]
        skipped: Counter = Counter()
        truncated = 0
        if self.max_doc_tokens is not None:
            m = self.max_doc_tokens
            if self.long_docs == "skip":
                n0 = len(ids)
                ids = [x for x in ids if len(x) <= m]
                skipped["too_long"] += n0 - len(ids)
            else:
                truncated = sum(len(x) > m for x in ids)
                ids = [x[:m] if len(x) > m else x for x in ids]
        n0 = len(ids)
        ids = [x for x in ids if x]  # text the tokenizer maps to nothing (e.g. only control characters)
        skipped["empty"] += n0 - len(ids)
        return self._pack(ids, skipped, truncated)

    def _pack(self, ids: list[list[int]], skipped: Counter, truncated: int) -> EncodedBatch:
        extra = 1 + (self.bos_id is not None)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + extra
        total = int(lengths.sum())
        flat = np.empty(total, dtype=self.dtype)
        ends = np.cumsum(lengths) - 1
        body = np.ones(total, dtype=bool)
        body[ends] = False
        if self.bos_id is not None:
            starts = ends - lengths + 1
            body[starts] = False
            flat[starts] = self.bos_id
        tokens = np.fromiter(chain.from_iterable(ids), dtype=self.dtype, count=total - extra * len(ids))
        flat[body] = tokens
        flat[ends] = self.eos_id
        special = 0
        if len(self._special) and not self.special_as_text:  # documents with a special token among their own tokens
            hit = np.isin(tokens, self._special)
            if hit.any():
                special = len(np.unique(np.repeat(np.arange(len(ids)), lengths - extra)[hit]))
        return EncodedBatch(flat, lengths, skipped, truncated, special)


# ---------------------------------------------------------------- worker processes (num_proc > 1)

_WORKER_ENCODER: Encoder | None = None


def _init_worker(tokenizer_json: str, args: tuple, parent: int) -> None:
    global _WORKER_ENCODER
    # a worker ends with `cpt prepare` (kill -9, the OOM killer): they stayed, blocked on their queue, forever
    signal_at_parent_exit(signal.SIGTERM, parent)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process; the pool is the parallelism
    from tokenizers import Tokenizer

    _WORKER_ENCODER = Encoder(Tokenizer.from_str(tokenizer_json), *args)


def _worker_encode(texts: list[str]) -> EncodedBatch:
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER(texts)


# ---------------------------------------------------------------- the stream


def _batches(docs: Iterator[str], max_docs: int, max_chars: int) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for d in docs:
        batch.append(d)
        chars += len(d)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _read_ahead(it: Iterator[Any], depth: int = 4) -> Iterator[Any]:
    """Run ``it`` in a background thread (reading overlaps tokenization, which releases the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def run() -> None:
        try:
            for item in it:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    t = threading.Thread(target=run, daemon=True, name="cpt-prepare-reader")
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                q.get_nowait()


def _ordered(pool: Any, fn: Any, items: Iterator[Any], depth: int) -> Iterator[Any]:
    """``map(fn, items)`` in order, with up to ``depth`` calls in flight on ``pool``."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


@contextlib.contextmanager
def encode_documents(docs: Iterator[str], encoder: Encoder, num_proc: int = 1, batch_docs: int = 1024,
                     batch_chars: int = 1 << 20) -> Iterator[Iterator[EncodedBatch]]:
    """Encoded batches of ``docs`` in input order, batches of up to ``batch_docs`` documents / ``batch_chars`` characters.

    ``docs`` is read in a background thread. ``num_proc == 1``: two threads in this process, so that one batch's
    Rust encoding (multithreaded, GIL released) overlaps the other's conversion to arrays. ``num_proc > 1``: worker
    processes with one tokenizer thread each.
    """
    batches = _read_ahead(_batches(docs, batch_docs, batch_chars))
    if num_proc <= 1:
        with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="cpt-encode") as pool:
            yield _ordered(pool, encoder, batches, depth=3)
        return
    args = (encoder.eos_id, encoder.bos_id, encoder.dtype, encoder.max_doc_tokens, encoder.long_docs,
            encoder.special_as_text)
    # (not multiprocessing.Pool: its imap waited forever for the batch of a worker the system killed, e.g. out of
    # memory on a huge document)
    with concurrent.futures.ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_init_worker,
                                                initargs=(encoder.backend.to_str(), args, os.getpid())) as pool:
        try:
            yield _ordered(pool, _worker_encode, batches, depth=2 * num_proc)
        except concurrent.futures.process.BrokenProcessPool:
            raise EncodeError("a tokenizer worker process died (killed by the system: out of memory on a long "
                              "document?); lower --num-proc, or cap documents with --max-doc-tokens") from None


__all__ = ["EncodedBatch", "EncodeError", "Encoder", "encode_documents"]
