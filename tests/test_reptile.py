"""Reptile meta-updates (train.reptile, the gradient alignment of MER): the update rule, its state, the refusals,
and `cpt train` with it (the curve leaves plain training at the first meta-update; resume is exact)."""

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cpt.reptile import Reptile


def toy() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    m[1].bias.requires_grad_(False)  # frozen: never anchored, never touched
    return m


def test_meta_update_rule():
    m = toy()
    w0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    r = Reptile(m, every=2, epsilon=0.25)
    assert set(r.anchor) == {"0.weight", "0.bias", "1.weight"}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)  # "training" moves every weight, the frozen one too (as a stand-in)
    assert r.step(m, 1) is False  # not a multiple of every: untouched
    params = dict(m.named_parameters())
    assert torch.equal(params["0.weight"], w0["0.weight"] + 1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    assert r.step(m, 2) is True and r.meta_updates == 1
    for n in r.anchor:  # anchor + 0.25 * ((w0 + 2) - anchor) = w0 + 0.5
        assert torch.allclose(params[n], w0[n] + 0.5), n
        assert torch.equal(r.anchor[n], params[n].float())
    assert torch.equal(params["1.bias"], w0["1.bias"] + 2)  # frozen parameter left alone
    # next cycle starts from the new anchor
    with torch.no_grad():
        params["0.weight"].add_(4.0)
    r.step(m, 4)
    assert torch.allclose(params["0.weight"], w0["0.weight"] + 1.5)


def test_epsilon_one_is_plain_training():
    m = toy()
    r = Reptile(m, every=1, epsilon=1.0)
    with torch.no_grad():
        m[0].weight.mul_(3.0)
    before = m[0].weight.detach().clone()
    r.step(m, 1)
    assert torch.equal(m[0].weight, before)


def test_state_round_trip_and_mismatch():
    m = toy()
    r = Reptile(m, every=3, epsilon=0.5)
    with torch.no_grad():
        m[0].weight.add_(1.0)
    r.step(m, 3)
    sd = r.state_dict()
    assert sorted(sd) == ["anchor.0.bias", "anchor.0.weight", "anchor.1.weight", "meta_updates"]
    assert int(sd["meta_updates"]) == 1
    fresh = Reptile(toy(), every=3, epsilon=0.5)
    fresh.load_state_dict(sd)
    assert fresh.meta_updates == 1 and r.anchor and all(torch.equal(fresh.anchor[n], r.anchor[n]) for n in r.anchor)
    with pytest.raises(KeyError, match="train.reptile"):
        fresh.load_state_dict({"anchor.0.weight": torch.zeros(3, 4), "meta_updates": sd["meta_updates"]})  # another model
    for bad in ({"every": 0, "epsilon": 0.5}, {"every": 2, "epsilon": 0.0}, {"every": 2, "epsilon": 1.5}):
        with pytest.raises(ValueError):
            Reptile(toy(), **bad)


def test_sharded_parameters_and_deepspeed_are_refused():
    from accelerate.utils import DistributedType

    from cpt.distributed import LaunchError

    m = toy()
    m[0].weight.ds_id = 7  # what DeepSpeed ZeRO-3 leaves on a partitioned parameter
    with pytest.raises(RuntimeError, match="sharded"):
        Reptile(m, every=2, epsilon=0.5)
    cfg = SimpleNamespace(train=SimpleNamespace(reptile=SimpleNamespace(every=2, epsilon=0.5)))
    for kind in ("DEEPSPEED", "FSDP"):
        acc = SimpleNamespace(distributed_type=DistributedType(kind), unwrap_model=lambda x: x)
        with pytest.raises(LaunchError, match="train.reptile"):
            Reptile.for_run(cfg, acc, toy())


def test_reptile_config_is_validated():
    from cpt.config import ConfigError, load_config

    base = {"model": {"name_or_path": "m"}, "data": {"sources": [{"name": "a", "path": "x"}]},
            "stages": [{"steps": 1, "mix": {"a": 1}}]}
    cfg = load_config(base={**base, "train": {"reptile": {"every": 4, "epsilon": 0.5}}})
    assert cfg.train.reptile.every == 4
    with pytest.raises(ConfigError, match="train.reptile.epsilon"):
        load_config(base={**base, "train": {"reptile": {"every": 4, "epsilon": 2}}})


@pytest.mark.slow
def test_train_with_reptile_and_exact_resume(tiny_cpt_data, tiny_base, tmp_path):
    """Steps 1..k equal plain training bit for bit; the meta-update after step k changes step k+1 on. A run
    resumed from a checkpoint taken between meta-updates (anchor != weights) repeats the uninterrupted losses."""
    from conftest import tiny_run_config
    from cpt.config import load_config
    from cpt.metrics import read_metrics
    from cpt.train import train

    def cfg_for(out, reptile):
        cfg = tiny_run_config(tiny_cpt_data, out, checkpoint={"every": 5, "keep": 3, "export_at_end": False},
                              eval={"every": 100, "at_start": False})
        cfg["model"] = {"name_or_path": str(tiny_base)}
        cfg["stages"][0]["steps"] = 9
        if reptile:
            cfg["train"]["reptile"] = {"every": 3, "epsilon": 0.5}
        return cfg

    def losses(out):
        return {r["step"]: r["train/loss"] for r in read_metrics(Path(out) / "metrics.jsonl") if "train/loss" in r}

    quiet = lambda *a, **k: None  # noqa: E731
    plain, rep = tmp_path / "plain", tmp_path / "reptile"
    train(load_config(base=cfg_for(plain, False)), echo=quiet)
    cfg = cfg_for(rep, True)
    train(load_config(base=cfg), echo=quiet)
    a, b = losses(plain), losses(rep)
    assert [a[s] for s in (1, 2, 3)] == [b[s] for s in (1, 2, 3)]
    assert all(a[s] != b[s] for s in range(4, 10))

    # resume from step 5 (last meta-update at step 3: the anchor is not the current weights)
    shutil.rmtree(rep / "checkpoints" / "step_00000009")
    result = train(load_config(base=cfg), resume=True, echo=quiet)
    assert result.step == 9
    assert losses(rep) == b


def test_the_ema_averages_the_weights_after_the_meta_update(tiny_cpt_data, tiny_base, tmp_path):
    """With train.ema_decay and train.reptile the EMA takes the weights training continues from, those after the
    meta-update; it was updated before it, with weights the run never kept (every: 1, epsilon 0.5: off by half a step)."""
    from safetensors.torch import load_file

    from conftest import tiny_run_config
    from cpt.config import load_config
    from cpt.train import train

    cfg = tiny_run_config(tiny_cpt_data, tmp_path / "run", checkpoint={"every": 1, "export_at_end": False},
                          eval={"at_start": False, "every": 100})
    cfg["model"] = {"name_or_path": str(tiny_base)}
    cfg["stages"][0]["steps"] = 2
    cfg["stages"][0]["schedule"]["warmup_steps"] = 1
    cfg["train"].update(ema_decay=0.5, reptile={"every": 1, "epsilon": 0.5})
    train(load_config(base=cfg), echo=lambda *a, **k: None)
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    name = "model.layers.0.mlp.up_proj.weight"
    base, weights = load_file(tiny_base / "model.safetensors")[name], load_file(ckpt / "model.safetensors")[name]
    state = load_file(ckpt / "state.safetensors")
    assert torch.equal(state[f"reptile.anchor.{name}"], weights)  # the meta-update of step 1 is in the weights
    assert torch.allclose(state[f"ema.shadow.{name}"], 0.5 * base + 0.5 * weights, atol=1e-7)


def test_ema_and_reptile_each_have_their_own_checkpoint_tensors():
    """Through the state registry each component's tensors live under its own name (no shared flat dict)."""
    from cpt.ema import EMA
    from cpt.state import flatten, restore

    m = toy()
    ema, rep = EMA(m, 0.9), Reptile(m, every=2, epsilon=0.5)
    with torch.no_grad():
        m[0].weight.add_(1.0)
    ema.update(m)
    rep.step(m, 2)
    doc, tensors = flatten({"ema": ema, "reptile": rep})
    assert doc == {"format": 2, "ema": {}, "reptile": {}}  # all their state is tensors
    assert "ema.shadow.0.weight" in tensors and "reptile.anchor.0.weight" in tensors and "reptile.meta_updates" in tensors
    ema2, rep2 = EMA(toy(), 0.9), Reptile(toy(), every=2, epsilon=0.5)
    restore({"ema": ema2, "reptile": rep2}, doc, tensors)
    assert ema.shadow and all(torch.equal(ema2.shadow[n], ema.shadow[n]) for n in ema.shadow)
    assert rep.anchor and all(torch.equal(rep2.anchor[n], rep.anchor[n]) for n in rep.anchor) and rep2.meta_updates == 1
