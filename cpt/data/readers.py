"""Reading raw text: the one implementation behind `cpt prepare`, vocabulary learning (``model.vocab.learn_from``)
and `cpt eval`'s text held-out files.

Inputs, read in the order given (folders recursively, symlinked folders too, sorted by path; dot-files,
``__pycache__`` and folders `cpt prepare` wrote skipped; a file named twice, or by two links, is read once: which
files, :mod:`cpt.data.input_files`):

- jsonl (``.jsonl``/``.json``/``.ndjson``, plain or ``.gz``/``.zst``/``.bz2``/``.xz``): one JSON object per line,
  the text in ``text_field``; a ``.json`` file that starts with ``[`` is one JSON array of such objects (read whole);
- parquet: the ``text_field`` column;
- arrow (``.arrow``, the files `datasets` writes: Arrow IPC stream or file format): the ``text_field`` column; a folder
  written by ``Dataset.save_to_disk`` is read as its arrow files (a ``DatasetDict``'s folder: name one split's folder);
- any other file: plain text, one document per file (bytes decoded as UTF-8, line ends kept as written);
- a UTF-8 byte-order mark at the start of a file is dropped;
- with ``hf=True`` each input is a ``datasets.load_dataset`` path (hub id, local folder or builder name such
  as ``json``), with ``dataset_name``/``split``/``data_files``/``streaming``; a ``save_to_disk`` folder is loaded with
  ``datasets.load_from_disk`` (``split`` picks a ``DatasetDict``'s split).

Local paths and fsspec URLs (s3://, gs://, hf://, http(s)://) both work.

Records that cannot be used are skipped and counted by reason in a :class:`ReadCounts` (``malformed_json``,
``non_utf8``, ``missing_field``, ``not_text``, ``empty``; the encoder adds ``too_long``). An input that cannot be
read at all (missing, a broken parquet or compressed stream, a dataset that does not load) is one
:class:`ReadError` line.
"""

from __future__ import annotations

import json
import logging
import lzma
import os
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from cpt.data.compressed import open_binary
from cpt.data.input_files import ReadError, prepared_folder, resolve_files, saved_dataset_files  # (re-exported)

logger = logging.getLogger("cpt.data")

SKIP_REASONS = ("malformed_json", "non_utf8", "missing_field", "not_text", "empty", "too_long")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSION_SUFFIXES = (".gz", ".zst", ".zstd", ".bz2", ".xz")
LARGE_TEXT_DOCUMENT = 64 << 20  # bytes: a plain-text file larger than this is warned about (one document: memory)
BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark, dropped from the start of a file


@dataclass
class ReadCounts:
    """What the readers saw: records read and records skipped by reason."""

    records: int = 0
    skipped: Counter = field(default_factory=Counter)
    fields_seen: list[str] | None = None  # the fields of the first record without the text field (for the error hint)

    def skip(self, reason: str, n: int = 1) -> None:
        self.records += n
        self.skipped[reason] += n

    def describe_skips(self) -> str:
        """``malformed_json 2, non_utf8 1`` (reasons in :data:`SKIP_REASONS` order), or ``none``."""
        return ", ".join(f"{r} {self.skipped[r]:,}" for r in SKIP_REASONS if self.skipped.get(r)) or "none"


# ---------------------------------------------------------------- which kind of file (which files: input_files.py)


def _strip_compression(name: str) -> str:
    lower = name.lower()
    for suf in COMPRESSION_SUFFIXES:
        if lower.endswith(suf):
            return lower[: -len(suf)]
    return lower


def input_kind(path: str) -> str:
    """``jsonl``, ``parquet``, ``arrow`` or ``text``, from the file name (compression suffixes looked through)."""
    base = _strip_compression(path)
    if base.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if base.endswith(".parquet"):
        return "parquet"
    if base.endswith(".arrow"):
        return "arrow"
    return "text"


# ---------------------------------------------------------------- one file


def _field_text(record: Any, text_field: str, counts: ReadCounts) -> str | None:
    """The usable text of one record, or None (after counting why it was skipped)."""
    if not isinstance(record, dict):
        counts.skip("malformed_json")
        return None
    value = record.get(text_field)
    if value is None:
        if counts.fields_seen is None and text_field not in record:
            counts.fields_seen = sorted(map(str, record))[:20]
        counts.skip("missing_field")
        return None
    if isinstance(value, _NotUTF8):
        counts.skip("non_utf8")
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


def _read_jsonl(path: str, text_field: str, counts: ReadCounts) -> Iterator[str]:
    first = True
    with open_binary(path) as f:
        for raw in f:
            if first:
                raw = raw.removeprefix(BOM)  # a UTF-8 byte-order mark (Windows tools) is not part of the first record
            if not raw.strip():
                continue  # blank separator lines are not records
            if first and raw.lstrip().startswith(b"[") and _strip_compression(path).endswith(".json"):
                yield from _read_json_array(path, raw + f.read(), text_field, counts)
                return
            first = False
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


def _read_json_array(path: str, data: bytes, text_field: str, counts: ReadCounts) -> Iterator[str]:
    """A ``.json`` file holding one JSON array of records (``[{"text": ...}, ...]``, as `datasets` also reads it)."""
    try:
        records = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReadError(f"{path}: starts with '[' but is not a valid JSON array of records ({e})") from None
    if not isinstance(records, list):
        raise ReadError(f"{path}: starts with '[' but is not a JSON array of records")
    for record in records:
        text = _field_text(record, text_field, counts)
        if text is not None:
            yield text


def _read_parquet(path: str, text_field: str, counts: ReadCounts) -> Iterator[str]:
    import pyarrow.parquet as pq

    with open_binary(path) as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises ArrowInvalid and friends for broken files
            raise ReadError(f"{path}: not a readable parquet file ({e})") from None
        if text_field not in pf.schema_arrow.names:
            logger.warning("%s: no column %r (columns: %s); all rows skipped", path, text_field, pf.schema_arrow.names)
            counts.skip("missing_field", pf.metadata.num_rows)
            counts.fields_seen = counts.fields_seen or list(pf.schema_arrow.names)[:20]
            return
        for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
            yield from _column_texts(batch.column(0), text_field, counts)


def _column_texts(column: Any, text_field: str, counts: ReadCounts) -> Iterator[str]:
    """The usable texts of an Arrow column. Strings are decoded here: pyarrow does not check that a string column
    written by another tool (Spark, say) holds UTF-8, and its to_pylist raised UnicodeDecodeError for the whole file."""
    import pyarrow as pa

    try:
        values: Iterable[Any] = column.to_pylist()
    except UnicodeDecodeError:  # (a string column: the values decoded one by one)
        values = (_utf8(v) for v in column.cast(pa.large_binary()).to_pylist())
    for value in values:
        text = _field_text({text_field: value}, text_field, counts)
        if text is not None:
            yield text


class _NotUTF8:
    """A string value that is not UTF-8 (counted as non_utf8 by _field_text)."""


def _utf8(raw: bytes | None) -> str | None | _NotUTF8:
    try:
        return None if raw is None else raw.decode("utf-8")
    except UnicodeDecodeError:
        return _NotUTF8()


def _read_arrow(path: str, text_field: str, counts: ReadCounts) -> Iterator[str]:
    """An Arrow IPC file: the stream format `datasets` writes (its cache and save_to_disk files), or the file format."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    with open_binary(path) as f:
        try:
            reader = ipc.open_stream(f)
        except pa.ArrowInvalid:
            f.seek(0)
            try:
                reader = ipc.open_file(f)
            except pa.ArrowInvalid as e:
                raise ReadError(f"{path}: not a readable Arrow IPC file ({e})") from None
        names = reader.schema.names
        missing = text_field not in names  # (as for parquet: its rows skipped and counted, the run goes on)
        if missing:
            logger.warning("%s: no column %r (columns: %s); all rows skipped", path, text_field, names)
            counts.fields_seen = counts.fields_seen or list(names)[:20]
        batches = iter(reader) if hasattr(reader, "__iter__") else (reader.get_batch(i) for i in range(reader.num_record_batches))
        try:
            for batch in batches:
                if missing:
                    counts.skip("missing_field", batch.num_rows)
                else:
                    yield from _column_texts(batch.column(names.index(text_field)), text_field, counts)
        except pa.ArrowInvalid as e:  # a cut or damaged file
            raise ReadError(f"{path}: not a readable Arrow IPC file ({e})") from None


def _read_text(path: str, counts: ReadCounts) -> Iterator[str]:
    with open_binary(path) as f:
        data = f.read()
    if len(data) > LARGE_TEXT_DOCUMENT:
        logger.warning("%s: a plain-text file is one document, and this one has %.0f MB: tokenizing it takes about "
                       "0.13 GB of memory per MB (byte-level BPE); if it holds many documents, write them as jsonl, one "
                       "per line", path, len(data) / 1e6)
    try:
        text = data.removeprefix(BOM).decode("utf-8")
    except UnicodeDecodeError:
        counts.skip("non_utf8")
        return
    if not text.strip():
        counts.skip("empty")
        return
    counts.records += 1
    yield text


def read_file(path: str, text_field: str, counts: ReadCounts) -> Iterator[str]:
    """The usable documents of one file (its kind from :func:`input_kind`); skipped records counted in ``counts``."""
    path = str(path)
    kind = input_kind(path)
    try:
        if kind == "jsonl":
            yield from _read_jsonl(path, text_field, counts)
        elif kind == "parquet":
            yield from _read_parquet(path, text_field, counts)
        elif kind == "arrow":
            yield from _read_arrow(path, text_field, counts)
        else:
            yield from _read_text(path, counts)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:  # corrupt or cut gzip/bz2/xz/zstd streams (zlib.error:
        # damage inside a gzip stream's deflate blocks, "invalid block type"), unreadable files
        raise ReadError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def error_line(e: BaseException) -> str:
    """An exception and its cause on one line (datasets wraps the parser's error: "An error occurred while generating
    the dataset")."""
    text = f"{type(e).__name__}: {e}"
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause) not in text:
        text += f" ({type(cause).__name__}: {cause})"
    return " ".join(text.split())


def load_hf_dataset(path: str, name: str | None, split: str, data_files: Any, streaming: bool, revision: str | None = None) -> Any:
    """``datasets.load_dataset(path, ...)``, or ``datasets.load_from_disk(path)[split]`` for a folder written by
    ``save_to_disk`` (which load_dataset refuses: 'use load_from_disk instead'); a local jsonl/parquet/arrow file is
    loaded with its builder (load_dataset said "Couldn't find any data file" of a file that is there)."""
    import datasets

    if os.path.isfile(path) and data_files is None:
        builder = "csv" if path.lower().endswith(".csv") else {"jsonl": "json", "parquet": "parquet",
                                                                "arrow": "arrow"}.get(input_kind(path))
        if builder is None:
            raise ValueError(f"{path} is a plain-text file: `cpt prepare` it (one document per file), or load it with "
                             "path: text and data_files (one document per line)")
        return datasets.load_dataset(builder, data_files=path, split=split, streaming=streaming)

    if os.path.isdir(path) and prepared_folder(path):  # (datasets would read manifest.json as data: a CastError)
        raise ValueError(f"{path} holds token shards written by `cpt prepare` (manifest.json), not a `datasets` "
                         "dataset: read it as a source of `type: shards`")
    if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n in ("state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{path} has the splits {list(ds)}, not {split!r}")
            ds = ds[split]
        return ds.to_iterable_dataset() if streaming else ds
    return datasets.load_dataset(path, name=name, split=split, data_files=data_files, streaming=streaming, revision=revision)


def read_hf(spec: str, text_field: str, counts: ReadCounts, dataset_name: str | None = None, split: str = "train",
            data_files: Any = None, streaming: bool = False) -> Iterator[str]:
    """The usable documents of ``datasets.load_dataset(spec, ...)``; skipped records counted in ``counts``."""
    try:
        ds = load_hf_dataset(spec, dataset_name, split, data_files, streaming)
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError...)
        raise ReadError(f"datasets.load_dataset({spec!r}, name={dataset_name!r}, split={split!r}) failed: "
                        f"{error_line(e)}") from None
    columns = getattr(ds, "column_names", None)
    if columns is not None and text_field not in columns:
        raise ReadError(f"dataset {spec!r} has no field {text_field!r} (fields: {columns}); use --text-field")
    batches = iter(ds.iter(batch_size=1000))
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - a streamed dataset fails while read (pyarrow cannot skip a broken record)
            raise ReadError(f"datasets.load_dataset({spec!r}, ...) failed while reading: "
                            f"{error_line(e)}; a `datasets` source cannot skip broken records: read the "
                            "files directly (without --hf), which skips and counts them") from None
        values = batch.get(text_field)
        if values is None:
            n = len(next(iter(batch.values()), []))
            counts.skip("missing_field", n)
            continue
        for value in values:
            text = _field_text({text_field: value}, text_field, counts)
            if text is not None:
                yield text


# ---------------------------------------------------------------- many inputs


def iter_documents(inputs: list[str], text_field: str, counts: ReadCounts, *, hf: bool = False, glob: str | None = None,
                   dataset_name: str | None = None, split: str = "train", data_files: Any = None,
                   streaming: bool = False) -> Iterator[str]:
    """Every usable document of the inputs, in order; skipped records are counted in ``counts``."""
    if hf:
        for spec in inputs:
            yield from read_hf(spec, text_field, counts, dataset_name, split, data_files, streaming)
        return
    for path in resolve_files(inputs, glob):
        yield from read_file(path, text_field, counts)


__all__ = ["ReadError", "ReadCounts", "SKIP_REASONS", "input_kind", "resolve_files", "read_file", "read_hf",
           "load_hf_dataset", "saved_dataset_files", "iter_documents"]
