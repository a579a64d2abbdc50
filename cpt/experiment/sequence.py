"""`cpt experiment` on a dataset sequence: continual pre-training through corpora A, B, C, ... and the forgetting matrix.

A sequence spec lists corpora in order (``corpora: [...]``; e.g. configs/experiments/sequence_cpu.yaml).
For every seed and strategy one *trunk* run trains through the whole sequence: one `cpt train` run with one
stage per corpus, so every stage starts from the previous stage's weights, optimizer state and data
position (each corpus's stream continues where it stopped)::

    rewarm_cosine   stage 0: warmup + cosine (base_lr); every later stage re-warms from 0 to cpt_lr.max_lr
                    and re-decays (cosine) to cpt_lr.min_lr
    infinite        stage 0: warmup to cpt_lr.max_lr, cooldown to cpt_lr.constant_lr; every later stage
                    continues that constant trunk (continue_trunk: no re-warm, no decay). At every boundary
                    an anneal branch (the deployable model) takes the trunk's checkpoint and anneals to
                    cpt_lr.min_lr over anneal_fraction x stage_steps steps on the finished stage's data mix;
                    the trunk itself goes on un-annealed.

Stage 0 trains on corpus 0 only; stage k >= 1 draws ``replay`` of every batch from corpora 0..k-1 (split
equally, or in proportion to their training tokens: ``replay_split``) and the rest from corpus k.
Baseline (``baseline: true``, or ``"last"`` for the last boundary only; the expensive row): for every
boundary k >= 1, a model trained from scratch
(warmup + cosine, base_lr) on corpora 0..k mixed in the proportions the sequence fed them up to k, for as
many steps as the sequence took to get there. Every run is repeated per seed in ``seeds`` (data order and
initialisation); the data preparation (corpus samples, held-out split, tokenizer) uses ``seed``.

Every run evaluates the held-out set of every corpus (a seeded sample of whole documents, the same at every
evaluation): at step 0, at every boundary, regularly, and densely after each boundary (the stability gap).

The experiment folder (``out``)::

    spec.yaml, raw/, corpora/, tokenizer/, data/<corpus>/      as for the pair grid (cpt/experiment.py)
    runs/seed<s>-<strategy>/            the trunks
    runs/seed<s>-infinite-anneal<k>/    the anneal branch after stage k
    runs/seed<s>-scratch-upto<k>/       the from-scratch baseline on corpora 0..k
    results.md, results.csv             the forgetting matrices (mean ± std over seeds) and derived metrics;
                                        the csv holds every cell of every seed
    forgetting_matrix.png               one heatmap per strategy
    curves.png                          held-out loss of every corpus, each strategy on its own axes
    report/                             `cpt report` over all runs

The forgetting matrix of a strategy: ``L[k][j]`` = held-out loss (nats/token) on corpus j after stage k.
Derived (K corpora; lower loss is better):

    average loss         mean_j L[K-1][j]                          (the final model on every corpus)
    backward transfer    mean_{j<K-1} (L[K-1][j] - L[j][j])        (> 0: earlier corpora were forgotten)
    forward adaptation   mean_{j>=1} (L[j-1][j] - L[j][j])         (how far each new corpus's loss fell
                                                                    during its own stage)

Finished runs are skipped and killed ones resumed, as for the pair grid: run the same command again.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import time
from dataclasses import dataclass
from math import gcd
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from cpt.config import Strict
from cpt.experiment import (
    RESULTS_CSV, RESULTS_MD, CorpusSpec, EvalSpec, ExperimentError, LRSpec, RunPlan, TokenizerSpec, WandbSpec,
    _cosine, _prepare_data, _series, _warmup_steps, flops_per_token, run_configs, run_finished, run_one,
)

STRATEGIES = ("rewarm_cosine", "infinite")
# the rows of the results: a trunk per strategy, the infinite trunk's anneal branches, the from-scratch baseline
LABELS = {"rewarm_cosine": "rewarm_cosine", "infinite": "infinite (trunk)", "anneal": "infinite (annealed)",
          "scratch": "scratch (union)"}


# ================================================================ the spec


class SequenceSpec(Strict):
    """Corpora in order, model shape, budgets, strategies, replay, seeds (see the module docstring)."""

    name: str = Field("sequence", pattern=r"^[A-Za-z0-9_.-]+$")
    corpora: list[CorpusSpec] = Field(min_length=2)
    tokenizer: TokenizerSpec
    model: dict[str, Any]
    seq_len: int = Field(gt=1)
    global_batch_size: int = Field(gt=0)
    micro_batch_size: int = Field(gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    base_tokens: int = Field(gt=0)  # stage 0 (corpus 0); rounded to whole steps
    stage_tokens: int = Field(gt=0)  # every later stage
    strategies: list[Literal["rewarm_cosine", "infinite"]] = Field(default_factory=lambda: list(STRATEGIES), min_length=1)
    replay: float = Field(0.0, ge=0, lt=1)  # share of every batch of stage k >= 1 drawn from corpora 0..k-1
    replay_split: Literal["equal", "tokens"] = "equal"  # across the earlier corpora: equally, or by their training tokens
    seeds: list[int] = Field(default_factory=lambda: [1234], min_length=1)  # every run once per seed
    # from scratch on the union of corpora 0..k: true = at every boundary k >= 1, "last" = only after the last stage
    baseline: bool | Literal["last"] = False
    base_lr: LRSpec = Field(default_factory=LRSpec)  # rewarm_cosine's stage 0 and the baseline
    cpt_lr: LRSpec = Field(default_factory=LRSpec)  # rewarm_cosine's later stages; the whole infinite trunk
    optim: dict[str, Any] = Field(default_factory=lambda: {"weight_decay": 0.1, "grad_clip": 1.0})
    eval: EvalSpec = Field(default_factory=EvalSpec)
    max_epochs_warning: float = Field(8.0, gt=0)
    seed: int = 1234  # data preparation: corpus samples, held-out split, tokenizer sample
    num_proc: int = Field(1, gt=0)
    log_every: int = Field(10, gt=0)
    progress_bar: bool = True
    wandb: WandbSpec = Field(default_factory=WandbSpec)
    run_overrides: list[str] = Field(default_factory=list)
    torch_threads: int | None = Field(None, gt=0)
    assumed_tokens_per_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _checks(self) -> "SequenceSpec":
        errors = []
        names = [c.name for c in self.corpora]
        if len(set(names)) != len(names):
            errors.append(f"corpora: duplicate names {names}")
        if len(set(self.seeds)) != len(self.seeds):
            errors.append(f"seeds: duplicates {self.seeds}")
        if len(set(self.strategies)) != len(self.strategies):
            errors.append(f"strategies: duplicates {self.strategies}")
        if self.global_batch_size % self.micro_batch_size:
            errors.append(f"global_batch_size ({self.global_batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})")
        if "model_type" not in self.model:
            errors.append("model: model_type is required (e.g. llama)")
        for what in ("base_tokens", "stage_tokens"):
            if getattr(self, what) < self.tokens_per_step:
                errors.append(f"{what} ({getattr(self, what)}) is less than one step ({self.tokens_per_step} tokens)")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    # -- derived numbers
    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    @property
    def stage_steps(self) -> list[int]:
        first = max(1, round(self.base_tokens / self.tokens_per_step))
        later = max(1, round(self.stage_tokens / self.tokens_per_step))
        return [first] + [later] * (len(self.corpora) - 1)

    @property
    def boundaries(self) -> list[int]:
        """The trunk step at the end of every stage (row k of the forgetting matrix is evaluated there)."""
        out, total = [], 0
        for n in self.stage_steps:
            total += n
            out.append(total)
        return out

    @property
    def anneal_steps(self) -> int:
        return max(1, round(self.cpt_lr.anneal_fraction * self.stage_steps[-1]))


def is_sequence_spec(spec: Any) -> bool:
    """A spec with ``corpora`` (a list) is a dataset sequence; one with corpus_a/corpus_b is the pair grid."""
    if isinstance(spec, SequenceSpec):
        return True
    if isinstance(spec, dict):
        return "corpora" in spec
    if isinstance(spec, (str, os.PathLike)) and Path(spec).is_file():
        try:
            data = yaml.safe_load(Path(spec).read_text())
        except yaml.YAMLError:
            return False
        return isinstance(data, dict) and "corpora" in data
    return False


def load_sequence_spec(spec: str | os.PathLike | dict | SequenceSpec, overrides: list[str] | None = None) -> SequenceSpec:
    from cpt.config import ConfigError, apply_overrides, format_validation_error, read_yaml_mapping

    if isinstance(spec, SequenceSpec):
        data = spec.model_dump(mode="json")
    elif isinstance(spec, dict):
        data = copy.deepcopy(spec)
    else:
        data = read_yaml_mapping(spec, "spec", "corpora, model, ...", ExperimentError)
    try:
        return SequenceSpec.model_validate(apply_overrides(data, overrides or []))
    except ConfigError as e:
        raise ExperimentError(str(e)) from None
    except ValidationError as e:
        raise ExperimentError(format_validation_error(e).replace("invalid config", "invalid sequence spec", 1)) from None


# ================================================================ the runs


@dataclass
class SeqRun:
    plan: RunPlan
    seed: int
    label: str  # a key of LABELS
    row: int | None = None  # anneal branches and baselines: the matrix row (boundary) they give


def replay_mix(spec: SequenceSpec, k: int, corpus_tokens: dict[str, int] | None = None) -> dict[str, float]:
    """The data mix of stage ``k``: corpus k, plus ``replay`` split over corpora 0..k-1 (every corpus named, 0 if unused)."""
    names = [c.name for c in spec.corpora]
    mix = dict.fromkeys(names, 0.0)
    if k == 0 or spec.replay == 0:
        mix[names[k]] = 1.0
        return mix
    earlier = names[:k]
    if spec.replay_split == "tokens" and corpus_tokens:
        weights = [float(corpus_tokens[n]) for n in earlier]
    else:
        weights = [1.0] * k
    mix[names[k]] = 1.0 - spec.replay
    for n, w in zip(earlier, weights):
        mix[n] = spec.replay * w / sum(weights)
    return mix


def tokens_seen(spec: SequenceSpec, upto: int, corpus_tokens: dict[str, int] | None = None) -> dict[str, float]:
    """Training tokens of every corpus the sequence fed up to the end of stage ``upto`` (by the configured shares)."""
    seen = {c.name: 0.0 for c in spec.corpora[: upto + 1]}
    for k in range(upto + 1):
        for name, share in replay_mix(spec, k, corpus_tokens).items():
            if share > 0:
                seen[name] += share * spec.stage_steps[k] * spec.tokens_per_step
    return seen


def _infinite_trunk(lr: LRSpec, first_steps: int, k: int) -> dict[str, Any]:
    """Stage k of the infinite trunk: warmup and cooldown within stage 0, constant after (continue_trunk)."""
    warm = min(_warmup_steps(lr.warmup_fraction, first_steps), first_steps)
    cool = max(0, min(round(lr.cooldown_fraction * first_steps), first_steps - warm))
    const = min(lr.constant, lr.max_lr) if cool > 0 else lr.max_lr
    sched = {"type": "infinite", "max_lr": lr.max_lr, "min_lr": min(lr.min_lr, const), "warmup_steps": warm,
             "warmup_from": 0.0, "cooldown_steps": cool, "cooldown_shape": lr.cooldown_shape, "constant_lr": const}
    if lr.cooldown_shape == "inverse_sqrt":
        sched["timescale"] = max(1, warm)
    if k > 0:
        sched["continue_trunk"] = True
    return sched


def _divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, n + 1) if n % d == 0 and d <= max(1, limit))


def plan_sequence(spec: SequenceSpec, out: Path, tokenizer_dir: Path, data_dir: Path,
                  corpus_tokens: dict[str, int] | None = None) -> list[SeqRun]:
    """Every run (trunks, then their anneal branches, then baselines), per seed, in the order they run."""
    names = [c.name for c in spec.corpora]
    K = len(names)
    steps, ends = spec.stage_steps, spec.boundaries
    total = ends[-1]
    g = 0
    for n in steps:
        g = gcd(g, n)  # every boundary is a multiple of g: checkpoints and evaluations land on them
    arch = dict(spec.model)
    arch.setdefault("max_position_embeddings", spec.seq_len)
    sources = [{"name": n, "path": str(data_dir / n)} for n in names]
    heldout = [{"name": n, "path": str(data_dir / n / "heldout"), "tag": "downstream" if j == K - 1 else "upstream"}
               for j, n in enumerate(names)]
    dense_steps = round(spec.eval.dense_fraction * steps[-1])

    def config(run: str, seed: int, stages: list[dict], n_steps: int, ckpt_every: int, keep: int) -> dict[str, Any]:
        ev: dict[str, Any] = {"every": _divisor_at_most(g, n_steps // spec.eval.evals_per_run), "at_start": True,
                              "tokens_per_set": spec.eval.tokens_per_set, "batch_size": spec.eval.batch_size}
        if dense_steps > 0:
            ev.update(dense_steps=dense_steps, dense_every=max(1, dense_steps // spec.eval.dense_evals))
        wandb: dict[str, Any] = {"enabled": spec.wandb.enabled}
        if spec.wandb.enabled:
            wandb.update(project=spec.wandb.project, group=spec.name, mode=spec.wandb.mode, tags=[run])
        cfg = {
            "run": {"name": f"{spec.name}-{run}", "output_dir": str(out / "runs" / run), "seed": seed},
            "model": {"tokenizer": str(tokenizer_dir), "arch": copy.deepcopy(arch)},
            "data": {"seq_len": spec.seq_len, "sources": copy.deepcopy(sources), "heldout": copy.deepcopy(heldout),
                     "max_epochs_warning": spec.max_epochs_warning},
            "stages": stages,
            "optim": copy.deepcopy(spec.optim),
            "train": {"global_batch_size": spec.global_batch_size, "micro_batch_size": spec.micro_batch_size,
                      "precision": spec.precision, "log_every": min(spec.log_every, n_steps),
                      "progress_bar": spec.progress_bar},
            "eval": ev,
            "checkpoint": {"every": ckpt_every, "keep": keep, "export_at_end": True},
            "logging": {"plot": False, "wandb": wandb},
        }
        if spec.run_overrides:
            from cpt.config import apply_overrides

            cfg = apply_overrides(cfg, spec.run_overrides)
        return cfg

    def trunk_stages(strategy: str) -> list[dict]:
        out_stages = []
        for k in range(K):
            if strategy == "rewarm_cosine":
                sched = _cosine(spec.base_lr if k == 0 else spec.cpt_lr, steps[k])
            else:
                sched = _infinite_trunk(spec.cpt_lr, steps[0], k)
            out_stages.append({"name": f"{k}-{names[k]}", "steps": steps[k], "mix": replay_mix(spec, k, corpus_tokens),
                               "schedule": sched})
        return out_stages

    runs: list[SeqRun] = []
    A = spec.anneal_steps
    for seed in spec.seeds:
        for strategy in spec.strategies:
            name = f"seed{seed}-{strategy}"
            stages = trunk_stages(strategy)
            # a checkpoint at every multiple of g, all kept: the anneal branches start from the boundary ones
            cfg = config(name, seed, stages, total, g, total // g + 1)
            runs.append(SeqRun(RunPlan(name, "cpt", strategy, spec.replay, total, cfg), seed, strategy))
            if strategy != "infinite":
                continue
            trunk_dir = out / "runs" / name
            for k in range(K):
                branch = f"seed{seed}-infinite-anneal{k}"
                bcfg = config(branch, seed, copy.deepcopy(stages[: k + 1]), A, A, 1)
                bcfg["train"].update(init_from=str(trunk_dir / "checkpoints" / f"step_{ends[k]:08d}"), anneal_steps=A,
                                     anneal_shape=spec.cpt_lr.anneal_shape)
                bcfg["eval"]["every"] = max(1, A // 2)
                bcfg["eval"].pop("dense_steps", None)
                bcfg["eval"].pop("dense_every", None)
                runs.append(SeqRun(RunPlan(branch, "cpt", "anneal", spec.replay, ends[k] + A, bcfg), seed, "anneal", k))
        if spec.baseline:
            for k in range(1 if spec.baseline is True else K - 1, K):
                run = f"seed{seed}-scratch-upto{k}"
                seen = tokens_seen(spec, k, corpus_tokens)
                mix = {n: seen.get(n, 0.0) / sum(seen.values()) for n in names}
                n_steps = ends[k]
                st = [{"name": f"scratch-0..{k}", "steps": n_steps, "mix": mix, "schedule": _cosine(spec.base_lr, n_steps)}]
                cfg = config(run, seed, st, n_steps, max(1, n_steps // 2), 2)
                runs.append(SeqRun(RunPlan(run, "baseline", "cosine", None, n_steps, cfg), seed, "scratch", k))
    return runs


# ================================================================ running


def run_sequence_experiment(spec_path_or_spec, out_dir: str | os.PathLike | None = None, echo: Callable = print, *,
                            overrides: list[str] | None = None, max_runs: int | None = None, dry_run: bool = False) -> Path:
    """`cpt experiment` on a dataset-sequence spec (`corpora: [A, B, C, ...]`): load it, then :func:`run_sequence`
    (the pair grid is :func:`cpt.experiment.run_experiment`)."""
    spec = load_sequence_spec(spec_path_or_spec, overrides)
    out = Path(out_dir) if out_dir is not None else Path("runs") / "experiments" / spec.name
    if dry_run:
        return run_sequence(spec, out, echo, dry_run=True)
    import torch

    threads = torch.get_num_threads()
    if getattr(spec, "torch_threads", None):
        torch.set_num_threads(spec.torch_threads)
    try:
        return run_sequence(spec, out, echo, max_runs=max_runs)
    finally:
        torch.set_num_threads(threads)


def run_sequence(spec: SequenceSpec, out: Path, echo: Callable = print, *, max_runs: int | None = None,
                 dry_run: bool = False) -> Path:
    """Run (or continue) every run of the sequence and write results.md/csv and the figures; return results.md."""
    if dry_run:
        return _dry_run(spec, out, echo)
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    echo(f"experiment {spec.name} (a sequence of {len(spec.corpora)} corpora, {len(spec.seeds)} seed(s)) -> {out}")
    tokenizer, tok_dir, corpus_tokens = _prepare_data(spec, out, echo)
    runs = plan_sequence(spec, out, tok_dir, out / "data", corpus_tokens)
    cfgs = run_configs([r.plan for r in runs])
    counts = {"skipped": 0, "trained": 0, "resumed": 0}
    stopped = None
    for r in runs:
        plan = r.plan
        if max_runs is not None and counts["trained"] + counts["resumed"] >= max_runs and not run_finished(plan.run_dir, plan.steps):
            stopped = f"stopped after {max_runs} run(s) (max_runs): run the same command again to continue"
            break
        status = run_one(plan, cfgs[plan.name], echo)
        if status == "preempted":
            stopped = f"{plan.name} was preempted (checkpoint saved): run the same command again to resume"
            break
        counts[status] += 1
        if status == "skipped":
            echo(f"--- {plan.name}: finished earlier, skipped")

    fpt, shape = flops_per_token(spec, len(tokenizer))
    cells = collect_matrix(spec, runs)
    md = write_results(spec, cells, runs, out, shape, corpus_tokens)
    finished = [r.plan.run_dir for r in runs if run_finished(r.plan.run_dir, r.plan.steps)]
    if finished:
        from cpt.report import write_report

        write_report(finished, out / "report")
        plot_matrix(spec, cells, out / "forgetting_matrix.png")
        plot_sequence_curves(spec, runs, out / "curves.png")
    echo(md.read_text())
    echo(f"runs: {counts['trained']} trained, {counts['resumed']} resumed, {counts['skipped']} skipped; "
         f"{(time.perf_counter() - t0) / 60:.1f} min")
    if stopped:
        echo(stopped)
    echo(f"tables: {md} and {out / RESULTS_CSV}; heatmap: {out / 'forgetting_matrix.png'}; curves: {out / 'curves.png'}")
    return md


def _dry_run(spec: SequenceSpec, out: Path, echo: Callable) -> Path:
    from cpt.experiment import resolve_corpus
    from cpt.schedules import LRPlan, ScheduleConfig

    for c in spec.corpora:
        files, nbytes = resolve_corpus(c, None, spec.seed, echo)
        echo(f"corpus {c.name}: {len(files)} files, {nbytes / 1e6:.1f} MB")
    runs = plan_sequence(spec, out, out / "tokenizer", out / "data")
    run_configs([r.plan for r in runs])
    vocab = spec.tokenizer.train.vocab_size if spec.tokenizer.train else None
    if vocab is None:
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(spec.tokenizer.path))
    fpt, shape = flops_per_token(spec, vocab)
    echo(f"model: {shape['n_params'] / 1e6:.1f}M parameters, {shape['n_layers']} layers, hidden {shape['hidden']}; "
         f"{fpt:.3g} training FLOPs/token")
    total_tokens = 0
    for r in runs:
        p = r.plan
        tr = p.config["train"]
        stages = p.config["stages"]
        lr = LRPlan([(st["steps"], ScheduleConfig(**st["schedule"])) for st in stages])
        start = 0
        if tr.get("anneal_steps"):
            start = lr.total_steps
            lr = lr.anneal_branch(start, tr["anneal_steps"], tr["anneal_shape"])
        n = p.steps - start
        total_tokens += n * spec.tokens_per_step
        marks = sorted({start, start + n // 2, p.steps - 1} | set(lr.starts[1:] if not tr.get("anneal_steps") else []))
        echo(f"  {p.name:<32} steps {start}..{p.steps} ({n * spec.tokens_per_step:,} tokens)  "
             + " ".join(f"lr[{m}]={lr.lr(m):.2e}" for m in marks))
        if not tr.get("anneal_steps"):
            for st in stages:
                echo(f"  {'':<32}   {st['name']}: {st['steps']} steps, mix "
                     + ", ".join(f"{k} {v:.3g}" for k, v in st["mix"].items() if v > 0))
    echo(f"total: {total_tokens:,} training tokens, {total_tokens * fpt:.3g} FLOPs")
    if spec.assumed_tokens_per_s:
        echo(f"at {spec.assumed_tokens_per_s:,.0f} tokens/s: {total_tokens / spec.assumed_tokens_per_s / 60:.1f} min of training "
             "(plus data preparation, evaluation and start-up)")
    return out / RESULTS_MD


# ================================================================ the forgetting matrix


Cells = dict[tuple[str, int], list[list[float | None]]]  # (label, seed) -> L[k][j]


def _loss_at(run_dir: Path, corpus: str, step: int) -> float | None:
    _, vals, steps = _series(run_dir, f"eval/{corpus}/loss")
    by = dict(zip(steps, vals))
    return by.get(step)


def collect_matrix(spec: SequenceSpec, runs: list[SeqRun]) -> Cells:
    """``L[k][j]`` per (label, seed) from every finished run; None where a run has not finished."""
    names = [c.name for c in spec.corpora]
    K, ends = len(names), spec.boundaries
    cells: Cells = {}
    for r in runs:
        if not run_finished(r.plan.run_dir, r.plan.steps):
            continue
        if r.row is None:  # a trunk: every row at its boundary
            m = [[_loss_at(r.plan.run_dir, n, ends[k]) for n in names] for k in range(K)]
            cells[(r.label, r.seed)] = m
        else:
            m = cells.setdefault((r.label, r.seed), [[None] * K for _ in range(K)])
            m[r.row] = [_loss_at(r.plan.run_dir, n, r.plan.steps) for n in names]
    return cells


def derived(m: list[list[float | None]]) -> dict[str, float | None]:
    """Average final loss, backward transfer and forward adaptation of one matrix (None where cells are missing)."""
    K = len(m)

    def mean(xs: list[float | None]) -> float | None:
        return None if not xs or any(x is None for x in xs) else sum(xs) / len(xs)  # type: ignore[arg-type]

    last = m[K - 1]
    bwt = [None if last[j] is None or m[j][j] is None else last[j] - m[j][j] for j in range(K - 1)]
    fwd = [None if m[j - 1][j] is None or m[j][j] is None else m[j - 1][j] - m[j][j] for j in range(1, K)]
    return {"average_loss": mean(list(last)), "backward_transfer": mean(bwt), "forward_adaptation": mean(fwd)}


def mean_std(xs: list[float]) -> tuple[float, float | None, int]:
    """Mean, sample standard deviation (None for one value) and count."""
    n = len(xs)
    mu = sum(xs) / n
    sd = math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return mu, sd, n


def _pm(xs: list[float], signed: bool = False) -> str:
    if not xs:
        return "–"
    mu, sd, _ = mean_std(xs)
    f = "{:+.4f}" if signed else "{:.4f}"
    return f.format(mu) + ("" if sd is None else f" ± {sd:.4f}")


# two-sided 95% critical values of Student's t for 1..10 degrees of freedom (then ~1.96-2.2: 2.2 is used)
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def compare(a: list[float], b: list[float], what: str, name_a: str, name_b: str) -> str | None:
    """A plain statement on ``mean(a) - mean(b)`` over seeds paired by index (the same seed: the same
    initialisation and data order of stage 0). The difference is *within the noise* when its 95% confidence
    interval (mean of the paired differences ± t(0.975, n-1) x standard error) contains 0."""
    n = min(len(a), len(b))
    if n == 0:
        return None
    d = [x - y for x, y in zip(a[:n], b[:n])]
    mu, sd, _ = mean_std(d)
    head = f"{what}: {name_a} minus {name_b} = {mu:+.4f}"
    if sd is None:
        return head + " (one seed: no estimate of the noise)."
    half = (T95[n - 2] if n - 1 <= len(T95) else 2.2) * sd / math.sqrt(n)
    verdict = ("within the noise" if abs(mu) < half else
               ("lower" if mu < 0 else "higher") + f" for {name_a}, beyond the noise")
    return f"{head} (95% interval ± {half:.4f} over {n} paired seeds): {verdict}."


def _by_label(cells: Cells, spec: SequenceSpec) -> dict[str, dict[int, list[list[float | None]]]]:
    out: dict[str, dict[int, list[list[float | None]]]] = {}
    for (label, seed), m in cells.items():
        out.setdefault(label, {})[seed] = m
    order = [l for l in LABELS if l in out]
    return {l: dict(sorted(out[l].items(), key=lambda kv: spec.seeds.index(kv[0]))) for l in order}


def write_results(spec: SequenceSpec, cells: Cells, runs: list[SeqRun], out: Path, shape: dict[str, int],
                  corpus_tokens: dict[str, int]) -> Path:
    names = [c.name for c in spec.corpora]
    K = len(names)
    by = _by_label(cells, spec)
    # every cell of every seed (the raw data of the tables)
    with open(out / (RESULTS_CSV + ".tmp"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["strategy", "seed", "after_stage", "corpus", "loss"])
        for label, seeds in by.items():
            for seed, m in seeds.items():
                for k in range(K):
                    for j, n in enumerate(names):
                        if m[k][j] is not None:
                            w.writerow([LABELS[label], seed, k, n, m[k][j]])
        for label, seeds in by.items():
            for seed, m in seeds.items():
                for key, v in derived(m).items():
                    if v is not None:
                        w.writerow([LABELS[label], seed, "", key, v])
    os.replace(out / (RESULTS_CSV + ".tmp"), out / RESULTS_CSV)

    steps = spec.stage_steps
    n_seeds = len(spec.seeds)
    lines = [
        f"# Experiment `{spec.name}`: continual pre-training through a sequence of {K} corpora",
        "",
        "Corpora in order: " + ", ".join(f"{k}. `{n}` ({corpus_tokens.get(n, 0):,} training tokens)" for k, n in enumerate(names))
        + f". Stage 0: {steps[0]} steps, every later stage {steps[-1]} steps, {spec.tokens_per_step:,} tokens per step. "
        f"Replay: {spec.replay:.0%} of every batch of stage k >= 1 from corpora 0..k-1 "
        f"({'split equally' if spec.replay_split == 'equal' else 'split by their training tokens'}). "
        f"Model: {shape['n_params'] / 1e6:.2f}M parameters, {shape['n_layers']} layers, hidden {shape['hidden']}, "
        f"seq_len {spec.seq_len}, precision {spec.precision}. Seeds: {spec.seeds} (data order and initialisation).",
        "",
        "L[k][j] = held-out loss (nats/token) on corpus j after stage k, as mean ± sample standard deviation over the seeds "
        f"(n = {n_seeds} unless a run is missing). Held-out sets: a seeded sample of whole documents up to "
        f"{spec.eval.tokens_per_set:,} tokens per corpus, the same for every run. Average loss = mean of the last row; "
        "backward transfer = mean over j < K-1 of L[K-1][j] - L[j][j] (> 0: forgetting); forward adaptation = mean over "
        "j >= 1 of L[j-1][j] - L[j][j] (the drop of each new corpus's loss during its own stage). "
        "A difference between strategies is called within the noise when the 95% confidence interval of its paired "
        "per-seed differences (Student's t, n - 1 degrees of freedom) contains 0; with 2 seeds that interval is wide. "
        f"`infinite (trunk)` is the un-annealed constant-LR trunk; `infinite (annealed)` row k is the anneal branch taken "
        f"off the trunk at the end of stage k ({spec.anneal_steps} extra steps on stage k's data mix, not part of the trunk); "
        "`scratch (union)` row k is a model trained from scratch on corpora 0..k with the sequence's token counts up to k.",
        "",
        "## Summary",
        "",
        "| strategy | seeds | average loss (last row) | backward transfer | forward adaptation |",
        "|---|---:|---:|---:|---:|",
    ]
    stats: dict[str, dict[str, list[float]]] = {}
    for label, seeds in by.items():
        st = {key: [] for key in ("average_loss", "backward_transfer", "forward_adaptation")}
        for m in seeds.values():
            for key, v in derived(m).items():
                if v is not None:
                    st[key].append(v)
        stats[label] = st
        lines.append(f"| {LABELS[label]} | {len(seeds)} | {_pm(st['average_loss'])} | {_pm(st['backward_transfer'], True)} "
                     f"| {_pm(st['forward_adaptation'], True)} |")
    for label, seeds in by.items():
        lines += ["", f"## Forgetting matrix: {LABELS[label]}", "",
                  "| after stage | " + " | ".join(f"{j}. {n}" for j, n in enumerate(names)) + " | mean (seen) |",
                  "|---|" + "---:|" * (K + 1)]
        for k in range(K):
            row = []
            seen_means = []
            for j in range(K):
                xs = [m[k][j] for m in seeds.values() if m[k][j] is not None]
                row.append(_pm(xs))
            for m in seeds.values():
                vals = m[k][: k + 1]
                if all(v is not None for v in vals):
                    seen_means.append(sum(vals) / len(vals))
            if all(c == "–" for c in row):
                continue
            lines.append(f"| {k} ({names[k]}) | " + " | ".join(row) + f" | {_pm(seen_means)} |")
    lines += ["", "## Plain statements", ""]
    lines += [f"- {s}" for s in statements(stats, by)]
    shares = realised_shares(runs)
    if shares:
        lines += ["", "Realised token shares of the whole trunk (`data/realised_share/<corpus>` at the last step; configured "
                  "shares per stage above): " + "; ".join(f"`{run}`: " + ", ".join(f"{n} {v:.4f}" for n, v in s.items())
                                                          for run, s in shares.items()) + "."]
    path = out / RESULTS_MD
    path.write_text("\n".join(lines) + "\n")
    return path


def statements(stats: dict[str, dict[str, list[float]]], by: dict[str, dict[int, Any]]) -> list[str]:
    """Comparisons of the derived metrics between strategies, each with its noise verdict."""
    out = []
    pairs = [("anneal", "rewarm_cosine"), ("infinite", "rewarm_cosine"), ("infinite", "anneal"),
             ("rewarm_cosine", "scratch"), ("anneal", "scratch")]
    for a, b in pairs:
        if a not in stats or b not in stats:
            continue
        common = [s for s in by[a] if s in by[b]]  # pair seeds
        for key, what in (("average_loss", "average loss"), ("backward_transfer", "backward transfer"),
                          ("forward_adaptation", "forward adaptation")):
            xa = [derived(by[a][s])[key] for s in common]
            xb = [derived(by[b][s])[key] for s in common]
            keep = [(x, y) for x, y in zip(xa, xb) if x is not None and y is not None]
            if keep:
                s = compare([x for x, _ in keep], [y for _, y in keep], what, f"`{LABELS[a]}`", f"`{LABELS[b]}`")
                if s:
                    out.append(s)
    return out


def realised_shares(runs: list[SeqRun]) -> dict[str, dict[str, float]]:
    from cpt.report import load_run

    out = {}
    for r in runs:
        if r.row is not None or not run_finished(r.plan.run_dir, r.plan.steps):
            continue
        run = load_run(r.plan.run_dir)
        keys = sorted(k for k in run.keys if k.startswith("data/realised_share/"))
        vals = {k.split("/", 2)[2]: run.series(k)[1][-1] for k in keys if run.series(k)[1]}
        if vals:
            out[r.plan.name] = vals
    return out


# ================================================================ figures


def plot_matrix(spec: SequenceSpec, cells: Cells, path: Path) -> Path | None:
    """One heatmap per strategy: the mean L[k][j] over seeds, annotated with mean ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [c.name for c in spec.corpora]
    K = len(names)
    by = _by_label(cells, spec)
    if not by:
        return None
    mats = {}
    for label, seeds in by.items():
        mu = np.full((K, K), np.nan)
        sd = np.full((K, K), np.nan)
        for k in range(K):
            for j in range(K):
                xs = [m[k][j] for m in seeds.values() if m[k][j] is not None]
                if xs:
                    a, b, _ = mean_std(xs)
                    mu[k, j], sd[k, j] = a, (b if b is not None else np.nan)
        mats[label] = (mu, sd, len(seeds))
    finite = np.concatenate([m[0][np.isfinite(m[0])] for m in mats.values()])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    fig, axes = plt.subplots(1, len(mats), figsize=(3.6 * len(mats) + 1, 3.4), squeeze=False,
                             gridspec_kw={"wspace": 0.45})
    im = None
    for ax, (label, (mu, sd, n)) in zip(axes[0], mats.items()):
        im = ax.imshow(mu, cmap="viridis_r", vmin=vmin, vmax=vmax)
        for k in range(K):
            for j in range(K):
                if np.isfinite(mu[k, j]):
                    txt = f"{mu[k, j]:.3f}" + (f"\n±{sd[k, j]:.3f}" if np.isfinite(sd[k, j]) else "")
                    ax.text(j, k, txt, ha="center", va="center", fontsize=7,
                            color="white" if mu[k, j] > (vmin + vmax) / 2 else "black")
        ax.set_xticks(range(K), names, rotation=30, fontsize=7)
        ax.set_yticks(range(K), [f"after {k}" for k in range(K)], fontsize=7)
        ax.set_title(f"{LABELS[label]} (n={n})", fontsize=9)
        ax.set_xlabel("held-out corpus", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="loss (nats/token)")
    fig.suptitle(f"{spec.name}: held-out loss after each stage (mean ± std over seeds)", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_sequence_curves(spec: SequenceSpec, runs: list[SeqRun], path: Path) -> Path | None:
    """Held-out loss of every corpus against the trunk's step: one row of axes per strategy (each its own y range,
    random-init losses of stage 0's start left out so the stability gap after each boundary is visible);
    one line per seed; the infinite trunk's anneal branches dashed; stage boundaries dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c.name for c in spec.corpora]
    ends = spec.boundaries
    strategies = [s for s in spec.strategies if any(r.label == s for r in runs)]
    if not strategies:
        return None
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(len(strategies), len(names), figsize=(4.2 * len(names), 3.2 * len(strategies)), squeeze=False)
    drawn = 0
    for i, strategy in enumerate(strategies):
        for j, corpus in enumerate(names):
            ax = axes[i][j]
            shown: list[float] = []
            for r in runs:
                if not run_finished(r.plan.run_dir, r.plan.steps):
                    continue
                if r.label == strategy or (strategy == "infinite" and r.label == "anneal"):
                    _, vals, steps = _series(r.plan.run_dir, f"eval/{corpus}/loss")
                    if not vals:
                        continue
                    c = colours[spec.seeds.index(r.seed) % len(colours)]
                    if r.label == "anneal":
                        ax.plot(steps, vals, color=c, linestyle="--", linewidth=1.2, marker="o", markersize=2)
                    else:
                        ax.plot(steps, vals, color=c, linewidth=1.2, marker="o", markersize=2, label=f"seed {r.seed}")
                    shown += [v for v, s in zip(vals, steps) if s >= ends[0] // 2]
                    drawn += 1
            if shown:
                lo, hi = min(shown), max(shown)
                ax.set_ylim(lo - 0.05 * (hi - lo + 1e-6), hi + 0.1 * (hi - lo + 1e-6))
            for b in ends[:-1]:
                ax.axvline(b, color="black", linestyle=":", alpha=0.5, linewidth=1)
            ax.set_title(f"{LABELS[strategy]}: held-out {j}. {corpus}", fontsize=9)
            ax.set_xlabel("trunk step (anneal branches dashed)" if strategy == "infinite" else "step", fontsize=8)
            ax.set_ylabel("loss (nats/token)", fontsize=8)
            ax.grid(alpha=0.3)
        axes[i][0].legend(fontsize=7)
    if not drawn:
        plt.close(fig)
        return None
    fig.suptitle(f"{spec.name}: corpora in order {' -> '.join(names)}; dotted = stage boundaries", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
