"""`cpt merge ADAPTER_DIR --out DIR [--base BASE]`: merge a LoRA adapter into its base model (plain HF model)."""

from __future__ import annotations

import argparse
import sys

from cpt.commands.export import shard_size

_DTYPES = {"auto": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpt merge", description=__doc__)
    p.add_argument("adapter_dir", help="a peft adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="output directory for the merged model (safetensors + tokenizer)")
    p.add_argument("--base", default=None,
                   help="base model (hub id or directory); default: base_model_name_or_path in adapter_config.json")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="auto",
                   help="dtype of the merged weights (auto: the dtype the base was saved in)")
    p.add_argument("--max-shard-size", default="5GB", type=shard_size,
                   help="split weights larger than this into several files + model.safetensors.index.json (default 5GB)")
    from cpt.hub import add_push_arguments

    add_push_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from cpt.export import ExportFolderError
    from cpt.hub import HubPushError, card_for_export, check_push_target, push_flags_problem, push_folder
    from cpt.model import ModelLoadError, merge_adapter

    if problem := push_flags_problem(args):
        print(f"cpt merge: error: {problem}", file=sys.stderr)
        return 2
    if args.push_to_hub and (problem := check_push_target(args.push_to_hub)):  # (before the merge's work)
        print(f"cpt merge: error: {problem}", file=sys.stderr)
        return 1
    dtype = _DTYPES[args.dtype]
    try:
        out = merge_adapter(args.adapter_dir, args.out, base=args.base,
                            dtype=getattr(torch, dtype) if dtype else None, max_shard_size=args.max_shard_size)
        print(f"merged {args.adapter_dir} into {out}")
        if args.push_to_hub:
            card = card_for_export(out, args.adapter_dir, args.push_to_hub.split("/")[-1])
            print(f"pushed {out} to {push_folder(out, args.push_to_hub, private=not args.public, revision=args.hub_revision, card=card)}")
    except (ModelLoadError, ExportFolderError, FileNotFoundError, HubPushError) as e:  # one line, no traceback
        print(f"cpt merge: error: {e}", file=sys.stderr)
        return 1
    return 0
