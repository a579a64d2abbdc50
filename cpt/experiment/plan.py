"""The runs of an experiment: :class:`RunPlan` (a `cpt train` run config and what the results need to know of it),
the pieces every run config is built from (the model, W&B, evaluation, the LR schedule shapes), their validation
(:func:`run_configs`) and whether a run has finished. The pair grid (grid.py) and the dataset sequence (sequence.py)
plan their runs with these.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cpt.experiment.spec import ExperimentError, ExperimentSpec, LRSpec, SequenceSpec

RESULTS_MD = "results.md"
RESULTS_CSV = "results.csv"


@dataclass
class RunPlan:
    name: str
    kind: Literal["base", "cpt", "baseline"]
    schedule: str  # "cosine" for base/baseline, a SCHEDULES entry (pair grid), a strategy or "anneal" (sequence)
    replay: float | None
    steps: int  # the last step of the run (an anneal branch counts the trunk steps it starts from)
    config: dict[str, Any]  # the `cpt train` run config (a dict; validated by run_configs)
    # dataset sequences only: the seed, the row group of the results (a key of matrix.LABELS) and, for anneal
    # branches and baselines, the row of the forgetting matrix they give
    seed: int | None = None
    label: str | None = None
    row: int | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.config["run"]["output_dir"])

    @property
    def finished(self) -> bool:
        return run_finished(self.run_dir, self.steps)


def run_finished(run_dir: Path, total_steps: int) -> bool:
    """``export/config.json`` exists and metrics.jsonl has a record at the last step."""
    from cpt.metrics import METRICS_FILE, iter_metrics

    if not (run_dir / "export" / "config.json").is_file() or not (run_dir / METRICS_FILE).is_file():
        return False
    return any(r.get("step") == total_steps for r in iter_metrics(run_dir))  # (one record in memory at a time)


def run_configs(plans: list[RunPlan]):
    """Validate every run config up front: one error naming every bad run (a problem several runs share, such as a
    misspelt ``run_overrides`` field, once, naming them). Returns {run name: RunConfig}."""
    from cpt.config import ConfigError, validate

    out, errors = {}, {}
    for p in plans:
        try:
            out[p.name] = validate(p.config)
        except ConfigError as e:
            errors.setdefault(str(e), []).append(p.name)
    if errors:
        raise ExperimentError("\n".join(
            f"{'every run' if len(names) == len(plans) > 1 else 'run' + ('s' if len(names) > 1 else '')}"
            f"{'' if len(names) == len(plans) > 1 else ' ' + ', '.join(names)}: {message}"
            for message, names in errors.items()))
    return out


# ================================================================ pieces of a run config


def model_arch(spec: ExperimentSpec | SequenceSpec) -> dict[str, Any]:
    """The spec's architecture dict as every run gets it (positions default to seq_len)."""
    arch = copy.deepcopy(spec.model)
    arch.setdefault("max_position_embeddings", spec.seq_len)
    return arch


def eval_config(spec: ExperimentSpec | SequenceSpec, every: int, dense_steps: int = 0) -> dict[str, Any]:
    """Held-out evaluation every ``every`` steps and at step 0; densely over the first ``dense_steps`` (stability gap)."""
    ev: dict[str, Any] = {"every": every, "at_start": True, "tokens_per_set": spec.eval.tokens_per_set,
                          "batch_size": spec.eval.batch_size}
    if dense_steps > 0:
        ev.update(dense_steps=dense_steps, dense_every=max(1, dense_steps // spec.eval.dense_evals))
    return ev


def run_config(spec: ExperimentSpec | SequenceSpec, run_dir: Path, run: str, seed: int, steps: int, *,
               tokenizer_dir: Path, sources: list[dict], heldout: list[dict], stages: list[dict],
               eval: dict[str, Any], checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The `cpt train` run config (a dict) of run ``run``: the spec's model, batch, precision, optimizer, logging and
    W&B; the caller's data, stages, evaluation and checkpoints."""
    wandb: dict[str, Any] = {"enabled": spec.wandb.enabled}
    if spec.wandb.enabled:
        wandb.update(project=spec.wandb.project, group=spec.name, mode=spec.wandb.mode, tags=[run])
    return {
        "run": {"name": f"{spec.name}-{run}", "output_dir": str(run_dir), "seed": seed},
        "model": {"tokenizer": str(tokenizer_dir), "arch": model_arch(spec)},
        "data": {"seq_len": spec.seq_len, "sources": copy.deepcopy(sources), "heldout": copy.deepcopy(heldout),
                 "max_epochs_warning": spec.max_epochs_warning},
        "stages": stages,
        "optim": copy.deepcopy(spec.optim),
        "train": {"global_batch_size": spec.global_batch_size, "micro_batch_size": spec.micro_batch_size,
                  "precision": spec.precision, "log_every": min(spec.log_every, steps),
                  "progress_bar": spec.progress_bar},
        "eval": eval,
        "checkpoint": {**checkpoint, "export_at_end": True},
        "logging": {"plot": False, "wandb": wandb},
    }


# ================================================================ LR schedules (a stage's `schedule` section)


def warmup_steps(frac: float, steps: int) -> int:
    return 0 if frac <= 0 else max(1, round(frac * steps))


def cosine_schedule(lr: LRSpec, steps: int) -> dict[str, Any]:
    """Warmup from 0 to max_lr, cosine decay to min_lr."""
    return {"type": "cosine", "max_lr": lr.max_lr, "min_lr": lr.min_lr,
            "warmup_steps": min(warmup_steps(lr.warmup_fraction, steps), steps - 1), "warmup_from": 0.0}


def infinite_schedule(lr: LRSpec, steps: int) -> dict[str, Any]:
    """Warmup -> cooldown to constant_lr -> constant -> anneal to min_lr over the last anneal_fraction."""
    anneal = max(1, round(lr.anneal_fraction * steps))
    warm = max(0, min(warmup_steps(lr.warmup_fraction, steps), steps - anneal))
    cool = round(lr.cooldown_fraction * steps)
    cool = max(0, min(cool, steps - anneal - warm))
    const = min(lr.constant, lr.max_lr)
    if cool == 0:
        const = lr.max_lr  # no room for a cooldown: the constant phase stays at max_lr
    sched = {"type": "infinite", "max_lr": lr.max_lr, "min_lr": min(lr.min_lr, const), "warmup_steps": warm,
             "warmup_from": 0.0, "cooldown_steps": cool, "cooldown_shape": lr.cooldown_shape, "constant_lr": const,
             "anneal_steps": anneal, "anneal_shape": lr.anneal_shape}
    if lr.cooldown_shape == "inverse_sqrt":
        sched["timescale"] = max(1, warm)
    return sched
