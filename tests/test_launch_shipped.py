"""The shipped launchers as the README tells users to run them, on 2 CPU processes, and checkpoints that move
between world sizes and backends.

* Every `configs/accelerate/*.yaml` is launched through `scripts/launch.sh` or `scripts/launch_deepspeed.sh`
  (command line unchanged; NUM_GPUS=2 is the scripts' documented process count, and the CPU-only environment —
  ACCELERATE_USE_CPU=1 for DDP/FSDP, tests/fsdp_shim for FSDP2 on gloo — is set around them): a 6-step tiny run
  gives the per-step and held-out losses of a 1-process run (1e-5 relative, as tests/test_train_distributed.py
  explains), writes the periodic and final HF exports (ZeRO-3 and FSDP gather them without extra flags) and a
  tokenizer any transformers >= 4.56 loads.
* Resume across world sizes: a 2-process checkpoint (DDP, FSDP2, ZeRO-2, ZeRO-3) resumes on 1 process, and a
  1-process checkpoint resumes under FSDP2 and ZeRO-3 (into another backend's format); steps 4..6 give the uninterrupted run's losses
  (weights and Adam moments carried over: a reset optimizer moves the step-4 loss by ~1e-2).
* `cpt export` turns every kind of checkpoint into an HF model that reproduces the logged held-out loss.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cpt.config import load_config
from cpt.samples import read_samples
from launching import ROOT, after, assert_close, evals, finish, losses, preempt, rank_env, start, two_process_config, world_sizes
from launching import runs_once
from launching import write_config as write

pytestmark = pytest.mark.slow

STEPS, EVERY = 6, 3

# strategy -> the README's command (after `scripts/`): every shipped accelerate config, both scripts
SHIPPED = {
    "ddp": ["launch.sh", "ddp"],
    "fsdp": ["launch.sh", "fsdp"],
    "zero2": ["launch.sh", "zero2"],
    "zero3": ["launch.sh", "zero3"],
    "zero2_offload": ["launch_deepspeed.sh", "2", "offload"],
    "zero3_offload": ["launch_deepspeed.sh", "3", "offload"],
}


def test_every_shipped_accelerate_config_is_launched():
    assert {p.stem for p in (ROOT / "configs" / "accelerate").glob("*.yaml")} == set(SHIPPED)


def test_launchers_take_a_cpt_option_for_the_strategy_and_name_a_wrong_one(tmp_path):
    """`scripts/launch.sh run.yaml --resume` (the strategy left out) launched accelerate with configs/accelerate/--resume.yaml,
    and a misspelt strategy (`fdsp`) or ZeRO stage (`4`), ended in accelerate's traceback. Now the option goes to
    `cpt train` with the default strategy, and a wrong one is one line, exit 2. A recording stand-in for accelerate."""
    import os
    import sys

    (tmp_path / "accelerate").write_text(f"#!{sys.executable}\nimport sys\nprint(' '.join(sys.argv[1:]))\n")
    (tmp_path / "accelerate").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "NUM_GPUS": "2"}

    def run(script, *args):
        p = subprocess.run([str(ROOT / "scripts" / script), "run.yaml", *args], env=env, capture_output=True, text=True)
        return p.returncode, p.stdout.strip(), p.stderr.strip()

    rc, out, _ = run("launch.sh", "--resume", "--set", "x=1")
    assert rc == 0 and "configs/accelerate/ddp.yaml" in out and out.endswith("train run.yaml --resume --set x=1"), out
    rc, out, _ = run("launch_deepspeed.sh", "--resume")
    assert rc == 0 and "deepspeed/zero2.json" in out and out.endswith("train run.yaml --resume"), out
    assert run("launch.sh", "fdsp") == (2, "", "scripts/launch.sh: unknown strategy 'fdsp' (one of: "
                                             + " ".join(sorted(SHIPPED)) + ")")
    rc, out, err = run("launch_deepspeed.sh", "4")
    assert rc == 2 and out == "" and err.startswith("scripts/launch_deepspeed.sh: the ZeRO stage is 2 or 3, not '4'")
    rc, out, err = run("launch_deepspeed.sh", "3", "offlaod", "--resume")  # (was passed on to every rank's cpt train)
    assert rc == 2 and out == "" and err.startswith("scripts/launch_deepspeed.sh: after the ZeRO stage comes offload or "
                                                    "a cpt train option (--...), not 'offlaod'")
    rc, out, _ = run("launch_deepspeed.sh", "3", "offload", "--resume")
    assert rc == 0 and "deepspeed/zero3_offload.json" in out and out.endswith("train run.yaml --resume"), out


def launch_shipped(strategy: str, cfg_path: Path, *extra: str):
    """The README's command line, started (NUM_GPUS=2: the scripts' documented process count)."""
    script, *args = SHIPPED[strategy]
    env = {**rank_env(cpu=strategy in ("ddp", "fsdp"), fsdp_on_cpu=strategy == "fsdp"), "NUM_GPUS": "2"}
    return start([str(ROOT / "scripts" / script), str(cfg_path), *args, *extra], cfg_path.parent, env)


def run_shipped(strategy: str, cfg_path: Path, *extra: str) -> tuple[int, str]:
    return finish(launch_shipped(strategy, cfg_path, *extra))


def make_cfg(tiny_cpt_data, base, out: Path, lora=False) -> dict:
    """6 steps of 8 sequences; checkpoint, export and eval (with two text samples) every 3."""
    cfg = two_process_config(tiny_cpt_data, base, out, steps=STEPS, eval_every=EVERY, lora=lora,
                             checkpoint={"every": EVERY, "keep": 5, "export_every": EVERY},
                             weight_decay=0.0 if lora else 0.1)
    cfg["eval"]["samples"] = {"prompts": ["def main():", "KING:"], "max_new_tokens": 8}
    return cfg


def branch_from(ckpt: Path, cfg: dict, out: Path) -> dict:
    """A new run directory holding only ``ckpt`` (as if the run had been stopped there), and its config."""
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, out / "checkpoints" / ckpt.name)
    return {**cfg, "run": {**cfg["run"], "output_dir": str(out)}}


def heldout_losses(model, tok, cfg, tiny_cpt_data) -> dict[str, float]:
    from cpt.data.loader import load_heldout
    from cpt.data.sources import HeldoutConfig
    from cpt.evaluate import heldout_loss

    out = {}
    for name in ("python", "shakespeare"):
        h = HeldoutConfig(name=name, path=str(tiny_cpt_data / "data" / name / "heldout"), tag="upstream")
        out[name] = heldout_loss(model, load_heldout(h, tok, cfg["data"]["seq_len"], cfg["eval"]["tokens_per_set"]), 16)
    return out


def assert_hf_dir_reproduces_eval(model_dir: Path, run_dir: Path, cfg: dict, tiny_cpt_data: Path, step: int) -> None:
    """Plain transformers loads the directory and gets the run's logged held-out losses at ``step``; the tokenizer
    names a class transformers 4.x has (transformers 5's TokenizersBackend is not one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert json.loads((model_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    for name, loss in heldout_losses(model, tok, cfg, tiny_cpt_data).items():
        assert loss == pytest.approx(evals(run_dir, name)[step], abs=1e-5), (model_dir, name)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def reference(tiny_cpt_data, tiny_base, tmp_path_factory):
    """The 1-process run (in-process), with its checkpoints at steps 3 and 6."""
    from cpt.train import train

    out = tmp_path_factory.mktemp("one") / "run"
    train(load_config(base=make_cfg(tiny_cpt_data, tiny_base, out)), echo=lambda *a, **k: None)
    assert world_sizes(out) == {1}
    return out


@pytest.fixture(scope="module")
def shipped(tiny_cpt_data, tiny_base, tmp_path_factory):
    """Each shipped launch, run once (on first use) and shared by the tests below."""

    def run(strategy: str, d: Path) -> None:
        rc, log = run_shipped(strategy, write(make_cfg(tiny_cpt_data, tiny_base, d / "run"), d / "run.yaml"))
        assert rc == 0, log[-5000:]

    return runs_once(tmp_path_factory, run)


# ------------------------------------------------------------------------------------------ the shipped launchers


@pytest.mark.parametrize("strategy", list(SHIPPED))
def test_shipped_launch_matches_one_process(strategy, shipped, reference, tiny_cpt_data, tiny_base):
    out = shipped(strategy)
    cfg = make_cfg(tiny_cpt_data, tiny_base, out)
    assert world_sizes(out) == {2}
    assert_close(losses(out), losses(reference))
    assert_close(evals(out), evals(reference))
    # eval.samples: generated by every rank (FSDP2, ZeRO-3: the sharded weights gathered in step), written once
    got, want = read_samples(out), read_samples(reference)
    assert [(r["step"], r["prompt"]) for r in got] == [(r["step"], r["prompt"]) for r in want] and len(got) == 6
    assert [r["completion"] for r in got] == [r["completion"] for r in want], (got, want)
    assert_hf_dir_reproduces_eval(out / "exports" / f"step_{EVERY:08d}", out, cfg, tiny_cpt_data, EVERY)
    assert_hf_dir_reproduces_eval(out / "export", out, cfg, tiny_cpt_data, STEPS)
    # the trainable layout a resume compares before anything loads (cpt/checkpoint.py) is the same whatever the
    # strategy: a change of the trainable set is refused alike under each (tests/test_train_distributed.py: FSDP2)
    layout = [run / "checkpoints" / f"step_{EVERY:08d}" / "trainable.json" for run in (out, reference)]
    assert layout[0].read_text() == layout[1].read_text()


# ------------------------------------------------------------------------------------------ world-size portability

PORTABLE = ["ddp", "fsdp", "zero2", "zero3"]


@pytest.mark.parametrize("strategy", PORTABLE)
def test_two_process_checkpoint_resumes_on_one(strategy, shipped, tiny_cpt_data, tiny_base, tmp_path):
    """Written by 2 ranks at step 3, resumed by 1 process: steps 4..6 and the final export match the 2-rank run."""
    from cpt.train import train

    two = shipped(strategy)
    cfg = branch_from(two / "checkpoints" / f"step_{EVERY:08d}", make_cfg(tiny_cpt_data, tiny_base, two), tmp_path / "run")
    said = []
    result = train(load_config(base=cfg), resume=True, echo=lambda *a, **k: said.append(" ".join(map(str, a))))
    assert result.step == STEPS
    out = tmp_path / "run"
    assert world_sizes(out) == {1}
    assert any("; written by 2 processes, now 1: each process accumulates" in line for line in said), said  # said
    assert_close(losses(out), after(two, EVERY))
    assert_close(evals(out), after(two, EVERY, of=evals))
    assert_hf_dir_reproduces_eval(out / "export", two, cfg, tiny_cpt_data, STEPS)


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_one_process_checkpoint_resumes_on_two(strategy, reference, tiny_cpt_data, tiny_base, tmp_path):
    """Written by 1 process at step 3, resumed with the shipped 2-process launcher and --resume: into FSDP2's shards
    and ZeRO-3's partitions (a plain checkpoint into another backend), past a newer checkpoint that rank 1 finds broken.
    DDP (the same full-state load as on one process) and ZeRO-2 (the same conversion as ZeRO-3's) are not launched here,
    for the CI budget; a 2-node DDP job requeued on one node: tests/test_slurm.py."""
    from cpt.checkpoint_dir import CHECKSUMS, reader_share

    cfg = branch_from(reference / "checkpoints" / f"step_{EVERY:08d}", make_cfg(tiny_cpt_data, tiny_base, reference),
                      tmp_path / "run")
    # and a newer checkpoint with a flipped byte in a file that rank 1 reads when the ranks verify it (their shares of
    # the reading, cpt.resume.SharedCheck): the ranks agree that it is broken, set it aside and resume step 3
    out, broken = tmp_path / "run", f"step_{STEPS:08d}"
    shutil.copytree(reference / "checkpoints" / broken, out / "checkpoints" / broken)
    files = json.loads((out / "checkpoints" / broken / CHECKSUMS).read_text())["files"]
    victim = reader_share(files, 1, 2)[0]
    data = bytearray((out / "checkpoints" / broken / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "checkpoints" / broken / victim).write_bytes(bytes(data))
    rc, log = run_shipped(strategy, write(cfg, tmp_path / "run.yaml"), "--resume")
    assert rc == 0 and "; written by 1 process, now 2: each process accumulates" in log, log[-5000:]
    assert log.count(f"{broken} is not usable ({victim} checksum mismatch (corrupt))") == 1, log[-5000:]
    assert re.search(rf"checkpoint step_{EVERY:08d} verified: \d+ files, [\d.]+ GB in [\d.]+ s, 2 processes sharing the "
                     "reading", log), log[-5000:]
    assert (out / "checkpoints" / f"unusable-{broken}").is_dir()
    assert world_sizes(out) == {2}
    assert_close(losses(out), after(reference, EVERY))
    assert_close(evals(out), after(reference, EVERY, of=evals))


# ------------------------------------------------------------------------------------------ cpt export


@pytest.mark.parametrize("strategy", ["one", "ddp", "fsdp", "zero2", "zero3"])
def test_cpt_export_of_every_checkpoint_kind(strategy, shipped, reference, tiny_cpt_data, tiny_base, tmp_path):
    """`cpt export RUN_DIR --out DIR` (the newest checkpoint, step 6) on one CPU process, whatever wrote it."""
    from cpt.cli import main

    run = reference if strategy == "one" else shipped(strategy)
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert_hf_dir_reproduces_eval(tmp_path / "hf", run, make_cfg(tiny_cpt_data, tiny_base, run), tiny_cpt_data, STEPS)


@pytest.mark.parametrize("strategy", ["fsdp", "zero2", "zero3"])
def test_the_fault_soaks_file_names_are_those_a_sharded_save_writes(strategy, shipped):
    """scripts/soak_faults.py --strategy (run by hand) kills a rank or fails its disk at the start of one of its
    files, named as the save code's fault points name them (cpt/sharded_save.py, cpt/zero_save.py): a name that no
    save writes would be a fault that never fires, silently. (No launch: the shipped runs' step-3 checkpoints.)"""
    import importlib.util

    spec = importlib.util.spec_from_file_location("soak_faults", ROOT / "scripts" / "soak_faults.py")
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    ckpt = shipped(strategy) / "checkpoints" / f"step_{EVERY:08d}"
    written = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*")}
    for rank in (0, 1):
        names = soak.sharded_files(strategy, rank)
        assert names and set(names) <= written, (strategy, rank, names, sorted(written))


def test_zero3_preempted_resumes_on_one_process_and_exports(shipped, tiny_cpt_data, tiny_base, tmp_path):
    """The issue's acceptance run: `scripts/launch.sh run.yaml zero3` on 2 processes, SIGTERM to the ranks after
    their first checkpoint; `cpt train --resume` on 1 process finishes with the uninterrupted run's losses and an HF
    export; `cpt export` turns the preemption checkpoint into a model AutoModelForCausalLM loads."""
    from cpt.cli import main
    from cpt.train import train

    reference = shipped("zero3")
    cfg = make_cfg(tiny_cpt_data, tiny_base, tmp_path / "run")
    cfg["checkpoint"]["export_every"] = None
    cfg_path = write(cfg, tmp_path / "run.yaml")
    out = tmp_path / "run"
    preempt(launch_shipped("zero3", cfg_path), (out / "checkpoints" / f"step_{EVERY:08d}").is_dir, timeout=400)
    preempted = sorted((out / "checkpoints").glob("step_*"))[-1]
    k = int(preempted.name[5:])
    assert EVERY <= k < STEPS and not (out / "export").exists()

    assert main(["export", str(preempted), "--out", str(tmp_path / "hf")]) == 0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    if k in evals(reference):
        assert_hf_dir_reproduces_eval(tmp_path / "hf", reference, cfg, tiny_cpt_data, k)

    result = train(load_config(str(cfg_path)), resume=True, echo=lambda *a, **k: None)
    assert result.step == STEPS
    assert_close({s: v for s, v in losses(out).items() if s > k}, {s: v for s, v in losses(reference).items() if s > k})
    assert_hf_dir_reproduces_eval(out / "export", reference, cfg, tiny_cpt_data, STEPS)


def test_zero3_checkpoint_resumes_on_three_processes(tiny_cpt_data, tiny_base, tmp_path):
    """ZeRO on N -> ZeRO on M end to end, with an M that does not divide the parameters' sizes: a 2-process ZeRO-3
    checkpoint (step 3) resumed by `scripts/launch.sh run.yaml zero3 --resume` on 3 processes, whose last rank's
    partitions end in padding (DeepSpeed's own `set_full_hp_param` read past the values there and the resume
    crashed). Steps 4..6 and the held-out losses equal the 2-process run's; the 3-rank step-6 checkpoint, merged,
    holds the 2-rank one's weights and Adam moments; `cpt export` of it reproduces the logged held-out losses.
    The 2-process run also fits its micro-batch (4 -> 3) to its world size, as a requeued job does."""
    import torch

    from cpt.cli import main
    from cpt.consolidate import read_model_state, read_optimizer_state

    def cfg_for(out):
        cfg = make_cfg(tiny_cpt_data, tiny_base, out)
        cfg["checkpoint"]["export_every"] = None
        # micro-batch 4 does not split the 6 rows of each of 2 ranks: that run uses 3 (one micro-batch of 4 on 3 ranks)
        cfg["train"].update(global_batch_size=12, micro_batch_size=4)
        return cfg

    two, three = tmp_path / "two", tmp_path / "three"
    rc, log = run_shipped("zero3", write(cfg_for(two), tmp_path / "two.yaml"))
    assert rc == 0, log[-5000:]
    assert "train.micro_batch_size 4 does not split train.global_batch_size 12 evenly over 2 processes: using 3" in log
    cfg = branch_from(two / "checkpoints" / f"step_{EVERY:08d}", cfg_for(two), three)
    env = {**rank_env(cpu=False), "NUM_GPUS": "3"}
    rc, log = finish(start([str(ROOT / "scripts" / "launch.sh"), str(write(cfg, tmp_path / "three.yaml")), "zero3",
                            "--resume"], tmp_path, env))
    assert rc == 0 and "resumed" in log, log[-5000:]
    assert world_sizes(three) == {3}
    assert_close(losses(three), after(two, EVERY))
    assert_close(evals(three), after(two, EVERY, of=evals))

    last = f"step_{STEPS:08d}"
    a, b = read_model_state(two / "checkpoints" / last), read_model_state(three / "checkpoints" / last)
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)
    a, b = read_optimizer_state(two / "checkpoints" / last), read_optimizer_state(three / "checkpoints" / last)
    assert sorted(a) == sorted(b)
    for name in a:
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(b[name][k], a[name][k], rtol=1e-3, atol=1e-9)
    assert main(["export", str(three), "--out", str(tmp_path / "hf")]) == 0
    assert_hf_dir_reproduces_eval(tmp_path / "hf", three, cfg, tiny_cpt_data, STEPS)


def ddp_launch_training(cfg: dict, tmp_path: Path):
    """`scripts/launch.sh run.yaml ddp` started on ``cfg`` and waited for until it has logged 2 steps: the launcher's
    process and its 2 ranks' pids."""
    import time

    from launching import rank_pids

    proc = launch_shipped("ddp", write(cfg, tmp_path / "run.yaml"))
    t0 = time.time()
    while len(losses(cfg["run"]["output_dir"])) < 2:
        assert proc.poll() is None and time.time() - t0 < 300, proc.stdout.read()[-5000:]
        time.sleep(0.05)
    ranks = rank_pids(proc.pid)
    assert len(ranks) == 2, ranks
    return proc, ranks


def test_ranks_of_a_launcher_killed_with_sigkill_checkpoint_and_stop(tiny_cpt_data, tiny_base, tmp_path):
    """`kill -9` of `scripts/launch.sh ... ddp` (the `accelerate launch` process it execs; also `timeout -s KILL`, a
    killed process group): torchrun starts its ranks in sessions of their own, so they used to train on, detached,
    to the end of the run, holding the run lock. Now each rank gets SIGTERM when its launcher dies (cpt.cli:
    PR_SET_PDEATHSIG) and stops as on a preemption: a checkpoint at the step where they stopped, the lock released.
    About 20 s."""
    import os
    import signal

    from cpt.checkpoint import list_checkpoints, verify_checkpoint

    out = tmp_path / "run"
    cfg = two_process_config(tiny_cpt_data, tiny_base, out, steps=400, eval_every=400, checkpoint={"every": 200})
    proc, ranks = ddp_launch_training(cfg, tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    try:
        log = proc.communicate(timeout=120)[0]  # the pipe closes once the ranks have exited too
    except subprocess.TimeoutExpired:
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the ranks trained on after their launcher was killed (step {max(losses(out))} of 400)")
    stopped = max(losses(out))
    assert stopped < 400 and f"PREEMPTED at step {stopped} of 400" in log, log[-5000:]
    assert [p.name for p in list_checkpoints(out)] == [f"step_{stopped:08d}"]
    assert verify_checkpoint(list_checkpoints(out)[0]) is None and not (out / "run.lock").exists()


def test_a_hung_rank_fails_the_run_after_train_distributed_timeout_s(tiny_cpt_data, tiny_base, tmp_path):
    """A rank that stops answering (a hung node: SIGSTOP here) must not keep the others waiting in a collective for
    torch's default 30 min (gloo; NCCL: 10 min), burning the allocation: after `train.distributed_timeout_s` the
    waiting rank fails, the launcher stops the job, and the error names the setting. About 30 s."""
    import os
    import signal
    import time

    cfg = two_process_config(tiny_cpt_data, tiny_base, tmp_path / "run", steps=400, eval_every=400, checkpoint={"every": 200})
    cfg["train"]["distributed_timeout_s"] = 8
    proc, ranks = ddp_launch_training(cfg, tmp_path)
    os.kill(ranks[1], signal.SIGSTOP)
    stopped_at = time.time()

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    # once the waiting rank has given up, the stopped one is killed as a dead node would be: the launcher then ends
    # at once (a stopped process cannot act on its SIGTERM: the launcher would wait its 30 s shutdown grace for it)
    while alive(ranks[0]) and time.time() - stopped_at < 150:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(ranks[1], signal.SIGKILL)
    try:
        log = proc.communicate(timeout=150)[0]
    except subprocess.TimeoutExpired:
        log = None
    finally:
        for pid in [*ranks, proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert log is not None, "the other rank waited for the hung one past the timeout"
    waited = time.time() - stopped_at
    assert proc.returncode != 0 and waited < 150, (proc.returncode, waited)
    assert "train.distributed_timeout_s" in log, log[-5000:]


def test_a_rank_failing_in_a_sharded_save_stops_the_run_at_once(reference, tiny_cpt_data, tiny_base, tmp_path):
    """FSDP's and DeepSpeed's saves are collective. A rank whose part failed (disk full on its node, an I/O error)
    joined the ranks' "skip this save and go on?" agreement while the others waited inside the backend's save: every
    rank hung until train.distributed_timeout_s (30 min by default; seen with ZeRO-2 and FSDP2), then failed with a
    timeout that named neither the rank nor the cause. Now that rank stops at once with one line naming itself and
    the cause, the launcher stops the job, the checkpoint before stays intact, and --resume from it gives the
    uninterrupted run's losses. Here rank 1 alone gets ENOSPC in the FSDP2 save at step 6. About 40 s."""
    import os
    import signal
    import time

    from cpt.checkpoint import list_checkpoints, verify_checkpoint
    from launching import rank_pids

    out = tmp_path / "run"
    cfg = make_cfg(tiny_cpt_data, tiny_base, out)
    cfg["train"]["distributed_timeout_s"] = 30  # (the old hang ends here, with the timeout's message)
    # the synchronous, collective save (DeepSpeed's; FSDP2's with async_save off). A rank failing in FSDP2's
    # non-blocking save fails the save on every rank, and the run goes on: tests/test_async_sharded_saves.py
    cfg["checkpoint"]["async_save"] = False
    path = write(cfg, tmp_path / "run.yaml")
    script, *args = SHIPPED["fsdp"]
    env = {**rank_env(cpu=True, fsdp_on_cpu=True), "NUM_GPUS": "2", "CPT_FAULT_INJECT": f"enospc:save_state:rank1@{STEPS}"}
    proc, ranks, t0 = start([str(ROOT / "scripts" / script), str(path), *args], tmp_path, env), [], time.time()
    while proc.poll() is None and time.time() - t0 < 240:  # (the old code hung past its 30 s timeout too: kill it)
        with contextlib.suppress(OSError):
            ranks = rank_pids(proc.pid) or ranks
        time.sleep(0.2)
    hung = proc.poll() is None
    for pid in [*ranks, proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    rc, log = proc.returncode, proc.communicate()[0]
    assert not hung and rc != 0 and "train.distributed_timeout_s" not in log, log[-5000:]
    errors = [line for line in log.splitlines() if line.startswith(f"cpt train: error: checkpoint at step {STEPS}: rank 1 (")]
    assert len(errors) == 1 and "failed in the fsdp save" in errors[0], log[-5000:]
    # and nothing from rank 0, whose save broke when rank 1 left (cpt/rank_failure.py): it used to add a traceback or
    # a line of its own ("rank 0 ... failed in the fsdp save: ... Connection closed by peer")
    assert [line for line in log.splitlines() if line.startswith("cpt train: error:")] == errors, log[-5000:]
    assert "[rank0]:" not in log and "Connection closed" not in log and "Connection reset" not in log, log[-5000:]
    assert f"no space left on device (save_state:rank1@{STEPS})" in errors[0]
    assert [p.name for p in list_checkpoints(out)] == [f"step_{EVERY:08d}"] and verify_checkpoint(list_checkpoints(out)[0]) is None
    rc, log = run_shipped("fsdp", path, "--resume")
    assert rc == 0 and f"resumed {out / 'checkpoints' / f'step_{EVERY:08d}'} at step {EVERY}" in log, log[-5000:]
    assert_close(losses(out), losses(reference))


def test_a_shard_refused_by_rank_0_stops_every_rank_with_one_line(tiny_cpt_data, tiny_base, tmp_path):
    """`data.verify_checksums: true` (its share of the files on each rank; this one is rank 0's): a shard whose bytes changed after `cpt prepare`
    (same size) was refused there, while rank 1 went on into the model's first collective, then died of the broken
    connection with a page of traceback that named no cause. Now rank 0's line, naming the file and its rank, is the
    only one (rank 1 learns the cause from the launcher's store and stays quiet) and the job ends in seconds, not after
    train.distributed_timeout_s. About 15 s."""
    import time

    data = tmp_path / "data"
    shutil.copytree(tiny_cpt_data / "data", data / "data")
    shard = data / "data" / "python" / "shard_00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[1000:1002] = b"\x01\x00" if raw[1000:1002] != b"\x01\x00" else b"\x02\x00"  # another valid token id (uint16)
    shard.write_bytes(bytes(raw))
    cfg = two_process_config(tiny_cpt_data, tiny_base, tmp_path / "run", steps=STEPS, eval_every=EVERY, checkpoint={"every": EVERY})
    for src in cfg["data"]["sources"]:
        src["path"] = src["path"].replace(str(tiny_cpt_data / "data"), str(data / "data"))
    cfg["data"]["verify_checksums"] = True
    cfg["train"]["distributed_timeout_s"] = 120
    t0 = time.time()
    rc, log = run_shipped("ddp", write(cfg, tmp_path / "run.yaml"))
    assert rc != 0 and time.time() - t0 < 100, (time.time() - t0, log[-5000:])
    errors = [line for line in log.splitlines() if line.startswith("cpt train: error:")]
    assert len(errors) == 1 and "checksum mismatch for shard_00000.bin" in errors[0], log[-5000:]
    assert errors[0].endswith("]") and "[rank 0 of 2 (" in errors[0], errors
    assert not re.search(r"\[rank\d\]: Traceback", log) and "Connection closed" not in log, log[-5000:]


def test_sigterm_while_the_ranks_start_through_the_shipped_launcher(tiny_cpt_data, tiny_base, tmp_path):
    """`scripts/launch.sh run.yaml --preempted-exit-code 75` on 2 processes, SIGTERM to the script (a pod's) while the
    ranks are still starting (a fault point holds them at the model load): the ranks stop with one line and the launch
    exits 75, no rank traceback; it exited 1 with torchrun's ChildFailedError, the ranks killed by the signal's default
    action. Nothing trained, so no checkpoint and no lock left."""
    cfg = two_process_config(tiny_cpt_data, tiny_base, tmp_path / "run", steps=20, eval_every=100, checkpoint={"every": 100})
    cfg_path = write(cfg, tmp_path / "run.yaml")
    env = {**rank_env(cpu=True), "NUM_GPUS": "2", "TMPDIR": str(tmp_path / "tmp"), "CPT_FAULT_INJECT": "hang:start:model"}
    (tmp_path / "tmp").mkdir()
    proc = start([str(ROOT / "scripts" / "launch.sh"), str(cfg_path), "--preempted-exit-code", "75"], tmp_path, env,
                 new_session=True)
    head = []
    for line in proc.stdout:  # (the mix line comes just before the fault point, printed by rank 0)
        head.append(line)
        if " mix: " in line:
            break
    time.sleep(1)  # (rank 1 at the fault point too)
    proc.send_signal(signal.SIGTERM)
    rc, log = finish(proc, timeout=300)
    log = "".join(head) + log
    assert rc == 75, log[-5000:]
    assert "cpt train: stopped by SIGTERM while starting, before its first step: nothing to save" in log, log[-5000:]
    assert "accelerate_launch.sh: the run was stopped while starting" in log and "ChildFailedError" not in log, log[-5000:]
    assert not re.search(r"\[rank\d\]: Traceback", log) and "Traceback" not in log, log[-5000:]
    assert not (tmp_path / "run" / "run.lock").exists() and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("launcher,group", [(["launch.sh"], True), (["launch_deepspeed.sh", "2"], False)],
                         ids=["launch-group", "launch_deepspeed"])
def test_preempted_exit_code_through_the_shipped_launcher(tiny_cpt_data, tiny_base, tmp_path, launcher, group):
    """`scripts/launch.sh run.yaml --preempted-exit-code 75` (and `scripts/launch_deepspeed.sh run.yaml 2 ...`, ZeRO-2)
    on 2 processes. ZeRO-2: SIGTERM to the script only (a pod's SIGTERM reaches the container's first process): it
    passes the signal to the ranks, which save their checkpoint and exit 0 (no ChildFailedError traceback from
    torchrun), and the launch exits 75 (it exited 0, or 143 with the ranks left training, before). DDP: SIGTERM to the
    whole process group (script, torchrun and ranks; `tini -g`, a terminal's job control): torchrun exits 1 with its own
    SignalException traceback although its ranks saved, and the launch still exits 75 (it exited 1 before). The marker
    file it made for the ranks is gone with it."""
    cfg = two_process_config(tiny_cpt_data, tiny_base, tmp_path / "run", steps=60, eval_every=100,
                             checkpoint={"every": 100})
    out = tmp_path / "run"
    cfg_path = write(cfg, tmp_path / "run.yaml")
    env = {**rank_env(cpu=True), "NUM_GPUS": "2", "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    script, *strategy = launcher
    proc = start([str(ROOT / "scripts" / script), str(cfg_path), *strategy, "--preempted-exit-code", "75"], tmp_path, env,
                 new_session=True)
    t0 = time.time()
    while len(losses(out)) < 2:
        assert proc.poll() is None and time.time() - t0 < 300, proc.stdout.read()[-5000:] if proc.poll() is not None else "timed out"
        time.sleep(0.05)
    if group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    rc, log = finish(proc, timeout=300)
    assert rc == 75, log[-5000:]
    assert "PREEMPTED at step" in log and "ChildFailedError" not in log, log[-5000:]
    if group:  # (torchrun's own traceback, documented; no rank's)
        assert "SignalException" in log and "launcher exited 1 after its ranks' preempted stop" in log, log[-5000:]
        assert not re.search(r"\[rank\d\]: Traceback", log), log[-5000:]
    else:
        assert "Traceback" not in log, log[-5000:]
    assert "accelerate_launch.sh: the run was preempted (its checkpoint is saved): exit 75" in log
    k = int(sorted((out / "checkpoints").glob("step_*"))[-1].name[5:])
    assert 2 <= k < 60 and not (out / "export").exists()
    assert not list((tmp_path / "tmp").glob("cpt-launch.*"))  # (torchrun leaves its torchelastic_* folder)
