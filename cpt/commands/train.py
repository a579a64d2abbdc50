"""`cpt train CONFIG [--set key=value ...] [--resume] [--from CKPT [--anneal N]] [--dry-run] [--preempted-exit-code N]`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path

from cpt.config import ConfigError, load_config
from cpt.console import LOG_FORMAT, print_line
from cpt.stop_signals import StopSignal, exit_code, preempted_exit, stopped_while_starting


def build_parser() -> argparse.ArgumentParser:
    # no abbreviations: `--se KEY=VALUE` would escape the redaction of secret --set values in the printed resume command
    p = argparse.ArgumentParser(prog="cpt train", description="Train from a YAML run config.", allow_abbrev=False)
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (the value is YAML; list items by index or name), e.g. --set "
                        "train.global_batch_size=32 --set stages.0.steps=500 --set data.sources.web.path=/scratch/web")
    p.add_argument("--resume", action="store_true", help="continue from the latest valid checkpoint in run.output_dir")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: continue even though the config changes the training trajectory "
                        "(model, data, stages, optimizer, batch size, precision, seed)")
    p.add_argument("--from", dest="init_from", metavar="CKPT",
                   help="start from this checkpoint, run directory or HF model (sets train.init_from)")
    p.add_argument("--anneal", type=int, metavar="STEPS",
                   help="with --from: branch an anneal of STEPS steps off the checkpoint into a new run directory")
    p.add_argument("--anneal-shape", choices=["linear", "cosine", "exponential", "1-sqrt"])
    p.add_argument("--output-dir", help="sets run.output_dir")
    p.add_argument("--force-lock", action="store_true",
                   help="take over run.output_dir's run.lock even if its holder may be alive (shared filesystems; sets run.force_lock)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the model, tokenizer and data, print tokens, epochs per source, LR and FLOPs; train nothing")
    p.add_argument("--tokens-per-s", type=float, metavar="N", help="with --dry-run: estimate the training time at N tokens/s")
    p.add_argument("--preempted-exit-code", type=exit_code_arg, metavar="N",
                   help="exit N (1..255; 75, EX_TEMPFAIL, suggested) when SIGTERM/SIGUSR1 stopped the run with its "
                        "checkpoint saved, not 0, so a scheduler that restarts failed jobs (a k8s Job) resumes it; "
                        "under scripts/launch*.sh the launch exits N")
    return p


def exit_code_arg(text: str) -> int:
    """``--preempted-exit-code``'s argument type (`cpt train`, `cpt experiment`)."""
    code = exit_code(text)
    if code is None:
        raise argparse.ArgumentTypeError(f"an exit code is 1..255, not {text!r}")
    return code


def run_errors() -> tuple[type[BaseException], ...]:
    """The user-facing problems a training run can stop with: one line, no traceback (`cpt train`, `cpt experiment`).
    ConfigError: a model setting that does not fit the loaded model."""
    from cpt.checkpoint import CheckpointError
    from cpt.data.hfstream import HFSourceError
    from cpt.data.shards import ShardError
    from cpt.distributed import LaunchError
    from cpt.metrics import MetricsError
    from cpt.model import ModelLoadError
    from cpt.train import TrainingError

    return (TrainingError, LaunchError, ShardError, HFSourceError, CheckpointError, ModelLoadError, MetricsError,
            ConfigError)


def _failed_write(error: BaseException, run: str) -> bool:
    """Whether ``error`` is a write that failed: an OSError of a full disk, quota or read-only file system, or one on a
    file in the run directory. Not any OSError: a network error (requests' ConnectionError is one), a data or model
    file that cannot be read are not writes, and a checkpoint does not help with them (their traceback follows)."""
    import errno

    if not isinstance(error, OSError):
        return False
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
        return True
    if not error.filename:
        return False
    try:
        return Path(os.fsdecode(error.filename)).resolve().is_relative_to(Path(run).resolve())
    except (TypeError, ValueError, OSError):
        return False


def _literal(path: str) -> str:
    """A path flag (``--output-dir``, ``--from``) as a ``--set`` value: quoted, so YAML takes it as written (unquoted,
    ``runs/a #2`` lost its `` #2`` as a comment and ``null`` or ``runs/x: y`` were no text); ``${VAR}`` still expands."""
    return json.dumps(path)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    started: dict[str, str] = {}  # the run directory, once the config is loaded
    try:
        return _main(args, argv, started)
    except StopSignal as e:  # SIGTERM before the training loop's handler (cpt.stop_signals.StopWhileStarting)
        return stopped_while_starting(str(e), args.preempted_exit_code, argv, started.get("run"))


def _main(args, argv: list[str], started: dict[str, str]) -> int:
    overrides = list(args.overrides)
    if args.init_from is not None:  # (an empty value: the field's one-line error, not the config's path)
        overrides.append(f"train.init_from={_literal(args.init_from)}")
    if args.anneal is not None:  # (--anneal 0 was dropped: a plain run from --from instead of the branch asked for)
        overrides.append(f"train.anneal_steps={args.anneal}")
    if args.anneal_shape:
        overrides.append(f"train.anneal_shape={args.anneal_shape}")
    if args.output_dir is not None:  # (`--output-dir "$RUN_DIR"` with RUN_DIR empty used the config's, saying nothing)
        overrides.append(f"run.output_dir={_literal(args.output_dir)}")
    if args.force_lock:
        overrides.append("run.force_lock=true")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:  # the ranks of a node read the same file alike: one line per node, not one per rank
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print_line(f"cpt train: {e}", file=sys.stderr)
        return 2
    started["run"] = str(cfg.run.output_dir)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    for noisy in ("accelerate", "deepspeed", "torch.distributed", "lm_eval"):  # per-file save/load, per-evaluation chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from cpt.console import OncePerMessage

    for handler in logging.getLogger().handlers:
        handler.addFilter(OncePerMessage("lm_eval"))  # its warnings once, not at every evaluation
    from cpt.train import train

    if args.dry_run:
        from cpt.dryrun import check_run_dir, describe_run, format_run_plan

        try:
            built = describe_run(cfg)
            print(format_run_plan(built, args.tokens_per_s))
            # (after the plan, which is worth seeing for a finished run too)
            check_run_dir(cfg, resume=args.resume or cfg.checkpoint.resume, allow_config_change=args.allow_config_change,
                          built=built)
        except (ValueError, *run_errors()) as e:  # (run_errors: shards, model loading, checkpoints...)
            print_line(f"cpt train: error: {e}", file=sys.stderr)
            return 1
        return 0
    from cpt.runlog import RunLog

    # flushed line by line: a batch job's log (stdout redirected to a file) shows progress as it happens; the same
    # lines and the loggers' messages also go to <output_dir>/train.log (cpt/runlog.py)
    with RunLog(cfg.run.output_dir, print_line) as runlog:  # (each line in one write: ranks share the log)
        runlog.handler.addFilter(OncePerMessage("lm_eval"))
        return _train(cfg, args, argv, runlog, train)


def _train(cfg, args, argv: list[str], runlog, train) -> int:
    from cpt import rank_failure

    run = str(cfg.run.output_dir)

    def error(line: str) -> int:
        first = rank_failure.report(run, line)  # (the ranks whose collectives break when this one exits stay quiet)
        shown = line
        if (label := rank_failure.rank_label()) and not re.search(rf"\brank {os.environ.get('RANK')}\b", line):
            shown = f"{line} [{label}]"  # (which rank, in a multi-process run's shared log)
        if first != line:  # (every rank failing alike, e.g. a setting this launch cannot train: printed once)
            print_line(f"cpt train: error: {shown}", file=sys.stderr)
        runlog.write(f"cpt train: error: {shown}")
        return 1

    try:
        result = train(cfg, resume=args.resume or None, echo=runlog.say, allow_config_change=args.allow_config_change,
                       last_run=True)
    except Exception as e:
        if rank_failure.lost_peer(e):  # another rank is gone: it printed why and told this one, or it was killed
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # (the launcher is stopping the ranks: say it first)
            rank_failure.stacks_if_still_running(rank_failure.lost_peer_dump_s(cfg.train.stop_stack_dump_s),
                                                 "losing another rank")  # (were it to hang on its way out)
            cause = rank_failure.reported(run)
            if cause is None and rank_failure.report(run, lost := rank_failure.lost_peer_line(e)) is None:  # one rank says so
                print_line(f"cpt train: error: {rank_failure.rank_label()}: {lost}", file=sys.stderr)
            runlog.write(f"cpt train: error: {cause or rank_failure.reported(run, 0)}")  # (train.log: main process)
            rank_failure.leave(1)  # (not through the broken group's teardown, which blocks for seconds)
            return 1
        # user-facing problems: no traceback (ConfigError: a model setting that does not fit the loaded model)
        if isinstance(e, run_errors()):
            return error(str(e))
        if _failed_write(e, run):  # disk full, quota, permissions, I/O (e.g. the final export): in plain words
            from cpt.fileio import describe_io_error

            return error(f"a write failed: {describe_io_error(e, run)}; the newest checkpoint is intact and --resume "
                         "continues from it (a missing final export is written again)")
        from cpt.distributed import collective_timeout  # a collective that gave up on a hung rank: name the setting

        if isinstance(e, RuntimeError) and (line := collective_timeout(e, cfg)) is not None:
            return error(line)
        rank_failure.report(run, f"{type(e).__name__}: {e}")  # an unexpected error: its traceback follows
        raise
    code = 0  # also after a preemption (without --preempted-exit-code): the checkpoint is saved and `--resume` continues
    if result.stopped_early == "preempted":
        code = preempted_exit(args.preempted_exit_code)
    else:  # finished: a launcher signalled during the final export exits 1 though its ranks finished (the script says 0)
        preempted_exit(None, "finished")
    if result.stopped_early == "preempted" and os.environ.get("RANK", "0") == "0":
        from cpt.console import resume_command

        launcher = " (with the same launcher: add --resume to its `cpt train` arguments)" if "LOCAL_RANK" in os.environ else ""
        runlog.say(f"to resume: {resume_command(argv)}{launcher}", flush=True)
    return code
