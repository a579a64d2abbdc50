"""Checkpoint writes: cpt's writer equals accelerate's save_state, non-blocking saves snapshot the state,
disk full / I/O errors name their cause and follow the failure policy, metrics lines are all or nothing."""

import errno
import json
import logging
import os
import subprocess
import threading
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_run_config
from cpt.checkpoint import CHECKSUMS, CheckpointManager, list_checkpoints, verify_checkpoint
from cpt.state import TrainState
from cpt.fileio import HashingFile, describe_io_error
from cpt.metrics import MetricsError, MetricsLogger, read_metrics


# ------------------------------------------------------------------ the writer (one process, a tiny model)


def read_state(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {"model": load_file(folder / "model.safetensors"),
            "optimizer": torch.load(folder / "optimizer.bin", weights_only=True),
            "rng": torch.load(folder / "random_states_0.pkl", weights_only=False)}


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, __import__("numpy").ndarray):
        assert (a == b).all()
    else:
        assert a == b


@pytest.mark.parametrize("async_save", [True, False], ids=["background", "synchronous"])
def test_cpt_writer_writes_what_accelerate_save_state_writes(trained, tmp_path, async_save):
    acc, model, opt = trained
    acc.save_state(str(tmp_path / "accelerate"), safe_serialization=True)
    ckpts = CheckpointManager(tmp_path / "run", keep=2, accelerator=acc, async_save=async_save)
    assert ckpts.cpt_writes and ckpts.async_save == async_save
    ckpts.save(1, {"train": TrainState(step=1)}, "config: 1\n")
    ckpts.wait()
    ours = list_checkpoints(tmp_path / "run")[0]
    theirs = {p.name for p in (tmp_path / "accelerate").iterdir()}
    assert theirs <= {p.name for p in ours.iterdir()}
    assert_same(read_state(tmp_path / "accelerate"), read_state(ours))
    # hashed while written: the digests match the files on disk, and nothing else was read to get them
    files = json.loads((ours / CHECKSUMS).read_text())["files"]
    assert files and all(meta["digest"] for meta in files.values()) and verify_checkpoint(ours) is None
    # and accelerate loads it
    before = {k: v.clone() for k, v in acc.unwrap_model(model).state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    acc.load_state(str(ours))
    assert_same(before, {k: v for k, v in acc.unwrap_model(model).state_dict().items()})


def test_tied_embeddings_save_without_accelerates_shared_tensor_warning(trained, tmp_path, caplog):
    """accelerate warned "Removed shared tensor {'lm_head.weight'} while saving ... check ..." at every checkpoint of
    a tied-embedding model (the batch log's noise); the file still leaves the tied copy out."""
    from safetensors.torch import load_file

    acc, _, _ = trained
    ckpts = CheckpointManager(tmp_path / "run", keep=2, accelerator=acc, async_save=False)
    with caplog.at_level(logging.WARNING):
        ckpts.save(1, {"train": TrainState(step=1)}, "config: 1\n")
    assert "Removed shared tensor" not in caplog.text, caplog.text
    assert "lm_head.weight" not in load_file(list_checkpoints(tmp_path / "run")[0] / "model.safetensors")


def test_a_load_keeps_this_runs_optimizer_settings(trained, tmp_path):
    """torch's load_state_dict hands each optimizer group the checkpoint's settings: a --resume --allow-config-change
    of optim.weight_decay or betas (or an lr multiplier's value), or a new stage from train.init_from, trained on with
    the old ones, silently. The moments load; the settings stay this run's."""
    acc, _, opt = trained
    CheckpointManager(tmp_path / "run", keep=2, accelerator=acc).save(1, {"train": TrainState(step=1)}, "")
    moments = {k: v.clone() for k, v in next(iter(opt.state.values())).items()}
    for group in opt.param_groups:  # what a changed config builds
        group.update(weight_decay=0.5, betas=(0.8, 0.9), lr_mult=2.0)
    opt.state.clear()
    CheckpointManager(tmp_path / "run", keep=2, accelerator=acc).load(list_checkpoints(tmp_path / "run")[0])
    assert [(g["weight_decay"], g["betas"], g["lr_mult"]) for g in opt.param_groups] == [(0.5, (0.8, 0.9), 2.0)]
    assert all(torch.equal(v, next(iter(opt.state.values()))[k]) for k, v in moments.items())


def test_checkpoint_saves_and_restores_the_state_registry(trained, tmp_path):
    """Every registered component round-trips through a checkpoint: JSON under its name in trainer_state.json,
    tensors under "<name>." in state.safetensors; loading restores weights and components together."""
    from safetensors.torch import load_file

    from cpt.ema import EMA
    from cpt.checkpoint import CheckpointError

    acc, model, opt = trained
    ema = EMA(acc.unwrap_model(model), 0.9)
    ema.update(acc.unwrap_model(model))
    ckpts = CheckpointManager(tmp_path / "run", keep=2, accelerator=acc)
    ckpts.save(5, {"train": TrainState(step=5, tokens=640), "ema": ema}, "")
    ckpt = list_checkpoints(tmp_path / "run")[0]
    doc = json.loads((ckpt / "trainer_state.json").read_text())
    assert doc == {"format": 2, "train": {"step": 5, "tokens": 640, "anneal_from": None}, "ema": {}}
    tensors = load_file(ckpt / "state.safetensors")
    assert int(tensors["ema.num_updates"]) == 1 and all(k.startswith("ema.") for k in tensors)
    state, ema2 = TrainState(), EMA(acc.unwrap_model(model), 0.5)
    ckpts.load(ckpt, {"train": state, "ema": ema2})
    assert (state.step, state.tokens) == (5, 640) and ema2.num_updates == 1
    assert ema2.decay == 0.5  # a setting of the run that loads it (train.ema_decay), not part of the saved average
    assert all(torch.equal(ema2.shadow[n], ema.shadow[n]) for n in ema.shadow)
    with pytest.raises(CheckpointError, match="step_00000005: it holds no state for 'reptile'"):
        ckpts.load(ckpt, {"train": TrainState(), "reptile": ema2})


def test_registered_tensors_are_copied_by_the_main_process_for_a_background_write_only(trained, tmp_path, monkeypatch):
    """The registered components' tensors (an EMA, Reptile's anchor: replicated on every rank with one device, DDP or
    ZeRO-1/2) get a fresh host copy on the main process, which writes them, for a non-blocking save only; a synchronous
    save writes them from the live tensors, and the other ranks never copy them (formerly every rank made the copy,
    4 bytes per parameter for an EMA, and dropped it; a synchronous save made it too). The files are the same."""
    from safetensors.torch import load_file

    import cpt.checkpoint as checkpoint
    from cpt.ema import EMA

    acc, model, opt = trained
    ema = EMA(acc.unwrap_model(model), 0.9)
    copied, real = [], checkpoint.host_copy
    monkeypatch.setattr(checkpoint, "host_copy", lambda obj, *a, **k: copied.append(sorted(obj)) or real(obj, *a, **k))
    written = {}
    for async_save in (True, False):
        copied.clear()
        ckpts = CheckpointManager(tmp_path / f"run{async_save}", keep=2, accelerator=acc, async_save=async_save)
        ckpts.save(5, {"train": TrainState(step=5, tokens=640), "ema": ema}, "")
        ckpts.wait()
        assert copied == ([sorted(f"ema.{k}" for k in ema.state_dict())] if async_save else [])
        written[async_save] = load_file(list_checkpoints(tmp_path / f"run{async_save}")[0] / "state.safetensors")
    assert written[True].keys() == written[False].keys()
    assert all(torch.equal(written[True][k], written[False][k]) for k in written[True])
    copied.clear()
    monkeypatch.setattr(type(acc), "is_main_process", property(lambda self: False))  # this process as rank 1
    ckpts.save(6, {"train": TrainState(step=6, tokens=768), "ema": ema}, "")
    CheckpointManager(tmp_path / "run3", keep=2, accelerator=acc, async_save=True).save(
        6, {"train": TrainState(step=6, tokens=768), "ema": ema}, "")
    assert copied == []


def test_a_synchronous_save_takes_the_state_to_host_memory_a_file_at_a_time(trained, tmp_path, monkeypatch):
    """A synchronous save (checkpoint.async_save: false, or no host memory for the staging buffers) holds one file's
    host copy at a time, not the whole state's: nothing is copied before the writes start, each torch.save file's
    tensors are copied just before it is written, safetensors files a tensor at a time while written (formerly the
    model and optimizer state were both copied to host memory first: 12-16 bytes per parameter at once on a GPU)."""
    import cpt.checkpoint_files as files

    acc, model, opt = trained
    events, depth, real_copy, real_file = [], [0], files.host_copy, files.HashingFile

    def copy(obj, *a, **k):
        if depth[0] == 0 and isinstance(obj, dict):
            events.append(("copy", sorted(obj)[:2]))
        depth[0] += 1
        try:
            return real_copy(obj, *a, **k)
        finally:
            depth[0] -= 1

    class File(real_file):
        def __init__(self, path, *a, **k):
            events.append(("write", path.name))
            super().__init__(path, *a, **k)

    monkeypatch.setattr(files, "host_copy", copy)
    monkeypatch.setattr(files, "HashingFile", File)
    CheckpointManager(tmp_path / "run", keep=2, accelerator=acc).save(3, {"train": TrainState(step=3, tokens=1)}, "")
    names = [e[1] for e in events if e[0] == "write"]
    assert "model.safetensors" in names and "optimizer.bin" in names
    assert events[0][0] == "write"  # nothing copied before the first write
    assert all(events[i - 1][0] == "write" for i, (kind, _) in enumerate(events) if kind == "copy"), events  # into it
    i = events.index(("write", "optimizer.bin"))
    assert events[i + 1] == ("copy", ["param_groups", "state"]), events
    ckpt = list_checkpoints(tmp_path / "run")[0]
    assert verify_checkpoint(ckpt) is None


def test_non_blocking_save_writes_the_state_of_its_step(trained, tmp_path, monkeypatch):
    """save() returns while the files are still being written; training on does not leak into them."""
    import cpt.checkpoint as checkpoint

    acc, model, opt = trained
    release, writing = threading.Event(), threading.Event()
    real = checkpoint.write_files

    def slow_write(folder, items, step):
        writing.set()
        assert release.wait(30)
        return real(folder, items, step)

    monkeypatch.setattr(checkpoint, "write_files", slow_write)
    ckpts = CheckpointManager(tmp_path / "run", keep=2, accelerator=acc, async_save=True)
    want = {k: v.clone() for k, v in acc.get_state_dict(model).items()}
    ckpts.save(3, {"train": TrainState(step=3)}, "")
    assert writing.wait(30) and not list_checkpoints(tmp_path / "run")  # returned; nothing committed yet
    with torch.no_grad():  # the loop trains on
        for p in model.parameters():
            p.mul_(0.0)
    release.set()
    ckpts.wait()
    saved = read_state(list_checkpoints(tmp_path / "run")[0])["model"]
    assert saved and all(torch.equal(saved[k], want[k]) for k in saved)


def test_a_step_already_committed_is_not_written_again(trained, tmp_path, monkeypatch):
    """The end of a run saves its last step; when that step was a periodic save too (checkpoint.every dividing the
    steps: the usual case), the whole checkpoint was written a second time (a full extra model + optimizer write at
    the end of every such run; a kill during it left a .tmp- copy next to the good one). A save that failed is
    still tried again."""
    import cpt.checkpoint as checkpoint

    acc, _, _ = trained
    writes, real = [], checkpoint.write_files
    monkeypatch.setattr(checkpoint, "write_files", lambda folder, items, step: writes.append(step) or real(folder, items, step))
    ckpts = CheckpointManager(tmp_path / "run", keep=2, accelerator=acc, async_save=True)
    ckpts.save(4, {"train": TrainState(step=4)}, "")  # the loop's periodic save of the last step
    ckpts.save(4, {"train": TrainState(step=4)}, "")  # the end of the run
    ckpts.wait()
    assert writes == [4] and [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000004"]
    ckpts._record(6, OSError(errno.ENOSPC, "disk full"))  # (a failed save of step 6...)
    ckpts.save(6, {"train": TrainState(step=6)}, "")  # ...is written at the end
    ckpts.wait()
    assert writes == [4, 6]


def test_failed_background_save_counts_and_policy_stops(trained, tmp_path, monkeypatch, caplog):
    acc, _, _ = trained
    real_write = HashingFile.write

    def full(self, data):
        if "step_00000002" in str(self.path) or "step_00000003" in str(self.path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        return real_write(self, data)

    monkeypatch.setattr(HashingFile, "write", full)
    ckpts = CheckpointManager(tmp_path / "run", keep=5, accelerator=acc, async_save=True, max_failed_saves=2)
    ckpts.save(1, {}, "")
    ckpts.save(2, {}, "")  # fails in the background...
    with caplog.at_level(logging.ERROR, "cpt.checkpoint"):
        ckpts.save(3, {}, "")  # ...reported here (1 of 2), and this one is written
    assert "checkpoint at step 2 FAILED: no space left on device (" in caplog.text and ckpts.failed_in_a_row == 1
    assert "; the checkpoint step_00000001 is intact;" in caplog.text
    assert "retrying at the next interval (1 of 2 failures in a row allowed)" in caplog.text
    caplog.clear()
    with pytest.raises(checkpoint_error()) as e, caplog.at_level(logging.ERROR, "cpt.checkpoint"):
        ckpts.wait()  # the end of training: step 3 failed too -> 2 in a row: stop
    assert "2 checkpoint saves in a row failed" in str(e.value) and "no space left on device" in str(e.value)
    # the failure that reaches the limit says the run stops (it said "retrying at the next interval")
    assert "no retry: the run stops (2 of 2 failures in a row allowed)" in caplog.text and "retrying" not in caplog.text
    first = CheckpointManager(tmp_path / "first", keep=5, accelerator=acc, async_save=False)
    caplog.clear()
    with caplog.at_level(logging.ERROR, "cpt.checkpoint"):  # a run's first save: there is no previous one (it said
        first.save(2, {}, "")  # "the previous checkpoint is intact")
    assert "checkpoint at step 2 FAILED: no space left on device (" in caplog.text
    assert "; no earlier checkpoint exists;" in caplog.text and "is intact" not in caplog.text
    assert "step_00000001" in str(e.value)  # names the checkpoint that is left
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000001"]
    assert verify_checkpoint(list_checkpoints(tmp_path / "run")[0]) is None
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]


def checkpoint_error():
    from cpt.checkpoint import CheckpointError

    return CheckpointError


def test_io_errors_in_plain_words(tmp_path):
    enospc = OSError(errno.ENOSPC, "No space left on device", "/runs/x/model.safetensors")
    assert describe_io_error(enospc, tmp_path) == "no space left on device (/runs/x/model.safetensors)"
    try:  # torch's zip writer wraps the OSError as "unexpected pos"; the cause is found in its context
        try:
            raise enospc
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 46 vs 0")
    except RuntimeError as wrapped:
        assert describe_io_error(wrapped, tmp_path).startswith("no space left on device")
    assert describe_io_error(RuntimeError("Error while serializing: IoError(Os { code: 13, os error 13 })"), tmp_path) == \
        f"permission denied ({tmp_path})"
    assert describe_io_error(PermissionError(errno.EACCES, "Permission denied", "/ro/ckpt"), tmp_path) == "permission denied (/ro/ckpt)"
    assert "ValueError: odd" in describe_io_error(ValueError("odd"), tmp_path)


# ------------------------------------------------------------------ metrics.jsonl


def test_metrics_line_is_all_or_nothing(tiny_cpt_data, tmp_path, monkeypatch):
    from cpt.config import load_config

    cfg = load_config(base=tiny_run_config(tiny_cpt_data, tmp_path / "run"))
    logger = MetricsLogger(tmp_path / "run", cfg)
    logger.log({"train/tokens": 1, "train/loss": 2.0}, step=1)
    good = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    real = os.write

    def half_then_full(fd, data):  # the disk fills up in the middle of a line
        monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
        return real(fd, data[: len(data) // 2])

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(MetricsError, match=r"cannot write metrics to .*metrics.jsonl: no space left on device"):
        logger.log({"train/tokens": 2, "train/loss": 1.5}, step=2)
    monkeypatch.setattr(os, "write", real)
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == good  # the half line was cut off again
    logger.log({"train/tokens": 3, "train/loss": 1.0}, step=3)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 3]
    logger.close()


def test_metrics_on_a_full_device(tiny_cpt_data, tmp_path):
    """The kernel's own ENOSPC: metrics.jsonl pointing at /dev/full."""
    from cpt.config import load_config

    cfg = load_config(base=tiny_run_config(tiny_cpt_data, tmp_path / "run"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").symlink_to("/dev/full")
    logger = MetricsLogger(tmp_path / "run", cfg, resume=True)
    with pytest.raises(MetricsError, match="no space left on device"):
        logger.log({"train/tokens": 1}, step=1)


# ------------------------------------------------------------------ a training run on a full disk


def small_run(tiny_cpt_data, out, steps, **checkpoint):
    cfg = tiny_run_config(tiny_cpt_data, out, checkpoint={"every": 2, "keep": 5, "export_at_end": False, **checkpoint},
                          eval={"at_start": False})
    cfg["stages"][0]["steps"] = steps
    cfg["data"]["heldout"] = []
    return cfg


@pytest.mark.slow
def test_disk_full_during_saves_retries_then_stops(tiny_cpt_data, tmp_path, monkeypatch, capsys, caplog):
    from cpt.commands.train import main

    real_write = HashingFile.write
    failing = {"step_00000004"}

    def full(self, data):
        if any(s in str(self.path) for s in failing):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        return real_write(self, data)

    monkeypatch.setattr(HashingFile, "write", full)
    # one failed save: reported in plain words, retried at the next interval, the run completes
    out = tmp_path / "once"
    (tmp_path / "once.yaml").write_text(yaml.safe_dump(small_run(tiny_cpt_data, out, 8)))
    with caplog.at_level(logging.ERROR, "cpt.checkpoint"):
        assert main([str(tmp_path / "once.yaml")]) == 0
    assert "checkpoint at step 4 FAILED: no space left on device (" in caplog.text
    assert [p.name for p in list_checkpoints(out)] == ["step_00000002", "step_00000006", "step_00000008"]
    # failures in a row: the run stops with one line and exit 1 instead of training on unprotected
    failing.add("step_00000006")
    out = tmp_path / "twice"
    (tmp_path / "twice.yaml").write_text(yaml.safe_dump(small_run(tiny_cpt_data, out, 20, max_failed_saves=2)))
    capsys.readouterr()
    assert main([str(tmp_path / "twice.yaml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cpt train: error: 2 checkpoint saves in a row failed"), err
    assert "no space left on device" in err[0]
    assert [p.name for p in list_checkpoints(out)] == ["step_00000002"]  # the previous checkpoint is kept
    steps = [r["step"] for r in read_metrics(out) if "train/loss" in r]
    assert max(steps) <= 8  # stopped at the save after the second failure was known (async: one interval later)
    assert not (out / "run.lock").exists()


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True).returncode == 0


@pytest.mark.slow
def test_real_full_filesystem(tiny_cpt_data, tmp_path):
    """A 3 MiB tmpfs holds one checkpoint of the tiny model (about 2 MB) but not two: the second save hits
    the kernel's ENOSPC. Needs root and mount permission (CI runs as root); skipped elsewhere."""
    from cpt.config import load_config
    from cpt.train import train

    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "3m"):
        pytest.skip("cannot mount a tmpfs here (needs root with mount permission)")
    try:
        out = disk / "run"
        cfg = small_run(tiny_cpt_data, out, 20, max_failed_saves=2)
        with pytest.raises(checkpoint_error(), match="2 checkpoint saves in a row failed .*no space left on device"):
            train(load_config(base=cfg), echo=lambda *a: None)
        assert [p.name for p in list_checkpoints(out)] == ["step_00000002"]
        assert verify_checkpoint(list_checkpoints(out)[0]) is None
        assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    finally:
        subprocess.run(["umount", str(disk)])


def test_bench_checkpoint_cpu_path():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_checkpoint", Path(__file__).resolve().parents[1] / "scripts" / "bench_checkpoint.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--tiny", "--repeats", "1"])
    assert out["params"] > 0 and out["checkpoint_mb"] > 0
    assert 0 < out["async_blocking_s"] <= out["async_total_s"] and out["sync_s"] > 0 and out["old_sync_s"] > 0


def test_streamed_safetensors_load_with_safetensors(tmp_path):
    from safetensors.torch import load_file

    from cpt.checkpoint_files import write_safetensors

    tensors = {"w": torch.randn(3, 5), "h": torch.ones(2, dtype=torch.bfloat16), "flag": torch.tensor(True),
               "empty": torch.zeros(0), "ids": torch.arange(7), "t": torch.randn(4, 3).t()}
    with HashingFile(tmp_path / "x.safetensors") as f:
        write_safetensors(f, tensors, chunk=4)  # tiny pieces
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())


def test_a_checkpoint_that_does_not_fit_the_model_is_summarised():
    """CheckpointManager.load turns torch's load_state_dict error (a model section that is not the checkpoint's model)
    into one line: how many keys are missing / unexpected / of another shape, and the first of each."""

    from cpt.state import state_dict_mismatch

    model = torch.nn.Sequential(torch.nn.Linear(2, 4))
    said = []
    for state in ({"0.weight": torch.zeros(3, 2), "0.bias": torch.zeros(4)}, {"0.weight": torch.zeros(4, 2), "x": torch.zeros(1)}):
        with pytest.raises(RuntimeError) as e:
            model.load_state_dict(state)
        said.append(state_dict_mismatch(e.value))
    assert said == ["1 of another shape, e.g. 0.weight: [3, 2] in the checkpoint, [4, 2] in the model",
                    "1 missing key(s), e.g. 0.bias; 1 unexpected key(s), e.g. x"]


def test_a_step_broken_again_after_being_set_aside_is_set_aside_too(tmp_path):
    """--resume sets a broken newest checkpoint aside as unusable-step_N. A resumed run saves step N again; when that
    save breaks too (a flaky file system), setting it aside renamed onto the earlier unusable-step_N, which failed
    (directory not empty), and every later --resume stopped with 'a write failed' (found by scripts/soak_faults.py)."""
    from types import SimpleNamespace

    from cpt.checkpoint import write_checksums
    from cpt.resume import find_resume_checkpoint

    root = tmp_path / "run" / "checkpoints"
    for step in (2, 4):  # step 2 intact, step 4 (the newest) truncated after it was committed
        ckpt = root / f"step_{step:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "model.safetensors").write_bytes(b"x" * 64)
        write_checksums(ckpt)
    (root / "step_00000004" / "model.safetensors").write_bytes(b"x" * 32)
    (root / "unusable-step_00000004").mkdir()  # the first broken save of step 4, set aside by an earlier --resume
    (root / "unusable-step_00000004" / "model.safetensors").write_bytes(b"y")
    said = []
    acc = SimpleNamespace(is_main_process=True, num_processes=1, process_index=0, wait_for_everyone=lambda: None)
    assert find_resume_checkpoint(tmp_path / "run", acc, said.append) == root / "step_00000002"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "unusable-step_00000004", "unusable-step_00000004.2"]
    assert (root / "unusable-step_00000004" / "model.safetensors").read_bytes() == b"y"  # the earlier one kept as it was
    assert said[1:] == [f"set aside 1 unusable checkpoint(s) as unusable-step_N in {root}"]
    assert said[0].startswith("checkpoint step_00000002 verified: 1 files, 0.00 GB in ") and said[0].endswith(" s"), said


def test_an_edited_checksums_listing_is_an_unusable_checkpoint_not_a_traceback(tmp_path):
    """A CHECKSUMS.json that is JSON but not the listing a save writes (one key changed: "sizf"; an entry that is not
    a mapping; no file at all) raised KeyError/TypeError in `cpt verify`, `--resume` and `cpt export`, every time (the
    resume never fell back to the older checkpoint), or verified as 0 files. Now each is "CHECKSUMS.json unreadable",
    which --resume sets aside like any broken checkpoint."""
    from types import SimpleNamespace

    from cpt.checkpoint import verify_checkpoint, write_checksums
    from cpt.resume import find_resume_checkpoint

    root = tmp_path / "run" / "checkpoints"
    for step in (2, 4):
        ckpt = root / f"step_{step:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "model.safetensors").write_bytes(b"x" * 64)
        write_checksums(ckpt)
    newest = root / "step_00000004"
    listing = newest / CHECKSUMS
    good = listing.read_text()
    for bad, said in ((good.replace('"size"', '"sizf"'), "the entry of 'model.safetensors' is not {size: int"),
                      ('{"files": {"model.safetensors": 64}}', "the entry of 'model.safetensors' is not"),
                      ('{"files": []}', "'files' is not a mapping"), ('{"files": {}}', "it lists no file"),
                      ('[1, 2]', "unreadable")):
        listing.write_text(bad)
        problem = verify_checkpoint(newest)
        assert problem is not None and problem.startswith(f"{CHECKSUMS} unreadable") and said in problem, (bad, problem)
    listing.write_text(good.replace('"size"', '"sizf"'))
    acc = SimpleNamespace(is_main_process=True, num_processes=1, process_index=0, wait_for_everyone=lambda: None)
    assert find_resume_checkpoint(tmp_path / "run", acc, lambda *a: None) == root / "step_00000002"
    assert (root / "unusable-step_00000004").is_dir()


def test_the_ranks_share_the_reading_of_a_checkpoint(tmp_path, monkeypatch):
    """A resume or a start from a cpt checkpoint verifies it by reading every file (its digest). That was the main
    process alone (minutes for a large checkpoint on a single client's bandwidth) or, for train.init_from, every rank
    (the whole checkpoint read once per rank). Now each of n ranks reads its share: together every file once, each
    about as many bytes; a broken file is found by the rank whose share holds it (the verdicts are then gathered:
    cpt.resume.SharedCheck, launched in tests/test_launch_shipped.py)."""
    import cpt.checkpoint_dir as checkpoint_dir
    from cpt.checkpoint import write_checksums
    from cpt.checkpoint_dir import reader_share
    from cpt.fileio import file_digest

    ckpt = tmp_path / "step_00000004"
    sizes = {"model.safetensors": 9000, "optimizer.bin": 18000, "random_states_0.pkl": 50, "random_states_1.pkl": 50,
             "trainer_state.json": 300, "pytorch_model_fsdp_0/__0_0.distcp": 4000,
             "pytorch_model_fsdp_0/__1_0.distcp": 4000, "pytorch_model_fsdp_0/.metadata": 700}
    for rel, n in sizes.items():
        (ckpt / rel).parent.mkdir(parents=True, exist_ok=True)
        (ckpt / rel).write_bytes(os.urandom(n))
    write_checksums(ckpt, {rel: file_digest(ckpt / rel) for rel in sizes})
    files = json.loads((ckpt / CHECKSUMS).read_text())["files"]
    read = []
    monkeypatch.setattr(checkpoint_dir, "file_digest", lambda p: read.append(p) or file_digest(p))
    for readers in (1, 2, 3, 8):
        shares = [reader_share(files, r, readers) for r in range(readers)]
        assert sorted(f for share in shares for f in share) == sorted(sizes)  # every file once
        loads = [sum(sizes[f] for f in share) for share in shares]
        assert max(loads) - min(loads) <= max(sizes.values()), loads  # balanced by bytes
        assert shares == [reader_share(files, r, readers) for r in range(readers)]  # the same split on every rank
        for r, share in enumerate(shares):
            read.clear()
            assert verify_checkpoint(ckpt, part=(r, readers)) is None
            assert sorted(str(p.relative_to(ckpt)) for p in read) == sorted(share)  # its share, and no other file
    # a flipped byte (same size) in one file: found by its reader alone, and the whole check finds it
    victim = "pytorch_model_fsdp_0/__1_0.distcp"
    data = bytearray((ckpt / victim).read_bytes())
    data[100] ^= 0xFF
    (ckpt / victim).write_bytes(bytes(data))
    found = [verify_checkpoint(ckpt, part=(r, 3)) for r in range(3)]
    owner = next(r for r in range(3) if victim in reader_share(files, r, 3))
    assert found[owner] == f"{victim} checksum mismatch (corrupt)"
    assert [f for r, f in enumerate(found) if r != owner] == [None, None]
    assert verify_checkpoint(ckpt) == f"{victim} checksum mismatch (corrupt)"
    # a missing file: its reader says so
    (ckpt / "random_states_1.pkl").unlink()
    owner = next(r for r in range(3) if "random_states_1.pkl" in reader_share(files, r, 3))
    assert verify_checkpoint(ckpt, part=(owner, 3)) == "random_states_1.pkl missing"
