"""One run per run directory: run.lock names its holder; a second run refuses; a stale lock is taken over."""

import json
import logging
import os
import socket
import subprocess
import time

import pytest
import yaml

from conftest import tiny_run_config
from cpt.runlock import LOCK_FILE, RunLock, RunLockError
from forking import forked_cli, start_forked, wait_forked


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def plant(run_dir, **holder):
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": 1.7e9, "proc_start": None, **holder}
    (run_dir / LOCK_FILE).write_text(json.dumps(info))
    return info


def test_lock_names_its_holder_and_a_second_run_refuses(tmp_path):
    with RunLock(tmp_path / "run") as lock:
        holder = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["start_time"] > 0
        with pytest.raises(RunLockError) as e:
            RunLock(tmp_path / "run").acquire()
        msg = str(e.value)
        assert "\n" not in msg and f"PID {os.getpid()} on host {socket.gethostname()} since " in msg and "--force-lock" in msg
        assert lock.held
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released


def test_stale_lock_on_this_host_is_taken_over_with_a_warning(tmp_path, caplog):
    plant(tmp_path, pid=dead_pid())
    with caplog.at_level(logging.WARNING, "cpt.runlock"), RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "is no longer running" in caplog.text


def test_reused_pid_is_stale(tmp_path, caplog):
    plant(tmp_path, proc_start="1")  # our PID, but a process started at another time held it
    with caplog.at_level(logging.WARNING, "cpt.runlock"), RunLock(tmp_path):
        pass
    assert "no longer running" in caplog.text


def test_other_host_is_honoured_unless_forced(tmp_path, caplog):
    plant(tmp_path, host="node-17", pid=dead_pid())  # its PID means nothing here
    with pytest.raises(RunLockError, match="in use by another run .PID .* on host node-17"):
        RunLock(tmp_path).acquire()
    with caplog.at_level(logging.WARNING, "cpt.runlock"), RunLock(tmp_path, force=True):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == socket.gethostname()
    assert "--force-lock (holder: PID" in caplog.text


def test_requeued_slurm_job_takes_over_the_lock_of_its_earlier_start_on_another_node(tmp_path, monkeypatch, caplog):
    """A SLURM job killed without a checkpoint signal (preemption, `scancel --signal=KILL`, a node failure: srun
    SIGKILLs the ranks) leaves its lock; SLURM requeues it, usually on another node, where the holder's PID cannot be
    checked. The same job id with a higher SLURM_RESTART_COUNT is proof enough: SLURM ends a job before requeueing
    it. (Before, every start of the requeued job failed with "in use by another run" until someone passed
    --force-lock by hand.) Another job's lock, or one of this same start, is still honoured."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    with RunLock(tmp_path):  # the first start records its job and start
        first = json.loads((tmp_path / LOCK_FILE).read_text())
    assert (first["slurm_job"], first["slurm_restart"]) == ("4242", 0)
    plant(tmp_path, host="node-17", pid=dead_pid(), slurm_job="4242", slurm_restart=0)  # left by a SIGKILL on node-17
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with caplog.at_level(logging.WARNING, "cpt.runlock"), RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["slurm_restart"] == 1
    assert "was start 0 of this SLURM job 4242, which SLURM ended before requeueing it" in caplog.text
    for other in ({"slurm_job": "4243", "slurm_restart": 0}, {"slurm_job": "4242", "slurm_restart": 1}, {}):
        plant(tmp_path, host="node-17", pid=dead_pid(), **other)
        with pytest.raises(RunLockError, match="in use by another run"):
            RunLock(tmp_path).acquire()


def test_empty_lock_left_by_a_kill_while_starting(tmp_path):
    (tmp_path / LOCK_FILE).write_text("")
    with pytest.raises(RunLockError):  # maybe a run being written right now
        RunLock(tmp_path).acquire()
    os.utime(tmp_path / LOCK_FILE, (time.time() - 60, time.time() - 60))
    with RunLock(tmp_path):  # an old empty file: taken over
        pass


def test_output_dir_that_is_a_file_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunLockError, match="cannot create the run directory"):
        RunLock(tmp_path / "file").acquire()


@pytest.mark.slow
def test_two_concurrent_runs_on_one_directory(tiny_cpt_data, tmp_path):
    """A run in progress; a second one, fresh or --resume, refuses naming it and changes nothing."""
    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_cpt_data, out, checkpoint={"every": 2, "keep": 5, "export_at_end": False}, eval={"at_start": False})
    cfg["stages"][0]["steps"] = 100_000  # still training when the second run starts, however fast the machine (killed below)
    cfg["data"]["heldout"] = []
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    first = start_forked(["train", str(path)], tmp_path / "first.log")
    t0 = time.time()
    while not list(out.glob("checkpoints/step_*")):  # the first run is training
        assert time.time() - t0 < 120, (tmp_path / "first.log").read_text()
        time.sleep(0.05)
    for extra in ([], ["--resume"]):
        log = tmp_path / f"second{len(extra)}.log"
        assert forked_cli(["train", str(path), "--set", "run.seed=7", *extra], log) == 1
        text = log.read_text().strip()
        assert text.startswith("cpt train: error: ") and "\n" not in text, text
        assert f"in use by another run (PID {first} on host {socket.gethostname()}" in text
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == first  # the holder's lock is untouched
    assert not (tmp_path / "run" / "metrics.jsonl.1").exists()  # the second run moved nothing aside
    os.kill(first, 9)
    assert wait_forked(first) == -9


def test_force_lock_acts_once_and_is_not_saved(tmp_path):
    """`cpt train --force-lock` (run.force_lock) takes over one lock at that start; the config.yaml it writes says
    false, so a later `cpt train RUN/config.yaml --resume` honours a live holder's lock again."""
    from cpt.config import load_config, save_config

    from conftest import tiny_run_config

    cfg = load_config(base=tiny_run_config(tmp_path / "data", tmp_path / "run"), overrides=["run.force_lock=true"])
    assert cfg.run.force_lock
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml").run.force_lock is False


def fake_squeue(bin_dir, stdout: str = "", stderr: str = "", rc: int = 0):
    """A stand-in `squeue` first on PATH that answers every query with ``stdout``/``stderr``/``rc`` and logs its
    arguments (real squeue, for a job id it has forgotten: rc 1, "slurm_load_jobs error: Invalid job id specified")."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "squeue"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {bin_dir}/calls\nprintf '{stdout}'\nprintf '{stderr}' >&2\nexit {rc}\n")
    script.chmod(0o755)


@pytest.mark.parametrize("answer, stale", [
    ({"stdout": "TIMEOUT\\n"}, "SLURM says TIMEOUT"),  # killed at its time limit (the save did not fit the warning)
    ({"stdout": "CANCELLED\\n"}, "SLURM says CANCELLED"),  # scancel
    ({"stdout": "NODE_FAIL\\n"}, "SLURM says NODE_FAIL"),
    ({"stderr": "slurm_load_jobs error: Invalid job id specified\\n", "rc": 1}, "SLURM no longer knows it"),
    ({"stdout": ""}, "SLURM no longer lists it"),
    ({"stdout": "RUNNING\\n"}, None),
    ({"stdout": "PENDING\\n"}, None),  # requeued: it will come back to this run directory
    ({"stderr": "squeue: error: Unable to contact slurm controller\\n", "rc": 1}, None),  # cannot tell: honoured
    (None, None),  # no squeue on this machine: honoured
])
def test_lock_of_an_ended_slurm_job_on_another_host_is_stale(tmp_path, monkeypatch, caplog, answer, stale):
    """A multi-node job killed without a checkpoint signal (its time limit reached during the save, `scancel`, a node
    failure without requeue) leaves its lock, held on its first node; the job submitted again (another job id, other
    nodes) was refused with "in use by another run" until someone passed --force-lock by hand, although the docs say
    a resubmission resumes. SLURM knows whether the holder's job has ended: then the lock is taken over with a warning
    naming the job's state. A job SLURM lists as pending or running, or no answer from SLURM, is honoured."""
    bin_dir = tmp_path / "bin"
    if answer is not None:
        fake_squeue(bin_dir, **answer)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    monkeypatch.setenv("SLURM_JOB_ID", "5001")  # the new submission (also under no SLURM job at all: same answer)
    run = tmp_path / "run"
    plant(run, host="node-17", pid=dead_pid(), slurm_job="4242", slurm_restart=0)
    if stale is None:
        with pytest.raises(RunLockError, match=r"in use by another run \(PID \d+ on host node-17, SLURM job 4242, since"):
            RunLock(run).acquire()
    else:
        with caplog.at_level(logging.WARNING, "cpt.runlock"), RunLock(run):
            assert json.loads((run / LOCK_FILE).read_text())["slurm_job"] == "5001"
        assert f"was SLURM job 4242, which has ended ({stale})" in caplog.text
    if answer is not None:
        assert (bin_dir / "calls").read_text().split() == ["--noheader", "--jobs", "4242", "--format", "%T"]


def test_a_lock_without_a_slurm_job_on_another_host_asks_no_one(tmp_path, monkeypatch):
    fake_squeue(tmp_path / "bin", stdout="")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin")
    plant(tmp_path / "run", host="node-17", pid=dead_pid())
    with pytest.raises(RunLockError, match="in use by another run"):
        RunLock(tmp_path / "run").acquire()
    assert not (tmp_path / "bin" / "calls").exists()
