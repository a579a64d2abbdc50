"""Running an experiment: the one loop over the planned runs (skip the finished, resume the killed, stop after
``max_runs`` or a preemption), the dry run, and the end-of-run messages, for both kinds of spec. What differs between
the pair grid and a dataset sequence (planning, a run's dry-run lines, the results and figures) is a :class:`Design`.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

import cpt.experiment.grid as grid
import cpt.experiment.matrix as matrix
import cpt.experiment.results as results
import cpt.experiment.sequence as sequence
from cpt.experiment.corpora import prepare_data, resolve_corpus
from cpt.experiment.plan import RESULTS_MD, RunPlan, model_arch, run_configs
from cpt.experiment.spec import ExperimentError, ExperimentSpec, SequenceSpec, load_spec


@dataclass(frozen=True)
class Design:
    """What differs between the kinds of spec; the runner does the rest."""

    headline: Callable[[Any], str]  # said after "experiment <name>"
    plan: Callable[..., list[RunPlan]]  # (spec, out, tokenizer_dir, data_dir, corpus_tokens=None) -> the runs in order
    describe: Callable[[Any, RunPlan, Any], tuple[int, list[str]]]  # (spec, plan, RunConfig) -> training tokens, dry-run lines
    write_outputs: Callable[..., tuple[Path, str]]  # (spec, plans, out, fpt, shape, corpus_tokens) -> results.md, where


PAIR_GRID = Design(headline=lambda spec: "", plan=grid.plan_runs, describe=grid.describe_run,
                   write_outputs=results.write_outputs)
SEQUENCE = Design(
    headline=lambda spec: f" (a sequence of {len(spec.corpora)} corpora, {len(spec.seeds)} seed(s))",
    plan=sequence.plan_sequence, describe=sequence.describe_run, write_outputs=matrix.write_outputs)


def design_of(spec: ExperimentSpec | SequenceSpec) -> Design:
    return SEQUENCE if isinstance(spec, SequenceSpec) else PAIR_GRID


def run_experiment(spec_path_or_spec: str | os.PathLike | dict | ExperimentSpec | SequenceSpec,
                   out_dir: str | os.PathLike | None = None, echo: Callable = print, *,
                   overrides: list[str] | None = None, max_runs: int | None = None, dry_run: bool = False) -> Path:
    """Run (or continue) the experiment of a spec (the pair grid, or a dataset sequence when it lists ``corpora``) and
    write ``<out>/results.md``, ``results.csv`` and the figures; return results.md. A run stopped by SIGTERM/SIGUSR1
    (its checkpoint saved) ends the call with :class:`ExperimentPreempted`, after the results of the finished runs.

    ``max_runs``: train at most this many runs in this call (skipped runs do not count), then write the
    results of what is finished and return; call again to continue. ``dry_run``: print the plan
    (corpora sizes, runs, steps, LR schedules, FLOPs, time at ``assumed_tokens_per_s``) and write nothing.
    """
    spec = load_spec(spec_path_or_spec, overrides)
    design = design_of(spec)
    # absolute and normalised: `--out x`, `--out ./x/` and `--out /abs/x` are one experiment folder (its files record
    # paths under it: a relative spelling was refused on the re-run as "a different spec")
    out = Path(os.path.abspath(out_dir if out_dir is not None else Path("runs") / "experiments" / spec.name))
    if dry_run:
        return _dry_run(spec, design, out, echo)
    import torch

    threads = torch.get_num_threads()
    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    try:
        return _run(spec, design, out, echo, max_runs)
    finally:
        torch.set_num_threads(threads)


def _run(spec: ExperimentSpec | SequenceSpec, design: Design, out: Path, echo: Callable, max_runs: int | None) -> Path:
    from cpt.redaction import redact_spec
    from cpt.report import write_report

    t0 = time.perf_counter()
    check_lm_eval_tasks(spec)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.yaml").write_text(yaml.safe_dump(redact_spec(spec.dump()), sort_keys=False))
    echo(f"experiment {spec.name}{design.headline(spec)} -> {out}")
    tokenizer, tok_dir, corpus_tokens = prepare_data(spec, out, echo)
    plans = design.plan(spec, out, tok_dir, out / "data", corpus_tokens)
    counts, stopped = run_all(plans, run_configs(plans), echo, max_runs)
    preempted = stopped is not None and stopped.endswith(PREEMPTED_TAIL)

    fpt, shape = flops_per_token(spec, len(tokenizer))
    md, where = design.write_outputs(spec, plans, out, fpt, shape, corpus_tokens)
    finished = [p.run_dir for p in plans if p.finished]
    if finished:
        write_report(finished, out / "report")
    minutes = (time.perf_counter() - t0) / 60
    echo(md.read_text())
    echo(f"runs: {counts['trained']} trained, {counts['resumed']} resumed, {counts['skipped']} skipped; {minutes:.1f} min")
    if stopped:
        echo(stopped)
    echo(where)
    if preempted:  # (the results of what is finished are written: the caller says how the grid stopped)
        raise ExperimentPreempted(stopped)
    return md


PREEMPTED_TAIL = "was preempted (checkpoint saved): run the same command again to resume"


class ExperimentPreempted(Exception):
    """SIGTERM/SIGUSR1 stopped a run of the experiment with its checkpoint saved (the results of the finished runs are
    written): `cpt experiment` exits 0, or ``--preempted-exit-code``'s N."""


def run_all(plans: list[RunPlan], cfgs: dict, echo: Callable, max_runs: int | None) -> tuple[dict[str, int], str | None]:
    """Every run in order (:func:`run_one`), at most ``max_runs`` trained or resumed; stops at a preempted run.
    Returns the counts per status and why it stopped early (None when every run was finished or skipped)."""
    counts = {"skipped": 0, "trained": 0, "resumed": 0}
    for plan in plans:
        if max_runs is not None and counts["trained"] + counts["resumed"] >= max_runs and not plan.finished:
            return counts, f"stopped after {max_runs} run(s) (max_runs): run the same command again to continue"
        status = run_one(plan, cfgs[plan.name], echo)
        if status == "preempted":
            return counts, f"{plan.name} {PREEMPTED_TAIL}"
        counts[status] += 1
        if status == "skipped":
            echo(f"--- {plan.name}: finished earlier, skipped")
    return counts, None


def check_lm_eval_tasks(spec: ExperimentSpec | SequenceSpec) -> None:
    """Every task of ``eval.lm_eval_tasks`` is known (bundled, or lm-eval's own), before any data is prepared (a
    misspelt one passed --dry-run and failed at the first run's start, after the corpora were tokenized)."""
    if not spec.eval.lm_eval_tasks:
        return
    from eval_harness.task_registry import UnknownTaskError, make_task_manager

    try:
        make_task_manager([t if isinstance(t, str) else t["name"] for t in spec.eval.lm_eval_tasks])
    except UnknownTaskError as e:
        raise ExperimentError(f"eval.lm_eval_tasks: {e}") from None


def _dry_run(spec: ExperimentSpec | SequenceSpec, design: Design, out: Path, echo: Callable) -> Path:
    """The plan, from the real corpora and the spec: corpus sizes, the model, every run's steps, tokens and LRs (from
    the run's own LR plan), the total tokens and FLOPs, the time at ``assumed_tokens_per_s``. Writes nothing."""
    check_lm_eval_tasks(spec)
    for c in spec.corpora:
        files, nbytes = resolve_corpus(c, None, spec.seed, echo)
        echo(f"corpus {c.name}: {len(files)} files, {nbytes / 1e6:.1f} MB")
    vocab = spec.tokenizer.train.vocab_size if spec.tokenizer.train else None
    if vocab is None:
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(spec.tokenizer.path, trust_remote_code=False))
    plans = design.plan(spec, out, out / "tokenizer", out / "data")
    cfgs = run_configs(plans)
    fpt, shape = flops_per_token(spec, vocab)
    echo(f"model: {shape['n_params'] / 1e6:.1f}M parameters ({shape['n_params_non_embedding'] / 1e6:.1f}M non-embedding), "
         f"{shape['n_layers']} layers, hidden {shape['hidden']}; {fpt:.3g} training FLOPs/token")
    total_tokens = 0
    for p in plans:
        tokens, lines = design.describe(spec, p, cfgs[p.name])
        total_tokens += tokens
        for line in lines:
            echo(line)
    echo(f"total: {total_tokens:,} training tokens, {total_tokens * fpt:.3g} FLOPs")
    if spec.assumed_tokens_per_s:
        echo(f"at {spec.assumed_tokens_per_s:,.0f} tokens/s: {total_tokens / spec.assumed_tokens_per_s / 60:.1f} min of training "
             "(plus data preparation, evaluation and start-up)")
    return out / RESULTS_MD


def flops_per_token(spec: ExperimentSpec | SequenceSpec, vocab_size: int) -> tuple[float, dict[str, int]]:
    """Training FLOPs per token of the spec's model (cpt.throughput.shape_flops_per_token) and its shape, from the model
    built on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    from cpt.model import config_from_arch, model_shape
    from cpt.throughput import shape_flops_per_token

    with torch.device("meta"):
        config = config_from_arch({**model_arch(spec), "vocab_size": vocab_size}, field="model")
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    shape = model_shape(model)
    return shape_flops_per_token(shape, spec.seq_len), shape


# ================================================================ one run


_IGNORED_KEYS = ("train.progress_bar", "train.log_every", "logging.", "eval.batch_size")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf value}, into lists too (``stages.0.schedule.max_lr``), so a difference names its field."""
    if isinstance(d, (dict, list)):
        out = {}
        for k, v in (d.items() if isinstance(d, dict) else enumerate(d)):
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def check_same_config(run_dir: Path, cfg) -> None:
    """Refuse to skip or resume a run directory made by a different config (a changed spec)."""
    from cpt.config import config_to_dict

    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    old = _flatten(yaml.safe_load(saved.read_text()) or {})
    new = _flatten(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg), sort_keys=False)))
    diff = sorted(k for k in set(old) | set(new)
                  if old.get(k) != new.get(k) and not any(k == i or k.startswith(i) for i in _IGNORED_KEYS))
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
        raise ExperimentError(
            f"{run_dir} was made by a different config ({shown}{' ...' if len(diff) > 6 else ''}): the spec changed "
            "since that run. Use another --out, or delete that run directory to run it again")


def run_one(plan: RunPlan, cfg, echo: Callable = print) -> str:
    """Train one run unless it is finished; resume it from its checkpoint when it was killed.
    Returns "skipped", "resumed", "trained" or "preempted"."""
    from cpt.checkpoint import latest_valid_checkpoint
    from cpt.train import train

    run_dir = plan.run_dir
    check_same_config(run_dir, cfg)
    if plan.finished:
        return "skipped"
    ckpt = latest_valid_checkpoint(run_dir) if (run_dir / "checkpoints").is_dir() else None
    if ckpt is not None:
        echo(f"--- {plan.name}: resuming from {ckpt}")
        result = train(cfg, resume=True, echo=echo)
        status = "resumed"
    else:
        if run_dir.exists():
            echo(f"--- {plan.name}: {run_dir} has no usable checkpoint: starting the run again")
            shutil.rmtree(run_dir)
        echo(f"--- {plan.name}: {plan.steps} steps")
        result = train(cfg, resume=False, echo=echo)
        status = "trained"
    stopped = result.stopped_early  # "preempted": SIGTERM/SIGUSR1, a checkpoint was saved
    del result
    _free_memory()
    if stopped:
        return "preempted"
    if not plan.finished:
        raise ExperimentError(f"run {plan.name} ended without reaching step {plan.steps} or without its export")
    return status


def _free_memory() -> None:
    """Drop the finished run's model and optimizer before the next run (one process runs the whole grid)."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
