"""`cpt average OUT CKPT1 CKPT2 ...`: uniform (or weighted) average of HF checkpoints or peft adapters."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpt average", description=__doc__)
    p.add_argument("out", help="output directory")
    p.add_argument("checkpoints", nargs="+", help="two or more HF export (or adapter) directories, cpt checkpoints or run directories, with identical tensors")
    p.add_argument("--weights", default=None, type=_weights,
                   help="comma-separated weights, one per checkpoint (default: uniform)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="shard the output above this size")
    return p


def _weights(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers (e.g. 0.25,0.75)") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if len(args.checkpoints) < 2:
        build_parser().error("give at least two checkpoints")
    from cpt.averaging import average_checkpoints
    from cpt.checkpoint import CheckpointError

    try:
        weights = args.weights
        from cpt.export import check_export_target  # (first: a scratch export beside OUT is written before it is used)

        check_export_target(args.out, args.checkpoints, "one of the checkpoints being averaged (OUT comes first)")
        _refuse_a_runs_export(args.out)
        _check_json_files(args.checkpoints)
        out = average_checkpoints(args.checkpoints, args.out, weights=weights,
                                  max_shard_bytes=int(args.max_shard_gb * 2**30))
    except (ValueError, OSError, CheckpointError) as e:  # not safetensors, different tensors, bad weights, a
        # checkpoint that cannot be exported: one line, no traceback
        print(f"cpt average: error: {e}", file=sys.stderr)
        return 1
    print(f"averaged {len(args.checkpoints)} checkpoints into {out}")
    return 0


def _refuse_a_runs_export(out: str) -> None:
    """OUT that is a run's own export (``RUN/export``, ``RUN/exports/step_N``): most likely OUT was forgotten
    (``cpt average RUN/export CKPT1 CKPT2``), and the average would replace the run's model, which `cpt eval RUN`,
    `cpt export` users and the run's later stages take for the run's own."""
    from pathlib import Path

    from cpt.resume import run_dir_around

    p = Path(out)
    run = run_dir_around(p) if (p / "config.json").is_file() or (p / "adapter_config.json").is_file() else None
    if run is not None and p.resolve() != run:
        raise ValueError(f"OUT {out} is the export of the run {run}: the average would replace that run's model. OUT "
                         "comes first (cpt average OUT CKPT1 CKPT2 ...); give a new folder")


def _check_json_files(checkpoints: list[str]) -> None:
    """The config files an average copies or reads (config.json from the first, adapter_config.json) must parse: a cut
    one was copied into OUT as it was, an output that then did not load."""
    import json
    from pathlib import Path

    from cpt.checkpoint_export import run_export

    for ckpt in checkpoints:
        for name in ("config.json", "adapter_config.json"):
            f = Path(run_export(ckpt)) / name
            if f.is_file():
                try:
                    json.loads(f.read_text())
                except (OSError, ValueError) as e:
                    raise ValueError(f"{f}: cannot be read ({type(e).__name__}: {e})") from None
