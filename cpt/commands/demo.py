"""`cpt demo [--out runs/demo] [--scale default|tiny]`: the offline continual pre-training demo."""

from __future__ import annotations

import argparse
import logging


def build_parser() -> argparse.ArgumentParser:
    from cpt.demo import SCALES

    p = argparse.ArgumentParser(prog="cpt demo", description=__doc__)
    p.add_argument("--out", default="runs/demo", help="where corpora, tokenizer, shards and runs go (default runs/demo)")
    p.add_argument("--scale", choices=sorted(SCALES), default="default", help="'tiny' is the test-suite smoke size")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of both demo run configs, e.g. --set train.progress_bar=false")
    return p


def main(argv: list[str]) -> int:
    from cpt.console import LOG_FORMAT
    from cpt.demo import run_demo

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    run_demo(args.out, args.scale, args.overrides)
    return 0
