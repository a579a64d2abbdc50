"""`cpt prepare`: raw text -> token shards + manifest.json (see :mod:`cpt.data.shards` for the format).

Inputs, read in the order given (folders recursively, sorted by path):

- jsonl (``.jsonl``/``.json``/``.ndjson``, plain or ``.gz``/``.zst``/``.bz2``/``.xz``): one JSON object per line,
  the text in ``text_field``;
- parquet: the ``text_field`` column;
- any other file: plain text, one document per file;
- with ``hf=True`` each input is a ``datasets.load_dataset`` path (hub id, local folder or builder name such
  as ``json``), with ``dataset_name``/``split``/``data_files``/``streaming``.

Local paths and fsspec URLs (s3://, gs://, hf://, http(s)://) both work.

Every document is tokenized without special tokens (plus BOS when ``add_bos``) and followed by EOS.
Records that cannot be used are skipped and counted by reason (``malformed_json``, ``non_utf8``,
``missing_field``, ``not_text``, ``empty``, ``too_long``); an input with nothing valid is a
:class:`PrepareError`, never a traceback.

Held-out split: ``heldout_docs=N`` takes the N documents with the smallest ``hash(seed, index)``,
``heldout_fraction=F`` every document whose hash falls below F; both are deterministic, by document,
and written to ``<out>/heldout/`` as a prepared source of its own.

Atomicity: shards are written into a staging folder and moved into place at the end; the old
manifest is removed before any shard is replaced and the new one is written last (tmp + rename),
so a manifest never points at partial shards. Checksums (xxh3-64) are computed while writing and the
staged shards are read back and checked against them once, before they are moved into place: the data's
one full verification (training starts check sizes only; ``cpt verify DIR`` re-checks on demand). Re-running with the same inputs, tokenizer and
options finds the manifest's ``prepare_key`` unchanged and does nothing.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fnmatch
import hashlib
import heapq
import io
import json
import logging
import multiprocessing
import os
import queue
import shutil
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from cpt.data.shards import (
    CHECKSUM_ALGO,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    ShardError,
    TokenShards,
    _backend,
    dtype_for_vocab,
    filesystem,
    is_remote,
    new_hasher,
    shard_names,
    tokenizer_fingerprint,
    tokenizer_name,
    vocab_size,
    write_json_atomic,
)

logger = logging.getLogger("cpt.data")

SKIP_REASONS = ("malformed_json", "non_utf8", "missing_field", "not_text", "empty", "too_long")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSION_SUFFIXES = (".gz", ".zst", ".zstd", ".bz2", ".xz")
DEFAULT_SHARD_TOKENS = 100_000_000
HELDOUT_DIR = "heldout"


class PrepareError(ValueError):
    """A user-facing problem with the inputs or options of `cpt prepare` (printed without a traceback)."""


# ================================================================ reading raw documents


@dataclass
class _Counts:
    """What the readers saw: records read and records skipped by reason."""

    records: int = 0
    skipped: Counter = field(default_factory=Counter)

    def skip(self, reason: str, n: int = 1) -> None:
        self.records += n
        self.skipped[reason] += n


def _strip_compression(name: str) -> str:
    lower = name.lower()
    for suf in COMPRESSION_SUFFIXES:
        if lower.endswith(suf):
            return lower[: -len(suf)]
    return lower


def _kind(path: str) -> str:
    base = _strip_compression(path)
    if base.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if base.endswith(".parquet"):
        return "parquet"
    return "text"


def _compression(path: str) -> str | None:
    lower = path.lower()
    if lower.endswith(".zst"):
        return "zstd"
    import fsspec.utils

    return fsspec.utils.infer_compression(path)


def _hidden(name: str) -> bool:
    """Dot-files and caches are skipped when walking folders (not `_private.py` or `__init__.py`)."""
    return name.startswith(".") or name == "__pycache__"


def _matches(path: str, pattern: str | None) -> bool:
    """--glob matches the file name (`*.py`) or, with a `/` or `**`, the path (`**/*.py`, `src/*.py`)."""
    if not pattern:
        return True
    if "/" in pattern:
        return fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, "*/" + pattern.removeprefix("**/"))
    return fnmatch.fnmatch(path.rsplit("/", 1)[-1], pattern)


def resolve_files(inputs: Iterable[str], glob: str | None = None) -> list[str]:
    """Expand folders (recursively, sorted) and glob patterns (`src/**/*.h`) into files; error for anything that does not exist."""
    import glob as globlib

    files: list[str] = []
    for item in inputs:
        item = str(item)
        if not is_remote(item) and any(c in item for c in "*?[") and not os.path.exists(item):
            matched = sorted(p for p in globlib.glob(item, recursive=True) if os.path.isfile(p) and _matches(p, glob))
            if not matched:
                raise PrepareError(f"input pattern matched no files: {item}")
            files += matched
        elif is_remote(item):
            try:
                fs, root = filesystem(item)
            except ShardError as e:  # s3:// or gs:// without its extra: one line naming it
                raise PrepareError(str(e)) from None
            protocol = item.split("://", 1)[0]
            if not fs.exists(root):
                raise PrepareError(f"input not found: {item}")
            if fs.isdir(root):
                found = sorted(p for p in fs.find(root) if not _hidden(p.rsplit("/", 1)[-1]))
                found = [p for p in found if _matches(p, glob)]
                files += [p if "://" in p else f"{protocol}://{p}" for p in found]
            else:
                files.append(item)
        elif os.path.isdir(item):
            found = []
            for dirpath, dirnames, filenames in os.walk(item):
                dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
                found += [os.path.join(dirpath, f) for f in filenames if not _hidden(f) and _matches(os.path.join(dirpath, f), glob)]
            files += sorted(found)
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise PrepareError(f"input not found: {item} (to load a `datasets.load_dataset` spec, pass --hf)")
    if not files:
        raise PrepareError(f"no input files found in {list(inputs)}" + (f" matching {glob!r}" if glob else ""))
    return files


def _open_binary(path: str) -> Any:
    """A buffered binary file (decompressed by suffix) that iterates by lines."""
    import fsspec

    compression = _compression(path)
    if compression == "zstd":  # fsspec's zstd file cannot iterate lines: decompress as a stream ourselves
        import zstandard

        raw = fsspec.open(path, "rb").open()
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), buffer_size=1 << 20)
    return fsspec.open(path, "rb", compression=compression).open()


def _field_text(record: Any, text_field: str, counts: _Counts) -> str | None:
    """The usable text of one record, or None (after counting why it was skipped)."""
    if not isinstance(record, dict):
        counts.skip("malformed_json")
        return None
    value = record.get(text_field)
    if value is None:
        counts.skip("missing_field")
        return None
    if not isinstance(value, str):
        counts.skip("not_text")
        return None
    try:
        value.encode("utf-8")  # lone surrogates from "\ud800" escapes are not valid text
    except UnicodeEncodeError:
        counts.skip("non_utf8")
        return None
    if not value.strip():
        counts.skip("empty")
        return None
    counts.records += 1
    return value


def _read_jsonl(path: str, text_field: str, counts: _Counts) -> Iterator[str]:
    with _open_binary(path) as f:
        for raw in f:
            if not raw.strip():
                continue  # blank separator lines are not records
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                counts.skip("non_utf8")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                counts.skip("malformed_json")
                continue
            text = _field_text(record, text_field, counts)
            if text is not None:
                yield text


def _read_parquet(path: str, text_field: str, counts: _Counts) -> Iterator[str]:
    import pyarrow.parquet as pq

    with _open_binary(path) as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises ArrowInvalid and friends for broken files
            raise PrepareError(f"{path}: not a readable parquet file ({e})") from None
        if text_field not in pf.schema_arrow.names:
            logger.warning("%s: no column %r (columns: %s); all rows skipped", path, text_field, pf.schema_arrow.names)
            counts.skip("missing_field", pf.metadata.num_rows)
            return
        for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
            for value in batch.column(0).to_pylist():
                text = _field_text({text_field: value}, text_field, counts)
                if text is not None:
                    yield text


def _read_text(path: str, counts: _Counts) -> Iterator[str]:
    with _open_binary(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        counts.skip("non_utf8")
        return
    if not text.strip():
        counts.skip("empty")
        return
    counts.records += 1
    yield text


def _read_hf(spec: str, text_field: str, counts: _Counts, dataset_name: str | None, split: str,
             data_files: Any, streaming: bool) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(spec, name=dataset_name, split=split, data_files=data_files, streaming=streaming)
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError...)
        raise PrepareError(f"datasets.load_dataset({spec!r}, name={dataset_name!r}, split={split!r}) failed: {e}") from None
    columns = getattr(ds, "column_names", None)
    if columns is not None and text_field not in columns:
        raise PrepareError(f"dataset {spec!r} has no field {text_field!r} (fields: {columns}); use --text-field")
    for batch in ds.iter(batch_size=1000):
        values = batch.get(text_field)
        if values is None:
            n = len(next(iter(batch.values()), []))
            counts.skip("missing_field", n)
            continue
        for value in values:
            text = _field_text({text_field: value}, text_field, counts)
            if text is not None:
                yield text


def iter_documents(inputs: list[str], text_field: str, counts: _Counts, *, hf: bool = False, glob: str | None = None,
                   dataset_name: str | None = None, split: str = "train", data_files: Any = None,
                   streaming: bool = False) -> Iterator[str]:
    """Every usable document of the inputs, in order; skipped records are counted in ``counts``."""
    if hf:
        for spec in inputs:
            yield from _read_hf(spec, text_field, counts, dataset_name, split, data_files, streaming)
        return
    for path in resolve_files(inputs, glob):
        kind = _kind(path)
        try:
            if kind == "jsonl":
                yield from _read_jsonl(path, text_field, counts)
            elif kind == "parquet":
                yield from _read_parquet(path, text_field, counts)
            else:
                yield from _read_text(path, counts)
        except (OSError, EOFError) as e:  # corrupt gzip/zstd streams, unreadable files
            raise PrepareError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


# ================================================================ tokenizing


@dataclass
class EncodedBatch:
    """Tokenized documents: ``flat`` holds them back to back (each ending in EOS), ``lengths`` their sizes."""

    flat: np.ndarray
    lengths: np.ndarray
    skipped: Counter
    truncated: int


class Encoder:
    """Batch tokenizer: texts -> :class:`EncodedBatch` (multithreaded ``encode_batch_fast``)."""

    def __init__(self, backend: Any, eos_id: int, bos_id: int | None, dtype: np.dtype,
                 max_doc_tokens: int | None, long_docs: str):
        self.backend = backend
        self.eos_id, self.bos_id, self.dtype = eos_id, bos_id, np.dtype(dtype)
        self.max_doc_tokens, self.long_docs = max_doc_tokens, long_docs
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
        flat[body] = np.fromiter(chain.from_iterable(ids), dtype=self.dtype, count=total - extra * len(ids))
        flat[ends] = self.eos_id
        return EncodedBatch(flat, lengths, skipped, truncated)


_WORKER_ENCODER: Encoder | None = None


def _init_worker(tokenizer_json: str, args: tuple) -> None:
    global _WORKER_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process; the pool is the parallelism
    from tokenizers import Tokenizer

    _WORKER_ENCODER = Encoder(Tokenizer.from_str(tokenizer_json), *args)


def _worker_encode(texts: list[str]) -> EncodedBatch:
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER(texts)


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


def _prefetch(it: Iterator[Any], depth: int = 4) -> Iterator[Any]:
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
def _encoded_stream(batches: Iterator[list[str]], encoder: Encoder, num_proc: int) -> Iterator[Iterator[EncodedBatch]]:
    """Encoded batches in input order.

    ``num_proc == 1``: two threads in this process, so that one batch's Rust encoding (multithreaded,
    GIL released) overlaps the other's conversion to arrays. ``num_proc > 1``: worker processes with
    one tokenizer thread each.
    """
    if num_proc <= 1:
        with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="cpt-encode") as pool:
            yield _ordered(pool, encoder, batches, depth=3)
        return
    args = (encoder.eos_id, encoder.bos_id, encoder.dtype, encoder.max_doc_tokens, encoder.long_docs)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(num_proc, initializer=_init_worker, initargs=(encoder.backend.to_str(), args)) as pool:
        yield pool.imap(_worker_encode, batches, chunksize=1)


# ================================================================ writing shards


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


# ================================================================ held-out selection


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


# ================================================================ the whole job


def _load_tokenizer(tokenizer: Any) -> Any:
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer))
    except Exception as e:  # OSError for missing folders / offline hub, ValueError for bad files
        raise PrepareError(f"cannot load tokenizer {str(tokenizer)!r}: {e}") from None
    if not getattr(tok, "is_fast", False):
        raise PrepareError(f"tokenizer {str(tokenizer)!r} has no fast (Rust) version; cpt prepare needs one")
    return tok


def _input_identity(inputs: list[str], hf: bool, glob: str | None) -> list[Any]:
    """What the inputs are, for the idempotency key: local files by size and mtime, others by name."""
    if hf:
        return list(inputs)
    out: list[Any] = []
    for path in resolve_files(inputs, glob):
        if is_remote(path):
            out.append(path)
        else:
            st = os.stat(path)
            out.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
    return out


def _prepare_key(identity: list[Any], tok_hash: str, options: dict) -> str:
    blob = json.dumps({"inputs": identity, "tokenizer": tok_hash, "options": options}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _is_up_to_date(out: str, key: str) -> dict | None:
    try:
        shards = TokenShards.open(out, verify=False)
        if shards.manifest.get("prepare_key") != key:
            return None
        if shards.manifest.get("heldout"):
            TokenShards.open(os.path.join(out, HELDOUT_DIR), verify=False)
        return shards.manifest
    except ShardError:
        return None


def _clear_prepared(folder: str) -> None:
    """Remove a manifest first (so nothing points at shards being replaced), then the shard files."""
    for name in (MANIFEST,):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, name))
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith("shard_") and name.endswith((".bin", ".idx")):
                os.remove(os.path.join(folder, name))


def _move_shards(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(src)):
        if name.startswith("shard_"):
            os.replace(os.path.join(src, name), os.path.join(dst, name))


def _manifest(writer: ShardWriter, tok: Any, tok_hash: str, dtype: np.dtype, split: str, bos_id: int | None) -> dict:
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "split": split,
        "tokenizer": {"name": tokenizer_name(tok), "hash": tok_hash, "vocab_size": vocab_size(tok),
                      "eos_token_id": int(tok.eos_token_id), "bos_token_id": bos_id},
        "dtype": dtype.name,
        "num_tokens": writer.num_tokens,
        "num_documents": writer.num_documents,
        "eos_after_each_document": True,
        "bos_before_each_document": bos_id is not None,
        "checksum_algo": CHECKSUM_ALGO,
        "shards": writer.shards,
    }


def prepare(
    inputs: str | list[str],
    tokenizer: Any,
    out: str | os.PathLike,
    *,
    text_field: str = "text",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    heldout_docs: int | None = None,
    heldout_fraction: float | None = None,
    seed: int = 0,
    num_proc: int = 1,
    max_doc_tokens: int | None = None,
    long_docs: str = "truncate",
    add_bos: bool = False,
    glob: str | None = None,
    hf: bool = False,
    dataset_name: str | None = None,
    split: str = "train",
    data_files: Any = None,
    streaming: bool = False,
    batch_docs: int = 1024,
    batch_chars: int = 1 << 20,
    force: bool = False,
    progress: bool = False,
    echo: Callable[[str], Any] | None = None,
) -> dict:
    """Tokenize ``inputs`` into token shards under ``out``; return the manifest (see the module docstring).

    The returned manifest has ``stats`` (records read, documents kept, skipped by reason,
    truncated, seconds) and, when a held-out split was asked for, ``heldout`` (its folder and counts).
    ``tokenizer`` is a transformers fast tokenizer or a hub id / local folder to load one from.
    ``echo``, when given, receives the printed summary (:func:`format_summary`).
    Raises :class:`PrepareError` for user mistakes (missing inputs, no valid documents, bad options).
    """
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else [str(i) for i in inputs]
    out = str(out)
    _check_options(inputs, shard_tokens, heldout_docs, heldout_fraction, num_proc, max_doc_tokens, long_docs)
    if is_remote(out):
        raise PrepareError(f"--out must be a local folder (got {out}); upload the prepared folder afterwards")
    tok = _load_tokenizer(tokenizer)
    if getattr(tok, "eos_token_id", None) is None:
        raise PrepareError(f"tokenizer {tokenizer_name(tok)!r} has no EOS token; documents must be separated by EOS")
    bos_id = getattr(tok, "bos_token_id", None) if add_bos else None
    if add_bos and bos_id is None:
        raise PrepareError(f"--add-bos: tokenizer {tokenizer_name(tok)!r} has no BOS token")
    tok_hash = tokenizer_fingerprint(tok)
    dtype = dtype_for_vocab(vocab_size(tok))
    options = {"text_field": text_field, "shard_tokens": shard_tokens, "heldout_docs": heldout_docs,
               "heldout_fraction": heldout_fraction, "seed": seed, "max_doc_tokens": max_doc_tokens,
               "long_docs": long_docs, "add_bos": add_bos, "glob": glob, "hf": hf, "dataset_name": dataset_name,
               "split": split, "data_files": data_files}
    key = _prepare_key(_input_identity(inputs, hf, glob), tok_hash, options)
    if not force and (existing := _is_up_to_date(out, key)) is not None:
        result = {**existing, "up_to_date": True}
        if echo is not None:
            echo(format_summary(result, out))
        return result

    os.makedirs(out, exist_ok=True)
    _remove_stale_staging(out)
    staging = os.path.join(out, f".staging-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        result = _run(inputs, tok, out, staging, key, tok_hash, dtype, bos_id, options, num_proc, batch_docs, batch_chars,
                      progress, streaming)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if echo is not None:
        echo(format_summary(result, out))
    return result


def _check_options(inputs: list[str], shard_tokens: int, heldout_docs: int | None, heldout_fraction: float | None,
                   num_proc: int, max_doc_tokens: int | None, long_docs: str) -> None:
    if not inputs:
        raise PrepareError("no inputs given")
    if shard_tokens <= 0:
        raise PrepareError(f"shard_tokens must be positive (got {shard_tokens})")
    if heldout_docs is not None and heldout_fraction is not None:
        raise PrepareError("give either heldout_docs or heldout_fraction, not both")
    if heldout_docs is not None and heldout_docs <= 0:
        raise PrepareError(f"heldout_docs must be positive (got {heldout_docs})")
    if heldout_fraction is not None and not 0 < heldout_fraction < 1:
        raise PrepareError(f"heldout_fraction must be in (0, 1) (got {heldout_fraction})")
    if num_proc < 1:
        raise PrepareError(f"num_proc must be >= 1 (got {num_proc})")
    if max_doc_tokens is not None and max_doc_tokens <= 0:
        raise PrepareError(f"max_doc_tokens must be positive (got {max_doc_tokens})")
    if long_docs not in ("truncate", "skip"):
        raise PrepareError(f"long_docs must be 'truncate' or 'skip' (got {long_docs!r})")


def _remove_stale_staging(out: str) -> None:
    for name in os.listdir(out):
        if name.startswith(".staging-"):
            pid = name.split("-")[1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _run(inputs: list[str], tok: Any, out: str, staging: str, key: str, tok_hash: str, dtype: np.dtype,
         bos_id: int | None, options: dict, num_proc: int, batch_docs: int, batch_chars: int, progress: bool,
         streaming: bool) -> dict:
    t0 = time.perf_counter()
    counts = _Counts()
    train = ShardWriter(staging, dtype, options["shard_tokens"])
    want_heldout = options["heldout_docs"] is not None or options["heldout_fraction"] is not None
    held = ShardWriter(os.path.join(staging, HELDOUT_DIR), dtype, options["shard_tokens"]) if want_heldout else None
    splitter = HeldoutSplitter(train, held, options["seed"], options["heldout_docs"], options["heldout_fraction"])
    encoder = Encoder(_backend(tok), int(tok.eos_token_id), bos_id, dtype, options["max_doc_tokens"], options["long_docs"])
    docs = iter_documents(inputs, options["text_field"], counts, hf=options["hf"], glob=options["glob"],
                          dataset_name=options["dataset_name"], split=options["split"],
                          data_files=options["data_files"], streaming=streaming)
    skipped: Counter = Counter()
    truncated = 0
    bar = _progress_bar(progress)
    with _encoded_stream(_prefetch(_batches(docs, batch_docs, batch_chars)), encoder, num_proc) as encoded:
        for enc in encoded:
            skipped.update(enc.skipped)
            truncated += enc.truncated
            splitter.add(enc.flat, enc.lengths)
            if bar is not None:
                bar.update(len(enc.lengths))
                bar.set_postfix(tokens=f"{train.num_tokens + (held.num_tokens if held else 0):,}", refresh=False)
    if bar is not None:
        bar.close()
    splitter.finish()
    train.finish()
    if held is not None:
        held.finish()
    skipped.update(counts.skipped)
    stats = {
        "records_read": counts.records,
        "documents_kept": train.num_documents + (held.num_documents if held else 0),
        "skipped": {r: int(skipped.get(r, 0)) for r in SKIP_REASONS},
        "truncated": truncated,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if train.num_documents == 0:
        detail = ", ".join(f"{k}: {v}" for k, v in stats["skipped"].items() if v) or "no records found"
        raise PrepareError(f"no valid documents in {inputs} ({counts.records} records read; skipped {detail})")
    if held is not None and held.num_documents == 0:
        raise PrepareError("the held-out split is empty (too few documents for --heldout-fraction); use --heldout-docs")
    return _commit(out, staging, train, held, tok, tok_hash, dtype, bos_id, key, options, inputs, stats)


def _commit(out: str, staging: str, train: ShardWriter, held: ShardWriter | None, tok: Any, tok_hash: str,
            dtype: np.dtype, bos_id: int | None, key: str, options: dict, inputs: list[str], stats: dict) -> dict:
    """Replace the old prepared data by the staged shards; the manifests are written last."""
    held_dir = os.path.join(out, HELDOUT_DIR)
    _verify_written(staging, _manifest(train, tok, tok_hash, dtype, "train", bos_id))
    if held is not None:
        _verify_written(os.path.join(staging, HELDOUT_DIR), _manifest(held, tok, tok_hash, dtype, "heldout", bos_id))
    _clear_prepared(out)
    _clear_prepared(held_dir)
    _move_shards(staging, out)
    manifest = _manifest(train, tok, tok_hash, dtype, "train", bos_id)
    manifest.update(inputs=inputs, options=options, prepare_key=key, stats=stats, heldout=None)
    if held is not None:
        _move_shards(os.path.join(staging, HELDOUT_DIR), held_dir)
        held_manifest = _manifest(held, tok, tok_hash, dtype, "heldout", bos_id)
        held_manifest.update(inputs=inputs, options=options, prepare_key=key)
        write_json_atomic(os.path.join(held_dir, MANIFEST), held_manifest)
        manifest["heldout"] = {"path": HELDOUT_DIR, "num_documents": held.num_documents, "num_tokens": held.num_tokens}
    elif os.path.isdir(held_dir) and not os.listdir(held_dir):
        os.rmdir(held_dir)
    write_json_atomic(os.path.join(out, MANIFEST), manifest)
    return manifest


def _verify_written(folder: str, manifest: dict) -> None:
    """Read the staged shards back and check them against the checksums computed while writing: the one full
    verification of the data (training starts check sizes only; `cpt verify DIR` re-checks on demand)."""
    problems = TokenShards(folder, manifest).verify()
    if problems:
        raise PrepareError(f"the shards just written do not read back correctly ({'; '.join(problems)}): check the disk")


def _progress_bar(enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(unit=" docs", desc="cpt prepare", dynamic_ncols=True, mininterval=0.5)


def format_summary(manifest: dict, out: str) -> str:
    """A human summary of a prepare run: counts, skips by reason, shards, held-out, throughput."""
    st = manifest.get("stats", {})
    lines = []
    if manifest.get("up_to_date"):
        lines.append(f"{out}: up to date (same inputs, tokenizer and options); nothing to do")
    lines += [
        f"prepared {out}",
        f"  tokenizer   {manifest['tokenizer']['name']} ({manifest['tokenizer']['hash']}), dtype {manifest['dtype']}",
        f"  records     {st.get('records_read', 0):,} read, {st.get('documents_kept', 0):,} documents kept",
        f"  train       {manifest['num_documents']:,} documents, {manifest['num_tokens']:,} tokens in {len(manifest['shards'])} shard(s)",
    ]
    if manifest.get("heldout"):
        h = manifest["heldout"]
        lines.append(f"  heldout     {h['num_documents']:,} documents, {h['num_tokens']:,} tokens in {out}/{h['path']}")
    skipped = {k: v for k, v in st.get("skipped", {}).items() if v}
    lines.append("  skipped     " + (", ".join(f"{k} {v:,}" for k, v in skipped.items()) if skipped else "none"))
    if st.get("truncated"):
        lines.append(f"  truncated   {st['truncated']:,} documents longer than max_doc_tokens")
    secs = st.get("seconds")
    if secs and not manifest.get("up_to_date"):
        total = manifest["num_tokens"] + (manifest["heldout"]["num_tokens"] if manifest.get("heldout") else 0)
        lines.append(f"  time        {secs:.1f} s, {total / max(secs, 1e-9):,.0f} tokens/s")
    return "\n".join(lines)


__all__ = ["prepare", "PrepareError", "format_summary", "iter_documents", "resolve_files", "Encoder", "ShardWriter",
           "HeldoutSplitter", "SKIP_REASONS", "HELDOUT_DIR"]
