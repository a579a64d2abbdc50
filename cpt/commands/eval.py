"""`cpt eval CHECKPOINT`: held-out loss and lm-eval tasks on a saved model or LoRA adapter.

CHECKPOINT is an HF export directory (config.json), a LoRA adapter directory (adapter_config.json;
the base model comes from --base or the adapter's base_model_name_or_path), or a run directory, in
which case its final export (<run_dir>/export) is used.

    cpt eval runs/cpt/export --tasks cpt_local --limit 50
    cpt eval runs/cpt --baseline runs/base/export --tasks cpt_shakespeare_next,cpt_python_next --limit 300
    cpt eval runs/lora/export --base runs/base/export --heldout shakespeare=data/shk/heldout:upstream \\
        --heldout python=data/py/heldout:downstream --tasks cpt_arith_mc,hellaswag --out results.json

--heldout NAME=PATH:TAG: PATH is a prepared shard directory (`cpt prepare`; its tokenizer must match) or a
file read as `cpt prepare` reads it (plain text, jsonl plain/.gz/.zst or parquet with a "text" field; bad records
skipped and counted) and tokenized here, documents joined with EOS.

--baseline BASE evaluates BASE (an export, adapter or run directory, e.g. the model the run started from) on the
same tasks and documents, and prints each score beside the baseline's with the difference and its standard error
(sqrt(se_base^2 + se^2)); a difference within two standard errors is marked as noise. --limit takes a seeded
subset of each task's documents (--seed; a run's in-loop evaluations use run.seed), so with the same seed and
limit the items are those the run scored.

A CHECKPOINT inside a cpt run directory (the run dir, RUN/export, RUN/exports/step_N, RUN/checkpoints/step_N) is scored
as the run scored it in the loop (without --tasks and --heldout: on the run's held-out sets and lm-eval tasks): --max-length defaults to the run's eval.lm_eval.max_length or data.seq_len (lm-eval's
context length; elsewhere the model's), --seed to its eval.lm_eval.seed or run.seed, --bootstrap-iters to its
eval.lm_eval.bootstrap_iters, --seq-len to its data.seq_len, --max-tokens to its eval.tokens_per_set (or the set's
max_tokens), --sample-seed to its eval.sample_seed and --document-masking to its data.document_masking; without
--limit (and --seed), each task the run scored is scored on the documents the run's checkpoints record (else its limit). The first line printed says what was taken.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from cpt.commands import at_least  # (re-exported: cpt interpolate takes it from here)


def parse_heldout(spec: str) -> tuple[str, str, str]:
    """``NAME=PATH:TAG`` -> (name, path, tag); PATH may itself hold ':' (URLs)."""
    if "=" not in spec:
        raise ValueError(f"--heldout {spec!r}: expected NAME=PATH:TAG")
    name, rest = spec.split("=", 1)
    path, sep, tag = rest.rpartition(":")
    if not sep or tag not in ("upstream", "downstream"):
        raise ValueError(f"--heldout {spec!r}: expected NAME=PATH:TAG with TAG upstream or downstream")
    if not name or not path:
        raise ValueError(f"--heldout {spec!r}: empty name or path")
    from cpt.redaction import URL_CREDENTIALS_HINT, url_credentials

    if (secret := url_credentials(path)) is not None:  # (--out's JSON and the log name the path; not repeated here)
        raise ValueError(f"--heldout {name}: a URL with {secret} would be written to the results and the log; "
                         f"{URL_CREDENTIALS_HINT}")
    return name, path, tag


def resolve_checkpoint(path: str | Path, stack: ExitStack) -> Path:
    """An HF model or adapter directory: ``path`` itself, a run directory's export/, or a cpt resume checkpoint
    (or a run directory without export/) exported on the fly through ``cpt export``'s path into a hidden folder of
    its run directory (the disk it is on, not /tmp), removed when ``stack`` closes."""
    from cpt.checkpoint_export import is_checkpoint_dir, model_dir_of, run_export

    p = Path(run_export(path))
    if (p / "config.json").exists() or (p / "adapter_config.json").exists():
        return p
    if is_checkpoint_dir(p):
        return stack.enter_context(model_dir_of(p, prefix=".cpt-eval-"))
    raise FileNotFoundError(
        f"{p}: not an HF model directory (config.json), a LoRA adapter (adapter_config.json), "
        "a cpt checkpoint, or a run directory with an export/ folder or checkpoints"
    )


def run_eval_settings(checkpoint: str | Path) -> dict[str, Any] | None:
    """How the cpt run that ``checkpoint`` lies in evaluated in the loop (its config.yaml beside metrics.jsonl: the
    path itself or up to two folders up, read as the run read it): the defaults of the flags named in the module
    docstring; None outside a run."""
    from cpt.config import load_config
    from cpt.resume import run_dir_around, run_relative
    from eval_harness.benchmarks import lm_eval_context

    d = run_dir_around(checkpoint)
    if d is None:
        return None
    from cpt.checkpoint import TRAINER_STATE
    from cpt.config import ConfigError

    # a checkpoint's own config.yaml: the settings it was evaluated with (a resume may have changed the run's since)
    own = Path(checkpoint) / "config.yaml"
    config_file = own if own.is_file() and (Path(checkpoint) / TRAINER_STATE).is_file() else d / "config.yaml"
    try:
        cfg = load_config(config_file)
    except ConfigError as e:  # a damaged run config (empty, cut, hand-edited): one line naming it, not a traceback
        said = " ".join(str(e).split())
        raise ConfigError(said if str(config_file) in said else f"{config_file}: {said}") from None
    lm = cfg.eval.lm_eval
    return {"run": d, "max_length": lm_eval_context(cfg), "seed": cfg.run.seed if lm.seed is None else lm.seed,
            "bootstrap_iters": lm.bootstrap_iters, "task_limits": {t.name: t.limit or lm.limit for t in lm.tasks},
            "seq_len": cfg.data.seq_len, "max_tokens": cfg.eval.tokens_per_set,
            "sample_seed": cfg.eval.sample_seed, "document_masking": cfg.data.document_masking,
            "set_max_tokens": {h.name: h.max_tokens for h in cfg.data.heldout},
            "heldout": [(h.name, run_relative(h.path, d, cfg.run.output_dir), h.tag) for h in cfg.data.heldout],
            "tasks": [t.name for t in lm.tasks],
            "sources": [(s.name, run_relative(s.path, d, cfg.run.output_dir)) for s in cfg.data.sources if s.type == "shards"]}


def _training_folders(heldouts: list[tuple[str, str, str]], run: dict[str, Any] | None, given: bool) -> list[str]:
    """A warning for each ``--heldout`` set that is the folder of a training source of the checkpoint's run: its
    loss measures memorisation, not generalisation (training warns the same of its own held-out sets)."""
    from cpt.data.loader import same_folder

    sources = {same_folder(path): name for name, path in (run or {}).get("sources", [])} if given else {}
    return [f"--heldout {name}: {path} is the folder of the run's training source {sources[same_folder(path)]!r}: its "
            "loss measures memorisation, not generalisation (use a held-out split, e.g. the heldout/ folder "
            "`cpt prepare --heldout-docs` writes)" for name, path, _ in heldouts if same_folder(path) in sources]


def add_heldout_sample_flags(parser: argparse.ArgumentParser, seq_len_else: str) -> None:
    """The flags that say which held-out tokens are scored, and how (`cpt eval`, `cpt interpolate`): unset (None) until
    :func:`apply_run_defaults` fills them from the run or the stand-alone defaults (``seq_len_else``: the command's)."""
    parser.add_argument("--seq-len", type=at_least(2), default=None,
                        help=f"held-out sequence length (default: the run's data.seq_len; else {seq_len_else})")
    parser.add_argument("--max-tokens", type=at_least(1), default=None, help="token budget per held-out set: a seeded sample of "
                        "whole documents, the whole set if it fits (default: the run's eval.tokens_per_set; else 262144)")
    parser.add_argument("--sample-seed", type=int, default=None,
                        help="seed of the held-out document sample (default: the run's eval.sample_seed; else 0)")
    parser.add_argument("--document-masking", action=argparse.BooleanOptionalAction, default=None,
                        help="held-out documents attend only to themselves (default: the run's data.document_masking; else off)")


def _flag(key: str, value: Any) -> str:
    """The command-line flag that sets ``key`` to ``value`` (``--document-masking``, ``--no-...``, ``--seed 7``)."""
    if isinstance(value, bool):
        return f"--{'' if value else 'no-'}{key.replace('_', '-')}"
    return f"--{key.replace('_', '-')} {value}"


def apply_run_defaults(args, run: dict[str, Any] | None, lm_eval: bool, heldout: bool, prog: str = "cpt eval") -> None:
    """Fill the flags left unset from ``run`` (:func:`run_eval_settings`), else from the stand-alone defaults; say which.
    (Also `cpt interpolate`'s held-out flags: ``args`` may lack the lm-eval ones.)"""
    keys = ((("max_length", "seed", "bootstrap_iters") if lm_eval else ())
            + (("seq_len", "max_tokens", "sample_seed", "document_masking") if heldout else ()))
    unset = [k for k in keys if getattr(args, k) is None]
    if run is not None and unset:
        for k in unset:
            setattr(args, k, run[k])
        print(f"{prog}: as run {run['run']} evaluated in the loop: " + ", ".join(_flag(k, getattr(args, k)) for k in unset))
    args.set_max_tokens = {k: v for k, v in (run or {}).get("set_max_tokens", {}).items() if v} if "max_tokens" in unset else {}
    args.task_limits = {}
    if run is not None and lm_eval and args.limit is None:  # the run's documents of the tasks it scored
        args.task_limits = {t: n for t, n in run["task_limits"].items() if n}
        if args.task_limits:
            print("cpt eval: --limit per task as the run: " + ", ".join(f"{t} {n}" for t, n in args.task_limits.items())
                  + " (documents at most: a task with fewer is scored on all of them)")
    for k, default in (("seed", 1234), ("bootstrap_iters", 1000), ("max_tokens", 262144), ("sample_seed", 0),
                       ("document_masking", False)):
        if hasattr(args, k) and getattr(args, k) is None:
            setattr(args, k, default)


def text_heldout_tokens(path: Path, tokenizer, seq_len: int, max_tokens: int | None) -> torch.Tensor:
    """Tokenize a text/jsonl/parquet file (read as `cpt prepare` reads it: :mod:`cpt.data.readers`, field ``text``)
    into ``LongTensor[n, seq_len]`` (documents joined with EOS, each after BOS where the tokenizer adds one itself, as
    `cpt prepare` does by default); records that cannot be used are skipped, counted on stderr."""
    from cpt.data.encode import bos_by_convention
    from cpt.data.readers import ReadCounts, ReadError, read_file

    ids: list[int] = []
    eos, bos = tokenizer.eos_token_id, bos_by_convention(tokenizer)
    counts = ReadCounts()
    for text in read_file(str(path), "text", counts):
        if bos is not None:
            ids.append(bos)
        ids.extend(tokenizer(text, add_special_tokens=False).input_ids)
        if eos is not None:
            ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if counts.skipped:
        print(f"cpt eval: {path}: skipped {counts.describe_skips()}", file=sys.stderr)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = len(ids) // seq_len
    if n == 0:  # (an empty or too short file: one line from `cpt eval`, it was a traceback after the model loaded)
        raise ReadError(f"held-out file {path}: {len(ids)} tokens, fewer than one sequence of {seq_len} (--seq-len)")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def load_heldout_tokens(name: str, path: str, tag: str, tokenizer, seq_len: int, max_tokens: int | None,
                        seed: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
    """The tokens to evaluate and what they cover: a prepared set is sampled by whole documents
    (:func:`cpt.data.loader.sample_heldout`, the same sample as training's ``eval.sample_seed``); a text
    file is read from its start."""
    p = Path(path)
    if p.is_file():
        toks = text_heldout_tokens(p, tokenizer, seq_len, max_tokens)
        return toks, {"tokens": int(toks.numel()), "coverage": f"the first {int(toks.numel()):,} tokens of {p.name}"}
    from cpt.data.loader import sample_heldout
    from cpt.data.sources import HeldoutConfig

    s = sample_heldout(HeldoutConfig(name=name, path=path, tag=tag), tokenizer, seq_len, max_tokens, seed=seed)
    return s.tokens, {"tokens": s.num_tokens, "docs": s.docs, "total_docs": s.total_docs,
                      "total_tokens": s.total_tokens, "coverage": s.describe()}


def run_scored_documents(checkpoint: str | Path, run_dir: Path) -> dict[str, list[int] | None]:
    """``{leaf task: the document indices the run scored, None for all}`` as its checkpoint records them
    (trainer_state.json's ``lm_eval``: ``checkpoint``'s own, else the run's newest checkpoint's); {} when none says.
    A resume with another eval.lm_eval.limit keeps scoring the first documents, while config.yaml takes the new limit."""
    from cpt.checkpoint import TRAINER_STATE

    p = Path(checkpoint).resolve()
    found = [p] if (p / TRAINER_STATE).is_file() else sorted((run_dir / "checkpoints").glob("step_*"), reverse=True)
    for ck in found:
        try:
            state = json.loads((ck / TRAINER_STATE).read_text()).get("lm_eval") or {}
        except (OSError, ValueError, AttributeError):
            continue
        samples = state.get("samples") or {}
        return {leaf: samples.get(leaf) for leaf in state.get("leaves") or []}
    return {}


def _samples(tasks: list[str], limit: int | float | None, seed: int, include_path,
             task_limits: dict[str, int | None] | None = None,
             scored: dict[str, list[int] | None] | None = None) -> dict[str, list[int]] | None:
    """The seeded document subsets of ``tasks`` (as a run's in-loop evaluations choose them), or None for all.
    ``task_limits``: per requested task, when ``limit`` is None (a run's own limits); ``scored``: the documents the
    run scored (:func:`run_scored_documents`), which win over ``task_limits``."""
    task_limits, scored = task_limits or {}, scored or {}
    if limit is None and not any(task_limits.get(t) for t in tasks) and not any(v is not None for v in scored.values()):
        return None
    from eval_harness.benchmarks import seeded_subset
    from eval_harness.task_registry import task_sizes

    samples = {}
    for task, leaves in task_sizes(tasks, include_path).items():
        lim = limit if limit is not None else task_limits.get(task)
        for leaf, n in leaves.items():
            chosen = None if lim is None else seeded_subset(leaf, n, lim if isinstance(lim, int) else math.ceil(n * lim), seed)
            if limit is None and leaf in scored and scored[leaf] != chosen:
                kept = scored[leaf]
                print(f"cpt eval: {leaf}: the documents the run scored ({len(kept) if kept is not None else 'all'} of {n}, "
                      f"its checkpoint's record), not the {len(chosen) if chosen is not None else 'all'} its config.yaml "
                      "now chooses (a resume with another limit keeps the first)")
                chosen = kept
            if chosen is not None:
                samples[leaf] = chosen
    return samples or None


def evaluate_checkpoint(ckpt: Path, args, tasks: list[str], heldouts: list[tuple[str, str, str]],
                        samples: dict[str, list[int]] | None, base: str | None, label: str | None = None) -> dict[str, Any]:
    """Held-out losses and lm-eval scores of one saved model (loaded, evaluated, freed); ``label``: its name in the
    progress lines (the path given: ``ckpt`` may be a hidden export of a checkpoint)."""
    label = label or str(ckpt)
    from cpt.evaluate import heldout_loss
    from eval_harness.lm_eval_hook import load_for_eval, run_lm_eval_detailed

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_for_eval(ckpt, base=base, device=device, dtype=args.dtype)
    result: dict[str, Any] = {"checkpoint": str(ckpt), "base": base, "heldout": {}, "lm_eval": {}}
    if heldouts:
        context = getattr(model.config, "max_position_embeddings", None) or 1024
        seq_len = args.seq_len or min(1024, int(context))
        for name, path, tag in heldouts:
            print(f"cpt eval: {label}: held-out {name}", flush=True)  # (a plain line each: a batch log's progress)
            toks, covered = load_heldout_tokens(name, path, tag, tokenizer, seq_len,
                                                args.set_max_tokens.get(name, args.max_tokens), args.sample_seed)
            loss = heldout_loss(model, toks, args.batch_size, eos_id=tokenizer.eos_token_id if args.document_masking else None)
            result["heldout"][name] = {"tag": tag, "path": path, "loss": loss, "ppl": math.exp(min(loss, 80.0)),
                                       **covered, "seq_len": seq_len, "document_masking": args.document_masking}
    if tasks:
        print(f"cpt eval: {label}: lm-eval {', '.join(tasks)}", flush=True)
        flat, raw = run_lm_eval_detailed(model, tokenizer, tasks, batch_size=args.batch_size, samples=samples,
                                         include_path=args.include_path, max_length=args.max_length,
                                         bootstrap_iters=args.bootstrap_iters, num_fewshot=args.num_fewshot, seed=args.seed)
        result["lm_eval"] = flat
        result["lm_eval_results"] = raw
        result["lm_eval_max_length"] = raw.get("max_length")
    del model
    return result


def _print_comparison(result: dict[str, Any], baseline: dict[str, Any]) -> None:
    from eval_harness.benchmarks import compare_scores, format_comparison_table

    print(f"\n{result['checkpoint']} against the baseline {baseline['checkpoint']}:")
    for name, h in result.get("heldout", {}).items():
        b = baseline["heldout"].get(name)
        if b:
            print(f"heldout {name:<20} {h['tag']:<10} loss {h['loss']:.4f}  baseline {b['loss']:.4f}  "
                  f"delta {h['loss'] - b['loss']:+.4f}")
    if result.get("lm_eval"):
        hib = (result.get("lm_eval_results") or {}).get("higher_is_better") or {}
        rows = compare_scores(baseline["lm_eval"], result["lm_eval"], hib)
        result["comparison"] = rows
        print(format_comparison_table(rows, "model", "baseline"))


def _print_summary(result: dict[str, Any]) -> None:
    for name, h in result.get("heldout", {}).items():
        print(f"heldout {name:<20} {h['tag']:<10} loss {h['loss']:.4f}  ppl {h['ppl']:.2f}  ({h.get('coverage', h['tokens'])})")
    for key, value in sorted(result.get("lm_eval", {}).items()):
        print(f"{key:<50} {value:.4f}")
    from eval_harness.benchmarks import not_finite

    for key in not_finite(result.get("lm_eval_results") or {}):  # a score lm-eval computed as NaN/inf: said, not left out
        print(f"{'lm_eval/' + key:<50} not finite (NaN or inf)")


def main(argv: list[str] | None = None) -> int:
    from cpt.config import ConfigError

    with ExitStack() as stack:  # what cpt checkpoints were exported into, removed however the evaluation ends
        try:
            return _main(argv, stack)
        except ConfigError as e:  # the run's config.yaml, read for its evaluation settings (run_eval_settings)
            print(f"cpt eval: error: {e}", file=sys.stderr)
            return 1


def _limit(text: str) -> int | float:
    """``--limit``: a whole number of documents (>= 1) or a fraction in (0, 1); 0 scored every document, a negative
    number was a traceback and 2.5 was taken as 2."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if 0 < value < 1:
        return value
    if value == 1 and text.strip() != "1":  # (`1.0`, meant as the whole, was one document: lm-eval reads >= 1 as a count)
        raise argparse.ArgumentTypeError(f"{text!r}: every document is the default (leave --limit out); one document "
                                         "is --limit 1")
    if value >= 1 and value == int(value):
        return int(value)
    raise argparse.ArgumentTypeError(f"{text!r}: give a number of documents (1, 2, ...) or a fraction between 0 and 1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpt eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("checkpoint", help="HF export dir, LoRA adapter dir, or run dir (uses <run_dir>/export)")
    parser.add_argument("--tasks", default="", help="comma-separated lm-eval tasks or tags (e.g. cpt_local, cpt_arith_mc, hellaswag)")
    parser.add_argument("--heldout", action="append", default=[], metavar="NAME=PATH:TAG", help="held-out set (repeatable)")
    parser.add_argument("--limit", type=_limit, default=None,
                        help="documents per lm-eval task (a whole number >= 1), or a fraction in (0, 1): a seeded subset (--seed)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the --limit subsets (default: the run's, for a checkpoint in a run dir; else 1234, run.seed's default)")
    parser.add_argument("--baseline", default=None, metavar="BASE",
                        help="also evaluate BASE (export, adapter or run dir) and print the scores side by side with deltas")
    parser.add_argument("--out", default=None, help="write results to this JSON file (default: print only)")
    parser.add_argument("--base", default=None, help="base model for a LoRA adapter (default: adapter_config.json's)")
    parser.add_argument("--include-path", default=None, help="extra folder of lm-eval task YAMLs")
    parser.add_argument("--batch-size", type=at_least(1), default=8, help="rows per forward pass (held-out and lm-eval)")
    add_heldout_sample_flags(parser, seq_len_else="min(1024, model context)")
    parser.add_argument("--max-length", type=at_least(1), default=None,
                        help="lm-eval context length (default: the run's in-loop one, for a checkpoint in a run dir; else the model's)")
    parser.add_argument("--num-fewshot", type=at_least(0), default=None)
    parser.add_argument("--bootstrap-iters", type=at_least(0), default=None, help="stderrs: closed form for accuracies, this "
                        "many bootstrap resamples otherwise (0: none; default: the run's eval.lm_eval.bootstrap_iters; else 1000)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    return parser


def json_target_problem(path: str | None, flag: str) -> str | None:
    """Why a results file cannot be written at ``path`` (a folder there, or a file where a parent folder should be),
    said before the evaluation runs: the write at its end failed with a traceback and lost the scores."""
    if path is None:
        return None
    from cpt.fileio import file_in_the_way

    p = Path(path)
    if p.is_dir():
        return f"{flag} {path} is a folder; give a file path (e.g. {p / 'results.json'})"
    if blocker := file_in_the_way(p.parent):
        return f"{flag} {path}: {blocker} is a file, not a folder"
    return None


def _main(argv: list[str] | None, stack: ExitStack) -> int:
    args = build_parser().parse_args(argv)
    if problem := json_target_problem(args.out, "--out"):
        print(f"cpt eval: error: {problem}", file=sys.stderr)
        return 1

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    from cpt.checkpoint import CheckpointError
    from cpt.console import log_lm_eval_once

    log_lm_eval_once()  # lm-eval's warnings once each, not once per prompt or task

    try:
        heldouts = [parse_heldout(s) for s in args.heldout]
        ckpt = resolve_checkpoint(args.checkpoint, stack)
        baseline_ckpt = resolve_checkpoint(args.baseline, stack) if args.baseline else None
    except (ValueError, FileNotFoundError, CheckpointError) as e:  # (CheckpointError: no valid checkpoint, unreadable)
        print(f"cpt eval: {e}", file=sys.stderr)
        return 2
    if not tasks and not heldouts:  # a checkpoint of a run: what the run evaluated in the loop
        run = run_eval_settings(args.checkpoint)
        heldouts, tasks = (list(run["heldout"]), list(run["tasks"])) if run is not None else ([], [])
        if tasks or heldouts:
            print("cpt eval: the run's evaluation: " + ", ".join([f"held-out {n} ({t})" for n, _, t in heldouts]
                                                                 + [f"lm-eval {t}" for t in tasks]))
    if not tasks and not heldouts:
        print("cpt eval: nothing to do: give --tasks and/or --heldout (a checkpoint of a run without either evaluates "
              "what the run did)", file=sys.stderr)
        return 2
    from eval_harness.task_registry import TaskDataError, UnknownTaskError, loaded_task_sizes

    try:  # before any model loads: the names, then the tasks' data
        if tasks:
            loaded_task_sizes(tasks, args.include_path)
    except (UnknownTaskError, TaskDataError) as e:
        print(f"cpt eval: error: --tasks: {e}", file=sys.stderr)
        return 1
    run = run_eval_settings(args.checkpoint)
    as_run = run is not None and tasks and args.limit is None and args.seed is None  # the run's documents
    scored = run_scored_documents(args.checkpoint, run["run"]) if as_run else {}
    apply_run_defaults(args, run, bool(tasks), bool(heldouts))
    for warning in _training_folders(heldouts, run, given=bool(args.heldout)):
        print(f"cpt eval: warning: {warning}", file=sys.stderr)
    samples = _samples(tasks, args.limit, args.seed, args.include_path, args.task_limits, scored) if tasks else None

    from cpt.data.readers import ReadError
    from cpt.data.shards import ShardError
    from cpt.model import ModelLoadError

    try:
        result = evaluate_checkpoint(ckpt, args, tasks, heldouts, samples, args.base, args.checkpoint)
        baseline = (evaluate_checkpoint(baseline_ckpt, args, tasks, heldouts, samples, None, args.baseline)
                    if baseline_ckpt is not None else None)
    except (ModelLoadError, ReadError, ShardError) as e:  # e.g. pickle weights only, an unreadable held-out file, a
        # held-out set made with another tokenizer or shorter than one sequence: one line
        print(f"cpt eval: error: {e}", file=sys.stderr)
        return 1
    _print_summary(result)
    if baseline is not None:
        result["baseline"] = baseline
        _print_comparison(result, baseline)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        from cpt.metrics import json_safe

        out.write_text(json.dumps(json_safe(result), indent=2, allow_nan=False))  # (a diverged model's NaN loss: null)
        print(f"wrote {out}")
    return 0
