"""`cpt export CHECKPOINT --out DIR [--adapter]`: a resume checkpoint as an HF model directory (or peft adapter).

CHECKPOINT is a checkpoint directory (`runs/x/checkpoints/step_00001000`) or a run directory (its newest valid
checkpoint), written by any backend and number of processes (1 process, DDP, FSDP sharded, DeepSpeed ZeRO-2/3);
the export runs on one CPU process. A LoRA run's checkpoint is exported merged into its base model, or as the
peft adapter with `--adapter`.
"""

from __future__ import annotations

import argparse
import sys


def shard_size(text: str) -> str | int:
    """A ``--max-shard-size`` value: a size with its unit (checked as the config's ``checkpoint.max_shard_size``)."""
    from cpt.config.outputs import SHARD_SIZE

    if text.isdigit() and int(text) > 0:
        return int(text)
    if not SHARD_SIZE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r}: give a size such as 5GB, 500MB or 2GiB (or a number of bytes)")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpt export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a cpt checkpoint directory, or a run directory (its latest valid checkpoint)")
    p.add_argument("--out", required=True, help="output directory (HF model: safetensors + config + tokenizer)")
    p.add_argument("--adapter", action="store_true", help="LoRA runs: write the peft adapter instead of the merged model")
    p.add_argument("--ema", action="store_true", help="the run's EMA of the weights at that checkpoint (train.ema_decay), as "
                   "the run's export-ema/ holds it at the end, instead of the trained weights")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="dtype of the exported weights (default: the run's checkpoint.export_dtype, fp32 unless set)")
    p.add_argument("--max-shard-size", default=None, type=shard_size,
                   help="split weights larger than this into several files + model.safetensors.index.json "
                        "(e.g. 5GB, 500MB, 2GiB; default: the run's checkpoint.max_shard_size, 5GB unless set)")
    from cpt.hub import add_push_arguments

    add_push_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cpt.checkpoint import CheckpointError
    from cpt.consolidate import ConsolidateError
    from cpt.checkpoint_export import export_checkpoint
    from cpt.export import ExportFolderError
    from cpt.model import ModelLoadError

    if args.adapter and args.dtype not in (None, "fp32"):
        print(f"cpt export: --dtype {args.dtype} applies to full models; --adapter writes the peft adapter as peft "
              "does (fp32): drop --dtype, or drop --adapter for the merged model in that dtype", file=sys.stderr)
        return 1
    if args.adapter and args.max_shard_size is not None:  # (ignored: peft writes one adapter file)
        print("cpt export: --max-shard-size applies to full models; --adapter writes the peft adapter as one file: "
              "drop --max-shard-size, or drop --adapter for the merged model in shards", file=sys.stderr)
        return 1
    from cpt.hub import HubPushError, card_for_checkpoint, check_push_target, push_flags_problem, push_folder

    if problem := push_flags_problem(args):
        print(f"cpt export: {problem}", file=sys.stderr)
        return 2

    if args.push_to_hub and (problem := check_push_target(args.push_to_hub)):  # (before the export's work)
        print(f"cpt export: {problem}", file=sys.stderr)
        return 1
    try:
        out = export_checkpoint(args.checkpoint, args.out, adapter=args.adapter, dtype=args.dtype,
                                max_shard_size=args.max_shard_size, ema=args.ema)
        if args.push_to_hub:
            url = push_folder(out, args.push_to_hub, private=not args.public, revision=args.hub_revision,
                              card=card_for_checkpoint(out, args.checkpoint, args.push_to_hub.split("/")[-1]))
            print(f"pushed {out} to {url}")
    except HubPushError as e:
        print(f"cpt export: {e}", file=sys.stderr)
        return 1
    except ModelLoadError as e:  # the base model or tokenizer moved, or a hub id while offline
        print(f"cpt export: {e}; the export rebuilds the run's model from the model section of the checkpoint's "
              "config.yaml, which must still load", file=sys.stderr)
        return 1
    except (CheckpointError, ConsolidateError, ExportFolderError, FileNotFoundError) as e:
        print(f"cpt export: {e}", file=sys.stderr)
        return 1
    return 0
