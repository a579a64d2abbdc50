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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from cpt.model import merge_adapter

    from cpt.model import ExportFolderError, ModelLoadError

    dtype = _DTYPES[args.dtype]
    try:
        out = merge_adapter(args.adapter_dir, args.out, base=args.base,
                            dtype=getattr(torch, dtype) if dtype else None, max_shard_size=args.max_shard_size)
    except (ModelLoadError, ExportFolderError, FileNotFoundError) as e:  # e.g. pickle weights only: one line, no traceback
        print(f"cpt merge: error: {e}", file=sys.stderr)
        return 1
    print(f"merged {args.adapter_dir} into {out}")
    return 0
