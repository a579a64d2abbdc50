"""Randomised fault soak of a run directory, the way a batch cluster treats a job (run by hand;
tests/test_soak_faults.py runs it small).

A 40-step run with everything on (two stages with replay, held-out evaluation every 4 steps and densely after each
stage switch, EMA and its evaluation, non-blocking checkpoints every 3 steps with keep: 2, periodic and final HF
exports, W&B offline, metrics.jsonl) is started with `cpt train CONFIG --resume` again and again, as the README says,
each start on 1 or 2 CPU processes (DDP on gloo, drawn at random) and interrupted at a seeded random step (and a
random delay after it) by one of:

* kill -9 of every process of the start, or of one rank;
* SIGTERM or SIGUSR1 to the ranks (preemption: a checkpoint, then exit 0), or a second SIGTERM during that save;
* a kill inside a (background) save, at a file boundary the save code names (CPT_FAULT_INJECT, cpt/fileio.py);

and some starts also get a disk-full failure of one save (CPT_FAULT_INJECT enospc:...), a truncated or bit-flipped
file in the newest checkpoint, or a stale run.lock of a dead process, before or during the start. Each start is
checked: it resumed from the newest checkpoint that verifies (or said it starts from scratch), reported a corrupted
checkpoint and took over a stale lock with a warning, a preemption exited 0 with its checkpoint the newest, no
traceback unless a process was killed. When the run has finished, a new run starts in a new directory (every start
interrupts a run in progress), and the finished one is compared with an uninterrupted 1-process run of the config:

* metrics.jsonl: the same records in the same order, each step once (losses, held-out and EMA losses, LR,
  per-source token counts and shares; timing, compute and each start's parameter-count record left out), and the
  exports (export/, export-ema/, exports/step_N): bitwise when every start had 1 process, else within 1e-5
  relative (2 processes sum gradients in another order); `cpt report` gives the same table (1 process);
* checkpoints/: no .tmp-/.trash- leftovers, at most checkpoint.keep checkpoints, no run.lock, no .export tmp folder.

``--slurm-events N`` also runs the run as a job of the shipped scripts/slurm_multinode.sbatch (1 node x 2 CPU ranks)
through the stand-in sbatch/srun/scontrol of tests/fake_slurm.py: N times at a random step SLURM's time-limit warning
(USR1 to the batch shell: checkpoint, requeue) or SIGTERM to srun (the ranks SIGKILLed; the job is submitted again).

    PYTHONPATH=. python scripts/soak_faults.py --root /tmp/cpt-soak --seeds 1 2 3 --cycles 14 [--worlds 1] [--slurm-events 4]

``--strategy fsdp|zero2|zero3`` starts the 2-process starts as the README launches them, `scripts/launch.sh CONFIG
STRATEGY --resume` (FSDP2 on CPU through tests/fsdp_shim, DeepSpeed's CPU accelerator; collectives on gloo), and
the 1-process starts as plain `cpt train`: each requeue may change the world size and so the checkpoint's layout
(DCP shards, ZeRO partitions, a plain checkpoint), and the kills inside a save, the disk-full saves and the
corruptions pick the files and points of the layout being written or read. Without EMA under fsdp and zero3 (an EMA
of sharded weights is refused); the reference is then the uninterrupted 1-process run of that config.

One line per start; every failure is printed with its seed, run and cycle and the start's log (exit 1 if any): the
same seed gives the same faults and steps (the moments depend on the machine's speed). About 6-10 s per 1-process
start and 10-20 s per 2-process start on 2 CPU cores. The one refusal that needs a person (every checkpoint left
broken after the run wrote its final export: README, "move export/ away") ends that run uncompared.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's cpt (the starts get it through PYTHONPATH)
VENV_BIN = Path(sys.executable).parent
STEPS = (20, 20)  # two stages (--stage-steps)
EVERY, KEEP = 3, 2


def env_for(world: int, strategy: str = "ddp") -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT), PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    # (WANDB_SERVICE: a parent's wandb service, e.g. a pytest worker's, would outlive a killed start and hold its run
    # id, refusing the resumed start with "run ID ... is in use"; every start of a batch job has its own)
    for k in ("CPT_FAULT_INJECT", "ACCELERATE_USE_CPU", "SLURM_JOB_ID", "SLURM_RESTART_COUNT", "WANDB_SERVICE"):
        env.pop(k, None)
    if world == 2 and strategy in ("ddp", "fsdp"):  # (not DeepSpeed: it would make it plain DDP)
        env["ACCELERATE_USE_CPU"] = "1"
    if world == 2 and strategy == "fsdp":  # accelerate's real FSDP2 branch on CPU processes (tests/fsdp_on_cpu.py)
        env.update(CPT_TEST_FSDP_ON_CPU="1", PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "fsdp_shim"), str(ROOT)]))
    if world == 2 and strategy != "ddp":  # scripts/launch.sh's number of processes
        env["NUM_GPUS"] = "2"
    return env


def command(world: int, cfg: Path, resume: bool, strategy: str = "ddp") -> list[str]:
    tail = ["-m", "cpt.cli", "train", str(cfg)] + (["--resume"] if resume else [])
    if world == 1:
        return [sys.executable, *tail]
    if strategy != "ddp":  # as the README launches it
        return [str(ROOT / "scripts" / "launch.sh"), str(cfg), strategy] + (["--resume"] if resume else [])
    return [str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", *tail]


# ---------------------------------------------------------------------------------------------- data and config


def prepare_data(root: Path) -> None:
    if (root / "data" / "python" / "manifest.json").is_file():
        return
    from cpt.demo import demo_data

    demo_data(root, "tiny")


def base_model(root: Path) -> Path:
    """A tiny base model (10 steps from scratch on 1 process, its HF export), built once: the sharded strategies' runs
    continue it, as CPT does (a model built from model.arch under ZeRO-3's zero.Init starts from other weights than
    the same seed gives on 1 process: docs/distributed.md)."""
    from cpt.demo import SCALES, cpt_config

    export = root / "base" / "run" / "export"
    if not (export / "config.json").is_file():
        shutil.rmtree(root / "base", ignore_errors=True)
        cfg = cpt_config(root, SCALES["tiny"])
        cfg["run"]["output_dir"] = str(export.parent)
        cfg["train"].update(init_from=None, progress_bar=False)
        cfg["stages"][0]["steps"], cfg["data"]["heldout"] = 10, []
        cfg["eval"], cfg["checkpoint"], cfg["logging"] = {"at_start": False}, {"every": None}, {"plot": False}
        path = root / "base" / "run.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg))
        subprocess.run(command(1, path, False), cwd=path.parent, env=env_for(1), capture_output=True, text=True,
                       check=True)
    return export


def run_config(root: Path, out: Path, strategy: str = "ddp") -> Path:
    from cpt.demo import SCALES, cpt_config

    cfg = cpt_config(root, SCALES["tiny"])
    cfg["run"]["output_dir"] = str(out)
    cfg["train"].update(init_from=None, log_every=1, progress_bar=False, global_batch_size=8, micro_batch_size=2,
                        ema_decay=0.9)
    sched = {"type": "cosine", "max_lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 2, "warmup_from": 0.0}
    cfg["stages"] = [
        {"name": "a", "steps": STEPS[0], "mix": {"python": 0.75, "shakespeare": 0.25}, "schedule": sched},
        {"name": "b", "steps": STEPS[1], "mix": {"python": 0.5, "shakespeare": 0.5}, "schedule": sched},
    ]
    cfg["eval"] = {**cfg["eval"], "every": 4, "dense_steps": 3, "dense_every": 1, "tokens_per_set": 2048, "ema": True}
    cfg["checkpoint"] = {"every": EVERY, "keep": KEEP, "async_save": True, "export_every": 10, "export_at_end": True}
    cfg["logging"] = {"plot": False, "wandb": {"enabled": True, "mode": "offline", "project": "soak"}}
    if strategy in ("fsdp", "zero3"):  # an EMA of sharded weights is refused
        cfg["train"]["ema_decay"], cfg["eval"]["ema"] = None, False
    if strategy != "ddp":  # from a base model (CPT), not model.arch
        cfg["model"] = {"name_or_path": str(base_model(root))}
    path = out.parent / f"{out.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---------------------------------------------------------------------------------------------- observing a run


def logged_step(run: Path) -> int:
    """The last step metrics.jsonl holds a training record for (0: none)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            r = json.loads(line)
            if "train/loss" in r:
                return int(r["step"])
    return 0


def children(pid: int) -> list[int]:
    out = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(k) for k in (task / "children").read_text().split()]
    return out


def ranks_of(proc: subprocess.Popen, world: int) -> list[int]:
    if world == 1:
        return [proc.pid]
    return sorted(k for k in children(proc.pid)
                  if b"cpt.cli" in Path(f"/proc/{k}/cmdline").read_bytes())


def kill_tree(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def newest_committed(run: Path) -> int | None:
    from cpt.checkpoint import list_checkpoints, verify_checkpoint

    for c in reversed(list_checkpoints(run)):
        if verify_checkpoint(c) is None:
            return int(c.name[5:])
    return None


# ---------------------------------------------------------------------------------------------- one cycle


PRE = ["none", "none", "corrupt", "stale_lock"]  # done to the run directory before a start
DURING = ["kill9", "kill9_rank", "kill9_launcher", "term", "usr1", "term_twice", "kill_in_save"]  # during the run


# the documented refusal when every checkpoint failed verification and the run's final export exists (a double fault:
# the corruption of the only checkpoints left after an end that wrote its export): a person decides, the soak moves on
REFUSED = "holds a finished run's export"


def progress(log: Path) -> int:
    """The last step this start printed (``step N/M`` lines: log_every 1, no progress bar)."""
    try:
        found = re.findall(r"^step (\d+)/", log.read_text(errors="replace"), re.M)
    except OSError:
        return 0
    return int(found[-1]) if found else 0


def sharded_files(strategy: str, rank: int) -> list[str]:
    """The files (DCP folders for FSDP2) one rank writes in a 2-process save of ``strategy``, by the names the save
    code's fault points use (cpt/sharded_save.py, cpt/zero_save.py)."""
    if strategy == "fsdp":
        return ["pytorch_model_fsdp_0", "optimizer_0"]
    model = f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" if strategy == "zero3" else "mp_rank_00_model_states.pt"
    files = [f"pytorch_model/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"]  # (fp32: no bf16_ prefix)
    return files + [f"pytorch_model/{model}"] if strategy == "zero3" or rank == 0 else files


class Cycle:
    def __init__(self, rng: random.Random, run: Path, cfg: Path, world: int, pre: str, during: str, enospc: bool,
                 resume: bool, log: Path, strategy: str = "ddp"):
        self.rng, self.run, self.cfg, self.world, self.resume, self.log = rng, run, cfg, world, resume, log
        self.strategy = strategy
        self.sharded = world == 2 and strategy in ("fsdp", "zero2", "zero3")  # this start writes a sharded layout
        self.pre, self.during, self.enospc = pre, during, enospc
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.ranks: list[int] = []

    def before(self) -> dict:
        """Faults applied to the run directory before the start; returns what the start must then do."""
        expect = {"from": newest_committed(self.run)}
        if self.pre == "corrupt" and expect["from"] is not None:
            ckpt = self.run / "checkpoints" / f"step_{expect['from']:08d}"
            victim = self.rng.choice(["model.safetensors", "optimizer.bin", "trainer_state.json", "state.safetensors"])
            if not (ckpt / victim).is_file():  # a sharded layout, or no EMA state: any file its checksums list
                listed = json.loads((ckpt / "CHECKSUMS.json").read_text())["files"]
                victim = self.rng.choice(sorted(f for f in listed if (ckpt / f).is_file() and (ckpt / f).stat().st_size))
            data = (ckpt / victim).read_bytes()
            if self.rng.random() < 0.5:
                (ckpt / victim).write_bytes(data[: len(data) // 2])
                how = "truncated"
            else:
                i = self.rng.randrange(len(data))
                (ckpt / victim).write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
                how = f"flipped byte {i} of"
            self.notes.append(f"{how} {victim} of step {expect['from']}")
            expect["corrupted"] = expect["from"]
            expect["from"] = newest_committed(self.run)
        if self.pre == "stale_lock":
            import socket

            dead = subprocess.Popen(["true"])
            dead.wait()
            self.run.mkdir(parents=True, exist_ok=True)
            (self.run / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                                            "start_time": time.time() - 100, "proc_start": "1"}))
            self.notes.append(f"stale lock of dead pid {dead.pid}")
            expect["stale_lock"] = True
        return expect

    def go(self) -> tuple[int, str]:
        """Start, inject the fault at a random moment, wait for the exit. Returns (rc, log)."""
        expect = self.before()
        env = env_for(self.world, self.strategy)
        start = expect["from"] or 0
        total = sum(STEPS)
        # a step in this segment (the last one: the end, its final save and export)
        target = min(total, start + self.rng.randint(1, 8)) if self.during != "none" else total + 1
        delay = self.rng.uniform(0, 0.3)
        points = []
        saves = [s for s in range(EVERY, total, EVERY) if s > start] + [total]
        if self.enospc:  # a disk-full failure of one save (the run goes on, retries at the next interval)
            s = self.rng.choice(saves)
            if self.sharded:  # one rank's file of the backend's save
                rank = self.rng.randrange(2)
                points.append(f"enospc:{self.rng.choice(sharded_files(self.strategy, rank))}:rank{rank}@{s}")
            else:
                points.append("enospc:" + self.rng.choice([f"optimizer.bin:partial@{s}", f"model.safetensors:partial@{s}",
                                                            f"trainer_state.json:done@{s}"]))
        if self.during == "kill_in_save":  # a kill inside a (background) save's write
            s = self.rng.choice(saves)
            own = "state.safetensors" if self.strategy in ("ddp", "zero2") else "trainer_state.json"  # (no EMA state)
            if self.sharded:  # one rank at the start of one of its backend files, or the main process's steps
                rank = self.rng.randrange(2)
                choices = [f"{f}:rank{rank}@{s}" for f in sharded_files(self.strategy, rank)]
                choices += [f"save_state:rank{rank}@{s}", f"save:shards@{s}", f"save:checksums@{s}",
                            f"{own}:done@{s}", f"save:renamed@{s}", f"save:pruned@{s}", f"save:begin@{s}"]
                if self.strategy != "fsdp":  # DeepSpeed's files are written by cpt/zero_save.py's hashing writer
                    choices.append(f"{sharded_files(self.strategy, rank)[0]}:partial@{s}")
            else:
                choices = [f"optimizer.bin:partial@{s}", f"model.safetensors:partial@{s}", f"save:checksums@{s}",
                           f"{own}:done@{s}", f"save:renamed@{s}", f"save:pruned@{s}", f"save:begin@{s}"]
                if self.world == 2:
                    choices.append(f"random_states_1.pkl:done@{s}")
            points.append(self.rng.choice(choices))
        if points:
            env["CPT_FAULT_INJECT"] = ",".join(points)
            self.notes.append(env["CPT_FAULT_INJECT"])
        expect["start"] = start
        t0 = time.time()
        with open(self.log, "w") as logf:
            proc = subprocess.Popen(command(self.world, self.cfg, self.resume, self.strategy), cwd=self.run.parent, env=env,
                                    stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
            self.fired = False
            try:
                if self.during in ("kill9", "kill9_rank", "kill9_launcher", "term", "usr1", "term_twice"):
                    while proc.poll() is None and progress(self.log) < target:
                        time.sleep(0.02)
                    if proc.poll() is None:
                        time.sleep(delay)
                    if proc.poll() is None:
                        self.fired = True
                        self.notes.append(f"{self.during} after step {progress(self.log)} (target {target} +{delay:.2f}s)")
                        self.inject(proc)
                proc.wait(timeout=600)
            except subprocess.TimeoutExpired:
                kill_tree(proc, signal.SIGKILL)
                proc.wait()
                self.problems.append("hung: killed after 600 s")
            kill_tree(proc, signal.SIGKILL)
            deadline = time.time() + 120  # ranks outliving their launcher (kill9_launcher: saving) end on their own
            while any(Path(f"/proc/{pid}").exists() for pid in self.ranks) and time.time() < deadline:
                time.sleep(0.05)
            for pid in self.ranks:  # nothing of this start outlives it
                if Path(f"/proc/{pid}").exists():
                    self.problems.append(f"rank {pid} still running 120 s after its launcher ended")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        text = self.log.read_text(errors="replace")
        self.check(proc.returncode, text, expect, time.time() - t0)
        return proc.returncode, text

    def inject(self, proc: subprocess.Popen) -> None:
        ranks = self.ranks = ranks_of(proc, self.world)
        if self.during == "kill9":  # every process (torchrun starts its ranks in sessions of their own)
            kill_tree(proc, signal.SIGKILL)
            for pid in ranks:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        elif self.during == "kill9_launcher":  # the ranks are told (PDEATHSIG: SIGTERM): a checkpoint, then exit
            kill_tree(proc, signal.SIGKILL)
        elif self.during == "kill9_rank":
            victim = self.rng.choice(ranks) if ranks else proc.pid
            self.notes.append(f"rank pid {victim} of {ranks}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        else:
            sig = signal.SIGUSR1 if self.during == "usr1" else signal.SIGTERM
            for pid in ranks:  # the ranks, as SLURM's --signal / a scheduler sends it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if self.during == "term_twice":  # a second SIGTERM while the preemption checkpoint is written
                deadline = time.time() + 30
                while proc.poll() is None and time.time() < deadline:
                    if list((self.run / "checkpoints").glob(".tmp-*")):
                        break
                    time.sleep(0.002)
                for pid in ranks:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)

    def check(self, rc: int, text: str, expect: dict, secs: float) -> None:
        p = self.problems
        killed = self.during in ("kill9", "kill9_rank", "kill9_launcher", "kill_in_save")
        if "Traceback" in text and not killed:
            p.append("a traceback in the log")
        if self.resume:
            if expect["start"]:
                want = f"step_{expect['start']:08d} at step {expect['start']} "
                if want not in text:
                    p.append(f"expected to resume from step {expect['start']}; log says: "
                             + "; ".join(re.findall(r"(resumed .*? at step \d+|no complete checkpoint.*|error.*)", text)[:2]))
            elif "no complete checkpoint" not in text:
                p.append("started from scratch without saying so: "
                         + "; ".join(re.findall(r"(resumed .*? at step \d+|error.*)", text)[:2]))
        if expect.get("corrupted") is not None and "is not usable" not in text:
            p.append("the corrupted checkpoint was not reported")
        if expect.get("stale_lock") and "taking over the lock" not in text:
            p.append("the stale lock was not taken over with a warning")
        if self.during == "kill9_launcher" and self.fired:  # its ranks: a checkpoint, then exit (README)
            m = re.search(r"PREEMPTED at step (\d+)", text)
            if m and newest_committed(self.run) != int(m.group(1)):
                p.append(f"ranks preempted at step {m.group(1)} but the newest checkpoint is {newest_committed(self.run)}")
            elif not m and "run directory:" not in text:
                p.append("the ranks of the killed launcher neither checkpointed nor finished")
        preempt = self.during in ("term", "usr1", "term_twice") and self.fired
        if preempt:
            m = re.search(r"PREEMPTED at step (\d+)", text)
            if rc != 0:
                p.append(f"preemption: exit status {rc}")
            elif m and newest_committed(self.run) != int(m.group(1)):
                p.append(f"preempted at step {m.group(1)} but the newest checkpoint is {newest_committed(self.run)}")
            elif not m and "run directory:" not in text:
                p.append("preemption: neither PREEMPTED nor the end of the run")
        if REFUSED in text and "set aside" in text:
            self.notes.append("refused: every checkpoint broken and the final export written (README: move export/ away)")
        elif not killed and not preempt and rc != 0:
            p.append(f"exit status {rc}")
        if self.enospc and re.search(r"checkpoint at step \d+ FAILED", text) and "no space left" not in text.lower():
            p.append("a disk-full save failure not named as such")
        self.notes.append(f"rc={rc} {secs:.0f}s")


# ---------------------------------------------------------------------------------------------- the comparison


IGNORED = re.compile(r"^(perf/|time/|time$|compute/|system/|_)")


def comparable(run: Path) -> list[dict]:
    from cpt.metrics import read_metrics

    out = []
    for r in read_metrics(run / "metrics.jsonl"):
        r = {k: v for k, v in r.items() if not IGNORED.match(k) and not k.startswith("params/")}
        if set(r) - {"step", "train/tokens"}:  # (each start's parameter counts, the end's compute: per segment)
            out.append(r)
    return out


def compare_runs(run: Path, ref: Path, rel: float | None) -> list[str]:
    import math

    import torch
    from safetensors.torch import load_file

    from cpt.checkpoint import list_checkpoints

    problems = []
    got, want = comparable(run), comparable(ref)
    steps = [r["step"] for r in got if "train/loss" in r]
    if steps != sorted(set(steps)) or steps != [r["step"] for r in want if "train/loss" in r]:
        problems.append(f"metrics.jsonl training steps {steps} differ from the reference's")
    if len(got) != len(want):
        problems.append(f"metrics.jsonl has {len(got)} records, the reference {len(want)}")
    for a, b in zip(got, want):
        if set(a) != set(b):
            problems.append(f"step {a.get('step')}: keys differ: {sorted(set(a) ^ set(b))[:6]}")
            break
        for k in b:
            x, y = a[k], b[k]
            # (abs_tol: forgetting/adaptation are differences of two losses, near 0)
            same = x == y if rel is None or not isinstance(y, float) else math.isclose(x, y, rel_tol=rel, abs_tol=rel)
            if not same:
                problems.append(f"step {a.get('step')}: {k} = {x!r}, reference {y!r}")
                break
        if len(problems) > 5:
            break
    for name in ["export", "export-ema", *(f"exports/{p.name}" for p in sorted((ref / "exports").iterdir()))]:
        if not (ref / name).is_dir():
            continue
        if not (run / name).is_dir():
            problems.append(f"{name} missing")
            continue
        a, b = load_file(str(run / name / "model.safetensors")), load_file(str(ref / name / "model.safetensors"))
        for k in b:
            if rel is None and not torch.equal(a[k], b[k]):
                problems.append(f"{name}: {k} differs (max {float((a[k] - b[k]).abs().max()):.2e})")
                break
            if rel is not None and not torch.allclose(a[k], b[k], rtol=rel * 10, atol=1e-6):
                problems.append(f"{name}: {k} differs beyond tolerance (max {float((a[k] - b[k]).abs().max()):.2e})")
                break
    ckroot = run / "checkpoints"
    left = [p.name for p in ckroot.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    if left:
        problems.append(f"leftovers in checkpoints/: {left}")
    if len(list_checkpoints(run)) > KEEP:
        problems.append(f"{len(list_checkpoints(run))} checkpoints kept, checkpoint.keep is {KEEP}")
    if (run / "run.lock").exists():
        problems.append("run.lock left behind")
    if list(run.glob("**/.export*.tmp")):
        problems.append("an .export.tmp left behind")
    extra = sorted({p.name for p in (run / "exports").iterdir()} ^ {p.name for p in (ref / "exports").iterdir()})
    if extra:
        problems.append(f"exports/ differs from the reference's: {extra}")
    return problems


def report_table(run: Path, out: Path) -> str:
    subprocess.run([sys.executable, "-m", "cpt.cli", "report", str(run), "--out", str(out)], env=env_for(1),
                   capture_output=True, text=True, check=True)
    return "\n".join(line for line in (out / "report.html").read_text().splitlines() if "<td" in line)


# ---------------------------------------------------------------------------------------------- main


def soak(root: Path, seed: int, cycles: int, ref: Path, worlds: list[int], strategy: str = "ddp") -> tuple[list[str], int]:
    """``cycles`` faulted starts of the run; whenever it has finished, it is checked against ``ref`` and a new run
    starts in a new directory (so every start interrupts a run in progress). Returns (failures, restarts)."""
    rng = random.Random(seed)
    prefix = "" if strategy == "ddp" else f"{strategy}-"
    if (root / f"{prefix}seed{seed}").exists():
        shutil.rmtree(root / f"{prefix}seed{seed}")
    failures, restarts, i, n = [], 0, 0, 0
    while i < cycles:
        run = root / f"{prefix}seed{seed}" / f"run{n}"
        cfg = run_config(root, run, strategy)
        used, closing = set(), 0
        while True:
            last = i >= cycles  # the closing starts: no fault, the run must finish
            closing += last
            world = rng.choice(worlds)
            pre = rng.choice(PRE) if not last else "none"
            during = rng.choice(DURING) if not last else "none"
            if during in ("kill9_rank", "kill9_launcher") and world == 1:
                during = "kill9"
            enospc = not last and rng.random() < 0.2
            c = Cycle(rng, run, cfg, world, pre, during, enospc, True, root / f"{prefix}seed{seed}" / f"run{n}-cycle{i:02d}.log",
                      strategy)
            rc, text = c.go()
            used.add(world)
            restarts += 1
            print(f"seed {seed} run {n} cycle {i:2d} world {world} {pre:10s} {during:12s} {'; '.join(c.notes)}", flush=True)
            for p in c.problems:
                failures.append(f"seed {seed} run {n} cycle {i} (world {world}, {pre}, {during}: {'; '.join(c.notes)}): "
                                f"{p} [log {c.log}]")
                print("  FAILURE:", failures[-1], flush=True)
            i += 1
            if rc == 0 and "PREEMPTED" not in text and "run directory:" in text:
                break  # finished
            if REFUSED in text:
                break
            if closing >= 3:
                break
        n += 1
        if REFUSED in text:
            print(f"seed {seed} run {n - 1}: refused to start over (documented); not compared", flush=True)
            continue
        if not (run / "export" / "config.json").is_file():
            failures.append(f"seed {seed} run {n - 1}: the run never finished")
            continue
        rel = None if used == {1} else 1e-5
        for p in compare_runs(run, ref, rel):
            failures.append(f"seed {seed} run {n - 1} (worlds {sorted(used)}): {p}")
            print("  FAILURE:", failures[-1], flush=True)
        print(f"seed {seed} run {n - 1}: finished on worlds {sorted(used)}, compared "
              f"{'bitwise' if rel is None else f'within {rel}'}", flush=True)
        if rel is None:
            try:
                if report_table(run, run.parent / f"report{n - 1}") != report_table(ref, root / "ref_report"):
                    failures.append(f"seed {seed} run {n - 1}: cpt report's table differs from the reference's")
            except subprocess.CalledProcessError as e:
                failures.append(f"seed {seed} run {n - 1}: cpt report failed: {e.stderr[-500:]}")
    return failures, restarts


def slurm_soak(root: Path, seed: int, events: int, ref: Path, strategy: str = "ddp") -> tuple[list[str], int]:
    """The same run as a SLURM job of the shipped scripts/slurm_multinode.sbatch (1 node x 2 CPU ranks, DDP) through the
    stand-in sbatch/srun/scontrol of tests/fake_slurm.py: ``events`` times, at a random step, either SLURM's time-limit
    warning (SIGUSR1 to the batch shell: checkpoint, `scontrol requeue`, the job starts again by itself) or a
    preemption without warning / scancel (SIGTERM to srun, which SIGKILLs the ranks: the job ends and is submitted
    again, as a user or PreemptMode=REQUEUE would). Returns (failures, restarts)."""
    import psutil

    rng = random.Random(1000 + seed)
    top = root / (f"slurm{seed}" if strategy == "ddp" else f"slurm-{strategy}{seed}")
    if top.exists():
        shutil.rmtree(top)
    run, bindir, state, submit = top / "run", top / "bin", top / "state", top / "submit"
    for d in (bindir, state, submit):
        d.mkdir(parents=True)
    for name in ("sbatch", "srun", "scontrol"):
        exe = bindir / name
        exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "fake_slurm.py"}" {name} "$@"\n')
        exe.chmod(0o755)
    cfg = run_config(root, run, strategy)
    env = dict(env_for(2, strategy), PATH=os.pathsep.join([str(bindir), str(VENV_BIN), os.environ["PATH"]]),
               FAKE_SLURM_DIR=str(state), CPT_HOME=str(ROOT), MASTER_PORT=str(20000 + rng.randrange(20000)))
    failures, restarts, total = [], 0, sum(STEPS)

    def job(job_id):
        return json.loads((state / f"job_{job_id}.json").read_text())

    def log(job_id):
        p = submit / f"cpt-{job_id}.out"
        return p.read_text(errors="replace") if p.is_file() else ""

    for submission in range(events + 3):
        out = subprocess.run(["sbatch", "--gpus-per-node=2", str(ROOT / "scripts" / "slurm_multinode.sbatch"), str(cfg),
                              strategy], cwd=submit, env=env, capture_output=True, text=True, check=True).stdout
        job_id = out.split()[-1]
        t0 = time.time()
        starts_seen = 0  # an event only once a start newer than the last event's has printed a step
        while not job(job_id)["done"]:
            if time.time() - t0 > 900:
                failures.append(f"slurm seed {seed} job {job_id}: hung")
                break
            if events > 0:
                text = log(job_id)
                starts = re.findall(r"job \d+ start \d+:", text)
                seg = text[text.rfind(starts[-1]):] if starts and len(starts) > starts_seen else ""
                done = [int(x) for x in re.findall(r"^step (\d+)/", seg, re.M)]
                first = done[0] if done else None
                if first is not None and not hasattr(slurm_soak, "_target"):
                    slurm_soak._target = min(total, first + rng.randint(0, 8))
                if first is not None and done[-1] >= slurm_soak._target:
                    time.sleep(rng.uniform(0, 0.5))
                    kind = rng.choice(["usr1", "usr1", "term_srun"])
                    j = job(job_id)
                    if kind == "usr1" and j.get("batch_pid"):
                        os.kill(j["batch_pid"], signal.SIGUSR1)
                    else:
                        with contextlib.suppress(psutil.Error):
                            for p in psutil.Process(j["supervisor_pid"]).children(recursive=True):
                                if "srun" in " ".join(p.cmdline()[:3]):
                                    p.send_signal(signal.SIGTERM)
                    print(f"slurm seed {seed} job {job_id}: {kind} after step {done[-1]}", flush=True)
                    starts_seen = len(starts)
                    events -= 1
                    del slurm_soak._target
                    # wait for this start to end before the next event
                    while not job(job_id)["done"] and len(job(job_id)["runs"]) == len(j["runs"]):
                        time.sleep(0.1)
                    restarts += 1
            time.sleep(0.1)
        text = log(job_id)
        if (run / "export" / "config.json").is_file() and events <= 0 and job(job_id)["runs"][-1]["rc"] == 0 \
                and f"step {total}/{total}" in text:
            break
    print(f"slurm seed {seed}: {restarts} restarts", flush=True)
    if not (run / "export" / "config.json").is_file():
        return failures + [f"slurm seed {seed}: the run never finished"], restarts
    for p in compare_runs(run, ref, 1e-5):
        failures.append(f"slurm seed {seed}: {p}")
    return failures, restarts


def main() -> int:
    global STEPS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("/tmp/cpt-soak"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--cycles", type=int, default=12, help="faulted starts per seed (then up to 3 clean ones)")
    ap.add_argument("--slurm-events", type=int, default=0, help="per seed, also run the job through the shipped SLURM "
                    "script (fake sbatch/srun/scontrol) with this many warnings/kills")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="numbers of processes to draw from")
    ap.add_argument("--stage-steps", type=int, nargs=2, default=[20, 20], metavar=("A", "B"),
                    help="the two stages' lengths (default 20 20; tests/test_soak_faults.py runs 8 8)")
    ap.add_argument("--strategy", choices=["ddp", "fsdp", "zero2", "zero3"], default="ddp",
                    help="how the 2-process starts (and the SLURM job) run: ddp (accelerate launch --multi_gpu, "
                    "the default) or `scripts/launch.sh CONFIG STRATEGY`")
    args = ap.parse_args()
    STEPS = tuple(args.stage_steps)
    root = args.root.absolute()
    root.mkdir(parents=True, exist_ok=True)
    prepare_data(root)
    ref = root / f"reference-{STEPS[0]}-{STEPS[1]}{'' if args.strategy == 'ddp' else '-' + args.strategy}" / "run"
    if not (ref / "export" / "config.json").is_file():
        shutil.rmtree(ref.parent, ignore_errors=True)
        cfg = run_config(root, ref, args.strategy)
        done = subprocess.run(command(1, cfg, False), cwd=ref.parent, env=env_for(1), capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-3000:])
            return 2
    failures, restarts = [], 0
    for seed in args.seeds:
        got, n = soak(root, seed, args.cycles, ref, args.worlds, args.strategy) if args.cycles else ([], 0)
        failures += got
        restarts += n
        if args.slurm_events:
            got, n = slurm_soak(root, seed, args.slurm_events, ref, args.strategy)
            failures += got
            restarts += n
    print(f"\n{restarts} restarts over seeds {args.seeds}; {len(failures)} failure(s)")
    for f in failures:
        print(" -", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
