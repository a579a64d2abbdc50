"""One run per run directory: ``<output_dir>/run.lock`` names its holder (host, PID, start time).

A second run on the same directory, fresh or ``--resume``, refuses with one line naming the holder.
A lock whose holder is gone (same host, PID no longer running, or running but a different process
started since) is stale and taken over with a warning: that is what a ``kill -9`` or a node crash
leaves behind. So is a lock held by an earlier start of the same SLURM job (same ``SLURM_JOB_ID``, a lower
``SLURM_RESTART_COUNT``): SLURM requeues a job only once its processes have ended, and a job requeued after a
preemption or a node failure usually lands on another node. So is a lock held on another host by another SLURM job
that SLURM says has ended (``squeue``: a final state such as TIMEOUT or CANCELLED, or a job id it no longer knows):
a job killed at its time limit or cancelled, then submitted again, lands on other nodes. Any other holder on another
host cannot be checked from here (no SLURM job, no ``squeue``, or SLURM says it is pending or running): that lock is
honoured unless ``run.force_lock`` (``cpt train --force-lock``) says the holder is gone.
Only the main process holds the lock in multi-process runs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger("cpt.runlock")

LOCK_FILE = "run.lock"


class RunLockError(RuntimeError):
    pass


def _process_start(pid: int) -> str | None:
    """The kernel's start time of a process (clock ticks since boot), to tell a reused PID apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    now = _process_start(pid)
    return started is None or now is None or now == started


def _slurm_start() -> dict:
    """This process's SLURM job and start (0 for the first, +1 per requeue), when it runs in a SLURM job."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return {}
    try:
        restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        restart = 0
    return {"slurm_job": job, "slurm_restart": restart}


def _earlier_start_of_this_job(holder: dict, me: dict) -> bool:
    """Whether ``holder`` was an earlier start of the SLURM job ``me`` runs in (SLURM ended it before requeueing)."""
    if not me.get("slurm_job") or holder.get("slurm_job") != me["slurm_job"]:
        return False
    try:
        return int(holder.get("slurm_restart", 0)) < me["slurm_restart"]
    except (TypeError, ValueError):
        return False


# squeue's states of a job that has ended (a job SLURM requeues goes back to PENDING, which is not one of them)
SLURM_ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
               "TIMEOUT", "SPECIAL_EXIT"}


def slurm_job_ended(job: str) -> str | None:
    """Why SLURM's ``squeue`` says job ``job`` has ended (its final state, or that it no longer knows the id: a job is
    forgotten some minutes after it ends), or None when it may still be pending or running, or SLURM cannot be asked
    (no ``squeue`` here, no answer within 20 s, any other error)."""
    try:
        done = subprocess.run(["squeue", "--noheader", "--jobs", str(job), "--format", "%T"], capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    states = {line.strip().split()[0] for line in done.stdout.splitlines() if line.strip()}
    if done.returncode != 0:
        return "SLURM no longer knows it" if "invalid job id" in done.stderr.lower() else None
    if not states:
        return "SLURM no longer lists it"
    return f"SLURM says {'/'.join(sorted(states))}" if states <= SLURM_ENDED else None


def _describe(holder: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("start_time", 0)))
    job = f", SLURM job {holder['slurm_job']}," if holder.get("slurm_job") else ""
    return f"PID {holder.get('pid')} on host {holder.get('host')}{job} since {when}"


class RunLock:
    """``with RunLock(run_dir): ...`` or ``acquire()`` / ``release()``."""

    def __init__(self, run_dir: str | os.PathLike, force: bool = False, lock_file: str = LOCK_FILE,
                 if_busy: str = ("Wait for it, use another run.output_dir, or, if that run is gone (e.g. on another host "
                                 "of a shared filesystem), pass --force-lock"), holder: str = "run"):
        """``lock_file``, ``if_busy`` (what to do, in the refusal) and ``holder`` (what holds the lock, in the messages)
        let other jobs that own a folder use it too (`cpt prepare`'s ``prepare.lock``)."""
        self.path = Path(run_dir) / lock_file
        self.if_busy, self.holder = if_busy, holder
        self.force = force
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": time.time(),
                   "proc_start": _process_start(os.getpid()), **_slurm_start()}
        self.held = False

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            what = "the run directory" if self.holder == "run" else "the folder"  # (`cpt prepare --out`: no run's)
            raise RunLockError(f"cannot create {what} {self.path.parent}: {e.strerror or e}") from None
        for _ in range(3):
            if self._create():
                self.held = True
                return
            holder = self._read()
            if holder is None:  # being written by a starting run, or left empty by a kill: look again
                time.sleep(0.2)
                holder = self._read()
                if holder is None and time.time() - self._mtime() < 5:
                    continue
            reason = self._stale_reason(holder)
            if reason is None:
                raise RunLockError(
                    f"{self.path.parent} is in use by another {self.holder} ({_describe(holder)}; lock file {self.path}). "
                    + self.if_busy
                )
            log.warning(f"taking over the lock of {self.path.parent}: {reason}")
            self._remove_if_unchanged(holder)
        raise RunLockError(f"could not take the lock {self.path}: another {self.holder} keeps taking it")

    def release(self) -> None:
        if self.held and (self._read() or {}).get("pid") == self.me["pid"]:
            try:
                self.path.unlink()
            except OSError:
                pass
        self.held = False

    def lost(self) -> str | None:
        """None while this process still holds its lock (or never took it); else why not: the file gone (the run
        directory removed or emptied under the run) or naming another process (a run that took it over). An
        unreadable file (a write in progress) counts as held."""
        if not self.held:
            return None
        holder = self._read()
        if holder == {}:
            return f"{self.path} is gone: the run directory was removed or emptied while this run trained"
        if holder is not None and (holder.get("pid"), holder.get("host")) != (self.me["pid"], self.me["host"]):
            return f"{self.path} now names another run ({_describe(holder)}), which took it over"
        return None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    # -- helpers
    def _create(self) -> bool:
        """Create the lock file atomically (O_EXCL); False if it exists."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise RunLockError(f"cannot create the lock file {self.path}: {e.strerror or e}") from None
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) and "pid" in holder else None
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return None

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def _stale_reason(self, holder: dict | None) -> str | None:
        """Why the lock may be taken over, or None if its holder may still be running."""
        if holder == {}:
            return "it was just released"
        if holder is None:
            return "its lock file is empty or unreadable (a run killed while starting)"
        if self.force:
            return f"--force-lock (holder: {_describe(holder)})"
        if _earlier_start_of_this_job(holder, self.me):
            return (f"its holder ({_describe(holder)}) was start {holder.get('slurm_restart', 0)} of this SLURM job "
                    f"{self.me['slurm_job']}, which SLURM ended before requeueing it")
        if holder.get("host") == self.me["host"]:
            if not _alive(int(holder["pid"]), holder.get("proc_start")):
                return f"its holder ({_describe(holder)}) is no longer running"
        elif holder.get("slurm_job") and (ended := slurm_job_ended(holder["slurm_job"])):
            return f"its holder ({_describe(holder)}) was SLURM job {holder['slurm_job']}, which has ended ({ended})"
        return None

    def _remove_if_unchanged(self, holder: dict | None) -> None:
        if holder == {}:
            return
        if self._read() == holder:  # not replaced by a run that took it over meanwhile
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
