"""`cpt verify DIR... | --config RUN.yaml`: re-read prepared token shards and check every file against its manifest; or
cpt checkpoints against their CHECKSUMS.json.

`cpt prepare` checks what it writes; a training start only checks manifests and file sizes (its cost does not
grow with the corpus). Run this after copying or uploading prepared data (local folders or fsspec URLs such as
s3://, gs://, https://), or when a disk is suspect: every file's size and xxh3-64 checksum, every problem listed.
A checkpoint (``RUN/checkpoints/step_N``) or a run directory (each of its checkpoints) is checked the way ``--resume``
checks one before loading it: after copying checkpoints to another cluster, before deleting the originals.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpt verify", description="Check prepared token shards (sizes and checksums) "
                                "against their manifest.json; the held-out folder a manifest names is checked too. A cpt "
                                "checkpoint, or a run directory (each of its checkpoints), is checked against its "
                                "CHECKSUMS.json (every file's size and digest).")
    p.add_argument("dirs", nargs="*", metavar="DIR", help="prepared folders or fsspec URLs; cpt checkpoints or run directories")
    p.add_argument("--config", metavar="RUN.yaml", help="also check every shard source and held-out set of this run config")
    return p


def _folders(args) -> list[str]:
    folders = list(args.dirs)
    if args.config:
        from cpt.config import load_config

        cfg = load_config(args.config)
        folders += [s.path for s in cfg.data.sources if s.type != "hf"] + [h.path for h in cfg.data.heldout]
    return list(dict.fromkeys(folders))


def checkpoints_in(path: str) -> list | None:
    """The cpt checkpoints ``path`` names (itself, or a run directory's ``checkpoints/step_N``), None for another folder."""
    from cpt.checkpoint_dir import CHECKSUMS, TRAINER_STATE, list_checkpoints

    p = Path(path)
    if "://" in path:
        return None
    if (p / CHECKSUMS).is_file() or (p / TRAINER_STATE).is_file():
        return [p]
    if (p / "checkpoints").is_dir():
        return list_checkpoints(p)
    if p.name == "checkpoints" and p.is_dir() and (list_checkpoints(p.parent) or not any(p.iterdir())):
        return list_checkpoints(p.parent)  # (RUN/checkpoints itself: it said "no manifest.json ... run cpt prepare")
    run_dir = (p / "config.yaml").is_file() and any((p / f).exists() for f in ("metrics.jsonl", "train.log", "export"))
    return [] if run_dir else None  # (a run without checkpoints: checkpoint.every unset; said "no manifest.json")


def verify_checkpoint_dir(ckpt) -> tuple[list[str], str]:
    """(problems, a one-line summary) for one cpt checkpoint: what ``--resume`` checks before it loads one."""
    from cpt.checkpoint_dir import checkpoint_size, verify_checkpoint

    problem = verify_checkpoint(ckpt, every_problem=True)  # (every broken file: it listed the first alone)
    if problem:
        return [f"{ckpt}: {p}" for p in problem.split("; ")], ""
    files, size = checkpoint_size(ckpt)
    return [], f"checkpoint, {files} files, {size / 1e6:,.1f} MB"


def verify_folder(path: str, listed: frozenset[str] = frozenset()) -> tuple[list[str], str]:
    """(problems, a one-line summary) for a prepared folder and the held-out folder its manifest names, unless that
    one is among the folders ``listed`` for checking on its own line (``--config``'s held-out sets: each was reported
    twice, and the intact source beside it counted as broken)."""
    from cpt.data.loader import same_folder
    from cpt.data.shards import ShardError, TokenShards, join

    try:
        shards = TokenShards.open(path, check_sizes=False)
    except ShardError as e:
        return [str(e)], ""
    problems = [f"{path}: {p}" for p in shards.verify()]
    n_bytes, n_files = shards.num_bytes, 2 * len(shards.manifest["shards"])
    held = shards.manifest.get("heldout")
    held = held.get("path") if isinstance(held, dict) else None
    if held and same_folder(join(path, held)) not in listed:
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
    from cpt.data.loader import same_folder

    bad, checked = [], 0
    for path in folders:
        ckpts, hidden = checkpoints_in(path), []
        if ckpts is not None:  # checkpoints an earlier --resume set aside as broken (unusable-step_N): said, not checked
            from cpt.checkpoint_dir import UNUSABLE_PREFIX

            folder = Path(path) if Path(path).name == "checkpoints" else Path(path) / "checkpoints"
            for aside in sorted(folder.glob(f"{UNUSABLE_PREFIX}*")):
                print(f"note   {aside}: set aside as broken by an earlier --resume (not checked; delete it when done)")
            from cpt.checkpoint_dir import interrupted_replaces

            hidden = interrupted_replaces(folder)
            for trash in hidden:  # (it said "a run directory with no checkpoint")
                print(f"note   {trash}: a checkpoint a save of its own step was replacing when it was interrupted; "
                      "the next --resume restores it (not checked)")
        if ckpts == [] and not hidden:
            print(f"ok     {path}: a run directory with no checkpoint (none saved yet, or checkpoint.every unset)")
        for item in [path] if ckpts is None else ckpts:
            checked += 1
            t0 = time.perf_counter()
            problems, summary = (verify_folder(item, frozenset(same_folder(f) for f in folders if f != item)) if ckpts is None
                                 else verify_checkpoint_dir(item))
            if problems:
                bad.append("prepared" if ckpts is None else "checkpoint")
                for p in problems:
                    print(f"FAILED {p}")
            else:
                print(f"ok     {item}: {summary}, checked in {time.perf_counter() - t0:.1f} s")
    if bad:
        advice = []
        if "prepared" in bad:
            advice.append("re-run `cpt prepare` (or re-copy) for the prepared folders")
        if "checkpoint" in bad:
            advice.append("re-copy a copied checkpoint; `--resume` skips a broken one and sets it aside")
        print(f"cpt verify: {len(bad)} of {checked} folders have problems; {'; '.join(advice)}", file=sys.stderr)
    return 1 if bad else 0
