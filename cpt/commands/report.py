"""`cpt report RUN_DIR [RUN_DIR ...] [--out DIR]`: plots and one self-contained HTML page."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpt report",
        description="Plots (PNG) and a self-contained report.html from one or more run directories: upstream/"
        "downstream held-out loss, benchmark forgetting/adaptation (tagged lm-eval tasks, ±1 stderr), LR, data "
        "shares and throughput against tokens, runs overlaid, and tables of step-0, final and worst values per "
        "held-out set and per tagged benchmark (changes within 2 standard errors marked as noise).",
    )
    parser.add_argument("run_dirs", nargs="+", help="run directories (each with a metrics.jsonl)")
    parser.add_argument("--out", default=None, help="output folder (default: <first run>/report)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cpt.fileio import file_in_the_way
    from cpt.report import write_report

    if args.out is not None and (blocker := file_in_the_way(args.out)):  # (was a FileExistsError traceback)
        print(f"cpt report: --out {args.out}: {blocker} is a file, not a folder", file=sys.stderr)
        return 2
    try:
        page = write_report(args.run_dirs, args.out)
    except FileNotFoundError as e:
        print(f"cpt report: {e}", file=sys.stderr)
        return 2
    print(f"wrote {page}")
    for png in sorted(page.parent.glob("*.png")):
        print(f"      {png}")
    return 0
