"""The pair grid's runs (an :class:`~cpt.experiment.spec.ExperimentSpec`: corpus A, then corpus B)::

    base                          pre-training on A, warmup + cosine           base_tokens
    cpt-<schedule>-replay<pct>    from base's export, on B with <pct>% of A    cpt_tokens     for every
                                  replayed (exact per-batch shares)                            replay share x schedule
    cpt-...-<variant>             a CPT run with config overrides (spec.variants: MER, document masking, LoRA...)
    baseline-scratch              random init, on A and B mixed                base_tokens + cpt_tokens

Schedules of the CPT runs:

    rewarm_cosine   re-warm from 0 to max_lr, re-decay (cosine) to min_lr
    infinite        warmup to max_lr -> cooldown to constant_lr -> constant -> anneal to min_lr over
                    the last ``anneal_fraction`` of the run

Every run evaluates the held-out sets of A (tagged upstream: forgetting) and B (downstream:
adaptation) from step 0, densely right after the switch for CPT runs (the stability gap).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from cpt.experiment.plan import RunPlan, cosine_schedule, eval_config, infinite_schedule, run_config
from cpt.experiment.spec import ExperimentError, ExperimentSpec


def replay_label(share: float) -> str:
    pct = share * 100
    return f"{pct:.0f}" if abs(pct - round(pct)) < 1e-9 else f"{pct:g}"


def cpt_run_name(schedule: str, share: float) -> str:
    return f"cpt-{schedule}-replay{replay_label(share)}"


def plan_runs(spec: ExperimentSpec, out: Path, tokenizer_dir: Path, data_dir: Path,
              corpus_tokens: dict[str, int] | None = None) -> list[RunPlan]:
    """Every run of the grid as a `cpt train` config dict, in the order they run."""
    from cpt.config import ConfigError, apply_overrides

    A, B = spec.corpus_a.name, spec.corpus_b.name
    runs_dir = out / "runs"
    src = {A: {"name": A, "path": str(data_dir / A)}, B: {"name": B, "path": str(data_dir / B)}}
    heldout = [
        {"name": A, "path": str(data_dir / A / "heldout"), "tag": "upstream"},
        {"name": B, "path": str(data_dir / B / "heldout"), "tag": "downstream"},
    ]

    def config(name: str, steps: int, dense: bool, sources: list[dict], stage: dict) -> dict[str, Any]:
        every = max(1, steps // spec.eval.evals_per_run)
        dense_steps = max(1, round(spec.eval.dense_fraction * steps)) if dense and spec.eval.dense_fraction > 0 else 0
        ev = eval_config(spec, every, dense_steps)
        if spec.eval.lm_eval_tasks:
            ev["lm_eval"] = {"tasks": copy.deepcopy(spec.eval.lm_eval_tasks), "limit": spec.eval.lm_eval_limit, "every": every}
        return run_config(spec, runs_dir / name, name, spec.seed, steps, tokenizer_dir=tokenizer_dir, sources=sources,
                          heldout=heldout, stages=[stage], eval=ev,
                          checkpoint={"every": max(1, steps // spec.checkpoints_per_run), "keep": spec.keep_checkpoints})

    plans: list[RunPlan] = []
    n_base, n_cpt = spec.base_steps, spec.cpt_steps

    cfg = config("base", n_base, False, [src[A]],
                 {"name": f"pretrain-{A}", "steps": n_base, "mix": {A: 1.0}, "schedule": cosine_schedule(spec.base_lr, n_base)})
    plans.append(RunPlan("base", "base", "cosine", None, n_base, cfg))

    base_export = str(runs_dir / "base" / "export")

    def cpt_run(name: str, schedule: str, share: float) -> RunPlan:
        sources = [src[B]] + ([{**src[A], "replay": True}] if share > 0 else [])
        mix = {B: 1.0 - share, **({A: share} if share > 0 else {})}
        sched = cosine_schedule(spec.cpt_lr, n_cpt) if schedule == "rewarm_cosine" else infinite_schedule(spec.cpt_lr, n_cpt)
        cfg = config(name, n_cpt, True, sources, {"name": f"cpt-{B}", "steps": n_cpt, "mix": mix, "schedule": sched})
        cfg["train"]["init_from"] = base_export
        return RunPlan(name, "cpt", schedule, share, n_cpt, cfg)

    for schedule in spec.schedules:
        for share in spec.replay_shares:
            plans.append(cpt_run(cpt_run_name(schedule, share), schedule, share))
    for v in spec.variants:
        plan = cpt_run(variant_run_name(v), v.schedule, v.replay)
        try:
            plan.config = apply_overrides(plan.config, v.overrides)
        except ConfigError as e:
            raise ExperimentError(f"variants: {v.name}: {e}") from None
        plans.append(plan)

    if spec.baseline:
        n = n_base + n_cpt
        if spec.baseline_mix == "budget" or not corpus_tokens:
            wa, wb = float(n_base), float(n_cpt)
        else:
            wa, wb = float(corpus_tokens[A]), float(corpus_tokens[B])
        cfg = config("baseline-scratch", n, False, [src[A], src[B]],
                     {"name": f"scratch-{A}+{B}", "steps": n, "mix": {A: wa / (wa + wb), B: wb / (wa + wb)},
                      "schedule": cosine_schedule(spec.baseline_lr or spec.base_lr, n)})
        plans.append(RunPlan("baseline-scratch", "baseline", "cosine", None, n, cfg))

    for p in plans:
        if spec.run_overrides:
            p.config = apply_overrides(p.config, spec.run_overrides)
    return plans


def variant_run_name(v) -> str:
    """The run name of a spec.variants entry: its grid twin's name and the variant's."""
    return f"{cpt_run_name(v.schedule, v.replay)}-{v.name}"


def describe_run(spec: ExperimentSpec, plan: RunPlan, cfg) -> tuple[int, list[str]]:
    """The dry run's lines for one run of the grid (steps, tokens, mix, LR at a few steps) and its training tokens."""
    from cpt.redaction import redact_override
    from cpt.schedules import plan_for_run

    lr = plan_for_run(cfg)
    st = plan.config["stages"][0]
    marks = sorted({0, plan.steps // 4, plan.steps // 2, 3 * plan.steps // 4, plan.steps - 1})
    tokens = plan.steps * spec.tokens_per_step
    lines = [f"  {plan.name:<28} {plan.steps:>6} steps {tokens:>14,} tokens  mix {st['mix']}  "
             + " ".join(f"lr[{m}]={lr.lr(m):.2e}" for m in marks)]
    variant = next((v for v in spec.variants if plan.name == variant_run_name(v)), None)
    if variant is not None:
        lines.append(f"  {'':<28} variant overrides: {' '.join(redact_override(o) for o in variant.overrides)}")
    return tokens, lines
