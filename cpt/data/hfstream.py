"""Source type ``hf``: stream a `datasets` dataset, tokenize on the fly, pack into fixed-length sequences.

For users who do not pre-tokenize. Packing is the same as for prepared shards: documents, each
followed by EOS, are concatenated and cut into ``seq_len`` sequences, in the dataset's order (with
``shuffle_buffer > 0`` a seeded `datasets` shuffle buffer, re-seeded per epoch via ``set_epoch``).

Resume: the state is (epoch, the `datasets` ``IterableDataset.state_dict()`` taken just before the
document holding the next unread token, and how many tokens of that document were already used).
Loading it re-opens the dataset at that document (datasets resumes by shard and example offset)
and re-tokenizes only that one document. With a shuffle buffer, datasets does not restore the
buffer's contents, so the order after a resume differs from an uninterrupted run; use prepared
shards (`cpt prepare`) for exact resume at scale.

The stream is global (it has no rank split): in the mixer every rank reads it whole and keeps its
own rows, so global batches do not depend on the world size.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from collections import Counter, deque
from typing import Any

import numpy as np

from cpt.data.encode import bos_by_convention
from cpt.data.prepare_key import hf_identity, hub_revision, is_hub_dataset
from cpt.data.readers import error_line, load_hf_dataset
from cpt.data.shards import is_remote
from cpt.data.tokenizer_identity import backend_tokenizer, dtype_for_vocab, tokenizer_fingerprint, vocab_size

logger = logging.getLogger("cpt.data")


def _by_relative_name(files: list) -> dict[str, list]:
    """``[path, size, mtime_ns]`` rows keyed by the path under the files' common folder (so a moved copy matches)."""
    paths = [str(f[0]) for f in files]
    if not paths:
        return {}
    root = os.path.dirname(paths[0]) if len(paths) == 1 else os.path.commonpath(paths)
    return {os.path.relpath(p, root): list(f[1:]) for p, f in zip(paths, files)}


def local_files_identity(path: str, data_files: Any) -> list[list]:
    """The local files behind a source (its file or folder, ``data_files``) as ``[path, size, mtime_ns]``, as `cpt
    prepare`'s up-to-date check sees them (:func:`cpt.data.prepare_key.hf_identity`); none for a hub dataset."""
    return hf_identity([], [path] + ([data_files] if isinstance(data_files, str) else list(data_files or [])))


def _offline() -> bool:
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)


class HFSourceError(ValueError):
    """A `datasets` source that cannot be loaded or holds no usable text."""


_REASON_WORDS = {"missing_field": "a missing (or null)", "not_text": "a non-string", "empty": "an empty"}
_NO_FIELD_AFTER = 1000  # records without the text field, none with it, before the first pass is given up


class HFTokenStream:
    """Sequential packed sequences from a `datasets` source; ``next_sequences(n)`` returns the next ``n``."""

    def __init__(self, cfg: Any, tokenizer: Any, seq_len: int, seed: int = 0, batch_docs: int = 64,
                 log_skips: bool = True):
        self.cfg, self.seq_len, self.seed, self.batch_docs = cfg, seq_len, seed, batch_docs
        self.log_skips = log_skips  # warn at the first skipped record of each reason, and at an inexact resume (rank 0)
        self._logged: set[str] = set()
        self._fields: list[str] = []  # a record's fields, when one lacked the text field (said in the error)
        self.name = cfg.name
        self._backend = backend_tokenizer(tokenizer)
        self.eos_id = getattr(tokenizer, "eos_token_id", None)
        if self.eos_id is None:
            raise HFSourceError(f"source {self.name!r}: the tokenizer has no EOS token")
        self.bos_id = _bos_for(cfg, tokenizer, self.eos_id)  # before each document: add_bos, else the tokenizer's way
        self.dtype = dtype_for_vocab(vocab_size(tokenizer))
        self.tokenizer_hash = tokenizer_fingerprint(tokenizer)
        self.files = local_files_identity(cfg.path, cfg.data_files)
        # a hub dataset's commit, as `datasets` resolves it (offline: the cached copy's); loaded at that commit
        pinned = getattr(cfg, "revision", None)
        self.revision = hub_revision(cfg.path, cfg.hf_name, cfg.data_files, pinned)
        if pinned and re.fullmatch(r"[0-9a-f]{40}", pinned) and self.revision not in (None, pinned):
            raise HFSourceError(f"source {self.name!r}: revision {pinned} of {cfg.path!r} was asked for and `datasets` "
                                f"resolves to commit {self.revision} (offline it reads the newest cached copy, whatever "
                                "the revision): load that commit once online, or remove the newer copies from its cache")
        if self.revision is None and log_skips and is_hub_dataset(cfg.path):
            logger.warning("source %r: the commit of the hub dataset %r cannot be resolved: its position is saved "
                           "without it, and a --resume cannot check that it reads the same data", self.name, cfg.path)
        if pinned and self.revision not in (None, pinned) and _offline() and log_skips:  # a branch or tag
            logger.warning("source %r: revision %r of %r cannot be resolved offline: `datasets` reads the newest cached "
                           "copy, commit %s, whatever the revision (pin a commit to have it checked)", self.name,
                           pinned, cfg.path, self.revision)
        self._ds = self._load()
        self.epoch = 0
        self.sequences_read = 0
        self.skipped: Counter = Counter()
        self._reset(epoch=0, ds_state=None, used=0)

    def check_text(self) -> None:
        """Read the first documents, as the first training step does, and start over (`cpt train --dry-run`): a
        source whose first records have no usable text in ``text_field`` (a misspelt field) is one line before the
        run starts, not at its first step."""
        self._fill(self.seq_len)
        self._reset(epoch=0, ds_state=None, used=0)

    # ------------------------------------------------------------ dataset

    def _load(self) -> Any:
        import datasets

        c = self.cfg
        try:
            ds = load_hf_dataset(c.path, c.hf_name, c.split, c.data_files, c.streaming,
                                 self.revision or getattr(c, "revision", None))
        except Exception as e:  # datasets raises many exception types for missing/unreachable data
            raise HFSourceError(f"source {self.name!r}: datasets.load_dataset({c.path!r}) failed: {error_line(e)}") from None
        if not isinstance(ds, datasets.IterableDataset):
            ds = ds.to_iterable_dataset()
        buffer = getattr(c, "shuffle_buffer", 0) or 0
        if buffer > 0:
            ds = ds.shuffle(seed=self.seed, buffer_size=buffer)
        return ds

    def _reset(self, epoch: int, ds_state: dict | None, used: int) -> None:
        """Start reading at the document described by ``ds_state`` (None: the epoch's start), skipping ``used`` tokens."""
        self.epoch = epoch
        self._ds.set_epoch(epoch)
        if ds_state is not None:
            self._ds.load_state_dict(copy.deepcopy(ds_state))
        else:
            self._ds.load_state_dict(self._fresh_state)
        self._it = iter(self._ds)
        self._docs: deque = deque()  # (epoch, ds state before the doc, tokens)
        self._used = 0
        self._available = 0
        self._empty_epoch = True
        if used:
            self._fill(used + 1)
            self._take(used)

    @property
    def _fresh_state(self) -> dict:
        if not hasattr(self, "_initial_state"):
            self._initial_state = copy.deepcopy(self._ds.state_dict())
        return copy.deepcopy(self._initial_state)

    def _pull_docs(self) -> bool:
        """Read and tokenize up to ``batch_docs`` documents; False at the end of the epoch."""
        states, texts = [], []
        field = self.cfg.text_field
        ended = False
        while len(texts) < self.batch_docs:
            state = self._ds.state_dict()
            try:
                example = next(self._it)
            except StopIteration:
                ended = True
                break
            except Exception as e:  # noqa: BLE001 - datasets/pyarrow cannot skip a malformed record: one line, not a traceback
                raise HFSourceError(
                    f"source {self.name!r}: reading {self.cfg.path!r} (data_files {self.cfg.data_files!r}) failed: "
                    f"{error_line(e)}; a `datasets` source cannot skip broken records: fix the file, or "
                    "`cpt prepare` it (which skips and counts them) and train on the shards") from None
            value = example.get(field)
            if value is None:
                self.skipped["missing_field"] += 1
                self._fields = self._fields or sorted(map(str, example))
                if self._empty_epoch and self.epoch == 0 and self.skipped["missing_field"] >= _NO_FIELD_AFTER:
                    self._next_epoch(reason=f"the first {_NO_FIELD_AFTER:,} records have no field {field!r}")
            elif not isinstance(value, str):
                self.skipped["not_text"] += 1
            elif not value.strip():
                self.skipped["empty"] += 1
            else:
                states.append(state)
                texts.append(value)
        self._log_new_skips()
        if texts:
            self._empty_epoch = False
            encode = getattr(self._backend, "encode_batch_fast", None) or self._backend.encode_batch
            for state, enc in zip(states, encode(texts, add_special_tokens=False)):
                tokens = np.array(([] if self.bos_id is None else [self.bos_id]) + enc.ids + [self.eos_id], dtype=self.dtype)
                self._docs.append((self.epoch, state, tokens))
                self._available += len(tokens)
        return bool(texts) or not ended

    def _log_new_skips(self) -> None:
        """Log the first skipped record of each reason (every one is counted in ``skipped``, saved with the state)."""
        for reason in sorted(set(self.skipped) - self._logged):
            self._logged.add(reason)
            if self.log_skips:
                logger.warning("source %r: skipping records of %r with %s text in field %r (each one counted: "
                               "`skipped` in the data state)", self.name, self.cfg.path, _REASON_WORDS.get(reason, reason),
                               self.cfg.text_field)

    def _next_epoch(self, reason: str | None = None) -> None:
        """The next pass over the dataset; an error when a pass (or, ``reason``, its first records) gave no text (a
        misspelt text_field read the whole dataset first: hours for a hub corpus)."""
        if self._empty_epoch:
            fields = f"; its records have the fields {', '.join(self._fields)}" if self._fields else ""
            raise HFSourceError(
                f"source {self.name!r}: no usable text in field {self.cfg.text_field!r} "
                f"({reason or f'{dict(self.skipped)} skipped'}){fields}: set the source's text_field")
        self.epoch += 1
        self._ds.set_epoch(self.epoch)
        self._ds.load_state_dict(self._fresh_state)
        self._it = iter(self._ds)
        self._empty_epoch = True

    def _fill(self, need: int) -> None:
        while self._available - self._used < need:
            if not self._pull_docs():
                self._next_epoch()

    def _take(self, n: int) -> np.ndarray:
        out = np.empty(n, dtype=self.dtype)
        done = 0
        while done < n:
            _, _, tokens = self._docs[0]
            k = min(len(tokens) - self._used, n - done)
            out[done : done + k] = tokens[self._used : self._used + k]
            done += k
            self._used += k
            if self._used == len(tokens):
                self._docs.popleft()
                self._available -= len(tokens)
                self._used = 0
        return out

    # ------------------------------------------------------------ public

    def next_sequences(self, n: int) -> np.ndarray:
        """The next ``n`` packed sequences, ``[n, seq_len]``."""
        self._fill(n * self.seq_len)
        out = self._take(n * self.seq_len).reshape(n, self.seq_len)
        self.sequences_read += n
        return out

    def state_dict(self) -> dict[str, Any]:
        if self._docs:
            epoch, ds_state, _ = self._docs[0]
            return {"epoch": epoch, "ds_state": copy.deepcopy(ds_state), "used": self._used, "sequences_read":
                    self.sequences_read, "skipped": dict(self.skipped), "files": self.files, "revision": self.revision,
                    "bos_token_id": self.bos_id}
        return {"epoch": self.epoch, "ds_state": self._ds.state_dict(), "used": 0, "sequences_read": self.sequences_read,
                "skipped": dict(self.skipped), "files": self.files, "revision": self.revision, "bos_token_id": self.bos_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved document and offset (re-tokenizes at most one batch of documents), refused when the
        local files behind the source changed since the checkpoint (see :meth:`check_same_files`), or a hub dataset's
        commit (:meth:`check_same_revision`)."""
        self.check_same_files(state.get("files"))
        self.check_same_revision(state.get("revision"))
        self._same_document_start(state.get("bos_token_id", "unrecorded"))
        self._reset(int(state["epoch"]), state["ds_state"], int(state["used"]))
        self.sequences_read = int(state["sequences_read"])
        self.skipped = Counter(state.get("skipped", {}))
        buffer = getattr(self.cfg, "shuffle_buffer", 0) or 0
        if buffer and self.log_skips:
            logger.warning("source %r: resuming with shuffle_buffer %d: datasets does not save the buffer, so the order "
                           "from here differs from an uninterrupted run and up to %d documents of this epoch are not "
                           "seen (shuffle_buffer: 0, or prepared shards, resume exactly)", self.name, buffer, buffer)

    def _same_document_start(self, saved) -> None:
        """The saved offset counts the tokens of documents that began with BOS or not: the same here. A checkpoint
        from before BOS was recorded streamed without it, and so does the resumed run (with a warning where this
        one would have added it by default); another explicit ``add_bos`` is refused."""
        if saved == self.bos_id:
            return
        if saved == "unrecorded" and getattr(self.cfg, "add_bos", None) is None:
            if self.bos_id is not None and self.log_skips:
                logger.warning("source %r: the checkpoint's run streamed its documents without BOS (cpt before BOS "
                               "followed the tokenizer); this run continues so (set add_bos: false to say so)", self.name)
            self.bos_id = None
            return
        was = "without BOS" if saved in (None, "unrecorded") else f"with BOS (id {saved})"
        raise ValueError(f"source {self.name!r}: the checkpoint streamed its documents {was} and this run would "
                         f"{'not' if self.bos_id is None else f'put BOS (id {self.bos_id}) before each'}: its position "
                         f"would mean other tokens; set data.sources.{self.name}.add_bos: {str(saved not in (None, 'unrecorded')).lower()}")

    def check_same_files(self, saved: list | None) -> None:
        """The saved position (a `datasets` shard and example offset) means other data when the files changed: other
        files or sizes are refused (ValueError); the same sizes with other modification times (a copy of the data,
        e.g. to a node's local disk) are a warning. ``saved`` None: a checkpoint from before files were recorded."""
        if saved is None:
            return
        before, now = _by_relative_name(saved), _by_relative_name(self.files)
        if {p: v[0] for p, v in before.items()} != {p: v[0] for p, v in now.items()}:
            changed = sorted(p for p in before.keys() | now.keys() if (before.get(p) or [None])[0] != (now.get(p) or [None])[0])
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            raise ValueError(
                f"source {self.name!r}: its files changed since the checkpoint (added, removed or resized: "
                f"{', '.join(changed[:3])}{more}): the saved position would read other data; restore the files the "
                "checkpoint was trained on, or train its weights on the new data as a new stage (train.init_from)")
        if before != now and self.log_skips:
            logger.warning("source %r: files of %r have other modification times than at the checkpoint (same names and "
                           "sizes: a copy?); resuming at the saved position, which reads other data if their content "
                           "changed", self.name, self.cfg.path)

    def check_same_revision(self, saved: str | None) -> None:
        """A hub dataset at another commit than the checkpoint's: its saved position (a `datasets` shard and example
        offset) means other data: refused (ValueError). ``saved`` None: local data, or a checkpoint from before
        revisions were recorded."""
        if saved is None or saved == self.revision:
            return
        if self.revision is None:
            if self.log_skips:
                logger.warning("source %r: the checkpoint read %r at commit %s; its commit now cannot be resolved, so "
                               "resuming unchecked", self.name, self.cfg.path, saved)
            return
        raise ValueError(
            f"source {self.name!r}: the hub dataset {self.cfg.path!r} resolves to commit {self.revision} and the "
            f"checkpoint was trained on commit {saved}: the saved position would read other data; add `revision: "
            f"{saved}` to the source to resume on the checkpoint's, or train its weights on the new data as a new "
            "stage (train.init_from)")

    def fingerprint(self) -> str:
        """What the source reads, for the resume check: a hub or remote dataset by its name; local files not by where
        they lie (:meth:`check_same_files` compares their names under the source's folder and sizes), so a run whose
        data was moved or copied (another cluster's file system) resumes."""
        c = self.cfg
        where = "local" if self.files and not is_hub_dataset(c.path) and not is_remote(c.path) else f"{c.path}:{c.data_files}"
        return f"hf:{where}:{c.hf_name}:{c.split}:{c.text_field}:{self.tokenizer_hash}"

    def path_fingerprint(self) -> str:
        """The fingerprint checkpoints had before local files were identified apart from their path."""
        c = self.cfg
        return f"hf:{c.path}:{c.hf_name}:{c.data_files}:{c.split}:{c.text_field}:{self.tokenizer_hash}"


def _bos_for(cfg: Any, tokenizer: Any, eos_id: int) -> int | None:
    """The BOS id to put before each document of an `hf` source: ``add_bos`` true, false, or None (default) where
    the tokenizer starts its own encodings with BOS (as `cpt prepare` decides)."""
    setting = getattr(cfg, "add_bos", None)
    if setting is None:
        return bos_by_convention(tokenizer)
    if not setting:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or bos == eos_id:
        raise HFSourceError(f"source {cfg.name!r}: add_bos is set, but the tokenizer has "
                            + ("no BOS token" if bos is None else f"one token for BOS and EOS (id {bos})"))
    return int(bos)
