"""The `cpt` command line: `cpt <command> [args]`. Each command lives in `cpt/commands/<name>.py`.

Commands are imported only when run, so `cpt --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from cpt import is_cpt_program
from cpt.stop_signals import (StopOutsideRuns, StopSignal, StopWhileStarting, experiment_stopped,
                              ignore_signals_after_the_run, preempted_code_in, stopped_while_starting)

COMMANDS: dict[str, str] = {
    "demo": "Run the offline demo: pre-train a tiny base model on corpus A, then continually pre-train on B with replay.",
    "prepare": "Tokenize raw text (jsonl/parquet/txt/datasets) into token shards with a manifest.",
    "verify": "Re-check prepared token shards against their manifest, or checkpoints against their checksums.",
    "train": "Train from a YAML run config (continual pre-training, LoRA, anneal branches, resume).",
    "schedule": "Print and plot the learning-rate plan of a config before training.",
    "eval": "Held-out loss and lm-eval tasks on a saved checkpoint or adapter.",
    "report": "Plots and an HTML page from one or more run directories.",
    "export": "Turn a resume checkpoint (any backend, any number of processes) into an HF model or adapter.",
    "merge": "Merge a LoRA adapter into its base model and save a plain HF model.",
    "average": "Uniformly average several checkpoints.",
    "interpolate": "Interpolate base and CPT weights and report upstream/downstream loss per alpha.",
    "experiment": "Run the replay x schedule grid against a re-training baseline.",
}


def command_parser(name: str) -> argparse.ArgumentParser:
    """The argument parser of `cpt NAME` (each command module's ``build_parser()``), without running the command:
    what tests/test_readme.py checks the README's command lines against."""
    if name not in COMMANDS:
        raise KeyError(f"cpt has no command {name!r} (commands: {', '.join(COMMANDS)})")
    return importlib.import_module(f"cpt.commands.{name}").build_parser()


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: cpt <command> [options]   (cpt <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


# the launcher, as this process saw it when it started (`python -m cpt.cli` imports this first); a rank whose parent
# is pid 1 is not an orphan in a container, where the launcher is often the first process (it stopped at once)
PARENT_AT_START = os.getppid()
STOP_REQUESTED = "CPT_STOP_REQUESTED"  # a file scripts/slurm_node.sh creates before it relays SIGUSR1 to the ranks


class EarlyWarning:
    """The SIGUSR1 handler of `cpt train`/`cpt experiment` until the training loop installs its own: it records the
    signal (``received``), and the loop's handler (cpt.distributed.PreemptionFlag), finding it as the handler it
    replaces, takes it as its own: the run trains one step, saves a checkpoint and stops as preempted. A SLURM
    time-limit warning (or a preemption with PreemptParameters=send_user_signal) that came while the ranks were still
    starting (loading the model, the step-0 evaluation) used to end them by SIGUSR1's default action: no checkpoint, a
    failed stop, the job not requeued.

    A warning that came even earlier, before this handler replaced the ignored SIGUSR1 the rank inherits from
    scripts/slurm_node.sh (the first fraction of a second of the process), was lost: the node script now also
    creates the file ``$CPT_STOP_REQUESTED`` names before it signals the ranks, and its existence counts as a
    received signal here."""

    def __init__(self) -> None:
        self.got, self.taken = False, False

    def __call__(self, signum, frame) -> None:  # noqa: ARG002
        self.got, self.taken = True, False

    @property
    def received(self) -> bool:
        if self.got:
            return True
        path = os.environ.get(STOP_REQUESTED)
        return not self.taken and bool(path) and os.path.exists(path)

    @received.setter
    def received(self, value: bool) -> None:  # (False: taken by the training loop, the file too)
        self.got, self.taken = bool(value), not value



def hold_stop_signals(command: str) -> None:
    """SIGUSR1 and SIGTERM for this process. SIGUSR1: held by :class:`EarlyWarning` for the training commands (in the
    `cpt` program); for the others back to its default action when a launcher started us with it ignored
    (scripts/slurm_node.sh shields torchrun's agent that way, and the ranks inherit it): a warning must never be
    lost. SIGTERM during `cpt train`'s
    start raises :class:`StopSignal` (the start is abandoned: nothing trained in it, nothing to save), and so does one
    outside `cpt experiment`'s training loops; its default action ended the rank silently, exit 143, and a preempted
    stop under ``--preempted-exit-code`` counted as a failure."""
    if command in ("train", "experiment") and is_cpt_program() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, StopWhileStarting() if command == "train" else StopOutsideRuns())
    if not hasattr(signal, "SIGUSR1"):
        return
    if command in ("train", "experiment") and is_cpt_program():
        signal.signal(signal.SIGUSR1, EarlyWarning())
    elif signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def stop_with_the_launcher() -> None:
    """A rank started by torchrun (`accelerate launch`) gets SIGTERM when its launcher dies (Linux: PR_SET_PDEATHSIG),
    which cpt's training loop answers like a preemption: checkpoint at the end of the step, exit. torchrun starts its
    ranks in sessions of their own, so a launcher killed with SIGKILL (`kill -9`, `timeout -s KILL`, a killed process
    group) otherwise left them training on, detached, holding the run lock."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    from cpt.stop_signals import signal_at_parent_exit

    if os.getppid() != PARENT_AT_START:  # the launcher died already (re-parented): stop now, nothing to save
        print("cpt: the launcher of this rank has already exited; stopping", file=sys.stderr)
    signal_at_parent_exit(signal.SIGTERM, PARENT_AT_START)


def no_library_bars_in_log_files() -> None:
    """A command whose stderr is not a terminal (a batch job's log file, ``| tee``) gets no progress bars from the
    libraries (transformers' "Writing model shards" on every export, hub downloads, datasets' map): in a file a tqdm
    bar is carriage-return redraws, not lines. Read by those libraries at import, which the commands do after this;
    a value the user set wins. ``TQDM_DISABLE`` turns off every tqdm bar drawn with tqdm's defaults (lm-eval's,
    once per evaluation); cpt's own training bar (:mod:`cpt.console`, on a terminal only) asks for itself."""
    if getattr(sys.stderr, "isatty", lambda: False)():
        return
    for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        os.environ.setdefault(var, "1")


def own_wandb_service() -> None:
    """A command gets its own W&B service, not one named by an inherited ``WANDB_SERVICE``. wandb sets that variable
    in a process that started a run (a notebook, a driver script, a pytest worker) so that its child processes share
    its service; a ``cpt`` command started from there (or a batch job submitted from there: ``sbatch`` exports the
    environment) then attached to that service: on another node, or once that process had exited, W&B could not
    start ("Failed to connect to service"), and a start killed with kill -9 left its run id held by the parent's
    service, so that the ``--resume`` failed ("run ID is in use") until the parent exited. A command is a process of
    its own: its W&B run belongs to a service it starts (the ranks of one launch each start theirs, as before)."""
    os.environ.pop("WANDB_SERVICE", None)


def line_buffered_stdout() -> None:
    """stdout line-buffered when it is not a terminal (a batch job's log file, ``| tee``): Python buffers a redirected
    stdout in 8 KiB blocks, so without ``PYTHONUNBUFFERED`` a `tail -f` of the log saw `cpt verify`'s, `cpt eval`'s
    or `cpt prepare`'s lines only at exit, and in a log holding both streams (``> log 2>&1``, SLURM's default) after
    the error lines of stderr that came later (`cpt verify`'s summary stood above the FAILED lines it counts)."""
    if not getattr(sys.stdout, "isatty", lambda: True)() and hasattr(sys.stdout, "reconfigure"):
        try:
            sys.stdout.reconfigure(line_buffering=True)
        except (ValueError, OSError):  # (a stream that cannot be reconfigured: leave it)
            pass


def no_repeated_warnings() -> None:
    """The data loader's "data source ... is now in epoch N" is logged (the job's log and train.log, once); its Python
    warning, there for library callers, put the same text in the log a second time, with a file path and a source line."""
    import warnings

    warnings.filterwarnings("ignore", message="data source .* is now in epoch ")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 2 and argv[0] == "help":  # `cpt help train`: as `cpt train --help` (an unknown one: its error)
        argv = [argv[1], "--help"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from cpt import __version__

        print(f"cpt {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    line_buffered_stdout()
    no_repeated_warnings()
    stop_with_the_launcher()  # (first: its SIGTERM to a rank whose launcher is gone is the default action's)
    hold_stop_signals(name)
    no_library_bars_in_log_files()
    own_wandb_service()
    if name not in COMMANDS:
        print(f"cpt: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"cpt.commands.{name}")
        code = int(module.main(rest) or 0)
        if name == "train" and code == 0:  # (after an error the launcher's SIGTERM must still end a rank stuck in teardown)
            ignore_signals_after_the_run()  # (cpt's own: no torch import after a start stopped inside torch's)
        return code
    except StopSignal as e:  # SIGTERM while `cpt train` was imported (its main takes the later ones), or in `cpt experiment`
        if name == "experiment":
            return experiment_stopped(str(e), preempted_code_in(rest))
        return stopped_while_starting(str(e), preempted_code_in(rest), rest, None)
    except BrokenPipeError:  # `cpt schedule CONFIG | head`: the reader is gone, which is no error (was a traceback)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the exit's flush would raise again)
        return 128 + signal.SIGPIPE  # what a process killed by SIGPIPE reports, as `cat`'s would
    except KeyboardInterrupt:  # Ctrl-C (SIGINT): one line, not a traceback from wherever it landed; the outputs are
        # written atomically (staging folders, tmp + rename), so what was there before stays whole
        hint = ("; continue from its last checkpoint with --resume (SIGTERM or SIGUSR1 saves one before stopping)"
                if name == "train" else "")
        print(f"cpt {name}: interrupted{hint}", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
