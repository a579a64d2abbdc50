"""Training features combined with the distributed backends, launched as README section 4 tells users to launch
(`scripts/launch.sh run.yaml fsdp|zero2|zero3` with NUM_GPUS=2, made CPU jobs by the environment alone, as in
tests/test_launch_shipped.py), each against a 1-process run of the same config (1e-5 relative, fp32):

* FSDP2: LoRA with the output head of a tied-embedding model in ``modules_to_save`` (and the norms), two stages
  (the second with ``reset_optimizer`` and a ``mix_ramp``, evaluated densely after the switch); ``cpt export`` of
  its sharded checkpoint, merged and as a peft adapter, reproduces the logged held-out losses.
* ZeRO-3: vocabulary extension (the embeddings are partitioned at load) in the same two stages; the export holds
  the extended vocabulary and reproduces the logged held-out losses.
* ZeRO-2: ``train.init_from`` the ZeRO-3 run's checkpoint (another ZeRO stage, the optimizer state reset).
* Refused at start in one line, nothing written: LoRA + ``model.vocab`` on tied embeddings under FSDP.
"""

import json
import re
from pathlib import Path

import pytest

from cpt.config import load_config
from launching import ROOT, assert_close, evals, finish, losses, rank_env, records, start, two_process_config, world_sizes
from launching import write_config as write

pytestmark = pytest.mark.slow

STEPS, EVERY = 6, 3
NEW_TOKENS = ["self.", "return ", "def "]


def launch_shipped(strategy: str, cfg_path: Path, *extra: str) -> tuple[int, str]:
    """`scripts/launch.sh CONFIG STRATEGY` with NUM_GPUS=2 (the README's command line)."""
    env = {**rank_env(cpu=strategy in ("ddp", "fsdp"), fsdp_on_cpu=strategy == "fsdp"), "NUM_GPUS": "2"}
    return finish(start([str(ROOT / "scripts" / "launch.sh"), str(cfg_path), strategy, *extra], cfg_path.parent, env))


def two_stages(tiny_cpt_data, base, out: Path) -> dict:
    """3 steps of 75% python, then 3 with a fresh optimizer, the replay share ramped 0.5 -> 0.25; held-out sets
    every 3 steps and at every step of the first two after the switch; a checkpoint every 3 steps."""
    cfg = two_process_config(tiny_cpt_data, base, out, steps=EVERY, eval_every=EVERY, weight_decay=0.0,
                             checkpoint={"every": EVERY, "keep": 5})
    cfg["stages"].append({"name": "s2", "steps": STEPS - EVERY, "mix": {"python": 0.5, "shakespeare": 0.5},
                          "mix_ramp": {"shakespeare": [0.5, 0.25]}, "reset_optimizer": True,
                          "schedule": {"type": "cosine", "max_lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 1,
                                       "warmup_from": "previous"}})
    cfg["eval"].update(dense_steps=2, dense_every=1)
    return cfg


def per_source(run: Path) -> dict:
    """(step, key) -> each source's training loss and token count."""
    return {(r["step"], k): v for r in records(run) for k, v in r.items() if k.startswith(("train/loss/", "data/tokens/"))}


def one_process(cfg: dict) -> Path:
    from cpt.train import train

    train(load_config(base=cfg), echo=lambda *a, **k: None)
    return Path(cfg["run"]["output_dir"])


def two_processes(strategy: str, cfg: dict, *extra: str) -> Path:
    out = Path(cfg["run"]["output_dir"])
    rc, log = launch_shipped(strategy, write(cfg, out.parent / "run.yaml"), *extra)
    assert rc == 0, log[-5000:]
    assert world_sizes(out) == {2}
    return out


def assert_same_run(two: Path, one: Path) -> None:
    assert_close(losses(two), losses(one))
    assert_close(evals(two, "python"), evals(one, "python"))
    assert_close(evals(two, "shakespeare"), evals(one, "shakespeare"))
    assert_close(per_source(two), per_source(one))


def assert_export_reproduces_eval(model, tok, run: Path, cfg: dict, tiny_cpt_data: Path, data: Path) -> None:
    from cpt.data.loader import load_heldout
    from cpt.data.sources import HeldoutConfig
    from cpt.evaluate import heldout_loss

    for name in ("python", "shakespeare"):
        h = HeldoutConfig(name=name, path=str(data / name / "heldout"), tag="upstream")
        got = heldout_loss(model, load_heldout(h, tok, cfg["data"]["seq_len"], cfg["eval"]["tokens_per_set"]), 16)
        assert got == pytest.approx(evals(run, name)[STEPS], abs=1e-5), name


# ------------------------------------------------------------------------------------------ FSDP2 + LoRA


def test_fsdp_lora_tied_head_in_modules_to_save_two_stages(tiny_cpt_data, tiny_base, tmp_path):
    """accelerate's FSDP2 preparation re-ties the embeddings (fsdp_cpu_ram_efficient_loading): with the tied head
    wrapped by peft it failed with `KeyError: "attribute 'weight' already exists"`."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt.cli import main

    assert json.loads((tiny_base / "config.json").read_text())["tie_word_embeddings"]
    runs = {}
    for kind in ("one", "fsdp"):
        cfg = two_stages(tiny_cpt_data, tiny_base, tmp_path / kind / "run")
        cfg["model"]["lora"] = {"r": 8, "alpha": 16, "modules_to_save": ["lm_head"], "train_norms": True}
        runs[kind] = one_process(cfg) if kind == "one" else two_processes("fsdp", cfg)
    assert_same_run(runs["fsdp"], runs["one"])

    data = tiny_cpt_data / "data"
    assert main(["export", str(runs["fsdp"]), "--out", str(tmp_path / "merged")]) == 0
    assert main(["export", str(runs["fsdp"]), "--out", str(tmp_path / "adapter"), "--adapter"]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    for model in (AutoModelForCausalLM.from_pretrained(tmp_path / "merged"),
                  AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")):
        assert_export_reproduces_eval(model, tok, runs["fsdp"], cfg, tiny_cpt_data, data)


# ------------------------------------------------------------------------------------------ ZeRO + vocabulary extension


@pytest.fixture(scope="module")
def vocab_data(tiny_cpt_data, tiny_base, tmp_path_factory):
    """Both sources and their held-out sets prepared with the run's extended tokenizer (`cpt prepare --extend-vocab`)."""
    from cpt.cli import main

    root = tmp_path_factory.mktemp("vocab")
    (root / "tokens.txt").write_text("\n".join(NEW_TOKENS) + "\n")
    cfg = vocab_cfg(two_stages(tiny_cpt_data, tiny_base, root / "unused"), root, tiny_cpt_data)
    write(cfg, root / "vocab.yaml")
    for name in ("python", "shakespeare"):
        assert main(["prepare", str(tiny_cpt_data / "raw" / f"{name}.jsonl.gz"), "--extend-vocab",
                     str(root / "vocab.yaml"), "--out", str(root / name), "--heldout-docs", "8"]) == 0
    return root


def vocab_cfg(cfg: dict, root: Path, tiny_cpt_data: Path) -> dict:
    """``cfg`` extending the vocabulary by NEW_TOKENS, on the data prepared with the extended tokenizer in ``root``."""
    cfg["model"]["vocab"] = {"add_tokens_file": str(root / "tokens.txt"), "pad_to_multiple_of": 8}
    for entry in cfg["data"]["sources"] + cfg["data"]["heldout"]:
        entry["path"] = entry["path"].replace(str(tiny_cpt_data / "data"), str(root))
    return cfg


@pytest.fixture(scope="module")
def zero3_vocab(vocab_data, tiny_cpt_data, tiny_base, tmp_path_factory):
    """The two-stage vocabulary-extension run, on 1 process and with `scripts/launch.sh run.yaml zero3`."""
    root = tmp_path_factory.mktemp("zero3_vocab")
    runs = {kind: vocab_cfg(two_stages(tiny_cpt_data, tiny_base, root / kind / "run"), vocab_data, tiny_cpt_data) for kind in ("one", "zero3")}
    return {"one": one_process(runs["one"]), "zero3": two_processes("zero3", runs["zero3"]), "cfg": runs["zero3"]}


def test_zero3_vocabulary_extension_two_stages(zero3_vocab, vocab_data, tiny_cpt_data):
    """Under ZeRO-3 the embeddings are partitioned at load: the extension used to stop with a traceback, and a
    stage's reset_optimizer stopped the run at the stage switch under any ZeRO stage."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert_same_run(zero3_vocab["zero3"], zero3_vocab["one"])
    export = zero3_vocab["zero3"] / "export"
    model, tok = AutoModelForCausalLM.from_pretrained(export), AutoTokenizer.from_pretrained(export)
    assert model.get_input_embeddings().weight.shape[0] == 1032 and all(t in tok.get_vocab() for t in NEW_TOKENS)
    assert_export_reproduces_eval(model, tok, zero3_vocab["zero3"], zero3_vocab["cfg"], tiny_cpt_data, vocab_data)


def test_zero2_init_from_zero3_checkpoint(zero3_vocab, vocab_data, tiny_cpt_data, tiny_base, tmp_path):
    """train.init_from a ZeRO-3 checkpoint under ZeRO-2: DeepSpeed reads only its own stage's files (it failed with
    an AssertionError in its checkpoint loader), and the fresh optimizer of a new stage was refused under ZeRO."""
    ckpt = zero3_vocab["zero3"] / "checkpoints" / f"step_{EVERY:08d}"
    runs = {}
    for kind in ("one", "zero2"):
        cfg = vocab_cfg(two_stages(tiny_cpt_data, tiny_base, tmp_path / kind / "run"), vocab_data, tiny_cpt_data)
        cfg["train"]["init_from"] = str(ckpt)
        runs[kind] = one_process(cfg) if kind == "one" else two_processes("zero2", cfg)
    assert_same_run(runs["zero2"], runs["one"])
    assert losses(runs["one"])[1] != pytest.approx(losses(zero3_vocab["one"])[1], rel=1e-3)  # not the base model


# ------------------------------------------------------------------------------------------ refused at start


def test_fsdp_lora_with_vocab_on_tied_embeddings_is_refused(vocab_data, tiny_cpt_data, tiny_base, tmp_path):
    cfg = vocab_cfg(two_stages(tiny_cpt_data, tiny_base, tmp_path / "run"), vocab_data, tiny_cpt_data)
    cfg["model"]["lora"] = {"r": 8, "alpha": 16}
    rc, log = launch_shipped("fsdp", write(cfg, tmp_path / "run.yaml"))
    assert rc != 0
    errors = {line for line in log.splitlines() if line.startswith("cpt train: error:")}
    assert len(errors) == 1 and "model.lora" in log and "model.vocab" in log and "FSDP" in log, log[-3000:]
    assert not re.search(r"\[rank\d\]: Traceback", log), log[-3000:]  # (the launcher's own report of the exit stays)
    assert not (tmp_path / "run").exists()
