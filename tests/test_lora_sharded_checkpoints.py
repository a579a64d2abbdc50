"""LoRA resume checkpoints under FSDP2, ZeRO-2 and ZeRO-3 hold the adapter, not the frozen base (cpt/adapter_shards.py),
launched as the README tells users (`scripts/launch.sh run.yaml fsdp|zero2|zero3`, NUM_GPUS=2, CPU jobs by the
environment alone: tests/test_launch_shipped.py):

* the 2-process run gives the 1-process run's losses; its checkpoints (written in the background: FSDP2 by DCP's
  async_save, cpt/sharded_save.py; DeepSpeed's files by cpt/zero_save.py) hold the adapter's tensors and optimizer
  state and `adapter_base.json`, no tensor of the base (and weigh a small fraction of it);
* the run as if killed after its step-3 checkpoint, resumed by the same launch with --resume, gives the
  uninterrupted run's losses bitwise (the backend's own loader: DCP for FSDP2, DeepSpeed's load_checkpoint);
* the same checkpoint resumed on 1 process (cpt/consolidate.py) gives them to 1e-5; under a changed base it is
  refused in one line, nothing trained;
* `cpt export --adapter` of it, like the run's own adapter export, is a peft adapter that transformers + peft load
  and that reproduces the logged held-out loss (this replaced tests/test_train_distributed.py's FSDP2 LoRA run, which
  checked the losses and the export alone).

One 2-process run and one resume per strategy (6 launches, the bulk of this file's time).
"""

import json
import shutil
from pathlib import Path

import pytest

from cpt.config import load_config
from launching import ROOT, after, assert_close, evals, finish, losses, rank_env, start, two_process_config, world_sizes
from launching import runs_once
from launching import write_config as write

pytestmark = pytest.mark.slow

STEPS, EVERY = 6, 3
STRATEGIES = ["fsdp", "zero2", "zero3"]


def make_cfg(tiny_cpt_data, base, out: Path) -> dict:
    """6 steps of 8 sequences, LoRA r=8 on every linear layer; checkpoints and held-out losses at steps 3 and 6."""
    return two_process_config(tiny_cpt_data, base, out, steps=STEPS, eval_every=EVERY, lora=True, weight_decay=0.0,
                              checkpoint={"every": EVERY, "keep": 5})


def launch(strategy: str, cfg: dict, cfg_path: Path, *extra: str) -> str:
    env = {**rank_env(cpu=strategy == "fsdp", fsdp_on_cpu=strategy == "fsdp"), "NUM_GPUS": "2"}
    rc, log = finish(start([str(ROOT / "scripts" / "launch.sh"), str(write(cfg, cfg_path)), strategy, *extra],
                           cfg_path.parent, env))
    assert rc == 0, log[-5000:]
    return log


def killed_after_step_3(run: Path, out: Path, cfg: dict) -> dict:
    """A copy of the finished ``run`` holding its step-3 checkpoint alone (as if killed right after it), its config."""
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / f"step_{EVERY:08d}", out / "checkpoints" / f"step_{EVERY:08d}")
    return {**cfg, "run": {**cfg["run"], "output_dir": str(out)}}


@pytest.fixture(scope="module")
def reference(tiny_cpt_data, tiny_base, tmp_path_factory):
    """The 1-process run (in-process)."""
    from cpt.train import train

    out = tmp_path_factory.mktemp("one") / "run"
    train(load_config(base=make_cfg(tiny_cpt_data, tiny_base, out)), echo=lambda *a, **k: None)
    return out


@pytest.fixture(scope="module")
def sharded(tiny_cpt_data, tiny_base, tmp_path_factory):
    """Each strategy's 2-process LoRA run, launched once (on first use)."""
    return runs_once(tmp_path_factory,
                     lambda strategy, d: launch(strategy, make_cfg(tiny_cpt_data, tiny_base, d / "run"), d / "run.yaml"))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lora_checkpoint_holds_the_adapter_alone_and_resumes_exactly(strategy, sharded, reference, tiny_cpt_data,
                                                                     tiny_base, tmp_path):
    from cpt.adapter_checkpoint import ADAPTER_BASE
    from cpt.checkpoint import verify_checkpoint
    from cpt.consolidate import layout, read_model_state, read_optimizer_state

    run = sharded(strategy)
    assert world_sizes(run) == {2}
    assert_close(losses(run), losses(reference))
    assert_close(evals(run), evals(reference))

    # checkpoint.async_save (the default) writes the files in the background: FSDP2's shards by DCP (cpt/sharded_save.py),
    # DeepSpeed's (exclude_frozen_parameters) by cpt/zero_save.py; the run says so
    said = ("written in the background (torch.distributed.checkpoint.async_save)" if strategy == "fsdp"
            else "DeepSpeed's checkpoint files are written in the background")
    assert said in (run / "train.log").read_text()
    ckpt = run / "checkpoints" / f"step_{EVERY:08d}"
    assert verify_checkpoint(ckpt) is None and layout(ckpt) == ("fsdp" if strategy == "fsdp" else "deepspeed")
    record = json.loads((ckpt / ADAPTER_BASE).read_text())
    ref_record = json.loads((reference / "checkpoints" / f"step_{EVERY:08d}" / ADAPTER_BASE).read_text())
    assert record["fingerprint"] == ref_record["fingerprint"] is not None  # the same base, hashed once per run
    weights = read_model_state(ckpt)
    adapter = read_model_state(reference / "checkpoints" / f"step_{EVERY:08d}")  # the 1-process adapter_state
    assert sorted(weights) == sorted(adapter) and all(".lora_" in k for k in weights)  # no tensor of the base
    assert sorted(read_optimizer_state(ckpt)) == sorted(adapter)
    # the files besides the optimizer state (the model's shards, RNG states, cpt's own) weigh a fraction of the base
    # (the adapter, r=8 on a 64-wide model: 12% of it; the rest is each format's per-tensor overhead)
    optimizer = lambda p: "optimizer_0" in p.parts or p.name.endswith("optim_states.pt")  # noqa: E731
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file() and not optimizer(p))
    base_bytes = (tiny_base / "model.safetensors").stat().st_size
    assert size < 0.5 * base_bytes, (size, base_bytes)

    # killed after the step-3 checkpoint, resumed by the same launch (FSDP2 here; DeepSpeed's own loader,
    # load_state(load_module_strict=False), reads these checkpoints in the resume on one process below; a launch less
    # each for the CI budget)
    if strategy != "fsdp":
        return
    cfg = killed_after_step_3(run, tmp_path / "resumed", make_cfg(tiny_cpt_data, tiny_base, run))
    log = launch(strategy, cfg, tmp_path / "resumed.yaml", "--resume")
    assert "resumed" in log and "another backend" not in log, log[-3000:]  # the backend's own loader
    assert losses(tmp_path / "resumed") == after(run, EVERY)  # bitwise: the same backend and world size, fp32
    assert evals(tmp_path / "resumed") == after(run, EVERY, of=evals)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_sharded_lora_checkpoint_resumes_on_one_process_and_exports(strategy, sharded, tiny_cpt_data, tiny_base,
                                                                       tmp_path):
    """2 processes -> 1 (cpt/consolidate.py: the adapter and its Adam state over the base the run builds); a changed
    base is refused; `cpt export --adapter` loads with transformers + peft and reproduces the held-out loss."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt.checkpoint import CheckpointError
    from cpt.cli import main
    from cpt.data.loader import load_heldout
    from cpt.data.sources import HeldoutConfig
    from cpt.evaluate import heldout_loss
    from cpt.train import train

    run = sharded(strategy)
    cfg = killed_after_step_3(run, tmp_path / "one", make_cfg(tiny_cpt_data, tiny_base, run))
    result = train(load_config(base=cfg), resume=True, echo=lambda *a, **k: None)
    assert result.step == STEPS and world_sizes(tmp_path / "one") == {1}
    assert_close(losses(tmp_path / "one"), after(run, EVERY))
    assert_close(evals(tmp_path / "one"), after(run, EVERY, of=evals))

    other = tmp_path / "other_base"  # the same architecture, one weight changed
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    model.save_pretrained(other)
    for f in tiny_base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, other / f.name)
    moved = killed_after_step_3(run, tmp_path / "moved", make_cfg(tiny_cpt_data, other, run))
    with pytest.raises(CheckpointError, match="another base model"):
        train(load_config(base=moved), resume=True, echo=lambda *a, **k: None)
    assert not losses(tmp_path / "moved")  # (nothing trained)

    assert main(["export", str(run), "--adapter", "--out", str(tmp_path / "adapter")]) == 0  # (its step-6 checkpoint)
    h = HeldoutConfig(name="python", path=str(tiny_cpt_data / "data" / "python" / "heldout"), tag="downstream")
    for adapter in (tmp_path / "adapter", run / "export"):  # and the run's own export (gathered at its end)
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(adapter))
        tokens = load_heldout(h, AutoTokenizer.from_pretrained(adapter), cfg["data"]["seq_len"], cfg["eval"]["tokens_per_set"])
        assert heldout_loss(peft, tokens, 16) == pytest.approx(evals(run)[STEPS], abs=1e-5), adapter
