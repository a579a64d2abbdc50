"""`cpt experiment SPEC.yaml [--out DIR] [--set key=value ...] [--max-runs N] [--dry-run]`.

Runs the continual pre-training grid of a spec (see cpt/experiment/ and docs/experiments.md): base
pre-training on corpus A; CPT on corpus B for every replay share x schedule (re-warmed cosine,
infinite with a final anneal); a baseline trained from scratch on A and B with as many tokens as base
plus CPT. Finished runs are skipped and a killed grid resumes: run the same command again.
Writes <out>/results.md, <out>/results.csv, <out>/curves.png and <out>/report/report.html.

A spec with `corpora: [A, B, C, ...]` runs a dataset sequence instead (cpt/experiment/sequence.py): per seed and
strategy (re-warmed cosine; infinite trunk with an anneal branch at every boundary) one run through all corpora
with replay of the earlier ones, optionally a from-scratch baseline per boundary; it writes the forgetting matrix
(results.md/csv, forgetting_matrix.png) with mean ± std over the seeds, and curves.png.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cpt.commands.train import exit_code_arg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpt experiment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="experiment spec (YAML), e.g. configs/experiments/tiny_cpu.yaml")
    p.add_argument("--out", help="experiment folder (default runs/experiments/<spec name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set cpt_tokens=20480 --set 'replay_shares=[0, 0.25]'")
    p.add_argument("--max-runs", type=int, metavar="N",
                   help="train at most N runs in this call (finished runs do not count), then write the table")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (corpora, runs, steps, LRs, FLOPs, estimated time) and write nothing")
    p.add_argument("--preempted-exit-code", type=exit_code_arg, metavar="N",
                   help="exit N (1..255; 75, EX_TEMPFAIL, suggested) when SIGTERM/SIGUSR1 stopped a run with its "
                        "checkpoint saved, not 0, so a scheduler that restarts failed jobs (a k8s Job) continues the grid")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from cpt.console import LOG_FORMAT, OncePerMessage

    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.addFilter(OncePerMessage("lm_eval"))  # its warnings once, not at every evaluation of every run
    from cpt.experiment import ExperimentError, ExperimentPreempted, run_experiment
    from cpt.commands.train import run_errors

    if args.max_runs is not None and args.max_runs < 0:
        print("cpt experiment: --max-runs must be >= 0", file=sys.stderr)
        return 2
    try:
        run_experiment(args.spec, args.out, overrides=args.overrides, max_runs=args.max_runs, dry_run=args.dry_run)
    except ExperimentPreempted:  # (said with the results; a run's own line said where it stopped)
        return args.preempted_exit_code or 0
    except ExperimentError as e:
        print(f"cpt experiment: {e}", file=sys.stderr)
        return 2
    except run_errors() as e:  # a run stopped on a user-facing problem (bad shard, model setting, ...): one line
        print(f"cpt experiment: {e}", file=sys.stderr)
        return 1
    return 0
