"""The pair grid's results: one row per finished run (results.md, results.csv; see :data:`COLUMNS`), plain statements
read off the table, and curves.png (upstream/downstream loss against cumulative tokens, CPT runs starting at
base_tokens; below, the CPT runs zoomed on their own token axis: the stability gap).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from cpt.experiment.grid import cpt_run_name
from cpt.experiment.plan import RESULTS_CSV, RESULTS_MD, RunPlan
from cpt.experiment.spec import ExperimentSpec


def write_outputs(spec: ExperimentSpec, plans: list[RunPlan], out: Path, fpt: float, shape: dict[str, int],
                  corpus_tokens: dict[str, int]) -> tuple[Path, str]:
    """results.md/csv and curves.png of the finished runs; returns results.md and a line saying where they are."""
    md = write_results(spec, collect_results(spec, plans, fpt), out, fpt, shape, corpus_tokens)
    if any(p.finished for p in plans):
        plot_curves(spec, plans, out / "curves.png")
    return md, f"table: {md} and {out / RESULTS_CSV}; curves: {out / 'curves.png'}; report: {out / 'report' / 'report.html'}"


COLUMNS = [
    ("run", "run"), ("kind", "kind"), ("schedule", "schedule"), ("replay", "replay"), ("steps", "steps"),
    ("tokens", "tokens (run)"), ("tokens_incl_base", "tokens (incl. base)"),
    ("flops", "FLOPs (run)"), ("flops_incl_base", "FLOPs (incl. base)"), ("device_hours", "device-hours (run)"),
    ("upstream_final", "upstream loss"), ("downstream_final", "downstream loss"), ("mean_final", "mean"),
    ("forgetting_vs_base", "forgetting vs base"), ("worst_upstream", "worst upstream (CPT)"),
    ("worst_upstream_step", "worst at step"), ("adaptation_vs_base", "adaptation vs base"),
    ("upstream_step0", "upstream step 0"), ("downstream_step0", "downstream step 0"),
]


def _series(run_dir: Path, key: str) -> tuple[list[float], list[float], list[int]]:
    from cpt.run_metrics import run_series

    return run_series(run_dir, key)  # (a run's log read once for its several keys)


def collect_results(spec: ExperimentSpec, plans: list[RunPlan], fpt: float) -> list[dict[str, Any]]:
    """One row per finished run (see :data:`COLUMNS`); losses in nats per token on the held-out sets.

    forgetting vs base = final upstream loss - the base model's upstream loss (for CPT runs: their own
    step-0 evaluation, i.e. the base export; for the baseline: the base run's final evaluation);
    adaptation vs base = the base model's downstream loss - final downstream loss;
    worst upstream (CPT) = the highest upstream loss a CPT run logged (step 0 included: the stability gap).
    FLOPs = tokens x (6 N + 12 layers x hidden x seq_len) (llm-foundry; evaluation not counted);
    "incl. base" adds the base run's tokens/FLOPs to the CPT runs (the baseline and base need none);
    device-hours = the run's measured wall time x devices (`compute/device_hours`, evaluation included).
    """
    A, B = spec.corpus_a.name, spec.corpus_b.name
    rows: list[dict[str, Any]] = []
    base_tokens = spec.base_steps * spec.tokens_per_step
    base_up = base_down = None
    for p in plans:
        if not p.finished:
            continue
        _, up, up_steps = _series(p.run_dir, f"eval/{A}/loss")
        _, down, _ = _series(p.run_dir, f"eval/{B}/loss")
        toks, _, _ = _series(p.run_dir, "train/tokens")
        _, hours, _ = _series(p.run_dir, "compute/device_hours")
        tokens = int(toks[-1]) if toks else p.steps * spec.tokens_per_step
        row: dict[str, Any] = {
            "run": p.name, "kind": p.kind, "schedule": p.schedule,
            "replay": p.replay if p.replay is not None else "", "steps": p.steps,
            "tokens": tokens, "tokens_incl_base": tokens + (base_tokens if p.kind == "cpt" else 0),
            "flops": tokens * fpt, "flops_incl_base": (tokens + (base_tokens if p.kind == "cpt" else 0)) * fpt,
            "device_hours": hours[-1] if hours else None,
            "upstream_final": up[-1] if up else None, "downstream_final": down[-1] if down else None,
            "upstream_step0": up[0] if up else None, "downstream_step0": down[0] if down else None,
        }
        row["mean_final"] = (row["upstream_final"] + row["downstream_final"]) / 2 if up and down else None
        if p.kind == "base":
            base_up, base_down = row["upstream_final"], row["downstream_final"]
            ref_up, ref_down = None, None
        elif p.kind == "cpt":
            ref_up, ref_down = row["upstream_step0"], row["downstream_step0"]
        else:
            ref_up, ref_down = base_up, base_down
        row["forgetting_vs_base"] = row["upstream_final"] - ref_up if ref_up is not None and up else None
        row["adaptation_vs_base"] = ref_down - row["downstream_final"] if ref_down is not None and down else None
        if p.kind == "cpt" and up:
            i = max(range(len(up)), key=lambda j: up[j])
            row["worst_upstream"], row["worst_upstream_step"] = up[i], up_steps[i]
        else:
            row["worst_upstream"], row["worst_upstream_step"] = None, None
        row.update(benchmark_cells(p.run_dir, p.kind))
        rows.append(row)
    return rows


def benchmark_cells(run_dir: Path, kind: str) -> dict[str, Any]:
    """Tagged lm-eval metrics of a run (see cpt.run_metrics.benchmark_summary): ``<task>/<metric> final`` and, for CPT
    runs (whose step 0 is the base model), ``... change`` (forgetting or adaptation vs step 0, positive = worse /
    better), its ``stderr``, ``worst`` and ``noise`` (the change is within two standard errors)."""
    from cpt.run_metrics import benchmark_summary, load_run

    cells: dict[str, Any] = {}
    for b in benchmark_summary(load_run(run_dir)):
        name = f"{b['task']}/{b['metric']}"
        cells[f"{name} final"] = b["final"]
        if kind == "cpt":
            cells[f"{name} {'forgetting' if b['tag'] == 'upstream' else 'adaptation'}"] = b["change"]
            cells[f"{name} stderr"] = b["change_stderr"]
            cells[f"{name} worst"] = b["worst"]
            cells[f"{name} noise"] = b["noise"]
    return cells


def result_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """:data:`COLUMNS` and the benchmark columns of the rows, in first-seen order."""
    known = {k for k, _ in COLUMNS}
    extra = list(dict.fromkeys(k for r in rows for k in r if k not in known))
    return COLUMNS + [(k, k) for k in extra]


def _fmt(key: str, v: Any) -> str:
    if v is None or v == "":
        return "–"
    if key in ("flops", "flops_incl_base"):
        return f"{v:.3e}"
    if key == "device_hours":
        return f"{v:.3g}"
    if key in ("tokens", "tokens_incl_base", "steps", "worst_upstream_step"):
        return f"{int(v):,}"
    if key == "replay":
        return f"{v * 100:g}%"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if key.endswith((" forgetting", " adaptation")):
        return f"{v:+.4f}"
    if key in ("forgetting_vs_base", "adaptation_vs_base"):
        return f"{v:+.4f}"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def write_results(spec: ExperimentSpec, rows: list[dict[str, Any]], out: Path, fpt: float, shape: dict[str, int],
                  corpus_tokens: dict[str, int]) -> Path:
    A, B = spec.corpus_a.name, spec.corpus_b.name
    with open(out / (RESULTS_CSV + ".tmp"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([k for k, _ in result_columns(rows)])
        for r in rows:
            w.writerow(["" if r.get(k) is None else r.get(k) for k, _ in result_columns(rows)])
    os.replace(out / (RESULTS_CSV + ".tmp"), out / RESULTS_CSV)

    lines = [
        f"# Experiment `{spec.name}`: replay x schedule grid against re-training from scratch",
        "",
        f"Corpus A (upstream, original) = `{A}` ({corpus_tokens.get(A, 0):,} training tokens), corpus B (downstream, new) = "
        f"`{B}` ({corpus_tokens.get(B, 0):,} training tokens). Model: {shape['n_params'] / 1e6:.2f}M parameters, "
        f"{shape['n_layers']} layers, hidden {shape['hidden']}, seq_len {spec.seq_len}, "
        f"{spec.tokens_per_step:,} tokens per step, precision {spec.precision}.",
        "",
        "Losses: mean next-token cross-entropy (nats) on the held-out sets of A (upstream) and B (downstream), at the end of "
        "each run; mean = (upstream + downstream) / 2. Forgetting vs base = final upstream - base model's upstream loss "
        "(for CPT runs: their step-0 evaluation of the base export); adaptation vs base = base model's downstream loss - final "
        "downstream loss. Worst upstream (CPT) = highest upstream loss logged during a CPT run (the stability gap) and its step. "
        f"FLOPs = tokens x {fpt:.4g} FLOPs/token (6N + 12 x layers x hidden x seq_len, llm-foundry convention; evaluation not "
        "counted); \"incl. base\" adds the base run's tokens and FLOPs to each CPT run, so it compares with the baseline's.",
        "",
        "| " + " | ".join(h for _, h in result_columns(rows)) + " |",
        "|" + "|".join("---" if k in ("run", "kind", "schedule") else "---:" for k, _ in result_columns(rows)) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(k, r.get(k)) for k, _ in result_columns(rows)) + " |")
    if any(k.endswith(" final") for r in rows for k in r):
        lines += ["", "Benchmarks (tagged lm-eval tasks): final score; for CPT runs the change against their step 0 (the base "
                  "model), signed so that positive forgetting/adaptation means worse/better, its standard error "
                  "(sqrt(se_0^2 + se^2)), the worst score seen, and noise = yes when the change is within two standard errors."]
    lines += ["", *summary_lines(rows)]
    path = out / RESULTS_MD
    path.write_text("\n".join(lines) + "\n")
    return path


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Plain statements read off the table (no claims beyond the numbers)."""
    by = {r["run"]: r for r in rows}
    cpt = [r for r in rows if r["kind"] == "cpt" and r.get("mean_final") is not None]
    base = by.get("base")
    scratch = by.get("baseline-scratch")
    out = []
    if cpt:
        best = min(cpt, key=lambda r: r["mean_final"])
        out.append(f"- Lowest mean loss among CPT runs: `{best['run']}` ({best['mean_final']:.4f}).")
        if scratch and scratch.get("mean_final") is not None:
            d = best["mean_final"] - scratch["mean_final"]
            out.append(f"- Re-training baseline mean loss {scratch['mean_final']:.4f}: the best CPT run is "
                       f"{'lower' if d < 0 else 'higher'} by {abs(d):.4f} nats, using {best['tokens']:,} new tokens "
                       f"({best['flops'] / scratch['flops']:.0%} of the baseline's FLOPs) on top of the existing base model.")
        grid = [r for r in cpt if r["run"] == cpt_run_name(r["schedule"], r["replay"])]  # variants aside
        for sched in sorted({r["schedule"] for r in grid}):
            rs = sorted((r for r in grid if r["schedule"] == sched), key=lambda r: r["replay"])
            if len(rs) > 1:
                out.append(f"- {sched}: forgetting by replay share " + ", ".join(
                    f"{r['replay'] * 100:g}% {r['forgetting_vs_base']:+.4f}" for r in rs)
                    + "; downstream loss " + ", ".join(f"{r['replay'] * 100:g}% {r['downstream_final']:.4f}" for r in rs) + ".")
        shares = sorted({r["replay"] for r in cpt})
        pairs = []
        for s in shares:
            rc = by.get(cpt_run_name("rewarm_cosine", s))
            inf = by.get(cpt_run_name("infinite", s))
            if rc and inf:
                pairs.append(f"{s * 100:g}% {inf['mean_final'] - rc['mean_final']:+.4f}")
        if pairs:
            out.append("- Mean loss, infinite minus re-warmed cosine, per replay share: " + ", ".join(pairs) + ".")
        for v in (r for r in cpt if r not in grid):
            twin = by.get(cpt_run_name(v["schedule"], v["replay"]))
            if twin and twin.get("mean_final") is not None:
                out.append(f"- Variant `{v['run']}` against `{twin['run']}`: forgetting {v['forgetting_vs_base']:+.4f} vs "
                           f"{twin['forgetting_vs_base']:+.4f}, downstream loss {v['downstream_final']:.4f} vs "
                           f"{twin['downstream_final']:.4f}, mean {v['mean_final']:.4f} vs {twin['mean_final']:.4f}.")
    if base:
        out.append(f"- Base model: upstream {base['upstream_final']:.4f}, downstream {base['downstream_final']:.4f}.")
    return out


def curve_style(p: RunPlan, shares: list[float], colours: list[str], markers: bool = True) -> dict[str, Any]:
    """The matplotlib style of a run's curves: base black, baseline grey dashed, a CPT run coloured by its replay
    share, solid for the re-warmed cosine and dotted for the infinite schedule; a variant (``spec.variants``) is
    dash-dot with square markers (it shares schedule and replay with its grid twin, whose line it drew over)."""
    if p.kind == "base":
        style = dict(color="black", linestyle="-", linewidth=2)
    elif p.kind == "baseline":
        style = dict(color="grey", linestyle="--", linewidth=2)
    else:
        variant = p.name != cpt_run_name(p.schedule, p.replay)
        style = dict(color=colours[shares.index(p.replay) % len(colours)], linewidth=1.5,
                     linestyle="-." if variant else "-" if p.schedule == "rewarm_cosine" else ":")
        if variant:
            return {**style, "marker": "s" if markers else None, "markersize": 3}
    return {**style, "marker": "o" if markers else None, "markersize": 2}


def plot_curves(spec: ExperimentSpec, plans: list[RunPlan], path: Path) -> Path | None:
    """Upstream and downstream held-out loss. Top row: against cumulative tokens (CPT curves start where base
    ends). Bottom row: the CPT runs alone on their own token axis, zoomed to their losses, so the stability gap
    right after the switch is visible (on the shared axis the CPT runs occupy the last part only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    A, B = spec.corpus_a.name, spec.corpus_b.name
    base_tokens = spec.base_steps * spec.tokens_per_step
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    shares = sorted({p.replay for p in plans if p.replay is not None})
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    drawn = 0
    for col, (name, tag) in enumerate(((A, "upstream"), (B, "downstream"))):
        ax, zoom = axes[0][col], axes[1][col]
        all_vals: list[float] = []
        cpt_vals: list[float] = []
        for p in plans:
            if not p.finished:
                continue
            toks, vals, _ = _series(p.run_dir, f"eval/{name}/loss")
            if not vals:
                continue
            offset = base_tokens if p.kind == "cpt" else 0
            all_vals += vals
            if p.kind == "cpt":
                cpt_vals += vals
            style = curve_style(p, shares, colours, markers=len(vals) < 40)
            ax.plot([t + offset for t in toks], vals, label=p.name, **style)
            if p.kind == "cpt":
                zoom.plot(toks, vals, label=p.name, **style)
            drawn += 1
        if cpt_vals:  # random-init losses at step 0 would flatten the interesting part
            lo, hi = min(all_vals), max(cpt_vals)
            ax.set_ylim(lo - 0.05 * (hi - lo + 1e-6), hi + 0.6 * (hi - lo + 1e-6))
            lo, hi = min(cpt_vals), max(cpt_vals)
            zoom.set_ylim(lo - 0.05 * (hi - lo + 1e-6), hi + 0.1 * (hi - lo + 1e-6))
        ax.axvline(base_tokens, color="black", linestyle=":", alpha=0.5, linewidth=1)
        ax.set_title(f"{tag}: held-out {name}")
        ax.set_xlabel("cumulative tokens (CPT runs start after the base run's tokens)")
        zoom.set_title(f"{tag}: held-out {name}, CPT runs only (zoomed: the stability gap)")
        zoom.set_xlabel("tokens of the CPT run")
        for a in (ax, zoom):
            a.set_ylabel("loss (nats/token)")
            a.grid(alpha=0.3)
    if not drawn:
        plt.close(fig)
        return None
    axes[0][1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{spec.name}: solid = re-warm/re-decay cosine, dotted = infinite + anneal; colour = replay share"
                 + ("; dash-dot, squares = a variant" if spec.variants else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
