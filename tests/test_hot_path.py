"""The training step's hot path: no host sync on non-log steps, prefetched batches identical to direct reads."""

from __future__ import annotations

import sys
import threading

import pytest
import torch

from cpt.config import load_config
from cpt.metrics import read_metrics
from conftest import tiny_run_config

SYNCING = ("item", "__float__", "__int__", "__bool__", "tolist", "__index__")


def _inside_optimizer() -> bool:
    """True when called from torch's non-fused optimizers reading their step counters, which they keep in host
    memory on purpose (no device sync on a GPU). Everything else in the step is counted: cpt's, accelerate's, and
    the model's forward (transformers' eager packed-sequence check of the position ids used to read them back once
    per forward; cpt.compiling.packed_rows answers it without the read)."""
    f = sys._getframe(2)
    while f is not None:
        if "/torch/optim/" in f.f_code.co_filename:
            return True
        f = f.f_back
    return False


def _count_syncs_per_step(monkeypatch, cfg_dict) -> list[int]:
    """Run ``train`` and count the tensor->host reads made by the loop's thread in each step (0-based),
    from one ``set_lr`` call (the start of a step) to the next, outside the optimizer's step counters."""
    import cpt.optim
    from cpt.train import train

    loop_thread = threading.get_ident()
    per_step: list[int] = []
    real_set_lr = cpt.optim.set_lr

    def set_lr(opt, lr):
        per_step.append(0)
        return real_set_lr(opt, lr)

    def counting(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            if per_step and threading.get_ident() == loop_thread and not _inside_optimizer():
                per_step[-1] += 1
            return real(self, *a, **k)
        return wrapper

    monkeypatch.setattr(cpt.optim, "set_lr", set_lr)
    for name in SYNCING:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    train(load_config(base=cfg_dict), echo=lambda *a, **k: None)
    return per_step


def _sync_cfg(tiny_cpt_data, out, fused: bool | None, log_every: int = 4, steps: int = 8):
    cfg = tiny_run_config(tiny_cpt_data, out, eval={"at_start": False}, checkpoint={"every": None, "export_at_end": False})
    cfg["stages"][0]["steps"] = steps
    cfg["data"]["heldout"] = []
    cfg["train"]["log_every"] = log_every
    cfg["optim"] = {**cfg.get("optim", {}), "fused": fused}
    return cfg


def test_no_host_sync_on_non_log_steps_with_fused_adamw(tiny_cpt_data, tmp_path, monkeypatch):
    """Fused AdamW skips non-finite updates on the device (found_inf): a non-log step reads nothing back."""
    per_step = _count_syncs_per_step(monkeypatch, _sync_cfg(tiny_cpt_data, tmp_path / "run", fused=True))
    assert len(per_step) == 8
    non_log = [n for i, n in enumerate(per_step) if (i + 1) % 4]
    log = [n for i, n in enumerate(per_step) if (i + 1) % 4 == 0]
    assert non_log == [0] * 6, per_step
    assert all(n >= 1 for n in log), per_step  # the counter works: log steps do read the loss


def test_no_host_sync_on_non_log_steps_with_document_masking(tiny_cpt_data, tmp_path, monkeypatch):
    """Document masking's packed positions: transformers' packed-sequence check is answered without a read-back."""
    cfg = _sync_cfg(tiny_cpt_data, tmp_path / "run", fused=True)
    cfg["data"]["document_masking"] = True
    per_step = _count_syncs_per_step(monkeypatch, cfg)
    assert [n for i, n in enumerate(per_step) if (i + 1) % 4] == [0] * 6, per_step


def test_at_most_one_host_sync_per_non_log_step_otherwise(tiny_cpt_data, tmp_path, monkeypatch):
    """Foreach AdamW cannot skip on the device: one read of the all-rank finite flag per step, no more."""
    per_step = _count_syncs_per_step(monkeypatch, _sync_cfg(tiny_cpt_data, tmp_path / "run", fused=False))
    non_log = [n for i, n in enumerate(per_step) if (i + 1) % 4]
    assert non_log == [1] * 6, per_step


# aten operators that make the host wait for a CUDA device: a scalar read (.item(), bool(), float()) and the ops whose
# output size depends on values (nonzero, boolean indexing...). What torch.cuda.set_sync_debug_mode reports on a GPU,
# seen on CPU below the Python methods counted above (an op inside torch or a library that reads values back).
SYNCING_OPS = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "unique", "_unique2",
               "unique_consecutive", "repeat_interleave", "equal"}


@pytest.mark.parametrize("document_masking", [False, True])
def test_training_step_runs_no_synchronising_operator(tiny_cpt_data, tmp_path, monkeypatch, document_masking):
    """Every aten operator of every train_step with fused AdamW (micro-batches forward and backward, clipping, the
    update or its skip on the device), seen through a TorchDispatchMode: no value-dependent or scalar-reading
    operator, with and without document masking. (torch's foreach AdamW reads its step counters, host tensors by
    design, which on CPU cannot be told from device reads at this level: the Python-level test above covers it.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    import cpt.train
    from cpt.train import train

    per_step: list[list[str]] = []

    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in SYNCING_OPS:
                per_step[-1].append(func.__name__)
            return func(*args, **(kwargs or {}))

    real_step = cpt.train.train_step

    def train_step(*a, **k):
        per_step.append([])
        with Counting():
            return real_step(*a, **k)

    monkeypatch.setattr(cpt.train, "train_step", train_step)
    cfg = _sync_cfg(tiny_cpt_data, tmp_path / "run", fused=True)
    cfg["data"]["document_masking"] = document_masking
    train(load_config(base=cfg), echo=lambda *a, **k: None)
    assert len(per_step) == 8
    assert per_step == [[]] * 8, per_step


def test_fused_device_skip_matches_host_skip(tiny_cpt_data, tmp_path, monkeypatch):
    """A non-finite step is skipped identically on the device path (fused, found_inf) and the host path."""
    from cpt import lm_loss
    from cpt.train import train

    real = lm_loss.causal_lm_loss
    calls = {"n": 0}

    def nan_on_step_3(*a, **k):  # micro-batches of the third step return NaN
        calls["n"] += 1
        out = real(*a, **k)
        return out._replace(loss=out.loss * float("nan")) if calls["n"] in (5, 6) else out

    monkeypatch.setattr(lm_loss, "causal_lm_loss", nan_on_step_3)
    out = {}
    for fused, name in ((True, "device"), (False, "host")):
        calls["n"] = 0
        cfg = _sync_cfg(tiny_cpt_data, tmp_path / name, fused=fused, log_every=1, steps=6)
        cfg["train"]["micro_batch_size"] = cfg["train"]["global_batch_size"] // 2  # 2 micro-batches per step
        train(load_config(base=cfg), echo=lambda *a, **k: None)
        out[name] = [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "train/loss" in r]
    for name in out:
        assert [r["train/nonfinite_skipped"] for r in out[name]] == [0, 0, 1, 1, 1, 1]
        assert [r["step"] for r in out[name] if r["train/loss"] is None] == [3]  # its window had no finite step
    # fused and foreach AdamW agree to rounding; a skip that touched the weights would differ by far more
    for a, b in zip(out["device"], out["host"]):
        assert a["train/loss"] == b["train/loss"] or a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4)


# ------------------------------------------------------------------------------------------ prefetch


def _loader(tiny_cpt_data):
    from cpt.data.loader import CPTDataLoader
    from cpt.model import load_tokenizer

    cfg = load_config(base=tiny_run_config(tiny_cpt_data, "unused"))
    return CPTDataLoader(cfg.data, cfg.stages, load_tokenizer(cfg.model), cfg.train.global_batch_size, cfg.run.seed)


def test_prefetched_batches_and_states_equal_direct_reads(tiny_cpt_data):
    from cpt.data.prefetch import Prefetcher

    direct = _loader(tiny_cpt_data)
    want = []
    for s in range(6):
        b = direct.batch(s)
        want.append((b, direct.state_dict(), direct.metrics()))
    with Prefetcher(_loader(tiny_cpt_data), 0, depth=2) as feed:
        for s in range(6):
            b = feed.batch(s)
            assert torch.equal(b["input_ids"], want[s][0]["input_ids"]) and torch.equal(b["source"], want[s][0]["source"])
            assert feed.state_dict() == want[s][1]  # the state of the batch the loop took, not of those read ahead
            assert feed.metrics() == want[s][2]
    # resume: a loader restored to the state after step 2 prefetches steps 3, 4, 5 exactly
    resumed = _loader(tiny_cpt_data)
    resumed.load_state_dict(want[2][1])
    with Prefetcher(resumed, 3) as feed:
        assert feed.state_dict() == want[2][1]
        for s in range(3, 6):
            assert torch.equal(feed.batch(s)["input_ids"], want[s][0]["input_ids"])
        with pytest.raises(ValueError, match="expected step 6"):
            feed.batch(7)


def test_prefetch_error_reaches_the_loop(tiny_cpt_data):
    from cpt.data.prefetch import Prefetcher

    loader = _loader(tiny_cpt_data)
    real = loader.batch

    def failing(step):
        if step == 2:
            raise OSError("shard vanished")
        return real(step)

    loader.batch = failing
    with Prefetcher(loader, 0) as feed:
        feed.batch(0)
        feed.batch(1)
        with pytest.raises(OSError, match="shard vanished"):
            feed.batch(2)


def test_training_with_and_without_prefetch_is_identical(tiny_cpt_data, tmp_path):
    from cpt.train import train

    losses = {}
    for prefetch in (True, False):
        cfg = _sync_cfg(tiny_cpt_data, tmp_path / str(prefetch), fused=None, log_every=1, steps=5)
        cfg["data"]["prefetch"] = prefetch
        train(load_config(base=cfg), echo=lambda *a, **k: None)
        losses[prefetch] = [(r["step"], r["train/loss"]) for r in read_metrics(tmp_path / str(prefetch) / "metrics.jsonl")
                            if "train/loss" in r]
    assert len(losses[True]) == 5 and losses[True] == losses[False]


@pytest.mark.parametrize("grad_clip", [1.0, None])
def test_fp16_loss_scaler_skipped_update_lowers_the_scale(grad_clip):
    """fp16 on the host-decided path (FSDP, foreach AdamW, the spike guard): an overflowing step is skipped by cpt's
    guard, which must still end the loss scaler's step. accelerate builds its GradScaler on CUDA only, so the CPU
    accelerator is given one as it would be there (CPU GradScaler, native AMP). Before the fix the scale stayed put
    and the next step raised "unscale_() has already been called on this optimizer since the last update()"."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # (process-wide: an earlier test's precision)
    try:
        _fp16_steps(Accelerator(cpu=True, mixed_precision="fp16"), grad_clip)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # fp16 stays out of later tests


def _fp16_steps(acc, grad_clip):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    before = [p.detach().clone() for p in model.parameters()]
    step0_overflows = lambda m, step: m(torch.randn(4, 8) * (1e30 if step == 0 else 1)).pow(2).mean()  # noqa: E731
    guard, applied, _, norms = _fp16_guarded_run(acc, False, step0_overflows, 4, 2.0 ** 16, 5, model, grad_clip)
    assert applied == [False, True, True, True]
    assert acc.scaler.get_scale() == 2.0 ** 15  # the overflow halved the scale
    assert guard.nonfinite_total == 1
    assert all(n < 100 for n in norms[1:])  # the true (unscaled) gradient norm, also without clipping
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _fp16_guarded_run(acc, fused, loss_of, steps, init_scale, max_in_a_row, model=None, grad_clip=1.0):
    """``steps`` guarded fp16 steps of ``model`` (default: a seeded Linear(8, 1)) under a CPU GradScaler (accelerate
    builds its GradScaler on CUDA only); returns the guard, whether each update was applied, whether the guard asked
    to stop after each, and each step's gradient norm."""
    from cpt.optim import clip_grad_norm
    from cpt.update_guard import UpdateGuard

    acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=init_scale), True
    if model is None:
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 1)
    model, opt = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused))
    guard = UpdateGuard(acc, opt, max_in_a_row=max_in_a_row, say=lambda *a: None)
    assert guard.on_device == fused
    applied, stop, norms = [], [], []
    for step in range(steps):
        loss = loss_of(model, step)
        acc.backward(loss)
        norm = clip_grad_norm(acc, model, grad_clip)
        applied.append(bool(guard.step(loss.detach(), norm, step).applied))
        norms.append(float(norm))
        guard.sync(step + 1)
        stop.append(guard.too_many_in_a_row())
        opt.zero_grad()
    return guard, applied, stop, norms


@pytest.mark.parametrize("fused", [False, True], ids=["host-decided", "device-decided"])
def test_fp16_loss_scale_overflows_are_not_non_finite_steps(fused):
    """fp16's loss scaler overflows by design, several times in a row at the start of a run (the scale starts at 2^16
    and is halved per overflow). Those steps were counted as non-finite, so `max_nonfinite_in_a_row` (default 5)
    stopped an fp16 run before its scale had come down. Now they are loss-scale overflows: skipped, the scale
    lowered, counted apart (train/overflow_skipped), while a non-finite loss still counts, and an overflow once
    the scale is <= 1 (lowering it cannot help) counts too. The overflow is fp16's own: the gradient reaching the
    linear layer's fp16 output under autocast is the scale itself, above fp16's 65,504 from 2^23 down to 2^16 (8
    overflows in a row); 2^15 fits."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    x = torch.ones(1, 8)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        acc = Accelerator(cpu=True, mixed_precision="fp16")
        guard, applied, stop, _ = _fp16_guarded_run(acc, fused, lambda m, s: m(x).float().sum(), 11, 2.0 ** 23, 5)
        assert applied == [False] * 8 + [True] * 3
        assert not any(stop)
        assert (guard.overflow_total, guard.nonfinite_total, guard.in_a_row) == (8, 0, 0)
        assert guard.metrics() == {"train/nonfinite_skipped": 0, "train/overflow_skipped": 8,
                                   "train/loss_scale": 2.0 ** 15}

        # a NaN loss is non-finite whatever the scale
        AcceleratorState._reset_state(reset_partial_state=True)
        acc = Accelerator(cpu=True, mixed_precision="fp16")
        guard, applied, stop, _ = _fp16_guarded_run(acc, fused, lambda m, s: m(x).sum() * float("nan"), 3, 2.0 ** 16, 2)
        assert applied == [False] * 3 and stop == [False, True, True] and guard.overflow_total == 0

        # gradients that overflow at every scale (finite loss, infinite gradient): overflows down to scale 2, then
        # non-finite steps from scale 1 on, and the stop after max_in_a_row of them
        AcceleratorState._reset_state(reset_partial_state=True)
        acc = Accelerator(cpu=True, mixed_precision="fp16")
        broken = lambda m, s: (m.weight - m.weight.detach()).sqrt().sum() + m(x).float().sum()  # noqa: E731 - finite
        guard, applied, stop, _ = _fp16_guarded_run(acc, fused, broken, 8, 16.0, 3)
        assert not any(applied)
        assert guard.overflow_total == 4  # scales 16, 8, 4, 2
        assert stop == [False] * 6 + [True] * 2  # scales 1, 0.5, 0.25: the third non-finite step in a row stops
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
