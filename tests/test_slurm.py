"""The shipped SLURM script, run as shipped through stand-in `sbatch`/`srun`/`scontrol` (tests/fake_slurm.py) on one
node with 2 CPU ranks (the script's own `accelerate launch` line with configs/accelerate/ddp.yaml, gloo):
time-limit warning (SIGUSR1 to the batch shell, as `--signal=B:USR1@300` sends it) -> srun (which, like the real one,
forwards SIGUSR1 but turns SIGTERM into SIGKILL) -> scripts/slurm_node.sh -> the ranks ->
checkpoint -> `scontrol requeue` -> the same job id starts again with `--resume` -> the per-step losses equal an
uninterrupted run (1 process, fp32; within 1e-5 relative like every 2-rank test). Also: the job writes its log
where SLURM can open it (no logs/ folder needed), the log survives the requeue, and the trap calls no scontrol."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import tiny_run_config
from cpt.metrics import read_metrics

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_multinode.sbatch"
# a line of a torchrun agent's own log record (glog-style prefix), e.g. "E1128 14:26:06.556000 28459 .../torch/
# distributed/elastic/agent/server/api.py:1008] Error waiting on exit barrier. ..."
AGENT_LOG = re.compile(r"^[EWI]\d{4} [\d:.]+ +\d+ \S*torch/distributed/elastic/agent/server/api\.py:\d+\]")
VENV_BIN = Path(sys.executable).parent


def losses(run_dir) -> dict[int, float]:
    p = Path(run_dir) / "metrics.jsonl"
    return {r["step"]: r["train/loss"] for r in read_metrics(p) if "train/loss" in r} if p.is_file() else {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeSlurm:
    def __init__(self, tmp: Path):
        self.state, self.bin, self.submit_dir = tmp / "slurm_state", tmp / "bin", tmp / "submit"
        for d in (self.state, self.bin, self.submit_dir):
            d.mkdir()
        for name in ("sbatch", "srun", "scontrol"):
            exe = self.bin / name
            exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "fake_slurm.py"}" {name} "$@"\n')
            exe.chmod(0o755)

    def env(self) -> dict[str, str]:
        env = dict(os.environ, PATH=os.pathsep.join([str(self.bin), str(VENV_BIN), os.environ["PATH"]]),
                   FAKE_SLURM_DIR=str(self.state), CPT_HOME=str(ROOT), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
                   CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="1", MASTER_PORT=str(free_port()))
        env.setdefault("TORCH_EXTENSIONS_DIR", str(VENV_BIN.parent / "torch_extensions"))
        return env

    def submit(self, cfg_path: Path, strategy: str = "ddp", **env) -> str:
        out = subprocess.run(["sbatch", "--gpus-per-node=2", str(SCRIPT), str(cfg_path), strategy], cwd=self.submit_dir,
                             env={**self.env(), **env}, capture_output=True, text=True, check=True).stdout
        assert out.startswith("Submitted batch job "), out
        return out.split()[-1]

    def job(self, job_id: str) -> dict:
        return json.loads((self.state / f"job_{job_id}.json").read_text())

    def wait(self, job_id: str, until=None, timeout: float = 600) -> dict:
        t0 = time.time()
        while True:
            job = self.job(job_id)
            if job["done"] or (until is not None and until(job)):
                return job
            if time.time() - t0 > timeout:
                raise AssertionError(f"job {job_id} timed out:\n{self.log(job_id)[-5000:]}")
            time.sleep(0.1)

    def log(self, job_id: str) -> str:
        p = self.submit_dir / f"cpt-{job_id}.out"
        return p.read_text() if p.is_file() else ""

    def kill_all(self) -> None:
        """Kill every process of unfinished jobs (a failed or timed-out test must not leave ranks running; torchrun
        starts each rank in a session of its own, so the job's process group is not enough)."""
        import psutil

        for path in self.state.glob("job_*.json"):
            job = json.loads(path.read_text())
            if job["done"] or not job.get("supervisor_pid"):
                continue
            try:
                root = psutil.Process(job["supervisor_pid"])
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for p in procs:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass

    def scontrol_calls(self) -> list[list[str]]:
        p = self.state / "scontrol.log"
        return [json.loads(x) for x in p.read_text().splitlines()] if p.is_file() else []


def job_config(tiny_cpt_data, tiny_base, tmp_path: Path, name: str, checkpoint_every: int | None = None,
               **train) -> Path:
    """The jobs' run config: the tiny base, 12 steps of 8 rows, held-out evaluations every 4 steps, by default no
    periodic checkpoint (the preemption's is the one resumed from; checkpoints do not change the losses)."""
    cfg = tiny_run_config(tiny_cpt_data, tmp_path / name, eval={"every": 4, "dense_steps": 0},
                          checkpoint={"every": checkpoint_every})
    cfg["model"] = {"name_or_path": str(tiny_base)}
    cfg["stages"][0]["steps"] = 12
    cfg["train"].update(global_batch_size=8, micro_batch_size=2, **train)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def uninterrupted_losses(cfg_path: Path) -> dict[int, float]:
    """The per-step losses of the config's run uninterrupted (1 process, in-process: DDP on 2 ranks gives its losses
    to ~1e-7, see test_train_distributed)."""
    from cpt.config import load_config
    from cpt.train import train

    cfg = load_config(base=yaml.safe_load(cfg_path.read_text()))
    train(cfg, echo=lambda *a, **k: None)
    return losses(cfg.run.output_dir)


def assert_same_losses(got: dict[int, float], ref: dict[int, float]) -> None:
    """The same steps, each loss within 1e-5 relative (every 2-rank test's tolerance)."""
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), (step, got[step], ref[step])


@pytest.fixture(scope="module")
def reference(tiny_cpt_data, tiny_base, tmp_path_factory) -> dict[int, float]:
    """The per-step losses of job_config's run uninterrupted, computed once for the module's training tests."""
    ref = uninterrupted_losses(job_config(tiny_cpt_data, tiny_base, tmp_path_factory.mktemp("reference"), "ref"))
    assert sorted(ref) == list(range(1, 13))
    return ref


@pytest.fixture
def slurm(tmp_path):
    fake = FakeSlurm(tmp_path)
    yield fake
    fake.kill_all()


@pytest.mark.timeout(300)  # about 20-40 s; a hang fails here instead of holding the suite for 15 minutes
def test_slurm_time_limit_checkpoint_requeue_resume_matches_uninterrupted(tiny_cpt_data, tiny_base, tmp_path, slurm,
                                                                         reference):
    """srun's forwarded SIGUSR1 reaches only the task (proctrack/cgroup, the usual set-up). (Every process of the step,
    torchrun's agents too, with SignalChildrenProcesses=yes, proctrack/pgid or linuxproc: the 2-node ZeRO-3 job below;
    the agent must survive it, scripts/slurm_node.sh starts it with SIGUSR1 ignored.)"""

    ref = reference

    # the same job, warned of its time limit after a few steps
    run = tmp_path / "run"
    job_id = slurm.submit(job_config(tiny_cpt_data, tiny_base, tmp_path, "run"), FAKE_SRUN_SIGNAL_CHILDREN="0")
    job = slurm.wait(job_id, until=lambda j: j["batch_pid"] and len(losses(run)) >= 4)
    assert not job["done"], slurm.log(job_id)[-5000:]
    assert job["warning"] == {"batch_shell_only": True, "signal": "USR1", "seconds_before_limit": 300}
    os.kill(job["batch_pid"], getattr(signal, "SIG" + job["warning"]["signal"]))  # what SLURM's clock does
    job = slurm.wait(job_id)
    log = slurm.log(job_id)
    assert [(r["restart"], r["requeued"]) for r in job["runs"]] == [(0, True), (1, False)], log[-5000:]
    assert job["runs"][1]["rc"] == 0, log[-5000:]
    assert "ranks stopped (exit 0)" in log, log[-5000:]  # the launcher ended as after a normal run

    # what happened, in the job's one log file (appended across the requeue)
    k = next(int(line.split("PREEMPTED at step ")[1].split()[0]) for line in log.splitlines() if "PREEMPTED at step " in line)
    assert 4 <= k < 12
    order = ["start 0:", "USR1 received", "SIGUSR1: telling the ranks", f"PREEMPTED at step {k} of 12", "to resume: cpt train", f"requeueing job {job_id}",
             "start 1:", "resumed ", "srun exited with 0"]
    at = [log.find(s) for s in order]
    assert -1 not in at and at == sorted(at), list(zip(order, at))
    assert "eval step 4: " in log and "step 12/12 | tokens " in log  # plain progress lines in the batch log

    # the resumed job's losses are the uninterrupted run's; the checkpoint it resumed from is the preemption's
    assert_same_losses(losses(run), ref)
    assert (run / "checkpoints" / f"step_{k:08d}").is_dir() and (run / "export" / "config.json").is_file()
    assert not (slurm.submit_dir / "logs").exists()  # the log went to the submit dir; nothing had to pre-exist
    hostnames = ["show", "hostnames", "localhost"]
    assert slurm.scontrol_calls() == [hostnames, ["requeue", job_id], hostnames]  # none from the trap
    assert (slurm.state / "srun.log").read_text().split() == ["SIGUSR1"]  # never SIGTERM: srun would SIGKILL the ranks


def test_resume_with_nothing_complete_to_resume_starts_fresh(tmp_path):
    """Every SLURM start passes --resume: a first start, or one after a kill during the first save (only a partial
    .tmp-* directory), starts fresh; unusable complete checkpoints are refused with a message that fits --resume."""
    from cpt.checkpoint import CheckpointError
    from cpt.resume import check_fresh_run_dir

    run = tmp_path / "run"
    check_fresh_run_dir(run, resume=True)  # nothing there yet
    (run / "checkpoints" / ".tmp-step_00000004").mkdir(parents=True)
    check_fresh_run_dir(run, resume=True)
    check_fresh_run_dir(run, resume=False)
    (run / "checkpoints" / "step_00000004").mkdir()  # complete-looking but (per latest_valid_checkpoint) unusable
    with pytest.raises(CheckpointError, match="none is usable"):
        check_fresh_run_dir(run, resume=True)
    with pytest.raises(CheckpointError, match="pass --resume"):
        check_fresh_run_dir(run, resume=False)


@pytest.mark.parametrize("strategy", ["fsdp", "zero3", None])
def test_slurm_launch_line_on_two_nodes(tmp_path, slurm, strategy):
    """The shipped script on a 2-node job, with a recording stand-in for `accelerate` (no training): one
    `accelerate launch` per node with that node's machine rank, the first node as rendezvous host, every CPU of
    --cpus-per-task for the step (srun does not inherit it from sbatch since SLURM 22.05), and a command line that
    accelerate's own parser and config merge read as intended (for ZeRO: the absolute DeepSpeed JSON, the standard
    launcher). None: the strategy left out before cpt train options, the default (fsdp; `--set` was taken for the
    strategy, configs/accelerate/--set.yaml not found). About 2 s."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    calls = tmp_path / "accelerate_calls.jsonl"
    fake = slurm.bin / "accelerate"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"with open({str(calls)!r}, 'a') as f:\n"
                    "    f.write(json.dumps({'argv': sys.argv[1:], 'node': os.environ['SLURM_NODEID'],\n"
                    "                        'cpus': os.environ['SLURM_CPUS_PER_TASK']}) + '\\n')\n")
    fake.chmod(0o755)
    env = slurm.env()
    if strategy == "zero3":  # without MASTER_PORT: a port of the job's own (accelerate's default 29500 is shared)
        del env["MASTER_PORT"]
    out = subprocess.run(["sbatch", "--nodes=2", "--gpus-per-node=4", str(SCRIPT), "run.yaml", *[strategy] * bool(strategy),
                          "--set", "x=1"], cwd=slurm.submit_dir, env=env, capture_output=True, text=True, check=True).stdout
    strategy = strategy or "fsdp"
    job_id = out.split()[-1]
    job = slurm.wait(job_id, timeout=60)
    log = slurm.log(job_id)
    assert job["runs"] == [{"restart": 0, "rc": 0, "requeued": False}], log
    assert "2 node(s) x 4, " + strategy in log and "srun exited with 0" in log, log

    steps = [json.loads(x) for x in (slurm.state / "srun_steps.jsonl").read_text().splitlines()]
    assert [s["cpus_per_task"] for s in steps] == [64], steps  # #SBATCH --cpus-per-task=64, not srun's default 1
    got = sorted((json.loads(x) for x in calls.read_text().splitlines()), key=lambda c: c["node"])
    assert [(c["node"], c["cpus"]) for c in got] == [("0", "64"), ("1", "64")]
    for rank, call in enumerate(got):
        assert call["argv"][0] == "launch"
        args, _, _ = _validate_launch_command(launch_command_parser().parse_args(call["argv"][1:]))
        assert (args.machine_rank, args.num_machines, args.num_processes) == (rank, 2, 8)
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else 20000 + int(job_id) % 10000
        assert (args.main_process_ip, args.main_process_port) == ("node0", port)
        assert args.module and args.training_script == "cpt.cli"
        assert args.training_script_args == ["train", "run.yaml", "--resume", "--set", "x=1"]
        if strategy == "fsdp":
            assert args.use_fsdp and args.fsdp_version == 2 and not args.use_deepspeed
        else:
            assert args.use_deepspeed and args.deepspeed_multinode_launcher == "standard"
            assert args.deepspeed_config_file == str(ROOT / "configs" / "deepspeed" / "zero3.json")


def warned_stand_in_job(tmp_path, slurm, rank: str, launcher_exit: str) -> tuple[str, dict, str]:
    """A ddp job whose `accelerate` is a stand-in starting one rank (Python code ``rank``, which creates the file
    ``READY`` once it can take the warning); the time-limit warning once it has; a requeued start exits 0 at once.
    ``launcher_exit``: the stand-in launcher's exit status, an expression of the rank's, ``rc``. Returns (job id, the
    job's record, its log)."""
    ready = tmp_path / "rank_started"
    fake = slurm.bin / "accelerate"
    fake.write_text(f"#!{sys.executable}\nimport os, subprocess, sys\n"
                    f"if os.path.exists({str(ready)!r}):\n    sys.exit(0)  # a requeued start: nothing to do\n"
                    f"rc = subprocess.call([sys.executable, '-c', {rank.replace('READY', str(ready))!r}])\n"
                    f"sys.exit({launcher_exit})\n")
    fake.chmod(0o755)
    job_id = slurm.submit(tmp_path / "run.yaml", "ddp")
    job = slurm.wait(job_id, until=lambda j: j["batch_pid"] and ready.exists(), timeout=60)
    os.kill(job["batch_pid"], signal.SIGUSR1)
    job = slurm.wait(job_id, timeout=60)
    return job_id, job, slurm.log(job_id)


def test_ranks_failing_after_the_time_limit_warning_are_not_requeued(tmp_path, slurm):
    """A start whose ranks fail after the warning saved no checkpoint (here a stand-in rank dies of SIGUSR1; a save
    that fails ends the same way): the script does not requeue it (it did, after any warning: a failure that repeats,
    such as a --time shorter than the start plus the 300 s warning, came back forever); the log says why and what to
    do, and the job ends with srun's non-zero code. About 3 s."""
    rank = "import signal, time; signal.signal(signal.SIGUSR1, signal.SIG_DFL); open('READY', 'w'); time.sleep(60)"
    job_id, job, log = warned_stand_in_job(tmp_path, slurm, rank, "1 if rc else 0")  # (torchrun: 1 after a signal)
    assert [(r["restart"], r["requeued"]) for r in job["runs"]] == [(0, False)], log
    assert job["runs"][0]["rc"] != 0 and ["requeue", job_id] not in slurm.scontrol_calls(), log
    assert (f"ranks failed after the time-limit warning (exit {job['runs'][0]['rc']}): not requeueing" in log
            and "submit this script again (same arguments)" in log), log


@pytest.mark.parametrize("stop", ["preempted", "finished"])
def test_a_warning_is_requeued_only_after_a_preempted_stop(tmp_path, slurm, stop):
    """The ranks exit 0 both after a preempted stop (checkpoint saved) and after a finished run: the script requeues
    only when the first node's first rank wrote "preempted" in the marker it names ($CPT_PREEMPTED_MARKER, as `cpt
    train` does on a preempted stop; "finished" at a run's end). A warning that reaches the ranks after their last step used to requeue the finished run, whose
    restart then refused "holds a finished run's export" and the job FAILED. Stand-in ranks; about 3 s each."""
    preempted = stop == "preempted"
    rank = ("import os, signal, time\n"  # gets the warning, then stops preempted or had already finished
            "def on_usr1(*_):\n"
            + f"    open(os.environ['CPT_PREEMPTED_MARKER'], 'w').write({stop + chr(10)!r})\n"  # (cpt train's line)
            + "    raise SystemExit(0)\n"
            "signal.signal(signal.SIGUSR1, on_usr1)\nopen('READY', 'w')\ntime.sleep(60)\n")
    job_id, job, log = warned_stand_in_job(tmp_path, slurm, rank, "rc")
    if preempted:
        assert [(r["restart"], r["requeued"], r["rc"]) for r in job["runs"]] == [(0, True, 0), (1, False, 0)], log
        assert "requeueing job" in log, log
    else:
        assert [(r["restart"], r["requeued"], r["rc"]) for r in job["runs"]] == [(0, False, 0)], log
        assert ["requeue", job_id] not in slurm.scontrol_calls(), log
        assert "without recording a preempted stop (the run finished before the time-limit warning reached them): not requeueing" in log, log


def test_a_warning_before_a_rank_holds_sigusr1_is_not_lost(tmp_path, slurm):
    """A rank in its first fraction of a second still has the ignored SIGUSR1 it inherits from slurm_node.sh (which
    shields torchrun's agent so): the relayed signal is lost there. The relay first creates $CPT_STOP_REQUESTED, which
    the rank's training loop takes as a warning held during start-up (cpt.cli.EarlyWarning, cpt.distributed
    .PreemptionFlag; here a stand-in rank that runs that code after the warning): it stops preempted and the job is
    requeued. Before, the warning was lost: the run went on into its time limit. About 5 s."""
    rank = ("import os, signal, time\n"
            "assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN  # (inherited: the signal is lost)\n"
            "open('READY', 'w')\n"
            "while not os.path.exists(os.environ['CPT_STOP_REQUESTED']):  # the warning comes now, before cpt's\n"
            "    time.sleep(0.05)  # handler exists\n"
            "time.sleep(1)\n"
            "from cpt.cli import EarlyWarning\n"
            "from cpt.distributed import PreemptionFlag\n"
            "signal.signal(signal.SIGUSR1, EarlyWarning())  # cpt.cli.hold_stop_signals, then the training loop\n"
            "with PreemptionFlag() as stop:\n"
            "    if stop.early:\n"
            "        open(os.environ['CPT_PREEMPTED_MARKER'], 'w').write('preempted')\n"
            "signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # as cpt.stop_signals.ignore_signals_after_the_run: the\n"
            "# relayed signal can come after this code on a loaded machine (CI: 6 s after the stop file), and the\n"
            "# interpreter's finalization restores SIG_DFL for a Python handler: exit -10, the job not requeued\n")
    job_id, job, log = warned_stand_in_job(tmp_path, slurm, rank, "rc")
    assert [(r["restart"], r["requeued"], r["rc"]) for r in job["runs"]] == [(0, True, 0), (1, False, 0)], log
    assert "requeueing job" in log, log


def test_slurm_job_without_periodic_checkpoints_is_warned(tiny_cpt_data, tmp_path):
    """checkpoint.every unset (the default) in a SLURM job: a node failure would restart it from step 0, so the
    start-up log says so; not outside SLURM, not with checkpoint.every set."""
    from cpt.config import load_config
    from cpt.distributed import unprotected_batch_job

    cfg = load_config(base=tiny_run_config(tiny_cpt_data, tmp_path / "run", checkpoint={"every": None}))
    line = unprotected_batch_job(cfg, {"SLURM_JOB_ID": "4242"})
    assert line.startswith("warning: checkpoint.every is not set in SLURM job 4242") and "step 0" in line
    assert unprotected_batch_job(cfg, {}) is None
    cfg.checkpoint.every = 100
    assert unprotected_batch_job(cfg, {"SLURM_JOB_ID": "4242"}) is None


def test_fake_sbatch_reads_options_as_the_readme_writes_them():
    """The README's `sbatch --nodes 4 --time 24:00:00 scripts/slurm_multinode.sbatch run.yaml fsdp`: sbatch takes a
    long option's value after a space too; the stand-in took `4` for the script."""
    from fake_slurm import sbatch_command_line

    script = "scripts/slurm_multinode.sbatch"
    assert sbatch_command_line(["--nodes", "4", "--time", "24:00:00", script, "run.yaml", "fsdp"]) == (
        {"nodes": "4", "time": "24:00:00"}, script, ["run.yaml", "fsdp"])
    assert sbatch_command_line(["--nodes=2", "--requeue", "--gpus-per-node", "2", script, "--resume"]) == (
        {"nodes": "2", "requeue": "", "gpus-per-node": "2"}, script, ["--resume"])


def strategy_env(env: dict[str, str], strategy: str) -> dict[str, str]:
    """The CPU-only environment around the shipped script for a strategy (as tests/launching.rank_env sets it):
    FSDP2 through tests/fsdp_shim on gloo; DeepSpeed without ACCELERATE_USE_CPU (which would make it plain DDP)."""
    env = dict(env)
    if strategy == "fsdp":
        env.update(CPT_TEST_FSDP_ON_CPU="1", PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "fsdp_shim"), env["PYTHONPATH"]]))
    elif strategy.startswith("zero"):
        env.pop("ACCELERATE_USE_CPU", None)
    return env


@pytest.mark.timeout(300)
# fsdp: the README's strategy. zero3 and ddp passed here too; left out for CI time: their 2 -> 1 resumes are in
# tests/test_launch_shipped.py, zero3's 2-node launch line above, and the rank-failure test below trains a 2-node ddp job
@pytest.mark.parametrize("strategy", ["fsdp"])
def test_two_nodes_train_preempt_requeue_on_one_node_resume_and_export(tiny_cpt_data, tiny_base, tmp_path, slurm, strategy,
                                                                       reference):
    """The shipped multi-node script really training on 2 nodes (loopback addresses, 1 CPU rank each, gloo, each node
    with its own TMPDIR): `sbatch --nodes 2 ... STRATEGY` -> the time-limit warning -> every rank checkpoints ->
    requeue, which gets 1 node (a `--nodes 1-2` allocation) -> resume on 1 process -> finish -> export. STRATEGY as the
    README passes it: fsdp (FSDP2: a sharded DCP checkpoint, resharded on load); zero3 and ddp ran here too (see
    above). The losses are an uninterrupted 1-process run's, every
    step is logged once, the export loads, no traceback, no leftover marker. The job's srun signals every process of the
    step (SignalChildrenProcesses=yes): each node's torchrun agent gets the warning too and must survive it (it was a
    single-node job of its own, one SLURM job less for the CI budget)."""
    from transformers import AutoModelForCausalLM

    ref = reference
    run = tmp_path / "run"
    env = {**strategy_env(slurm.env(), strategy), "FAKE_SLURM_LOOPBACK_NODES": "1", "FAKE_SLURM_NODE_TMP": str(tmp_path / "node_tmp"),
           "FAKE_SRUN_SIGNAL_CHILDREN": "1"}
    out = subprocess.run(["sbatch", "--nodes", "2", "--gpus-per-node=1", str(SCRIPT),
                          str(job_config(tiny_cpt_data, tiny_base, tmp_path, "run")), strategy],
                         cwd=slurm.submit_dir, env=env, capture_output=True, text=True, check=True).stdout
    job_id = out.split()[-1]
    # the warning while the ranks start: the first node's rank has printed the mixes, after the process group formed
    # (so both ranks hold SIGUSR1 for their loop). It was sent after 2 logged steps of 12 before cpt held early
    # warnings: under load its relay through sbatch, srun and slurm_node.sh once took longer than the last 10 steps
    job = slurm.wait(job_id, until=lambda j: j["batch_pid"] and "stage 0 cpt-python mix: " in slurm.log(job_id))
    assert not job["done"], slurm.log(job_id)[-5000:]
    assert f"2 node(s) x 1, {strategy}" in slurm.log(job_id)
    (slurm.state / f"job_{job_id}.nodes_next").write_text("1")  # the requeue is allocated one node
    os.kill(job["batch_pid"], signal.SIGUSR1)
    job = slurm.wait(job_id)
    log = slurm.log(job_id)
    assert [(r["restart"], r["requeued"], r["rc"]) for r in job["runs"]] == [(0, True, 0), (1, False, 0)], log[-5000:]
    assert f"1 node(s) x 1, {strategy}" in log and "written by 2 processes, now 1" in log, log[-5000:]
    # (torchrun's agents sync at exit through the store the first node's agent hosts; when it leaves first, the other
    # may log "Error waiting on exit barrier" with a traceback after its ranks finished, exit status still 0: a race
    # in torch's elastic agent, seen once in CI, documented in docs/slurm.md; every other traceback still fails)
    ours = "\n".join(line for line in log.splitlines() if not AGENT_LOG.match(line))
    assert "Traceback" not in ours and "error:" not in ours, ours[:3000]  # (the head of the log: a stand-in's traceback)
    assert "[slurm_node 0] SIGUSR1" in log and "[slurm_node 1] SIGUSR1" in log  # each node's slurm_node.sh relayed it
    assert "h wall on 2 devices)" in log and "h wall on 1 device in this segment" in log  # 2 ranks, then 1

    # the checkpoint resumed from is FSDP2's, written by both ranks: its DCP shards
    from cpt.consolidate import layout

    k = int(log.split("PREEMPTED at step ")[1].split()[0])
    ckpt = run / "checkpoints" / f"step_{k:08d}"
    assert layout(ckpt) == "fsdp" and len(list((ckpt / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
    assert_same_losses(losses(run), ref)
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r]
    assert steps == sorted(set(steps)), steps  # each step once, in order, across the resize
    model = AutoModelForCausalLM.from_pretrained(run / "export")
    assert model.config.vocab_size > 0
    assert not list((tmp_path / "node_tmp").rglob("cpt-*")) and not list(run.glob("*.lock"))


def alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def rank_on_node(job: dict, node: int) -> int:
    """The pid of the (one) rank `accelerate launch` started on node ``node`` of the job (torchrun sets LOCAL_RANK)."""
    import psutil

    def rank(p) -> bool:
        try:
            env = p.environ()
            return "LOCAL_RANK" in env and env.get("SLURM_NODEID") == str(node) and "cpt.cli" in " ".join(p.cmdline())
        except psutil.Error:
            return False

    # (a process the rank forks has its command line and environment: the rank is the one whose parent is not one)
    found = [p.pid for p in psutil.Process(job["supervisor_pid"]).children(recursive=True) if rank(p) and not (p.parent() and rank(p.parent()))]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.timeout(300)
def test_a_rank_killed_on_node_2_ends_the_job_and_a_resubmission_resumes(tiny_cpt_data, tiny_base, tmp_path, slurm,
                                                                       reference):
    """`kill -9` of node 2's rank in a 2-node DDP job (checkpoint.every 3), while node 1's rank would not notice by
    itself (SIGSTOPped: as a rank of an NCCL job can wait in its collective until the timeout, or one working alone):
    node 2's launcher reports the kill and exits 1, and srun's --kill-on-bad-exit=1 ends the rest of the step at that
    first failed task (SIGCONT and SIGTERM to every process of the step, SIGKILL after KillWait; without it the job
    waits forever). The job ends within seconds, is not requeued (a crash would repeat), and its log names what
    happened. The checkpoints on disk verify; the same sbatch command submitted again resumes from the newest and
    finishes with the uninterrupted run's losses, each step logged once."""
    from cpt.checkpoint import list_checkpoints, verify_checkpoint

    run = tmp_path / "run"
    # (a rank still running 8 s after its SIGTERM or its peer's loss writes its threads' stacks: see below)
    cfg = job_config(tiny_cpt_data, tiny_base, tmp_path, "run", checkpoint_every=3, stop_stack_dump_s=8)
    env = {**slurm.env(), "FAKE_SLURM_LOOPBACK_NODES": "1", "FAKE_SLURM_KILL_WAIT": "20"}
    sbatch = ["sbatch", "--nodes", "2", "--gpus-per-node=1", str(SCRIPT), str(cfg), "ddp"]
    job_id = subprocess.run(sbatch, cwd=slurm.submit_dir, env=env, capture_output=True, text=True, check=True).stdout.split()[-1]
    job = slurm.wait(job_id, until=lambda j: (run / "checkpoints" / "step_00000003").is_dir() and len(losses(run)) >= 5)
    assert not job["done"], slurm.log(job_id)[-5000:]
    survivor, victim = rank_on_node(job, 0), rank_on_node(job, 1)
    os.kill(survivor, signal.SIGSTOP)
    t0 = time.time()
    os.kill(victim, signal.SIGKILL)
    job = slurm.wait(job_id, timeout=120)
    ended_after = time.time() - t0
    log = slurm.log(job_id)
    assert ended_after < 45, (ended_after, log[-5000:])  # not a hang, nor train.distributed_timeout_s (1800 s)
    [only] = job["runs"]
    assert only["rc"] != 0 and not only["requeued"], (job["runs"], log[-5000:])  # FAILED, not requeued
    assert not alive(survivor), log[-3000:]  # srun's SIGKILL after KillWait at the latest
    # what happened, in the job's log: node 2's rank killed, its task failed first, srun ended the step, the script
    # said so; node 1's rank (continued by srun, then told to stop) found its peer gone
    assert "Signal 9 (SIGKILL) received by PID" in log, log[-5000:]  # torchrun's summary on node 2
    first_failure = log.index("srun: error: 127.0.0.2: task 1: Exited with exit code 1")
    assert first_failure < log.index(f"srun: Terminating StepId={job_id}.0"), log[-5000:]
    # node 1's rank says why it stops, or, when its collective never noticed the loss (DDP's backward waiting on a
    # gloo all-reduce that never completes: 6 of 80 runs when the rank was stopped inside the step-6 save, as an NCCL
    # rank can wait; it is then SIGKILLed at the end of KillWait), writes where it waits: train.stop_stack_dump_s
    # (8 s here, before KillWait's 20), armed by srun's SIGTERM although the main thread never returns to Python
    if "another rank of this run died during a collective operation" not in log:
        assert "Timeout (0:00:08)!" in log, log[-5000:]
        dump = log[log.index("Timeout (0:00:08)!"):]
        assert 'cpt/train.py", line' in dump and "(most recent call first)" in dump, log[-5000:]
    assert f"srun exited with {only['rc']}" in log and "requeueing" not in log, log[-5000:]
    assert "submit this script again" in log.split(f"srun exited with {only['rc']}")[1], log[-2000:]  # what next

    # the checkpoints on disk are complete and verify; the resubmitted job resumes from the newest
    ckpts = list_checkpoints(run)
    assert ckpts and all(verify_checkpoint(c) is None for c in ckpts), ckpts
    k = int(ckpts[-1].name.split("_")[1])
    job_id2 = subprocess.run(sbatch, cwd=slurm.submit_dir, env=env, capture_output=True, text=True, check=True).stdout.split()[-1]
    job2 = slurm.wait(job_id2)
    log2 = slurm.log(job_id2)
    assert job2["runs"] == [{"restart": 0, "rc": 0, "requeued": False}], log2[-5000:]
    assert f"resumed {ckpts[-1]} at step {k} " in log2, log2[-5000:]
    assert_same_losses(losses(run), reference)
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r]
    assert steps == sorted(set(steps)), steps
    assert (run / "export" / "config.json").is_file() and not list(run.glob("*.lock"))


FAKE_ACCELERATE = '''#!{python}
# a stand-in `accelerate launch`: its rank finishes at once (MODE=finish) or trains RUN s and stops preempted on
# SIGUSR1 (MODE=train); then TEARDOWN s of the agent's shutdown
import os, subprocess, sys, time
if os.environ.get("MODE") == "finish":
    rank = 'import os; open(os.environ["CPT_PREEMPTED_MARKER"], "w").write("finished\\\\n")'
else:
    rank = ('import os, signal, sys, time\\n'
            'def stop(*_):\\n'
            '    open(os.environ["CPT_PREEMPTED_MARKER"], "w").write("preempted\\\\n"); print("rank: PREEMPTED", flush=True); sys.exit(0)\\n'
            'signal.signal(signal.SIGUSR1, stop)\\n'
            'time.sleep(float(os.environ.get("RUN", "8")))\\n'
            'print("rank: finished", flush=True)\\n')
rc = subprocess.run([sys.executable, "-c", rank]).returncode
time.sleep(float(os.environ.get("TEARDOWN", "0.2")))
sys.exit(rc)
'''


def _node_script(tmp_path, env: dict, warn_after: float | None, tools: str | None = None) -> tuple[int, str]:
    """scripts/slurm_node.sh with the stand-in launcher on PATH (``tools``: a folder of the only other commands)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "accelerate").write_text(FAKE_ACCELERATE.format(python=sys.executable))
    (bin_dir / "accelerate").chmod(0o755)
    path = f"{bin_dir}:{tools}" if tools else f"{bin_dir}:{os.environ['PATH']}"
    proc = subprocess.Popen(["/bin/bash", str(ROOT / "scripts" / "slurm_node.sh"), "-m", "x"], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PATH": path, "SLURM_NODEID": "1", **env})
    if warn_after is not None:
        time.sleep(warn_after)
        proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=60)[0]
    return proc.returncode, out


def test_the_node_script_reports_the_launchers_status_and_relays_without_pkill(tmp_path):
    """scripts/slurm_node.sh: (1) a warning as the run finishes, the launcher's teardown outlasting the relay's
    retries: it exited 138 (the status of the `wait` the trap interrupted), so a finished job was reported FAILED;
    (2) on a node without procps (slim images) `pkill` was not found and the warning never reached the ranks, which
    trained on into the time limit; (3) a TMPDIR missing on the node left the marker folder empty (every job on the
    node shared /preempted and /stop-requested). About 10 s."""
    rc, out = _node_script(tmp_path, {"MODE": "finish", "TEARDOWN": "2"}, warn_after=1)
    assert rc == 0, out
    tools = tmp_path / "tools"  # what the script and the stand-in need, without pkill
    tools.mkdir()
    for name in ("bash", "cat", "sleep", "mktemp", "rm", "env", "head", "date"):
        if (found := subprocess.run(["bash", "-c", f"command -v {name}"], capture_output=True, text=True).stdout.strip()):
            (tools / name).symlink_to(found)
    rc, out = _node_script(tmp_path, {"MODE": "train", "RUN": "8"}, warn_after=1.5, tools=str(tools))
    assert rc == 0 and "rank: PREEMPTED" in out and "not found" not in out, out
    rc, out = _node_script(tmp_path, {"MODE": "finish", "TMPDIR": str(tmp_path / "missing")}, warn_after=None)
    assert rc == 2 and "slurm_node.sh: cannot create a folder in" in out, out
