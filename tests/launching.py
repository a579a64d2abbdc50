"""2 CPU processes (gloo) launched the same way for every test file, and what the tests that compare a 2-process
`cpt train` with 1 process share (tests/test_train_distributed.py launches with accelerate's flags,
tests/test_launch_shipped.py through the shipped scripts): the ranks' environment, the 2-process run config, the
run's metrics, the comparison with the 1-process run and the preemption of both ranks."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import yaml

from conftest import tiny_run_config

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# fp32, and the same data every step whatever the world size: 2 processes differ from 1 only in the order of
# floating-point sums (measured ~1e-7 relative); tests/test_train_distributed.py explains the margin.
REL = 1e-5


def rank_env(*, cpu: bool, fsdp_on_cpu: bool = False) -> dict[str, str]:
    """Environment for processes started by `accelerate launch` on this machine: one thread each, no GPU visible,
    unbuffered output, this checkout's cpt and tests/ importable, DeepSpeed's JIT ops built once.

    ``cpu`` sets ACCELERATE_USE_CPU=1 (multi-CPU DDP, FSDP on CPU; never for DeepSpeed, which it would silently turn
    into plain DDP). ``fsdp_on_cpu`` puts tests/fsdp_shim first on PYTHONPATH: every rank (an unmodified `cpt train`
    or script) then takes accelerate's real FSDP2 branch on gloo, as tests/fsdp_on_cpu.py explains.
    """
    path = [str(ROOT), str(ROOT / "tests")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="",
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(VENV_BIN.parent / "torch_extensions"))
    for k in ("ACCELERATE_USE_CPU", "CPT_TEST_FSDP_ON_CPU", "ACCELERATE_MIXED_PRECISION"):
        env.pop(k, None)
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    if fsdp_on_cpu:
        env["CPT_TEST_FSDP_ON_CPU"] = "1"
        path.insert(0, str(ROOT / "tests" / "fsdp_shim"))
    env["PYTHONPATH"] = os.pathsep.join(path)
    return env


# accelerate picks a free port for the ranks' rendezvous (default: 29500), so launches of tests running side by side
# (several checkouts, pytest-xdist) never meet on one port
FREE_PORT = ["--main_process_port", "0"]


def accelerate_launch(mode: str) -> tuple[list[str], dict[str, str]]:
    """Command prefix (to which the script and its arguments are appended) and environment for ``mode``:

    * ``ddp``: ACCELERATE_USE_CPU=1 + --multi_gpu (multi-CPU DDP);
    * ``zero3``: DeepSpeed ZeRO-3, without ACCELERATE_USE_CPU (which would silently turn it into plain DDP);
    * ``fsdp``: FSDP2 on CPU through accelerate's real FSDP branch; the script must call
      ``fsdp_on_cpu.force_fsdp_on_cpu()`` before building its Accelerator (tests/ is on PYTHONPATH).
    """
    args = [str(VENV_BIN / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", *FREE_PORT]
    if mode == "zero3":
        args += ["--use_deepspeed", "--zero_stage", "3", "--gradient_accumulation_steps", "1"]
    elif mode == "fsdp":
        args += ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"]
    elif mode == "ddp":
        args += ["--multi_gpu"]
    else:
        raise ValueError(f"unknown launch mode {mode!r}")
    return args, rank_env(cpu=mode in ("ddp", "fsdp"))


# ------------------------------------------------------------------ `cpt train` on 2 processes against 1 process


def two_process_config(tiny_cpt_data: Path, base: Path, out: Path, *, steps: int, eval_every: int, checkpoint: dict,
                       lora: bool = False, weight_decay: float = 0.1) -> dict:
    """A run of ``steps`` steps of 8 sequences from the tiny base model (2 micro-batches of 2 per rank on 2 ranks,
    4 micro-batches on 1), evaluated every ``eval_every`` steps: the same data and updates on 1 or 2 processes."""
    cfg = tiny_run_config(tiny_cpt_data, out, eval={"every": eval_every, "dense_steps": 0}, checkpoint=checkpoint)
    cfg["model"] = {"name_or_path": str(base)}
    if lora:
        cfg["model"]["lora"] = {"r": 8, "alpha": 16}
    cfg["stages"][0]["steps"] = steps
    cfg["train"].update(global_batch_size=8, micro_batch_size=2)
    cfg["optim"]["weight_decay"] = weight_decay
    return cfg


def runs_once(tmp_path_factory, run: Callable[[str, Path], object]) -> Callable[[str], Path]:
    """A module fixture's ``get(strategy)``: ``run(strategy, folder)`` launches the strategy's run into
    ``folder / "run"`` on first use; later calls return that run directory (shared by the module's tests)."""
    cache: dict[str, Path] = {}

    def get(strategy: str) -> Path:
        if strategy not in cache:
            d = tmp_path_factory.mktemp(strategy)
            run(strategy, d)
            cache[strategy] = d / "run"
        return cache[strategy]

    return get


def write_config(cfg: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(cmd: list[str], cwd: Path, env: dict[str, str], new_session: bool = False) -> subprocess.Popen:
    """The launcher, its ranks' output merged into one text stream; ``new_session``: in a process group of its own (as
    a job's), so that a test can signal the whole group."""
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=new_session)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    """Exit status and output of a started launch (killed past ``timeout`` seconds, as subprocess.run does)."""
    try:
        out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, out


def records(run_dir) -> list[dict]:
    from cpt.metrics import read_metrics

    return read_metrics(Path(run_dir) / "metrics.jsonl")


def losses(run_dir) -> dict[int, float]:
    """step -> training loss (empty while the run has logged nothing)."""
    if not (Path(run_dir) / "metrics.jsonl").is_file():
        return {}
    return {r["step"]: r["train/loss"] for r in records(run_dir) if "train/loss" in r}


def evals(run_dir, name: str = "python", prefix: str = "") -> dict[int, float]:
    """step -> held-out loss of set ``name`` (``prefix="ema/"``: of the EMA weights)."""
    key = f"{prefix}eval/{name}/loss"
    return {r["step"]: r[key] for r in records(run_dir) if key in r}


def after(run_dir, step: int, of=losses) -> dict[int, float]:
    """``of(run_dir)`` (losses, evals) past ``step``: what a run resumed at ``step`` logs again."""
    return {k: v for k, v in of(run_dir).items() if k > step}


def world_sizes(run_dir) -> set[int]:
    """perf/tokens_per_s is the total, perf/tokens_per_s_per_device the total / accelerator.num_processes."""
    return {round(r["perf/tokens_per_s"] / r["perf/tokens_per_s_per_device"]) for r in records(run_dir) if "perf/tokens_per_s" in r}


def assert_close(got: dict, ref: dict, rel: float = REL) -> None:
    """The same steps, each value within ``rel`` (a comparison of nothing fails)."""
    assert ref, "nothing to compare: the reference logged no values"
    assert sorted(got) == sorted(ref), (sorted(got), sorted(ref))
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=rel), (k, got[k], ref[k])


def rank_pids(launcher: int) -> list[int]:
    """The ranks: children of the `accelerate launch` process (a launch script execs it) that run cpt."""
    kids = []
    for task in Path(f"/proc/{launcher}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return sorted(k for k in kids if "cpt.cli" in Path(f"/proc/{k}/cmdline").read_bytes().decode(errors="replace"))


def preempt(proc: subprocess.Popen, ready, timeout: float = 300) -> str:
    """Once ``ready()``, SIGTERM both ranks (as a cluster scheduler does); the launcher's output after every rank
    wrote its preemption checkpoint and the launch exited cleanly."""
    t0 = time.time()
    while not ready():
        assert proc.poll() is None, proc.stdout.read()[-5000:]
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)
    ranks = rank_pids(proc.pid)
    assert len(ranks) == 2, ranks
    for pid in ranks:
        os.kill(pid, signal.SIGTERM)
    try:
        log = proc.communicate(timeout=300)[0]
    except subprocess.TimeoutExpired:  # a hung exit: kill the ranks and the launcher, so nothing outlives the test
        for pid in [*ranks, proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        pytest.fail("the preempted launch did not exit within 300 s:\n" + proc.communicate()[0][-5000:])
    assert proc.returncode == 0 and "preemption" in log, log[-5000:]
    return log
