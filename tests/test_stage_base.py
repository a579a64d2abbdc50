"""Two-stage CPT: a LoRA (or model.freeze) stage started straight from a full CPT run's checkpoint (train.init_from),
without exporting it first (cpt/stage_base.py).

* a LoRA stage from a full model's checkpoint (1 process; a 2-process FSDP2 one, DCP shards; a model.freeze run's, which leaves
  its frozen base out) gives exactly the losses, held-out losses and adapter of the documented manual path (`cpt
  export CKPT --out DIR`, then train.init_from DIR); a model.freeze stage does too;
* the base is written once into the LoRA run's directory (RUN/base): with the earlier run deleted, the LoRA run
  resumes exactly (also after being moved), `cpt export` (merged and --adapter) loads with plain transformers/peft,
  a later LoRA stage from its checkpoint builds that base, and a changed or missing base is refused in one line; a --resume whose base/ was deleted writes it again;
* under FSDP2 on 2 processes the LoRA run resumes from its 1-process checkpoint (1 -> 2), writing its missing base
  again on the main process while the other waits.

Two 2-process launches (a full FSDP2 run, the FSDP2 resume); the rest in-process.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cpt.config import load_config
from launching import ROOT, after, assert_close, evals, finish, losses, rank_env, start, two_process_config, world_sizes
from launching import write_config as write

pytestmark = pytest.mark.slow

STEPS, EVERY = 6, 3


def run(cfg: dict, **kw) -> str:
    from cpt.train import train

    lines: list[str] = []
    train(load_config(base=cfg), echo=lambda *a, **k: lines.append(" ".join(map(str, a))), **kw)
    return "\n".join(lines)


def config(tiny_cpt_data, base, out: Path, init_from=None, mode: str = "lora", steps: int = STEPS) -> dict:
    """6 steps of 8 sequences (the same data and updates on 1 or 2 processes), checkpoints and held-out losses every
    3 steps; ``mode``: ``lora`` (r=8 on every linear layer), ``freeze`` (layer 0 of 2 frozen) or ``full``."""
    cfg = two_process_config(tiny_cpt_data, base, out, steps=steps, eval_every=EVERY, lora=mode == "lora",
                             weight_decay=0.0, checkpoint={"every": EVERY, "keep": 5})
    if mode == "freeze":
        cfg["model"]["freeze"] = {"layers": "0-1"}
    cfg["train"]["init_from"] = None if init_from is None else str(init_from)
    return cfg


def launch(strategy: str, cfg: dict, cfg_path: Path, *extra: str) -> str:
    """`scripts/launch.sh CONFIG STRATEGY` on 2 CPU processes, as the README tells users."""
    env = {**rank_env(cpu=strategy == "fsdp", fsdp_on_cpu=strategy == "fsdp"), "NUM_GPUS": "2"}
    rc, log = finish(start([str(ROOT / "scripts" / "launch.sh"), str(write(cfg, cfg_path)), strategy, *extra],
                           cfg_path.parent, env))
    assert rc == 0, log[-5000:]
    return log


def export(ckpt: Path, out: Path, *flags: str) -> Path:
    from cpt.cli import main

    assert main(["export", str(ckpt), "--out", str(out), *flags]) == 0
    return out


def same_tensors(a: Path, b: Path, name: str = "adapter_model.safetensors") -> bool:
    x, y = load_file(a / name), load_file(b / name)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def killed_after_step_3(run_dir: Path, out: Path, cfg: dict) -> dict:
    """The finished run as if killed after its step-3 checkpoint, copied to ``out`` (a moved run directory)."""
    shutil.copytree(run_dir, out)
    shutil.rmtree(out / "checkpoints" / f"step_{STEPS:08d}")
    shutil.rmtree(out / "export")
    return {**cfg, "run": {**cfg["run"], "output_dir": str(out)}}


@pytest.fixture(scope="module")
def trunk(tiny_cpt_data, tiny_base, tmp_path_factory):
    """A full CPT run of 3 steps on 1 process (in-process): the first stage."""
    out = tmp_path_factory.mktemp("trunk") / "run"
    run(config(tiny_cpt_data, tiny_base, out, mode="full", steps=EVERY))
    return out / "checkpoints" / f"step_{EVERY:08d}"


@pytest.fixture(scope="module")
def lora_stage(tiny_cpt_data, tiny_base, trunk, tmp_path_factory):
    """The LoRA stage from the trunk's checkpoint (in-process), its config and log."""
    out = tmp_path_factory.mktemp("stage") / "run"
    cfg = config(tiny_cpt_data, tiny_base, out, init_from=trunk)
    return out, cfg, run(cfg)


def test_a_lora_stage_from_a_full_checkpoint_is_the_export_path_and_outlives_the_trunk(
        lora_stage, trunk, tiny_cpt_data, tiny_base, tmp_path):
    """It was refused ("export it and start the LoRA run from DIR"). Now: the manual path's losses bitwise; the base
    written once into the run directory; with the trunk deleted, an exact resume (of a moved copy), `cpt export`
    merged and adapter-only loading with transformers/peft, a changed or missing base refused in one line."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt.adapter_checkpoint import read_base_record
    from cpt.checkpoint import CheckpointError
    from cpt.data.loader import load_heldout
    from cpt.data.sources import HeldoutConfig
    from cpt.evaluate import heldout_loss

    stage, cfg, log = lora_stage
    base = stage / "base"
    assert f"written once to {base.absolute()}" in log and (base / "model.safetensors").is_file()
    assert json.loads((base / "cpt_base.json").read_text())["checkpoint"] == str(trunk.absolute())
    record = read_base_record(stage / "checkpoints" / f"step_{EVERY:08d}")
    assert record["base"] == str(base.absolute()) and record["base_from"]["step"] == EVERY

    # the documented manual path: export the trunk's checkpoint, start the LoRA run from the export
    manual = tmp_path / "manual"
    mcfg = config(tiny_cpt_data, tiny_base, manual, init_from=export(trunk, tmp_path / "trunk-export"))
    run(mcfg)
    assert losses(stage) == losses(manual) and sorted(losses(stage)) == list(range(1, STEPS + 1))  # bitwise
    assert evals(stage) == evals(manual) and same_tensors(stage / "export", manual / "export")
    assert read_base_record(manual / "checkpoints" / f"step_{EVERY:08d}")["fingerprint"] == record["fingerprint"]

    # base/ deleted while the trunk is still there: --resume writes it again (the fingerprint then compares)
    again = killed_after_step_3(stage, tmp_path / "again", cfg)
    shutil.rmtree(tmp_path / "again" / "base")
    log = run(again, resume=True)
    assert "is missing: writing it again" in log and losses(tmp_path / "again") == losses(stage)

    # the trunk's run gone (checkpoint.keep pruned it, or it was deleted): everything still works from RUN/base
    gone = tmp_path / "gone-trunk"
    shutil.copytree(trunk.parent.parent, gone)
    shutil.rmtree(trunk.parent.parent)
    try:
        moved = killed_after_step_3(stage, tmp_path / "moved", cfg)  # (a moved copy of the LoRA run)
        log = run(moved, resume=True)
        assert "resumed" in log and losses(tmp_path / "moved") == losses(stage)
        assert same_tensors(tmp_path / "moved" / "export", stage / "export")

        ckpt = stage / "checkpoints" / f"step_{STEPS:08d}"
        merged, adapter = export(ckpt, tmp_path / "merged"), export(ckpt, tmp_path / "adapter", "--adapter")
        plain = AutoModelForCausalLM.from_pretrained(merged)
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter))
        h = HeldoutConfig(name="python", path=str(tiny_cpt_data / "data" / "python" / "heldout"), tag="downstream")
        tokens = load_heldout(h, AutoTokenizer.from_pretrained(adapter), cfg["data"]["seq_len"], cfg["eval"]["tokens_per_set"])
        for model in (plain, peft):
            assert heldout_loss(model.eval(), tokens, 16) == pytest.approx(evals(stage)[STEPS], abs=1e-5)
        assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base.absolute())

        later = config(tiny_cpt_data, tiny_base, tmp_path / "later", init_from=ckpt, steps=EVERY)  # a third stage, LoRA again
        later["eval"]["at_start"] = True
        run(later)  # (its base: the LoRA stage's base/, followed back through its checkpoint)
        assert evals(tmp_path / "later")[0] == evals(stage)[STEPS]

        changed = killed_after_step_3(stage, tmp_path / "changed", cfg)
        weights = load_file(tmp_path / "changed" / "base" / "model.safetensors")
        weights["model.norm.weight"] = weights["model.norm.weight"] + 1e-3
        save_file(weights, tmp_path / "changed" / "base" / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match="base/ folder is missing or changed") as e:
            run(changed, resume=True)
        assert "\n" not in str(e.value) and str(trunk.absolute()) in str(e.value)
        assert not (tmp_path / "changed" / "checkpoints" / f"step_{STEPS:08d}").exists()  # nothing trained
        shutil.rmtree(tmp_path / "changed" / "base")  # missing, and the trunk gone: the same refusal
        with pytest.raises(CheckpointError, match="base/ folder is missing or changed"):
            run(changed, resume=True)
        from cpt.cli import main

        assert main(["export", str(tmp_path / "changed"), "--out", str(tmp_path / "x")]) == 1
    finally:
        shutil.copytree(gone, trunk.parent.parent)  # (the trunk fixture, for the next tests)


def test_stages_from_a_sharded_full_checkpoint_and_from_a_freeze_checkpoint_are_the_export_path(
        tiny_cpt_data, tiny_base, tmp_path):
    """The full trunk on 2 processes under FSDP2 (DCP shards of world size 2): a LoRA stage and a
    model.freeze stage from it on 1 process give the manual path's losses bitwise. A LoRA stage from a model.freeze
    run's checkpoint (its trained part alone; it was refused: "export the whole model") does too."""
    trunk = tmp_path / "fsdp"
    launch("fsdp", config(tiny_cpt_data, tiny_base, trunk, mode="full", steps=EVERY), tmp_path / "fsdp.yaml")
    assert world_sizes(trunk) == {2} and not (trunk / "checkpoints" / f"step_{EVERY:08d}" / "model.safetensors").exists()
    exported = export(trunk, tmp_path / "fsdp-export")  # (the run directory: its newest checkpoint)
    for mode in ("lora", "freeze"):
        direct, manual = tmp_path / f"{mode}-direct", tmp_path / f"{mode}-manual"
        run(config(tiny_cpt_data, tiny_base, direct, init_from=trunk, mode=mode, steps=EVERY))
        run(config(tiny_cpt_data, tiny_base, manual, init_from=exported, mode=mode, steps=EVERY))
        assert losses(direct) == losses(manual) and len(losses(direct)) == EVERY, mode
        assert evals(direct) == evals(manual), mode

    frozen = tmp_path / "freeze-trunk"  # a model.freeze run from the base: its checkpoint leaves layer 0 out
    run(config(tiny_cpt_data, tiny_base, frozen, mode="freeze", steps=EVERY))
    assert (frozen / "checkpoints" / f"step_{EVERY:08d}" / "adapter_state.safetensors").is_file()
    direct, manual = tmp_path / "lora-on-freeze", tmp_path / "lora-on-freeze-manual"
    run(config(tiny_cpt_data, tiny_base, direct, init_from=frozen, steps=EVERY))
    run(config(tiny_cpt_data, tiny_base, manual, init_from=export(frozen, tmp_path / "freeze-export"), steps=EVERY))
    assert losses(direct) == losses(manual) and same_tensors(direct / "export", manual / "export")


def test_the_lora_stage_resumes_under_fsdp2_on_two_processes(lora_stage, tmp_path):
    """Its 1-process checkpoint resumed under FSDP2 on 2 processes, base/ deleted first: the main process writes it
    again from the trunk's checkpoint (the other waits), and the run gives the 1-process losses (to 1e-5)."""
    stage, cfg, _ = lora_stage
    cfg = killed_after_step_3(stage, tmp_path / "fsdp", cfg)
    shutil.rmtree(tmp_path / "fsdp" / "base")
    log = launch("fsdp", cfg, tmp_path / "fsdp.yaml", "--resume")
    assert "is missing: writing it again" in log and "resumed" in log
    assert world_sizes(tmp_path / "fsdp") == {1, 2}
    assert_close(after(tmp_path / "fsdp", EVERY), after(stage, EVERY))
    assert_close(after(tmp_path / "fsdp", EVERY, of=evals), after(stage, EVERY, of=evals))
    assert (tmp_path / "fsdp" / "base" / "cpt_base.json").is_file()


def test_resuming_a_later_lora_stage_does_not_write_a_base_of_its_own(lora_stage, trunk, tiny_cpt_data, tiny_base, tmp_path):
    """A third stage, LoRA again, from the LoRA stage's checkpoint builds that stage's base/ (its adapter_base.json
    names the trunk as base_from, through it). Its --resume, with the trunk still there, took the base as missing: it
    said "(this LoRA run's base) is missing: writing it again" and wrote a second copy of the base (fp32, 4 bytes a
    parameter) into the third stage's directory. Now it builds the LoRA stage's base/, as the fresh start did."""
    stage, _, _ = lora_stage
    ckpt = stage / "checkpoints" / f"step_{STEPS:08d}"
    later = config(tiny_cpt_data, tiny_base, tmp_path / "later", init_from=ckpt, steps=STEPS)
    run(later)
    moved = killed_after_step_3(tmp_path / "later", tmp_path / "later-killed", later)
    log = run(moved, resume=True)
    assert "is missing: writing it again" not in log and not (tmp_path / "later-killed" / "base").exists()
    assert losses(tmp_path / "later-killed") == losses(tmp_path / "later")
