"""`cpt verify DIR... | --config RUN.yaml`: re-read prepared token shards and check every file against its manifest.

`cpt prepare` checks what it writes; a training start only checks manifests and file sizes (its cost does not
grow with the corpus). Run this after copying or uploading prepared data (local folders or fsspec URLs such as
s3://, gs://, https://), or when a disk is suspect: every file's size and xxh3-64 checksum, every problem listed.
"""

from __future__ import annotations

import argparse
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpt verify", description="Check prepared token shards (sizes and checksums) "
                                "against their manifest.json; the held-out folder a manifest names is checked too.")
    p.add_argument("dirs", nargs="*", metavar="DIR", help="prepared folders or fsspec URLs")
    p.add_argument("--config", metavar="RUN.yaml", help="also check every shard source and held-out set of this run config")
    return p


def _folders(args) -> list[str]:
    folders = list(args.dirs)
    if args.config:
        from cpt.config import load_config

        cfg = load_config(args.config)
        folders += [s.path for s in cfg.data.sources if s.type != "hf"] + [h.path for h in cfg.data.heldout]
    return list(dict.fromkeys(folders))


def verify_folder(path: str) -> tuple[list[str], str]:
    """(problems, a one-line summary) for a prepared folder and the held-out folder its manifest names."""
    from cpt.data.shards import ShardError, TokenShards, join

    try:
        shards = TokenShards.open(path, check_sizes=False)
    except ShardError as e:
        return [str(e)], ""
    problems = [f"{path}: {p}" for p in shards.verify()]
    n_bytes, n_files = shards.num_bytes, 2 * len(shards.manifest["shards"])
    held = shards.manifest.get("heldout")
    held = held.get("path") if isinstance(held, dict) else None
    if held:
        sub, _ = verify_folder(join(path, held))
        problems += sub
    summary = f"{len(shards.manifest['shards'])} shards, {shards.num_tokens:,} tokens, {n_bytes / 1e6:,.1f} MB in {n_files} files"
    return problems, summary + (" (+ held-out)" if held else "")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        folders = _folders(args)
    except ValueError as e:  # ConfigError
        print(f"cpt verify: {e}", file=sys.stderr)
        return 2
    if not folders and args.config:
        print(f"cpt verify: {args.config} names no prepared folders (its sources are `type: hf`, read by `datasets`, and "
              "it has no held-out sets): nothing to check")
        return 0
    if not folders:
        build_parser().print_usage(sys.stderr)
        print("cpt verify: give at least one DIR or --config", file=sys.stderr)
        return 2
    bad = 0
    for path in folders:
        t0 = time.perf_counter()
        problems, summary = verify_folder(path)
        if problems:
            bad += 1
            for p in problems:
                print(f"FAILED {p}")
        else:
            print(f"ok     {path}: {summary}, checked in {time.perf_counter() - t0:.1f} s")
    if bad:
        print(f"cpt verify: {bad} of {len(folders)} folders have problems; re-run `cpt prepare` (or re-copy) for them",
              file=sys.stderr)
    return 1 if bad else 0
