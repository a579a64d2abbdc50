"""Outputs that work elsewhere: precision taken from the run config only (a conflicting launch setting is refused,
naming both), tokenizers that transformers 4.x loads, LoRA adapters whose base path works from any directory, and
cpt checkpoints accepted wherever a model directory is (`cpt export`, `cpt eval`, `cpt interpolate`)."""

import json
import shutil

import pytest

from conftest import tiny_run_config
from cpt.accelerator import deepspeed_precision_conflict, launcher_precision_conflict

# ------------------------------------------------------------------------------------------ precision


@pytest.mark.parametrize("precision,launched,conflict", [
    ("bf16", "no", False),  # `accelerate launch` exports "no" when nothing was asked for
    ("bf16", "bf16", False),
    ("fp32", "bf16", True),
    ("bf16", "fp16", True),
    ("fp16", "fp16", False),
])
def test_launcher_precision_must_agree_with_train_precision(precision, launched, conflict):
    msg = launcher_precision_conflict(precision, {"ACCELERATE_MIXED_PRECISION": launched})
    assert (msg is not None) == conflict
    if conflict:
        assert f"train.precision is {precision}" in msg and f"mixed_precision={launched}" in msg


def test_no_launcher_setting_is_no_conflict():
    assert launcher_precision_conflict("fp32", {}) is None


@pytest.mark.parametrize("precision,ds,conflict", [
    ("bf16", {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}, False),
    ("fp32", {"bf16": {"enabled": False}, "fp16": {"enabled": False}}, False),  # "auto" after accelerate filled it
    ("fp32", {"bf16": {"enabled": True}}, True),
    ("bf16", {"bf16": {"enabled": True}, "fp16": {"enabled": False}}, False),
    ("bf16", {"fp16": {"enabled": "true"}}, True),
    ("fp16", {}, False),
])
def test_deepspeed_json_precision_must_agree_with_train_precision(precision, ds, conflict):
    msg = deepspeed_precision_conflict(precision, ds)
    assert (msg is not None) == conflict
    if conflict:
        assert f"train.precision is {precision}" in msg and "DeepSpeed config" in msg


def test_cpt_train_refuses_a_launch_asking_for_another_precision(tiny_cpt_data, tmp_path, monkeypatch, capsys):
    """What `accelerate launch --mixed_precision bf16` exports, against train.precision fp32: one line, exit 1,
    nothing written."""
    import yaml

    from cpt.cli import main

    cfg = tiny_run_config(tiny_cpt_data, tmp_path / "run")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert main(["train", str(tmp_path / "c.yaml")]) == 1
    err = capsys.readouterr().err
    assert "train.precision is fp32" in err and "mixed_precision=bf16" in err
    assert not (tmp_path / "run").exists()


def test_shipped_accelerate_configs_leave_precision_to_the_run_config():
    """accelerate refuses mixed_precision next to deepspeed_config_file; the others would conflict with
    train.precision: none of the shipped configs sets it."""
    import yaml

    from test_launch_shipped import ROOT

    for path in (ROOT / "configs" / "accelerate").glob("*.yaml"):
        assert "mixed_precision" not in yaml.safe_load(path.read_text()), path
    for path in (ROOT / "configs" / "deepspeed").glob("*.json"):
        cfg = json.loads(path.read_text())
        assert cfg["bf16"]["enabled"] == "auto" and cfg["fp16"]["enabled"] == "auto", path


def test_a_deepspeed_json_with_a_scheduler_or_optimizer_block_is_one_line(tiny_cpt_data, tmp_path):
    """cpt owns the LR schedule and the optimizer: a DeepSpeed JSON `scheduler` block trained (exit 0) with DeepSpeed
    stepping a schedule that cpt's LR overrode at every step (an `optimizer` block: accelerate's ValueError with a
    traceback at prepare). Launched as `accelerate launch
    --use_deepspeed --deepspeed_config_file` sets it up (one process)."""
    import os
    import subprocess
    import sys

    import yaml

    from cpt.accelerator import deepspeed_block_conflict
    from test_launch_shipped import ROOT

    shipped = json.loads((ROOT / "configs" / "deepspeed" / "zero2.json").read_text())
    assert deepspeed_block_conflict(shipped) is None
    assert "\"optimizer\" block" in deepspeed_block_conflict({**shipped, "optimizer": {"type": "AdamW"}})
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({**shipped, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}}))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_run_config(tiny_cpt_data, tmp_path / "run")))
    env = {**os.environ, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29571"}
    proc = subprocess.run([sys.executable, "-c", "import sys; from cpt.cli import main; sys.exit(main(sys.argv[1:]))",
                           "train", str(tmp_path / "c.yaml")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = [x for x in proc.stderr.splitlines() if x.startswith("cpt train: error:")]
    assert len(line) == 1 and "\"scheduler\" block" in line[0] and "learning rate" in line[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_zero3_exports_gather_without_the_users_flag():
    from cpt.accelerator import configure_deepspeed

    ds = {"zero_optimization": {"stage": 3}}
    configure_deepspeed(ds, micro_batch=2, grad_accum=2, global_batch=8, grad_clip=1.0)
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    ds2 = {"zero_optimization": {"stage": 2}}
    configure_deepspeed(ds2, micro_batch=2, grad_accum=2, global_batch=8, grad_clip=None)
    assert "stage3_gather_16bit_weights_on_model_save" not in ds2["zero_optimization"]


# ------------------------------------------------------------------------------------------ tokenizer

# the tokenizer classes a tokenizer.json-only tokenizer may name so that transformers 4.56 (pyproject's floor) loads
# it: PreTrainedTokenizerFast, or a model-specific class 4.x has. transformers 5's TokenizersBackend is not one.
LOADABLE_IN_4X = {"PreTrainedTokenizerFast", "LlamaTokenizerFast", "GPT2TokenizerFast", "LlamaTokenizer", "GPT2Tokenizer"}


def test_written_tokenizer_names_a_class_transformers_4_has(tiny_cpt_data, tmp_path):
    from transformers import AutoTokenizer

    from cpt.export import make_tokenizer_portable

    tok = AutoTokenizer.from_pretrained(tiny_cpt_data / "tokenizer")
    tok.save_pretrained(tmp_path)
    make_tokenizer_portable(tmp_path)
    cls = json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"]
    assert cls in LOADABLE_IN_4X
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("def f(x): return x")["input_ids"] == tok("def f(x): return x")["input_ids"]


# ------------------------------------------------------------------------------------------ LoRA and checkpoints


@pytest.fixture(scope="module")
def lora_run(tiny_cpt_data, tiny_base, tmp_path_factory):
    """A 1-process LoRA run whose config names its base by a relative path (launched from the base's parent)."""
    import os

    from cpt.config import load_config
    from cpt.train import train

    root = tmp_path_factory.mktemp("lora")
    shutil.copytree(tiny_base, root / "base")
    cfg = tiny_run_config(tiny_cpt_data, root / "run", eval={"every": 3, "dense_steps": 0}, checkpoint={"every": 3})
    cfg["model"] = {"name_or_path": "base", "lora": {"r": 8, "alpha": 16}}
    cfg["stages"][0]["steps"] = 3
    cfg["train"].update(global_batch_size=4, micro_batch_size=2)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        train(load_config(base=cfg), echo=lambda *a, **k: None)
    finally:
        os.chdir(cwd)
    return root, cfg


def _eval_at(run_dir, name, step):
    from cpt.metrics import read_metrics

    return next(r[f"eval/{name}/loss"] for r in read_metrics(run_dir / "metrics.jsonl")
                if r["step"] == step and f"eval/{name}/loss" in r)


def _heldout(model, tok, cfg, tiny_cpt_data, name="python"):
    from cpt.data.loader import load_heldout
    from cpt.data.sources import HeldoutConfig
    from cpt.evaluate import heldout_loss

    h = HeldoutConfig(name=name, path=str(tiny_cpt_data / "data" / name / "heldout"), tag="downstream")
    return heldout_loss(model, load_heldout(h, tok, cfg["data"]["seq_len"], cfg["eval"]["tokens_per_set"]), 16)


def test_lora_adapter_records_an_absolute_base_and_loads_from_anywhere(lora_run, tiny_cpt_data, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, cfg = lora_run
    acfg = json.loads((root / "run" / "export" / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == str((root / "base").resolve())
    # peft's model card too (it named the base as loaded: `base_model: base`, the tag `base_model:adapter:base`)
    card = (root / "run" / "export" / "README.md").read_text()
    front = card.split("\n---\n")[0]
    assert f"base_model: {(root / 'base').resolve()}\n" in front and f"- base_model:adapter:{(root / 'base').resolve()}\n" in front
    assert "base_model: base\n" not in card and "# Model Card" in card  # (the rest of peft's card kept)
    monkeypatch.chdir(tmp_path)  # not the launch directory
    base = AutoModelForCausalLM.from_pretrained(acfg["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, str(root / "run" / "export"))
    tok = AutoTokenizer.from_pretrained(root / "run" / "export")
    assert _heldout(model, tok, cfg, tiny_cpt_data) == pytest.approx(_eval_at(root / "run", "python", 3), abs=1e-5)


def test_cpt_export_of_a_lora_checkpoint_merged_and_as_adapter(lora_run, tiny_cpt_data, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt.cli import main

    root, cfg = lora_run
    ckpt = root / "run" / "checkpoints" / "step_00000003"
    monkeypatch.chdir(root)  # the checkpoint's config names the base relative to the launch directory
    assert main(["export", str(ckpt), "--out", str(tmp_path / "merged")]) == 0
    assert main(["export", str(ckpt), "--out", str(tmp_path / "adapter"), "--adapter"]) == 0
    monkeypatch.chdir(tmp_path)
    logged = _eval_at(root / "run", "python", 3)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    assert _heldout(merged, AutoTokenizer.from_pretrained(tmp_path / "merged"), cfg, tiny_cpt_data) == pytest.approx(logged, abs=1e-5)
    acfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(acfg["base_model_name_or_path"]), str(tmp_path / "adapter"))
    assert _heldout(model, AutoTokenizer.from_pretrained(tmp_path / "adapter"), cfg, tiny_cpt_data) == pytest.approx(logged, abs=1e-5)


def test_cpt_average_of_lora_checkpoints_holding_the_adapter_alone(lora_run, tmp_path, monkeypatch):
    """`cpt average` of resume checkpoints (docs/adapters.md): a LoRA checkpoint holds the adapter, not the base, and was
    refused as "only safetensors checkpoints are read"; it is exported as its adapter first. Averaging the checkpoint
    with the run's own export of the same step gives the average of an adapter with itself: every LoRA factor twice."""
    import torch
    from safetensors.torch import load_file

    from cpt.cli import main

    root, _ = lora_run
    ckpt, export = root / "run" / "checkpoints" / "step_00000003", root / "run" / "export"
    monkeypatch.chdir(root)  # the checkpoint's config names the base relative to the launch directory
    assert main(["average", str(tmp_path / "avg"), str(ckpt), str(export)]) == 0
    got, one = load_file(tmp_path / "avg" / "adapter_model.safetensors"), load_file(export / "adapter_model.safetensors")
    a = next(k for k in one if ".lora_A." in k)
    assert got.keys() == one.keys() and torch.equal(got[a], torch.cat([one[a], one[a]]))
    assert json.loads((tmp_path / "avg" / "adapter_config.json").read_text())["r"] == 16  # rank 2 * 8, same scale


def test_cpt_export_of_an_adapter_checkpoint_pruned_while_the_base_is_built(lora_run, tmp_path, monkeypatch):
    """`cpt export` / `cpt eval` of a running LoRA run's checkpoint: everything it needs from the checkpoint
    (adapter_base.json too) is read before the base is built (which takes a while for a real model), so a prune
    (checkpoint.keep) meanwhile does not fail it (it read adapter_base.json after the build: FileNotFoundError)."""
    import cpt.model
    from cpt.checkpoint_export import export_checkpoint

    root, _ = lora_run
    ckpt = tmp_path / "step_00000003"
    shutil.copytree(root / "run" / "checkpoints" / "step_00000003", ckpt)
    build = cpt.model.build_model

    def pruned_meanwhile(*a, **k):
        shutil.rmtree(ckpt)
        return build(*a, **k)

    monkeypatch.setattr(cpt.model, "build_model", pruned_meanwhile)
    monkeypatch.chdir(root)  # the checkpoint's config names the base relative to the launch directory
    out = export_checkpoint(ckpt, tmp_path / "adapter", adapter=True, echo=lambda *a, **k: None)
    assert not ckpt.exists() and (out / "adapter_model.safetensors").is_file()


def test_export_refusals_are_one_line(lora_run, tiny_base, tmp_path, capsys):
    """A run directory without checkpoints, and --adapter on a full-model checkpoint: exit 1, one line, no output."""
    import yaml

    from cpt.checkpoint import write_checksums
    from cpt.cli import main

    assert main(["export", str(tiny_base.parent), "--out", str(tmp_path / "x")]) == 1  # checkpoint.every was off
    assert "no valid checkpoint" in capsys.readouterr().err
    full = tmp_path / "full" / "step_00000003"
    shutil.copytree(lora_run[0] / "run" / "checkpoints" / "step_00000003", full)
    cfg = yaml.safe_load((full / "config.yaml").read_text())
    del cfg["model"]["lora"]
    (full / "config.yaml").write_text(yaml.safe_dump(cfg))
    write_checksums(full)
    assert main(["export", str(full), "--out", str(tmp_path / "y"), "--adapter"]) == 1
    out = capsys.readouterr()
    assert "--adapter needs a LoRA run" in out.err and len(out.err.strip().splitlines()) == 1 and not out.out
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_eval_and_interpolate_accept_a_checkpoint_directory(lora_run, tiny_cpt_data, tiny_base, tmp_path, monkeypatch,
                                                            capsys):
    """`cpt eval CKPT` and `cpt interpolate BASE CKPT` (formerly `ValueError: Unrecognized model`); `cpt eval` warns of a
    --heldout set that is the folder of one of the run's training sources."""
    from cpt.cli import main

    root, cfg = lora_run
    ckpt = root / "run" / "checkpoints" / "step_00000003"
    monkeypatch.chdir(root)
    heldout = f"python={tiny_cpt_data / 'data' / 'python' / 'heldout'}:downstream"
    assert main(["eval", str(ckpt), "--heldout", heldout, "--seq-len", str(cfg["data"]["seq_len"]),
                 "--max-tokens", str(cfg["eval"]["tokens_per_set"]), "--batch-size", "16", "--device", "cpu",
                 "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    got = result["heldout"]["python"]
    got = got["loss"] if isinstance(got, dict) else got
    assert got == pytest.approx(_eval_at(root / "run", "python", 3), abs=1e-5)
    assert "warning" not in capsys.readouterr().err
    # a --heldout that is the folder of one of the run's training sources (OUT, not OUT/heldout): warned, still scored
    trained = f"python_train={tiny_cpt_data / 'data' / 'python'}/:downstream"
    assert main(["eval", str(ckpt), "--heldout", trained, "--seq-len", str(cfg["data"]["seq_len"]),
                 "--max-tokens", "64", "--device", "cpu"]) == 0
    warnings = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert len(warnings) == 1 and "--heldout python_train:" in warnings[0] and "training source 'python'" in warnings[0]
    assert main(["interpolate", str(tiny_base), str(ckpt), "--alphas", "0,1", "--heldout", heldout,
                 "--seq-len", str(cfg["data"]["seq_len"]), "--max-tokens", str(cfg["eval"]["tokens_per_set"]),
                 "--json", str(tmp_path / "interp.json")]) == 0
    rows = json.loads((tmp_path / "interp.json").read_text())["rows"]
    assert len(rows) == 2


def test_cpt_eval_of_a_run_reads_its_relative_heldout_paths_from_where_it_was_started(lora_run, tiny_cpt_data,
                                                                                     tmp_path, monkeypatch):
    """`cpt eval RUN` with no flags scores the run's own held-out sets; a config that named them relative to the
    directory it was started in (``data/...`` beside ``output_dir: runs/r``) is read from there, not from the current
    directory (formerly: the shard directory not found, or another directory's set of the same name scored)."""
    import yaml

    from cpt.resume import run_relative
    from cpt.metrics import read_metrics

    root, _ = lora_run
    launch = tmp_path / "job"
    run = launch / "runs" / "r"
    shutil.copytree(root / "run", run)
    (launch / "data").symlink_to(tiny_cpt_data / "data")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["run"]["output_dir"] = "runs/r"
    for h in cfg["data"]["heldout"]:
        h["path"] = f"data/{h['name']}/heldout"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main_eval(["eval", str(run), "--device", "cpu", "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    last = [r for r in read_metrics(run / "metrics.jsonl") if "eval/python/loss" in r][-1]
    assert set(result["heldout"]) == {h["name"] for h in cfg["data"]["heldout"]}
    for h in cfg["data"]["heldout"]:
        assert result["heldout"][h["name"]]["path"] == str(launch / h["path"])
        assert result["heldout"][h["name"]]["loss"] == pytest.approx(last[f"eval/{h['name']}/loss"], abs=1e-5)
    # not changed: absolute and remote paths, a run directory that does not end with its output_dir (moved, or an
    # absolute output_dir), a path that does not exist where the run was started
    assert run_relative("/abs/h", run, "runs/r") == "/abs/h"
    assert run_relative("s3://b/h", run, "runs/r") == "s3://b/h"
    assert run_relative("data/python/heldout", run, "other/r") == "data/python/heldout"
    assert run_relative("data/python/heldout", run, str(run)) == "data/python/heldout"
    assert run_relative("data/none", run, "runs/r") == "data/none"
    assert run_relative("data/python/heldout", run, "./runs/r") == str(launch / "data/python/heldout")


def main_eval(argv):
    from cpt.cli import main

    return main(argv)


def test_cpt_export_of_a_run_reads_its_relative_model_paths_from_where_it_was_started(lora_run, tiny_cpt_data, tmp_path,
                                                                                     monkeypatch):
    """`cpt export RUN` (and `cpt average` of checkpoints, exported the same way) from another directory than the one
    the run was started in: a model.name_or_path / model.tokenizer / train.init_from the config gave relative is read
    from there, as `cpt eval` reads the held-out paths (formerly: 'model.name_or_path 'base': not a local model
    directory and not loadable from the hub')."""
    from cpt.cli import main
    from cpt.config import load_config
    from cpt.train import train

    root, cfg = lora_run
    launch = tmp_path / "job"
    launch.mkdir()
    (launch / "base").symlink_to(root / "base")
    cfg = {**cfg, "run": {**cfg["run"], "output_dir": "runs/r"}, "stages": [{**cfg["stages"][0], "steps": 3}],
           "checkpoint": {"every": 1, "export_at_end": False}, "eval": {"at_start": False}}
    monkeypatch.chdir(launch)  # started here: output_dir and name_or_path relative to it
    train(load_config(base=cfg), echo=lambda *a, **k: None)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    run = launch / "runs" / "r"
    assert main(["export", str(run), "--out", "merged"]) == 0
    assert (tmp_path / "elsewhere" / "merged" / "config.json").is_file()
    assert main(["average", "avg", *map(str, sorted((run / "checkpoints").iterdir()))]) == 0
