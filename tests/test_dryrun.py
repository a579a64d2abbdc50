"""`cpt train --dry-run`: the plan of a run read off its real config and data (tokens, shares, epochs, LR,
FLOPs), problems caught before training, nothing written."""

from pathlib import Path

import pytest
import yaml

from conftest import tiny_run_config
from cpt.cli import main
from cpt.config import load_config
from cpt.dryrun import describe_run


def write(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_plan_matches_the_config_and_a_real_model(tiny_cpt_data, tiny_base, tmp_path, capsys):
    from cpt.throughput import model_flops_per_token
    from cpt.model import build_model, load_tokenizer, model_shape

    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_cpt_data, out)
    cfg["model"] = {"name_or_path": str(tiny_base)}
    cfg["stages"] = [
        {"name": "a", "steps": 10, "mix": {"python": 0.75, "shakespeare": 0.25},
         "schedule": {"type": "cosine", "max_lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2}},
        {"name": "b", "steps": 20, "mix": {"python": 0.5, "shakespeare": 0.5},
         "schedule": {"type": "cosine", "max_lr": 5e-4, "min_lr": 5e-5, "warmup_steps": 2}},
    ]
    rc = load_config(base=cfg)
    d = describe_run(rc)
    B, L = rc.train.global_batch_size, rc.data.seq_len
    a, b = d["stages"]
    assert a["sources"]["python"]["tokens"] == 10 * B * L * 3 // 4 and a["sources"]["shakespeare"]["share"] == 0.25
    assert b["sources"]["python"]["tokens"] == b["sources"]["shakespeare"]["tokens"] == 20 * B * L // 2
    assert a["lr"]["peak"] == pytest.approx(1e-3) and b["lr"]["peak"] == pytest.approx(5e-4)
    assert d["sources"]["python"]["tokens"] == (10 * B * 3 // 4 + 20 * B // 2) * L
    assert 0 < d["sources"]["python"]["epochs"] == pytest.approx(d["sources"]["python"]["tokens"] / d["sources"]["python"]["available_tokens"])
    tok = load_tokenizer(rc.model)
    shape = model_shape(build_model(rc.model, tok))
    assert d["model"]["n_params"] == shape["n_params"]
    assert d["total"]["flops"] == pytest.approx(30 * B * L * model_flops_per_token(shape["n_params"], shape["n_layers"], shape["hidden"], L))

    assert main(["train", str(write(cfg, tmp_path / "c.yaml")), "--dry-run", "--tokens-per-s", "1000"]) == 0
    text = capsys.readouterr().out
    assert "stage 1 b: 20 steps" in text and "python 50.0%" in text and "h of training" in text
    assert "WARNING" not in text
    assert not out.exists()  # nothing written


def test_dry_run_flags_repetition_and_a_tokenizer_mismatch(tiny_cpt_data, tmp_path, capsys):
    from cpt.demo import train_tokenizer

    cfg = tiny_run_config(tiny_cpt_data, tmp_path / "run")
    cfg["stages"][0]["steps"] = 4000  # far more python than there is
    assert main(["train", str(write(cfg, tmp_path / "c.yaml")), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "source python:" in text and "WARNING: past data.max_epochs_warning" in text

    other = train_tokenizer([tiny_cpt_data / "raw" / "python.jsonl.gz"], 600, tmp_path / "other_tok")
    cfg["stages"][0]["steps"] = 4
    cfg["model"]["tokenizer"] = str(other)
    assert main(["train", str(write(cfg, tmp_path / "c2.yaml")), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "cpt train: error:" in err and "tokenizer" in err


def test_plan_describes_the_init_from_model(tiny_cpt_data, tiny_base, tmp_path, capsys):
    """train.init_from naming an HF export: training builds that model, whatever model.arch says; the plan used to
    describe model.arch's (the shipped schedule configs once paired a small arch with the demo's base export)."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from cpt.model import model_shape

    config = AutoConfig.from_pretrained(tiny_base)
    config.num_hidden_layers += 2
    deeper = tmp_path / "deeper-base"
    AutoModelForCausalLM.from_config(config).save_pretrained(deeper)
    for f in tiny_base.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, deeper / f.name)
    cfg = tiny_run_config(tiny_cpt_data, tmp_path / "run")
    cfg["train"]["init_from"] = str(deeper)
    d = describe_run(load_config(base=cfg))
    want = model_shape(AutoModelForCausalLM.from_pretrained(deeper))
    assert d["model"]["n_params"] == want["n_params"] and d["model"]["n_layers"] == config.num_hidden_layers
    cfg["train"]["init_from"] = str(tmp_path)  # neither an export nor a checkpoint: one line, as training says it
    assert main(["train", str(write(cfg, tmp_path / "c.yaml")), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("cpt train: error: train.init_from: ")


def test_a_stage_from_a_checkpoint_builds_the_model_its_chain_started_from(tiny_cpt_data, tiny_base, tmp_path):
    """A run from an HF model (train.init_from) whose model section says another model (here a smaller model.arch),
    then a stage from its checkpoint, then one from that stage's: the dry run describes the model the chain started
    from, followed back through each run's config.yaml, and training, `--resume` and `cpt export` build it (they
    built model.arch's and refused the checkpoint's weights as not fitting)."""
    import copy

    from transformers import AutoModelForCausalLM

    from cpt.checkpoint_export import export_checkpoint
    from cpt.model import model_shape
    from cpt.train import train

    want = model_shape(AutoModelForCausalLM.from_pretrained(tiny_base))
    first = tiny_run_config(tiny_cpt_data, tmp_path / "s1", eval={"at_start": False}, checkpoint={"every": 1})
    first["train"]["init_from"] = str(tiny_base)
    first["data"]["heldout"] = []
    first["model"]["arch"] = {**first["model"]["arch"], "num_hidden_layers": 1, "hidden_size": 16}
    first["stages"][0].update(steps=1, schedule={"type": "constant", "max_lr": 1e-3, "warmup_steps": 0})
    train(load_config(base=first), echo=lambda *a, **k: None)
    second = copy.deepcopy(first)
    second["run"]["output_dir"], second["train"]["init_from"] = str(tmp_path / "s2"), str(tmp_path / "s1")
    assert describe_run(load_config(base=second))["model"]["n_params"] == want["n_params"]
    train(load_config(base=second), echo=lambda *a, **k: None)
    third = copy.deepcopy(second)
    third["run"]["output_dir"], third["train"]["init_from"] = str(tmp_path / "s3"), str(tmp_path / "s2")
    d = describe_run(load_config(base=third))["model"]
    assert (d["n_params"], d["n_layers"], d["hidden"]) == (want["n_params"], want["n_layers"], want["hidden"])
    second["stages"][0]["steps"] = 2  # one more step: --resume builds the chain's model too
    train(load_config(base=second), resume=True, allow_config_change=True, echo=lambda *a, **k: None)
    exported = export_checkpoint(tmp_path / "s2", tmp_path / "s2_export", echo=lambda *a, **k: None)
    assert model_shape(AutoModelForCausalLM.from_pretrained(exported))["n_params"] == want["n_params"]


def test_dry_run_refuses_what_the_start_refuses_about_the_run_directory(tiny_cpt_data, tiny_base, tmp_path, capsys):
    """`--dry-run` passed a run directory the run's start then refused in one line, after the job's wait in the queue:
    a file in its path, a fresh start over checkpoints or a finished export, a --resume changing the trajectory. The
    plan is printed first, then the one error line, exit 1."""
    from cpt.config import save_config

    (tmp_path / "file").write_text("x")
    (tmp_path / "killed" / "exports" / "step_00000003").mkdir(parents=True)  # (killed, no checkpoint: overwritten)
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    save_config(load_config(base=tiny_run_config(tiny_cpt_data, run, run={"seed": 1})), ckpt / "config.yaml")
    path = write(tiny_run_config(tiny_cpt_data, run), tmp_path / "c.yaml")
    for flags, line in ((["--output-dir", str(tmp_path / "file" / "sub")], f"{tmp_path / 'file'} is a file"),
                        (["--output-dir", str(tiny_base.parent)], "holds a finished run's export"),
                        (["--output-dir", str(tmp_path / "killed")], "holds an earlier run's exports ("),
                        ([], "already holds checkpoints: pass --resume"),
                        (["--resume"], "run.seed: 1 -> 1234")):
        assert main(["train", str(path), "--dry-run", *flags]) == 1, flags
        out = capsys.readouterr()
        assert "total: " in out.out and out.err.startswith("cpt train: error: ") and line in out.err, (flags, out)
    assert not (tmp_path / "file" / "sub").exists() and sorted(p.name for p in run.iterdir()) == ["checkpoints"]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dry_run_resume_with_allow_config_change_refuses_what_cannot_change(tiny_cpt_data, tiny_base, tmp_path, capsys,
                                                                            lora):
    """`--dry-run --resume --allow-config-change` checked nothing of the checkpoint's state and exited 0 for a
    run.seed, a data.seq_len or a model.lora the start then refuses "even with --allow-config-change". Now the
    checkpoint's data position is loaded into the plan's data loader and its trainable parameters compared with the
    model the run builds; what may change (a longer stage) still passes."""
    from cpt.train import train

    run = tmp_path / "run"
    cfg = tiny_run_config(tiny_cpt_data, run, checkpoint={"every": 2}, eval={"at_start": False})
    cfg["train"]["init_from"] = str(tiny_base)
    cfg["stages"][0]["steps"] = 4
    cfg["data"]["heldout"] = []
    if lora:
        cfg["model"]["lora"] = {"r": 2, "alpha": 4}
    train(load_config(base=cfg), echo=lambda *a, **k: None)
    capsys.readouterr()  # (the model load's progress bar)
    path = write(cfg, tmp_path / "c.yaml")
    dry = ["train", str(path), "--dry-run", "--resume", "--allow-config-change"]
    for change, line in ((["--set", "run.seed=7"], "its 'data' state does not fit this run: the data position of the "
                                                  "checkpoint does not continue on this run's data: run.seed 1234 -> 7"),
                         (["--set", "data.seq_len=32"], "data.seq_len 64 -> 32"),
                         (["--set", "model.lora.r=4"] if lora else ["--set", "model.lora={r: 2, alpha: 4}"],
                          "it trained other parameters than the model this run builds")):
        assert main([*dry, *change]) == 1, change
        out = capsys.readouterr()
        assert "total: " in out.out and out.err.startswith("cpt train: error: checkpoint ") and line in out.err, (change, out)
    assert main([*dry, "--set", "stages.0.steps=6"]) == 0, capsys.readouterr()


def test_chunked_loss_true_on_a_model_it_cannot_serve_is_one_line_in_the_dry_run_too(tiny_cpt_data, tmp_path, capsys):
    """`train.chunked_loss: true` on a model whose logits are soft-capped (Gemma 2) passed --dry-run and ended the start
    in a RuntimeError traceback; now both say it in one line. So does a router-loss coefficient for a dense model (the
    dry run passed it)."""
    cfg = tiny_run_config(tiny_cpt_data, tmp_path / "run")
    cfg["model"]["arch"] = {"model_type": "gemma2", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                            "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 64}
    cfg["train"]["chunked_loss"] = True
    path = write(cfg, tmp_path / "c.yaml")
    for extra in (["--dry-run"], []):
        assert main(["train", str(path), *extra]) == 1
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith("cpt train: error: train.chunked_loss: true, but "
                                                        "Gemma2ForCausalLM soft-caps its logits"), err
    assert not (tmp_path / "run").exists()
    del cfg["model"]["arch"]["model_type"], cfg["model"]["arch"]["head_dim"], cfg["train"]["chunked_loss"]
    cfg["train"]["router_aux_loss_coef"] = 0.01
    assert main(["train", str(write(cfg, tmp_path / "dense.yaml")), "--dry-run"]) == 1
    assert "cpt train: error: train.router_aux_loss_coef: 0.01 is set, but LlamaForCausalLM has no router" in \
        capsys.readouterr().err


def test_init_optimizer_without_a_checkpoint_to_take_it_from_is_refused(tiny_cpt_data, tiny_base, tmp_path, capsys):
    """`train.init_optimizer: true` with no `train.init_from`, or with an HF model (no optimizer state), was accepted
    and did nothing: the run started with a fresh optimizer without a word."""
    from cpt.config import ConfigError

    cfg = tiny_run_config(tiny_cpt_data, tmp_path / "run")
    with pytest.raises(ConfigError, match="train.init_optimizer needs train.init_from"):
        load_config(base=cfg, overrides=["train.init_optimizer=true"])
    path = write(cfg, tmp_path / "c.yaml")
    assert main(["train", str(path), "--dry-run", "--from", str(tiny_base), "--set", "train.init_optimizer=true"]) == 1
    err = capsys.readouterr().err
    assert f"cpt train: error: train.init_optimizer: {tiny_base} is an HF model, which holds no optimizer state" in err
