"""A dataset sequence's results: the forgetting matrix of every strategy, its derived metrics, mean ± std over the
seeds with noise verdicts (results.md, results.csv), one heatmap per strategy (forgetting_matrix.png) and the
held-out curves of every corpus, each strategy on its own axes (curves.png).

The forgetting matrix of a strategy: ``L[k][j]`` = held-out loss (nats/token) on corpus j after stage k.
Derived (K corpora; lower loss is better):

    average loss         mean_j L[K-1][j]                          (the final model on every corpus)
    backward transfer    mean_{j<K-1} (L[K-1][j] - L[j][j])        (> 0: earlier corpora were forgotten)
    forward adaptation   mean_{j>=1} (L[j-1][j] - L[j][j])         (how far each new corpus's loss fell
                                                                    during its own stage)
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

from cpt.experiment.plan import RESULTS_CSV, RESULTS_MD, RunPlan
from cpt.experiment.spec import SequenceSpec

# the rows of the results: a trunk per strategy, the infinite trunk's anneal branches, the from-scratch baseline
LABELS = {"rewarm_cosine": "rewarm_cosine", "infinite": "infinite (trunk)", "anneal": "infinite (annealed)",
          "scratch": "scratch (union)"}


def write_outputs(spec: SequenceSpec, runs: list[RunPlan], out: Path, fpt: float, shape: dict[str, int],  # noqa: ARG001
                  corpus_tokens: dict[str, int]) -> tuple[Path, str]:
    """results.md/csv, forgetting_matrix.png and curves.png of the finished runs; returns results.md and a line
    saying where they are."""
    cells = collect_matrix(spec, runs)
    md = write_results(spec, cells, runs, out, shape, corpus_tokens)
    if any(r.finished for r in runs):
        plot_matrix(spec, cells, out / "forgetting_matrix.png")
        plot_sequence_curves(spec, runs, out / "curves.png")
    return md, (f"tables: {md} and {out / RESULTS_CSV}; heatmap: {out / 'forgetting_matrix.png'}; "
                f"curves: {out / 'curves.png'}")


def _series(run_dir: Path, key: str) -> tuple[list[float], list[float], list[int]]:
    from cpt.run_metrics import run_series

    return run_series(run_dir, key)  # (a run's log read once for its several keys)


Cells = dict[tuple[str, int], list[list[float | None]]]  # (label, seed) -> L[k][j]


def _loss_at(run_dir: Path, corpus: str, step: int) -> float | None:
    _, vals, steps = _series(run_dir, f"eval/{corpus}/loss")
    by = dict(zip(steps, vals))
    return by.get(step)


def collect_matrix(spec: SequenceSpec, runs: list[RunPlan]) -> Cells:
    """``L[k][j]`` per (label, seed) from every finished run; None where a run has not finished."""
    names = [c.name for c in spec.corpora]
    K, ends = len(names), spec.boundaries
    cells: Cells = {}
    for r in runs:
        if not r.finished:
            continue
        if r.row is None:  # a trunk: every row at its boundary
            m = [[_loss_at(r.run_dir, n, ends[k]) for n in names] for k in range(K)]
            cells[(r.label, r.seed)] = m
        else:
            m = cells.setdefault((r.label, r.seed), [[None] * K for _ in range(K)])
            m[r.row] = [_loss_at(r.run_dir, n, r.steps) for n in names]
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


# two-sided 95% critical values of Student's t for 1..10 degrees of freedom (beyond: t95's expansion)
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t95(df: int) -> float:
    """The two-sided 95% critical value of Student's t with ``df`` degrees of freedom: the table up to 10, then the
    Cornish-Fisher expansion around the normal quantile to the fourth order (within 1e-4 of the exact value from 11 on:
    2.2010 at 11, 2.0423 at 30; a flat 2.2 was used, 8% wide at 30)."""
    if df <= len(T95):
        return T95[df - 1]
    z = 1.959964
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3)
            + (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / (92160 * df ** 4))


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
    half = t95(n - 1) * sd / math.sqrt(n)
    verdict = ("within the noise" if abs(mu) < half else
               ("lower" if mu < 0 else "higher") + f" for {name_a}, beyond the noise")
    return f"{head} (95% interval ± {half:.4f} over {n} paired seeds): {verdict}."


def _by_label(cells: Cells, spec: SequenceSpec) -> dict[str, dict[int, list[list[float | None]]]]:
    out: dict[str, dict[int, list[list[float | None]]]] = {}
    for (label, seed), m in cells.items():
        out.setdefault(label, {})[seed] = m
    order = [l for l in LABELS if l in out]
    return {l: dict(sorted(out[l].items(), key=lambda kv: spec.seeds.index(kv[0]))) for l in order}


def write_results(spec: SequenceSpec, cells: Cells, runs: list[RunPlan], out: Path, shape: dict[str, int],
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
        # the seeds behind the numbers (a seed with missing cells adds to none of them): one count, or one per column
        counts = [len(st[k]) for k in ("average_loss", "backward_transfer", "forward_adaptation")]
        n = str(counts[0]) if len(set(counts)) == 1 else "/".join(map(str, counts))
        lines.append(f"| {LABELS[label]} | {n} | {_pm(st['average_loss'])} | {_pm(st['backward_transfer'], True)} "
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


def realised_shares(runs: list[RunPlan]) -> dict[str, dict[str, float]]:
    from cpt.run_metrics import load_run

    out = {}
    for r in runs:
        if r.row is not None or not r.finished:
            continue
        run = load_run(r.run_dir)
        keys = sorted(k for k in run.keys if k.startswith("data/realised_share/"))
        vals = {k.split("/", 2)[2]: run.series(k)[1][-1] for k in keys if run.series(k)[1]}
        if vals:
            out[r.name] = vals
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


def plot_sequence_curves(spec: SequenceSpec, runs: list[RunPlan], path: Path) -> Path | None:
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
                if not r.finished:
                    continue
                if r.label == strategy or (strategy == "infinite" and r.label == "anneal"):
                    _, vals, steps = _series(r.run_dir, f"eval/{corpus}/loss")
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
        if axes[i][0].get_legend_handles_labels()[0]:  # (a corpus no finished run has a curve of yet: no legend)
            axes[i][0].legend(fontsize=7)
    if not drawn:
        plt.close(fig)
        return None
    fig.suptitle(f"{spec.name}: corpora in order {' -> '.join(names)}; dotted = stage boundaries", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
