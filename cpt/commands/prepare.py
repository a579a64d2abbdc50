"""`cpt prepare INPUT... --tokenizer TOK --out DIR`: tokenize raw text into token shards (see cpt.data.prepare)."""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cpt prepare",
        description="Tokenize jsonl (plain/.gz/.zst), parquet, text files or folders, or a `datasets` spec (--hf) "
        "into token shards with a manifest.json. Bad records are skipped and counted.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or fsspec URLs; with --hf: load_dataset paths")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="hub id or local folder of a fast tokenizer")
    tok.add_argument("--extend-vocab", metavar="RUN.yaml",
                     help="use the extended tokenizer that `cpt train RUN.yaml` builds (its model.tokenizer + model.vocab)")
    p.add_argument("--out", required=True, help="output folder (local)")
    p.add_argument("--text-field", default="text", help="JSON/parquet/dataset field holding the text (default: text)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file (default: 100M)")
    held = p.add_mutually_exclusive_group()
    held.add_argument("--heldout-docs", type=int, help="hold out this many documents into OUT/heldout")
    held.add_argument("--heldout-fraction", type=float, help="hold out this fraction of documents into OUT/heldout")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out selection (default: 0)")
    p.add_argument("--num-proc", type=int, default=1,
                   help="tokenizer processes; 1 (default) uses the tokenizer's own threads on all cores")
    p.add_argument("--max-doc-tokens", type=int, help="documents longer than this are truncated (or skipped, --long-docs skip)")
    p.add_argument("--long-docs", choices=["truncate", "skip"], default="truncate")
    p.add_argument("--add-bos", action=argparse.BooleanOptionalAction, default=None,
                   help="put BOS before each document (EOS always follows each); default: where the tokenizer starts "
                        "its own encodings with BOS (Llama 3, Gemma, Mistral), not otherwise (GPT-2, Qwen)")
    p.add_argument("--special-tokens-as-text", action="store_true",
                   help="encode the text of a special token inside a document (e.g. '<|endoftext|>' in code) as plain "
                   "text; by default it becomes that token, as in transformers, and such documents are counted")
    p.add_argument("--glob", help="only files whose name matches this pattern when an input is a folder, e.g. '*.jsonl.zst'")
    p.add_argument("--hf", action="store_true", help="inputs are datasets.load_dataset paths (hub ids, folders, 'json', ...)")
    p.add_argument("--dataset-name", help="--hf: the dataset configuration name")
    p.add_argument("--split", default="train", help="--hf: split (default: train)")
    p.add_argument("--data-files", nargs="+", help="--hf: data_files for builders such as json/parquet/text")
    p.add_argument("--streaming", action="store_true", help="--hf: stream the dataset instead of downloading it")
    p.add_argument("--force", action="store_true", help="re-tokenize even when OUT is up to date")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (nor progress lines)")
    p.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                   help="where stderr is not a terminal (a batch job's log): a progress line every SECONDS (default 30)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from cpt.data.prepare import PrepareError, PrepareOptions, prepare
    from cpt.data.prepare_console import format_summary

    tokenizer = args.tokenizer
    if args.extend_vocab:
        from cpt.model import extended_tokenizer_for_run

        try:
            tokenizer = extended_tokenizer_for_run(args.extend_vocab)
            # the manifest's tokenizer name: not the base tokenizer's alone (the hash is the extended one's)
            tokenizer.name_or_path = f"{tokenizer.name_or_path} extended by model.vocab of {args.extend_vocab}"
        except (ValueError, OSError) as e:  # ConfigError is a ValueError
            print(f"cpt prepare: error: --extend-vocab {args.extend_vocab}: {e}", file=sys.stderr)
            return 1
    try:
        options = PrepareOptions(
            text_field=args.text_field, shard_tokens=args.shard_tokens, heldout_docs=args.heldout_docs,
            heldout_fraction=args.heldout_fraction, seed=args.seed, max_doc_tokens=args.max_doc_tokens,
            long_docs=args.long_docs, add_bos=args.add_bos, special_tokens_as_text=args.special_tokens_as_text, glob=args.glob, hf=args.hf, dataset_name=args.dataset_name,
            split=args.split, data_files=args.data_files, streaming=args.streaming, num_proc=args.num_proc,
            force=args.force, progress=not args.no_progress and sys.stderr.isatty(),
            progress_every_s=None if args.no_progress or sys.stderr.isatty() else args.progress_every,
        )
        manifest = prepare(args.inputs, tokenizer, args.out, options)
    except PrepareError as e:
        print(f"cpt prepare: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cpt prepare: interrupted; no manifest was written, the previous one (if any) was kept or removed", file=sys.stderr)
        return 130
    print(format_summary(manifest, args.out))
    return 0
