"""The training engine on CPU: exact resume (SIGTERM and kill -9), atomic checkpoints, non-finite steps,
anneal branches, new stages from checkpoints. Real text, tiny model, fp32."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_run_config
from cpt.checkpoint import latest_valid_checkpoint, list_checkpoints
from cpt.config import load_config
from cpt.metrics import read_metrics

pytestmark = pytest.mark.slow


def losses(run_dir) -> dict[int, float]:
    if not (Path(run_dir) / "metrics.jsonl").is_file():
        return {}
    return {r["step"]: r["train/loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "train/loss" in r}


def write_cfg(path, cfg) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def cpt_train(*args, env=None, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "cpt.cli", "train", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def wait_for(predicate, proc, timeout=120):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early:\n{proc.stdout.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tiny_cpt_data, tmp_path_factory):
    """An uninterrupted 16-step run, every loss logged."""
    from cpt.train import train

    out = tmp_path_factory.mktemp("ref") / "run"
    cfg = tiny_run_config(tiny_cpt_data, out, checkpoint={"every": 4, "keep": 2})
    cfg["stages"][0]["steps"] = 16
    result = train(load_config(base=cfg), echo=lambda *a: None)
    assert result.step == 16
    return cfg, losses(out)


def test_reference_run_outputs(reference):
    cfg, ref = reference
    run = Path(cfg["run"]["output_dir"])
    assert sorted(ref) == list(range(1, 17))
    assert all(torch.isfinite(torch.tensor(v)) for v in ref.values())
    assert [p.name for p in list_checkpoints(run)] == ["step_00000012", "step_00000016"]  # keep: 2
    assert (run / "config.yaml").is_file() and (run / "export" / "model.safetensors").is_file()
    assert not list((run / "checkpoints").glob(".tmp-*"))


def preemption_saves_only(reference, tmp_path) -> tuple[Path, Path]:
    """(config file, run directory) of the reference run in ``tmp_path`` with no checkpoint but a preemption's."""
    cfg = json.loads(json.dumps(reference[0]))
    out = tmp_path / "run"
    cfg["run"]["output_dir"] = str(out)
    cfg["checkpoint"]["every"] = 100  # only the preemption save
    return write_cfg(tmp_path / "c.yaml", cfg), out


def test_resume_after_sigterm_is_exact(reference, tmp_path):
    ref = reference[1]
    path, out = preemption_saves_only(reference, tmp_path)
    proc = cpt_train(path)
    wait_for(lambda: len(losses(out)) >= 5, proc)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, log
    assert "preemption" in log
    ckpt = latest_valid_checkpoint(out)
    k = int(ckpt.name.split("_")[1])
    assert 5 <= k < 16
    # stdout is a pipe (as in a batch job): a plain line per logged step and per evaluation, no bar; the end says
    # it was preempted, the table shows the last evaluation with its step, and the resume command is printed
    lines = log.splitlines()
    assert [int(x.split()[1].split("/")[0]) for x in lines if x.startswith("step ")] == list(range(1, k + 1))
    assert all("/16 | tokens " in x and " | loss " in x and " tok/s" in x for x in lines if x.startswith("step "))
    evals = [x for x in lines if x.startswith("eval step ")]
    assert evals[0].startswith("eval step 0: shakespeare ") and ", python " in evals[0] and "\r" not in log
    last_eval = max(r["step"] for r in read_metrics(out / "metrics.jsonl") if "eval/python/loss" in r)
    assert 0 < last_eval <= k and evals[-1].startswith(f"eval step {last_eval}: ")
    assert f"PREEMPTED at step {k} of 16" in log
    row = next(x for x in lines if x.startswith("python ")).split()
    assert row[4] == str(last_eval)  # the "last step" column, not step-0 values as "final"
    assert lines[-1] == f"to resume: cpt train {path} --resume"
    proc = cpt_train(path, "--resume")
    head = []
    for line in proc.stdout:  # a preemption signal after the run's last line, in the interpreter's teardown (seconds):
        head.append(line)  # nothing is left to save, and the finished run exited 143 (a failed job) before it was ignored
        if line.startswith("run directory:"):
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            break
    log = "".join(head) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    got = losses(out)
    assert sorted(got) == list(range(1, 17))
    for s in range(1, 17):
        assert got[s] == ref[s], (s, got[s], ref[s])  # bitwise: fp32 on CPU
    # compute accounting continues from the checkpoint's totals instead of restarting at zero
    saved = json.loads((ckpt / "trainer_state.json").read_text())["compute"]
    assert saved["wall_s"] > 0 and saved["device_s"] == pytest.approx(saved["wall_s"])  # one device
    recs = [r for r in read_metrics(out / "metrics.jsonl") if "compute/wall_hours" in r]
    after = [r for r in recs if r["step"] > k]
    assert after and all(r["compute/wall_hours"] * 3600 > saved["wall_s"] for r in after)
    # non-decreasing within each process; across the resume it continues from the checkpoint's total, which leaves out
    # the first process's time after its save (the background write, the summary: its end record has it)
    for part in ([r for r in recs if r["step"] <= k], after):
        assert all(a["compute/wall_hours"] <= b["compute/wall_hours"] for a, b in zip(part, part[1:]))
    perf = next(r for r in recs if "perf/tflops_per_device" in r)
    fpt = perf["perf/tflops_per_device"] * 1e12 / perf["perf/tokens_per_s_per_device"]  # FLOPs per token
    assert all(r["compute/flops"] == pytest.approx(r["train/tokens"] * fpt, rel=1e-9) for r in recs)
    assert "compute:" in log and "device-hours" in log


def test_a_warning_during_start_up_stops_after_one_step_with_a_checkpoint(reference, tmp_path):
    """SIGUSR1 (a SLURM time-limit warning, a preemption with send_user_signal) while `cpt train` is still starting
    (its first lines printed; the model, data and step-0 evaluation still to come): held until the loop's handler takes
    it, then one step, a checkpoint, PREEMPTED, exit 0 (the SLURM script requeues it). It ended the process by
    SIGUSR1's default action before (exit -10, no checkpoint: a failed stop, not requeued)."""
    path, out = preemption_saves_only(reference, tmp_path)
    proc = cpt_train(path)
    head = [proc.stdout.readline()]  # the first line: the run is starting
    proc.send_signal(signal.SIGUSR1)
    log = "".join(head) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-3000:]
    k = int(log.split("PREEMPTED at step ")[1].split()[0])
    assert latest_valid_checkpoint(out).name == f"step_{k:08d}", log[-3000:]
    if "preemption signal received during start-up" in log:  # (unless a loaded machine delayed the test past the start)
        assert k == 1, log[-3000:]


def test_the_preempted_marker_is_written_by_the_nodes_first_rank_and_a_failed_write_is_one_warning(tmp_path, monkeypatch,
                                                                                                     capsys):
    """$CPT_PREEMPTED_MARKER (the launch scripts, the SLURM script): each node's first rank writes it on a preempted
    stop, with or without --preempted-exit-code, and the ranks exit 0 (the script decides); a marker that cannot be
    written (its folder gone) is one warning, never a traceback after the saved checkpoint: exit N with the option,
    else 0."""
    from cpt.stop_signals import PREEMPTED_MARKER, preempted_exit as _preempted_exit

    marker = tmp_path / "preempted"
    monkeypatch.setenv(PREEMPTED_MARKER, str(marker))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert _preempted_exit(None) == 0 and not marker.exists()  # another rank of the node
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert _preempted_exit(None) == 0 and marker.read_text() == "preempted\n"
    monkeypatch.setenv(PREEMPTED_MARKER, str(tmp_path / "gone" / "preempted"))
    assert _preempted_exit(75) == 75 and _preempted_exit(None) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("cpt train: warning: could not write $CPT_PREEMPTED_MARKER") for line in err)


def test_preempted_exit_code(reference, tmp_path):
    """`--preempted-exit-code 75`: a stop on SIGTERM exits 75 after its checkpoint and PREEMPTED line (a k8s Job would
    count 0 as done), also with a second SIGTERM in the interpreter's teardown; the resumed run that finishes exits 0;
    a code outside 1..255 is a command-line error (2)."""
    path, out = preemption_saves_only(reference, tmp_path)
    bad = cpt_train(path, "--preempted-exit-code", "256")
    assert bad.communicate(timeout=60)[0].count("an exit code is 1..255, not '256'") == 1 and bad.returncode == 2
    proc = cpt_train(path, "--preempted-exit-code", "75")
    wait_for(lambda: len(losses(out)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    head = []
    for line in proc.stdout:
        head.append(line)
        if line.startswith("to resume:"):  # the run's last line: the teardown follows
            proc.send_signal(signal.SIGTERM)
            break
    log = "".join(head) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, log
    assert "PREEMPTED at step" in log and latest_valid_checkpoint(out) is not None
    assert head[-1].strip().endswith("--preempted-exit-code 75 --resume"), head[-1]
    proc = cpt_train(path, "--preempted-exit-code", "75", "--resume")
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and (out / "export" / "model.safetensors").is_file(), log


def test_sigterm_while_the_run_starts_is_a_stop_with_nothing_to_save(reference, tmp_path):
    """SIGTERM before the training loop's handler (here while the model would load: a fault point holds the start
    there) ended `cpt train` by the signal's default action: exit 143, not a word, the run lock left behind, and under
    `--preempted-exit-code` a preemption during a long start counted as a failure. Now the start unwinds: one line,
    the resume command, exit 75 (with the option), the lock released; the resumed run then trains as usual."""
    path, out = preemption_saves_only(reference, tmp_path)
    proc = cpt_train(path, "--preempted-exit-code", "75", env={"CPT_FAULT_INJECT": "hang:start:model"})
    head = []
    for line in proc.stdout:  # (printed just before the fault point)
        head.append(line)
        if line.startswith("stage 0 cpt-python mix:"):
            break
    proc.send_signal(signal.SIGTERM)
    log = "".join(head) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, log
    assert ("cpt train: stopped by SIGTERM while starting, before its first step: nothing to save (the run's newest "
            "checkpoint, if any, is where --resume continues)") in log and "Traceback" not in log, log
    assert log.rstrip().splitlines()[-1].endswith("--preempted-exit-code 75 --resume"), log
    assert not (out / "run.lock").exists() and latest_valid_checkpoint(out) is None
    proc = cpt_train(path, "--resume")
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and (out / "export" / "model.safetensors").is_file(), log
    assert losses(out) == reference[1]  # (a fresh start: the stopped one trained nothing)


def test_a_run_that_hangs_after_sigterm_writes_where_it_waits(reference, tmp_path):
    """A stop signal arms `train.stop_stack_dump_s`: a run still going that long after SIGTERM (here: its checkpoint
    save hangs) writes the stacks of its threads to its log, after a line saying why, instead of waiting silently for
    the scheduler's SIGKILL; the hung save leaves no checkpoint that counts as one."""
    cfg = json.loads(json.dumps(reference[0]))
    out = tmp_path / "run"
    cfg["run"]["output_dir"] = str(out)
    cfg["checkpoint"]["every"] = 100  # only the preemption save, which hangs at its start
    cfg["train"]["stop_stack_dump_s"] = 2
    path = write_cfg(tmp_path / "c.yaml", cfg)
    hangs = ",".join(f"hang:save:begin@{s}" for s in range(1, 17))
    proc = cpt_train(path, env={"CPT_FAULT_INJECT": hangs})
    wait_for(lambda: len(losses(out)) >= 3, proc)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    lines = []
    killer = threading.Timer(60, proc.kill)  # (no dump at all: the output ends and the test fails, not hangs)
    killer.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if "in <module>" in line and "in fault_point" in "".join(lines):  # (the main thread's stack, to its end)
                break
    finally:
        killer.cancel()
        proc.kill()
        proc.communicate()
    log = "".join(lines)
    waited = time.time() - t0
    headers = [x for x in lines if x.startswith("cpt: ")]
    assert headers and "still running 2 s after SIGTERM" in headers[0] and waited >= 2, log
    header = headers[0]
    dump = log[log.index(header):]
    assert "Timeout (0:00:02)!" in dump and "(most recent call first)" in dump, log
    assert 'cpt/checkpoint.py", line' in dump and "in save" in dump, log  # the hanging save, named
    assert latest_valid_checkpoint(out) is None and not list((out / "checkpoints").glob("step_*")), log


def test_resume_after_kill9_is_exact(reference, tmp_path):
    cfg, ref = reference
    cfg = json.loads(json.dumps(cfg))
    out = tmp_path / "run"
    cfg["run"]["output_dir"] = str(out)
    cfg["checkpoint"]["every"] = 3
    path = write_cfg(tmp_path / "c.yaml", cfg)
    proc = cpt_train(path)
    wait_for(lambda: any(int(p.name[5:]) >= 6 for p in list_checkpoints(out)), proc)
    proc.kill()  # SIGKILL: maybe mid-step or mid-save
    proc.wait()
    proc = cpt_train(path, "--resume")
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    assert "resumed" in log
    got = losses(out)
    assert sorted(got) == list(range(1, 17))  # lines past the checkpoint were dropped and re-logged once
    for s in range(1, 17):
        assert got[s] == ref[s], (s, got[s], ref[s])


def test_corrupt_latest_checkpoint_falls_back_to_previous(reference, tmp_path, caplog):
    import shutil

    cfg, _ = reference
    run = Path(cfg["run"]["output_dir"])
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    last = list_checkpoints(copy)[-1]
    weights = next(last.glob("model*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    assert latest_valid_checkpoint(copy).name == "step_00000012"
    assert [r.getMessage() for r in caplog.records if "not usable" in r.getMessage()] == [
        f"checkpoint {last} is not usable (model.safetensors has {weights.stat().st_size} bytes, expected "
        f"{weights.stat().st_size + 100} (truncated?)); trying the previous one"]  # once
    from cpt.checkpoint import verify_checkpoint

    first = list_checkpoints(copy)[0]
    data = first / "trainer_state.json"
    data.write_text(data.read_text().replace("1", "2", 1))  # same size, different bytes: the digest catches it
    assert "trainer_state.json checksum mismatch" in verify_checkpoint(first)
    assert latest_valid_checkpoint(copy) is None
    (first / "CHECKSUMS.json").unlink()  # incomplete save
    assert "CHECKSUMS.json missing" in verify_checkpoint(first)


def _nan_after(monkeypatch, bad_calls):
    """Make the loss NaN on the given micro-batch forwards (counted from 1)."""
    import cpt.lm_loss as lm_loss

    real = lm_loss.causal_lm_loss
    count = {"n": 0}

    def fake(*a, **k):
        count["n"] += 1
        out = real(*a, **k)
        return out._replace(loss=out.loss * float("nan"), row_losses=out.row_losses * float("nan")) if bad_calls(count["n"]) else out

    monkeypatch.setattr(lm_loss, "causal_lm_loss", fake)


def test_nonfinite_steps_are_skipped_and_counted(tiny_cpt_data, tmp_path, monkeypatch):
    from cpt.train import train

    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_cpt_data, out)
    cfg["stages"][0]["steps"] = 8
    cfg["eval"]["at_start"] = False
    cfg["data"]["heldout"] = []
    micro_per_step = cfg["train"]["global_batch_size"] // cfg["train"]["micro_batch_size"]
    _nan_after(monkeypatch, lambda n: (n - 1) // micro_per_step in (2, 3))  # steps 3 and 4 (1-based) are bad
    lines = []
    result = train(load_config(base=cfg), echo=lambda *a: lines.append(" ".join(map(str, a))))
    assert result.step == 8
    skipped = [line for line in lines if "update skipped" in line]  # named as metrics.jsonl names them (said 2 and 3)
    assert skipped == [f"step {n}: non-finite loss or gradient, update skipped ({k} in a row)" for k, n in ((1, 3), (2, 4))]
    recs = [r for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
    assert recs[-1]["train/nonfinite_skipped"] == 2
    # a log window whose every step was skipped has no training loss: null, not 0.0 (a loss never reached)
    assert [r["step"] for r in recs if r["train/loss"] is None] == [3, 4]
    assert all(r["train/loss"] > 1 for r in recs if r["step"] not in (3, 4))


def test_too_many_nonfinite_steps_stop_with_checkpoint(tiny_cpt_data, tmp_path, monkeypatch):
    from cpt.train import TrainingError, train

    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_cpt_data, out)
    cfg["train"]["max_nonfinite_in_a_row"] = 3
    cfg["eval"]["at_start"] = False
    micro_per_step = cfg["train"]["global_batch_size"] // cfg["train"]["micro_batch_size"]
    _nan_after(monkeypatch, lambda n: n > 2 * micro_per_step)  # steps 1-2 fine, then always NaN
    mine = lambda signum, frame: None  # noqa: E731 - whoever called train() (cpt experiment runs many in one process)
    before = {sig: signal.signal(sig, mine) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        with pytest.raises(TrainingError, match="3 non-finite steps in a row"):
            train(load_config(base=cfg), echo=lambda *a: None)
        # the error path restores the caller's signal handlers
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGUSR1) is mine
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    assert not any(t.name == "cpt-prefetch" for t in __import__("threading").enumerate())  # and stops the reader
    ckpt = latest_valid_checkpoint(out)
    assert ckpt is not None and ckpt.name == "step_00000005"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["update_guard"]["nonfinite_total"] == 3


def test_resume_cost_does_not_grow_with_step(tiny_cpt_data):
    """Restoring the data position is arithmetic: the reads needed for the next batch are the same at step 3 and 300."""
    from unittest import mock

    from cpt.data.loader import CPTDataLoader
    from cpt.data.shards import TokenShards
    from cpt.model import load_tokenizer

    cfg = load_config(base=tiny_run_config(tiny_cpt_data, "unused"))
    tok = load_tokenizer(cfg.model)

    def loader():
        return CPTDataLoader(cfg.data, cfg.stages, tok, cfg.train.global_batch_size, cfg.run.seed)

    reads = []
    for k in (3, 300):
        a = loader()
        for s in range(k):
            a.batch(s)
        state = json.loads(json.dumps(a.state_dict()))  # through JSON, as in trainer_state.json
        expected = a.batch(k)["input_ids"]
        b = loader()
        with mock.patch.object(TokenShards, "read_many", autospec=True, side_effect=TokenShards.read_many) as spy:
            b.load_state_dict(state)
            got = b.batch(k)["input_ids"]
        assert torch.equal(got, expected)
        reads.append(sum(len(call.args[1]) for call in spy.call_args_list))  # sequences read from disk
    assert reads[0] == reads[1] == cfg.train.global_batch_size, reads


def test_anneal_branch_from_infinite_trunk(tiny_cpt_data, tmp_path):
    """Infinite trunk (no anneal) with checkpoints; `cpt train --from CKPT --anneal N` writes an annealed model
    to a new run directory and leaves the trunk untouched."""
    from cpt.checkpoint import verify_checkpoint

    trunk = tmp_path / "trunk"
    cfg = tiny_run_config(tiny_cpt_data, trunk, checkpoint={"every": 6, "keep": 3})
    cfg["stages"][0]["steps"] = 12
    cfg["stages"][0]["schedule"] = {"type": "infinite", "max_lr": 2e-3, "warmup_steps": 2, "cooldown_steps": 2,
                                    "constant_lr": 1e-3, "min_lr": 1e-5}
    path = write_cfg(tmp_path / "trunk.yaml", cfg)
    proc = cpt_train(path)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    ckpt = trunk / "checkpoints" / "step_00000006"
    before = (ckpt / "CHECKSUMS.json").read_text()
    proc = cpt_train(path, "--from", ckpt, "--anneal", 4, "--output-dir", tmp_path / "branch")
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    recs = [r for r in read_metrics(tmp_path / "branch" / "metrics.jsonl") if "train/lr" in r and "train/loss" in r]
    assert [r["step"] for r in recs] == [7, 8, 9, 10]
    # the LR each update used: linear from the constant LR, one increment below it first, exactly min_lr last
    assert [r["train/lr"] for r in recs] == pytest.approx([1e-3 + (1e-5 - 1e-3) * k / 4 for k in (1, 2, 3, 4)], rel=1e-12)
    assert "anneal branch: steps 6..10 from the constant lr 0.001 to min_lr 1e-05 (linear)" in log, log
    assert (tmp_path / "branch" / "export" / "model.safetensors").is_file()
    assert verify_checkpoint(ckpt) is None and (ckpt / "CHECKSUMS.json").read_text() == before
    # the branch starts exactly where the trunk was: its first loss equals the trunk's loss at step 7
    trunk_losses = losses(trunk)
    assert recs[0]["train/loss"] == trunk_losses[7]


def test_an_anneal_branch_may_switch_on_ema_reptile_and_spikes_and_a_resume_lm_eval(tiny_cpt_data, tmp_path):
    """A branch turning on an EMA, Reptile or the spike guard its trunk ran without starts them at the branch point
    (they were refused: 'it holds no state for 'ema''); the EMA averages with the configured train.ema_decay, also
    on a resume with --allow-config-change (the checkpoint's decay was kept silently); a resume may add lm-eval tasks
    (refused the same way)."""
    from safetensors.torch import load_file

    from cpt.train import train

    trunk = tmp_path / "trunk"
    cfg = tiny_run_config(tiny_cpt_data, trunk, checkpoint={"every": 2, "keep": 3}, eval={"at_start": False, "every": 100})
    cfg["stages"][0]["steps"] = 4
    cfg["stages"][0]["schedule"] = {"type": "infinite", "max_lr": 2e-3, "warmup_steps": 1, "cooldown_steps": 1,
                                    "constant_lr": 1e-3, "min_lr": 1e-5}
    train(load_config(base=cfg), echo=lambda *a: None)
    at = trunk / "checkpoints" / "step_00000002"
    branch = {**cfg, "run": {**cfg["run"], "output_dir": str(tmp_path / "branch")},
              "train": {**cfg["train"], "init_from": str(at), "anneal_steps": 2, "ema_decay": 0.9999,
                        "reptile": {"every": 1, "epsilon": 1.0}, "skip_spikes": {"window": 4}},
              "checkpoint": {"every": 1, "keep": 3}}
    lines = []
    assert train(load_config(base=branch), echo=lines.append).step == 4
    assert "anneal branch: train.ema_decay (the EMA) starts at the branch point (the trunk ran without it)" in lines
    state = load_file(tmp_path / "branch" / "checkpoints" / "step_00000004" / "state.safetensors")
    weights = load_file(at / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    assert int(state["ema.num_updates"]) == 2 and int(state["reptile.meta_updates"]) == 2
    assert torch.allclose(state[f"ema.shadow.{name}"], weights[name], atol=1e-5)  # the branch point's weights
    # resumed at step 3 with another decay (--allow-config-change): the configured one averages from there; lm-eval
    # tasks added on the resume (an evaluation setting) start there, that first score their reference (refused before)
    shutil.rmtree(tmp_path / "branch" / "checkpoints" / "step_00000004")
    branch["train"]["ema_decay"] = 0.5
    branch["eval"] = {**branch["eval"], "at_start": True, "lm_eval": {"tasks": [{"name": "cpt_arith_mc", "tag": "upstream"}], "limit": 2,
                                                                   "batch_size": 8}}
    train(load_config(base=branch), resume=True, allow_config_change=True, echo=lambda *a: None)
    state = load_file(tmp_path / "branch" / "checkpoints" / "step_00000004" / "state.safetensors")
    assert float(state["ema.decay"]) == 0.5
    lm_evals = [r["step"] for r in read_metrics(tmp_path / "branch" / "metrics.jsonl") if "lm_eval/cpt_arith_mc/acc" in r]
    assert lm_evals == [3, 4]
    # resumed again at its last step (a job requeued after the run had finished: the signal came after its last stop
    # check): the final scores, logged already, are not logged again (a second step-4 record), and the run's benchmark
    # table has them as final (taken from the log: it had step 3's, the checkpoint's tracker being saved before them);
    # without earlier scores in the run (no direction known), they are scored again, not logged
    final = next(r for r in read_metrics(tmp_path / "branch" / "metrics.jsonl")
                 if r["step"] == 4 and "lm_eval/cpt_arith_mc/acc" in r)["lm_eval/cpt_arith_mc/acc"]
    for at_start in (True, False):
        branch["eval"]["at_start"] = at_start
        if not at_start:  # (a run whose only scores are the final ones: the tracker restored knows none)
            ckpt = tmp_path / "branch" / "checkpoints" / "step_00000004" / "trainer_state.json"
            doc = json.loads(ckpt.read_text())
            doc["lm_eval"] = {}
            ckpt.write_text(json.dumps(doc))
            from cpt.checkpoint_dir import CHECKSUMS
            from cpt.fileio import file_digest

            sums = json.loads((ckpt.parent / CHECKSUMS).read_text())
            sums["files"]["trainer_state.json"] = {"size": ckpt.stat().st_size, "digest": file_digest(ckpt)}
            (ckpt.parent / CHECKSUMS).write_text(json.dumps(sums))
        result = train(load_config(base=branch), resume=True, allow_config_change=True, echo=lambda *a: None)
        lm_evals = [r["step"] for r in read_metrics(tmp_path / "branch" / "metrics.jsonl") if "lm_eval/cpt_arith_mc/acc" in r]
        assert lm_evals == [3, 4]
        row = next(r for r in result.benchmarks if r["task"] == "cpt_arith_mc" and r["metric"] == "acc")
        assert (row["final"], row["final_step"]) == (final, 4), (at_start, row)


def test_anneal_from_a_decaying_phase_is_rejected(tiny_cpt_data, tmp_path, reference):
    cfg, _ = reference
    ckpt = Path(cfg["run"]["output_dir"]) / "checkpoints" / "step_00000012"
    path = write_cfg(tmp_path / "c.yaml", cfg)
    proc = cpt_train(path, "--from", ckpt, "--anneal", 3, "--output-dir", tmp_path / "b")
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0
    assert "constant" in log or "stable" in log, log


def test_new_stage_from_checkpoint_loads_weights_not_position(reference, tmp_path, caplog):
    """train.init_from a cpt checkpoint: same weights, fresh data position and step counter."""
    from cpt.train import train

    cfg, _ = reference
    ckpt = Path(cfg["run"]["output_dir"]) / "checkpoints" / "step_00000016"
    new = json.loads(json.dumps(cfg))
    new["run"]["output_dir"] = str(tmp_path / "stage2")
    new["train"]["init_from"] = str(ckpt)
    new["stages"][0]["steps"] = 3
    new["checkpoint"] = {"every": None}
    result = train(load_config(base=new), echo=lambda *a: None)
    assert result.step == 3
    recs = read_metrics(tmp_path / "stage2" / "metrics.jsonl")
    step0 = [r for r in recs if r["step"] == 0 and "eval/python/loss" in r][0]
    ref_final = [r for r in read_metrics(Path(cfg["run"]["output_dir"]) / "metrics.jsonl") if "eval/python/loss" in r][-1]
    assert step0["eval/python/loss"] == pytest.approx(ref_final["eval/python/loss"], abs=1e-5)
    first = [r for r in recs if "data/tokens/python" in r][0]
    assert first["data/tokens/python"] <= cfg["train"]["global_batch_size"] * cfg["data"]["seq_len"]
    # the data positions start over, which repeats what the checkpoint's run read first: the log says so, per source
    log = caplog.text
    assert "data source 'python' starts over: the checkpoint's run read 96 of its" in log, log
    assert "reads those 32 sequences first, in the same order (same run.seed)" in log


def test_a_stage_with_a_new_source_appended_on_resume(reference, tmp_path, tiny_cpt_data):
    """A long run whose plan grows: a stage that mixes in a new source (and a new held-out set) is appended to the
    config and the run resumed with --allow-config-change. The old sources continue from their positions, the new
    one starts at 0, train/loss/<source> and data/tokens/<source> cover all three, and the held-out table says that
    the new set's reference is its first evaluation, not step 0. (It was refused: the data fingerprint, then the
    log window's source list; the table labelled the new set's first loss `step 0`.)"""
    import shutil

    from cpt.data.prepare import prepare
    from cpt.train import train
    from data_factories import make_docs, write_jsonl

    cfg, _ = reference
    run = tmp_path / "run"
    shutil.copytree(cfg["run"]["output_dir"], run)
    raw = write_jsonl(tmp_path / "extra.jsonl", [{"text": d} for d in make_docs(60, seed=5)])
    prepare([str(raw)], str(tiny_cpt_data / "tokenizer"), tmp_path / "extra", heldout_docs=10, echo=lambda *a: None)
    grown = json.loads(json.dumps(cfg))
    grown["run"]["output_dir"] = str(run)
    grown["data"]["sources"].insert(1, {"name": "extra", "path": str(tmp_path / "extra")})
    grown["data"]["heldout"].append({"name": "extra", "path": str(tmp_path / "extra" / "heldout"), "tag": "downstream"})
    grown["stages"].append({"name": "extra", "steps": 2, "schedule": {"type": "constant", "max_lr": 1e-3, "warmup_steps": 0},
                            "mix": {"python": 0.5, "extra": 0.25, "shakespeare": 0.25}})
    grown["eval"]["every"] = 2
    lines = []
    result = train(load_config(base=grown), resume=True, allow_config_change=True, echo=lines.append)
    assert result.step == 18
    recs = {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if "data/tokens/python" in r}
    before = recs[16]
    assert recs[17]["data/tokens/python"] == before["data/tokens/python"] + 4 * 64
    assert recs[17]["data/tokens/shakespeare"] == before["data/tokens/shakespeare"] + 2 * 64
    assert recs[17]["data/tokens/extra"] == 2 * 64 and "train/loss/extra" in recs[17] and "train/loss/python" in recs[17]
    state = json.loads((run / "checkpoints" / "step_00000018" / "trainer_state.json").read_text())["data"]
    assert state["sources"] == ["python", "extra", "shakespeare"] and state["positions"][1] == 4
    table = "\n".join(map(str, lines))
    assert "reference (step)" in table and any(line.startswith("extra ") and " (18) " in line
                                               for line in table.splitlines()), table


def test_training_loss_per_source(reference):
    """train/loss/<source>: each source's rows' mean loss; weighted by the exact row shares (6 python : 2
    shakespeare of every 8-row batch) they make up the overall train/loss."""
    cfg, _ = reference
    recs = [r for r in read_metrics(Path(cfg["run"]["output_dir"]) / "metrics.jsonl") if "train/loss" in r]
    assert len(recs) == 16
    for r in recs:
        py, shk = r["train/loss/python"], r["train/loss/shakespeare"]
        assert py != shk
        assert (6 * py + 2 * shk) / 8 == pytest.approx(r["train/loss"], rel=1e-5)


def test_resume_refuses_a_checkpoint_without_a_registered_component(reference, tmp_path):
    """EMA switched on for a --resume (past the trajectory check with --allow-config-change) from a checkpoint
    written without it: one error naming the component, instead of an EMA silently restarted from the weights."""
    import shutil

    from cpt.checkpoint import CheckpointError
    from cpt.train import train

    cfg, _ = reference
    out = tmp_path / "run"
    shutil.copytree(cfg["run"]["output_dir"], out)
    before = (out / "metrics.jsonl").read_bytes()
    new = json.loads(json.dumps(cfg))
    new["run"]["output_dir"] = str(out)
    new["train"]["ema_decay"] = 0.9
    with pytest.raises(CheckpointError, match=r"step_00000016: it holds no state for 'ema' .*train.init_from"):
        train(load_config(base=new), resume=True, allow_config_change=True, echo=lambda *a: None)
    assert (out / "metrics.jsonl").read_bytes() == before  # nothing trained or logged


def test_resume_with_a_changed_plan_says_so(reference, tmp_path):
    """--resume --allow-config-change of a cosine run made longer: the log names the changed field and the LR jump at
    the resumed step (the steps taken followed the old, shorter cosine; it was silent). A plan shortened behind the
    checkpoint is refused in one line (it finished at once at the checkpoint's step, the shorter plan ignored)."""
    import shutil

    from cpt.checkpoint import CheckpointError
    from cpt.train import train

    cfg, _ = reference
    run = tmp_path / "run"
    shutil.copytree(cfg["run"]["output_dir"], run)
    new = json.loads(json.dumps(cfg))
    new["run"]["output_dir"] = str(run)
    new["stages"][0]["steps"] = 14
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(CheckpointError, match=r"step_00000016 is at step 16, past the end of this config's plan \(14 "):
        train(load_config(base=new), resume=True, allow_config_change=True, echo=lambda *a: None)
    assert (run / "metrics.jsonl").read_bytes() == before
    new["stages"][0]["steps"] = 18
    lines = []
    assert train(load_config(base=new), resume=True, allow_config_change=True, echo=lines.append).step == 18
    log = "\n".join(map(str, lines))
    assert "--allow-config-change: resuming" in log and "stages.0.steps: 16 -> 18" in log, log
    lrs = {r["step"]: r["train/lr"] for r in read_metrics(run / "metrics.jsonl") if "train/lr" in r}
    assert f"so the LR jumps from {lrs[16]:.4g} (the checkpoint's plan at step 16) to {lrs[17]:.4g}" in log, log
    # a stage boundary moved behind the checkpoint: the new stage's start (its optimizer reset) is not replayed
    from cpt.resume import changed_config_notes

    split = json.loads(json.dumps(new))
    split["stages"][0]["steps"] = 10
    split["stages"].append({**split["stages"][0], "name": "two", "steps": 8, "reset_optimizer": True})
    notes = changed_config_notes(run / "checkpoints" / "step_00000016", load_config(base=split))
    assert "warning: stage 1 ('two') now starts at step 10, before step 16 where the run resumes" in notes[-1], notes
    assert "(stages.1.reset_optimizer is not applied)" in notes[-1]


def test_ctrl_c_during_a_synchronous_checkpoint_save_stops_the_run(tiny_cpt_data, tmp_path, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) landing in a synchronous save was caught as a failed save ("checkpoint at step N
    FAILED: KeyboardInterrupt ... retrying at the next interval") and the run trained on to its end, exit 0. Now the
    run stops (`cpt` then says "interrupted", exit 130) with the half-written save removed and the previous
    checkpoint intact."""
    import cpt.checkpoint as checkpoint
    from cpt.train import train

    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_cpt_data, out, checkpoint={"every": 2, "keep": 3, "async_save": False},
                          eval={"at_start": False})
    cfg["stages"][0]["steps"] = 8
    cfg["data"]["heldout"] = []
    real = checkpoint.write_checksums

    def interrupted(tmp, digests):
        if tmp.name.endswith(f"step_{4:08d}"):
            raise KeyboardInterrupt
        return real(tmp, digests)

    monkeypatch.setattr(checkpoint, "write_checksums", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(base=cfg), echo=lambda *a, **k: None)
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{2:08d}"]  # no .tmp-step_4, no step_4
    assert max(losses(out)) == 4 and not (out / "export").exists()


def _failing_saves(monkeypatch, step: int, times: int):
    """Make the checkpoint at ``step`` fail (disk full, in its commit) ``times`` times; returns the failure count."""
    import errno

    import cpt.checkpoint as checkpoint

    real, failed = checkpoint.write_checksums, []

    def full(tmp, digests):
        if tmp.name.endswith(f"step_{step:08d}") and len(failed) < times:
            failed.append(step)
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
        return real(tmp, digests)

    monkeypatch.setattr(checkpoint, "write_checksums", full)
    return failed


@pytest.mark.parametrize("async_save", [False, True])
def test_a_failed_save_at_the_last_step_is_retried_at_the_end_and_a_failed_final_save_is_an_error(
        tiny_cpt_data, tmp_path, monkeypatch, caplog, async_save):
    """The loop's save at the run's last step failing said "retrying at the next interval" (there is none), and when
    the end's retry failed too the run ended as a success (exit 0) with its last state unsaved, mentioned only in two
    such lines. Now the loop's failure says the run's end retries it, and a failed final save is a CheckpointError
    naming the intact checkpoint a --resume trains again from (after the export, with a background save)."""
    import logging

    from cpt.checkpoint import CheckpointError
    from cpt.train import train

    caplog.set_level(logging.ERROR, logger="cpt.checkpoint")
    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_cpt_data, out, checkpoint={"every": 2, "keep": 3, "async_save": async_save},
                          eval={"at_start": False})
    cfg["stages"][0]["steps"] = 4
    cfg["data"]["heldout"] = []
    quiet = lambda *a, **k: None  # noqa: E731
    if not async_save:  # a failure the end's retry gets past: the run ends with its final checkpoint
        failed = _failing_saves(monkeypatch, 4, times=1)
        assert train(load_config(base=cfg), echo=quiet).step == 4 and failed == [4]
        assert [p.name for p in list_checkpoints(out)] == [f"step_{2:08d}", f"step_{4:08d}"]
        assert "retrying once more at the run's end (1 of 3 failures in a row allowed)" in caplog.text, caplog.text
        assert "next interval" not in caplog.text
        shutil.rmtree(out)
        caplog.clear()
    failed = _failing_saves(monkeypatch, 4, times=2)
    with pytest.raises(CheckpointError, match=r"^the run's final checkpoint at step 4 FAILED: no space left on device .*"
                                              r"the checkpoint step_00000002 is intact\. The run trained to its end but its "
                                              r"last state is not saved: fix the cause, then --resume \(it trains again "
                                              r"from step_00000002\)"):
        train(load_config(base=cfg), echo=quiet)
    assert failed == [4, 4] and [p.name for p in list_checkpoints(out)] == [f"step_{2:08d}"]
    assert caplog.text.count("FAILED") == 1 and "retrying once more at the run's end" in caplog.text, caplog.text
    assert (out / "export" / "model.safetensors").is_file() == async_save  # (a background save fails after the export)
    assert train(load_config(base=cfg), resume=True, echo=quiet).step == 4  # the disk has room again
    assert [p.name for p in list_checkpoints(out)] == [f"step_{2:08d}", f"step_{4:08d}"]


def test_a_preemption_whose_checkpoint_fails_says_so(tiny_cpt_data, tmp_path, monkeypatch, caplog):
    """A preemption's save failing was logged as "retrying at the next interval", and the stop line after it said
    "checkpoint saved at step N; exiting cleanly". Now both say the save failed and that a resume starts from the
    newest checkpoint (the run still stops as preempted)."""
    import logging

    from cpt.distributed import PreemptionFlag
    from cpt.train import train

    caplog.set_level(logging.ERROR, logger="cpt.checkpoint")
    real = PreemptionFlag.requested
    monkeypatch.setattr(PreemptionFlag, "requested", lambda self, acc, step=0: (setattr(self, "flag", self.flag or step == 3),
                                                                                real(self, acc, step))[1])
    for fail in (False, True):
        out = tmp_path / f"run-{fail}"
        cfg = tiny_run_config(tiny_cpt_data, out, checkpoint={"every": 2, "async_save": False}, eval={"at_start": False})
        cfg["stages"][0]["steps"] = 6
        cfg["data"]["heldout"] = []
        failed = _failing_saves(monkeypatch, 3, times=1 if fail else 0)
        lines = []
        result = train(load_config(base=cfg), echo=lambda *a, **k: lines.append(str(a[0]) if a else ""))
        assert result.stopped_early == "preempted" and result.step == 3 and failed == ([3] if fail else [])
        stop_line = [line for line in lines if line.startswith("preemption signal received")]
        if fail:
            assert stop_line == ["preemption signal received: the checkpoint at step 3 FAILED (see the error above); "
                                 "exiting; a resume starts from the newest checkpoint"], lines
            assert ("the checkpoint step_00000002 is intact; not retried: the run stops here, and a resume "
                    "starts from the newest checkpoint (1 of 3" in caplog.text), caplog.text
            assert [p.name for p in list_checkpoints(out)] == [f"step_{2:08d}"]
        else:
            assert stop_line == ["preemption signal received: checkpoint saved at step 3; exiting cleanly"], lines
            assert [p.name for p in list_checkpoints(out)] == [f"step_{2:08d}", f"step_{3:08d}"]


def test_a_run_whose_directory_is_removed_stops_at_its_next_save(tiny_cpt_data, tmp_path):
    """`rm -rf RUN_DIR` under a running job (or another run taking its lock over): the run trained on to the end,
    exit 0, writing its metrics and log into unlinked files and recreating checkpoints/ and export/ around nothing;
    the lock was gone too, so a second start was not refused. Now the next save finds the lock gone and stops with
    one error naming it."""
    from cpt.checkpoint import CheckpointError
    from cpt.train import train

    out = tmp_path / "run"
    # (synchronous saves: step 4's background write could still be in the folder the test removes, a rmtree race)
    cfg = tiny_run_config(tiny_cpt_data, out, checkpoint={"every": 4, "async_save": False}, eval={"at_start": False})
    cfg["stages"][0]["steps"] = 12
    cfg["data"]["heldout"] = []

    def echo(*args, **kwargs):
        if str(args[0]).startswith("step 6/") and out.exists():
            shutil.rmtree(out)

    with pytest.raises(CheckpointError, match=r"^stopping before the checkpoint at step 8: .*run.lock is gone: the run "
                                              r"directory was removed or emptied while this run trained"):
        train(load_config(base=cfg), echo=echo)
    assert not out.exists()  # (nothing recreated: no checkpoints/ beside nothing)


def test_the_run_lock_says_when_it_was_lost(tmp_path):
    from cpt.runlock import RunLock

    lock = RunLock(tmp_path)
    assert lock.lost() is None  # (not taken: nothing to lose)
    lock.acquire()
    assert lock.lost() is None
    (tmp_path / "run.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "start_time": 0}))
    assert "now names another run (PID 1 on host elsewhere" in lock.lost()
    (tmp_path / "run.lock").unlink()
    assert "run.lock is gone" in lock.lost()
