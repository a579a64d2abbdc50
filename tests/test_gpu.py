"""Checks that need a CUDA device (skipped elsewhere; CI has no GPU). Run them on a GPU machine with
``pytest tests/test_gpu.py``; docs/benchmarks.md records when and where they last ran."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

from cpt.config import load_config
from cpt.metrics import read_metrics
from conftest import tiny_run_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cfg(root, out, **train):
    cfg = tiny_run_config(root, out, eval={"at_start": False}, checkpoint={"every": None, "export_at_end": False})
    cfg["stages"][0]["steps"] = 12
    cfg["data"]["heldout"] = []
    cfg["train"].update({"log_every": 4, "precision": "bf16", **train})
    return cfg


def test_cuda_training_step_does_not_sync_on_non_log_steps(tiny_cpt_data, tmp_path, monkeypatch):
    """torch's sync debug mode reports every device synchronisation: a non-log step must not synchronise at all,
    the model's forward included (transformers' packed-sequence check is answered by cpt.compiling.packed_rows)."""
    import cpt.optim
    from cpt.train import train

    per_step: list[list[str]] = []
    loop_thread = threading.get_ident()
    real_set_lr = cpt.optim.set_lr

    def set_lr(opt, lr):
        per_step.append([])
        return real_set_lr(opt, lr)

    monkeypatch.setattr(cpt.optim, "set_lr", set_lr)
    real_showwarning = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if per_step and "synchroniz" in str(message).lower() and threading.get_ident() == loop_thread:
            import traceback

            per_step[-1].append(f"{filename}:{lineno}: {message}\n" + "".join(traceback.format_stack(limit=12)))
            return
        real_showwarning(message, category, filename, lineno, file, line)

    monkeypatch.setattr(warnings, "showwarning", record)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            train(load_config(base=_cfg(tiny_cpt_data, tmp_path / "run")), echo=lambda *a, **k: None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(per_step) == 12
    non_log = {i: s for i, s in enumerate(per_step) if (i + 1) % 4}
    assert all(not s for s in non_log.values()), {i: s for i, s in non_log.items() if s}


def test_cuda_bf16_run_with_prefetch_matches_without(tiny_cpt_data, tmp_path):
    """Pinned, prefetched batches train the same as batches read in the loop (bf16 on CUDA; equal to rounding:
    the embedding backward's atomics are not bitwise deterministic)."""
    from cpt.train import train

    out = {}
    for prefetch in (True, False):
        cfg = _cfg(tiny_cpt_data, tmp_path / str(prefetch), log_every=1)
        cfg["data"]["prefetch"] = prefetch
        train(load_config(base=cfg), echo=lambda *a, **k: None)
        out[prefetch] = [r["train/loss"] for r in read_metrics(tmp_path / str(prefetch) / "metrics.jsonl") if "train/loss" in r]
    assert len(out[True]) == 12
    assert out[True] == pytest.approx(out[False], rel=2e-2)
    assert out[True][-1] < out[True][0]


def test_cuda_profile_window_records_kernels_and_memory(tiny_cpt_data, tmp_path):
    """train.profile on CUDA: the table is sorted by the kernels' device time and names GPU kernels; with
    memory, a memory snapshot (pytorch.org/memory_viz's format) is written too."""
    import pickle

    from cpt.train import train

    cfg = _cfg(tiny_cpt_data, tmp_path / "run", profile={"start_step": 5, "steps": 2, "memory": True})
    train(load_config(base=cfg), echo=lambda *a, **k: None)
    out = tmp_path / "run" / "profile" / "steps_00000005-00000006"
    assert sorted(p.name for p in out.iterdir()) == ["rank0.memory.pickle", "rank0.ops.txt", "rank0.trace.json.gz"]
    table = (out / "rank0.ops.txt").read_text()
    assert "sorted by self_device_time_total" in table and "Self CUDA" in table
    snapshot = pickle.loads((out / "rank0.memory.pickle").read_bytes())
    assert snapshot["segments"] and snapshot["device_traces"]


def test_cuda_liger_kernels_train_like_without_and_keep_per_source_loss(tiny_cpt_data, tmp_path):
    """model.liger_kernel with the real Liger kernels (liger-kernel installed: scripts/gpu_session.sh installs it):
    the same losses as without, within bf16 rounding, with cpt's chunked loss and per-source loss kept."""
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (not a cpt dependency)")
    from cpt.train import train

    lines, losses = [], {}
    for name, liger in (("plain", False), ("liger", True)):
        cfg = _cfg(tiny_cpt_data, tmp_path / name)
        cfg["model"]["liger_kernel"] = liger
        train(load_config(base=cfg), echo=lambda *a, **k: lines.append(" ".join(map(str, a))))
        logged = [r for r in read_metrics(tmp_path / name) if "train/loss" in r]
        assert all("train/loss/python" in r for r in logged)
        losses[name] = [r["train/loss"] for r in logged]
    assert any("Liger kernels applied to the llama layers" in line for line in lines)
    assert losses["liger"] == pytest.approx(losses["plain"], rel=2e-2)


def test_cuda_whole_compiled_model_attends_with_flash_attention():
    """model.compile: true (inductor), bf16, no document masking: SDPA runs its FlashAttention kernel forward and
    backward, as eager runs do, not the memory-efficient kernel with the whole mask that transformers builds while
    dynamo traces (cpt/compiling.py: keep_causal_sdpa); the loss equals the eager model's within bf16 rounding."""
    from torch.profiler import ProfilerActivity, profile

    from conftest import tiny_llama
    from cpt.compiling import compile_model
    from cpt.lm_loss import causal_lm_loss

    ids = torch.randint(0, 256, (2, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    build = lambda: tiny_llama(256, hidden=256, intermediate=512, heads=4, attn_implementation="sdpa").cuda()  # noqa: E731
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = causal_lm_loss(build(), ids)[0].item()
        compiled = compile_model(build(), True)
        causal_lm_loss(compiled, ids)[0].backward()  # (compiles)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            loss = causal_lm_loss(compiled, ids)[0]
            loss.backward()
            torch.cuda.synchronize()
    kernels = [e.key.lower() for e in prof.key_averages()]
    assert any("flash" in k or "cudnn" in k and "sdpa" in k for k in kernels), kernels  # (cuDNN's where torch prefers it)
    assert not any("efficient_attention" in k or "fmha_cutlass" in k for k in kernels), kernels
    assert loss.item() == pytest.approx(eager, rel=2e-2)


# ------------------------------------------------------------------ the shipped launchers on a GPU (kept last: slowest)


def launch_on_gpu(strategy: str, cfg: dict, path, *extra: str, env: dict | None = None) -> str:
    """``scripts/launch.sh RUN.yaml STRATEGY [extra]`` as the README shows it, on the visible GPU (NUM_GPUS=1)."""
    import os

    from launching import ROOT, finish, start, write_config

    env = dict(env or os.environ, NUM_GPUS="1", PYTHONUNBUFFERED="1")
    env.pop("ACCELERATE_MIXED_PRECISION", None)  # precision comes from the run config only
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH")) if p)
    rc, log = finish(start([str(ROOT / "scripts" / "launch.sh"), str(write_config(cfg, path)), strategy, *extra],
                           path.parent, env), timeout=400)
    assert rc == 0, log[-5000:]
    return log


def check_shipped_launcher(strategy, tiny_cpt_data, tiny_base, tmp_path, precision="bf16", env=None, rel=5e-3):
    """One launch of 6 steps (checkpoint and eval at 3 and 6) against the same run in-process; the step-3 checkpoint
    resumed by the same launcher; the export loaded by plain transformers. (``precision="fp32"``, ``rel=1e-5`` and
    ``env=launching.rank_env(cpu=True, ...)`` run the same check on CPU with 1 process.)"""
    import shutil

    from launching import assert_close, evals, losses, two_process_config, world_sizes
    from test_launch_shipped import heldout_losses

    from cpt.train import train

    def cfg_for(out):
        cfg = two_process_config(tiny_cpt_data, tiny_base, out, steps=6, eval_every=3,
                                 checkpoint={"every": 3, "keep": 5})
        cfg["train"]["precision"] = precision
        return cfg

    ref, run, resumed = tmp_path / "ref", tmp_path / "run", tmp_path / "resumed"
    train(load_config(base=cfg_for(ref)), echo=lambda *a, **k: None)
    launch_on_gpu(strategy, cfg_for(run), tmp_path / "run.yaml", env=env)
    assert world_sizes(run) == {1}
    assert_close(losses(run), losses(ref), rel=rel)
    assert_close(evals(run), evals(ref), rel=rel)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]

    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "step_00000003", resumed / "checkpoints" / "step_00000003")
    log = launch_on_gpu(strategy, cfg_for(resumed), tmp_path / "resumed.yaml", "--resume", env=env)
    assert "resumed" in log, log[-3000:]
    assert_close(losses(resumed), {k: v for k, v in losses(run).items() if k > 3}, rel=rel / 2)
    assert_close(evals(resumed), {k: v for k, v in evals(run).items() if k > 3}, rel=rel / 2)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(run / "export").to(device)
    tok = AutoTokenizer.from_pretrained(run / "export")
    with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
        got = heldout_losses(model, tok, cfg_for(run), tiny_cpt_data)
    for name, loss in got.items():
        assert loss == pytest.approx(evals(run, name)[6], rel=rel / 2), name  # the step-3 weights miss by 1%


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_shipped_launcher_on_the_gpu_trains_resumes_and_exports(strategy, tiny_cpt_data, tiny_base, tmp_path):
    """`scripts/launch.sh run.yaml ddp|fsdp` as shipped, on one GPU (NCCL, bf16 on CUDA, FSDP2's mixed-precision
    policy and sharded DCP checkpoints, pinned non-blocking saves under DDP): the per-step and held-out losses of the
    same run in-process (bf16: 5e-3 relative, as tests/test_train_distributed.py measured for FSDP2 on CPU); the
    step-3 checkpoint resumed by the same launcher gives steps 4-6; the export loads with transformers and gives
    the logged final held-out losses."""
    check_shipped_launcher(strategy, tiny_cpt_data, tiny_base, tmp_path)
