"""Loss-spike guard (train.skip_spikes): the decision rule, its state, and `cpt train` skipping a spiked step
exactly as if its update had never happened."""

import math
from pathlib import Path

import pytest
import torch

from cpt.spikes import SpikeGuard


def feed(g: SpikeGuard, values, grad=1.0):
    return [g.is_spike(v, grad) for v in values]


def noisy(n, level=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (level + 0.01 * torch.randn(n, generator=gen)).tolist()


def test_judges_only_with_enough_history():
    g = SpikeGuard(sigma=3, window=8, min_history=4)
    assert feed(g, [3.0, 3.01, 50.0]) == [False, False, False]  # 2 values known when 50 came: not judged
    g = SpikeGuard(sigma=3, window=8, min_history=4)
    assert feed(g, noisy(4)) == [False] * 4
    assert g.is_spike(3.5, 1.0) is True  # 50 std above
    assert g.is_spike(2.0, 1.0) is False  # far *below* is never a spike


def test_gradient_norm_spike_alone_is_a_spike():
    g = SpikeGuard(sigma=4, window=16, min_history=8)
    for i, v in enumerate(noisy(10)):
        assert g.is_spike(v, 1.0 + 0.01 * (i % 3)) is False
    assert g.is_spike(3.0, 5.0) is True
    assert g.is_spike(float("nan"), 1.0) is False and g.is_spike(3.0, math.inf) is False  # not this guard's job
    assert len(g.losses) == 11  # non-finite values were not recorded


def test_level_shift_is_absorbed_and_runs_of_skips_are_capped():
    g = SpikeGuard(sigma=3, window=8, min_history=4, max_in_a_row=3)
    feed(g, noisy(8))
    shifted = feed(g, [4.0] * 10)  # a harder mix: the new level enters the window and stops being a spike
    assert shifted[0] is True and not any(shifted[4:])
    assert sum(shifted) <= 3
    g = SpikeGuard(sigma=3, window=64, min_history=4, max_in_a_row=2)
    feed(g, noisy(60))
    assert feed(g, [9.0, 9.0, 9.0, 9.0]) == [True, True, False, True]  # third in a row let through


def test_reset_and_state_round_trip():
    g = SpikeGuard(sigma=3, window=8, min_history=4)
    feed(g, noisy(6))
    h = SpikeGuard(sigma=3, window=8, min_history=4)
    h.load_state_dict(g.state_dict())
    future = noisy(5, seed=1) + [7.0] + noisy(3, seed=2)
    assert feed(g, future) == feed(h, future)
    assert g.skipped == h.skipped == 1
    g.reset()
    assert g.is_spike(100.0, 1.0) is False and g.skipped == 1  # no history after a stage switch; the count stays
    with pytest.raises(ValueError):
        SpikeGuard(window=8, min_history=9)



def test_switched_on_by_a_resume_starts_with_an_empty_window():
    """train.skip_spikes added on a --resume (--allow-config-change) of a run without it: the guard starts as at a
    stage switch (its window empty) instead of the resume being refused (the checkpoint holds no 'spikes' state)."""
    from cpt.state import restore

    g = SpikeGuard(sigma=3, window=8, min_history=4)
    restore({"spikes": g}, {"format": 2}, {})
    assert not g.losses and g.skipped == 0
    assert feed(g, noisy(4) + [7.0]) == [False] * 4 + [True]

@pytest.mark.slow
def test_train_skips_a_spiked_step_like_a_skipped_update(tiny_cpt_data, tmp_path, monkeypatch):
    """A step whose loss is multiplied by 50 is skipped by the guard; every later loss equals, bit for bit, a run
    in which that step was skipped as non-finite (same data position, no update, same optimizer state)."""
    import cpt.lm_loss as lm_loss
    from conftest import tiny_run_config
    from cpt.config import load_config
    from cpt.metrics import read_metrics
    from cpt.train import train

    real = lm_loss.causal_lm_loss

    def run(name: str, factor: float):
        out = tmp_path / name
        cfg = tiny_run_config(tiny_cpt_data, out, eval={"at_start": False}, checkpoint={"every": None, "export_at_end": False})
        cfg["stages"][0]["steps"] = 12
        cfg["data"]["heldout"] = []
        cfg["train"]["skip_spikes"] = {"sigma": 6.0, "window": 16, "min_history": 4}
        micro_per_step = cfg["train"]["global_batch_size"] // cfg["train"]["micro_batch_size"]
        calls = {"n": 0}

        def fake(*a, **k):
            calls["n"] += 1
            out = real(*a, **k)
            bad = (calls["n"] - 1) // micro_per_step == 7  # step 8 (1-based)
            return out._replace(loss=out.loss * factor, row_losses=out.row_losses * factor) if bad else out

        monkeypatch.setattr(lm_loss, "causal_lm_loss", fake)
        train(load_config(base=cfg), echo=lambda *a, **k: None)
        return [r for r in read_metrics(Path(out) / "metrics.jsonl") if "train/loss" in r]

    spiked, nan = run("spiked", 50.0), run("nan", float("nan"))
    assert spiked[-1]["train/spikes_skipped"] == 1 and spiked[-1]["train/nonfinite_skipped"] == 0
    assert nan[-1]["train/nonfinite_skipped"] == 1 and nan[-1]["train/spikes_skipped"] == 0
    by_step = lambda recs: {r["step"]: r["train/loss"] for r in recs}  # noqa: E731
    a, b = by_step(spiked), by_step(nan)
    assert a[8] > 20 * a[7]  # the spike itself is logged
    assert [a[s] for s in range(9, 13)] == [b[s] for s in range(9, 13)]
    assert [a[s] for s in range(1, 8)] == [b[s] for s in range(1, 8)]


def test_refused_under_deepspeed():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from cpt.config import SpikeConfig
    from cpt.distributed import LaunchError
    from cpt.spikes import SpikeGuard

    cfg = SimpleNamespace(train=SimpleNamespace(skip_spikes=SpikeConfig(sigma=5)))
    ds = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED)
    with pytest.raises(LaunchError, match="skip_spikes"):
        SpikeGuard.for_run(cfg, ds)
    guard = SpikeGuard.for_run(cfg, SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))
    assert guard.sigma == 5 and guard.window == 128 and guard.min_history == 64
