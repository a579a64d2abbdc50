"""What the training loop calls: this rank's rows of every global batch, resume state and data metrics.

Global batch ``step`` (the same for any world size):

1. the :class:`~cpt.data.mixer.Mixer` gives the rows of each source (exact shares, error-carrying);
2. source ``j`` contributes the next ``n_j`` positions of its stream (positions are global counters:
   shard sources map them to sequences through their per-epoch permutation, ``hf`` sources read
   them in order);
3. the rows are interleaved by a permutation seeded with ``(seed, step)``, so every rank and
   micro-batch sees the mix, and rank ``r`` of ``W`` takes rows ``[r*B/W, (r+1)*B/W)``.

Shard sources only read this rank's rows; ``hf`` sources are read whole by every rank.

Start-up cost does not grow with the corpus: every rank reads the manifests (and compares the tokenizer
hash); rank 0 alone also checks every shard file's size; no rank reads shard bytes before the first
batch. ``data.verify_checksums: true`` also checks every file's checksum (a full read, shared by the ranks).
The state (step, mixer errors and row counts, per-source positions, ``hf`` dataset states) is a
few numbers: ``load_state_dict`` is O(1) and independent of the world size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from cpt.data import remote
from cpt.data.hfstream import HFTokenStream
from cpt.data.mixer import Mixer, MixPlan
from cpt.data.shards import ShardError, TokenShards
from cpt.data.tokenizer_identity import run_tokenizer_name, tokenizer_fingerprint, vocab_size
from cpt.data.stream import PackedStream

logger = logging.getLogger("cpt.data")

STATE_VERSION = 1


class RepeatedDataWarning(UserWarning):
    """A source has been repeated more epochs than ``data.max_epochs_warning``."""


class CPTDataLoader:
    """Deterministic, resumable mixed batches; see the module docstring for the semantics."""

    def __init__(self, data_cfg: Any, stages: Sequence[Any], tokenizer: Any, global_batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if global_batch_size % world_size:
            raise ValueError(f"global_batch_size ({global_batch_size}) must be divisible by world_size ({world_size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.cfg, self.seq_len, self.seed = data_cfg, int(data_cfg.seq_len), int(seed)
        self.global_batch_size, self.rank, self.world_size = global_batch_size, rank, world_size
        self.max_epochs_warning = float(getattr(data_cfg, "max_epochs_warning", 4.0))
        used = {n for st in stages for n in st.mix}  # sources no stage mentions are not opened
        self.sources = [s for s in data_cfg.sources if s.name in used]
        self.source_names = [s.name for s in self.sources]
        missing = sorted(used - set(self.source_names))
        if missing:
            raise ValueError(f"stages mix unknown sources {missing}; data.sources has {[s.name for s in data_cfg.sources]}")
        self.plan = MixPlan(stages, self.source_names)
        self.mixer = Mixer(self.plan, global_batch_size)
        tok_hash = tokenizer_fingerprint(tokenizer)
        self.vocab_size = _vocab_size(tokenizer)  # a token id at or past it is a corrupt shard (checked per batch)
        main = rank == 0  # the size checks are made once, by rank 0; the checksums' full read is shared by the ranks
        verify = bool(getattr(data_cfg, "verify_checksums", False))  # (a rank that finds a bad file stops the run)
        self.remote = getattr(data_cfg, "remote", None) or remote.DEFAULT  # remote sources' retries and re-listing
        self.streams: list[PackedStream | HFTokenStream] = [
            self._open(s, tokenizer, tok_hash, verify, main) for s in self.sources
        ]
        if main:
            for msg in folder_overlaps(data_cfg, self.source_names):
                logger.warning(msg)
        self.positions = [0] * len(self.sources)
        self.warned: set[str] = set()
        # remote shard sources (rank 0): listed again every data.remote.recheck_s in the run; sizes always, times where
        # the listing gives them (an http(s) listing gives none: a shard that changed size there went unnoticed)
        self._store_seen = {j: (s.shards.newest_mtime() or 0, time.monotonic()) for j, s in enumerate(self.streams)
                            if isinstance(s, PackedStream) and s.shards._fs is not None}
        self._fingerprint: str | None = None

    def _open(self, src: Any, tokenizer: Any, tok_hash: str, verify: bool, check_sizes: bool) -> PackedStream | HFTokenStream:
        if src.type == "hf":
            return HFTokenStream(src, tokenizer, self.seq_len, seed=self.seed, log_skips=check_sizes)
        try:
            shards = TokenShards.open(src.path, expected_tokenizer_hash=tok_hash, verify=verify, check_sizes=check_sizes,
                                      expected_tokenizer_name=run_tokenizer_name(tokenizer),
                                      expected_eos_id=tokenizer.eos_token_id, verify_part=(self.rank, self.world_size),
                                      retry=self.remote)
        except ShardError as e:
            raise ShardError(f"data source {src.name!r}: {e}") from None
        return PackedStream(shards, self.seq_len, seed=self.seed, name=src.name)

    # ------------------------------------------------------------ batches

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """This rank's rows of global batch ``step``: ``input_ids`` [B/W, seq_len] and ``source`` [B/W]."""
        self._recheck_store()
        counts = self.mixer.counts(step)
        B, W = self.global_batch_size, self.world_size
        row_source = np.repeat(np.arange(len(counts)), counts)
        row_source = row_source[np.random.default_rng([self.seed, step]).permutation(B)]
        # the k-th row of source j (in batch order) is that source's stream position positions[j] + k
        rank_rows = slice(self.rank * B // W, (self.rank + 1) * B // W)
        mine = row_source[rank_rows]
        out = np.empty((len(mine), self.seq_len), dtype=np.int64)
        for j, n in enumerate(counts):
            if n == 0:
                continue
            stream = self.streams[j]
            rows_j = np.flatnonzero(row_source == j)  # batch rows of source j, in order
            if isinstance(stream, HFTokenStream):
                seqs = stream.next_sequences(n)  # every rank reads the whole share of an hf source
                mask = (rows_j >= rank_rows.start) & (rows_j < rank_rows.stop)
                out[mine == j] = seqs[mask]
            else:
                k = np.flatnonzero((rows_j >= rank_rows.start) & (rows_j < rank_rows.stop))
                if len(k):  # read straight into the int64 rows (no uint16 copy, no scatter)
                    rows = np.flatnonzero(mine == j)
                    stream.sequences(self.positions[j] + k, out=out, rows=rows)
                    self._check_ids(j, out[rows], self.positions[j] + k)
            self.positions[j] += n
        self._check_epochs()
        return {"input_ids": torch.from_numpy(out), "source": torch.from_numpy(mine.astype(np.int64))}

    def _recheck_store(self) -> None:
        """Remote shards replaced on the store during the run: found within data.remote.recheck_s (one LIST a source),
        checksummed, and a changed one stops the run in one line (the checkpoints before it read the old data)."""
        for j, (ns, when) in list(self._store_seen.items()):
            if time.monotonic() - when < self.remote.recheck_s:
                continue
            shards = self.streams[j].shards
            problems, unchecked = remote.changed_on_store(shards, ns)
            if problems:
                raise ShardError(f"data source {self.source_names[j]!r} ({self.sources[j].path}): {problems[0]}")
            if unchecked:
                logger.warning(f"data source {self.source_names[j]!r}: {len(unchecked):,} files modified on the store "
                               "during the run; only their sizes were checked (`cpt verify` checks their contents)")
            self._store_seen[j] = (max(ns, shards.newest_mtime() or ns), time.monotonic())

    def _check_ids(self, j: int, rows: np.ndarray, positions: np.ndarray) -> None:
        """Token ids past the vocabulary: a shard corrupted after `cpt prepare` checksummed it (a bad disk, a partial
        copy). Read by this rank only, they would stop it with an embedding IndexError (a CUDA device assert) and
        no word about the file; named here instead (one max per batch)."""
        if self.vocab_size is None or not rows.size or int(rows.max()) < self.vocab_size:
            return
        row = int(np.flatnonzero(rows.max(axis=1) >= self.vocab_size)[0])
        stream, where = self.streams[j], ""
        if isinstance(stream, PackedStream):
            file, offset = stream.shards.locate(int(stream.sequence_ids(positions[row : row + 1])[0]) * self.seq_len)
            where = f" in {file} (tokens {offset:,}..+{self.seq_len})"
        raise ShardError(f"data source {self.source_names[j]!r} ({self.sources[j].path}): token id {int(rows[row].max())}"
                         f"{where} is outside the tokenizer's vocabulary ({self.vocab_size:,} ids): the file is corrupt; "
                         f"`cpt verify {self.sources[j].path}` checks every file against its manifest's checksums")

    # ------------------------------------------------------------ metrics and warnings

    def epochs(self) -> dict[str, float]:
        """Epochs of every source consumed so far (fractional for shards, completed ones for ``hf``)."""
        out = {}
        for name, stream, pos in zip(self.source_names, self.streams, self.positions):
            out[name] = stream.epoch_of(pos) if isinstance(stream, PackedStream) else float(stream.epoch)
        return out

    def _check_epochs(self) -> None:
        for name, e in self.epochs().items():
            if e > self.max_epochs_warning and name not in self.warned:
                self.warned.add(name)
                msg = (f"data source {name!r} is now in epoch {e:.2f}, past data.max_epochs_warning="
                       f"{self.max_epochs_warning:g}: repeated data gives diminishing and then negative returns")
                logger.warning(msg)
                warnings.warn(msg, RepeatedDataWarning, stacklevel=3)

    def metrics(self) -> dict[str, float]:
        """``data/tokens/<src>`` (global, cumulative), ``data/share/<src>`` (the configured share at the last step),
        ``data/realised_share/<src>`` (the share of all rows served so far in this run, cumulative), ``data/epochs/<src>``."""
        out: dict[str, float] = {}
        epochs = self.epochs()
        served = sum(self.mixer.rows)
        for j, name in enumerate(self.source_names):
            out[f"data/tokens/{name}"] = float(self.mixer.rows[j] * self.seq_len)
            out[f"data/share/{name}"] = float(self.mixer.last_shares[j])
            out[f"data/realised_share/{name}"] = self.mixer.rows[j] / served if served else 0.0
            out[f"data/epochs/{name}"] = epochs[name]
            stream = self.streams[j]
            if isinstance(stream, PackedStream) and stream.shards._fs is not None:
                out[f"data/read_retries/{name}"] = float(stream.shards.read_retries)
        return out

    # ------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint(),
            "seq_len": self.seq_len,
            "seed": self.seed,
            "world_size": self.world_size,  # (informative: a resume on another number of processes says so)
            "source_data": {n: self._identity(j) for j, n in enumerate(self.source_names)},
            "mixer": self.mixer.state_dict(),
            "sources": self.source_names,
            "positions": list(self.positions),
            "hf": {n: s.state_dict() for n, s in zip(self.source_names, self.streams) if isinstance(s, HFTokenStream)},
            "warned": sorted(self.warned),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position after the last batch served (O(1); any world size). Every source of the checkpoint
        must read the same data (its manifests: :meth:`_identity`), with the same data.seq_len and run.seed, else its
        stream would not continue; the refusal names each difference. Sources are matched by name: a source the
        checkpoint did not read (added to the run with a new stage, under ``--allow-config-change``) starts at its
        beginning, with a log line. (Checkpoints written before per-source identities: the whole fingerprint.)"""
        saved = state.get("source_data")
        if saved is None:
            if state.get("fingerprint") != self.fingerprint():
                raise ValueError(
                    f"the data of the checkpoint (fingerprint {state.get('fingerprint')}) differs from this config's data "
                    f"({self.fingerprint()}): resuming (or an anneal branch) would not continue the same stream; the data "
                    "sources, data.seq_len and run.seed must be the checkpoint's (its config.yaml). To train its weights "
                    "on other data, start a new stage with train.init_from (without --anneal).")
            if state.get("sources") != self.source_names:
                raise ValueError(f"data state is for sources {state.get('sources')}, this run has {self.source_names}")
        else:
            self._check_same_data(state, saved)
        names = list(state["sources"])
        at = {n: names.index(n) for n in self.source_names if n in names}
        mixer = dict(state["mixer"])  # in this run's source order; a new source: no rows, no rounding error
        mixer["rows"] = [int(mixer["rows"][at[n]]) if n in at else 0 for n in self.source_names]
        mixer["errors"] = [mixer["errors"][at[n]] if n in at else "0" for n in self.source_names]
        self.mixer.load_state_dict(mixer)
        self.positions = [int(state["positions"][at[n]]) if n in at else 0 for n in self.source_names]
        for name, stream in zip(self.source_names, self.streams):
            if isinstance(stream, HFTokenStream) and name in at:
                stream.load_state_dict(state["hf"][name])
        self.warned = set(state.get("warned", []))

    def _files_changed(self, saved: dict[str, dict]) -> list[str]:
        """Rank 0, local or remote shards: files modified since the checkpoint's run opened them. A few are checksummed
        (a problem is returned: the data changed under the position); many (a copied folder) are a warning."""
        problems = []
        for j, name in enumerate(self.source_names):
            ns, stream = (saved.get(name) or {}).get("newest_file_ns"), self.streams[j]
            if ns is None or not isinstance(stream, PackedStream):
                continue
            changed, bad = stream.shards.changed_since(int(ns))
            problems += [f"data source {name!r} ({self.sources[j].path}): {b}" for b in bad]
            if changed and not bad and len(changed) > 8:
                logger.warning(f"data source {name!r} ({self.sources[j].path}): {len(changed):,} files modified since "
                               "the checkpoint's run started (copied?); only their sizes were checked: `cpt verify` "
                               "(or data.verify_checksums: true) checks their contents")
        return problems

    def start_over_notes(self, state: dict[str, Any]) -> list[str]:
        """For a new stage from a checkpoint (train.init_from, which does not carry data positions): one line per
        source that reads the same data (same manifests, data.seq_len) as the checkpoint's run had partly read. With
        the same run.seed its order is the same too: the new stage repeats those sequences first."""
        saved, notes = state.get("source_data") or {}, []
        if int(state.get("seq_len", -1)) != self.seq_len:
            return notes
        for j, name in enumerate(self.source_names):
            if name not in saved or not _same_source(saved[name], self._identity(j)):
                continue
            pos = int(state["positions"][list(state["sources"]).index(name)])
            stream = self.streams[j]
            if pos == 0 or not isinstance(stream, PackedStream):
                continue
            seen = min(pos, stream.num_sequences)
            how = (f"reads those {seen:,} sequences first, in the same order (same run.seed)"
                   if int(state.get("seed", -1)) == self.seed else "reads them again, in another order (another run.seed)")
            notes.append(f"data source {name!r} starts over: the checkpoint's run read {pos:,} of its {stream.num_sequences:,} "
                         f"sequences ({stream.epoch_of(pos):.2f} epochs), and this run {how}; data/epochs/{name} counts "
                         "this run only. To continue where that run stopped, append this stage to its config and resume it "
                         "(--resume --allow-config-change)")
        return notes

    def _identity(self, j: int) -> dict[str, str]:
        """What source ``j`` reads: a fingerprint of its data (shards: the tokenizer hash and every file's checksum;
        ``hf``: the dataset spec) and the same in words, for the message when it changed."""
        stream = self.streams[j]
        if isinstance(stream, HFTokenStream):
            fp = stream.fingerprint()  # (checkpoints before 2026-11-27 hold path_fingerprint: accepted as the same)
            return {"fingerprint": fp, "about": fp, "path_fingerprint": stream.path_fingerprint()}
        sh = stream.shards
        out = {"fingerprint": sh.fingerprint(), "about": f"{len(sh.manifest['shards'])} shards, {sh.num_tokens:,} "
               f"tokens, {sh.num_documents:,} documents, tokenizer {sh.manifest['tokenizer'].get('name')!r}"}
        if sh.mtimes:  # (rank 0: the newest modification time its size check saw: stat or listing)
            out["newest_file_ns"] = sh.newest_mtime()
        return out

    def _check_same_data(self, state: dict[str, Any], saved: dict[str, dict]) -> None:
        problems = []
        if int(state.get("seq_len", self.seq_len)) != self.seq_len:
            problems.append(f"data.seq_len {state['seq_len']} -> {self.seq_len} (a position counts sequences of "
                            f"{state['seq_len']} tokens)")
        if int(state.get("seed", self.seed)) != self.seed:
            problems.append(f"run.seed {state['seed']} -> {self.seed} (the order of every source is drawn from it)")
        for name, pos in zip(state["sources"], state["positions"]):
            if name not in self.source_names:
                if int(pos) > 0:  # (one the checkpoint never read, e.g. a later stage's, may be left out)
                    problems.append(f"data source {name!r} of the checkpoint is not in this run's stages (its position, "
                                    f"{int(pos):,} sequences read, would be lost: keep it in data.sources and in the mix "
                                    "of the stages that read it)")
                continue
            j = self.source_names.index(name)
            now = self._identity(j)
            if not _same_source(saved[name], now):
                problems.append(f"data source {name!r} ({self.sources[j].path}) is not the data the checkpoint read: "
                                f"{saved[name]['about']} then, {now['about']} now")
        problems += self._files_changed(saved)
        if problems:
            sources = any(p.startswith("data source") for p in problems)
            raise ValueError(
                "the data position of the checkpoint does not continue on this run's data: " + "; ".join(problems) + ". "
                + ("A source's data cannot change under a saved position (the order of its sequences is drawn over all "
                   "of them): restore it; put new data in a new source (`cpt prepare` it into its own folder, add it to "
                   "data.sources and to the mix of a new stage, and resume with --allow-config-change); or"
                   if sources else "Restore the checkpoint's value (its config.yaml), even with --allow-config-change; or")
                + " start a new stage from the checkpoint with train.init_from, whose data positions start over.")
        for name in self.source_names:
            if name not in state["sources"] and self.rank == 0:
                logger.warning(f"data source {name!r} is new since the checkpoint: it starts at its beginning (the other "
                               "sources continue where the checkpoint stopped)")

    def fingerprint(self) -> str:
        """Identity of the data this loader reads (manifests, seq_len, seed); checked on resume (computed once)."""
        if self._fingerprint is not None:
            return self._fingerprint
        parts = {"seq_len": self.seq_len, "seed": self.seed}
        for name, stream in zip(self.source_names, self.streams):
            parts[name] = stream.path_fingerprint() if isinstance(stream, HFTokenStream) else stream.shards.fingerprint()
        self._fingerprint = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
        return self._fingerprint


def _same_source(saved: dict[str, str], now: dict[str, str]) -> bool:
    """Whether a checkpoint's source identity (``source_data``) is this run's source's."""
    return saved["fingerprint"] in (now["fingerprint"], now.get("path_fingerprint"))


@dataclass
class HeldoutSample:
    """The part of a held-out set that is evaluated: ``tokens`` ``LongTensor[n, seq_len]`` and what it covers."""

    tokens: torch.Tensor
    docs: int  # documents with tokens in the sample (the last one drawn, and the last in order, may be cut)
    total_docs: int
    total_tokens: int
    whole: bool  # the whole set (it fits in the budget), in document order

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())

    def describe(self) -> str:
        left = self.total_tokens - self.num_tokens
        how = (" (a seeded sample of whole documents)" if not self.whole else " (the whole set)" if not left else
               f" (the whole set but its last {left:,} tokens, less than one row of the sequence length)")
        return f"{self.num_tokens:,} of {self.total_tokens:,} tokens, {self.docs:,} of {self.total_docs:,} documents{how}"


def same_folder(path: str) -> str:
    """A folder's identity for overlap checks: the real path (links resolved), a URL as written."""
    return path.rstrip("/") if "://" in path else os.path.realpath(path)


def folder_overlaps(data_cfg: Any, used: Sequence[str] | None = None) -> list[str]:
    """A warning for each held-out set that is the folder of a training source (its loss would measure
    memorisation, not generalisation): an easy slip for `cpt prepare`'s OUT instead of OUT/heldout; and for each
    training source (of ``used``, default all) reading the same folder as an earlier one (a copy-paste slip: that data
    is mixed in twice, in two orders, and each source counts only its own epochs for data.max_epochs_warning)."""
    folders: dict[str, str] = {}
    out = []
    for s in data_cfg.sources:
        if s.type != "shards" or (used is not None and s.name not in used):
            continue
        first = folders.setdefault(same_folder(s.path), s.name)
        if first != s.name:
            out.append(f"data sources {first!r} and {s.name!r} read the same folder ({s.path}): its sequences are "
                       "mixed in as two sources, each with its own order and epoch count")
    for h in getattr(data_cfg, "heldout", []):
        source = folders.get(same_folder(h.path))
        if source is not None:
            out.append(f"held-out set {h.name!r} is the folder of training source {source!r} ({h.path}): its loss "
                       "measures memorisation, not generalisation; use a held-out split (e.g. the heldout/ folder "
                       "`cpt prepare --heldout-docs` writes)")
    return out


def _vocab_size(tokenizer: Any) -> int | None:
    """One more than the largest id the tokenizer can produce (cpt.data.tokenizer_identity.vocab_size: its length, or more when its
    ids have gaps); None when it does not say."""
    try:
        return vocab_size(tokenizer)
    except (TypeError, AttributeError, ValueError):
        return None


def sample_heldout(cfg: Any, tokenizer: Any, seq_len: int, max_tokens: int | None = None, verify: bool = False,
                   seed: int = 0, check_sizes: bool = True, retry: Any = None) -> HeldoutSample:
    """A representative sample of a held-out set, the same for a given ``seed`` at every call.

    When the set holds more than ``max_tokens`` tokens (``cfg.max_tokens`` overrides it), whole documents are
    drawn in a seeded random order until the budget is reached (the last one drawn is cut at the budget); the
    chosen documents are then concatenated in their original order and cut into rows of ``seq_len`` (a tail
    shorter than one row is dropped). A set within the budget is used whole, in document order. The set's tokenizer
    hash must match the run's tokenizer; a set shorter than one sequence is an error. Only the sampled tokens are
    read; ``verify`` also checks every file's checksum (a full read), ``check_sizes`` every file's size, ``retry`` sets
    remote reads' retries (the run's data.remote; see TokenShards.open).
    """
    limit = getattr(cfg, "max_tokens", None) or max_tokens
    try:
        shards = TokenShards.open(cfg.path, expected_tokenizer_hash=tokenizer_fingerprint(tokenizer), verify=verify,
                                  expected_tokenizer_name=run_tokenizer_name(tokenizer),
                                  expected_eos_id=getattr(tokenizer, "eos_token_id", None), check_sizes=check_sizes,
                                  retry=retry)
    except ShardError as e:
        raise ShardError(f"held-out set {cfg.name!r}: {e}") from None
    total = shards.num_tokens
    if limit is None or int(limit) >= total:
        n = total // seq_len
        # documents with at least one evaluated token (the tail shorter than a row is dropped: a last short document
        # was counted, and the set said "the whole set", though none of it was evaluated)
        docs = int(np.sum(_document_starts(shards, cfg) < n * seq_len)) if n else 0
        flat = shards.read(0, n * seq_len) if n else None
    else:
        starts = np.append(_document_starts(shards, cfg), total)
        lengths = np.diff(starts)
        order = np.random.default_rng([int(seed), 0x48454C44]).permutation(len(lengths))
        taken = np.cumsum(lengths[order])
        k = int(np.searchsorted(taken, int(limit))) + 1  # documents until the budget is reached
        keep = {int(i): int(lengths[i]) for i in order[:k]}
        keep[int(order[k - 1])] -= int(taken[k - 1]) - int(limit)  # the last document drawn is cut at the budget
        chosen = sorted(keep)
        flat = np.concatenate(shards.read_spans([int(starts[i]) for i in chosen], [keep[i] for i in chosen]))
        n = len(flat) // seq_len
        offsets = np.cumsum([0] + [keep[i] for i in chosen[:-1]])
        docs = int(np.sum(offsets < n * seq_len))  # documents with at least one evaluated token
    if n == 0 and total >= seq_len:  # the budget, not the set, is too small
        field = "max_tokens" if getattr(cfg, "max_tokens", None) else "eval.tokens_per_set"
        raise ShardError(f"held-out set {cfg.name!r}: its budget of {int(limit)} tokens ({field}) is less than one "
                         f"sequence of {seq_len}; raise it to at least {seq_len}")
    if n == 0:
        raise ShardError(f"held-out set {cfg.name!r} ({cfg.path}) has {total} tokens, fewer than one sequence of {seq_len}")
    tokens = torch.from_numpy(np.ascontiguousarray(flat[: n * seq_len]).astype(np.int64).reshape(n, seq_len))
    vocab = _vocab_size(tokenizer)  # (past it: an embedding IndexError, a CUDA device assert, naming no file)
    if vocab is not None and int(tokens.max()) >= vocab:
        raise ShardError(f"held-out set {cfg.name!r} ({cfg.path}): token id {int(tokens.max())} is outside the tokenizer's "
                         f"vocabulary ({vocab:,} ids): a file is corrupt; `cpt verify {cfg.path}` names it")
    return HeldoutSample(tokens, docs, shards.num_documents, total, whole=limit is None or int(limit) >= total)


def _document_starts(shards: TokenShards, cfg: Any) -> np.ndarray:
    """The held-out set's document starts (its .idx files), checked: in order and inside the set (a damaged index
    gave an IndexError naming neither the set nor the file)."""
    starts = shards.document_starts().astype(np.int64)
    bad = np.flatnonzero((starts < 0) | (starts >= shards.num_tokens) | np.append(False, np.diff(starts) < 0))
    if len(bad):
        doc, first = int(bad[0]), 0
        for sh in shards.manifest["shards"]:  # the .idx file holding that document
            if doc < first + int(sh["num_documents"]):
                break
            first += int(sh["num_documents"])
        raise ShardError(f"held-out set {cfg.name!r}: {cfg.path}/{sh['docs_file']} is corrupt: document {doc - first} "
                         f"starts at token {int(starts[doc]):,}, outside the set's "
                         f"{shards.num_tokens:,} tokens or before the document ahead of it; `cpt verify {cfg.path}`")
    return starts


def load_heldout(cfg: Any, tokenizer: Any, seq_len: int, max_tokens: int | None = None, verify: bool = False,
                 seed: int = 0, check_sizes: bool = True, retry: Any = None) -> torch.Tensor:
    """The tokens of :func:`sample_heldout` as ``LongTensor[n, seq_len]``."""
    return sample_heldout(cfg, tokenizer, seq_len, max_tokens, verify, seed, check_sizes, retry).tokens
