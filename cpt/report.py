"""Plots and a self-contained HTML page from one or more run directories (their metrics.jsonl).

``write_report(run_dirs, out_dir)`` writes, with ``train/tokens`` on every x axis and one colour per run:

    upstream.png      eval/<name>/loss of upstream sets (forgetting), one line style per set
    downstream.png    eval/<name>/loss of downstream sets (adaptation)
    train_loss.png    train/loss
    train_loss_by_source.png  train/loss/<source> (when logged)
    lr.png            train/lr
    data_shares.png   data/share/<source> (configured)
    realised_shares.png  data/realised_share/<source> (cumulative share of rows served)
    throughput.png    perf/tokens_per_s
    lm_eval.png       lm_eval/<task>/<metric> (when logged)
    lm_eval_upstream.png, lm_eval_downstream.png
                      benchmark forgetting / adaptation of tagged lm-eval tasks (lm_eval_forgetting/...,
                      lm_eval_adaptation/...) with +-1 standard error bands (perplexities left out: their
                      bits_per_byte carries the same information on a readable scale)
    report.html       all of the above embedded (base64) + tables per run: step-0, final and worst
                      loss per held-out set with forgetting/adaptation; step-0, final and worst score per
                      tagged benchmark with forgetting/adaptation +- stderr, changes within 2 stderr marked
                      as noise; the other lm-eval values; the run's compute (FLOPs, device-hours, wall hours)

Stage switches (where the logged ``stage`` index changes) are drawn as vertical dotted lines.
A set is upstream when the run logged ``forgetting/<name>``, downstream when ``adaptation/<name>``.
"""

from __future__ import annotations

import base64
import html
import os
import statistics
from pathlib import Path
from typing import Any

from cpt.samples import read_samples
from cpt.run_metrics import (BENCH_PREFIX, RunData, benchmark_summary, benchmarks, heldout_summary,  # noqa: F401
                             load_run, lm_eval_summary, run_series, stderr_key, values_by_step)  # (load_run, run_series: re-exported)

LINESTYLES = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def _unique_labels(dirs: list[Path]) -> list[str]:
    labels = [d.name or str(d) for d in dirs]
    if len(set(labels)) == len(labels):
        return labels
    return [f"{d.parent.name}/{d.name}" if labels.count(d.name) > 1 else d.name for d in dirs]


# ---------------------------------------------------------------- plots


def envelope(x: list[float], y: list[float], points: int = 4000) -> tuple[list[float], list[float]]:
    """A curve of more than ``points`` points as drawn: in each of ``points / 2`` runs of consecutive points, the lowest
    and the highest (in order), so a spike stays visible. matplotlib took seconds per plot for a million points, far
    more than the figure's 880 pixels show."""
    n = len(y)
    if n <= points:
        return x, y
    import numpy as np

    k = -(-n // (points // 2))
    whole = n // k * k
    buckets = np.asarray(y[:whole], dtype=float).reshape(-1, k)
    starts = np.arange(0, whole, k)
    keep = np.unique(np.concatenate([starts + buckets.argmin(1), starts + buckets.argmax(1), np.arange(whole, n), [0, n - 1]]))
    return [x[i] for i in keep], [y[i] for i in keep]


def _plot(runs: list[RunData], groups: list[tuple[str, list[tuple[RunData, str, str]]]], title: str,
          ylabel: str, path: Path, logy: bool = False, bands: bool = False) -> Path | None:
    """groups: one entry per series name: (style key, [(run, metric key, legend)]). ``bands``: shade +-1
    standard error where the run logged ``<key>_stderr``, and draw the zero line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = 0
    for gi, (_, members) in enumerate(groups):
        for run, key, legend in members:
            toks, vals, _ = run.series(key)
            if not vals:
                continue
            ri = runs.index(run)
            ax.plot(*envelope(toks, vals), color=colours[ri % len(colours)], linestyle=LINESTYLES[gi % len(LINESTYLES)],
                    marker=MARKERS[gi % len(MARKERS)] if len(vals) <= 60 else None, markersize=3, label=legend)
            if bands:
                se = values_by_step(run, stderr_key(key))
                _, _, steps = run.series(key)
                pts = [(t, v, se[s]) for t, v, s in zip(toks, vals, steps) if s in se]
                if pts:
                    ax.fill_between([p[0] for p in pts], [p[1] - p[2] for p in pts], [p[1] + p[2] for p in pts],
                                    color=colours[ri % len(colours)], alpha=0.12, linewidth=0)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    for ri, run in enumerate(runs):
        for x in run.stage_switches():
            ax.axvline(x, color=colours[ri % len(colours)], linestyle=":", alpha=0.6, linewidth=1)
    ax.set_xlabel("tokens seen (train/tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    if bands:
        ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _by_name(runs: list[RunData], names: list[str], key_fmt: str, multi: bool) -> list[tuple[str, list]]:
    groups = []
    for name in names:
        members = [(r, key_fmt.format(name), f"{r.label}: {name}" if multi else name) for r in runs
                   if key_fmt.format(name) in r.keys]
        if members:
            groups.append((name, members))
    return groups


def heldout_groups(runs: list[RunData], tag: str) -> list[tuple[str, list]]:
    """The curves of the ``tag`` plot: per held-out set, the runs in which that set has this tag (a set that is one
    run's new data can be another's old data: `cpt report A-then-B B-then-A`)."""
    multi = len(runs) > 1
    names = sorted({n for r in runs for n in r.sets(tag)})
    return [(name, [(r, f"eval/{name}/loss", f"{r.label}: {name}" if multi else name) for r in runs
                    if name in r.sets(tag)]) for name in names]


def make_plots(runs: list[RunData], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    multi = len(runs) > 1
    plots: dict[str, Path] = {}

    def add(name, *args, **kw):
        p = _plot(runs, *args, path=out_dir / f"{name}.png", **kw)
        if p is not None:
            plots[name] = p
        else:  # not drawn for these runs: an earlier report's plot of that name must not stay beside this one
            (out_dir / f"{name}.png").unlink(missing_ok=True)

    for tag in ("upstream", "downstream"):
        what = "forgetting: old distribution" if tag == "upstream" else "adaptation: new distribution"
        add(tag, heldout_groups(runs, tag), f"{tag} held-out loss ({what})", "loss (nats/token)")
    single = [("", [(r, "train/loss", r.label) for r in runs])]
    add("train_loss", single, "training loss", "loss (nats/token)")
    per_source = sorted({k[len("train/loss/"):] for r in runs for k in r.keys if k.startswith("train/loss/")})
    add("train_loss_by_source", _by_name(runs, per_source, "train/loss/{}", True),
        "training loss per source (replayed rows: old data)", "loss (nats/token)")
    add("lr", [("", [(r, "train/lr", r.label) for r in runs])], "learning rate", "lr")
    sources = sorted({k[len("data/share/"):] for r in runs for k in r.keys if k.startswith("data/share/")})
    add("data_shares", _by_name(runs, sources, "data/share/{}", True), "data shares per source", "share of tokens")
    realised = sorted({k[len("data/realised_share/"):] for r in runs for k in r.keys if k.startswith("data/realised_share/")})
    add("realised_shares", _by_name(runs, realised, "data/realised_share/{}", True),
        "realised data shares per source (cumulative over the run)", "share of rows served")
    add("throughput", [("", [(r, "perf/tokens_per_s", r.label) for r in runs])], "throughput", "tokens/s")
    lm_keys = sorted({k[len("lm_eval/"):] for r in runs for k in r.keys if k.startswith("lm_eval/") and not k.endswith("_stderr")})
    add("lm_eval", _by_name(runs, lm_keys, "lm_eval/{}", True), "lm-eval tasks", "value")
    for tag, what in (("upstream", "forgetting (> 0: worse than step 0)"), ("downstream", "adaptation (> 0: better than step 0)")):
        names = sorted({n for r in runs for n in benchmarks(r, tag) if not n.rpartition("/")[2].endswith("perplexity")})
        add(f"lm_eval_{tag}", _by_name(runs, names, BENCH_PREFIX[tag] + "{}", multi),
            f"{tag} benchmarks: {what}, ±1 standard error", "score change", bands=True)
    return plots


# ---------------------------------------------------------------- HTML


def _f(v: Any, signed: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:+.4f}" if signed else f"{v:.4f}"
    return html.escape(str(v))


def _fact(v: Any) -> str:
    if not isinstance(v, float):
        return html.escape(str(v))
    return f"{v:.3g}" if abs(v) >= 1e6 else f"{v:,.0f}" if abs(v) >= 100 else f"{v:.4g}"


def _table(headers: list[str], rows: list[list[str]], cls: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _benchmark_table(rows: list[dict[str, Any]]) -> str:
    from eval_harness.benchmarks import fmt_score, noise_label

    body = []
    for b in rows:
        kind = "forgetting" if b["tag"] == "upstream" else "adaptation"
        cls = "" if b["noise"] is not False else ("bad" if (b["change"] > 0) == (b["tag"] == "upstream") else "good")
        body.append([html.escape(f"{b['task']}/{b['metric']}"), b["tag"],
                     fmt_score(b["step0"], b["step0_stderr"]), fmt_score(b["final"], b["final_stderr"]),
                     f'<span class="{cls}">{kind} {fmt_score(b["change"], b["change_stderr"], signed=True)}</span>',
                     f'{fmt_score(b["worst"])} (step {b["worst_step"]})', html.escape(noise_label(b["noise"]))])
    return _table(["benchmark (lm-eval)", "tag", "step 0", "final", "change", "worst", "vs noise"], body, "bench")


def _samples_table(run_dir: Path) -> str:
    """eval.samples (samples.jsonl): each prompt's continuation at the run's first and last evaluation with samples,
    and the EMA weights' at the last (eval.ema)."""
    rows = read_samples(run_dir)
    if not rows:
        return ""
    first, last = min(r["step"] for r in rows), max(r["step"] for r in rows)
    text = {(r["step"], r.get("weights"), r["prompt"]): r["completion"] for r in rows}
    ema = any(r.get("weights") == "ema" for r in rows)

    def cell(step: int, prompt: str, weights: str | None = None) -> str:
        got = text.get((step, weights, prompt))
        return "–" if got is None else f"<pre class='sample'>{html.escape(got)}</pre>"

    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    return _table(["prompt (eval.samples)", f"step {first}", f"step {last}", *([f"step {last}, EMA"] if ema else [])],
                  [[f"<pre class='sample'>{html.escape(p)}</pre>", cell(first, p), cell(last, p),
                    *([cell(last, p, "ema")] if ema else [])] for p in prompts],
                  "samples")


def render_html(runs: list[RunData], plots: dict[str, Path]) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>cpt report</title><style>",
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}"
        "img{max-width:100%;border:1px solid #eee;margin:0.5em 0}.bad{color:#b00}.good{color:#070}"
        "pre.sample{white-space:pre-wrap;text-align:left;margin:0;font-size:0.9em}",
        "</style></head><body><h1>Continual pre-training report</h1>",
        "<p>Runs: " + ", ".join(f"<b>{html.escape(r.label)}</b> (<code>{html.escape(str(r.path))}</code>)" for r in runs)
        + ". x axes: tokens seen; dotted vertical lines: stage switches.</p>",
        "<h2>Held-out sets</h2><p>step 0 = the reference evaluation (the base model; for an anneal branch its "
        "trunk's, and a benchmark's then shows as –); worst = highest loss seen "
        "(the stability gap); forgetting = final − step 0 (upstream), adaptation = step 0 − final (downstream). "
        "Benchmarks (tagged lm-eval tasks) beside them: scores ± standard error; forgetting/adaptation signed so that "
        "positive means worse/better whatever the metric's direction; a change within two standard errors is "
        "marked as noise.</p>",
    ]
    for r in runs:
        parts.append(f"<h3>{html.escape(r.label)}</h3>")
        rows = []
        for s in heldout_summary(r):
            kind = "forgetting" if s["tag"] == "upstream" else "adaptation"
            good = (s["change"] <= 0) if s["tag"] == "upstream" else (s["change"] >= 0)
            rows.append([
                html.escape(s["name"]), s["tag"],  # (a reference after step 0: eval.at_start off, a set added on a resume)
                _f(s["step0"]) + (f' (step {s["step0_step"]})' if s.get("step0_step") else ""), _f(s["final"]),
                f'<span class="{"good" if good else "bad"}">{kind} {_f(s["change"], True)}</span>',
                _f(s["worst"]), f'{s["worst_step"]} ({s["worst_tokens"]:.3g} tok)',
                _f(s.get("max_forgetting"), True) if s["tag"] == "upstream" else "–",
            ])
        if rows:
            parts.append(_table(["set", "tag", "step 0", "final", "change", "worst", "worst at step",
                                 "max forgetting"], rows, "heldout"))
        else:
            parts.append("<p>no held-out evaluations logged</p>")
        bench = benchmark_summary(r)
        if bench:
            parts.append(_benchmark_table(bench))
        lm = lm_eval_summary(r)
        if lm:
            parts.append(_table(["lm-eval metric", "first", "first step", "final", "final step"],
                                [[html.escape(x["metric"]), _f(x["first"]), str(x["first_step"]), _f(x["final"]),
                                  str(x["final_step"])] for x in lm], "lmeval"))
        last = r.last
        facts = [("steps", last.get("step")), ("tokens", last.get("train/tokens"))] if last.get("step") is not None else []
        _, tps, _ = r.series("perf/tokens_per_s")
        if tps:
            facts.append(("median tokens/s", statistics.median(tps)))
        _, mfu, _ = r.series("perf/mfu")
        if mfu:
            facts.append(("median MFU", statistics.median(mfu)))
        for key, label in (("compute/flops", "training FLOPs"), ("compute/device_hours", "device-hours"),
                           ("compute/wall_hours", "wall hours")):
            _, values, _ = r.series(key)
            if values:
                facts.append((label, values[-1]))
        parts.append("<p>" + ("; ".join(f"{k}: {_fact(v)}" for k, v in facts) or "no step logged yet") + "</p>")
        parts.append(_samples_table(r.path))
    titles = {"upstream": "Upstream loss", "downstream": "Downstream loss", "train_loss": "Training loss",
              "train_loss_by_source": "Training loss per source",
              "lr": "Learning rate", "data_shares": "Data shares",
              "realised_shares": "Realised data shares (cumulative)", "throughput": "Throughput", "lm_eval": "lm-eval",
              "lm_eval_upstream": "Benchmark forgetting (upstream lm-eval tasks)",
              "lm_eval_downstream": "Benchmark adaptation (downstream lm-eval tasks)"}
    parts.append("<h2>Curves</h2>")
    for name, p in plots.items():
        data = base64.b64encode(p.read_bytes()).decode()
        parts.append(f"<h3>{titles.get(name, name)}</h3><img alt='{name}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike | None = None) -> Path:
    """Write PNGs and ``report.html`` for ``run_dirs`` into ``out_dir`` (default: ``<first run>/report``).
    Returns the path of report.html."""
    if not run_dirs:
        raise ValueError("no run directories given")
    dirs = [Path(d) for d in run_dirs]
    labels = _unique_labels(dirs)
    runs = [load_run(d, label) for d, label in zip(dirs, labels)]
    out = Path(out_dir) if out_dir is not None else dirs[0] / "report"
    plots = make_plots(runs, out)
    page = out / "report.html"
    page.write_text(render_html(runs, plots))
    return page
