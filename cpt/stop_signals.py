"""Stop signals around a `cpt train` run: SIGTERM while the run starts (:class:`StopWhileStarting` raises
:class:`StopSignal`; :func:`stopped_while_starting` ends the command like a preempted stop), the file that tells the
launch scripts how the ranks stopped (``$CPT_PREEMPTED_MARKER``: :func:`preempted_exit`), and the signals after the run
(:func:`ignore_signals_after_the_run`). The training loop's own handler is cpt.distributed.PreemptionFlag.

Standard library only at import: `cpt` installs the start-up handler before it imports the command, and the stop may
interrupt any later import (a module left half-initialized must not be needed to say that the run stopped)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from cpt import is_cpt_program

PREEMPTED_MARKER = "CPT_PREEMPTED_MARKER"  # set by scripts/launch*.sh with --preempted-exit-code, and the SLURM script


def signal_at_parent_exit(sig: int, parent: int) -> bool:
    """Have the kernel send ``sig`` to this process when its parent exits (Linux ``PR_SET_PDEATHSIG``; False
    elsewhere). ``parent``: the parent's pid as this process saw it at its start; if the parent is already gone (this
    process re-parented since) the signal is sent now. (Not "re-parented to pid 1": in a container the launcher is
    often pid 1 itself.)"""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return True


def ignore_signals_after_the_run() -> None:
    """Once a run has ended in the `cpt train` process (finished, or stopped with its checkpoint written), a preemption
    signal has nothing left to save: ignore SIGTERM and SIGUSR1 for the rest of the process. The teardown after the
    loop (the accelerator's end, W&B's finish, the interpreter's exit) takes seconds (3 s measured on 2 CPU cores), and
    a scheduler's signal landing there ended a finished or preempted run with 143/138 (under torchrun: exit 1 and a
    traceback, and srun then failed the job): a SLURM warning relayed late to one node's rank, after the other nodes'
    ranks had already made every rank stop, killed it there (seen in CI). Only when this process is the `cpt` program
    (`cpt ...`, `python -m cpt.cli ...`), not when a caller runs training inside its own process."""
    if not is_cpt_program():
        return
    for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


class StopSignal(BaseException):
    """SIGTERM while `cpt train` is starting (before its training loop's own handler): raised where the main thread
    is, like KeyboardInterrupt (a BaseException: no ``except Exception`` of the start-up takes it), so that the start
    unwinds (the run lock, the process group, the staging folders) and `cpt train` ends as stopped while starting.
    (Defined here, not in cpt/cli.py, which is ``__main__`` under ``python -m cpt.cli``: a class of its own there.)"""


class StopWhileStarting:
    """The SIGTERM handler of `cpt train` until its training loop installs its own (cpt.distributed.PreemptionFlag),
    which retires it (``start_only``): after the loop a SIGTERM is what it was before (the default action, or
    ignored once the run has ended)."""

    start_only = True

    def __call__(self, signum, frame) -> None:  # noqa: ARG002
        raise StopSignal(signal.Signals(signum).name)


class StopOutsideRuns(StopWhileStarting):
    """`cpt experiment`'s SIGTERM handler outside its runs' training loops (data preparation, each run's start, between
    runs): each loop's PreemptionFlag puts it back after the run (a SIGTERM there ended the grid silently, exit 143)."""

    start_only = False


def preempted_exit(code: int | None, what: str = "preempted") -> int:
    """The exit status of a run stopped on a preemption signal, its checkpoint saved. Where ``$CPT_PREEMPTED_MARKER``
    names a file (the shipped launch scripts with ``--preempted-exit-code``, and scripts/slurm_node.sh on the first
    node) each node's first rank writes it and the ranks exit 0: the script decides from the file (a rank's non-zero
    exit would make torchrun, or accelerate's 1-process launch, print a traceback and exit 1); the SLURM script
    requeues only a job whose ranks wrote it, not one whose run finished before the time-limit warning reached it.
    Otherwise this process exits ``code`` (``--preempted-exit-code N``), or 0 without it. ``what``: the file's line,
    ``preempted`` (a checkpoint saved), ``start-up`` (stopped while starting: nothing to save) or ``finished`` (the
    run ended; a launcher signalled meanwhile exits 1 all the same, which the script turns into 0). (SIGTERM and SIGUSR1 are
    already ignored here, since the training loop's end (cpt.distributed.PreemptionFlag): a second signal in the
    interpreter's teardown has nothing left to save, and would turn N into 143.)"""
    marker = os.environ.get(PREEMPTED_MARKER)
    if marker:
        if os.environ.get("LOCAL_RANK", "0") != "0":
            return 0
        try:
            Path(marker).write_text(f"{what}\n")
            return 0
        except OSError as e:  # (the checkpoint is saved: say so, never turn the stop into a traceback)
            if what == "finished":
                return 0
            _line(f"cpt train: warning: could not write ${PREEMPTED_MARKER} ({e}): the launch script cannot tell "
                  "this preempted stop from a finished run", file=sys.stderr)
    return code or 0


def stopped_while_starting(signame: str, preempted_exit_code: int | None, argv: list[str], run: str | None) -> int:
    """A start abandoned on SIGTERM (a preemption, a drained node, a scheduler's cancel while the model loads): nothing
    was trained in it, so nothing is saved, and it ends like a preempted stop (``--preempted-exit-code``, the marker
    ``start-up`` for the launch scripts); one line, not a traceback or a silent exit 143. A rank the launcher is
    ending because another rank failed (that one reported why) stays quiet and exits 1."""
    ignore_signals_after_the_run()  # (a second SIGTERM, the launcher's, must not interrupt this)
    from cpt import rank_failure

    if run is not None and rank_failure.reported(run, 0) is not None:
        return 1
    if os.environ.get("RANK", "0") == "0":
        _line(f"cpt train: stopped by {signame} while starting, before its first step: nothing to save (the run's "
              "newest checkpoint, if any, is where --resume continues)", file=sys.stderr)
        try:
            from cpt.console import resume_command

            launcher = " (with the same launcher: add --resume to its `cpt train` arguments)" if "LOCAL_RANK" in os.environ else ""
            _line(f"to resume: {resume_command(argv)}{launcher}")
        except Exception:  # noqa: BLE001 - an import the signal cut short: the line above says it all
            pass
    return preempted_exit(preempted_exit_code, "start-up")


def experiment_stopped(signame: str, preempted_exit_code: int | None) -> int:
    """`cpt experiment` stopped by SIGTERM outside a run's training loop (preparing its data, starting a run, between
    runs; :class:`StopOutsideRuns`): nothing of the run in progress to save (finished runs and prepared data are kept:
    their writes are atomic). One line, exit as a preempted stop."""
    ignore_signals_after_the_run()
    _line(f"cpt experiment: stopped by {signame} outside a run's training (preparing data, starting a run or between "
          "runs): nothing to save; run the same command again to continue", file=sys.stderr)
    return preempted_exit_code or 0


def exit_code(text: str) -> int | None:
    """``text`` as the status of ``--preempted-exit-code`` (1..255), or None."""
    try:
        code = int(text)
    except ValueError:
        return None
    return code if 1 <= code <= 255 else None


def preempted_code_in(argv: list[str]) -> int | None:
    """``--preempted-exit-code N`` of `cpt train`'s arguments, read without its parser (a stop while `cpt` imported
    it); None when absent or not 1..255 (the parser refuses that, when there is one)."""
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--preempted-exit-code" and i + 1 < len(argv) else (
            arg.split("=", 1)[1] if arg.startswith("--preempted-exit-code=") else None)
        if value is not None:
            return exit_code(value)
    return None


def _line(text: str, file=None) -> None:
    """One line, flushed (cpt.console.print_line without importing it)."""
    stream = sys.stdout if file is None else file
    stream.write(text + "\n")
    stream.flush()
