"""Crash consistency at every write point: the training process is SIGKILLed at each file boundary of a
checkpoint save (the first save and a later one, which also prunes), at random points between saves
and in the middle of the final HF export; `cpt train --resume` then continues from the newest complete
checkpoint (or from scratch, saying so), logs exactly the uninterrupted run's losses and leaves no
temporary files behind.

The kills come from the save code's test hook (CPT_FAULT_INJECT=<point>, cpt/fileio.py: fault_point).
To keep this fast, each run is a fork of the test process (torch already imported); one case goes
through a real `cpt train` subprocess with the environment variable, as a user would.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import tiny_run_config
from forking import forked_cli
from cpt.checkpoint import CHECKSUMS, list_checkpoints
from cpt.metrics import read_metrics

pytestmark = pytest.mark.slow

STEPS, EVERY = 6, 2  # saves at 2 (the first), 4 (a later one: prunes 2, keep 1) and 6 (the end)


def losses(run_dir) -> dict[int, float]:
    path = Path(run_dir) / "metrics.jsonl"
    return {r["step"]: r["train/loss"] for r in read_metrics(path) if "train/loss" in r} if path.is_file() else {}


def crash_config(tiny_cpt_data, out, export=False) -> dict:
    cfg = tiny_run_config(tiny_cpt_data, out, checkpoint={"every": EVERY, "keep": 1, "export_at_end": export},
                          eval={"at_start": False})
    cfg["stages"][0]["steps"] = STEPS
    cfg["data"]["heldout"] = []
    return cfg


@pytest.fixture(scope="module")
def uninterrupted(tiny_cpt_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    cfg_path = out.parent / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(crash_config(tiny_cpt_data, out)))
    assert forked_cli(["train", str(cfg_path)], out.parent / "log") == 0, (out.parent / "log").read_text()
    ref = losses(out)
    assert sorted(ref) == list(range(1, STEPS + 1))
    files = json.loads((list_checkpoints(out)[-1] / CHECKSUMS).read_text())["files"]
    return ref, sorted(files)


def check_resume(tiny_cpt_data, tmp_path, ref, env=None, kill_when=None, export=False, expect_from=None):
    """Run until killed, resume, compare with the uninterrupted run. Returns the resumed run's log."""
    out = tmp_path / "run"
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(crash_config(tiny_cpt_data, out, export)))
    code = forked_cli(["train", str(cfg_path)], tmp_path / "killed.log", env, kill_when)
    assert code == -signal.SIGKILL, (code, (tmp_path / "killed.log").read_text())
    code = forked_cli(["train", str(cfg_path), "--resume"], tmp_path / "resumed.log")
    log = (tmp_path / "resumed.log").read_text()
    assert code == 0, log
    if expect_from == 0:
        assert "no complete checkpoint" in log and "starting from scratch" in log, log
    elif expect_from is not None:
        assert f"step_{expect_from:08d} at step {expect_from} " in log, log
    assert log.count("is not usable") <= 1, log  # a fallback is reported once
    assert losses(out) == ref  # every step logged once, bitwise the uninterrupted run's losses
    assert [p.name for p in list_checkpoints(out)] == [f"step_{STEPS:08d}"]
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no leftovers
    assert not (out / "run.lock").exists()
    return out, log


def fault_points(files: list[str], step: int, mid_file: bool) -> list[tuple[str, int]]:
    """Every file boundary of the save at `step` (and, with `mid_file`, a point inside every file), each with
    the step `--resume` must continue from after a kill there."""
    before = step - EVERY  # the previous checkpoint (0: none, start from scratch)
    points = [(f"save:begin@{step}", before)]
    for name in files:  # the order write_files uses does not matter: every file is covered
        points += [(f"{name}:partial@{step}", before)] if mid_file else []
        points += [(f"{name}:done@{step}", before)]
    return points + [(f"save:checksums@{step}", before), (f"save:renamed@{step}", step), (f"save:pruned@{step}", step)]


def test_fault_points_cover_every_file(uninterrupted):
    _, files = uninterrupted  # the files of a complete checkpoint, as CHECKSUMS.json lists them
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "trainer_state.json", "config.yaml"} <= set(files)


@pytest.mark.parametrize("save_step", [EVERY, 2 * EVERY], ids=["first-save", "later-save"])
def test_kill_at_every_file_boundary_of_a_save(tiny_cpt_data, tmp_path, uninterrupted, save_step):
    ref, files = uninterrupted
    # inside every file only for the first save (the case users met); every boundary of both saves
    for i, (point, resume_from) in enumerate(fault_points(files, save_step, mid_file=save_step == EVERY)):
        case = tmp_path / f"case{i}"
        case.mkdir()
        try:
            check_resume(tiny_cpt_data, case, ref, env={"CPT_FAULT_INJECT": point}, expect_from=resume_from)
        except AssertionError as e:
            raise AssertionError(f"kill at {point}: {e}") from None


def test_kill_at_random_points_between_saves(tiny_cpt_data, tmp_path, uninterrupted):
    ref, _ = uninterrupted
    rng = random.Random(13)
    for i in range(3):
        case = tmp_path / f"case{i}"
        case.mkdir()
        # a kill at a seeded point inside steps 2..STEPS-1 (not after the last step: a fast machine finishes the
        # run, its final save and export within a few tenths of a second, and the kill would come too late)
        after, delay = rng.randint(1, STEPS - 2), rng.uniform(0, 0.05)
        seen = {}

        def kill_when(case=case, after=after, delay=delay, seen=seen):
            if len(losses(case / "run")) >= after:
                seen.setdefault("t", time.time())
                return time.time() - seen["t"] >= delay
            return False

        check_resume(tiny_cpt_data, case, ref, kill_when=kill_when)


@pytest.mark.parametrize("point", ["export:weights:export", "export:written:export"])
def test_interrupted_export_leaves_no_half_directory(tiny_cpt_data, tmp_path, uninterrupted, point):
    from transformers import AutoModelForCausalLM

    ref, _ = uninterrupted
    out = tmp_path / "run"
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(crash_config(tiny_cpt_data, out, export=True)))
    code = forked_cli(["train", str(cfg_path)], tmp_path / "killed.log", {"CPT_FAULT_INJECT": point})
    assert code == -signal.SIGKILL
    assert not (out / "export").exists()  # only the hidden temp folder, which from_pretrained never sees
    assert (out / ".export.tmp").is_dir()
    assert forked_cli(["train", str(cfg_path), "--resume"], tmp_path / "resumed.log") == 0, (tmp_path / "resumed.log").read_text()
    assert losses(out) == ref
    assert not (out / ".export.tmp").exists()
    AutoModelForCausalLM.from_pretrained(out / "export")


def test_kill_during_a_periodic_export_after_its_checkpoint_redoes_the_export(tiny_cpt_data, tmp_path, uninterrupted):
    """A kill during the periodic HF export of step 4, which comes after step 4's checkpoint is written (synchronous
    saves: FSDP, DeepSpeed, or async_save off): the run resumes at step 4 and, before, never wrote exports/step_4
    (and left its half-written hidden folder behind for good). The resumed run writes it, equal to the uninterrupted
    run's. About 10 s."""
    ref, _ = uninterrupted
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    def config(out):
        cfg = crash_config(tiny_cpt_data, out)
        cfg["checkpoint"].update(async_save=False, export_every=2 * EVERY)
        path = out.parent / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    whole, out = tmp_path / "whole", tmp_path / "run"
    assert forked_cli(["train", str(config(whole))], tmp_path / "whole.log") == 0, (tmp_path / "whole.log").read_text()
    point = f"export:weights:step_{2 * EVERY:08d}"
    assert forked_cli(["train", str(config(out))], tmp_path / "killed.log", {"CPT_FAULT_INJECT": point}) == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(out)] == [f"step_{2 * EVERY:08d}"]  # the export's step is checkpointed
    assert forked_cli(["train", str(config(out)), "--resume"], tmp_path / "resumed.log") == 0, (tmp_path / "resumed.log").read_text()
    assert losses(out) == ref
    export = f"step_{2 * EVERY:08d}"
    assert sorted(p.name for p in (out / "exports").iterdir()) == [export]  # no hidden leftover
    got, want = load_file(out / "exports" / export / "model.safetensors"), load_file(whole / "exports" / export / "model.safetensors")
    assert sorted(got) == sorted(want) and all(got[k].equal(want[k]) for k in want)
    AutoModelForCausalLM.from_pretrained(out / "exports" / export)


def test_a_resume_at_the_last_step_keeps_its_checkpoint_and_an_interrupted_replace_is_undone(tiny_cpt_data, tmp_path,
                                                                                                 uninterrupted, capsys):
    """A run resumed at its last step (a SLURM job requeued by a warning that came during its final export) saved that
    step again, replacing the checkpoint there: a needless write of the whole state, and a kill between the replace's
    two renames (`step_N` -> `.trash-step_N`, `.tmp-step_N` -> `step_N`) left no `step_N`: the next --resume went back
    to an older checkpoint, or with checkpoint.keep 1 started from scratch (and its first save deleted both copies).
    The resume now leaves its start checkpoint as it is, and a replace interrupted that way (made here by hand, as a
    save of an already-saved step leaves it) is undone at the next start. About 10 s."""
    ref, _ = uninterrupted
    out, cfg_path = tmp_path / "run", tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(crash_config(tiny_cpt_data, out)))
    assert forked_cli(["train", str(cfg_path)], tmp_path / "first.log") == 0, (tmp_path / "first.log").read_text()
    last = out / "checkpoints" / f"step_{STEPS:08d}"
    before = {f.name: f.stat().st_ino for f in last.iterdir()}
    assert forked_cli(["train", str(cfg_path), "--resume"], tmp_path / "again.log") == 0, (tmp_path / "again.log").read_text()
    assert {f.name: f.stat().st_ino for f in last.iterdir()} == before  # (the same files: not written again)
    trash, tmp = last.with_name(f".trash-{last.name}"), last.with_name(f".tmp-{last.name}")
    os.replace(last, trash)  # the replace, killed between its renames
    shutil.copytree(trash, tmp)
    prune = out / "checkpoints" / f".trash-step_{EVERY:08d}"  # and a prune's half-deleted copy, never restored
    prune.mkdir()
    from cpt.cli import main

    assert main(["verify", str(out)]) == 0  # (it said "a run directory with no checkpoint", and nothing else)
    said = capsys.readouterr().out
    assert f"note   {trash}: a checkpoint a save of its own step was replacing" in said and "no checkpoint" not in said
    assert forked_cli(["train", str(cfg_path), "--resume"], tmp_path / "resumed.log") == 0, (tmp_path / "resumed.log").read_text()
    log = (tmp_path / "resumed.log").read_text()
    assert f"restored step_{STEPS:08d}: a save that was replacing it" in log and f"step_{STEPS:08d} at step {STEPS} " in log, log
    assert losses(out) == ref
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{STEPS:08d}"]  # (the new copy and the prune's gone)
    assert {f.name: f.stat().st_ino for f in last.iterdir()} == before  # the original copy


def test_kill_during_first_save_then_resume_from_the_command_line(tiny_cpt_data, tmp_path, uninterrupted):
    """The reported bug, as a user meets it: kill -9 during the first save, then `cpt train --resume`."""
    ref, _ = uninterrupted
    out = tmp_path / "run"
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(crash_config(tiny_cpt_data, out)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "cpt.cli", "train", str(cfg_path)]
    killed = subprocess.run(cmd, env={**env, "CPT_FAULT_INJECT": f"optimizer.bin:partial@{EVERY}"}, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f".tmp-step_{EVERY:08d}"]
    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "starting from scratch" in resumed.stdout
    assert "taking over the lock" in resumed.stderr  # the killed run's lock: its PID is gone
    assert losses(out) == ref


def test_every_checkpoint_corrupt_resumes_from_scratch(tiny_cpt_data, tmp_path, uninterrupted, capsys):
    """With no usable checkpoint, --resume says so, sets the broken one aside and starts over (not 'pass --resume').
    `cpt verify RUN_DIR` (or a checkpoint) makes the same check beforehand, e.g. after copying a run elsewhere."""
    from cpt.cli import main

    ref, _ = uninterrupted
    out = tmp_path / "run"
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(crash_config(tiny_cpt_data, out)))
    assert forked_cli(["train", str(cfg_path)], tmp_path / "first.log") == 0
    ckpt = list_checkpoints(out)[-1]
    assert main(["verify", str(out)]) == 0 and main(["verify", str(ckpt)]) == 0
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 2 and all(line.startswith(f"ok     {ckpt}: checkpoint, ") for line in said), said
    assert main(["verify", str(out / "checkpoints")]) == 0  # (the folder itself: it said "no manifest.json")
    assert capsys.readouterr().out.startswith(f"ok     {ckpt}: checkpoint, ")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    (ckpt / "random_states_0.pkl").unlink()  # (two problems: both listed; it said the first alone)
    assert main(["verify", str(out)]) == 1
    said = capsys.readouterr()
    failed = [line for line in said.out.splitlines() if line.startswith("FAILED ")]
    assert len(failed) == 2 and any(line.startswith(f"FAILED {ckpt}: model.safetensors has ") and "(truncated?)" in line
                                    for line in failed) and f"FAILED {ckpt}: random_states_0.pkl missing" in failed, said
    assert said.err.startswith("cpt verify: 1 of 1 folders have problems; re-copy a copied checkpoint"), said
    assert forked_cli(["train", str(cfg_path), "--resume"], tmp_path / "resumed.log") == 0, (tmp_path / "resumed.log").read_text()
    log = (tmp_path / "resumed.log").read_text()
    assert log.count("is not usable") == 1 and "set aside 1 unusable checkpoint" in log and "starting from scratch" in log
    assert losses(out) == ref
    assert (out / "checkpoints" / f"unusable-step_{STEPS:08d}").is_dir()
    assert [p.name for p in list_checkpoints(out)] == [f"step_{STEPS:08d}"]
    assert main(["verify", str(out)]) == 0  # the set-aside checkpoint is named (it said nothing of it)
    assert f"note   {out / 'checkpoints' / f'unusable-step_{STEPS:08d}'}: set aside as broken" in capsys.readouterr().out
