"""One rank of a multi-process run fails (cpt/rank_failure.py): the failing rank prints one line naming itself and the
cause and tells the others through the launcher's store; a rank whose collective then breaks ("Connection closed by
peer") stays quiet instead of printing a page of traceback or a misleading line of its own, and prints one line when
the other rank died without a word (kill -9). In-process: `cpt train`'s error handling (cpt/commands/train.py) with
a real TCPStore standing for torchrun's, each rank's environment set in turn. (The same on 2 launched processes:
tests/test_launch_shipped.py's sharded-save failure.)"""

from datetime import timedelta
from types import SimpleNamespace

import pytest

GLOO_LOST = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
             "[127.0.0.1]:25274. This is typically caused by a remote worker crashing. Check the logs of the remote worker "
             "before reporting an error. GLHF!")


@pytest.fixture
def store(monkeypatch):
    """A launcher's store (what torchrun's agent serves to its ranks), as remember_store() keeps it."""
    import signal

    import torch.distributed as dist

    from cpt import rank_failure

    server = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=5))
    monkeypatch.setattr(rank_failure, "_STORE", [dist.PrefixStore("default_pg", server)])
    monkeypatch.setattr(rank_failure, "leave", lambda code=1: None)  # (os._exit: not in the test process)
    monkeypatch.setenv("WORLD_SIZE", "2")
    term = signal.getsignal(signal.SIGTERM)  # (a rank that lost another ignores SIGTERM while it reports)
    yield server
    signal.signal(signal.SIGTERM, term)


class RunLog(list):
    def write(self, line):
        self.append(line)

    say = write


def run_rank(rank: int, error: BaseException, tmp_path, monkeypatch, capsys) -> tuple[int, list[str], RunLog]:
    """`cpt train`'s handling of ``error`` raised by train() on ``rank``: (exit status, its stderr lines, train.log)."""
    from cpt.commands.train import _train

    monkeypatch.setenv("RANK", str(rank))

    def train(*a, **k):
        raise error

    cfg = SimpleNamespace(run=SimpleNamespace(output_dir=str(tmp_path / "run")),
                          train=SimpleNamespace(distributed_timeout_s=1800, stop_stack_dump_s=None))
    runlog = RunLog()
    capsys.readouterr()
    rc = _train(cfg, SimpleNamespace(resume=False, allow_config_change=False), [], runlog, train)
    return rc, capsys.readouterr().err.splitlines(), runlog


def test_the_rank_with_the_cause_prints_it_once_and_the_others_stay_quiet(store, tmp_path, monkeypatch, capsys):
    from cpt.checkpoint import ShardedSaveError
    from cpt.data.shards import ShardError

    cause = ShardError("data source 'python': checksum mismatch for shard_00000.bin")
    rc, err, _ = run_rank(1, cause, tmp_path, monkeypatch, capsys)
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith("cpt train: error: data source 'python': checksum mismatch") and "[rank 1 of 2 (" in err[0]

    # rank 0's collectives break when rank 1 exits: nothing printed (a traceback before), the cause in train.log
    rc, err, runlog = run_rank(0, RuntimeError(GLOO_LOST), tmp_path, monkeypatch, capsys)
    assert rc == 1 and err == [], err
    assert len(runlog) == 1 and "checksum mismatch" in runlog[0] and "rank 1 of 2" in runlog[0], runlog
    # ... also inside a collective save that wraps it (ShardedSaveError: once a line of its own, "connection closed")
    try:
        raise RuntimeError(GLOO_LOST)
    except RuntimeError as lost:
        try:
            raise ShardedSaveError("checkpoint at step 6: rank 0 failed in the fsdp save: RuntimeError: ...") from lost
        except ShardedSaveError as e:
            wrapped = e
    rc, err, _ = run_rank(0, wrapped, tmp_path, monkeypatch, capsys)
    assert rc == 1 and err == [], err


def test_a_rank_killed_without_a_word_gets_one_line(store, tmp_path, monkeypatch, capsys):
    from cpt import rank_failure

    monkeypatch.setattr(rank_failure, "REPORT_WAIT_S", 0.2)
    rc, err, _ = run_rank(0, RuntimeError(GLOO_LOST.replace("closed by", "reset by")), tmp_path, monkeypatch, capsys)
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith("cpt train: error: rank 0 of 2 (") and "another rank of this run died" in err[0]
    assert "Connection reset by peer" in err[0] and "--resume" in err[0]
    # with more ranks, the first survivor to report says it; the others stay quiet (not one line per survivor)
    monkeypatch.setenv("WORLD_SIZE", "3")
    rc, err, _ = run_rank(2, RuntimeError(GLOO_LOST), tmp_path, monkeypatch, capsys)
    assert rc == 1 and err == [], err


def test_an_unexpected_error_keeps_its_traceback_and_quiets_the_others(store, tmp_path, monkeypatch, capsys):
    with pytest.raises(IndexError):
        run_rank(1, IndexError("index out of range in self"), tmp_path, monkeypatch, capsys)
    rc, err, _ = run_rank(0, RuntimeError(GLOO_LOST), tmp_path, monkeypatch, capsys)
    assert rc == 1 and err == [], err


def test_the_first_report_is_kept():
    import torch.distributed as dist

    from cpt import rank_failure

    server = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=5))
    rank_failure._STORE[:] = [server]
    try:
        assert rank_failure.reported("r", wait_s=0) is None
        assert rank_failure.report("r", "first") is None and rank_failure.report("r", "second") == "first"
        assert rank_failure.reported("r", wait_s=0).endswith(": first")
        assert rank_failure.reported("another run", wait_s=0) is None
    finally:
        rank_failure._STORE.clear()


def test_a_rank_that_lost_another_is_not_cut_off_by_the_launchers_sigterm(monkeypatch):
    """The launcher sends SIGTERM to the ranks left once one died; the training loop's preemption handler is gone by
    the time the broken collective's error reaches `cpt train`, so the rank died mid-way, its line unprinted. On
    the way out of a lost-peer error the handler leaves SIGTERM ignored (any other error: the previous handler)."""
    import signal

    from cpt.distributed import PreemptionFlag

    monkeypatch.setenv("WORLD_SIZE", "2")
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(ValueError), PreemptionFlag():
            raise ValueError("another error")
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        # and never the default action in between (a SIGTERM landing there ended the rank silently: CI, the 2-node
        # SLURM test's survivor): ignored first, then the other handlers restored
        real, set_to = signal.signal, []

        def recording(sig, handler):
            if sig == signal.SIGTERM:
                set_to.append(handler)
            return real(sig, handler)

        monkeypatch.setattr(signal, "signal", recording)
        with pytest.raises(RuntimeError), PreemptionFlag():
            raise RuntimeError(GLOO_LOST)
        monkeypatch.setattr(signal, "signal", real)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        assert set_to[1:] == [signal.SIG_IGN], set_to  # (set_to[0]: the flag's own handler, installed)
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_write_failing_on_one_rank_is_one_line(store, tmp_path, monkeypatch, capsys):
    """Disk full in the final HF export (written by the main process): it was a raw OSError traceback on that rank
    and a 'Connection closed by peer' traceback on the other."""
    import errno

    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / ".export.tmp" / "model.safetensors"))
    rc, err, _ = run_rank(0, full, tmp_path, monkeypatch, capsys)
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith(f"cpt train: error: a write failed: no space left on device ({tmp_path / 'run' / '.export.tmp'}")
    assert "--resume" in err[0] and "[rank 0 of 2 (" in err[0]
    rc, err, _ = run_rank(1, RuntimeError(GLOO_LOST), tmp_path, monkeypatch, capsys)
    assert rc == 1 and err == [], err


def test_every_rank_failing_alike_prints_the_line_once(store, tmp_path, monkeypatch, capsys):
    """A setting the launch cannot train fails on every rank with the same line: printed once (the first to report),
    each rank's train.log-side record kept."""
    from cpt.distributed import LaunchError

    outs = [run_rank(r, LaunchError("EMA: parameter w is sharded (FSDP2 DTensor); turn it off"), tmp_path, monkeypatch, capsys)
            for r in (1, 0)]
    assert [rc for rc, _, _ in outs] == [1, 1]
    assert outs[0][1] == ["cpt train: error: EMA: parameter w is sharded (FSDP2 DTensor); turn it off [rank 1 of 2 ("
                          + outs[0][1][0].split("[rank 1 of 2 (")[1]] and outs[1][1] == []
    assert outs[1][2] and "EMA: parameter w is sharded" in outs[1][2][0]  # (rank 0's train.log still has it)


def test_one_process_has_no_lost_peer(monkeypatch):
    """A broken pipe in a 1-process run is its own output's (`cpt train ... | head`), not another rank's death."""
    from cpt import rank_failure

    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not rank_failure.lost_peer(BrokenPipeError(32, "Broken pipe"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert rank_failure.lost_peer(RuntimeError(GLOO_LOST)) and not rank_failure.lost_peer(ValueError("bad value"))
    # nor in one process of several: Python's own BrokenPipeError (its stdout closed); gloo's is a RuntimeError
    assert not rank_failure.lost_peer(BrokenPipeError(32, "Broken pipe"))
    assert rank_failure.lost_peer(RuntimeError("[gloo/transport/tcp/pair.cc:598] Write error: Broken pipe"))


def test_an_error_that_is_no_write_is_not_called_a_failed_write(tmp_path, monkeypatch, capsys):
    """Any OSError was 'a write failed: ...; the newest checkpoint is intact and --resume continues' with no traceback:
    a data file that cannot be read, a network error (requests' ConnectionError is an OSError). Those keep their
    traceback; a write in the run directory (any errno) and a full disk or quota (anywhere) are the one line."""
    import errno

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for error in (OSError(errno.ENOENT, "No such file or directory", "/data/corpus/part-0001.parquet"),
                  ConnectionError("Connection refused")):
        with pytest.raises(type(error)):
            run_rank(0, error, tmp_path, monkeypatch, capsys)
    for error in (OSError(errno.EACCES, "Permission denied", str(tmp_path / "run" / "export" / "config.json")),
                  OSError(errno.EDQUOT, "Disk quota exceeded", "/scratch/elsewhere")):
        rc, err, _ = run_rank(0, error, tmp_path, monkeypatch, capsys)
        assert rc == 1 and len(err) == 1 and err[0].startswith("cpt train: error: a write failed: "), err


def stderr_of(code: str, **env) -> str:
    """The stderr of ``code`` run by a fresh Python (the stack dump is process-wide: not in the test process)."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_a_rank_still_running_after_a_stop_writes_where_its_threads_are():
    """A rank that got a stop signal (or lost another rank) and is still running `train.stop_stack_dump_s` later
    writes the stacks of its threads to stderr, after a line saying why; also when it is blocked in C with the GIL
    held (faulthandler's own thread: the line then cannot come first, the stacks still do); nothing once disarmed."""
    arm = "from cpt import rank_failure; rank_failure.stacks_if_still_running(0.5, 'SIGTERM')\n"
    err = stderr_of(arm + "import time\ndef waiting_in_python():\n    time.sleep(2)\nwaiting_in_python()\n",
                    WORLD_SIZE="2", RANK="1")
    line = next(x for x in err.splitlines() if x.startswith("cpt: "))
    assert line.startswith("cpt: rank 1 of 2 (") and "still running 0.5 s after SIGTERM" in line, err
    assert "train.stop_stack_dump_s" in line
    assert err.index(line) < err.index("Timeout (0:00:00.500000)!") < err.index("in waiting_in_python"), err
    assert "(most recent call first)" in err
    err = stderr_of(arm + "import ctypes\ndef blocked_in_c():\n    ctypes.PyDLL(None).sleep(2)\nblocked_in_c()\n")
    assert err.index("Timeout (0:00:00.500000)!") < err.index("in blocked_in_c"), err
    err = stderr_of(arm + "import time\nrank_failure.cancel_stacks()\ntime.sleep(1.5)\n")
    assert err == "", err
    err = stderr_of("from cpt import rank_failure; rank_failure.stacks_if_still_running(None, 'SIGTERM')\n"
                    "import time\ntime.sleep(1)\n")
    assert err == "", err


def test_the_stop_signal_and_a_lost_rank_arm_the_stack_dump(store, tmp_path, monkeypatch, capsys):
    """The training loop's preemption handler arms the dump when the signal comes (it stays armed while the `cpt`
    program ends; in a process that goes on, e.g. another run of `cpt experiment`, it is disarmed at the loop's end),
    and so does a rank whose collective broke because another rank is gone."""
    import os
    import signal

    from cpt import distributed, rank_failure

    monkeypatch.setattr(rank_failure, "REPORT_WAIT_S", 0.1)
    armed = []
    monkeypatch.setattr(rank_failure, "stacks_if_still_running", lambda s, why: armed.append((s, why)))
    monkeypatch.setattr(distributed, "stacks_if_still_running", rank_failure.stacks_if_still_running)
    with distributed.PreemptionFlag(stack_dump_s=30.0) as stop:
        assert armed == []
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.flag and armed == [(30.0, "SIGTERM")]
    cancelled = []
    monkeypatch.setattr(distributed, "cancel_stacks", lambda: cancelled.append(1))
    for program in (False, True):  # (the `cpt` program after a stop: the process ends, the dump stays armed)
        monkeypatch.setattr(distributed, "is_cpt_program", lambda: program)
        monkeypatch.setattr(distributed, "ignore_signals_after_the_run", lambda: None)
        with distributed.PreemptionFlag(stack_dump_s=30.0) as stop:
            stop.stopped = True
        assert cancelled == [1], program
    monkeypatch.setattr(distributed, "is_cpt_program", lambda: True)
    with distributed.PreemptionFlag(stack_dump_s=30.0):  # an ordinary end of a run that is not the last: disarmed
        pass
    assert cancelled == [1, 1]
    with pytest.raises(RuntimeError), distributed.PreemptionFlag(stack_dump_s=30.0):  # a lost rank: it leaves
        raise RuntimeError(GLOO_LOST)
    assert cancelled == [1, 1]
    with distributed.PreemptionFlag(stack_dump_s=30.0) as stop:  # the `cpt` program: the watch for a blocked thread
        assert stop.watch is not None and stop.watch.thread.is_alive()
        assert signal.set_wakeup_fd(stop.watch.write) == stop.watch.write
    assert stop.watch is None and signal.set_wakeup_fd(-1) == -1  # given back at the loop's end

    armed.clear()
    from cpt.commands.train import _train

    def train(*a, **k):
        raise RuntimeError(GLOO_LOST)

    cfg = SimpleNamespace(run=SimpleNamespace(output_dir=str(tmp_path / "run")),
                          train=SimpleNamespace(distributed_timeout_s=1800, stop_stack_dump_s=12.5))
    assert _train(cfg, SimpleNamespace(resume=False, allow_config_change=False), [], RunLog(), train) == 1
    assert armed == [(12.5, "losing another rank")]
    armed.clear()
    cfg.train.stop_stack_dump_s = 60.0  # (a rank that lost another should end within seconds: at most 20 s)
    assert _train(cfg, SimpleNamespace(resume=False, allow_config_change=False), [], RunLog(), train) == 1
    assert armed == [(rank_failure.LOST_PEER_DUMP_S, "losing another rank")] and rank_failure.LOST_PEER_DUMP_S == 20


def test_a_signal_arms_the_stack_dump_while_the_main_thread_is_blocked_in_cpp(tmp_path):
    """Python runs a signal handler only when the main thread returns to the interpreter, which a collective waiting
    for a dead or stopped rank never does (the 2-node rank-kill test's survivor, in DDP's backward); SignalWatch arms
    the dump from its own thread, woken through the wakeup fd. Here the main thread waits on a torch future that
    never completes (C++, the GIL released): the handler has not run, the stacks come all the same."""
    import resource
    import subprocess
    import sys
    import time

    code = ("import os, resource, signal, threading, torch\n"
            "from cpt import rank_failure\n"
            "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"  # (a long-running process's descriptors
            "if hard == resource.RLIM_INFINITY or hard >= 1200:\n"  # pass select()'s FD_SETSIZE, 1024: the watch's too)
            "    resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))\n"
            "    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]\n"
            "got = []\n"
            "signal.signal(signal.SIGTERM, lambda *a: got.append(1))\n"
            "watch = rank_failure.SignalWatch(0.5)\n"
            "print('watch fd', watch.read, file=__import__('sys').stderr, flush=True)\n"
            "threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()\n"
            "def blocked_in_cpp():\n"
            "    torch.futures.Future().wait()\n"
            "blocked_in_cpp()\n")
    err = tmp_path / "err"
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", code], stderr=f)
    try:
        deadline = time.time() + 60
        while "in <module>" not in err.read_text() and time.time() < deadline:
            assert proc.poll() is None, err.read_text()
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    text = err.read_text()
    assert "still running 0.5 s after SIGTERM" in text and "Timeout (0:00:00.500000)!" in text, text
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard >= 1200:
        assert int(text.split("watch fd ")[1].split()[0]) > 1024, text  # (the case select() could not wait on)
    assert text.index("Timeout (") < text.index("in blocked_in_cpp"), text


def test_the_signal_watch_is_given_back():
    """close() gives the wakeup fd back and ends the thread, so a later signal arms nothing; a wakeup fd someone else
    holds (an asyncio loop in the main thread) is left alone and no watch runs."""
    import os
    import signal

    from cpt import rank_failure

    assert signal.set_wakeup_fd(-1) == -1  # (nobody holds it in the test process)
    watch = rank_failure.SignalWatch(30.0)
    assert watch.thread is not None and watch.thread.is_alive()
    assert signal.set_wakeup_fd(watch.write) == watch.write  # (ours)
    pid = os.fork()  # a forked child (a data worker) does not write its signals into the parent's watch
    if pid == 0:
        os._exit(0 if signal.set_wakeup_fd(-1) == -1 else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert signal.set_wakeup_fd(watch.write) == watch.write  # (still the parent's)
    thread = watch.thread
    watch.close()
    assert not thread.is_alive() and signal.set_wakeup_fd(-1) == -1
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w)
    try:
        other = rank_failure.SignalWatch(30.0)
        assert other.thread is None and signal.set_wakeup_fd(w) == w  # (still theirs)
        other.close()
    finally:
        signal.set_wakeup_fd(-1)
        os.close(r)
        os.close(w)
