"""Vocabulary extension for new domains and languages.

Two ways to get new tokens:

* ``add_tokens_file``: one token per line (the line as written, only the newline removed: a leading space
  is part of the token). Added with ``tokenizer.add_tokens`` — they are matched in the raw text before
  pre-tokenization, like HF's added tokens.
* ``learn_from`` + ``learn_tokens``: continue the tokenizer's own BPE training on the new corpus — every word
  starts from its segmentation by the old tokenizer and the most frequent adjacent pair is merged, N times.
  The merges are appended after the old ones (lowest priority), so old text tokenizes exactly as before
  except where a new merge applies, and the new tokens respect the pre-tokenizer like every other token.
  For tokenizers that are not BPE, the most useful whole pre-tokens (count x pieces saved) are added as
  added tokens instead. Deterministic: same tokenizer + corpus + N gives the same tokens in the same order,
  so ``cpt prepare`` and ``cpt train`` can build the same extended tokenizer independently.

New embedding rows (input and, when untied, output) are initialised as the mean of the old rows of the token's
subtokens under the old tokenizer (``init: mean_of_subtokens``), falling back to the mean of all old rows; old
rows are left untouched.

An extended tokenizer records what was added in its ``tokenizer_config.json`` (``cpt_vocab``: the learned tokens
under a key of the corpus read and ``learn_tokens``, the added ones), so the same ``model.vocab`` applied again to
it (``model.name_or_path`` an export of an extended run) finds its tokens already there instead of learning or
adding more; the loop keeps their trained rows.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from cpt.config import ConfigError, VocabConfig
from cpt.data.readers import ReadCounts, ReadError, read_file, resolve_files

log = logging.getLogger("cpt.vocab")


@dataclass
class VocabPlan:
    """What an extension adds: the new vocabulary entries and, for each, its subtoken ids under the old tokenizer."""

    old_size: int  # len(old tokenizer)
    tokens: list[str] = field(default_factory=list)  # as they appear in the new vocabulary, in id order
    subtokens: list[list[int]] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    kept: int = 0  # new tokens whose rows came trained with the loaded weights (not initialised)
    present: int = 0  # new tokens the tokenizer already had from this very extension (its record), not added again


RECORD = "cpt_vocab"  # the tokenizer_config.json key of an extended tokenizer's record: {"learned": {key: tokens}, "added": tokens}


def _learn_key(texts: list[str], n: int) -> str:
    """What a learned extension depends on: the corpus as read, and how many tokens were asked for."""
    digest = hashlib.sha256(json.dumps([n, texts], ensure_ascii=False).encode("utf-8")).hexdigest()
    return f"sha256:{digest[:16]}"


# ----------------------------------------------------------------------------- corpus reading


def read_texts(path: str | Path, max_chars: int = 20_000_000, text_field: str = "text") -> Iterator[str]:
    """The documents of ``path`` (a file, folder or glob), read as `cpt prepare` reads them
    (:mod:`cpt.data.readers`: jsonl/parquet/plain text, compressed or not), at most ``max_chars`` characters in all.
    Records that cannot be used are skipped, counted and logged."""
    p = Path(path)
    try:
        files = resolve_files([str(path)])
    except ReadError:
        raise ConfigError(f"model.vocab.learn_from: nothing to read at {p}") from None
    counts = ReadCounts()
    left = max_chars
    try:
        for f in files:
            for text in read_file(f, text_field, counts):
                if left <= 0:
                    return
                text = text[:left]
                left -= len(text)
                yield text
    finally:
        if counts.skipped:
            log.warning("vocab.learn_from %s: skipped %s", p, counts.describe_skips())


def read_token_file(path: str | Path) -> list[str]:
    """One token per line; only the line break is removed (leading/trailing spaces are part of the token)."""
    if not Path(path).is_file():
        raise ConfigError(f"model.vocab.add_tokens_file: no such file {path}")
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    out, seen = [], set()
    for line in lines:
        tok = line.rstrip("\r")
        if tok and tok not in seen:
            seen.add(tok)
            out.append(tok)
    return out


# ----------------------------------------------------------------------------- learning new tokens


def _backend_json(tokenizer) -> dict:
    return json.loads(tokenizer.backend_tokenizer.to_str())


def _pretokens(tokenizer, texts: Iterable[str]) -> Counter:
    """Counts of pre-tokens (in the tokenizer model's alphabet, e.g. 'Ġdef' for byte-level BPE)."""
    bt = tokenizer.backend_tokenizer
    counts: Counter = Counter()
    for text in texts:
        if bt.normalizer is not None:
            text = bt.normalizer.normalize_str(text)
        if bt.pre_tokenizer is not None:
            counts.update(piece for piece, _ in bt.pre_tokenizer.pre_tokenize_str(text))
        else:
            counts.update(text.split())
    return counts


def learn_bpe_merges(tokenizer, texts: Iterable[str], n: int, min_count: int = 2) -> list[tuple[str, str]]:
    """Continue BPE training on ``texts``: up to ``n`` new merges, most frequent pair first (ties by string)."""
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    model = tokenizer.backend_tokenizer.model
    words: list[list[str]] = []
    freqs: list[int] = []
    for word, c in sorted(_pretokens(tokenizer, texts).items()):
        if c < min_count:
            continue
        pieces = [t.value for t in model.tokenize(word)]
        if len(pieces) >= 2:
            words.append(pieces)
            freqs.append(c)
    pair_counts: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, (w, c) in enumerate(zip(words, freqs)):
        for a, b in zip(w, w[1:]):
            pair_counts[(a, b)] += c
            where[(a, b)].add(i)
    merges: list[tuple[str, str]] = []
    while len(merges) < n and pair_counts:
        best_count = max(pair_counts.values())
        if best_count < min_count:
            break
        best = min(p for p, c in pair_counts.items() if c == best_count)
        a, b = best
        merged = a + b
        merges.append(best)
        for i in sorted(where.pop(best, ())):
            w, c = words[i], freqs[i]
            for x, y in zip(w, w[1:]):  # remove the word's old pairs
                pair_counts[(x, y)] -= c
                if pair_counts[(x, y)] <= 0:
                    del pair_counts[(x, y)]
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == a and w[j + 1] == b:
                    out.append(merged)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            for x, y in zip(out, out[1:]):
                pair_counts[(x, y)] += c
                where[(x, y)].add(i)
        pair_counts.pop(best, None)
        if merged in vocab:  # already a token (reachable another way): the merge is still valid, no new row
            continue
    return merges


def _is_bpe(tokenizer) -> bool:
    return _backend_json(tokenizer)["model"].get("type") == "BPE"


def learn_new_tokens(tokenizer, texts: Iterable[str], n: int) -> list[str]:
    """``n`` new tokens learned from ``texts`` (deterministic), in the tokenizer model's alphabet.

    BPE tokenizers: the results of continued BPE merges (see :func:`learn_bpe_merges`); other tokenizers:
    the whole pre-tokens the old tokenizer splits into two or more pieces, ranked by count x (pieces - 1).
    """
    if _is_bpe(tokenizer):
        vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
        out, seen = [], set()
        for a, b in learn_bpe_merges(tokenizer, texts, n):
            t = a + b
            if t not in vocab and t not in seen:
                seen.add(t)
                out.append(t)
        return out
    model = tokenizer.backend_tokenizer.model
    scored = []
    for word, c in _pretokens(tokenizer, texts).items():
        k = len(model.tokenize(word))
        if k >= 2 and c >= 2:
            scored.append((-(c * (k - 1)), word))
    return [w for _, w in sorted(scored)[:n]]


# ----------------------------------------------------------------------------- the extended tokenizer


def _with_merges(tokenizer, merges: list[tuple[str, str]]):
    """A copy of ``tokenizer`` whose BPE model has ``merges`` appended (new vocabulary entries get new ids)."""
    from tokenizers import Tokenizer

    data = _backend_json(tokenizer)
    model = data["model"]
    vocab: dict[str, int] = model["vocab"]
    used = set(vocab.values()) | {t["id"] for t in data.get("added_tokens", [])}
    next_id = max(used) + 1 if used else 0
    as_strings = bool(model["merges"]) and isinstance(model["merges"][0], str)
    for a, b in merges:
        if a + b not in vocab:
            vocab[a + b] = next_id
            next_id += 1
        model["merges"].append(f"{a} {b}" if as_strings else [a, b])
    new = copy.deepcopy(tokenizer)
    new._tokenizer = Tokenizer.from_str(json.dumps(data))
    return new


def build_extended_tokenizer(tokenizer, cfg: VocabConfig, texts: Iterable[str] | None = None):
    """The extended tokenizer (a new object; ``tokenizer`` is not modified) and the :class:`VocabPlan`.

    ``texts``: the new corpus; default: read from ``cfg.learn_from``.
    """
    old_vocab = tokenizer.get_vocab()
    plan = VocabPlan(old_size=len(tokenizer))
    new_tok = tokenizer
    record = copy.deepcopy(tokenizer.init_kwargs.get(RECORD) or {})
    learned, added = record.setdefault("learned", {}), record.setdefault("added", [])
    present: list[str] = []  # this extension's tokens the tokenizer already holds (an export of an extended run)
    if cfg.learn_tokens > 0:
        if texts is None:
            texts = read_texts(cfg.learn_from, cfg.learn_max_chars, cfg.text_field)
        texts = list(texts)
        key = _learn_key(texts, cfg.learn_tokens)
        if key in learned and not all(t in old_vocab for t in learned[key]):  # a stale record (an edited tokenizer)
            log.warning("model.vocab: the tokenizer's cpt_vocab record lists learned tokens it does not hold: "
                           "learning them again")
            del learned[key]
        if key in learned:
            present += learned[key]
        elif _is_bpe(tokenizer):
            merges = learn_bpe_merges(tokenizer, texts, cfg.learn_tokens)
            new_tok = _with_merges(tokenizer, merges)
            model = tokenizer.backend_tokenizer.model
            for a, b in merges:
                t = a + b
                if t in old_vocab or t in plan.tokens:
                    continue
                plan.tokens.append(t)
                plan.subtokens.append([x.id for x in model.tokenize(t)])
        else:
            words = learn_new_tokens(tokenizer, texts, cfg.learn_tokens)
            new_tok = copy.deepcopy(tokenizer)
            model = tokenizer.backend_tokenizer.model
            decoded = [tokenizer.backend_tokenizer.decoder.decode([w]) if tokenizer.backend_tokenizer.decoder
                       else w for w in words]
            for w, raw in zip(words, decoded):
                plan.tokens.append(raw)
                plan.subtokens.append([x.id for x in model.tokenize(w)])
            _add_raw_tokens(new_tok, decoded)
        if key not in learned:
            learned[key] = list(plan.tokens)
    if cfg.add_tokens_file is not None:
        if new_tok is tokenizer:
            new_tok = copy.deepcopy(tokenizer)
        current = new_tok.get_vocab()
        listed = read_token_file(cfg.add_tokens_file)
        present += [t for t in listed if t in added and t in old_vocab and t not in present]
        raw = [t for t in listed if t not in current]
        # skip strings that the tokenizer already encodes as one token (nothing to gain)
        raw = [t for t in raw if len(tokenizer(t, add_special_tokens=False)["input_ids"]) != 1]
        for t in raw:
            plan.tokens.append(t)
            plan.subtokens.append(list(tokenizer(t, add_special_tokens=False)["input_ids"]))
        _add_raw_tokens(new_tok, raw)
        added += raw
    if plan.tokens:
        new_tok.init_kwargs[RECORD] = record  # (saved with the tokenizer: in every export)
    plan.present = len(present)
    plan.tokens[:0], plan.subtokens[:0] = present, [[] for _ in present]  # (their rows come with the weights)
    vocab = new_tok.get_vocab()
    plan.ids = [vocab[t] for t in plan.tokens]
    return new_tok, plan


def _add_raw_tokens(tokenizer, tokens: list[str]) -> None:
    from tokenizers import AddedToken

    if tokens:
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in tokens])


# ----------------------------------------------------------------------------- the model side


@torch.no_grad()
def init_new_rows(weight: torch.Tensor, old_rows: int, plan: VocabPlan, init: str) -> None:
    """Set the rows of ``plan.ids`` (mean of subtoken rows or of all old rows) and every other row >= ``old_rows``
    (padding: mean of all old rows). Rows < ``old_rows`` that are not in ``plan.ids`` are not touched."""
    old = weight[:old_rows].float()
    mean_all = old.mean(dim=0)
    for r in range(old_rows, weight.shape[0]):
        weight[r] = mean_all.to(weight.dtype)
    for i, subs in zip(plan.ids, plan.subtokens):
        subs = [s for s in subs if 0 <= s < old_rows]
        row = old[subs].mean(dim=0) if (init == "mean_of_subtokens" and subs) else mean_all
        weight[i] = row.to(weight.dtype)


def _rows(t: torch.Tensor) -> int:
    return int(getattr(t, "ds_shape", t.shape)[0])  # DeepSpeed ZeRO-3 (zero.Init) leaves empty placeholders


def _whole(params: list[torch.Tensor]):
    """The full tensors for an in-place change: under DeepSpeed ZeRO-3 gathered, and re-partitioned from rank 0's
    values on exit (every rank computes the same rows); the tensors themselves otherwise."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


def extend_vocabulary(model: nn.Module, tokenizer, cfg: VocabConfig, texts: Iterable[str] | None = None,
                      trained_vocab: dict[str, int] | None = None):
    """Extend the tokenizer (see module doc), resize the model's embeddings and initialise the new rows.

    Returns ``(model, tokenizer, new_token_ids)``: the same model (resized in place), the extended tokenizer
    (a new object) and the ids of the added tokens. :func:`cpt.adapters.new_row_ids` adds the padding rows.
    ``trained_vocab``: the vocabulary the loaded weights were trained with (``train.init_from`` or
    ``model.name_or_path`` an export of an extended run): a new token it holds at the same id, within the loaded
    rows, keeps its trained row. (A token the tokenizer already had, ``plan.present``, whose row is not among the
    loaded ones, starts from the mean of the old rows: its subtokens under the unextended tokenizer are unknown.)
    """
    new_tok, plan = build_extended_tokenizer(tokenizer, cfg, texts)
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb.weight
    old_rows = _rows(emb.weight)
    # the model may already have spare rows (padded vocab): new ids below old_rows reuse them
    target = max(len(new_tok), old_rows)
    if cfg.pad_to_multiple_of:
        m = cfg.pad_to_multiple_of
        target = (target + m - 1) // m * m
    old_tok_rows = min(plan.old_size, old_rows)
    if target != old_rows:
        model.resize_token_embeddings(target, mean_resizing=False)  # (gathers ZeRO-3 partitions itself)
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    # subtoken means must only ever read rows of real old tokens
    assert all(s < old_tok_rows for subs in plan.subtokens for s in subs)
    untied = out is not None and not tied
    fresh = plan
    if trained_vocab:  # rows the loaded weights already trained for these very tokens are not reset
        keep = [i < old_rows and trained_vocab.get(t) == i for t, i in zip(plan.tokens, plan.ids)]
        fresh = VocabPlan(plan.old_size, [t for t, k in zip(plan.tokens, keep) if not k],
                          [s for s, k in zip(plan.subtokens, keep) if not k], [i for i, k in zip(plan.ids, keep) if not k])
        plan.kept = sum(keep)
    with _whole([emb.weight, *([out.weight] if untied else [])]):
        init_new_rows(emb.weight, old_rows, fresh, cfg.init)
        if untied:
            init_new_rows(out.weight, old_rows, fresh, cfg.init)
    if untied and getattr(out, "bias", None) is not None and _rows(out.bias) > old_rows:
        with _whole([out.bias]), torch.no_grad():
            out.bias[old_rows:] = out.bias[:old_rows].float().mean().to(out.bias.dtype)
    model.config.vocab_size = _rows(model.get_input_embeddings().weight)
    model._cpt_vocab_plan = plan
    return model, new_tok, plan.ids


# ----------------------------------------------------------------------------- LR multiplier for new rows


class NewRowsLR:
    """An LR multiplier for some rows of some parameters (the new embedding rows), for any torch optimizer.

    A gradient hook cannot do this with Adam-type optimizers (Adam divides the gradient by its own running RMS, so
    scaling the gradient leaves the step unchanged), and a parameter group cannot hold part of a tensor. Instead,
    a step pre-hook remembers the selected rows and a step post-hook rescales their update:
    ``p[rows] = before + m * (p[rows] - before)``. For SGD (with momentum), Adam and AdamW (decoupled weight decay
    included) the update is linear in the LR and the optimizer state does not depend on it, so this is exactly an
    LR of ``m * lr`` for those rows — the test checks it against two parameter groups.

    ``targets``: ``[(param, rows)]`` with ``rows`` a list of row indices or ``None`` (the whole tensor, e.g. peft's
    ``trainable_tokens_delta``). Works on a single device and with DDP; not with ZeRO/FSDP sharding (the
    optimizer updates flat shards, not these tensors) — :meth:`attach` refuses parameters it cannot see whole.
    """

    def __init__(self, targets: list[tuple[torch.Tensor, list[int] | None]], multiplier: float):
        self.targets = [(p, None if rows is None else torch.as_tensor(rows, dtype=torch.long, device=p.device))
                        for p, rows in targets]
        self.multiplier = float(multiplier)
        self._before: list[torch.Tensor] = []
        self._handles = []

    @classmethod
    def for_model(cls, model: nn.Module, new_token_ids: Iterable[int], multiplier: float) -> "NewRowsLR":
        """Targets the new rows of a (possibly peft-wrapped) model: the embedding rows, the untied output rows,
        or peft's ``trainable_tokens_delta`` parameters when LoRA trains them."""
        from cpt.adapters import new_row_ids

        targets = []
        deltas = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n and p.requires_grad]
        if deltas:
            targets = [(p, None) for p in deltas]
        else:
            rows = new_row_ids(model, new_token_ids)
            emb, out = model.get_input_embeddings(), model.get_output_embeddings()
            for mod in (emb, out):
                if mod is None or getattr(mod, "weight", None) is None:
                    continue
                w = mod.weight
                if w.requires_grad and all(w is not t for t, _ in targets):
                    targets.append((w, rows))
        if not targets:
            raise ConfigError("model.vocab.new_rows_lr_multiplier: no trainable new rows found "
                              "(are the embeddings frozen?)")
        return cls(targets, multiplier)

    def attach(self, optimizer: torch.optim.Optimizer) -> "NewRowsLR":
        opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        for p, _ in self.targets:
            if id(p) not in in_opt or p.numel() == 0 or type(p.data) is not torch.Tensor:
                raise RuntimeError("NewRowsLR needs the optimizer to update the embedding tensors themselves "
                                   "(single device or DDP); with ZeRO/FSDP sharding use a per-parameter LR instead")
        self._handles.append(opt.register_step_pre_hook(self._pre))
        self._handles.append(opt.register_step_post_hook(self._post))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @torch.no_grad()
    def _pre(self, optimizer, *_):
        # DeepSpeed / FSDP swap the optimizer's parameters for flat shards after attach(): refuse, never ignore
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if any(id(p) not in in_opt for p, _ in self.targets):
            raise RuntimeError("NewRowsLR: the optimizer no longer updates the embedding tensors (ZeRO/FSDP "
                               "sharding?); new_rows_lr_multiplier needs a single device or DDP")
        self._before = [(p.detach()[rows] if rows is not None else p.detach()).clone() for p, rows in self.targets]

    @torch.no_grad()
    def _post(self, *_):
        m = self.multiplier
        for (p, rows), before in zip(self.targets, self._before):
            if rows is None:
                p.copy_(before + m * (p - before))
            else:
                p[rows] = before + m * (p[rows] - before)
        self._before = []


def scale_new_rows_updates(model: nn.Module, optimizer: torch.optim.Optimizer, new_token_ids: Iterable[int],
                           multiplier: float, acc=None) -> NewRowsLR:
    """Give the new rows ``multiplier`` x the LR of the rest (see :class:`NewRowsLR`); returns the attached hook.
    Call after building the optimizer, with the (unwrapped, possibly peft) model, before ``accelerator.prepare``.
    ``acc``: the run's Accelerator; FSDP and DeepSpeed, whose optimizers update flat shards, are refused here,
    before anything is written, rather than at the first step."""
    from cpt.distributed import Backend, backend

    _SHARDED = {Backend.FSDP: "FSDP", Backend.DEEPSPEED: "DeepSpeed ZeRO", Backend.OTHER: "this backend"}
    if backend(acc) in _SHARDED:
        raise ConfigError(
            f"model.vocab.new_rows_lr_multiplier needs one device or DDP: under {_SHARDED[backend(acc)]} the optimizer "
            "updates flat shards, not the embedding rows; launch with DDP, or drop it (optim.lr_multipliers can "
            "scale the LR of the whole embedding instead)")
    return NewRowsLR.for_model(model, new_token_ids, multiplier).attach(optimizer)
