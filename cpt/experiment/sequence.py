"""The runs of a dataset sequence (a :class:`~cpt.experiment.spec.SequenceSpec`): continual pre-training through
corpora A, B, C, ...

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

The forgetting matrix these runs give is read off in matrix.py.
"""

from __future__ import annotations

import copy
from math import gcd
from pathlib import Path
from typing import Any

from cpt.experiment.plan import RunPlan, cosine_schedule, eval_config, run_config, warmup_steps
from cpt.experiment.spec import LRSpec, SequenceSpec


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
    warm = min(warmup_steps(lr.warmup_fraction, first_steps), first_steps)
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
                  corpus_tokens: dict[str, int] | None = None) -> list[RunPlan]:
    """Every run (trunks, then their anneal branches, then baselines), per seed, in the order they run."""
    names = [c.name for c in spec.corpora]
    K = len(names)
    steps, ends = spec.stage_steps, spec.boundaries
    total = ends[-1]
    g = 0
    for n in steps:
        g = gcd(g, n)  # every boundary is a multiple of g: checkpoints and evaluations land on them
    sources = [{"name": n, "path": str(data_dir / n)} for n in names]
    heldout = [{"name": n, "path": str(data_dir / n / "heldout"), "tag": "downstream" if j == K - 1 else "upstream"}
               for j, n in enumerate(names)]
    dense_steps = round(spec.eval.dense_fraction * steps[-1])

    def config(run: str, seed: int, stages: list[dict], n_steps: int, ckpt_every: int, keep: int) -> dict[str, Any]:
        ev = eval_config(spec, _divisor_at_most(g, n_steps // spec.eval.evals_per_run), dense_steps)
        cfg = run_config(spec, out / "runs" / run, run, seed, n_steps, tokenizer_dir=tokenizer_dir, sources=sources,
                         heldout=heldout, stages=stages, eval=ev, checkpoint={"every": ckpt_every, "keep": keep})
        if spec.run_overrides:
            from cpt.config import apply_overrides

            cfg = apply_overrides(cfg, spec.run_overrides)
        return cfg

    def trunk_stages(strategy: str) -> list[dict]:
        out_stages = []
        for k in range(K):
            if strategy == "rewarm_cosine":
                sched = cosine_schedule(spec.base_lr if k == 0 else spec.cpt_lr, steps[k])
            else:
                sched = _infinite_trunk(spec.cpt_lr, steps[0], k)
            out_stages.append({"name": f"{k}-{names[k]}", "steps": steps[k], "mix": replay_mix(spec, k, corpus_tokens),
                               "schedule": sched})
        return out_stages

    runs: list[RunPlan] = []
    A = spec.anneal_steps
    for seed in spec.seeds:
        for strategy in spec.strategies:
            name = f"seed{seed}-{strategy}"
            stages = trunk_stages(strategy)
            # a checkpoint at every multiple of g, all kept: the anneal branches start from the boundary ones
            cfg = config(name, seed, stages, total, g, total // g + 1)
            runs.append(RunPlan(name, "cpt", strategy, spec.replay, total, cfg, seed=seed, label=strategy))
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
                runs.append(RunPlan(branch, "cpt", "anneal", spec.replay, ends[k] + A, bcfg, seed=seed, label="anneal",
                                    row=k))
        if spec.baseline:
            for k in range(1 if spec.baseline is True else K - 1, K):
                run = f"seed{seed}-scratch-upto{k}"
                seen = tokens_seen(spec, k, corpus_tokens)
                mix = {n: seen.get(n, 0.0) / sum(seen.values()) for n in names}
                n_steps = ends[k]
                st = [{"name": f"scratch-0..{k}", "steps": n_steps, "mix": mix, "schedule": cosine_schedule(spec.base_lr, n_steps)}]
                cfg = config(run, seed, st, n_steps, max(1, n_steps // 2), 2)
                runs.append(RunPlan(run, "baseline", "cosine", None, n_steps, cfg, seed=seed, label="scratch", row=k))
    return runs


def describe_run(spec: SequenceSpec, plan: RunPlan, cfg) -> tuple[int, list[str]]:
    """The dry run's lines for one run of the sequence (its steps, tokens, LR at the stage starts, each stage's mix)
    and its training tokens (an anneal branch trains only its own steps)."""
    from cpt.schedules import plan_for_run

    lr = plan_for_run(cfg)
    branch = bool(cfg.train.anneal_steps)
    start = lr.total_steps if branch else 0
    if branch:
        lr = plan_for_run(cfg, anneal_from=start)
    n = plan.steps - start
    marks = sorted({start, start + n // 2, plan.steps - 1} | set(lr.starts[1:] if not branch else []))
    lines = [f"  {plan.name:<32} steps {start}..{plan.steps} ({n * spec.tokens_per_step:,} tokens)  "
             + " ".join(f"lr[{m}]={lr.lr(m):.2e}" for m in marks)]
    if not branch:
        for st in plan.config["stages"]:
            lines.append(f"  {'':<32}   {st['name']}: {st['steps']} steps, mix "
                         + ", ".join(f"{k} {v:.3g}" for k, v in st["mix"].items() if v > 0))
    return n * spec.tokens_per_step, lines
