"""Run `cpt ...` in a fork of the test process: a real, separate process (it can be SIGKILLed, it holds
its own PID and locks) without paying for Python and torch start-up again."""

import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path


def forked_cli(args: list[str], log: Path, env: dict | None = None, kill_when=None, timeout: float = 300) -> int:
    """Run `cpt <args>` in a child process, stdout and stderr to ``log``; its exit code (-9 when killed).
    ``kill_when``: the parent SIGKILLs the child once this predicate holds."""
    pid = start_forked(args, log, env)
    t0 = time.time()
    while kill_when is not None:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if kill_when():
            os.kill(pid, signal.SIGKILL)
            break
        if time.time() - t0 > timeout:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError("timed out")
        time.sleep(0.01)
    return wait_forked(pid)


def start_forked(args: list[str], log: Path, env: dict | None = None) -> int:
    """Start `cpt <args>` in a child process; its PID (see ``wait_forked``)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            os.environ.update(env or {})
            sys.stdout = sys.stderr = open(log, "w", buffering=1)
            logging.root.handlers = [logging.StreamHandler(sys.stderr)]
            from cpt.cli import main

            code = main(args)
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(code)
    return pid


def wait_forked(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
