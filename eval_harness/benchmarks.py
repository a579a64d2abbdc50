"""Benchmarks that track forgetting: lm-eval tasks tagged upstream/downstream, scored from step 0.

The held-out losses (:mod:`cpt.evaluate`) say what the model keeps and gains in nats; this module
says it in the currency users report, benchmark scores. ``eval.lm_eval.tasks`` entries are task
names (untagged: raw scores only) or ``{name, tag: upstream|downstream, limit}``. For every metric
of a tagged task it logs, next to lm-eval's ``lm_eval/<task>/<metric>`` and its ``..._stderr``::

    lm_eval_forgetting/<task>/<metric>          upstream: step-0 score - score (signed by lm-eval's
                                                higher_is_better, so positive always means "got worse")
    lm_eval_adaptation/<task>/<metric>          downstream: score - step-0 score, signed the same way
                                                (positive means "got better")
    lm_eval_forgetting/<task>/<metric>_stderr   (and lm_eval_adaptation/...): sqrt(se_0^2 + se^2)
    lm_eval_worst/<task>/<metric>               the worst score seen so far (lowest accuracy, highest
                                                perplexity), upstream tasks
    time/lm_eval_s                              seconds spent in lm-eval at this evaluation

The deltas' standard error treats the two scores as independent. Both are measured on the same
documents, whose scores are positively correlated, so this is an upper bound: a change below two
of these standard errors is reported as noise, a conservative call.

Same items every time: with ``limit`` a task is scored on a subset of its documents drawn with a
seeded generator keyed by ``(seed, task name)``: the same subset at every evaluation of the run
and in every run with the same seed (and task data). The subsets are chosen at the first
evaluation and kept in the checkpoint state, as are the step-0 scores and the worst points, so
a resumed run (or an anneal branch from one of its checkpoints) keeps measuring against the base model.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("cpt.lm_eval")

TAGS = ("upstream", "downstream")
DELTA_PREFIX = {"upstream": "lm_eval_forgetting", "downstream": "lm_eval_adaptation"}


@dataclass(frozen=True)
class TaskSpec:
    """One entry of ``eval.lm_eval.tasks``: a task, group or tag name, its tag and document limit."""

    name: str
    tag: str | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.tag not in (None, *TAGS):
            raise ValueError(f"lm-eval task {self.name!r}: tag must be upstream or downstream, got {self.tag!r}")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"lm-eval task {self.name!r}: limit must be positive")


def lm_eval_context(cfg) -> int:
    """The context length (lm-eval's ``max_length``) of a run's in-loop lm-eval: ``eval.lm_eval.max_length``, else
    ``data.seq_len``. (lm-eval alone on an export takes the model's context length unless ``max_length`` is given.)"""
    return cfg.eval.lm_eval.max_length or cfg.data.seq_len


def seeded_subset(task: str, num_docs: int, limit: int | None, seed: int) -> list[int] | None:
    """Sorted indices of ``limit`` of ``num_docs`` documents, drawn with a generator seeded by
    ``(seed, task)`` (Python's string seeding is stable across processes and machines); None: all."""
    if limit is None or limit >= num_docs:
        return None
    return sorted(random.Random(f"{seed}:{task}").sample(range(num_docs), limit))


def stderr_name(name: str) -> str:
    """``acc`` -> ``acc_stderr``; ``exact_match@strict`` -> ``exact_match_stderr@strict`` (lm_eval_hook's naming)."""
    metric, sep, filt = name.partition("@")
    return f"{metric}_stderr{sep}{filt}"


def delta_stderr(se_ref: float | None, se: float | None) -> float | None:
    if se_ref is None or se is None:
        return None
    return math.sqrt(se_ref ** 2 + se ** 2)


def is_noise(change: float | None, change_stderr: float | None) -> bool | None:
    """A change within two standard errors of zero; None when the stderr is unknown."""
    if change is None or change_stderr is None:
        return None
    return abs(change) <= 2 * change_stderr


class BenchmarkTracker:
    """Runs the tagged lm-eval tasks and keeps the step-0 scores, the worst point and the latest score.

    ``evaluate(model, tokenizer, step)`` runs lm-eval (on every rank; see :mod:`eval_harness.lm_eval_hook`)
    and returns the metrics to log; :meth:`record` is the bookkeeping alone (pure, for tests).
    ``should_evaluate(step, stage_starts)`` is the schedule; ``state_dict``/``load_state_dict`` carry the
    bookkeeping across resumes.
    """

    missing_ok = True  # (cpt/state.py: restore) tasks added on a resume of a run without them: scored from there on

    def __init__(self, tasks: list[TaskSpec], *, limit: int | None = None, seed: int = 0, every: int | None = None,
                 at_start: bool = True, dense_steps: int = 0, dense_every: int = 10, batch_size: int = 8,
                 include_path: str | None = None, bootstrap_iters: int = 100, max_length: int | None = None,
                 accelerator=None):
        if not tasks:
            raise ValueError("no lm-eval tasks given")
        names = [t.name for t in tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"eval.lm_eval.tasks: duplicate tasks {dup}")
        self.tasks = list(tasks)
        self.limit, self.seed, self.every, self.at_start = limit, seed, every, at_start
        self.dense_steps, self.dense_every = dense_steps, dense_every
        self.batch_size, self.include_path, self.bootstrap_iters = batch_size, include_path, bootstrap_iters
        self.max_length, self.accelerator = max_length, accelerator
        # bookkeeping, keyed "<task>/<metric>"
        self.samples: dict[str, list[int]] | None = None  # leaf task -> document indices (None until set up)
        self.leaves: set[str] = set()  # the leaf tasks whose documents are fixed (set up; all of them when not in samples)
        self.current: set[str] = set()  # the leaf tasks of this run's config (set up)
        self.task_tags: dict[str, str | None] = {}  # lm-eval task or group name -> tag
        self.reference: dict[str, tuple[float, float | None]] = {}  # step-0 (first) score and its stderr
        self.reference_step: int | None = None  # the first evaluation
        self.reference_steps: dict[str, int] = {}  # each key's first score (later for a task added on a resume)
        self.worst: dict[str, tuple[float, float | None, int]] = {}
        self.last: dict[str, tuple[float, float | None, int]] = {}
        self.higher: dict[str, bool] = {}
        self.tags: dict[str, str] = {}  # key -> tag (tagged keys only)
        self._sizes: dict[str, dict[str, int]] | None = None  # documents per leaf task (from_config loads them)
        self.echo: Any = lambda line: None  # the run's console (train: say): a line as each evaluation starts

    @classmethod
    def from_config(cls, cfg, accelerator=None, echo=None) -> "BenchmarkTracker":
        """From a :class:`cpt.config.RunConfig` (its ``eval`` and ``eval.lm_eval`` sections); ``echo``: the run's console
        (a line as each evaluation starts)."""
        from cpt.config import ConfigError
        from eval_harness.task_registry import UnknownTaskError, make_task_manager

        lm = cfg.eval.lm_eval
        try:  # a misspelt task fails here, before the run writes anything (and in `cpt train --dry-run`)
            make_task_manager([t.name for t in lm.tasks], lm.include_path)
        except UnknownTaskError as e:
            raise ConfigError(f"eval.lm_eval.tasks: {e}") from None
        tracker = cls([TaskSpec(t.name, t.tag, t.limit) for t in lm.tasks], limit=lm.limit,
                   seed=cfg.run.seed if lm.seed is None else lm.seed, every=lm.every, at_start=cfg.eval.at_start,
                   dense_steps=cfg.eval.dense_steps if lm.dense else 0, dense_every=cfg.eval.dense_every,
                   batch_size=lm.batch_size, include_path=lm.include_path, bootstrap_iters=lm.bootstrap_iters,
                   max_length=lm_eval_context(cfg), accelerator=accelerator)
        tracker._sizes = tracker.load_task_data()  # a task whose data is missing fails now, not at its first evaluation
        tracker.echo = echo or tracker.echo
        return tracker

    def load_task_data(self) -> dict[str, dict[str, int]]:
        """Each task's documents, counted (lm-eval loads its data: the bundled files, include_path's, the hub's); data
        that cannot be loaded (a moved file, no network for a hub task) is a :class:`cpt.config.ConfigError` naming the
        task, at the start of the run (with ``eval.at_start: false`` it used to be a traceback at the first evaluation,
        after ``eval.lm_eval.every`` steps of training)."""
        from cpt.config import ConfigError
        from eval_harness.task_registry import TaskDataError, loaded_task_sizes

        try:
            return loaded_task_sizes([t.name for t in self.tasks], self.include_path)
        except TaskDataError as e:
            raise ConfigError(f"eval.lm_eval.tasks: {e}") from None

    # -- schedule
    def needs_start_evaluation(self) -> bool:
        """Before the first step: when ``eval.at_start`` and no reference score is known yet (step 0 of a
        fresh run or a new stage; the start of an anneal branch of a run that had no benchmark scores)."""
        return self.at_start and self.reference_step is None

    def should_evaluate(self, step: int, stage_starts: list[int] | tuple[int, ...] = ()) -> bool:
        """After ``step`` updates (step >= 1): every ``every`` steps and, with ``dense``, every ``dense_every``
        steps during the first ``dense_steps`` steps of each stage. The end of the run is the caller's (``at_end``)."""
        if step <= 0:
            return False
        if self.every and step % self.every == 0:
            return True
        return any(s <= step < s + self.dense_steps and (step - s) % self.dense_every == 0 for s in stage_starts)

    # -- evaluation
    def _set_up(self) -> None:
        from eval_harness.task_registry import task_sizes

        sizes = self._sizes = self._sizes or task_sizes([t.name for t in self.tasks], self.include_path)
        if self.max_length:
            log.info("lm-eval: context length %d tokens (eval.lm_eval.max_length, default data.seq_len; lm-eval alone "
                     "on an export needs max_length=%d in its model_args for the same scores)", self.max_length, self.max_length)
        samples = dict(self.samples or {})  # (a task left out of this run keeps its documents, should it come back)
        self.current = set()
        for t in self.tasks:
            self.task_tags[t.name] = t.tag
            limit = t.limit if t.limit is not None else self.limit
            for leaf, n in sizes[t.name].items():
                self.task_tags[leaf] = t.tag
                chosen = seeded_subset(leaf, n, limit, self.seed)
                if leaf in self.leaves or (self.samples is not None and leaf in self.samples):  # resumed: its own documents
                    kept = (self.samples or {}).get(leaf)
                    if kept != chosen:  # another eval.lm_eval.limit / seed (or the task's limit) than at its reference
                        log.warning("lm-eval %s: the config now chooses %s of its %d documents, but this run's reference "
                                    "scores were measured on %s: it keeps scoring those (a new document subset needs a "
                                    "new reference: a new stage with train.init_from)", leaf,
                                    len(chosen) if chosen is not None else "all", n, len(kept) if kept is not None else "all")
                    chosen = kept
                    if chosen and max(chosen) >= n:
                        raise ValueError(f"lm-eval task {leaf}: the run's document subset needs {max(chosen) + 1} "
                                         f"documents but the task has {n} now (its data changed)")
                if chosen is not None:
                    samples[leaf] = chosen
                self.leaves.add(leaf)
                self.current.add(leaf)
                log.info("lm-eval %s (%s): %s of %d documents", leaf, t.tag or "untagged",
                         len(chosen) if chosen is not None else "all", n)
        self.samples = samples

    def evaluate(self, model, tokenizer, step: int) -> dict[str, float]:
        from eval_harness.lm_eval_hook import run_lm_eval_detailed

        t0 = time.perf_counter()
        if not self.task_tags:
            self._set_up()
        self.echo(self.start_line(step))  # a plain line as it starts: a long evaluation is not a silent batch log
        flat, raw = run_lm_eval_detailed(
            model, tokenizer, [t.name for t in self.tasks], batch_size=self.batch_size, include_path=self.include_path,
            accelerator=self.accelerator, max_length=self.max_length, bootstrap_iters=self.bootstrap_iters,
            samples={k: v for k, v in self.samples.items() if k in self.current} or None, seed=self.seed)
        metrics = self.record(step, flat, raw.get("higher_is_better") or {})
        metrics["time/lm_eval_s"] = time.perf_counter() - t0
        for key in not_finite(raw):  # dropped from the metrics: said, or the summary's "final" was silently older
            log.warning("lm-eval step %d: %s is not finite (NaN or inf): not logged%s", step, key,
                        f"; the summary keeps step {self.last[key][2]}'s" if key in self.last else "")
        return metrics

    def replay(self, step: int, logged: dict[str, float]) -> bool:
        """Take the ``lm_eval/*`` values a run logged at ``step`` as this tracker's evaluation of that step, without
        evaluating (a resume at the last step, whose killed start had logged the final scores: the summary's "final"
        was an older step's). False, nothing changed, when a scored metric's direction is not known (the tracker
        never scored it: lm-eval gives the direction with the scores)."""
        if not self.task_tags:
            self._set_up()
        higher: dict[str, dict[str, bool]] = {}
        for key in logged:
            task, _, name = key[len("lm_eval/"):].partition("/")
            if not key.startswith("lm_eval/") or "_stderr" in name or task not in self.task_tags:
                continue
            if f"{task}/{name}" not in self.higher:
                return False
            higher.setdefault(task, {})[name.partition("@")[0]] = self.higher[f"{task}/{name}"]
        self.record(step, logged, higher)
        return True

    def start_line(self, step: int) -> str:
        """``lm-eval step 40: scoring cpt_python_next (200 documents), hellaswag (all 10,042 documents)``."""
        parts = []
        for t in self.tasks:
            leaves = (self._sizes or {}).get(t.name, {})
            chosen = [len(self.samples[leaf]) if self.samples and leaf in self.samples else n for leaf, n in leaves.items()]
            whole = all(not (self.samples and leaf in self.samples) for leaf in leaves)
            parts.append(f"{t.name} ({'all ' if whole else ''}{sum(chosen):,} documents)")
        return f"lm-eval step {step}: scoring " + ", ".join(parts)

    def record(self, step: int, flat: dict[str, float], higher_is_better: dict[str, dict[str, Any]]) -> dict[str, float]:
        """Bookkeeping of one evaluation: ``flat`` is ``{"lm_eval/<task>/<metric>[_stderr]": value}``,
        ``higher_is_better`` lm-eval's ``{task: {metric: bool}}``. Returns ``flat`` plus the derived metrics."""
        metrics = dict(flat)
        if self.reference_step is None and step > 0 and self.at_start:  # no step-0 scores: a resume added the tasks
            log.warning("lm-eval: this run has no earlier scores of these tasks: forgetting and "
                        "adaptation are measured against this evaluation, at step %d (added on a resume or an anneal branch)", step)
        if self.reference_step is None:
            self.reference_step = step
        for key, value in flat.items():
            task, _, name = key[len("lm_eval/"):].partition("/")
            if not key.startswith("lm_eval/") or "_stderr" in name:
                continue
            tag = self.task_tags.get(task)
            higher = (higher_is_better.get(task) or {}).get(name.partition("@")[0])
            if tag is None or not isinstance(higher, bool):
                continue
            k = f"{task}/{name}"
            se = flat.get(f"lm_eval/{task}/{stderr_name(name)}")
            self.tags[k], self.higher[k] = tag, higher
            if k not in self.reference:
                self.reference[k], self.reference_steps[k] = (value, se), step
                if step > self.reference_step:
                    log.warning("lm-eval %s: first scored at step %d (added on a resume), later than the run's other "
                                "scores (step %d): its %s is measured against this score", k, step,
                                self.reference_step, "forgetting" if tag == "upstream" else "adaptation")
            ref, ref_se = self.reference[k]
            sign = 1.0 if higher else -1.0
            worse = (lambda a, b: a < b) if higher else (lambda a, b: a > b)
            if k not in self.worst or worse(value, self.worst[k][0]):
                self.worst[k] = (value, se, step)
            self.last[k] = (value, se, step)
            delta = sign * (ref - value) if tag == "upstream" else sign * (value - ref)
            delta += 0.0  # no -0.0
            metrics[f"{DELTA_PREFIX[tag]}/{k}"] = delta
            dse = delta_stderr(ref_se, se)
            if dse is not None:
                metrics[f"{DELTA_PREFIX[tag]}/{stderr_name(k)}"] = dse
            if tag == "upstream":
                metrics[f"lm_eval_worst/{k}"] = self.worst[k][0]
        return metrics

    def summary(self) -> list[dict[str, Any]]:
        """One row per tagged task metric: task, metric, tag, higher_is_better, step0 (+ _stderr, _step),
        final (+ _stderr, _step), change (forgetting for upstream, adaptation for downstream; positive =
        worse / better) and change_stderr, worst (+ worst_step) and noise (change within 2 stderr)."""
        rows = []
        for k in sorted(self.last, key=lambda k: (TAGS.index(self.tags[k]), k)):
            task, _, metric = k.partition("/")
            ref, ref_se = self.reference[k]
            final, se, final_step = self.last[k]
            worst, _, worst_step = self.worst[k]
            sign = 1.0 if self.higher[k] else -1.0
            change = (sign * (ref - final) if self.tags[k] == "upstream" else sign * (final - ref)) + 0.0
            cse = delta_stderr(ref_se, se)
            rows.append({"task": task, "metric": metric, "tag": self.tags[k], "higher_is_better": self.higher[k],
                         "step0": ref, "step0_stderr": ref_se, "step0_step": self.reference_steps.get(k, self.reference_step),
                         "final": final, "final_stderr": se, "final_step": final_step,
                         "change": change, "change_stderr": cse, "worst": worst, "worst_step": worst_step,
                         "noise": is_noise(change, cse)})
        return rows

    # -- resume
    def state_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "leaves": sorted(self.leaves), "reference_steps": dict(self.reference_steps),
                "reference": {k: list(v) for k, v in self.reference.items()},
                "reference_step": self.reference_step, "worst": {k: list(v) for k, v in self.worst.items()},
                "last": {k: list(v) for k, v in self.last.items()}, "higher": dict(self.higher), "tags": dict(self.tags)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.samples = state.get("samples")
        self.leaves = set(state.get("leaves") or ())
        self.reference = {k: (float(v), se) for k, (v, se) in (state.get("reference") or {}).items()}
        self.reference_step = state.get("reference_step")
        self.reference_steps = {k: int((state.get("reference_steps") or {}).get(k, self.reference_step or 0))
                                for k in self.reference}
        self.worst = {k: (float(v), se, int(s)) for k, (v, se, s) in (state.get("worst") or {}).items()}
        self.last = {k: (float(v), se, int(s)) for k, (v, se, s) in (state.get("last") or {}).items()}
        self.higher = dict(state.get("higher") or {})
        self.tags = dict(state.get("tags") or {})


def fmt_score(v: float | None, se: float | None = None, signed: bool = False) -> str:
    """``0.2500 ± 0.0250``; large values (perplexities) with 4 significant digits."""
    if v is None:
        return "-"
    spec = ".4f" if abs(v) < 100 else ".4g"
    text = format(v, ("+" if signed else "") + spec)
    return text if se is None else f"{text} ± {format(se, '.4f' if abs(se) < 100 else '.4g')}"


def not_finite(raw: dict[str, Any]) -> list[str]:
    """``<task>/<metric>`` of each score lm-eval computed as NaN or inf (``null`` in its cleaned results; stderrs not)."""
    out = []
    for task, metrics in sorted((raw.get("results") or {}).items()):
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if value is None and filt and not metric.endswith("_stderr"):
                out.append(f"{task}/{metric}" + ("" if filt == "none" else f"@{filt}"))
    return out


def format_benchmark_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of :meth:`BenchmarkTracker.summary` rows (the end-of-run printout, ``cpt report``)."""
    from cpt.evaluate import mixed_reference, reference_header

    header, mixed = ["task/metric", "tag", reference_header(rows), "final", "forgetting/adaptation", "worst (step)", "verdict"], mixed_reference(rows)
    body = []
    for r in rows:
        kind = "forgetting" if r["tag"] == "upstream" else "adaptation"
        ref = fmt_score(r["step0"], r.get("step0_stderr")) + (f" ({r['step0_step']})" if mixed else "")
        body.append([f"{r['task']}/{r['metric']}", r["tag"], ref,
                     fmt_score(r["final"], r.get("final_stderr")),
                     f"{kind} {fmt_score(r['change'], r.get('change_stderr'), signed=True)}",
                     f"{fmt_score(r['worst'])} ({r['worst_step']})", noise_label(r.get("noise"))])
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in body]
    return "\n".join(out)


def noise_label(noise: bool | None) -> str:
    return {True: "noise (< 2 se)", False: "significant", None: "(no stderr)"}[noise]


# ---------------------------------------------------------------- a model against a baseline (cpt eval --baseline)


def compare_scores(baseline: dict[str, float], model: dict[str, float],
                   higher_is_better: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per lm-eval score in both flat dicts (``lm_eval/<task>/<metric>``): baseline and model score with their
    stderrs, ``delta`` = model - baseline and its stderr, ``better`` (the model is better, by lm-eval's
    higher_is_better; None when unknown or equal) and ``noise`` (the delta is within two standard errors)."""
    rows = []
    for key in sorted(model):
        task, _, name = key[len("lm_eval/"):].partition("/")
        if not key.startswith("lm_eval/") or "_stderr" in name or key not in baseline:
            continue
        b, m = baseline[key], model[key]
        b_se, m_se = baseline.get(f"lm_eval/{task}/{stderr_name(name)}"), model.get(f"lm_eval/{task}/{stderr_name(name)}")
        higher = (higher_is_better.get(task) or {}).get(name.partition("@")[0])
        delta = m - b + 0.0
        dse = delta_stderr(b_se, m_se)
        better = None if not isinstance(higher, bool) or delta == 0 else (delta > 0) == higher
        rows.append({"task": task, "metric": name, "baseline": b, "baseline_stderr": b_se, "model": m,
                     "model_stderr": m_se, "delta": delta, "delta_stderr": dse, "better": better,
                     "noise": is_noise(delta, dse)})
    return rows


def format_comparison_table(rows: list[dict[str, Any]], model_label: str = "model", baseline_label: str = "baseline") -> str:
    header = ["task/metric", baseline_label, model_label, "delta (model - baseline)", "verdict"]
    body = []
    for r in rows:
        verdict = noise_label(r["noise"]) if r["noise"] is not False else ("better" if r["better"] else "worse" if r["better"] is False else "changed")
        body.append([f"{r['task']}/{r['metric']}", fmt_score(r["baseline"], r["baseline_stderr"]),
                     fmt_score(r["model"], r["model_stderr"]), fmt_score(r["delta"], r["delta_stderr"], signed=True), verdict])
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in body]
    return "\n".join(out)
