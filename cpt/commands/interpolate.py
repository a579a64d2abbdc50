"""`cpt interpolate BASE CPT --heldout NAME=PATH:TAG ...`: upstream/downstream loss of (1-a)*base + a*cpt per alpha.

BASE and CPT are HF model directories (or hub ids for BASE); CPT may also be a peft adapter directory (merged in
memory). Each held-out set is a prepared shard directory tagged `upstream` (old distribution: forgetting) or
`downstream` (new distribution: adaptation); it is tokenized with the CPT model's tokenizer. Prints a table and
writes JSON; `--save-alpha A --out DIR` also saves the model at that alpha.

A run directory stands for its final export (RUN/export). When CPT lies in a cpt run directory (the run dir, RUN/export,
RUN/exports/step_N, RUN/checkpoints/step_N), the held-out sets are evaluated as that run evaluated them in the loop, so
that alpha = 1 reproduces its logged losses: --seq-len defaults to its data.seq_len, --max-tokens to its
eval.tokens_per_set (or the set's max_tokens), --sample-seed to its eval.sample_seed and --document-masking to its
data.document_masking; elsewhere 512, 262144, 0 and off. The first line printed says what was taken.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_alphas(text: str) -> list[float]:
    out = []
    for x in text.split(","):
        a = float(x)
        if not 0.0 <= a <= 1.0:
            raise argparse.ArgumentTypeError(f"alpha {a} is outside [0, 1]")
        out.append(a)
    if not out:
        raise argparse.ArgumentTypeError("no alphas")
    return out


def parse_heldout(text: str) -> tuple[str, str, str]:
    """``NAME=PATH:TAG`` as `cpt eval` reads it (a URL holding a credential refused)."""
    from cpt.commands.eval import parse_heldout as parse

    try:
        return parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    from cpt.commands.eval import add_heldout_sample_flags, at_least

    p = argparse.ArgumentParser(prog="cpt interpolate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="the base model (before CPT)")
    p.add_argument("cpt", help="the CPT model (HF directory or peft adapter)")
    p.add_argument("--alphas", type=parse_alphas, default=parse_alphas("0,0.25,0.5,0.75,1"),
                   help="comma-separated alphas in [0, 1] (0 = base, 1 = CPT)")
    p.add_argument("--heldout", type=parse_heldout, action="append", required=True,
                   metavar="NAME=PATH:TAG", help="a held-out set (repeat); TAG is upstream or downstream")
    add_heldout_sample_flags(p, seq_len_else="512")  # ("the run": the one CPT lies in)
    p.add_argument("--batch-size", type=at_least(1), default=8)
    p.add_argument("--json", default=None, help="where to write the table (default: OUT/interpolation.json or "
                                                "./interpolation.json)")
    p.add_argument("--save-alpha", type=float, default=None, help="also save the model at this alpha (needs --out)")
    p.add_argument("--out", default=None, help="output directory for --save-alpha")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.save_alpha is None) != (args.out is None):
        parser.error("--save-alpha and --out go together")
    import torch

    from cpt.averaging import format_sweep, interpolate, interpolation_sweep, load_model_dir
    from cpt.checkpoint import CheckpointError
    from cpt.data.loader import load_heldout
    from cpt.data.shards import ShardError
    from cpt.data.sources import HeldoutConfig
    from cpt.evaluate import heldout_loss

    from cpt.checkpoint_export import run_export
    from cpt.export import ExportFolderError, check_export_target, write_hf
    from cpt.model import ModelLoadError

    from cpt.commands.eval import json_target_problem

    try:
        if args.out is not None:  # before the sweep: the saved model replaces --out whole
            check_export_target(args.out, (run_export(args.base), run_export(args.cpt)), "one of the two models")
        if problem := json_target_problem(args.json, "--json"):  # (before the sweep: written at its end)
            raise ExportFolderError(problem)
    except ExportFolderError as e:
        print(f"cpt interpolate: error: {e}", file=sys.stderr)
        return 1
    from cpt.commands.eval import apply_run_defaults, run_eval_settings  # (its flags: add_heldout_sample_flags)

    from cpt.config import ConfigError

    try:
        settings = run_eval_settings(args.cpt)
    except ConfigError as e:  # the run's config.yaml is damaged: one line naming it
        print(f"cpt interpolate: error: {e}", file=sys.stderr)
        return 1
    apply_run_defaults(args, settings, lm_eval=False, heldout=True, prog="cpt interpolate")
    if args.seq_len is None:
        args.seq_len = 512
    try:
        base_model, _ = load_model_dir(run_export(args.base), dtype=torch.float32)
        cpt_model, tokenizer = load_model_dir(run_export(args.cpt), dtype=torch.float32)
    except (ModelLoadError, CheckpointError) as e:  # e.g. pickle weights only, no valid checkpoint: one line
        print(f"cpt interpolate: error: {e}", file=sys.stderr)
        return 1
    sets = {}
    try:
        for name, path, tag in args.heldout:
            hcfg = HeldoutConfig(name=name, path=path, tag=tag)
            sets[name] = (tag, load_heldout(hcfg, tokenizer, args.seq_len, args.set_max_tokens.get(name, args.max_tokens),
                                            seed=args.sample_seed))
    except ShardError as e:  # another tokenizer's set, a missing folder, fewer tokens than one sequence: one line
        print(f"cpt interpolate: error: {e}", file=sys.stderr)
        return 1
    eos_id = tokenizer.eos_token_id if args.document_masking else None

    def loss_fn(model, tokens):
        return heldout_loss(model, tokens, args.batch_size, eos_id=eos_id)

    rows = interpolation_sweep(base_model, cpt_model, args.alphas, sets, loss_fn)
    print(format_sweep(rows))
    if args.save_alpha is not None:  # first: the export replaces --out whole, and the table goes beside it
        write_hf(interpolate(base_model, cpt_model, args.save_alpha), tokenizer, args.out)
        print(f"saved the model at alpha={args.save_alpha} to {args.out}")
    json_path = Path(args.json) if args.json else (Path(args.out) if args.out else Path(".")) / "interpolation.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("seq_len", "max_tokens", "sample_seed", "document_masking")}
    from cpt.metrics import json_safe

    json_path.write_text(json.dumps(json_safe({"base": args.base, "cpt": args.cpt, "heldout_settings": settings,
                                               "rows": rows}), indent=2, allow_nan=False))
    print(f"wrote {json_path}")
    return 0
