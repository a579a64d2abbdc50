"""`cpt schedule CONFIG`: print and plot a run's learning-rate plan before any training.

    cpt schedule configs/schedules/infinite.yaml
    cpt schedule run.yaml --set stages.1.schedule.max_lr=1e-4 --out /tmp/lr.png
    cpt schedule configs/schedules/infinite.yaml --anneal-from 400 --anneal-steps 100

Prints the LR at every phase boundary (first and last update of each phase) with its stage, step
and tokens (tokens before the update: ``step * train.global_batch_size * data.seq_len``), and
writes a PNG of LR against steps (bottom axis) and tokens (top axis) with the stages shaded.
Only the config is read: data paths need not exist yet.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from cpt.commands import at_least
from cpt.schedules import DECAY_SHAPES, LRPlan, plan_for_run


def format_tokens(n: float) -> str:
    """``1234567 -> '1.23M'``."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.0f}"


def boundary_rows(plan: LRPlan, tokens_per_step: int, stage_names: Sequence[str] | None = None) -> list[dict]:
    """The rows of the boundary table: ``{"stage", "step", "tokens", "lr", "phase"}``."""
    rows = []
    for step, lr, label in plan.boundaries():
        i = plan.stage_index(step)
        name = stage_names[i] if stage_names is not None and i < len(stage_names) else ""
        rows.append({"stage": f"{i} {name}".strip(), "step": step, "tokens": step * tokens_per_step, "lr": lr, "phase": label})
    return rows


def format_table(rows: list[dict]) -> str:
    w = max([len("stage")] + [len(r["stage"]) for r in rows])
    lines = [f"{'stage':<{w}}  {'step':>9}  {'tokens':>8}  {'lr':>10}  phase"]
    for r in rows:
        lines.append(f"{r['stage']:<{w}}  {r['step']:>9}  {format_tokens(r['tokens']):>8}  {r['lr']:>10.3e}  {r['phase']}")
    return "\n".join(lines)


def _sample_steps(plan: LRPlan, first: int = 0, points: int = 2000) -> list[int]:
    """Evenly spaced steps plus both sides of every phase boundary (so jumps and corners are drawn exactly)."""
    last = plan.total_steps - 1
    n = max(2, min(points, last - first + 1))
    steps = {first + round(k * (last - first) / (n - 1)) for k in range(n)}
    for p in plan.phases:
        for s in (p.start - 1, p.start, p.end - 1):
            if first <= s <= last:
                steps.add(s)
    return sorted(steps)


def plot_plan(plan: LRPlan, path: str | Path, tokens_per_step: int, stage_names: Sequence[str] | None = None,
              branches: Sequence[LRPlan] = (), title: str | None = None) -> Path:
    """Write a PNG of ``plan``'s LR against step (bottom axis) and tokens (top axis); returns the path.

    Stages are shaded and labelled; each plan in ``branches`` (anneal branches) is drawn dashed from
    its ``branch_from`` step. Uses matplotlib's Agg canvas directly (no pyplot global state).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(10, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()

    colors = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")
    for i, ((n, cfg), start) in enumerate(zip(plan.stages, plan.starts)):
        ax.axvspan(start - 0.5, start + n - 0.5, color=colors[i % len(colors)], alpha=0.08, lw=0)
        if i:
            ax.axvline(start - 0.5, color="0.5", lw=0.8, ls=":")
        name = stage_names[i] if stage_names is not None and i < len(stage_names) else f"stage {i}"
        ax.text(start, 0.98, f" {name}\n {cfg.type}", transform=ax.get_xaxis_transform(), va="top", ha="left", fontsize=8)

    steps = _sample_steps(plan)
    ax.plot(steps, [plan.lr(s) for s in steps], color="k", lw=1.5, label="trunk" if branches else "lr")
    for b in branches:
        first = b.branch_from if b.branch_from is not None else 0
        bs = _sample_steps(b, first=first)
        ax.plot(bs, [b.lr(s) for s in bs], lw=1.5, ls="--", label=f"anneal branch from step {first}")
    if branches:
        ax.legend(loc="upper right", fontsize=8)

    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
    ax.grid(alpha=0.3)
    tps = max(int(tokens_per_step), 1)
    top = ax.secondary_xaxis("top", functions=(lambda s: s * tps, lambda t: t / tps))
    top.set_xlabel("tokens")
    top.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_tokens(v)))
    if title:
        ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=110)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpt schedule", description="Print and plot the learning-rate plan of a run config.")
    p.add_argument("config", help="YAML run config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set stages.0.schedule.max_lr=1e-4 (repeatable)")
    p.add_argument("--out", help="PNG path (default: <run.output_dir>/schedule.png)")
    p.add_argument("--no-plot", action="store_true", help="print the table only")
    p.add_argument("--anneal-from", type=int, metavar="STEP", help="also show an anneal branch from this trunk step")
    p.add_argument("--anneal-steps", type=at_least(1), metavar="N", help="length of the branch (default: train.anneal_steps)")
    p.add_argument("--anneal-shape", choices=DECAY_SHAPES, help="shape of the branch (default: train.anneal_shape)")
    return p


def main(argv: list[str] | None = None) -> int:
    from cpt.config import ConfigError, load_config

    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        plan = plan_for_run(cfg)
        branch = None
        if args.anneal_from is not None:
            steps = args.anneal_steps or cfg.train.anneal_steps
            if not steps:
                raise ValueError("--anneal-from needs --anneal-steps N (or train.anneal_steps in the config)")
            branch = plan.anneal_branch(args.anneal_from, steps, args.anneal_shape or cfg.train.anneal_shape)
        elif args.anneal_steps is not None:
            raise ValueError("--anneal-steps needs --anneal-from STEP (the trunk checkpoint's step)")
    except (ConfigError, ValueError) as e:
        print(f"cpt schedule: {e}", file=sys.stderr)
        return 2

    names = [s.name for s in cfg.stages]
    tps = cfg.train.global_batch_size * cfg.data.seq_len
    total_tokens = plan.total_steps * tps
    print(f"LR plan of {args.config}: {len(plan.stages)} stage{'s' if len(plan.stages) != 1 else ''}, "
          f"{plan.total_steps} steps, {format_tokens(total_tokens)} tokens ({tps:,} tokens per step)")
    print(format_table(boundary_rows(plan, tps, names)))
    if branch is not None:
        rows = [r for r in boundary_rows(branch, tps, names) if r["step"] >= branch.branch_from]
        print(f"\nanneal branch from step {branch.branch_from} ({branch.total_steps - branch.branch_from} steps):")
        print(format_table(rows))
    if cfg.train.anneal_steps and branch is None:
        print("\nnote: train.anneal_steps is set; the branch starts at the step of the train.init_from checkpoint "
              "(pass --anneal-from STEP to show it)")
    if not args.no_plot:
        out = Path(args.out) if args.out else Path(cfg.run.output_dir) / "schedule.png"
        try:
            plot_plan(plan, out, tps, names, branches=[branch] if branch is not None else (), title=f"{cfg.run.name}: learning-rate plan")
        except OSError as e:  # (a file in the folder's path, no permission, disk full: it was a traceback)
            print(f"cpt schedule: error: cannot write the plot {out}: {e.strerror or e} (--out PATH, or --no-plot)",
                  file=sys.stderr)
            return 1
        print(f"\nwrote {out}")
    return 0
