"""A run's metrics.jsonl as columns (:class:`RunData`, :func:`load_run`; :func:`run_series` for one key) and the numbers
read from it: per held-out set the step-0, final and worst loss with forgetting/adaptation (:func:`heldout_summary`),
the same per tagged benchmark with its standard error (:func:`benchmark_summary`), the other lm-eval values
(:func:`lm_eval_summary`). `cpt report` (cpt/report.py) plots and tabulates them; `cpt experiment` reads its runs here."""

from __future__ import annotations

import math
import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cpt.metrics import METRICS_FILE, iter_metrics


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class RunData:
    """A run's log as columns: each record's step and tokens, and for every key the (record, value) pairs where the
    record holds a number. A million-line metrics.jsonl held as dicts took about 15 GB (and every curve re-read all
    the records); as columns it is about 12 bytes per logged number."""

    label: str
    path: Path
    steps: array = field(default_factory=lambda: array("q"))
    tokens: array = field(default_factory=lambda: array("d"))
    columns: dict[str, tuple[array, array]] = field(default_factory=dict)
    keys: set[str] = field(default_factory=set)
    first: dict[str, Any] = field(default_factory=dict)  # the first and the last record
    last: dict[str, Any] = field(default_factory=dict)
    _switches: list[float] | None = field(default=None, repr=False)

    def add(self, r: dict[str, Any]) -> None:
        """Append one record (in the log's order)."""
        i, step, tok = len(self.steps), int(r.get("step", 0)), None
        if not self.steps:
            self.first = r
        self.last = r
        self.keys.update(r)
        for key, v in r.items():
            if _number(v):
                if tok is None:
                    tok = float(r.get("train/tokens", 0))
                col = self.columns.get(key) or self.columns.setdefault(key, (array("I"), array("d")))
                col[0].append(i)
                col[1].append(float(v))
        self.steps.append(step)
        self.tokens.append(tok if tok is not None else 0.0)
        self._switches = None

    def series(self, key: str) -> tuple[list[float], list[float], list[int]]:
        """(tokens, values, steps) of the records that hold ``key`` (numbers only), in step order,
        the last record winning when a step was logged twice."""
        by_step: dict[int, tuple[float, float]] = {}
        rows, values = self.columns.get(key, ((), ()))
        for i, v in zip(rows, values):
            by_step[self.steps[i]] = (self.tokens[i], v)
        steps = sorted(by_step)
        return [by_step[s][0] for s in steps], [by_step[s][1] for s in steps], steps

    def stage_switches(self) -> list[float]:
        """Tokens at which a stage starts (found once: every plot draws them): from the run's config.yaml, its stages'
        steps, at the tokens the log gives that step (between two records: interpolated, exact at a constant batch);
        without a readable config, where the logged ``stage`` index changes, which is up to ``train.log_every`` - 1
        steps after the switch (a training record is only every log_every steps) and misses a shorter stage."""
        if self._switches is None:
            starts = _stage_starts(self.path)
            if starts is not None and self.steps:
                tokens_at = dict(zip(self.steps, self.tokens))  # (a step logged twice: its last record's)
                steps = sorted(tokens_at)
                self._switches = [float(np.interp(s, steps, [tokens_at[k] for k in steps]))
                                  for s in starts if steps[0] <= s < steps[-1]]
            else:
                toks, stages, _ = self.series("stage")
                self._switches = [toks[i] for i in range(1, len(stages)) if stages[i] != stages[i - 1]]
        return list(self._switches)

    def sets(self, tag: str) -> list[str]:
        prefix = "forgetting/" if tag == "upstream" else "adaptation/"
        return sorted(k[len(prefix):] for k in self.keys if k.startswith(prefix))


def _stage_starts(path: Path) -> list[int] | None:
    """The steps at which the second and later stages start, from the config.yaml cpt saves beside metrics.jsonl;
    None without one it can read."""
    config = (path if path.is_dir() else path.parent) / "config.yaml"
    try:
        stages = yaml.safe_load(config.read_text())["stages"]
        lengths = [int(stage["steps"]) for stage in stages]
    except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError):
        return None
    return [sum(lengths[:k]) for k in range(1, len(lengths))]


def load_run(run_dir: str | os.PathLike, label: str | None = None) -> RunData:
    path = Path(run_dir)
    metrics = path / METRICS_FILE if path.is_dir() else path
    if not metrics.is_file():
        raise FileNotFoundError(f"{run_dir}: no {METRICS_FILE}")
    run = RunData(label or (path.name if path.is_dir() else path.parent.name), path)
    for record in iter_metrics(metrics):
        run.add(record)
    return run


_LAST_RUN: dict[str, Any] = {}


def run_series(run_dir: str | os.PathLike, key: str) -> tuple[list[float], list[float], list[int]]:
    """``load_run(run_dir).series(key)``, the log read once for consecutive calls on the same unchanged file (its path,
    size and modification time): `cpt experiment`'s tables ask each run for several keys, and each read parses the
    whole file. Only the last run read is kept."""
    path = Path(run_dir)
    metrics = path / METRICS_FILE if path.is_dir() else path
    st = metrics.stat()
    ident = (str(metrics.resolve()), st.st_size, st.st_mtime_ns)
    if _LAST_RUN.get("ident") != ident:
        _LAST_RUN.clear()
        _LAST_RUN.update(ident=ident, run=load_run(run_dir))
    return _LAST_RUN["run"].series(key)


def heldout_summary(run: RunData) -> list[dict[str, Any]]:
    """Per held-out set: name, tag, step0 (the reference loss the run measured forgetting/adaptation against),
    step0_step (None when that reference was evaluated before this run's log: an anneal branch or a run started from
    another run's checkpoint), final, change (the logged forgetting or adaptation at the end), worst (highest loss
    in this log), worst_step, worst_tokens, max_forgetting (upstream: worst - step0)."""
    rows = []
    for tag in ("upstream", "downstream"):
        for name in run.sets(tag):
            toks, losses, steps = run.series(f"eval/{name}/loss")
            if not losses:
                continue
            final = losses[-1]
            _, deltas, dsteps = run.series(f"{'forgetting' if tag == 'upstream' else 'adaptation'}/{name}")
            if deltas and dsteps[-1] == steps[-1]:  # the run's own reference, which may predate this log
                change = deltas[-1]
                step0 = final - change if tag == "upstream" else final + change
                step0_step = steps[0] if _reference_in_log(run) else None
                _, ref_steps, _ = run.series(f"eval/{name}/reference_step")  # (a reference set again on a resume)
                if ref_steps and ref_steps[-1] > (step0_step or 0):
                    step0_step = int(ref_steps[-1])
            else:  # a log without the deltas: its first evaluation
                step0, step0_step = losses[0], steps[0]
                change = final - step0 if tag == "upstream" else step0 - final
            since = [i for i in range(len(losses)) if steps[i] >= (step0_step or 0)] or range(len(losses))
            i_worst = max(since, key=lambda i: losses[i])  # (not before its reference: maybe another sample)
            row = {
                "name": name, "tag": tag, "step0": step0, "step0_step": step0_step, "final": final,
                "final_step": steps[-1], "change": change,
                "worst": losses[i_worst], "worst_step": steps[i_worst], "worst_tokens": toks[i_worst],
            }
            if tag == "upstream":
                row["max_forgetting"] = losses[i_worst] - step0
            rows.append(row)
    return rows


def _reference_in_log(run: RunData) -> bool:
    """Whether the run's reference evaluations (step 0) are in its own log: it starts at step 0. A run started from
    another run's checkpoint (an anneal branch) starts later and keeps measuring against the evaluations before it."""
    return not run.first or int(run.first.get("step", 0)) == 0


BENCH_PREFIX = {"upstream": "lm_eval_forgetting/", "downstream": "lm_eval_adaptation/"}


def stderr_key(key: str) -> str:
    from eval_harness.benchmarks import stderr_name

    return stderr_name(key)


def _is_stderr(key: str) -> bool:
    return "_stderr" in key.rpartition("/")[2]


def values_by_step(run: RunData, key: str) -> dict[int, float]:
    _, values, steps = run.series(key)
    return dict(zip(steps, values))


def benchmarks(run: RunData, tag: str) -> list[str]:
    """``<task>/<metric>`` of the tagged lm-eval metrics the run logged deltas for."""
    prefix = BENCH_PREFIX[tag]
    return sorted(k[len(prefix):] for k in run.keys if k.startswith(prefix) and not _is_stderr(k))


def benchmark_summary(run: RunData) -> list[dict[str, Any]]:
    """Per tagged lm-eval metric: task, metric, tag, step0 (+ _stderr), final (+ _stderr, final_step), change
    (forgetting / adaptation at the end; positive = worse / better) and change_stderr, worst (the score where
    the change was worst) and worst_step, noise (change within two standard errors; None without them)."""
    from eval_harness.benchmarks import is_noise

    rows = []
    for tag in ("upstream", "downstream"):
        for name in benchmarks(run, tag):
            _, scores, steps = run.series(f"lm_eval/{name}")
            _, deltas, dsteps = run.series(BENCH_PREFIX[tag] + name)
            if not scores or not deltas:
                continue
            se = values_by_step(run, stderr_key(f"lm_eval/{name}"))
            dse = values_by_step(run, stderr_key(BENCH_PREFIX[tag] + name))
            by_step = dict(zip(steps, scores))
            i = max(range(len(deltas)), key=lambda j: deltas[j]) if tag == "upstream" else \
                min(range(len(deltas)), key=lambda j: deltas[j])
            task, _, metric = name.partition("/")
            change, change_se = deltas[-1], dse.get(dsteps[-1])
            # an anneal branch measures against its trunk's step 0, which only the checkpoint holds: shown as unknown,
            # not as the branch's first score
            own = _reference_in_log(run)
            rows.append({"task": task, "metric": metric, "tag": tag, "step0": scores[0] if own else None,
                         "step0_stderr": se.get(steps[0]) if own else None, "step0_step": steps[0] if own else None,
                         "final": by_step.get(dsteps[-1], scores[-1]),
                         "final_stderr": se.get(dsteps[-1]), "final_step": dsteps[-1], "change": change,
                         "change_stderr": change_se, "worst": by_step.get(dsteps[i]), "worst_step": dsteps[i],
                         "noise": is_noise(change, change_se)})
    return rows


def lm_eval_summary(run: RunData) -> list[dict[str, Any]]:
    """First and final value of every lm-eval metric (standard errors and tagged metrics left to
    :func:`benchmark_summary`)."""
    tagged = {f"lm_eval/{n}" for tag in BENCH_PREFIX for n in benchmarks(run, tag)}
    rows = []
    for key in sorted(k for k in run.keys if k.startswith("lm_eval/") and not _is_stderr(k) and k not in tagged):
        _, values, steps = run.series(key)
        if values:
            rows.append({"metric": key[len("lm_eval/"):], "first": values[0], "first_step": steps[0],
                         "final": values[-1], "final_step": steps[-1]})
    return rows
