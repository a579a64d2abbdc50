"""Non-blocking DeepSpeed checkpoints (cpt/zero_save.py: DeepSpeed's own save, its files written in the background), `cpt
train` on 2 CPU processes under ZeRO-3 (gloo), of a `model.freeze` run (bottom_half: layer 0 of 2 frozen), whose
checkpoints leave the frozen layer out (DeepSpeed's exclude_frozen_parameters, cpt/adapter_shards.py):

* a run with `checkpoint.async_save: true` (the default), resumed, logs the losses of a run with `false` bitwise and
  writes the same checkpoints: DeepSpeed's files (pytorch_model/zero_pp_rank_<r>_mp_rank_00_{model,optim}_states.pt,
  `latest`, random_states_<rank>.pkl) holding the same tensors, with their digests in CHECKSUMS.json;
* a background write that fails on one rank (disk full, injected before rank 1 writes its optimizer partition) fails
  that save on every rank, reported naming the rank and counted toward `checkpoint.max_failed_saves`; the run goes on;
* `kill -9` of the main process during a later save, after every rank's files are written and before the commit: the
  other rank stops at once with the one line of cpt/rank_failure.py (not after train.distributed_timeout_s), the
  previous checkpoint stays the newest valid one, and `--resume` continues from it exactly (the frozen layer from the base
  the run builds); the checkpoint exports the trained part over that base. That resume runs on a host with no room for
  the host copies (a fake /proc/meminfo, cpt/host_memory.py): every file is written in the save, said once per rank,
  the checkpoints the same.

And scripts/bench_checkpoint.py --deepspeed (ZeRO-2 with the optimizer offloaded to the CPU): both saves measured, the
non-blocking save's files equal the synchronous one's. Four launches: about two minutes on 2 loaded cores.
"""

from pathlib import Path

import pytest

from launching import ROOT, VENV_BIN, FREE_PORT, finish, losses, rank_env, start, two_process_config, world_sizes
from launching import write_config as write

pytestmark = pytest.mark.slow

STEPS, EVERY = 8, 2
OPTIM = "pytorch_model/zero_pp_rank_{}_mp_rank_00_optim_states.pt"


def launch(cfg: dict, cfg_path: Path, *extra: str, env: dict | None = None) -> tuple[int, str]:
    """`cpt train` on 2 CPU processes under DeepSpeed ZeRO-3 (accelerate's flags)."""
    args = [str(VENV_BIN / "accelerate"), "launch", "--use_deepspeed", "--zero_stage", "3", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *FREE_PORT, "-m", "cpt.cli", "train",
            str(write(cfg, cfg_path)), *extra]
    return finish(start(args, cfg_path.parent, {**rank_env(cpu=False), **(env or {})}))


def make_cfg(tiny_cpt_data, tiny_base, out: Path, async_save: bool = True) -> dict:
    cfg = two_process_config(tiny_cpt_data, tiny_base, out, steps=STEPS, eval_every=STEPS,
                             checkpoint={"every": EVERY, "keep": 5, "async_save": async_save, "max_failed_saves": 2,
                                         "export_at_end": False})
    cfg["eval"]["at_start"] = False
    cfg["model"]["freeze"] = {"layers": "bottom_half"}
    return cfg


def files(ckpt: Path) -> list[str]:
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())


def assert_same(a, b, where: str) -> None:
    """The same nested structure, tensors equal (dtype, shape and values), other values equal."""
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (where, list(a), list(b))
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}/{i}")
    elif type(a).__module__.startswith(("deepspeed", "numpy")):  # a loss scaler, a numpy RNG state array
        assert type(a) is type(b), where
    else:
        assert a == b, (where, a, b)


def assert_same_checkpoint(a: Path, b: Path, resumed: bool = False) -> None:
    """``a`` and ``b`` hold the same files, every DeepSpeed and RNG file the same tensors and values (``resumed``: but
    accelerate's micro-step counter, which a resume restarts: cpt/checkpoint.py's load)."""
    import torch

    assert files(a) == files(b), (files(a), files(b))
    for rel in files(a):
        if rel.endswith((".pt", ".pkl")):
            sa, sb = (torch.load(c / rel, weights_only=False) for c in (a, b))
            if resumed and rel.startswith("random_states_"):
                sa.pop("step"), sb.pop("step")
            assert_same(sa, sb, rel)


@pytest.fixture(scope="module")
def sync_run(tiny_cpt_data, tiny_base, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sync")
    rc, log = launch(make_cfg(tiny_cpt_data, tiny_base, d / "run", async_save=False), d / "run.yaml")
    assert rc == 0, log[-5000:]
    assert "written in the background" not in log and "DeepSpeed saves synchronously" not in log, log[-5000:]
    return d / "run"


def test_background_zero3_saves_fail_on_every_rank_survive_a_kill_and_match_synchronous_ones(sync_run, tiny_cpt_data,
                                                                                             tiny_base, tmp_path):
    import json

    from cpt.checkpoint import list_checkpoints, verify_checkpoint
    from cpt.consolidate import layout

    out = tmp_path / "run"
    cfg = make_cfg(tiny_cpt_data, tiny_base, out)
    # rank 1's optimizer partition fails at step 2 (disk full, in its writer thread); the job is killed at step 6 once
    # every rank's files are on disk, before the main process commits
    faults = f"enospc:{OPTIM.format(1)}:rank1@{EVERY},save:shards@{3 * EVERY}"
    cfg["train"]["distributed_timeout_s"] = 120  # (a survivor left waiting would name it, not the lost peer)
    rc, log = launch(cfg, tmp_path / "run.yaml", env={"CPT_FAULT_INJECT": faults})
    assert rc != 0, log[-5000:]
    # rank 1, whose collective broke when the main process was killed, says so in one line at once (no traceback page,
    # no wait for train.distributed_timeout_s; the launcher's summary names the killed rank): cpt/rank_failure.py
    lines = [line for line in log.splitlines() if line.startswith("cpt train: error:")]
    assert len(lines) == 1 and lines[0].startswith("cpt train: error: rank 1 of 2 (") and "another rank of this run died" in lines[0], log[-5000:]
    assert "[rank1]:" not in log and "distributed_timeout_s" not in log, log[-5000:]
    assert "DeepSpeed's checkpoint files are written in the background" in log, log[-5000:]
    assert (f"checkpoint at step {EVERY} FAILED: rank 1 (" in log and "failed to write its DeepSpeed files: no space left "
            "on device" in log and "(1 of 2 failures in a row allowed)" in log), log[-5000:]
    assert [p.name for p in list_checkpoints(out)] == [f"step_{2 * EVERY:08d}"]  # step 2 failed, step 6 never committed
    pending = out / "checkpoints" / f".tmp-step_{3 * EVERY:08d}"  # killed after every rank's files, before the commit
    assert (pending / OPTIM.format(0)).is_file() and (pending / OPTIM.format(1)).is_file()
    assert not (pending / "CHECKSUMS.json").exists()
    assert set(range(1, 3 * EVERY + 1)) <= set(losses(out))  # (training went on during the write)

    ckpt = list_checkpoints(out)[0]
    assert verify_checkpoint(ckpt) is None and layout(ckpt) == "deepspeed"
    assert_same_checkpoint(ckpt, list_checkpoints(sync_run)[1])  # the synchronous run's step 4
    digests = json.loads((ckpt / "CHECKSUMS.json").read_text())["files"]
    assert all(digests[OPTIM.format(r)]["digest"] for r in (0, 1)), digests  # hashed as written, every rank's
    # and every other file too (each rank's RNG state, DeepSpeed's `latest` and recovery scripts: their size alone
    # before, so that a flipped byte went unnoticed; scripts/soak_faults.py --strategy zero3 found it)
    assert {"random_states_0.pkl", "random_states_1.pkl", "latest", "zero_to_fp32.py"} <= set(digests), sorted(digests)
    assert all(meta["digest"] for meta in digests.values()), {k for k, meta in digests.items() if not meta["digest"]}

    # resumed on a host with 1 MB available (a fake /proc/meminfo): every file is written in the save (cpt/host_memory.py)
    host = tmp_path / "host" / "proc"
    host.mkdir(parents=True)
    (host / "meminfo").write_text("MemAvailable:       1024 kB\n")
    rc, log = launch(cfg, tmp_path / "run.yaml", "--resume", env={"CPT_HOST_MEMORY_ROOT": str(host.parent)})
    assert rc == 0 and f"step_{2 * EVERY:08d} at step {2 * EVERY} " in log, log[-5000:]
    said = [line for line in log.splitlines() if "writing this save synchronously" in line]
    assert said and all("more host memory for pytorch_model/" in line and "over LOCAL_WORLD_SIZE ranks" in line
                        for line in said) and len(said) <= 2, log[-5000:]  # (once per rank)
    assert world_sizes(out) == {2} and losses(out) == losses(sync_run)  # every step, bitwise the synchronous run's
    assert [p.name for p in list_checkpoints(out)] == [p.name for p in list_checkpoints(sync_run)][1:]
    assert_same_checkpoint(list_checkpoints(out)[-1], list_checkpoints(sync_run)[-1], resumed=True)
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no leftovers


def test_a_zero3_model_freeze_checkpoint_holds_the_trained_part_and_exports_over_the_base(sync_run, tiny_base, tmp_path):
    """(No launch: the synchronous run's checkpoints.) Its last checkpoint holds no tensor of the frozen layer, model
    or optimizer; `cpt export` writes the trained part over the base as built."""
    import json

    import torch
    from safetensors.torch import load_file

    from cpt.adapter_checkpoint import read_base_record
    from cpt.checkpoint import list_checkpoints
    from cpt.consolidate import read_model_state, read_optimizer_state
    from cpt.checkpoint_export import export_checkpoint

    ckpt = list_checkpoints(sync_run)[-1]
    assert read_base_record(ckpt)["kind"] == "freeze"
    # a synchronous save's files, DeepSpeed's own, each read back and hashed by the rank that wrote it: all digested
    listed = json.loads((ckpt / "CHECKSUMS.json").read_text())["files"]
    assert {"random_states_1.pkl", "latest"} <= set(listed) and all(m["digest"] for m in listed.values()), listed
    trained, adam = read_model_state(ckpt), read_optimizer_state(ckpt)
    assert trained and not any(k.startswith("model.layers.0.") for k in trained), sorted(trained)
    assert adam.keys() <= trained.keys() and any(k.startswith("model.layers.1.") for k in adam)
    export_checkpoint(ckpt, tmp_path / "x", echo=lambda *a: None)
    x, base = load_file(tmp_path / "x" / "model.safetensors"), load_file(tiny_base / "model.safetensors")
    assert all(torch.equal(x[k], base[k]) for k in x if k.startswith("model.layers.0."))
    assert all(torch.equal(x[k], trained[k]) for k in trained if k in x)
    assert any(not torch.equal(x[k], base[k]) for k in trained if k in x and k in base)  # (it trained)


def test_a_zero_file_that_names_another_global_is_refused_before_deepspeed_unpickles_it(sync_run, tmp_path):
    """(No launch.) DeepSpeed's readers unpickle with weights_only=False: a ZeRO file whose pickle names a global
    beyond DeepSpeed's own classes (here argparse.Namespace; a hostile one would name os.system) is refused, without
    being unpickled, by the resume (cpt.adapter_shards.load_state, before accelerate's load_state is called) and by
    cpt/consolidate.py (`cpt export`, a resume on another world size or backend); the run's own files pass. (FSDP2's
    DCP pickles: tests/test_pickle_scan.py.)"""
    import argparse
    import shutil
    from types import SimpleNamespace

    import torch

    from cpt.adapter_shards import load_state
    from cpt.checkpoint import list_checkpoints
    from cpt.consolidate import ConsolidateError, read_optimizer_state
    from cpt.pickle_scan import PickleCheckError

    loads = []
    acc = SimpleNamespace(distributed_type="DEEPSPEED", load_state=lambda *a, **k: loads.append(a))
    ckpt = shutil.copytree(list_checkpoints(sync_run)[-1], tmp_path / "checkpoint")
    load_state(acc, ckpt)
    assert len(loads) == 1  # the run's own files: handed to accelerate
    read_optimizer_state(ckpt)
    state = torch.load(ckpt / OPTIM.format(1), weights_only=False)
    state["extra"] = argparse.Namespace(x=1)
    torch.save(state, ckpt / OPTIM.format(1))
    with pytest.raises(PickleCheckError, match=r"zero_pp_rank_1_mp_rank_00_optim_states.pt: refusing to unpickle "
                                                     r"it: it names argparse.Namespace"):
        load_state(acc, ckpt)
    assert len(loads) == 1
    with pytest.raises(ConsolidateError, match="refusing to unpickle it: it names argparse.Namespace"):
        read_optimizer_state(ckpt)


def test_bench_checkpoint_deepspeed(tmp_path):
    """scripts/bench_checkpoint.py --deepspeed as its docstring runs it (tiny shape, ZeRO-2 with the optimizer state
    offloaded to the CPU): both saves measured (the slowest rank's), the non-blocking save's files equal the
    synchronous one's (the bench checks them)."""
    import json

    args = [str(VENV_BIN / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", *FREE_PORT, "--use_deepspeed", "--zero_stage", "2", "--offload_optimizer_device", "cpu",
            str(ROOT / "scripts" / "bench_checkpoint.py"), "--deepspeed", "--tiny", "--repeats", "2", "--out", str(tmp_path / "b")]
    rc, log = finish(start(args, tmp_path, rank_env(cpu=False)))
    assert rc == 0, log[-5000:]
    out = json.loads([line for line in log.splitlines() if line.startswith('{"bench"')][-1])
    assert out["bench"] == "checkpoint-deepspeed" and out["processes"] == 2 and out["zero_stage"] == 2 and out["offload"]
    assert out["checkpoint_mb"] > 0 and out["same_tensors"] is True
    assert 0 < out["async_blocking_s"] <= out["async_total_s"] and out["sync_s"] > 0
