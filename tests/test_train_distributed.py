"""The real `cpt train` under 2 CPU processes (`accelerate launch` with flags, gloo): DDP (full and LoRA), DeepSpeed ZeRO-2 (LoRA +
EMA) and ZeRO-3 (LoRA with activation checkpointing; without --zero3_save_16bit_model; the full model: the shipped
zero3 launch in tests/test_launch_shipped.py) and FSDP2 (full; run on CPU through tests/fsdp_on_cpu.py; LoRA:
tests/test_lora_sharded_checkpoints.py) give the per-step losses of a 1-process run of the same global batch; the
FSDP HF export loads and reproduces the last logged held-out loss, ZeRO-3's bf16 export holds the fp32 masters; FSDP
resumes exactly after SIGTERM (DDP: tests/test_slurm.py); a DDP LoRA run's adapter-only checkpoint resumes under
FSDP2; `cpt train` under a plain FSDP launch without GPUs is refused instead of silently training unsynchronised copies. (The shipped accelerate configs and launch scripts,
ZeRO-2 with and without CPU offload among them: tests/test_launch_shipped.py.)

Tolerances: everything is fp32 and the data of every step is the same whatever the world size (rank r takes
rows [r*B/W, (r+1)*B/W) of the global batch), so runs differ only in the order of floating-point sums
(gradient all-reduce / reduce-scatter, micro-batch split, loss reduction). Measured: DDP and ZeRO-3 ~1e-7
relative, ZeRO-2 equal to the last digit or ~1e-7. REL = 1e-5 is 100x that, and still catches real bugs: the
weight decay ZeRO-3 once dropped (placeholders taken for 1-D parameters) moved the loss by 5e-6 at step 2 and
4e-5 by step 6.
The held-out evaluation uses the same tolerance; the ZeRO-3 export is compared at 1e-5 absolute.
"""

import re
from pathlib import Path

import pytest
import torch

from cpt.config import load_config
from launching import (FREE_PORT, REL, ROOT, VENV_BIN, assert_close, evals, finish, losses, preempt, rank_env, records, start,
                       two_process_config, world_sizes)
from launching import write_config as write

pytestmark = pytest.mark.slow

LAUNCH = {
    "ddp": ["--multi_gpu"],
    "zero2": ["--use_deepspeed", "--zero_stage", "2"],
    # no --zero3_save_16bit_model: cpt gathers ZeRO-3 weights for HF/adapter exports whatever the user's setting
    "zero3": ["--use_deepspeed", "--zero_stage", "3"],
    "fsdp": ["--use_fsdp", "--fsdp_version", "2"],
    # the shipped FSDP2 config, run on CPU/gloo through accelerate's real FSDP branch (tests/fsdp_shim, tests/fsdp_on_cpu.py)
    "fsdp_cpu": ["--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml")],
}


def launch(mode: str, cfg_path: Path, *extra, wait=True, precision="no"):
    """`cpt train` on 2 CPU processes with accelerate's flags for ``mode``; fsdp_cpu runs it on CPU through
    tests/fsdp_shim."""
    env = rank_env(cpu=mode in ("ddp", "fsdp_cpu"), fsdp_on_cpu=mode == "fsdp_cpu")
    args = [str(VENV_BIN / "accelerate"), "launch", *LAUNCH[mode], "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", precision, "--dynamo_backend", "no", *FREE_PORT, "-m", "cpt.cli", "train", str(cfg_path), *map(str, extra)]
    proc = start(args, cfg_path.parent, env)
    return finish(proc) if wait else proc


def max_rel(got: dict, ref: dict) -> float:
    return max(abs(got[k] - ref[k]) / abs(ref[k]) for k in ref)


def resume_copy(run: Path, out: Path, cfg: dict, mode: str, at: int) -> str:
    """``run`` as if killed after its step-``at`` checkpoint: copied to ``out`` (later checkpoints and the export
    removed) and resumed there by ``mode`` on 2 processes; returns the log."""
    import shutil

    from cpt.checkpoint import list_checkpoints

    shutil.copytree(run, out)
    for later in (c for c in list_checkpoints(out) if int(c.name.split("_")[1]) > at):
        shutil.rmtree(later)
    shutil.rmtree(out / "export", ignore_errors=True)
    cfg = {**cfg, "run": {**cfg["run"], "output_dir": str(out)}}
    rc, log = launch(mode, write(cfg, out.parent / f"{out.name}.yaml"), "--resume")
    assert rc == 0 and "resumed" in log, log[-5000:]
    return log


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def base(tiny_base) -> Path:
    return tiny_base


def make_cfg(tiny_cpt_data, base, out: Path, lora=False, weight_decay=0.1, ema=None, reptile=None) -> dict:
    """12 steps of 8 sequences, evaluated every 4; no periodic checkpoints."""
    cfg = two_process_config(tiny_cpt_data, base, out, steps=12, eval_every=4, checkpoint={"every": None}, lora=lora,
                             weight_decay=weight_decay)
    if ema:
        cfg["train"]["ema_decay"] = ema
        cfg["eval"]["ema"] = True
    if reptile:
        cfg["train"]["reptile"] = {"every": reptile[0], "epsilon": reptile[1]}
    return cfg


@pytest.fixture(scope="module")
def single(tiny_cpt_data, base, tmp_path_factory):
    """1-process references (in-process), keyed by (lora, weight_decay)."""
    from cpt.train import train

    cache = {}

    def get(lora=False, weight_decay=0.1, ema=None, reptile=None):
        key = (lora, weight_decay, ema, reptile)
        if key not in cache:
            out = tmp_path_factory.mktemp("single") / "run"
            train(load_config(base=make_cfg(tiny_cpt_data, base, out, lora, weight_decay, ema, reptile)), echo=lambda *a: None)
            assert world_sizes(out) == {1}
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="module")
def ddp_run(tiny_cpt_data, base, tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    cfg = make_cfg(tiny_cpt_data, base, d / "run")
    cfg["train"]["profile"] = {"start_step": 5, "steps": 1, "ranks": "all"}  # (the tests compare it with unprofiled runs)
    rc, log = launch("ddp", write(cfg, d / "c.yaml"))
    assert rc == 0, log[-5000:]
    assert "chunked next-token loss" in log  # the default loss path, under DDP's wrapper
    window = d / "run" / "profile" / "steps_00000005-00000005"  # train.profile: every rank wrote its own files
    assert sorted(p.name for p in window.iterdir()) == [f"rank{r}.{f}" for r in (0, 1) for f in ("ops.txt", "trace.json.gz")]
    return d / "run"


# ------------------------------------------------------------------------------------------ tests


def test_ddp_matches_single_process(ddp_run, single):
    ref = single()
    assert world_sizes(ddp_run) == {2}
    assert max_rel(losses(ddp_run), losses(ref)) < REL
    assert_close(losses(ddp_run), losses(ref))
    assert_close(evals(ddp_run), evals(ref))
    for src in ("python", "shakespeare"):  # per-source training loss: summed over both ranks' rows
        per = lambda d: {r["step"]: r[f"train/loss/{src}"] for r in records(d) if f"train/loss/{src}" in r}  # noqa: E731
        assert_close(per(ddp_run), per(ref))


# DDP's preemption (SIGTERM/SIGUSR1: every rank saves, exits cleanly, --resume matches the uninterrupted run exactly) is
# tested through the SLURM script (tests/test_slurm.py, the time-limit warning) and the shipped launcher
# (tests/test_launch_shipped.py, the preempted exit code); FSDP2's below.


def sigterm_then_resume(mode: str, reference: Path, cfg: dict, tmp_path: Path) -> Path:
    out = Path(cfg["run"]["output_dir"])
    cfg_path = write(cfg, tmp_path / "c.yaml")
    preempt(launch(mode, cfg_path, wait=False), lambda: len(losses(out)) >= 3)
    k = int(sorted((out / "checkpoints").glob("step_*"))[-1].name[5:])
    assert 3 <= k < 12
    rc, log = launch(mode, cfg_path, "--resume")
    assert rc == 0 and "resumed" in log, log[-5000:]
    assert losses(out) == losses(reference)  # same world size, same reduction order: bitwise
    assert world_sizes(out) == {2}
    return out


def assert_export_reproduces_eval(out: Path, cfg: dict, tiny_cpt_data: Path, step: int = 12) -> None:
    """The gathered HF export, loaded by plain transformers, gives the last logged held-out losses."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt.data.loader import load_heldout
    from cpt.data.sources import HeldoutConfig
    from cpt.evaluate import heldout_loss

    model = AutoModelForCausalLM.from_pretrained(out / "export")
    tok = AutoTokenizer.from_pretrained(out / "export")
    for name in ("python", "shakespeare"):
        h = HeldoutConfig(name=name, path=str(tiny_cpt_data / "data" / name / "heldout"), tag="upstream")
        tokens = load_heldout(h, tok, cfg["data"]["seq_len"], cfg["eval"]["tokens_per_set"])
        assert heldout_loss(model, tokens, 16) == pytest.approx(evals(out, name)[step], abs=1e-5), name


def assert_same_adapter(got: Path, ref: Path) -> None:
    """The peft adapter saved in ``got`` holds the same tensors as ``ref``'s (fp32 sums in another order)."""
    import torch
    from safetensors.torch import load_file

    a, b = (load_file(d / "adapter_model.safetensors") for d in (got, ref))
    assert a and a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_ddp_with_reptile_matches_single_process(tiny_cpt_data, base, single, tmp_path):
    """Reptile meta-updates under DDP (every rank applies the same update to the same weights)."""
    rc, log = launch("ddp", write(make_cfg(tiny_cpt_data, base, tmp_path / "run", reptile=(4, 0.5)), tmp_path / "c.yaml"))
    assert rc == 0, log[-5000:]
    out, ref = tmp_path / "run", single(reptile=(4, 0.5))
    assert world_sizes(out) == {2}
    assert losses(ref) != losses(single())  # the meta-updates change the run
    assert_close(losses(out), losses(ref))
    assert_close(evals(out), evals(ref))


def test_ddp_lora_matches_single_process(tiny_cpt_data, base, single, tmp_path):
    """LoRA under DDP (only the adapters' gradients are all-reduced): 1-process losses, held-out losses and adapter.
    Its checkpoint holds the adapter alone (not the frozen base); resumed from step 6 under FSDP2 (the adapter loaded
    over the base FSDP2 built and sharded) it gives the uninterrupted run's losses to 1e-5. (Resumed on DDP it gave
    them bitwise: that is the one-process load, tests/test_train_modes.py; one launch less for the CI budget.)"""
    from cpt.adapter_checkpoint import ADAPTER_STATE

    cfg = make_cfg(tiny_cpt_data, base, tmp_path / "run", lora=True, weight_decay=0.0)
    cfg["checkpoint"] = {"every": 6, "keep": 2}
    rc, log = launch("ddp", write(cfg, tmp_path / "c.yaml"))
    assert rc == 0, log[-5000:]
    out, ref = tmp_path / "run", single(lora=True, weight_decay=0.0)
    assert world_sizes(out) == {2}
    assert_close(losses(out), losses(ref))
    assert_close(evals(out), evals(ref))
    assert_same_adapter(out / "export", ref / "export")
    ckpt = out / "checkpoints" / "step_00000006"
    assert (ckpt / ADAPTER_STATE).is_file() and not (ckpt / "model.safetensors").exists()
    assert (ckpt / ADAPTER_STATE).stat().st_size < 0.5 * (base / "model.safetensors").stat().st_size
    again = tmp_path / "fsdp"  # the run as if killed after its step-6 checkpoint, resumed under FSDP2
    resume_copy(out, again, cfg, "fsdp_cpu", 6)
    assert world_sizes(again) == {2}
    assert_close(losses(again), losses(out))


def test_ddp_freeze_checkpoint_leaves_the_frozen_layers_out_and_resumes_bitwise(tiny_cpt_data, base, tmp_path):
    """model.freeze under DDP: the checkpoint holds the trainable parameters alone (the main process's fingerprint of
    the frozen layer as built); resumed under FSDP2 from step 3 it gives the uninterrupted run's losses (to 1e-5),
    writing the trainable parameters' shards alone, which export as the DDP run's checkpoint does, and from which
    FSDP2 resumes bitwise. (For the CI budget, not launched here: DDP's own resume of it, the one-process load of
    tests/test_train_modes.py; a --resume with another model.freeze refused before FSDP2's load, the check of
    cpt.checkpoint that tests/test_user_errors.py runs on one process, on the same trainable layout.)"""
    import torch
    from safetensors.torch import load_file

    from cpt.adapter_checkpoint import ADAPTER_STATE, read_base_record

    cfg = make_cfg(tiny_cpt_data, base, tmp_path / "run")
    cfg["model"]["freeze"] = {"layers": "bottom_half"}
    cfg["stages"][0]["steps"] = 9
    # evaluated before each checkpoint, as the shipped freeze-cpt.yaml does every 100 steps: FSDP2 then holds its root
    # parameters (the trained tied embedding, the final norm) unsharded, and its checkpoints used to leave them out
    cfg["eval"].update(at_start=False, every=3)
    cfg["checkpoint"] = {"every": 3, "keep": 3, "export_at_end": False}
    rc, log = launch("ddp", write(cfg, tmp_path / "c.yaml"))
    assert rc == 0, log[-5000:]
    out = tmp_path / "run"
    ckpt = out / "checkpoints" / "step_00000003"
    assert not (ckpt / "model.safetensors").exists() and read_base_record(ckpt)["kind"] == "freeze"
    saved = load_file(ckpt / ADAPTER_STATE)
    assert saved and not any(k.startswith("model.layers.0.") for k in saved)

    # under FSDP2 (the trained part loaded over the base FSDP2 built and sharded): the same losses, and its own
    # checkpoint holds the trainable parameters' shards alone; exported, the weights of the DDP run's
    fsdp = tmp_path / "fsdp"
    resume_copy(out, fsdp, cfg, "fsdp_cpu", 3)
    assert_close(losses(fsdp), losses(out))
    ckpt = fsdp / "checkpoints" / "step_00000009"
    assert read_base_record(ckpt)["kind"] == "freeze" and (ckpt / "pytorch_model_fsdp_0").is_dir()
    from cpt.consolidate import read_model_state
    from cpt.checkpoint_export import export_checkpoint

    shards = read_model_state(ckpt)
    assert shards and not any(k.startswith("model.layers.0.") for k in shards)
    # every trained tensor (FSDP2's state dict also names the tied head), also in the step-6 one, written after an eval
    at6 = set(read_model_state(fsdp / "checkpoints" / "step_00000006"))
    assert set(saved) <= at6 == set(shards), (set(saved) - at6, at6 ^ set(shards))
    for c, d in ((ckpt, "x"), (out / "checkpoints" / "step_00000009", "y")):
        export_checkpoint(c, tmp_path / d, echo=lambda *a: None)
    x, y = (load_file(tmp_path / d / "model.safetensors") for d in "xy")
    assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], rtol=1e-4, atol=1e-6) for k in x)
    assert all(torch.equal(x[k], load_file(base / "model.safetensors")[k]) for k in x if k.startswith("model.layers.0."))

    # FSDP2 resumes from its own trainable-only checkpoint (step 6: the frozen layer from the base it builds) bitwise
    own = tmp_path / "fsdp-own"
    log = resume_copy(fsdp, own, cfg, "fsdp_cpu", 6)
    assert "step_00000006" in log, log[-5000:]
    assert losses(own) == losses(fsdp)


# ZeRO-2 and ZeRO-2 with CPU offload against 1 process: tests/test_launch_shipped.py, through the shipped configs.


def test_zero2_lora_with_ema_matches_single_process(tiny_cpt_data, base, single, tmp_path):
    """LoRA + EMA (evaluated and exported) under ZeRO-2: losses, EMA losses and the EMA adapter match 1 process."""
    cfg = make_cfg(tiny_cpt_data, base, tmp_path / "run", lora=True, weight_decay=0.0, ema=0.8)
    rc, log = launch("zero2", write(cfg, tmp_path / "c.yaml"))
    assert rc == 0, log[-5000:]
    out, ref = tmp_path / "run", single(lora=True, weight_decay=0.0, ema=0.8)
    assert world_sizes(out) == {2}
    assert_close(losses(out), losses(ref))
    assert_close(evals(out, prefix="ema/"), evals(ref, prefix="ema/"))
    assert_same_adapter(out / "export-ema", ref / "export-ema")


# ZeRO-3 (full model) against 1 process, its exports reproducing the held-out losses and its text samples: the shipped
# zero3 launch in tests/test_launch_shipped.py (the flags-launched 12-step run here was the same check: one launch less
# for the CI budget); weight decay on ZeRO-3's placeholders: test_zero3_placeholders_keep_weight_decay below.


def test_zero3_bf16_export_holds_the_fp32_master_weights(tiny_cpt_data, base, tmp_path):
    """Under DeepSpeed with train.precision bf16, accelerate's get_state_dict gathers the engine's 16-bit weights: the
    run's export held the fp32 masters rounded to bf16 (labelled float32; a norm weight 4e-3 off), unlike `cpt export`
    of the same step's checkpoint and unlike every other backend. Now the run's export holds the fp32 masters, bitwise
    those `cpt export` reads from the ZeRO partitions. (ZeRO-2 was checked the same way by hand.)"""
    from safetensors.torch import load_file

    from cpt.checkpoint_export import export_checkpoint

    cfg = two_process_config(tiny_cpt_data, base, tmp_path / "run", steps=2, eval_every=2, checkpoint={"every": 2})
    cfg["train"]["precision"] = "bf16"
    cfg["stages"][0]["schedule"]["warmup_steps"] = 1
    rc, log = launch("zero3", write(cfg, tmp_path / "c.yaml"))
    assert rc == 0, log[-5000:]
    masters = load_file(str(export_checkpoint(tmp_path / "run", tmp_path / "ckpt", echo=print) / "model.safetensors"))
    exported = load_file(str(tmp_path / "run" / "export" / "model.safetensors"))
    assert exported.keys() == masters.keys()
    assert all(torch.equal(exported[k], masters[k]) for k in masters)
    assert any(not torch.equal(v, v.to(torch.bfloat16).float()) for v in exported.values())  # (not bf16 values)


def test_ema_of_sharded_weights_is_refused(tiny_cpt_data, base, tmp_path):
    """An EMA of FSDP2's local shards would be silently wrong: refused, naming the cause, in one line. (ZeRO-3's
    placeholders are refused by the same check: tests/test_averaging.py; one launch less for the CI budget.)"""
    cfg = make_cfg(tiny_cpt_data, base, tmp_path / "run")
    cfg["train"]["ema_decay"] = 0.9
    cfg["stages"][0]["steps"] = 4
    rc, log = launch("fsdp_cpu", write(cfg, tmp_path / "c.yaml"))
    assert rc != 0 and "EMA" in log and "FSDP" in log, log[-3000:]
    assert "cpt train: error: EMA" in log and not re.search(r"\[rank\d\]: Traceback", log), log[-3000:]  # one line


def test_fsdp_without_gpus_is_refused(tiny_cpt_data, base, tmp_path):
    """accelerate 1.x sets distributed_type NO for --use_fsdp on a machine without GPUs (and, with
    ACCELERATE_USE_CPU=1, falls back to plain CPU DDP): the loop must not train 2 unsynchronised copies."""
    cfg = make_cfg(tiny_cpt_data, base, tmp_path / "run")
    cfg["stages"][0]["steps"] = 4
    rc, log = launch("fsdp", write(cfg, tmp_path / "c.yaml"))
    assert rc != 0 and "unsynchronised" in log, log[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------------ FSDP2 (on CPU/gloo)
# accelerate's FSDP branch (fsdp2_prepare_model, sharded save/load, state-dict gathering for the export) run on
# CPU processes through tests/fsdp_on_cpu.py: the same cpt code paths a GPU FSDP run takes, collectives on gloo.


@pytest.fixture(scope="module")
def fsdp_run(tiny_cpt_data, base, tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp")
    cfg = make_cfg(tiny_cpt_data, base, d / "run")
    cfg["checkpoint"] = {"every": 4}
    rc, log = launch("fsdp_cpu", write(cfg, d / "c.yaml"))
    assert rc == 0, log[-5000:]
    assert "chunked next-token loss" in log
    return d / "run", cfg


def test_fsdp_matches_single_process_and_export_loads(fsdp_run, tiny_cpt_data, single):
    """FSDP2 full shard: per-step losses and held-out losses of 1 process; resume checkpoints are sharded
    (one DCP file per rank); the HF export gathered from the shards reproduces the last held-out loss."""
    out, cfg = fsdp_run
    ref = single()
    assert world_sizes(out) == {2}
    assert_close(losses(out), losses(ref))
    assert_close(evals(out), evals(ref))
    shards = sorted(p.name for p in (out / "checkpoints" / "step_00000012" / "pytorch_model_fsdp_0").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"], shards
    assert_export_reproduces_eval(out, cfg, tiny_cpt_data)


def test_fsdp_resume_after_sigterm_is_exact(fsdp_run, tiny_cpt_data, base, tmp_path):
    """Preemption under FSDP: every rank writes its shard, exits cleanly; --resume loads the sharded model and
    optimizer state and gives the uninterrupted FSDP run's losses bit for bit."""
    ref, _ = fsdp_run
    cfg = make_cfg(tiny_cpt_data, base, tmp_path / "run")
    cfg["checkpoint"] = {"every": 4}
    sigterm_then_resume("fsdp_cpu", ref, cfg, tmp_path)


# LoRA under FSDP2 (the shipped fsdp.yaml) against 1 process, its adapter export and its adapter-only checkpoints:
# tests/test_lora_sharded_checkpoints.py.


def test_fsdp_bf16_mixed_precision_tracks_fp32(tiny_cpt_data, base, single, tmp_path):
    """The shipped FSDP config as GPU users run it: bf16 compute through FSDP2's mixed-precision policy (fp32
    master weights). Losses follow the fp32 1-process run to bf16 accuracy (measured: at most 1e-3 relative)."""
    cfg = make_cfg(tiny_cpt_data, base, tmp_path / "run")
    cfg["train"]["precision"] = "bf16"
    path = write(cfg, tmp_path / "c.yaml")
    rc, log = launch("fsdp_cpu", path, precision="bf16")
    assert rc == 0, log[-5000:]
    out, ref = tmp_path / "run", single()
    assert world_sizes(out) == {2}
    got = losses(out)
    assert got != losses(ref)  # really bf16
    assert_close(got, losses(ref), rel=5e-3)


def test_zero3_placeholders_keep_weight_decay():
    """Under ZeRO-3 every weight is a [0]-shaped placeholder: decay is decided on the real shape (ds_shape)."""
    import torch

    from cpt.optim import is_no_decay

    placeholder = torch.nn.Parameter(torch.empty(0))
    placeholder.ds_shape = torch.Size([64, 64])  # what deepspeed.zero.Init leaves on a 2-D weight
    placeholder.ds_numel = 64 * 64
    assert not is_no_decay("model.layers.0.mlp.up_proj.weight", placeholder)


def test_zero3_lora_with_activation_checkpointing_matches_single_process(tiny_cpt_data, base, single, tmp_path):
    """LoRA with model.gradient_checkpointing under ZeRO-3 (its parameters gathered again for the recompute; the frozen
    embedding's output needs no gradient under the non-reentrant checkpoint): the 1-process losses without it, and an
    adapter export (gathered from the partitions) that peft loads over the base. (LoRA under ZeRO-3 without
    checkpointing, with its adapter-only checkpoints: tests/test_lora_sharded_checkpoints.py.)"""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = make_cfg(tiny_cpt_data, base, tmp_path / "run", lora=True, weight_decay=0.0)
    cfg["model"]["gradient_checkpointing"] = True
    rc, log = launch("zero3", write(cfg, tmp_path / "c.yaml"))
    assert rc == 0, log[-5000:]
    out, ref = tmp_path / "run", single(lora=True, weight_decay=0.0)
    assert world_sizes(out) == {2}
    assert_close(losses(out), losses(ref))
    assert_close(evals(out), evals(ref))
    assert "chunked next-token loss" in log
    assert (out / "export" / "adapter_model.safetensors").is_file()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(out / "export"))
