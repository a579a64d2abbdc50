"""One module per `cpt` sub-command; each exposes main(argv) -> exit code. Here: argparse types they share."""

from __future__ import annotations

import argparse


def at_least(minimum: int):
    """An argparse ``type``: a whole number >= ``minimum`` (``--batch-size 0`` was a traceback, ``--seq-len 0`` and
    ``--max-length 0`` silently the default, ``--max-tokens -5`` a budget 5 tokens short of the whole file)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: give a whole number >= {minimum}")
        return value

    return parse
