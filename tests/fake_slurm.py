"""Stand-ins for `sbatch`, `srun` and `scontrol` that run a batch script on this machine the way SLURM runs it on
one node, for tests/test_slurm.py (which writes `sbatch`/`srun`/`scontrol` wrappers calling this file onto PATH).

* ``sbatch [--opt=value ...] SCRIPT ARGS``: reads the script's ``#SBATCH`` lines (command-line options override
  them), prints ``Submitted batch job N`` and returns; a background supervisor runs ``bash SCRIPT ARGS`` in the
  submit directory with the SLURM_* variables of a ``--nodes`` job (default 1; the nodes are names only, all on this
  machine; SLURM_CPUS_PER_TASK when ``--cpus-per-task`` is given), stdout and stderr to ``--output`` (``%x``, ``%j``
  expanded, relative to the submit directory; like SLURM, the job fails if that file cannot be opened), truncated or
  appended per ``--open-mode``. When ``scontrol requeue N`` was called during a run, the script runs again with
  ``SLURM_RESTART_COUNT`` incremented, the same job id, and the output reopened per ``--open-mode``; on as many nodes
  as ``$FAKE_SLURM_DIR/job_N.nodes_next`` says when that file exists (the allocation of a ``--nodes 1-2`` range).
  ``FAKE_SLURM_LOOPBACK_NODES=1``: the nodes are named 127.0.0.1, 127.0.0.2, ... (they resolve here: a job really
  trains across them); ``FAKE_SLURM_NODE_TMP=DIR``: each node's tasks get TMPDIR=DIR/node<i> (node-local disks).
  ``$FAKE_SLURM_DIR/job_N.json`` holds the parsed directives, the batch shell's pid (the process a
  ``--signal=B:SIG@T`` warning goes to: the test sends it, playing the clock) and every run's exit code.
* ``srun [--opt=value ...] CMD ARGS``: runs CMD as the one task per node of the step (SLURM_NODEID/PROCID = the
  node's index, LOCALID=0) and handles signals as srun does (slurm src/srun: ``_srun_signal_mgr``): SIGTERM, SIGHUP and SIGQUIT "force job
  termination", i.e. SIGKILL every process of the step; a single SIGINT is not forwarded; SIGUSR1, SIGUSR2 and the
  rest are forwarded to the tasks (with ``FAKE_SRUN_SIGNAL_CHILDREN=1`` to every process of the step, as SLURM does
  with cgroup.conf ``SignalChildrenProcesses=yes``, proctrack/pgid or proctrack/linuxproc). Every signal it gets is logged to ``$FAKE_SLURM_DIR/srun.log``.
  Each task that fails is reported as srun reports it (``srun: error: HOST: task N: Exited with exit code C`` or the
  signal's name). ``--kill-on-bad-exit[=1]``/``-K`` (or SLURM_KILL_BAD_EXIT=1) as in SLURM's source (launch.c
  ``_task_finish`` -> ``_step_signal(SIG_TERM_KILL)``; slurmstepd): at the first failed task, SIGCONT and SIGTERM to
  every process of the step, SIGKILL to what is left after KillWait (``FAKE_SLURM_KILL_WAIT``, default 30 s like
  slurm.conf's). The step's processes are srun's descendants: srun is a child subreaper, so processes orphaned by a
  task that died first stay among them (as in a step's cgroup). srun exits with 128 + the highest signal that ended a
  task, else the highest exit code (as srun's global rc). Like srun since SLURM 22.05 it does not
  inherit the job's ``--cpus-per-task`` (SLURM_CPUS_PER_TASK): a task gets srun's own ``--cpus-per-task``, else
  SRUN_CPUS_PER_TASK, else 1 CPU; each step is logged to ``$FAKE_SLURM_DIR/srun_steps.jsonl`` with that count.
* ``scontrol show hostnames LIST`` prints the hosts of a comma-separated LIST; ``scontrol requeue N`` marks job N
  for requeue; anything else fails. Every call is logged to ``$FAKE_SLURM_DIR/scontrol.log`` (one JSON list a line).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

STATE = Path(os.environ.get("FAKE_SLURM_DIR", "/nonexistent"))
KILLS_STEP = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
HANDLED = (*KILLS_STEP, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def _job_file(job_id: str) -> Path:
    return STATE / f"job_{job_id}.json"


def _update(job_id: str, **changes) -> dict:
    path = _job_file(job_id)
    job = json.loads(path.read_text())
    job.update(changes)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(job))
    os.replace(tmp, path)
    return job


def _options(tokens: list[str]) -> dict[str, str]:
    out = {}
    for t in tokens:
        key, _, value = t.lstrip("-").partition("=")
        out[key] = value
    return out


def directives(script: str) -> dict[str, str]:
    tokens = []
    for line in Path(script).read_text().splitlines():
        if line.startswith("#SBATCH"):
            tokens += shlex.split(line[len("#SBATCH"):], comments=True)
    return _options(tokens)


# sbatch's long options that take no value; every other one takes `--opt=value` or `--opt value`, as in sbatch
SBATCH_FLAGS = {"requeue", "no-requeue", "exclusive", "hold", "parsable", "wait", "test-only", "overcommit",
                "contiguous", "spread-job", "use-min-nodes", "ignore-pbs"}


def sbatch_command_line(argv: list[str]) -> tuple[dict[str, str], str, list[str]]:
    """(options, script, script arguments): the options come before the script, as in sbatch, written
    `--nodes 4 --time 24:00:00` (the README's form) or `--nodes=4`."""
    opts, n = [], 0
    while argv[n].startswith("--"):
        if "=" in argv[n] or argv[n][2:] in SBATCH_FLAGS:
            opts.append(argv[n])
            n += 1
        else:
            opts.append(f"{argv[n]}={argv[n + 1]}")
            n += 2
    return _options(opts), argv[n], argv[n + 1:]


def sbatch(argv: list[str]) -> int:
    opts, script, args = sbatch_command_line(argv)
    d = {**directives(script), **opts}
    nodes = int(d.get("nodes", "1"))
    STATE.mkdir(parents=True, exist_ok=True)
    job_id = str(1000 + len(list(STATE.glob("job_*.json"))))
    sig = d.get("signal", "")
    warn = None
    if sig:
        target, _, rest = sig.rpartition(":") if ":" in sig else ("", "", sig)
        name, _, seconds = rest.partition("@")
        warn = {"batch_shell_only": target == "B", "signal": name, "seconds_before_limit": int(seconds or 60)}
    job = {"id": job_id, "script": os.path.abspath(script), "args": args, "submit_dir": os.getcwd(), "directives": d,
           "warning": warn, "runs": [], "batch_pid": None, "done": False, "requeue": False}
    _job_file(job_id).write_text(json.dumps(job))
    subprocess.Popen([sys.executable, __file__, "_supervise", job_id], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"Submitted batch job {job_id}")
    return 0


def supervise(job_id: str) -> int:
    job = _update(job_id, supervisor_pid=os.getpid())  # the root of the job's processes (test clean-up)
    d, submit_dir = job["directives"], job["submit_dir"]
    name = d.get("job-name", Path(job["script"]).name)
    output = d.get("output", "slurm-%j.out").replace("%x", name).replace("%j", job_id)
    output = os.path.join(submit_dir, output)
    append = d.get("open-mode") == "append"
    restart = 0
    while True:
        nodes = d.get("nodes", "1")
        resized = _job_file(job_id).with_suffix(".nodes_next")  # the allocation of a requeue (`--nodes 1-2`)
        if restart and resized.is_file():
            nodes = resized.read_text().strip()
        if os.environ.get("FAKE_SLURM_LOOPBACK_NODES") == "1":  # nodes that resolve here: 127.0.0.1, 127.0.0.2, ...
            hosts = ",".join(f"127.0.0.{i + 1}" for i in range(int(nodes)))
        else:
            hosts = "localhost" if nodes == "1" else ",".join(f"node{i}" for i in range(int(nodes)))
        env = dict(os.environ, SLURM_JOB_ID=job_id, SLURM_JOBID=job_id, SLURM_JOB_NAME=name, SLURM_NNODES=nodes,
                   SLURM_JOB_NUM_NODES=nodes, SLURM_JOB_NODELIST=hosts, SLURM_SUBMIT_DIR=submit_dir,
                   SLURM_GPUS_ON_NODE=d.get("gpus-per-node", "1"), SLURM_NTASKS_PER_NODE=d.get("ntasks-per-node", "1"))
        if "cpus-per-task" in d:
            env["SLURM_CPUS_PER_TASK"] = d["cpus-per-task"]
        if restart:
            env["SLURM_RESTART_COUNT"] = str(restart)
        try:
            out = open(output, "a" if append else "w")  # truncate mode: every (re)start starts a new file
        except OSError as e:  # SLURM cannot open the output file: the job fails before the script runs
            _update(job_id, done=True, failed=f"cannot open --output {output}: {e}")
            return 1
        with out:
            proc = subprocess.Popen(["bash", job["script"], *job["args"]], cwd=submit_dir, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            _update(job_id, batch_pid=proc.pid, output=output)
            rc = proc.wait()
        job = _update(job_id, batch_pid=None)
        requeued = bool(job.get("requeue"))
        job = _update(job_id, runs=job["runs"] + [{"restart": restart, "rc": rc, "requeued": requeued}], requeue=False)
        if not requeued:
            _update(job_id, done=True)
            return 0
        restart += 1
        time.sleep(0.5)  # SLURM holds a requeued job pending for a moment


def _kill_on_bad_exit(opts: dict[str, str]) -> bool:
    """srun's ``-K``/``--kill-on-bad-exit[=0|1]`` (no value: 1), else SLURM_KILL_BAD_EXIT (slurm.conf's KillOnBadExit
    is 0 here)."""
    if "K" in opts or "kill-on-bad-exit" in opts:
        return opts.get("kill-on-bad-exit", "") in ("", "1")
    return os.environ.get("SLURM_KILL_BAD_EXIT", "0") == "1"


def _exit_text(code: int) -> str:
    """How srun reports a task's abnormal end (`srun: error: HOST: task N: ...`)."""
    return f"Exited with exit code {code}" if code > 0 else signal.strsignal(-code)


def srun(argv: list[str]) -> int:
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 1
    opts = _options(argv[:i])
    cpus = opts.get("cpus-per-task") or os.environ.get("SRUN_CPUS_PER_TASK") or "1"  # never SLURM_CPUS_PER_TASK
    with open(STATE / "srun_steps.jsonl", "a") as f:
        f.write(json.dumps({"argv": argv, "cpus_per_task": int(cpus)}) + "\n")
    # the step's processes stay srun's descendants even when a task's own process dies before its children (as a
    # step's cgroup holds them): orphans are re-parented to srun, so "every process of the step" can be found
    _set_child_subreaper()
    hosts = _hosts()
    children = []
    for node in range(int(os.environ.get("SLURM_NNODES", "1"))):
        env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node), SLURM_LOCALID="0", SLURM_STEP_ID="0",
                   SLURM_CPUS_PER_TASK=cpus)
        if os.environ.get("FAKE_SLURM_NODE_TMP"):  # each node's own local disk (its TMPDIR), as on a cluster
            env["TMPDIR"] = os.path.join(os.environ["FAKE_SLURM_NODE_TMP"], f"node{node}")
            os.makedirs(env["TMPDIR"], exist_ok=True)
        children.append(subprocess.Popen(argv[i:], env=env))

    cancelled = []

    def handle(sig, _frame):
        with open(STATE / "srun.log", "a") as f:
            f.write(signal.Signals(sig).name + "\n")
        if sig in KILLS_STEP:
            cancelled.append(sig)
            print("srun: forcing job termination", file=sys.stderr, flush=True)
            _signal_step(signal.SIGKILL)
        elif sig == signal.SIGINT:
            print("srun: interrupt (one more within 1 sec to abort)", file=sys.stderr, flush=True)
        elif os.environ.get("FAKE_SRUN_SIGNAL_CHILDREN") == "1":  # SignalChildrenProcesses=yes: every process
            _signal_step(sig)
        else:
            for child in children:
                child.send_signal(sig)

    for sig in HANDLED:
        signal.signal(sig, handle)
    kill_on_bad_exit, terminating = _kill_on_bad_exit(opts), False
    codes: dict[int, int] = {}
    while len(codes) < len(children):
        for task, child in enumerate(children):
            if task in codes or child.poll() is None:
                continue
            codes[task] = child.returncode
            # a failed task is reported; one ended by a signal after srun itself ended the step, only in verbose mode
            if child.returncode > 0 or (child.returncode < 0 and not cancelled):
                print(f"srun: error: {hosts[task]}: task {task}: {_exit_text(child.returncode)}", file=sys.stderr,
                      flush=True)
            if child.returncode != 0:
                if kill_on_bad_exit and not terminating:  # launch.c _task_finish: _step_signal(SIG_TERM_KILL)
                    terminating = True
                    job_step = f"{os.environ.get('SLURM_JOB_ID', '0')}.0"
                    print(f"srun: Terminating StepId={job_step}", file=sys.stderr, flush=True)
                    _terminate_step(children, job_step)
        _reap_orphans(children)
        time.sleep(0.05)
    signalled = [-c for c in codes.values() if c < 0]
    return 128 + max(signalled) if signalled else max(codes.values())  # as srun: the highest signal, else exit code


def _hosts() -> list[str]:
    return os.environ.get("SLURM_JOB_NODELIST", "localhost").split(",")  # (the stand-in's lists are comma-separated)


def _terminate_step(children: list[subprocess.Popen], job_step: str) -> None:
    """slurmstepd's SIG_TERM_KILL to every process of the step: SIGCONT and SIGTERM, then SIGKILL to what is still
    there after KillWait seconds (slurm.conf, default 30; FAKE_SLURM_KILL_WAIT here)."""
    print(f"slurmstepd: error: *** STEP {job_step} ON {_hosts()[0]} CANCELLED AT "
          f"{time.strftime('%Y-%m-%dT%H:%M:%S')} ***", file=sys.stderr, flush=True)
    _signal_step(signal.SIGCONT)
    _signal_step(signal.SIGTERM)
    deadline = time.time() + float(os.environ.get("FAKE_SLURM_KILL_WAIT", "30"))
    while time.time() < deadline and _step_processes():
        _reap_orphans(children)
        time.sleep(0.05)
    if _step_processes():
        _signal_step(signal.SIGKILL)


def _set_child_subreaper() -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _step_processes() -> list:
    """Every live (not zombie) process of the step: srun's descendants."""
    import psutil

    procs = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                procs.append(p)
        except psutil.NoSuchProcess:
            pass
    return procs


def _signal_step(sig: int) -> None:
    import psutil

    for p in _step_processes():
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def _reap_orphans(children: list[subprocess.Popen]) -> None:
    """Collect the exit status of processes re-parented to srun (not its tasks, which Popen waits for)."""
    import psutil

    tasks = {c.pid for c in children}
    for p in psutil.Process().children():
        if p.pid not in tasks:
            try:
                os.waitpid(p.pid, os.WNOHANG)
            except ChildProcessError:
                pass


def scontrol(argv: list[str]) -> int:
    STATE.mkdir(parents=True, exist_ok=True)
    with open(STATE / "scontrol.log", "a") as f:
        f.write(json.dumps(argv) + "\n")
    if argv[:2] == ["show", "hostnames"] and len(argv) == 3:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head -n 1` closes the pipe: end silently, as scontrol does
        print("\n".join(argv[2].split(",")))
        return 0
    if argv[:1] == ["requeue"] and len(argv) == 2 and _job_file(argv[1]).is_file():
        _update(argv[1], requeue=True)
        return 0
    print(f"fake scontrol: unsupported here: {' '.join(argv)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "_supervise":
        sys.exit(supervise(rest[0]))
    sys.exit({"sbatch": sbatch, "srun": srun, "scontrol": scontrol}[cmd](rest))
