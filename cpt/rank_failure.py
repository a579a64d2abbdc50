"""When one rank of a multi-process run fails, what the other ranks do and print.

A rank that stops with an error prints its one line (``cpt train: error: ...``) and exits; the other ranks learn it
only when a collective breaks (gloo: "Connection closed by peer" / "Connection reset by peer"; NCCL: an aborted
communicator), and each used to print a page of traceback naming no cause, or a misleading line of its own (a
failed checkpoint "connection closed"), before the launcher's summary. Now:

* the failing rank writes its line to the launcher's rendezvous store (torchrun's TCPStore: it lives in the launcher,
  so it outlives the ranks) before it exits (:func:`report`; the first rank to report is the one kept);
* a rank whose collective breaks because another rank is gone (:func:`lost_peer`) waits a moment for that line
  (:func:`reported`) and exits quietly with status 1: the cause is printed once, by the rank that had it. With nothing
  reported (the other rank was killed: ``kill -9``, the kernel's OOM killer, a segfault, a lost node) one line says
  so (:func:`lost_peer_line`), printed by the first rank to report it (not once per surviving rank); the launcher's
  summary after it names the dead rank and its exit signal;
* every rank failing alike (a setting this launch cannot train) prints its line once, not once per rank.

The store is the default process group's, remembered when the run's Accelerator is built (:func:`remember_store`):
by the time an error reaches the command, the run's process group has been destroyed.

A rank that should be on its way out (a stop signal came, or another rank is gone) but hangs instead leaves nothing
in the job's log before the scheduler's SIGKILL; :func:`stacks_if_still_running` has it write where each of its
threads is (``train.stop_stack_dump_s``), armed by the signal even while the main thread is blocked in C++
(:class:`SignalWatch`).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import threading
import time
from datetime import timedelta

_STORE: list = []  # [the default process group's store], from remember_store()
REPORT_WAIT_S = 2.0  # how long a rank that lost another waits for that rank's report (it may be on its way out)
LOST_PEER_DUMP_S = 20.0  # the most a rank that lost another runs on before its stacks are dumped (lost_peer_dump_s)

# a collective that broke because another process of the run is gone (its sockets closed, its communicator aborted)
_LOST_PEER = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|NCCL communicator was aborted|"
                        r"remote process exited|ProcessGroup\w* is (?:aborted|shut ?down)", re.IGNORECASE)


def remember_store() -> None:
    """Keep the default process group's store (call once the group exists; nothing with one process)."""
    import torch.distributed as dist

    _STORE.clear()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.distributed_c10d import _get_default_store

        try:
            _STORE.append(_get_default_store())
        except (RuntimeError, ValueError):  # (no store: nothing is told, the ranks fail as before)
            pass


def _key(run: str) -> str:
    # per run directory and per start of the launcher's workers (torchrun --max_restarts keeps its store)
    return f"cpt/failure/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{run}"


def rank_label() -> str:
    """``rank 1 of 2 (host)`` for a multi-process run; empty with one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return ""
    return f"rank {os.environ.get('RANK', '?')} of {world} ({socket.gethostname()})"


def report(run: str, line: str) -> str | None:
    """Tell the other ranks of run ``run`` why this rank stops (``line``). Returns None when this is the report the
    others see (the first), else the line that was reported first. Never raises: a store that cannot be reached (the
    launcher gone) tells nobody."""
    if not _STORE:
        return None
    store, mine = _STORE[0], f"{rank_label()}\t{line}"
    try:
        store.set_timeout(timedelta(seconds=5))
        first = store.compare_set(_key(run), "", mine).decode(errors="replace")
    except Exception:  # noqa: BLE001 - a failure report must not hide the failure
        return None
    return None if first == mine else first.partition("\t")[2]


def reported(run: str, wait_s: float | None = None) -> str | None:
    """The line another rank reported for run ``run`` (waiting up to ``wait_s``, default :data:`REPORT_WAIT_S`, for it),
    or None."""
    if not _STORE:
        return None
    store, key = _STORE[0], _key(run)
    until = time.monotonic() + (REPORT_WAIT_S if wait_s is None else wait_s)
    try:
        store.set_timeout(timedelta(seconds=5))
        while True:
            if store.check([key]):
                label, _, line = store.get(key).decode(errors="replace").partition("\t")
                return f"{label}: {line}"
            if time.monotonic() >= until:
                return None
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - the launcher (and its store) gone: nothing to learn
        return None


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` (or an error it wraps) is a collective that broke because another process of the run is gone
    (never with one process: a broken pipe there is its own output's)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if _LOST_PEER.search(str(error)) and not isinstance(error, BrokenPipeError):  # (that is Python's own I/O: a
            return True  # closed stdout, `cpt train ... | head`; a collective's broken pipe is the backend's error)
        error = error.__cause__ or error.__context__
    return False


def lost_peer_line(error: BaseException) -> str:
    """The one line of a rank whose collective broke when another rank died without reporting why."""
    match = _LOST_PEER.search(str(error))
    seen = match.group(0) if match else type(error).__name__
    return (f"another rank of this run died during a collective operation ({seen}): it was killed "
            "(kill -9, the kernel's out-of-memory killer, a lost node) or crashed without a Python error; the "
            "launcher's summary names it and its exit signal. --resume continues from the newest checkpoint")


def leave(code: int = 1) -> None:
    """End a rank whose process group broke, once its line is out: at once (``os._exit``), without the interpreter's
    teardown, in which destroying the broken group blocks in C++ (gloo's, with a dead peer: 6 s measured on 2 CPU
    processes, while the launcher waits for the rank). The run's own cleanup (checkpoint writers, the run lock,
    metrics, trackers) has run by then, on the way out of the training loop."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


_DUMP: list = []  # [the timer of its line]: the stack dump stacks_if_still_running() armed; empty when none


def stacks_if_still_running(after_s: float | None, why: str) -> None:
    """Have this process write the stacks of all its threads to stderr (the job's log) if it is still running
    ``after_s`` seconds from now: a rank that got a stop signal or lost another rank should end within seconds, and
    one that hangs instead (in a collective, a thread join, a C++ destructor) is otherwise SIGKILLed by the scheduler
    without a word. Python's faulthandler does the dump from its own C thread, so it works while Python is blocked in
    C++ with the GIL held; a line naming the cause (``why``, e.g. "SIGTERM") comes just before it when Python can
    still run. The first call arms it (later ones keep that deadline); None: off. :func:`cancel_stacks` disarms it."""
    if after_s is None or _DUMP:
        return
    import faulthandler

    for stream in (sys.stderr, sys.__stderr__):  # (a caller's stderr without a file descriptor: the process's own)
        try:
            stream.fileno()
        except (AttributeError, OSError, ValueError):
            continue
        faulthandler.dump_traceback_later(after_s, repeat=False, file=stream, exit=False)
        timer = threading.Timer(max(0.0, after_s - 0.2), _say_why, args=(stream, why, after_s))
        timer.daemon = True
        timer.start()
        _DUMP[:] = [timer]
        return


def lost_peer_dump_s(stop_stack_dump_s: float | None) -> float | None:
    """The stack-dump delay of a rank that lost another: it has nothing to save and should end within seconds (the
    report wait, :data:`REPORT_WAIT_S`), so at most 20 s, within the 30 s that SLURM's KillWait and torchrun give
    a rank after their SIGTERM by default."""
    return None if stop_stack_dump_s is None else min(stop_stack_dump_s, LOST_PEER_DUMP_S)


def _say_why(stream, why: str, after_s: float) -> None:
    who = rank_label() or f"process {os.getpid()}"
    try:
        stream.write(f"cpt: {who} still running {after_s:g} s after {why} (a hang? train.stop_stack_dump_s): the "
                     "stacks of its threads follow (faulthandler's 'Timeout' block)\n")
        stream.flush()
    except (OSError, ValueError):
        pass


def cancel_stacks() -> None:
    """Disarm :func:`stacks_if_still_running` (the process goes on: another run of `cpt experiment`, a caller's code)."""
    if _DUMP:
        import faulthandler

        faulthandler.cancel_dump_traceback_later()
        _DUMP.pop().cancel()


class SignalWatch:
    """Arms :func:`stacks_if_still_running` when one of ``signals`` reaches this process, also while its main thread
    is blocked in C++ and never returns to Python, which runs a signal handler only between the main thread's
    bytecodes: a collective that waits for a dead or stopped rank (a DDP backward whose gloo all-reduce never
    completes, seen in the 2-node rank-kill test; an NCCL wait) is exactly the hang the dump is for. Python's C-level
    handler writes the signal's number to the wakeup fd (``signal.set_wakeup_fd``), which this watch's thread waits
    on; the GIL is free while the main thread waits in C++.

    Only for a main thread that no one else watches this way (the wakeup fd is one per process: an asyncio loop in
    the main thread has it); ``close()`` (from the main thread) gives it back. A forked child (a data worker) does
    not keep it: its signals would arm this process's dump."""

    def __init__(self, after_s: float, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.after_s, self.signals = after_s, {int(s) for s in signals}
        self.read, self.write = os.pipe()  # (the thread blocks on reading; the handler's end must not block)
        os.set_blocking(self.write, False)
        try:
            previous = signal.set_wakeup_fd(self.write, warn_on_full_buffer=False)
        except ValueError:  # not the main thread
            previous = None
        if previous != -1:  # (another owner, or none allowed here: not taken)
            if previous is not None:
                signal.set_wakeup_fd(previous)
            self._close_pipe()
            self.thread = None
            return
        self.thread = threading.Thread(target=self._watch, name="cpt-signal-watch", daemon=True)
        self.thread.start()
        if not _FORK_HOOK:
            os.register_at_fork(after_in_child=_no_watch_in_child)
            _FORK_HOOK.append(True)

    def _watch(self) -> None:  # (the thread)
        while True:  # (no select(): a long-running process's descriptors pass FD_SETSIZE, 1024)
            try:
                data = os.read(self.read, 64)
            except OSError:
                return
            if not data:  # (the write end closed)
                return
            for number in data:
                if number == 0:  # close(): done
                    return
                if number in self.signals:
                    stacks_if_still_running(self.after_s, signal.Signals(number).name)

    def close(self) -> None:
        if self.thread is None:
            return
        signal.set_wakeup_fd(-1)
        os.write(self.write, b"\0")
        self.thread.join(timeout=5)
        self.thread = None
        self._close_pipe()

    def _close_pipe(self) -> None:
        for fd in (self.read, self.write):
            try:
                os.close(fd)
            except OSError:
                pass


_FORK_HOOK: list = []  # [True] once _no_watch_in_child is registered (os.register_at_fork cannot unregister)


def _no_watch_in_child() -> None:
    """In a forked child: no wakeup fd (the parent's watch pipe), so the child's signals do not reach the parent."""
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:  # (not the main thread)
        pass
