"""`cpt prepare`: raw text -> token shards + manifest.json (see :mod:`cpt.data.shards` for the format).

The job, step by step: read the documents (:mod:`cpt.data.readers`: jsonl, parquet, text files, folders, fsspec
URLs, `datasets`), tokenize them (:mod:`cpt.data.encode`), route each to train or held-out
(:mod:`cpt.data.heldout_split`) and write them to shard files (:class:`cpt.data.shard_writer.ShardWriter`). This module holds what ties these
together: the options (:class:`PrepareOptions`), the idempotency key, staging, verification and the commit.

Every document is tokenized without special tokens (plus BOS when ``add_bos``: by default where the tokenizer
starts its own encodings with BOS) and followed by EOS.
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

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from cpt.data.encode import EncodeError, Encoder, bos_by_convention, encode_documents
from cpt.data.heldout_split import HeldoutSplitter
from cpt.data.readers import (SKIP_REASONS, ReadCounts, ReadError, input_kind, iter_documents, read_file,
                              resolve_files)
from cpt.data.prepare_key import prepare_key
from cpt.data.prepare_console import ProgressLines, format_summary, progress_bar
from cpt.data.shard_writer import ShardWriter, shard_manifest
from cpt.data.shards import MANIFEST, ShardError, TokenShards, is_remote, write_json_atomic
from cpt.data.tokenizer_identity import backend_tokenizer, dtype_for_vocab, tokenizer_fingerprint, tokenizer_name, vocab_size
from cpt.redaction import URL_CREDENTIALS_HINT, url_credentials

logger = logging.getLogger("cpt.data")

DEFAULT_SHARD_TOKENS = 100_000_000
HELDOUT_DIR = "heldout"
PREPARE_LOCK = "prepare.lock"
# a file (or its folder) named like a `datasets` evaluation split: data/test-00000-of-00001.parquet, validation/x.jsonl
EVAL_SPLIT_NAME = re.compile(r"(?:^|[-._ 0-9/])(test|testing|eval|evaluation|validation|valid|val|dev)(?:[-._ 0-9/]|$)",
                             re.IGNORECASE)


class PrepareError(ValueError):
    """A user-facing problem with the inputs or options of `cpt prepare` (printed without a traceback)."""


# the options that decide what the shards hold: written to the manifest and hashed into its prepare_key, in this order
IDENTITY_OPTIONS = ("text_field", "shard_tokens", "heldout_docs", "heldout_fraction", "seed", "max_doc_tokens",
                    "long_docs", "add_bos", "glob", "hf", "dataset_name", "split", "data_files", "special_tokens_as_text")


@dataclass(frozen=True)
class PrepareOptions:
    """Everything `cpt prepare` is told besides its inputs, tokenizer and output folder (its CLI flags; the keyword
    arguments of :func:`prepare`). Those in :data:`IDENTITY_OPTIONS` decide the shards' content; the others only
    how the job runs (same shards whatever their values)."""

    text_field: str = "text"  # JSON/parquet/dataset field holding the text
    shard_tokens: int = DEFAULT_SHARD_TOKENS  # tokens per shard file
    heldout_docs: int | None = None  # hold out this many documents into <out>/heldout ...
    heldout_fraction: float | None = None  # ... or this fraction of them
    seed: int = 0  # of the held-out selection
    max_doc_tokens: int | None = None  # longer documents are truncated, or skipped with long_docs="skip"
    long_docs: str = "truncate"
    add_bos: bool | None = None  # BOS before each document; None: where the tokenizer adds it itself (EOS always follows)
    special_tokens_as_text: bool = False  # '<|endoftext|>' in a document: plain text, not the special token
    glob: str | None = None  # only files matching this pattern when an input is a folder
    hf: bool = False  # inputs are datasets.load_dataset paths, with the next three and `streaming`
    dataset_name: str | None = None
    split: str = "train"
    data_files: Any = None
    streaming: bool = False
    num_proc: int = 1  # tokenizer processes; 1 uses the tokenizer's own threads
    batch_docs: int = 1024  # documents ...
    batch_chars: int = 1 << 20  # ... and characters per encoded batch
    force: bool = False  # re-tokenize even when the output is up to date
    progress: bool = False  # a tqdm progress bar
    progress_every_s: float | None = None  # else a plain line (stderr) every this many seconds: batch jobs' logs

    def identity(self) -> dict:  # (special_tokens_as_text only when set: the keys of earlier runs stay valid)
        return {name: getattr(self, name) for name in IDENTITY_OPTIONS
                if name != "special_tokens_as_text" or self.special_tokens_as_text}

    @property
    def wants_heldout(self) -> bool:
        return self.heldout_docs is not None or self.heldout_fraction is not None

    def check(self) -> None:
        """A :class:`PrepareError` naming the first bad value."""
        if self.shard_tokens <= 0:
            raise PrepareError(f"shard_tokens must be positive (got {self.shard_tokens})")
        if self.heldout_docs is not None and self.heldout_fraction is not None:
            raise PrepareError("give either heldout_docs or heldout_fraction, not both")
        if self.heldout_docs is not None and self.heldout_docs <= 0:
            raise PrepareError(f"heldout_docs must be positive (got {self.heldout_docs})")
        if self.heldout_fraction is not None and not 0 < self.heldout_fraction < 1:
            raise PrepareError(f"heldout_fraction must be in (0, 1) (got {self.heldout_fraction})")
        if self.num_proc < 1:
            raise PrepareError(f"num_proc must be >= 1 (got {self.num_proc})")
        if self.max_doc_tokens is not None and self.max_doc_tokens <= 0:
            raise PrepareError(f"max_doc_tokens must be positive (got {self.max_doc_tokens})")
        if self.long_docs not in ("truncate", "skip"):
            raise PrepareError(f"long_docs must be 'truncate' or 'skip' (got {self.long_docs!r})")


# ================================================================ the whole job


@dataclass
class _Job:
    """One run, as :func:`prepare` resolved it before any work."""

    inputs: list[str]  # as given (recorded in the manifest)
    files: list[str] | None  # what is read: the input files, the output folder's own files left out (None with hf)
    out: str
    options: PrepareOptions
    tok: Any  # the loaded fast tokenizer
    tok_hash: str
    dtype: np.dtype
    bos_id: int | None
    key: str  # prepare_key: inputs, tokenizer and identity options

    def manifest(self, writer: ShardWriter, split: str) -> dict:
        return shard_manifest(writer, self.tok, self.tok_hash, split, self.bos_id)


def prepare(inputs: str | list[str], tokenizer: Any, out: str | os.PathLike, options: PrepareOptions | None = None, *,
            echo: Callable[[str], Any] | None = None, **option_values: Any) -> dict:
    """Tokenize ``inputs`` into token shards under ``out``; return the manifest (see the module docstring).

    ``options`` and/or keyword arguments (the fields of :class:`PrepareOptions`, e.g. ``heldout_docs=100``) say how.
    The returned manifest has ``stats`` (records read, documents kept, skipped by reason,
    truncated, seconds) and, when a held-out split was asked for, ``heldout`` (its folder and counts).
    ``tokenizer`` is a transformers fast tokenizer or a hub id / local folder to load one from.
    ``echo``, when given, receives the printed summary (:func:`format_summary`).
    Raises :class:`PrepareError` for user mistakes (missing inputs, no valid documents, bad options).
    """
    opts = dataclasses.replace(options or PrepareOptions(), **option_values)
    out = str(out)
    try:
        result = _prepare(inputs, tokenizer, out, opts)
    except (ReadError, EncodeError) as e:  # an unreadable input, a dead worker: one line as every other mistake
        raise PrepareError(str(e)) from None
    if echo is not None:
        echo(format_summary(result, out))
    return result


def _prepare(inputs: str | list[str], tokenizer: Any, out: str, opts: PrepareOptions) -> dict:
    inputs = [str(inputs)] if isinstance(inputs, (str, os.PathLike)) else [str(i) for i in inputs]
    if not inputs:
        raise PrepareError("no inputs given")
    if secret := next((w for w in map(url_credentials, inputs) if w), None):
        raise PrepareError(f"an input URL with {secret} would be recorded in manifest.json and logs; {URL_CREDENTIALS_HINT}")
    opts.check()
    if is_remote(out):
        raise PrepareError(f"--out must be a local folder (got {out}); upload the prepared folder afterwards")
    if os.path.exists(out) and not os.path.isdir(out):
        raise PrepareError(f"--out {out} is a file, not a folder")
    tok = _load_tokenizer(tokenizer)
    if getattr(tok, "eos_token_id", None) is None:
        raise PrepareError(f"tokenizer {tokenizer_name(tok)!r} has no EOS token; documents must be separated by EOS")
    if opts.add_bos is None:  # the tokenizer's own convention (Llama 3, Gemma, Mistral: BOS before each document)
        conventional = bos_by_convention(tok)
        opts = dataclasses.replace(opts, add_bos=conventional is not None)
        if conventional is not None:
            logger.info("BOS %r (id %d) before each document, as the tokenizer starts every encoding with it (--no-add-bos "
                        "to leave it out)", tok.bos_token, conventional)
    bos_id = getattr(tok, "bos_token_id", None) if opts.add_bos else None
    if opts.add_bos and bos_id is None:
        raise PrepareError(f"--add-bos: tokenizer {tokenizer_name(tok)!r} has no BOS token")
    if opts.add_bos and bos_id == tok.eos_token_id:  # GPT-2, GPT-NeoX/Pythia: <|endoftext|> is both
        raise PrepareError(f"--add-bos: tokenizer {tokenizer_name(tok)!r} has one token for BOS and EOS (id {bos_id}): "
                           "the EOS after each document already starts the next one; leave --add-bos out (with it "
                           "every document boundary held two, and document masking split the second off alone)")
    tok_hash = tokenizer_fingerprint(tok)
    files = None if opts.hf else _input_files(inputs, opts.glob, out)
    key = prepare_key(inputs, files, tok_hash, opts.identity())
    with _prepare_lock(out):  # one job per output folder: two commits at once mixed their shards under one manifest
        if not opts.force and (existing := _is_up_to_date(out, key, int(tok.eos_token_id), bos_id)) is not None:
            return {**existing, "up_to_date": True}
        job = _Job(inputs, files, out, opts, tok, tok_hash, dtype_for_vocab(vocab_size(tok)), bos_id, key)
        _remove_stale_staging(out)
        staging = os.path.join(out, f".staging-{os.getpid()}-{uuid.uuid4().hex[:8]}-{socket.gethostname()}")
        try:
            return _run(job, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _prepare_lock(out: str):
    """``<out>/prepare.lock`` (:class:`cpt.runlock.RunLock`) held for the whole job: a second `cpt prepare` into the
    same folder refuses in one line while the first runs (a killed one's lock on this host is taken over)."""
    from cpt.runlock import RunLock, RunLockError

    lock = RunLock(out, lock_file=PREPARE_LOCK, if_busy=f"Wait for it or use another --out; if that job is gone (e.g. "
                   f"on another host of a shared filesystem), delete {os.path.join(out, PREPARE_LOCK)}",
                   holder="`cpt prepare`")
    try:
        lock.acquire()  # (creates the folder)
    except RunLockError as e:
        raise PrepareError(str(e)) from None
    try:
        yield
    finally:
        lock.release()


def _run(job: _Job, staging: str) -> dict:
    """Read, encode, split and write into ``staging``; then :func:`_commit`."""
    opts = job.options
    t0 = time.perf_counter()
    counts = ReadCounts()
    train = ShardWriter(staging, job.dtype, opts.shard_tokens)
    held = ShardWriter(os.path.join(staging, HELDOUT_DIR), job.dtype, opts.shard_tokens) if opts.wants_heldout else None
    splitter = HeldoutSplitter(train, held, opts.seed, opts.heldout_docs, opts.heldout_fraction)
    encoder = Encoder(backend_tokenizer(job.tok), int(job.tok.eos_token_id), job.bos_id, job.dtype, opts.max_doc_tokens,
                      opts.long_docs, opts.special_tokens_as_text)
    if job.files is None:  # --hf: datasets specs
        docs = iter_documents(job.inputs, opts.text_field, counts, hf=True, dataset_name=opts.dataset_name,
                              split=opts.split, data_files=opts.data_files, streaming=opts.streaming)
    else:
        docs = (doc for path in job.files for doc in read_file(path, opts.text_field, counts))
    skipped: Counter = Counter()
    truncated = special = 0
    bar = progress_bar(opts.progress) or (ProgressLines(opts.progress_every_s) if opts.progress_every_s is not None else None)
    with encode_documents(docs, encoder, opts.num_proc, opts.batch_docs, opts.batch_chars) as encoded:
        for enc in encoded:
            skipped.update(enc.skipped)
            truncated += enc.truncated
            special += enc.special
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
        "special_token_text": special,  # documents holding a special token's text, encoded as that token
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if train.num_documents == 0 and held is not None and held.num_documents > 0:
        asked = f"--heldout-docs {opts.heldout_docs}" if opts.heldout_docs is not None else f"--heldout-fraction {opts.heldout_fraction}"
        raise PrepareError(f"{asked} took all {held.num_documents} documents of {job.inputs} into the held-out split, "
                           "leaving none to train on: hold out fewer")
    if train.num_documents == 0:
        detail = ", ".join(f"{k}: {v}" for k, v in stats["skipped"].items() if v) or "no records found"
        hint = (f"; the records have the fields {counts.fields_seen}: name the text one with --text-field"
                if counts.fields_seen and stats["skipped"]["missing_field"] else "")
        raise PrepareError(f"no valid documents in {job.inputs} ({counts.records} records read; skipped {detail}){hint}")
    if held is not None and held.num_documents == 0:
        raise PrepareError("the held-out split is empty (too few documents for --heldout-fraction); use --heldout-docs")
    return _commit(job, staging, train, held, stats)


def _commit(job: _Job, staging: str, train: ShardWriter, held: ShardWriter | None, stats: dict) -> dict:
    """Replace the old prepared data by the staged shards; the manifests are written last."""
    held_dir = os.path.join(job.out, HELDOUT_DIR)
    _verify_written(staging, job.manifest(train, "train"))
    if held is not None:
        _verify_written(os.path.join(staging, HELDOUT_DIR), job.manifest(held, "heldout"))
    _clear_prepared(job.out)
    _clear_prepared(held_dir)
    _move_shards(staging, job.out)
    manifest = job.manifest(train, "train")
    manifest.update(inputs=job.inputs, options=job.options.identity(), prepare_key=job.key, stats=stats, heldout=None)
    if held is not None:
        _move_shards(os.path.join(staging, HELDOUT_DIR), held_dir)
        held_manifest = job.manifest(held, "heldout")
        held_manifest.update(inputs=job.inputs, options=job.options.identity(), prepare_key=job.key)
        write_json_atomic(os.path.join(held_dir, MANIFEST), held_manifest)
        manifest["heldout"] = {"path": HELDOUT_DIR, "num_documents": held.num_documents, "num_tokens": held.num_tokens}
    elif os.path.isdir(held_dir) and not os.listdir(held_dir):
        os.rmdir(held_dir)
    write_json_atomic(os.path.join(job.out, MANIFEST), manifest)
    return manifest


# ---------------------------------------------------------------- helpers of the job


def _load_tokenizer(tokenizer: Any) -> Any:
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    name = os.path.expanduser(str(tokenizer))
    if name.startswith((os.sep, "./", "../")) and not os.path.exists(name):  # a path, not a hub id: say so
        raise PrepareError(f"tokenizer folder not found: {tokenizer} (--tokenizer takes a local folder or a hub id)")
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except Exception as e:  # OSError for missing folders / offline hub, ValueError for bad files
        said = " ".join(str(e).split())
        if "trust_remote_code=True" in said:  # (transformers' advice names an argument cpt prepare does not have)
            said = "it names code of its own (auto_map), which cpt prepare does not run"
        raise PrepareError(f"cannot load tokenizer {str(tokenizer)!r}: {said}") from None  # one line
    if not getattr(tok, "is_fast", False):
        raise PrepareError(f"tokenizer {str(tokenizer)!r} has no fast (Rust) version; cpt prepare needs one")
    return tok


def _input_files(inputs: list[str], glob: str | None, out: str) -> list[str]:
    """The files to read, each once; files inside ``out`` (an output folder inside an input folder:
    `cpt prepare data/ --out data/tokens`) are left out: re-read, its shards and manifests were bogus skipped records
    and made every re-run look changed."""
    out_real = os.path.realpath(out) + os.sep
    files = resolve_files(inputs, glob, out=out)
    kept = [f for f in files if is_remote(f) or not os.path.realpath(f).startswith(out_real)]
    if not kept:
        raise PrepareError(f"no input files outside the output folder {out} in {inputs}")
    texts = [f for f in kept if input_kind(f) == "text"]
    if texts and len(texts) < len(kept):  # e.g. a downloaded dataset folder's README.md and LICENSE beside its jsonl
        logger.warning("%d plain-text file(s) among the jsonl/parquet inputs are read as one document each: %s; "
                       "--glob (e.g. '*.jsonl*') reads only the others", len(texts),
                       ", ".join(texts[:5]) + (" ..." if len(texts) > 5 else ""))
    for table in (i for i in inputs if i.lower().endswith((".csv", ".tsv"))):  # (named; a .csv in a code folder is text)
        logger.warning("%s is read as plain text, one document; for one document per row: --hf %s --text-field COLUMN "
                       "for a .csv, jsonl or parquet for a .tsv", table, table)
    records = [f for f in kept if input_kind(f) != "text"]  # (not code: test_x.py is no evaluation split)
    evals = [f for f in records if EVAL_SPLIT_NAME.search("/".join(f.replace(os.sep, "/").split("/")[-2:]))]
    if evals and len(evals) < len(records):  # a dataset folder with its test/validation files: they would be trained on
        logger.warning("%d input file(s) are named like an evaluation split and are read as training data: %s; --glob "
                       "(e.g. '*train*') or --hf --split train reads the train split only", len(evals),
                       ", ".join(evals[:5]) + (" ..." if len(evals) > 5 else ""))
    return kept


def _is_up_to_date(out: str, key: str, eos_id: int, bos_id: int | None) -> dict | None:
    """The manifest of ``out`` when it was prepared by the same job (``key``) with the same EOS and BOS (the vocabulary
    hash in the key does not say which tokens they are: a base and an instruct tokenizer share one vocabulary), else
    None. (``bos_id``: the id put before each document, None without --add-bos.)"""
    try:
        shards = TokenShards.open(out, verify=False)
        if shards.manifest.get("prepare_key") != key or shards.eos_token_id != eos_id:
            return None
        if (shards.manifest.get("tokenizer") or {}).get("bos_token_id") != bos_id:
            return None
        if shards.manifest.get("heldout"):
            TokenShards.open(os.path.join(out, HELDOUT_DIR), verify=False)
        return shards.manifest
    except ShardError:
        return None


def _remove_stale_staging(out: str) -> None:
    """Remove the staging folders of killed runs on this host (a PID of another host says nothing here: that run, on a
    shared filesystem, lost its staging folder mid-write and failed)."""
    for name in os.listdir(out):
        if name.startswith(".staging-"):
            _, pid, *rest = name.split("-", 3)
            host = rest[1] if len(rest) == 2 else socket.gethostname()  # (older names: no host)
            if pid.isdigit() and int(pid) != os.getpid() and host == socket.gethostname() and not _pid_alive(int(pid)):
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def _verify_written(folder: str, manifest: dict) -> None:
    """Read the staged shards back and check them against the checksums computed while writing: the one full
    verification of the data (training starts check sizes only; `cpt verify DIR` re-checks on demand)."""
    problems = TokenShards(folder, manifest).verify()
    if problems:
        raise PrepareError(f"the shards just written do not read back correctly ({'; '.join(problems)}): check the disk")


__all__ = ["prepare", "PrepareOptions", "PrepareError", "format_summary", "HeldoutSplitter", "IDENTITY_OPTIONS",
           "HELDOUT_DIR", "DEFAULT_SHARD_TOKENS"]
