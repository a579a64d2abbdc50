"""Held-out loss per named set, tagged upstream (old distribution) or downstream (new distribution).

Continual pre-training trades adaptation to the new data against forgetting of the old. This module
measures both from step 0 (the base model), every ``eval.every`` steps, and densely during the first
``eval.dense_steps`` steps of every stage, where the stability gap (a sharp drop on old data right
after a switch) shows up. Logged per set::

    eval/<name>/loss            mean per-token cross-entropy (nats) over the set
    eval/<name>/ppl             exp(loss)
    eval/<name>/tokens, /docs   tokens and documents evaluated (a seeded sample of whole documents up to
                                eval.tokens_per_set, the same at every evaluation; see sample_heldout)
    forgetting/<name>           loss - loss at the reference (first) evaluation      (upstream sets)
    eval/upstream_worst/<name>  the highest loss seen so far                         (upstream sets)
    adaptation/<name>           loss at the reference evaluation - loss              (downstream sets)
    eval/upstream/mean_loss, eval/downstream/mean_loss                               (mean over sets of a tag)
    eval/upstream/mean_forgetting, eval/downstream/mean_adaptation
    eval/<name>/reference_step  the step of the set's reference evaluation

The reference is the first evaluation of the run, which is step 0 (the base model) when
``eval.at_start`` is true; it survives resume through ``state_dict()``, with the sample it was measured on. A set
added on a resume, or one whose sample changed since the checkpoint (another eval.tokens_per_set, sample_seed or
files: a warning says so), takes its next evaluation as its reference.

Distributed evaluation: every rank evaluates a disjoint, contiguous slice of each set's sequences and
the per-rank sums of (token loss, token count) are summed across ranks with ``accelerator.reduce``.
Every rank runs the same number of forward passes (a rank whose slice is exhausted runs a dummy
batch with weight 0), so the collectives inside the forward pass of DDP (buffer broadcast), FSDP
(parameter all-gather) and DeepSpeed ZeRO-3 (parameter gather) always match and cannot hang.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from cpt.config import EvalConfig
from cpt.distributed import rank_and_world, sum_across_ranks
from cpt.lm_loss import token_losses

Tag = Literal["upstream", "downstream"]
TAGS: tuple[str, ...] = ("upstream", "downstream")


# ---------------------------------------------------------------- the loss itself


def _device(model, accelerator) -> torch.device:
    if accelerator is not None:
        return accelerator.device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def rank_slice(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of ``n`` taken by ``rank``: contiguous, disjoint, sizes differ by at most one."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@torch.no_grad()
def _batch_loss_sum(model, input_ids: torch.Tensor, eos_id: int | None = None) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over a batch (fp32), and the number of predicted tokens.
    ``eos_id``: document masking (see :mod:`cpt.data.masking`)."""
    per_token = token_losses(model, input_ids, eos_id)  # chunked (no full logits) where the model has it installed
    return per_token.sum(), per_token.numel()


def heldout_loss(model, tokens: torch.Tensor, batch_size: int, accelerator=None, eos_id: int | None = None) -> float:
    """Mean next-token loss (nats per predicted token) of ``model`` over all rows of ``tokens``.

    ``tokens`` is a ``LongTensor[n, L]`` of packed sequences (every position is a real token; each row
    predicts ``L - 1`` tokens). Under several processes each rank takes a disjoint slice of rows and
    the sums are reduced, so every rank returns the same value, equal (up to float summation order)
    to the single-process value. All ranks must call this function with the same ``tokens``.
    The model is put in eval mode and its previous mode is restored afterwards. With ``eos_id`` every
    document attends only to itself (``data.document_masking``; see :mod:`cpt.data.masking`).
    """
    if tokens.dim() != 2 or tokens.size(1) < 2:
        raise ValueError(f"tokens must be [n, L] with L >= 2, got shape {tuple(tokens.shape)}")
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    rank, world = rank_and_world(accelerator)
    device = _device(model, accelerator)
    n = tokens.size(0)
    start, end = rank_slice(n, rank, world)
    # same number of forward passes on every rank: the largest slice decides
    largest = n // world + (1 if n % world else 0)
    num_batches = math.ceil(largest / batch_size) if largest else 0

    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of token losses, token count]
    try:
        with torch.no_grad():
            for b in range(num_batches):
                lo = start + b * batch_size
                hi = min(lo + batch_size, end)
                if lo < hi:
                    batch = tokens[lo:hi].to(device, non_blocking=True)
                    weight = True
                else:  # this rank has run out of rows: a dummy pass keeps the collectives in step
                    batch = tokens[:1].to(device, non_blocking=True)
                    weight = False
                loss_sum, count = _batch_loss_sum(model, batch, eos_id)
                if weight:  # (not 0 * loss: a diverged model's inf would turn into nan)
                    totals[0] += loss_sum.double()
                    totals[1] += count
    finally:
        model.train(was_training)
    totals = sum_across_ranks(totals, accelerator)
    total_loss, total_count = totals.tolist()
    if total_count == 0:
        raise ValueError("held-out set has no tokens")
    return total_loss / total_count


# ---------------------------------------------------------------- named sets, schedule, forgetting


@dataclass
class HeldoutSet:
    """A named held-out set: ``tokens`` is ``LongTensor[n, L]`` (already cut to the token budget)."""

    name: str
    tag: Tag
    tokens: torch.Tensor
    # what the tokens cover (from cpt.data.loader.sample_heldout), logged as eval/<name>/docs, eval/<name>/tokens
    docs: int | None = None
    total_docs: int | None = None
    total_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.tag not in TAGS:
            raise ValueError(f"held-out set {self.name!r}: tag must be 'upstream' or 'downstream', got {self.tag!r}")
        if "/" in self.name:
            raise ValueError(f"held-out set name {self.name!r} must not contain '/' (it becomes a metric name)")

    @property
    def identity(self) -> str:
        """What is evaluated: ``<tokens> tokens as <rows>x<seq_len>:<hash of the tokens>`` (saved with the reference)."""
        cached = self.__dict__.get("_identity")
        if cached is None:
            t = self.tokens.detach().to("cpu", torch.int64).contiguous()
            digest = hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]
            cached = self.__dict__["_identity"] = f"{t.numel()} tokens as {t.shape[0]}x{t.shape[1]}:{digest}"
        return cached

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())


def heldout_sets(cfg, tokenizer, acc, say=print) -> list[HeldoutSet]:
    """The held-out sets of a run (``cfg``: the RunConfig's ``data.heldout``), each a seeded sample of whole documents
    up to ``eval.tokens_per_set`` tokens; rank 0 checks the files (sizes, and checksums with data.verify_checksums)."""
    from cpt.data.loader import sample_heldout

    sets = []
    for h in cfg.data.heldout:
        sample = sample_heldout(h, tokenizer, cfg.data.seq_len, h.max_tokens or cfg.eval.tokens_per_set, seed=cfg.eval.sample_seed,
                                verify=acc.is_main_process and cfg.data.verify_checksums, check_sizes=acc.is_main_process,
                                retry=cfg.data.remote)
        sets.append(HeldoutSet(h.name, h.tag, sample.tokens, sample.docs, sample.total_docs, sample.total_tokens))
        say(f"held-out set {h.name} ({h.tag}): evaluating {sample.describe()}")
    return sets


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 80.0))  # exp(80) ~ 5.5e34: keeps JSON/W&B finite for diverged runs


class HeldoutEvaluator:
    """Evaluates every held-out set, tracks the reference (first) losses and the worst point per set.

    ``evaluate(model, step)`` must be called on every rank (it runs collectives) and returns the same
    metrics dict on every rank. ``should_evaluate(step, stage_starts)`` says when to call it.
    """

    def __init__(self, sets: list[HeldoutSet], eval_cfg: EvalConfig | None = None, accelerator=None,
                 eos_id: int | None = None, samples=None):
        names = [s.name for s in sets]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate held-out set names {dup}")
        self.sets = list(sets)
        self.cfg = eval_cfg or EvalConfig()
        self.accelerator = accelerator
        self.eos_id = eos_id  # set: document masking, as in training
        self.samples = samples  # eval.samples: a cpt.samples.SampleGenerator, run at each evaluation by the loop
        self.reference: dict[str, float] = {}  # loss at the first evaluation (step 0)
        self.reference_step: int | None = None  # the run's first evaluation
        self.reference_steps: dict[str, int] = {}  # each set's first evaluation (later for a set added on a resume)
        self.identities: dict[str, str] = {}  # the samples the checkpoint's references were measured on
        self.worst: dict[str, tuple[float, int]] = {}  # highest loss and its step
        self.last: dict[str, tuple[float, int]] = {}  # latest loss and its step

    # -- schedule
    def should_evaluate(self, step: int, stage_starts: list[int] | tuple[int, ...] = (), last_step: int | None = None) -> bool:
        """True at step 0 (if ``eval.at_start``), every ``eval.every`` steps, every ``eval.dense_every``
        steps during the first ``eval.dense_steps`` steps after each stage start (including the start
        itself, i.e. the model just before the new stage), and at ``last_step`` when given.

        ``step`` counts optimizer updates done, so step 0 is the model before any training.
        """
        if not self.sets:
            return False
        if step == 0:
            return self.cfg.at_start
        if last_step is not None and step == last_step:
            return True
        if self.cfg.every is not None and step % self.cfg.every == 0:
            return True
        if self.cfg.dense_steps > 0:
            for s in stage_starts:
                if s <= step < s + self.cfg.dense_steps and (step - s) % self.cfg.dense_every == 0:
                    return True
        return False

    # -- evaluation
    def evaluate(self, model, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        by_tag: dict[str, list[float]] = {t: [] for t in TAGS}
        delta_by_tag: dict[str, list[float]] = {t: [] for t in TAGS}
        first = not self.reference
        for s in self.sets:
            loss = heldout_loss(model, s.tokens, self.cfg.batch_size, self.accelerator, self.eos_id)
            if s.name not in self.reference:
                self.reference[s.name], self.reference_steps[s.name] = loss, step
            if first:
                self.reference_step = step
            ref = self.reference[s.name]
            metrics[f"eval/{s.name}/loss"] = loss
            metrics[f"eval/{s.name}/ppl"] = _ppl(loss)
            metrics[f"eval/{s.name}/tokens"] = float(s.num_tokens)
            metrics[f"eval/{s.name}/reference_step"] = float(self.reference_steps[s.name])  # what forgetting/... is against
            if s.docs is not None:
                metrics[f"eval/{s.name}/docs"] = float(s.docs)
            if s.name not in self.worst or loss > self.worst[s.name][0]:
                self.worst[s.name] = (loss, step)
            self.last[s.name] = (loss, step)
            if s.tag == "upstream":
                metrics[f"forgetting/{s.name}"] = loss - ref
                metrics[f"eval/upstream_worst/{s.name}"] = self.worst[s.name][0]
                delta_by_tag["upstream"].append(loss - ref)
            else:
                metrics[f"adaptation/{s.name}"] = ref - loss
                delta_by_tag["downstream"].append(ref - loss)
            by_tag[s.tag].append(loss)
        for tag in TAGS:
            if by_tag[tag]:
                metrics[f"eval/{tag}/mean_loss"] = sum(by_tag[tag]) / len(by_tag[tag])
        if delta_by_tag["upstream"]:
            metrics["eval/upstream/mean_forgetting"] = sum(delta_by_tag["upstream"]) / len(delta_by_tag["upstream"])
        if delta_by_tag["downstream"]:
            metrics["eval/downstream/mean_adaptation"] = sum(delta_by_tag["downstream"]) / len(delta_by_tag["downstream"])
        return metrics

    def summary(self) -> list[dict[str, Any]]:
        """One row per set: name, tag, step0 (reference loss), step0_step (its step: 0 unless eval.at_start is off),
        final, final_step, change, worst, worst_step.

        ``change`` is forgetting (final - step0) for upstream sets and adaptation (step0 - final) for
        downstream sets. Values are None for a set not evaluated yet.
        """
        rows = []
        for s in self.sets:
            ref = self.reference.get(s.name)
            final, final_step = self.last.get(s.name, (None, None))
            worst, worst_step = self.worst.get(s.name, (None, None))
            change = None
            if ref is not None and final is not None:
                change = final - ref if s.tag == "upstream" else ref - final
            rows.append({
                "name": s.name, "tag": s.tag, "step0": ref, "step0_step": self.reference_steps.get(s.name, self.reference_step) if ref is not None else None,
                "final": final, "final_step": final_step,
                "change": change, "worst": worst, "worst_step": worst_step,
            })
        return rows

    # -- resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "reference": dict(self.reference),
            "reference_step": self.reference_step,
            "reference_steps": dict(self.reference_steps),
            # what each reference was measured on; a set left out of this run keeps its entry (added back later, its
            # reference is kept only for the same sample: it was kept whatever the sample)
            "samples": {**{k: v for k, v in self.identities.items() if k in self.reference},
                        **{s.name: s.identity for s in self.sets}},
            "worst": {k: [v, s] for k, (v, s) in self.worst.items()},
            "last": {k: [v, s] for k, (v, s) in self.last.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference = {k: float(v) for k, v in state.get("reference", {}).items()}
        self.reference_step = state.get("reference_step")
        self.reference_steps = {k: int(state.get("reference_steps", {}).get(k, self.reference_step or 0))
                                for k in self.reference}
        self.worst = {k: (float(v), int(s)) for k, (v, s) in state.get("worst", {}).items()}
        self.last = {k: (float(v), int(s)) for k, (v, s) in state.get("last", {}).items()}
        saved = self.identities = dict(state.get("samples", {}))
        for s in self.sets:  # another sample than the reference's (eval.tokens_per_set, sample_seed, its files changed)
            if s.name in self.reference and s.name in saved and saved[s.name] != s.identity:
                for d in (self.reference, self.reference_steps, self.worst, self.last):
                    d.pop(s.name, None)
                if self.accelerator is None or self.accelerator.is_main_process:
                    logging.getLogger("cpt.evaluate").warning(
                        f"held-out set {s.name!r} evaluates another sample than its reference was measured on "
                        f"({_sample_change(saved[s.name], s.identity)}: eval.tokens_per_set, eval.sample_seed, its "
                        "max_tokens or its files changed since the checkpoint): its forgetting/adaptation, reference and "
                        "worst point start again from its next evaluation")


def _sample_change(then: str, now: str) -> str:
    a, b = then.split(" as ")[0], now.split(" as ")[0]
    return f"{a} then, {b.split()[0]} now" if a != b else f"{a} as before, but other tokens"


def _fmt(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def reference_header(rows: list[dict[str, Any]]) -> str:
    """"step 0", or "reference (step N)" when the first evaluation came later (eval.at_start off): the column the
    changes are measured against must not claim to be the base model when it is not."""
    later = sorted({r["step0_step"] for r in rows if r.get("step0_step")})
    if mixed_reference(rows):
        return "reference (step)"
    return f"reference (step {', '.join(map(str, later))})" if later else "step 0"


def mixed_reference(rows: list[dict[str, Any]]) -> bool:
    """Whether the sets' references come from different steps (a set added on a resume is first evaluated later):
    then every reference cell names its step."""
    return len({r.get("step0_step") for r in rows if r.get("step0") is not None}) > 1


def format_summary_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of ``HeldoutEvaluator.summary()`` rows, for the end-of-run printout and logs: the first
    ("step 0") and the last evaluation with its step (a preempted run's last one may be early), the change, the worst."""
    header = ["set", "tag", reference_header(rows), "last", "last step", "forgetting/adaptation", "worst", "worst step"]
    body, mixed = [], mixed_reference(rows)
    for r in rows:
        ref = _fmt(r.get("step0")) + (f" ({r['step0_step']})" if mixed and r.get("step0") is not None else "")
        kind = "forgetting" if r["tag"] == "upstream" else "adaptation"
        change = "-" if r.get("change") is None else f"{kind} {r['change']:+.4f}"
        body.append([
            str(r["name"]), str(r["tag"]), ref, _fmt(r.get("final")),
            "-" if r.get("final_step") is None else str(r["final_step"]), change,
            _fmt(r.get("worst")), "-" if r.get("worst_step") is None else str(r["worst_step"]),
        ])
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in body]
    return "\n".join(out)
