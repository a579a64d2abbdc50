"""Mistakes users make end in one clear error line, exit code != 0, and nothing half-written (issues 12 and 13):
init_from without weights, --output-dir naming a file, a tokenizer larger than the embedding, flash-attn missing,
an anneal branch from a decaying phase, a --resume that changes the trajectory, pickle-only checkpoints for
`cpt average` / `cpt eval`, a held-out set made with another tokenizer (--dry-run), LoRA module names and layer
ranges that do not fit the loaded model, a fresh start over a finished run's export. Also: --resume without a
checkpoint says it starts fresh, and the normalised mix shares are printed."""

import contextlib
import copy
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_run_config
from cpt.cli import main


def write(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def one_error_line(err: str, prefix: str) -> str:
    """The stderr of a failed command: no traceback, and its last line is the single error line."""
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(prefix), err
    return last


def snapshot(path: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))} if path.exists() else {}


def small(tiny_cpt_data, out, **changes):
    cfg = tiny_run_config(tiny_cpt_data, out, eval={"at_start": False}, **changes)
    cfg["stages"][0]["steps"] = 4
    cfg["data"]["heldout"] = cfg["data"]["heldout"][:1]
    cfg["checkpoint"] = {"every": 2, "keep": 2, "export_at_end": False}
    return cfg


@pytest.fixture(scope="module")
def trunk(tiny_cpt_data, tmp_path_factory):
    """A finished 6-step run with checkpoints at 2, 4 and 6 and an infinite schedule (warmup 2, cooldown 2: step 2
    is in the decaying cooldown, step 4 in the constant phase); its mix weights (3:1) do not sum to 1."""
    out = tmp_path_factory.mktemp("trunk") / "run"
    cfg = small(tiny_cpt_data, out)
    cfg["stages"][0].update(steps=6, mix={"python": 3, "shakespeare": 1})
    cfg["stages"][0]["schedule"] = {"type": "infinite", "max_lr": 2e-3, "warmup_steps": 2, "cooldown_steps": 2,
                                    "constant_lr": 1e-3, "min_lr": 1e-5}
    cfg["checkpoint"]["keep"] = 3
    path = write(cfg, out.parent / "trunk.yaml")
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        assert main(["train", str(path)]) == 0
    return path, out, log.getvalue()


def test_resume_without_checkpoint_says_fresh_and_prints_normalised_mix(tiny_cpt_data, tmp_path, capsys, trunk):
    out = trunk[2]  # the trunk's start-up log: the 3:1 weights are printed as shares
    assert "stage 0 cpt-python mix: python 75.0%, shakespeare 25.0% (the weights given sum to 4: normalised)" in out
    cfg = small(tiny_cpt_data, tmp_path / "run")
    cfg["stages"][0]["steps"] = 3
    cfg["checkpoint"] = {"every": None, "export_at_end": False}
    assert main(["train", str(write(cfg, tmp_path / "c.yaml")), "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"--resume: no complete checkpoint in {tmp_path / 'run' / 'checkpoints'}: starting from scratch" in out
    assert "stage 0 cpt-python mix: python 75.0%, shakespeare 25.0%\n" in out  # weights summing to 1: no note


def test_a_requeue_before_the_first_checkpoint_continues_the_same_wandb_run(tiny_cpt_data, tmp_path, capsys):
    """A SLURM requeue (`--resume`) of a run killed before its first checkpoint starts over from step 0: it started a
    new W&B run (the old one orphaned, holding the same steps) and moved metrics.jsonl aside. Now it is the same run:
    the W&B run continues (no step sent twice), metrics.jsonl restarts (as a resume drops the lines after its
    checkpoint: here all of them)."""
    import time

    from cpt.metrics import read_metrics
    from test_metrics import finished_wandb_records, history_rows

    cfg = small(tiny_cpt_data, tmp_path / "run")
    cfg["stages"][0]["steps"] = 3
    cfg["checkpoint"] = {"every": None, "export_at_end": False}  # as if killed before the first checkpoint
    cfg["logging"] = {"wandb": {"enabled": True, "mode": "offline"}, "plot": False}
    path = write(cfg, tmp_path / "c.yaml")
    assert main(["train", str(path)]) == 0
    run_id = (tmp_path / "run" / "wandb_run_id").read_text()
    time.sleep(1.1)  # wandb names offline runs by the second they start
    assert main(["train", str(path), "--resume"]) == 0
    assert "no complete checkpoint" in capsys.readouterr().out
    assert (tmp_path / "run" / "wandb_run_id").read_text() == run_id
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {r.name.rsplit("-", 1)[1] for r in runs} == {run_id}
    rows = [row for r in runs for row in history_rows(finished_wandb_records(str(r / "run-*.wandb")))
            if "data/mix/_type" not in row]
    keyed = [(row["step"], tuple(sorted(k for k in row if not k.startswith("_")))) for row in rows]
    assert len(keyed) == len(set(keyed)) and max(k[0] for k in keyed) == 3, keyed  # no step twice
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    assert steps == [1, 2, 3] and not list((tmp_path / "run").glob("metrics.jsonl.*"))


def test_a_finished_runs_export_is_not_overwritten_by_a_fresh_start(tiny_cpt_data, tmp_path, capsys):
    """A run saved without checkpoints (checkpoint.every: null) that finished has only its export: running the same
    command again (or with --resume, as the SLURM script always does) refuses in one line instead of training over it."""
    cfg = small(tiny_cpt_data, tmp_path / "run")
    cfg["checkpoint"] = {"every": None, "export_at_end": True}
    path = write(cfg, tmp_path / "c.yaml")
    assert main(["train", str(path)]) == 0
    export = tmp_path / "run" / "export"
    assert (export / "config.json").is_file() and not (tmp_path / "run" / "checkpoints").exists()
    capsys.readouterr()
    before = snapshot(tmp_path / "run")
    for extra in ([], ["--resume"]):
        assert main(["train", str(path), *extra]) == 1
        line = one_error_line(capsys.readouterr().err, "cpt train: error: ")
        assert "finished run's export" in line and str(export) in line and "run.output_dir" in line, line
        assert snapshot(tmp_path / "run") == before


def test_init_from_a_folder_without_weights(tiny_cpt_data, tiny_base, tmp_path, capsys):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    for f in tiny_base.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, empty / f.name)
    torch.save({}, empty / "pytorch_model.bin")
    cfg = small(tiny_cpt_data, tmp_path / "run")
    path = write(cfg, tmp_path / "c.yaml")
    for folder, expected in ((empty, "pytorch_model.bin (pickle)"), (tmp_path / "nothing-here", "neither an HF model")):
        (tmp_path / "nothing-here").mkdir(exist_ok=True)
        assert main(["train", str(path), "--from", str(folder)]) == 1
        line = one_error_line(capsys.readouterr().err, "cpt train: error: ")
        assert "train.init_from" in line and expected in line, line
        assert not (tmp_path / "run").exists()


def test_output_dir_is_an_existing_file(tiny_cpt_data, tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    path = write(small(tiny_cpt_data, tmp_path / "run"), tmp_path / "c.yaml")
    assert main(["train", str(path), "--output-dir", str(target)]) == 1
    line = one_error_line(capsys.readouterr().err, "cpt train: error: ")
    assert "is an existing file" in line and str(target) in line
    assert target.read_text() == "keep me"


def test_tokenizer_larger_than_the_embedding(tiny_cpt_data, tmp_path, capsys):
    cfg = small(tiny_cpt_data, tmp_path / "run")
    cfg["model"]["arch"]["vocab_size"] = 64  # the tiny tokenizer has 1024 tokens
    path = write(cfg, tmp_path / "c.yaml")
    for extra in (["--dry-run"], []):
        assert main(["train", str(path), *extra]) == 1
        line = one_error_line(capsys.readouterr().err, "cpt train: error: ")
        assert "1,024 tokens" in line and "64 rows" in line and "model.vocab" in line and "model.tokenizer" in line
        assert not (tmp_path / "run").exists()


def test_flash_attention_without_flash_attn(tiny_cpt_data, tmp_path, capsys):
    from transformers.utils import is_flash_attn_2_available
    from transformers.utils.import_utils import is_kernels_available

    if is_flash_attn_2_available() or is_kernels_available():
        pytest.skip("flash-attn (or the kernels fallback) is available here")
    cfg = small(tiny_cpt_data, tmp_path / "run")
    cfg["model"]["attn_implementation"] = "flash_attention_2"
    path = write(cfg, tmp_path / "c.yaml")
    for extra in (["--dry-run"], []):
        assert main(["train", str(path), *extra]) == 1
        line = one_error_line(capsys.readouterr().err, "cpt train: error: ")
        assert "flash_attention_2 needs the flash-attn package" in line and "sdpa" in line
        assert not (tmp_path / "run").exists()


def test_anneal_from_a_decaying_phase_creates_nothing(trunk, tmp_path, capsys):
    path, run, _ = trunk
    ckpt = run / "checkpoints" / "step_00000002"
    for dry in ([], ["--dry-run"]):  # the dry run refuses it too (it used to print the trunk's plan from step 0)
        assert main(["train", str(path), "--from", str(ckpt), "--anneal", "2", "--output-dir", str(tmp_path / "b"), *dry]) == 1
        line = one_error_line(capsys.readouterr().err, "cpt train: error: ")
        assert "--anneal from" in line and "step 2" in line and "constant or stable phase" in line
        assert not (tmp_path / "b").exists()


def test_anneal_branch_into_the_trunks_directory_asks_for_its_own(trunk, capsys):
    """`cpt train trunk.yaml --from CKPT --anneal N` without --output-dir names the trunk's own directory: the line
    asks for --output-dir (it said 'pass --resume', which then failed on the changed config); the trunk is untouched."""
    path, run, _ = trunk
    before = snapshot(run)
    assert main(["train", str(path), "--from", str(run / "checkpoints" / "step_00000004"), "--anneal", "2"]) == 1
    line = one_error_line(capsys.readouterr().err, "cpt train: error: ")
    assert "an anneal branch writes to a run directory of its own: give --output-dir a new directory" in line
    assert snapshot(run) == before


def test_an_anneal_branch_of_an_anneal_branch_is_refused(trunk, tmp_path, capsys):
    """`--from BRANCH/checkpoints/step_N --anneal M`: a checkpoint written during an anneal (its LR already decaying)
    was taken as a trunk checkpoint: the new branch restarted the anneal from the trunk's constant LR (a model annealed
    to min_lr pushed back up 3x, the log naming a constant LR it never had) and recorded the wrong branch point. Now
    one line refuses it, the dry run too, naming the branch point; nothing is created. An earlier branch's directory
    given as the new branch's --output-dir says to choose a new one or --resume there."""
    path, run, _ = trunk
    branch = tmp_path / "branch"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", str(path), "--from", str(run / "checkpoints" / "step_00000004"), "--anneal", "2",
                     "--output-dir", str(branch)]) == 0
    capsys.readouterr()
    before = snapshot(branch)
    for dry in ([], ["--dry-run"]):
        assert main(["train", str(path), "--from", str(branch / "checkpoints" / "step_00000006"), "--anneal", "2",
                     "--output-dir", str(tmp_path / "again"), *dry]) == 1
        line = one_error_line(capsys.readouterr().err, "cpt train: error: ")
        assert "(step 6): it is an anneal branch's checkpoint (branched off the trunk at step 4)" in line, line
        assert "branch from a checkpoint of the trunk, or continue that branch with --resume" in line
        assert not (tmp_path / "again").exists()
    assert main(["train", str(path), "--from", str(run / "checkpoints" / "step_00000004"), "--anneal", "2",
                 "--output-dir", str(branch)]) == 1
    line = one_error_line(capsys.readouterr().err, "cpt train: error: ")
    assert "give --output-dir a new directory for the branch (or add --resume to continue a branch" in line, line
    assert snapshot(branch) == before
    # --resume there with another --from: the branch continues from its own branch point, and a warning says that
    # --from is not used (it continued silently)
    assert main(["train", str(path), "--from", str(run / "checkpoints" / "step_00000002"), "--anneal", "2",
                 "--output-dir", str(branch), "--resume"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert (f"warning: --resume continues the anneal branch in {branch}, started with --from "
            f"{run / 'checkpoints' / 'step_00000004'} (branched at step 4); --from {run / 'checkpoints' / 'step_00000002'} "
            "is not used") in out, out


def test_resume_with_anneal_in_the_trunks_directory_is_one_line(trunk, capsys):
    """`cpt train trunk.yaml --resume --allow-config-change --anneal N [--from CKPT]` names the trunk's own directory:
    it annealed the finished trunk in place from its newest step (whatever --from said), writing into the trunk. Now one
    line says --resume continues a branch, and how to branch instead; the trunk is untouched."""
    path, run, _ = trunk
    before = snapshot(run)
    ckpt = run / "checkpoints" / "step_00000004"
    for extra in (["--allow-config-change", "--from", str(ckpt)], ["--from", str(ckpt)]):  # (no --from: the config refuses)
        assert main(["train", str(path), "--resume", "--anneal", "2", *extra]) == 1
        line = one_error_line(capsys.readouterr().err, "cpt train: error: ")
        assert "step_00000006 is a trunk checkpoint, not an anneal branch's" in line, line
        assert "leave --resume out: cpt train CONFIG --from" in line and "--anneal 2 --output-dir NEW_DIR" in line
        assert snapshot(run) == before


def test_dry_run_of_an_anneal_branch_shows_the_branch(trunk, tmp_path, capsys):
    """`cpt train ... --from CKPT --anneal N --dry-run`: the branch's steps, tokens and LRs, not the trunk's plan."""
    path, run, _ = trunk
    ckpt = run / "checkpoints" / "step_00000004"
    assert main(["train", str(path), "--from", str(ckpt), "--anneal", "3", "--output-dir", str(tmp_path / "b"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "anneal branch: steps 4..7 from the trunk checkpoint's step 4" in out
    # 3 steps of 8 x 64 tokens, linear from the constant lr 1e-3 to min_lr 1e-5 (the last update exactly min_lr)
    assert "cpt-python: 3 steps, 1,536 tokens; lr 0.00067 -> peak 0.00067 -> 1e-05;" in out, out
    assert "total: 3 steps, 1,536 training tokens" in out and not (tmp_path / "b").exists()
    # a branch config whose trunk is cut into two stages (the second continues it): the branch trains stage 1 only,
    # and its line is numbered as the config and the mix line above it number it (it said stage 0)
    cfg = yaml.safe_load(path.read_text())
    first = copy.deepcopy(cfg["stages"][0])
    first["steps"] = 4
    cfg["stages"] = [first, {**copy.deepcopy(first), "name": "later", "steps": 4,
                             "schedule": {**first["schedule"], "continue_trunk": True}}]
    branch = write(cfg, tmp_path / "branch.yaml")
    assert main(["train", str(branch), "--from", str(ckpt), "--anneal", "3", "--output-dir", str(tmp_path / "b"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "stage 1 later mix:" in out and "\nstage 1 later: 3 steps, 1,536 tokens;" in out, out


def test_anneal_needs_a_cpt_checkpoint(trunk, tiny_base, tmp_path, capsys):
    """--anneal without --from, the config's train.init_from an HF model: one line asking for the trunk's checkpoint
    (it used to read the HF model as step 0 and blame the warmup phase). Without any init_from the config refuses."""
    path, _, _ = trunk
    out = tmp_path / "b"
    assert main(["train", str(path), "--anneal", "2", "--output-dir", str(out), "--set", f"train.init_from={tiny_base}"]) == 1
    line = one_error_line(capsys.readouterr().err, "cpt train: error: ")
    assert "branches off a cpt checkpoint of the trunk: give it with --from CKPT" in line
    assert line.endswith(f"{tiny_base} is an HF model") and not out.exists()
    assert main(["train", str(path), "--anneal", "2", "--output-dir", str(out)]) == 2
    assert "train.anneal_steps needs train.init_from" in capsys.readouterr().err and not out.exists()


def test_lora_and_full_checkpoints_across_runs_say_how_to_convert(trunk, tiny_cpt_data, tmp_path, capsys):
    """An anneal branch from a full model's checkpoint in a LoRA run (a new stage from it works: tests/test_stage_base.py),
    or a new stage from a LoRA run's checkpoint in a full run: one line says what to do instead."""
    path, run, _ = trunk
    lora = {"r": 2, "alpha": 4, "target_modules": ["q_proj"]}
    cfg = small(tiny_cpt_data, tmp_path / "b")
    cfg["model"]["lora"], cfg["stages"] = lora, yaml.safe_load(Path(path).read_text())["stages"]  # (infinite: a branch)
    ckpt = run / "checkpoints" / "step_00000004"
    assert main(["train", str(write(cfg, tmp_path / "lora.yaml")), "--from", str(ckpt), "--anneal", "2"]) == 1
    line = one_error_line(capsys.readouterr().err, "cpt train: error: ")
    assert "--anneal (train.anneal_steps) with model.lora" in line and "as a new stage" in line and str(ckpt) in line
    assert main(["train", str(tmp_path / "lora.yaml"), "--from", str(ckpt), "--set", "train.init_optimizer=true"]) == 1
    line = one_error_line(capsys.readouterr().err, "cpt train: error: ")  # (its optimizer state is the full model's)
    assert "train.init_optimizer" in line and "fresh optimizer" in line
    lora_run = tmp_path / "lora-run"
    cfg = small(tiny_cpt_data, lora_run)
    cfg["model"]["lora"] = lora
    assert main(["train", str(write(cfg, tmp_path / "lora2.yaml"))]) == 0
    assert main(["train", str(path), "--from", str(lora_run), "--output-dir", str(tmp_path / "c")]) == 1
    line = one_error_line(capsys.readouterr().err, "cpt train: error: ")
    assert "it is a LoRA run's checkpoint and this run has no model.lora" in line and "cpt export" in line
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_a_field_added_since_the_checkpoint_is_not_a_trajectory_change():
    """A checkpoint's config.yaml written before a field existed (train.z_loss, a source's add_bos, default values)
    resumed as changed ('train.z_loss: None -> 0.0', 'data.sources.a.add_bos: (not set) -> None'): every checkpoint
    of an earlier cpt was refused. Missing fields take their defaults; a value set differs as before."""
    from cpt.config import config_to_dict, load_config, trajectory_changes

    base = {"model": {"tokenizer": "t", "arch": {"hidden_size": 8}},
            "data": {"sources": [{"name": "a", "path": "/x"}]}, "stages": [{"steps": 4, "mix": {"a": 1}}]}
    cfg = load_config(base=base)
    older = config_to_dict(cfg)
    del older["train"]["z_loss"], older["train"]["router_aux_loss_coef"], older["data"]["sources"][0]["add_bos"]
    assert trajectory_changes(older, cfg) == []
    assert trajectory_changes(older, load_config(base=base, overrides=["train.z_loss=1e-4"])) == ["train.z_loss: 0.0 -> 0.0001"]
    older["train"]["no_such_field"] = 1  # a config that no longer validates is compared as written
    assert trajectory_changes(older, cfg) == ["data.sources.a.add_bos: '(not set)' -> None", "train.z_loss: None -> 0.0"]


def test_resume_with_a_changed_trajectory_is_refused(trunk, tmp_path, capsys):
    path, run, _ = trunk
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = snapshot(copy)
    args = ["train", str(path), "--resume", "--output-dir", str(copy)]
    changed = ["--set", "stages.0.steps=8", "--set", "run.seed=7", "--set", "train.global_batch_size=4",
               "--set", "train.micro_batch_size=2"]
    assert main([*args, *changed]) == 1
    line = one_error_line(capsys.readouterr().err, "cpt train: error: ")
    assert "stages.0.steps: 6 -> 8" in line and "run.seed: 1234 -> 7" in line and "train.global_batch_size: 8 -> 4" in line
    assert "micro_batch_size" not in line and "--allow-config-change" in line
    assert snapshot(copy) == before  # nothing written, not even config.yaml
    # cadence, micro-batch size (accumulation) and kernels are not the trajectory; the override flag continues
    ok = ["--set", "stages.0.steps=8", "--set", "train.micro_batch_size=2", "--set", "eval.every=3",
          "--set", "model.attn_implementation=eager", "--allow-config-change"]
    assert main([*args, *ok]) == 0
    assert "resumed" in capsys.readouterr().out
    saved = yaml.safe_load((copy / "checkpoints" / "step_00000008" / "config.yaml").read_text())
    assert saved["stages"][0]["steps"] == 8


def test_trajectory_fields():
    from cpt.config import config_to_dict, load_config, trajectory_changes

    base = {"model": {"tokenizer": "t", "arch": {"hidden_size": 8, "hub_token": "S"}},
            "data": {"sources": [{"name": "a", "path": "/x"}]}, "stages": [{"steps": 4, "mix": {"a": 1}}]}
    cfg = load_config(base=base)
    saved = config_to_dict(cfg)
    same = ["run.output_dir=/elsewhere", "run.name=n", "train.micro_batch_size=4", "train.log_every=3", "eval.every=5",
            "checkpoint.every=7", "logging.plot=false", "model.compile=true", "model.attn_implementation=eager",
            "optim.fused=false", "data.sources.0.path=/moved", "model.tokenizer=/moved-tok", "stages.0.name=renamed",
            "data.max_epochs_warning=9", "train.init_from=/x"]
    assert trajectory_changes(saved, load_config(base=base, overrides=same)) == []
    hf = {**base, "data": {"sources": [{"name": "a", "type": "hf", "path": "json", "data_files": "/x/a.jsonl"}]}}
    moved = ["data.sources.0.data_files=/moved/a.jsonl"]  # (the files are checked by name and size on resume)
    assert trajectory_changes(config_to_dict(load_config(base=hf)), load_config(base=hf, overrides=moved)) == []
    changed = ["model.arch.hidden_size=16", "model.arch.hub_token=OTHER", "optim.weight_decay=0.0", "train.precision=fp32",
               "data.seq_len=128", "stages.0.mix.a=2", "train.ema_decay=0.9"]
    got = trajectory_changes(saved, load_config(base=base, overrides=changed))
    assert [g.split(":")[0] for g in got] == ["data.seq_len", "model.arch.hidden_size", "optim.weight_decay",
                                             "stages.0.mix.a", "train.ema_decay", "train.precision"], got
    # a secret differs only in its redacted form, which is equal: secrets are never printed here either
    assert not any("OTHER" in g for g in got)
    # a stage appended (or removed) is one line, not one per field of it
    longer = {**base, "stages": base["stages"] + [{"name": "more", "steps": 3, "mix": {"a": 1}}]}
    assert trajectory_changes(saved, load_config(base=longer)) == ["stages.1: added (stage 'more', 3 steps)"]
    assert trajectory_changes(config_to_dict(load_config(base=longer)), cfg) == ["stages.1: removed (stage 'more', 3 steps)"]
    # sources are compared by name: one inserted before another is one line (it read `data.sources.1.replay: True ->
    # False; data.sources.2.data_files: '(not set)' -> None; ...`, a line per field of the shifted list), and so is
    # a change of their order (the mixer breaks rounding ties in it)
    two = {**base, "data": {"sources": [{"name": "a", "path": "/x"}, {"name": "old", "path": "/o", "replay": True}]}}
    three = {**two, "data": {"sources": [two["data"]["sources"][0], {"name": "b", "path": "/b"}, two["data"]["sources"][1]]}}
    assert trajectory_changes(config_to_dict(load_config(base=two)), load_config(base=three)) == ["data.sources.b: added (/b)"]
    assert trajectory_changes(config_to_dict(load_config(base=three)), load_config(base=two)) == ["data.sources.b: removed (/b)"]
    swapped = {**two, "data": {"sources": two["data"]["sources"][::-1]}}
    assert trajectory_changes(config_to_dict(load_config(base=two)), load_config(base=swapped)) == [
        "data.sources: order ['a', 'old'] -> ['old', 'a']"]
    # a section switched on or off is one line (it was one per field: `train.skip_spikes: None -> '(not set)';
    # train.skip_spikes.max_in_a_row: '(not set)' -> 8; ...`)
    spikes = load_config(base=base, overrides=["train.skip_spikes.sigma=5"])
    assert trajectory_changes(saved, spikes) == [
        "train.skip_spikes: None -> {'sigma': 5.0, 'window': 128, 'min_history': None, 'max_in_a_row': 8}"]
    assert trajectory_changes(config_to_dict(spikes), cfg) == [
        "train.skip_spikes: {'sigma': 5.0, 'window': 128, 'min_history': None, 'max_in_a_row': 8} -> None"]


def _pickle_only_model(tiny_base, folder: Path) -> Path:
    from safetensors.torch import load_file

    folder.mkdir()
    for f in tiny_base.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, folder / f.name)
    torch.save(load_file(str(tiny_base / "model.safetensors")), folder / "pytorch_model.bin")
    return folder


def test_average_weights_that_are_not_numbers_are_a_usage_error(tiny_base, tmp_path, capsys):
    """Was `cpt average: error: could not convert string to float: 'a'` (Python's message, exit 1)."""
    with pytest.raises(SystemExit) as e:
        main(["average", str(tmp_path / "avg"), str(tiny_base), str(tiny_base), "--weights=a,b"])
    assert e.value.code == 2
    assert "cpt average: error: argument --weights: 'a,b' is not a comma-separated list of numbers" in capsys.readouterr().err
    assert not (tmp_path / "avg").exists()


def test_pickle_checkpoints_are_refused(tiny_base, tmp_path, capsys):
    binary = _pickle_only_model(tiny_base, tmp_path / "bin")
    assert main(["average", str(tmp_path / "avg"), str(tiny_base), str(binary)]) == 1
    line = one_error_line(capsys.readouterr().err, "cpt average: error: ")
    assert "pytorch_model.bin (pickle)" in line and "safetensors" in line
    assert not (tmp_path / "avg").exists()
    assert main(["eval", str(binary), "--heldout", f"x={tmp_path}/none.txt:upstream"]) == 1
    line = one_error_line(capsys.readouterr().err, "cpt eval: error: ")
    assert "no *.safetensors weights" in line and "pytorch_model.bin (pickle)" in line
    assert main(["interpolate", str(tiny_base), str(binary), "--heldout", f"x={tmp_path}:upstream"]) == 1
    one_error_line(capsys.readouterr().err, "cpt interpolate: error: ")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_base)}))
    torch.save({}, adapter / "adapter_model.bin")
    assert main(["merge", str(adapter), "--out", str(tmp_path / "merged")]) == 1
    line = one_error_line(capsys.readouterr().err, "cpt merge: error: ")
    assert "adapter_model.bin, a pickle" in line and not (tmp_path / "merged").exists()


def test_dry_run_checks_heldout_tokenizers(tiny_cpt_data, tmp_path, capsys):
    cfg = small(tiny_cpt_data, tmp_path / "run")
    path = write(cfg, tmp_path / "c.yaml")
    assert main(["train", str(path), "--dry-run"]) == 0
    assert "held-out sets (tokenizer checked): shakespeare" in capsys.readouterr().out
    other = tmp_path / "heldout-other-tokenizer"
    shutil.copytree(cfg["data"]["heldout"][0]["path"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["hash"] = "0" * 16
    (other / "manifest.json").write_text(json.dumps(manifest))
    cfg["data"]["heldout"][0]["path"] = str(other)
    assert main(["train", str(write(cfg, path)), "--dry-run"]) == 1
    line = one_error_line(capsys.readouterr().err, "cpt train: error: ")
    assert "held-out set 'shakespeare'" in line and "vocabulary hash" in line
    assert not (tmp_path / "run").exists()


def test_resumed_anneal_branch_continues_its_anneal(trunk, tmp_path, capsys):
    """A branch killed mid-anneal resumes the same anneal (from the trunk step it branched at), not a new one."""
    from cpt.metrics import read_metrics

    path, run, _ = trunk
    branch = tmp_path / "branch"
    args = ["train", str(path), "--from", str(run / "checkpoints" / "step_00000004"), "--anneal", "4",
            "--output-dir", str(branch)]
    assert main(args) == 0
    full = {r["step"]: (r["train/lr"], r["train/loss"]) for r in read_metrics(branch) if "train/loss" in r}
    assert sorted(full) == [5, 6, 7, 8]
    shutil.rmtree(branch / "checkpoints" / "step_00000008")  # as if killed after the step-6 checkpoint
    assert main([*args, "--resume"]) == 0
    assert "resumed" in capsys.readouterr().out
    again = {r["step"]: (r["train/lr"], r["train/loss"]) for r in read_metrics(branch) if "train/loss" in r}
    assert again == full


def test_model_settings_that_do_not_fit_the_loaded_model(tiny_cpt_data, tmp_path, capsys):
    """Config values only the loaded model can check (issue 13): a LoRA module name that names no module (next to a
    correct one, which peft would adapt while silently skipping the typo) and a layer range past the last layer end
    in one line naming the field, from --dry-run (LoRA) and from training, before the run directory exists."""
    cfg = small(tiny_cpt_data, tmp_path / "run")
    cfg["model"]["lora"] = {"r": 4, "target_modules": ["q_proj", "q_projj"]}
    path = write(cfg, tmp_path / "c.yaml")
    for extra in (["--dry-run"], []):
        assert main(["train", str(path), *extra]) == 1
        line = one_error_line(capsys.readouterr().err, "cpt train: error: ")
        assert line.startswith("cpt train: error: model.lora.target_modules: ['q_projj'] match no module"), line
        assert "q_proj, up_proj" in line  # the model's linear layers, to pick from
    cfg["model"]["lora"] = None
    cfg["model"]["freeze"] = {"layers": "0-40"}  # the tiny model has 2 layers
    assert main(["train", str(write(cfg, path))]) == 1
    line = one_error_line(capsys.readouterr().err, "cpt train: error: ")
    assert line == "cpt train: error: model.freeze.layers: layer spec '0-40' is out of range for a model with 2 layers"
    cfg["model"]["freeze"] = None
    for optim, said in (({"lr_multipliers": {"embd": 0.1}}, "optim.lr_multipliers: pattern 'embd' matches no parameter"),
                        ({"lower_layers": {"below": 4, "multiplier": 0.5}}, "optim.lower_layers.below: 4 is more than the "
                                                                            "model's 2 layers")):
        cfg["optim"] = optim  # (a traceback before: param_groups raised a plain ValueError)
        assert main(["train", str(write(cfg, path))]) == 1
        assert one_error_line(capsys.readouterr().err, "cpt train: error: ").startswith(f"cpt train: error: {said}")
    assert not (tmp_path / "run").exists()


def test_vocab_files_that_cannot_be_read_name_their_field(tmp_path):
    """model.vocab's files are read after the model loads: a missing file or a bad JSON line is a ConfigError (one line
    from `cpt train` and `cpt prepare --extend-vocab`) naming the field, the file and the line."""
    from cpt.config import ConfigError
    from cpt.vocab import read_texts, read_token_file

    with pytest.raises(ConfigError, match=r"^model\.vocab\.add_tokens_file: no such file .*missing\.txt$"):
        read_token_file(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match=r"^model\.vocab\.learn_from: nothing to read at "):
        list(read_texts(tmp_path / "missing"))
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"text": broken}\n')  # read as `cpt prepare` reads: counted skip
    assert list(read_texts(tmp_path / "c.jsonl")) == ["ok"]


def test_unknown_lm_eval_task_is_one_line_before_anything_loads(tiny_cpt_data, tiny_base, tmp_path, capsys):
    """A misspelt lm-eval task: lm-eval's KeyError came as a traceback after the model had loaded (and, in a run,
    after config.yaml and metrics.jsonl were written); now one line naming the field, with close matches."""
    cfg = small(tiny_cpt_data, tmp_path / "run")
    cfg["eval"]["lm_eval"] = {"tasks": [{"name": "cpt_python_nxt", "tag": "downstream"}]}
    path = write(cfg, tmp_path / "c.yaml")
    for extra in (["--dry-run"], []):
        assert main(["train", str(path), *extra]) == 1
        line = one_error_line(capsys.readouterr().err, "cpt train: error: eval.lm_eval.tasks: unknown lm-eval task")
        assert "cpt_python_nxt" in line and "did you mean" in line and "cpt_python_next" in line
        assert not (tmp_path / "run").exists()
    assert main(["eval", str(tiny_base), "--tasks", "cpt_local,cpt_locl"]) == 1
    line = one_error_line(capsys.readouterr().err, "cpt eval: error: --tasks: unknown lm-eval task cpt_locl")
    assert "cpt_local" in line.split("did you mean", 1)[1]


def test_lm_eval_task_whose_data_is_missing_is_one_line_at_start(tiny_cpt_data, tiny_base, tmp_path, capsys):
    """A task (include_path) whose data file is gone: with eval.at_start false the run trained until the task's first
    evaluation (eval.lm_eval.every steps: hours) and died there with a traceback; `cpt eval` loaded the model first.
    Now one line naming the task and the file, before the run writes anything or the model loads."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "my_task.yaml").write_text(
        "task: my_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'moved.jsonl'}\noutput_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: answer\n"
        "metric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n")
    cfg = small(tiny_cpt_data, tmp_path / "run")
    cfg["eval"]["at_start"] = False
    cfg["eval"]["lm_eval"] = {"tasks": ["my_task"], "include_path": str(tasks), "every": 1000}
    path = write(cfg, tmp_path / "c.yaml")
    for extra in (["--dry-run"], []):
        assert main(["train", str(path), *extra]) == 1
        line = one_error_line(capsys.readouterr().err, "cpt train: error: eval.lm_eval.tasks: my_task: its data cannot be loaded")
        assert "moved.jsonl" in line
        assert not (tmp_path / "run").exists()
    assert main(["eval", str(tiny_base), "--tasks", "my_task", "--include-path", str(tasks)]) == 1
    line = one_error_line(capsys.readouterr().err, "cpt eval: error: --tasks: my_task: its data cannot be loaded")
    assert "moved.jsonl" in line


def test_cpt_eval_too_short_held_out_file_and_bad_limit_are_one_line(tiny_base, tmp_path, capsys):
    """An empty or too short --heldout file was a ValueError traceback; --limit 0 scored every document, -3 was a
    traceback and 2.5 was taken as 2; the other numeric flags are checked likewise."""
    (tmp_path / "short.txt").write_text("To be\n")
    assert main(["eval", str(tiny_base), "--heldout", f"s={tmp_path / 'short.txt'}:upstream", "--seq-len", "32"]) == 1
    line = one_error_line(capsys.readouterr().err, "cpt eval: error: held-out file ")
    assert "short.txt" in line and "fewer than one sequence of 32" in line
    # (--limit 1.0, meant as the whole, scored one document: lm-eval reads a limit >= 1 as a count)
    for flag, bad in (("--limit", "0"), ("--limit", "-3"), ("--limit", "2.5"), ("--limit", "x"), ("--limit", "1.0"),
                      # --batch-size 0 and --seq-len 1 were tracebacks, --seq-len 0 and --max-length 0 silently the
                      # default, --max-tokens -5 a budget 5 tokens short of the file
                      ("--batch-size", "0"), ("--seq-len", "1"), ("--seq-len", "0"), ("--max-tokens", "-5"),
                      ("--max-length", "0"), ("--num-fewshot", "-1")):
        with pytest.raises(SystemExit) as e:
            main(["eval", str(tiny_base), "--tasks", "cpt_arith_mc", flag, bad])
        assert e.value.code == 2 and f"argument {flag}: '{bad}'" in capsys.readouterr().err


def test_tokenizer_folder_without_a_tokenizer(tiny_cpt_data, tmp_path, capsys):
    """model.tokenizer naming an existing folder that holds no tokenizer (a data folder, say): transformers raises
    a multi-line ValueError, which came out as a traceback; now one line naming the field and the folder."""
    not_a_tokenizer = tmp_path / "data-folder"
    not_a_tokenizer.mkdir()
    (not_a_tokenizer / "notes.txt").write_text("no tokenizer here")
    cfg = small(tiny_cpt_data, tmp_path / "run")
    cfg["model"]["tokenizer"] = str(not_a_tokenizer)
    path = write(cfg, tmp_path / "c.yaml")
    for extra in (["--dry-run"], []):
        assert main(["train", str(path), *extra]) == 1
        line = one_error_line(capsys.readouterr().err, f"cpt train: error: model.tokenizer '{not_a_tokenizer}': ")
        assert "cannot load this folder" in line
        assert not (tmp_path / "run").exists()


def test_a_broken_hf_source_is_one_line(tiny_cpt_data, tmp_path, capsys):
    """An unreadable `type: hf` source (a data_files path that is not there; a malformed jsonl line datasets cannot
    skip) stopped `cpt train` with an HFSourceError traceback."""
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "def f(): return 1"}\n{"text": "unterminated\n{"text": "x = 2"}\n')
    for data_files, expected in ((tmp_path / "missing.jsonl", "failed: FileNotFoundError: Unable to find"),
                                 (broken, "a `datasets` source cannot skip broken records")):
        cfg = small(tiny_cpt_data, tmp_path / "run")
        cfg["data"]["sources"][0] = {"name": "python", "type": "hf", "path": "json", "data_files": str(data_files)}
        assert main(["train", str(write(cfg, tmp_path / "c.yaml"))]) == 1
        line = one_error_line(capsys.readouterr().err, "cpt train: error: source 'python': ")
        assert expected in line


def test_dry_run_reads_an_hf_sources_first_records(tiny_cpt_data, tmp_path, capsys):
    """A `type: hf` source whose records lack its text_field (misspelt, or another column name) passed `--dry-run`,
    which does not read records, and failed at the first step: the dry run reads the first records as the first step
    does (one line naming the fields the records have); a source with text passes and the plan is printed."""
    (tmp_path / "web.jsonl").write_text("".join(json.dumps({"content": f"def f{i}(): return {i}", "id": i}) + "\n"
                                                for i in range(50)))
    cfg = small(tiny_cpt_data, tmp_path / "run")
    cfg["data"]["sources"][0] = {"name": "python", "type": "hf", "path": "json", "data_files": str(tmp_path / "web.jsonl")}
    assert main(["train", str(write(cfg, tmp_path / "c.yaml")), "--dry-run"]) == 1
    line = one_error_line(capsys.readouterr().err, "cpt train: error: source 'python': no usable text in field 'text' ")
    assert "its records have the fields content, id: set the source's text_field" in line
    cfg["data"]["sources"][0]["text_field"] = "content"
    assert main(["train", str(write(cfg, tmp_path / "c.yaml")), "--dry-run"]) == 0
    assert "source python:" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


def test_a_source_shorter_than_one_sequence_is_one_line(tiny_cpt_data, tmp_path, capsys):
    """A prepared source with fewer tokens than data.seq_len (a small replay sample) stopped `cpt train` with a
    ValueError traceback (--dry-run said it in one line)."""
    from cpt.data.prepare import prepare

    (tmp_path / "short.jsonl").write_text('{"text": "def f(): return 1"}\n')
    prepare([str(tmp_path / "short.jsonl")], str(tiny_cpt_data / "tokenizer"), tmp_path / "short")
    cfg = small(tiny_cpt_data, tmp_path / "run")
    cfg["data"]["sources"][1]["path"] = str(tmp_path / "short")
    assert main(["train", str(write(cfg, tmp_path / "c.yaml"))]) == 1
    line = one_error_line(capsys.readouterr().err, "cpt train: error: source 'shakespeare' has ")
    assert "fewer than one sequence of 64" in line
    assert not (tmp_path / "run").exists()


def test_eval_and_interpolate_with_another_tokenizers_held_out_set_is_one_line(tiny_base, tmp_path, capsys):
    """cpt eval / cpt interpolate --heldout naming a set made with another tokenizer (or a missing folder) ended in a
    ShardError traceback."""
    from cpt.data.prepare import prepare
    from data_factories import make_docs, make_tokenizer

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(20)))
    prepare([str(tmp_path / "a.jsonl")], make_tokenizer(), tmp_path / "other")
    for command in (["eval", str(tiny_base)], ["interpolate", str(tiny_base), str(tiny_base)]):
        for folder, expected in (("other", "vocabulary hash"), ("missing", "no such folder")):
            assert main([*command, "--heldout", f"h={tmp_path / folder}:upstream", "--seq-len", "16"]) == 1
            line = one_error_line(capsys.readouterr().err, f"cpt {command[0]}: error: held-out set 'h': ")
            assert expected in line


def test_optimizer_state_of_other_trainable_parameters_is_refused(tiny_cpt_data, tmp_path, capsys):
    """torch loads Adam moments by position: a --resume --allow-config-change that freezes other layers (same shapes)
    handed layer 1's moments to layer 0 silently, and one that adds an lr multiplier (other groups) was a traceback.
    Both are one line; train.init_from the checkpoint with init_optimizer: false (what the line advises) still runs."""
    import shutil

    cfg = small(tiny_cpt_data, tmp_path / "run")
    cfg["model"]["freeze"] = {"layers": "bottom_half"}
    path = write(cfg, tmp_path / "c.yaml")
    assert main(["train", str(path)]) == 0
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000004")
    capsys.readouterr()
    for change, first in ((["--set", "model.freeze.layers=top_half"], "model.layers.0."),
                          (["--set", "optim.lr_multipliers={embed_tokens: 0.5}"], "the number or sizes")):
        assert main(["train", str(path), "--resume", "--allow-config-change", *change]) == 1
        line = one_error_line(capsys.readouterr().err, "cpt train: error: ")
        assert "its optimizer state is for other trainable parameters" in line and first in line, line
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    branch = {**cfg, "run": {**cfg["run"], "output_dir": str(tmp_path / "next")},
              "model": {**cfg["model"], "freeze": {"layers": "top_half"}}}
    branch["train"] = {**cfg["train"], "init_from": str(ckpt), "init_optimizer": True}
    assert main(["train", str(write(branch, tmp_path / "n.yaml"))]) == 1
    assert "its optimizer state is for other" in one_error_line(capsys.readouterr().err, "cpt train: error: ")
    branch["train"]["init_optimizer"] = False
    branch["optim"] = {"lr_multipliers": {"embed_tokens": 0.5}}
    assert main(["train", str(write(branch, tmp_path / "n.yaml"))]) == 0


def test_truncated_weight_files_are_one_line_naming_the_file(tiny_base, tmp_path, capsys):
    """A model or adapter whose .safetensors file was cut short (an interrupted copy or download) is one error line
    naming the file in every command that reads it; safetensors' own error ("Error while deserializing header:
    invalid header length") was a traceback naming no file."""
    cut = tmp_path / "cut"
    shutil.copytree(tiny_base, cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # header whole, tensor data cut
    heldout = f"x={tmp_path}:upstream"
    for argv in (["average", str(tmp_path / "avg"), str(tiny_base), str(cut)], ["eval", str(cut), "--heldout", heldout],
                 ["interpolate", str(tiny_base), str(cut), "--heldout", heldout]):
        assert main(argv) == 1
        line = one_error_line(capsys.readouterr().err, f"cpt {argv[0]}: error: ")
        assert f"{cut}: model.safetensors has" in line and "truncated" in line, line
    assert not (tmp_path / "avg").exists()
    weights.write_bytes(b"")  # an empty file: not even a header
    assert main(["average", str(tmp_path / "avg"), str(tiny_base), str(cut)]) == 1
    assert "model.safetensors is truncated or not a safetensors file (0 bytes)" in capsys.readouterr().err
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_base)}))
    (adapter / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    assert main(["merge", str(adapter), "--out", str(tmp_path / "merged")]) == 1
    line = one_error_line(capsys.readouterr().err, "cpt merge: error: ")
    assert "adapter_model.safetensors" in line and not (tmp_path / "merged").exists()


def test_eval_and_interpolate_results_file_that_cannot_be_written_is_refused_first(tiny_base, tiny_cpt_data, tmp_path,
                                                                                   capsys):
    """`cpt eval --out DIR` / `cpt interpolate --json DIR` (a folder, or a path under a file): refused in one line
    before anything is evaluated; the write at the end failed with an IsADirectoryError traceback and lost the scores."""
    heldout = f"s={tiny_cpt_data / 'data' / 'shakespeare' / 'heldout'}:upstream"
    (tmp_path / "file").write_text("x")
    for argv in (["eval", str(tiny_base), "--heldout", heldout, "--out", str(tmp_path)],
                 ["eval", str(tiny_base), "--heldout", heldout, "--out", str(tmp_path / "file" / "r.json")],
                 ["interpolate", str(tiny_base), str(tiny_base), "--heldout", heldout, "--json", str(tmp_path)]):
        assert main(argv) == 1
        line = one_error_line(capsys.readouterr().err, f"cpt {argv[0]}: error: --")
        assert "is a folder; give a file path" in line or "is a file, not a folder" in line, line
    assert (tmp_path / "file").read_text() == "x"


def test_model_arch_that_a_loaded_model_does_not_have_is_said(tiny_cpt_data, tiny_base, tmp_path, caplog):
    """`--set model.arch.hidden_size=...` in a run that starts from an HF model (train.init_from): the model is loaded
    as it was saved, so the setting is not applied; that was silent (the run trained the loaded model's shape)."""
    cfg = small(tiny_cpt_data, tmp_path / "run")
    cfg["train"]["init_from"] = str(tiny_base)
    path = write(cfg, tmp_path / "c.yaml")
    with caplog.at_level("WARNING", logger="cpt.model"):
        assert main(["train", str(path), "--dry-run", "--set", "model.arch.num_hidden_layers=5"]) == 0
    said = [r.getMessage() for r in caplog.records if "model.arch is not applied" in r.getMessage()]
    assert len(said) == 1 and "num_hidden_layers: 5 (the model's: 2)" in said[0] and str(tiny_base) in said[0], said


def test_an_export_inside_a_checkpoint_is_refused(trunk, tiny_base, capsys):
    """`--out` inside a resume checkpoint (`RUN/checkpoints/step_N/merged`): written there, the export was deleted with
    the checkpoint when the run pruned it (checkpoint.keep), and the checkpoint held a folder it did not write.
    `cpt export`, `cpt average` and `cpt merge` now refuse it in one line; the checkpoint is left as it was."""
    _, out, _ = trunk
    ckpt = out / "checkpoints" / "step_00000006"
    before = snapshot(ckpt)
    for argv in (["export", str(ckpt), "--out", str(ckpt / "merged")],
                 ["average", str(ckpt / "avg"), str(tiny_base), str(ckpt)]):
        assert main(argv) == 1
        line = one_error_line(capsys.readouterr().err, f"cpt {argv[0]}: ")
        assert f"lies inside the checkpoint {ckpt}" in line, line
    assert snapshot(ckpt) == before


def test_a_damaged_run_config_is_one_line_for_eval_and_interpolate(tiny_base, tiny_cpt_data, tmp_path, capsys):
    """`cpt eval RUN` / `cpt interpolate BASE RUN` read the run's config.yaml for its evaluation settings: an empty or
    cut one was a ConfigError traceback; now one line naming the file."""
    run = tmp_path / "run"
    shutil.copytree(tiny_base, run / "export")
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    heldout = f"s={tiny_cpt_data / 'data' / 'shakespeare' / 'heldout'}:upstream"
    for text in ("", "run: [\n"):
        (run / "config.yaml").write_text(text)
        for argv in (["eval", str(run), "--heldout", heldout],
                     ["interpolate", str(tiny_base), str(run), "--heldout", heldout]):
            assert main(argv) == 1
            line = one_error_line(capsys.readouterr().err, f"cpt {argv[0]}: error: {run / 'config.yaml'}: ")
            assert "Field required" in line or "not valid YAML" in line, line


def test_an_adapter_whose_base_is_gone_or_whose_config_is_broken_is_one_line(tiny_base, tiny_cpt_data, tmp_path,
                                                                            capsys):
    """`cpt merge` / `cpt eval` of a peft adapter whose recorded base folder was moved away (OSError 'Repo id must
    be in the form ...'), or whose adapter_config.json is cut (JSONDecodeError), and `cpt eval` of an export with a
    cut config.json: each was a traceback, now one line naming what could not be read."""
    heldout = f"s={tiny_cpt_data / 'data' / 'shakespeare' / 'heldout'}:upstream"
    gone, broken, export = tmp_path / "gone", tmp_path / "broken", tmp_path / "export"
    for d in (gone, broken):
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")  # (a valid empty file)
    (gone / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "moved")}))
    (broken / "adapter_config.json").write_text("{")
    shutil.copytree(tiny_base, export)
    (export / "config.json").write_text("{")
    cases = [(gone, f"base model '{tmp_path / 'moved'}'"), (broken, f"{broken / 'adapter_config.json'}: cannot be read")]
    for folder, said in cases:
        for argv in (["merge", str(folder), "--out", str(tmp_path / "m")], ["eval", str(folder), "--heldout", heldout]):
            assert main(argv) == 1
            assert said in one_error_line(capsys.readouterr().err, f"cpt {argv[0]}: error: ")
    assert main(["eval", str(export), "--heldout", heldout]) == 1
    assert f"model '{export}'" in one_error_line(capsys.readouterr().err, "cpt eval: error: ")
    assert not (tmp_path / "m").exists()


def test_average_refuses_a_cut_config_it_would_copy(tiny_base, tmp_path, capsys):
    """`cpt average OUT A B` copies A's config.json into OUT: a cut one was copied as it was (exit 0, an output that
    then did not load); now one line naming it, and no OUT."""
    cut = tmp_path / "cut"
    shutil.copytree(tiny_base, cut)
    (cut / "config.json").write_text("{")
    assert main(["average", str(tmp_path / "avg"), str(cut), str(tiny_base)]) == 1
    line = one_error_line(capsys.readouterr().err, "cpt average: error: ")
    assert f"{cut / 'config.json'}: cannot be read (JSONDecodeError" in line, line
    assert not (tmp_path / "avg").exists()


def test_average_into_a_runs_own_export_is_refused(tiny_base, tmp_path, capsys):
    """`cpt average RUN/export CKPT1 CKPT2` (OUT forgotten: it comes first) replaced the run's final export with the
    average, which `cpt eval RUN` then scored as the run's model; now one line, the export untouched."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_base, a)
    shutil.copytree(tiny_base, b)
    before = {f.name: f.read_bytes() for f in tiny_base.iterdir() if f.is_file()}
    assert main(["average", str(tiny_base), str(a), str(b)]) == 1
    line = one_error_line(capsys.readouterr().err, "cpt average: error: ")
    assert "is the export of the run" in line and "OUT comes first" in line, line
    assert {f.name: f.read_bytes() for f in tiny_base.iterdir() if f.is_file()} == before
    assert main(["average", str(tmp_path / "avg"), str(a), str(b)]) == 0  # a new folder: averaged


def test_a_wandb_service_named_by_the_environment_is_not_used(tiny_cpt_data, tmp_path, monkeypatch):
    """`cpt train` started from a process that used wandb (a notebook, a driver script; or an sbatch job submitted
    from one, which exports its environment) inherits WANDB_SERVICE and attached to that service: gone (the parent
    exited, another node), W&B could not start and the run stopped ("Failed to connect to service"). A cpt command
    now starts its own service."""
    from cpt.metrics import read_metrics

    monkeypatch.setenv("WANDB_SERVICE", "3-999999-tcp-localhost-1")  # a service no longer there
    cfg = small(tiny_cpt_data, tmp_path / "run")
    cfg["stages"][0]["steps"] = 3
    cfg["checkpoint"] = {"every": None, "export_at_end": False}
    cfg["logging"] = {"wandb": {"enabled": True, "mode": "offline"}, "plot": False}
    assert main(["train", str(write(cfg, tmp_path / "c.yaml"))]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "train/loss" in r] == [1, 2, 3]
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 1
