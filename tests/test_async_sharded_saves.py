"""Non-blocking FSDP2 checkpoints (cpt/sharded_save.py: torch.distributed.checkpoint.async_save), `cpt train` on 2 CPU
processes under the shipped FSDP2 config (gloo, tests/fsdp_on_cpu.py):

* a run with `checkpoint.async_save: true` (the default) and one with `false` log the same losses bitwise, and write
  the same checkpoints: the same files (accelerate's layout: pytorch_model_fsdp_0/, optimizer_0/,
  random_states_<rank>.pkl) holding the same tensors, read by cpt/consolidate.py;
* a background write that fails on one rank (disk full, injected inside DCP's write on rank 1) fails on every rank,
  is reported naming the rank and counted toward `checkpoint.max_failed_saves`, and the run goes on;
* `kill -9` of the job during a later background write, after every rank's shards are written and before the commit,
  leaves the previous checkpoint the newest valid one; `--resume` continues from it and logs the uninterrupted run's
  losses bitwise (a rank that fails before its host copy, there, fails that save on every rank, no rank left waiting);
  with too little host memory for the host copy (a fake /proc/meminfo, cpt/host_memory.py) its last save is written
  synchronously on every rank, said once, the same files and tensors as the synchronous run's.

(LoRA under FSDP2 with non-blocking saves, its checkpoint without the base: tests/test_lora_sharded_checkpoints.py;
preemption of a non-blocking FSDP2 run: tests/test_train_distributed.py.) Four launches of `cpt train` and one of
scripts/bench_checkpoint.py --fsdp: about two minutes on 2 loaded cores.
"""

import json
import shutil
from pathlib import Path

import pytest

from launching import ROOT, VENV_BIN, FREE_PORT, finish, losses, rank_env, start, two_process_config, world_sizes
from launching import write_config as write

pytestmark = pytest.mark.slow

STEPS, EVERY = 8, 2


def launch(cfg: dict, cfg_path: Path, *extra: str, env: dict | None = None) -> tuple[int, str]:
    """`cpt train` on 2 CPU processes with the shipped FSDP2 config (tests/fsdp_shim)."""
    args = [str(VENV_BIN / "accelerate"), "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml"),
            "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            *FREE_PORT, "-m", "cpt.cli", "train", str(write(cfg, cfg_path)), *extra]
    return finish(start(args, cfg_path.parent, {**rank_env(cpu=True, fsdp_on_cpu=True), **(env or {})}))


def make_cfg(tiny_cpt_data, tiny_base, out: Path, async_save: bool = True) -> dict:
    cfg = two_process_config(tiny_cpt_data, tiny_base, out, steps=STEPS, eval_every=STEPS,
                             checkpoint={"every": EVERY, "keep": 5, "async_save": async_save, "max_failed_saves": 2,
                                         "export_at_end": False})
    cfg["eval"]["at_start"] = False
    return cfg


@pytest.fixture(scope="module")
def runs(tiny_cpt_data, tiny_base, tmp_path_factory):
    """The uninterrupted runs, with non-blocking and with synchronous saves."""
    out = {}
    for name, async_save in (("async", True), ("sync", False)):
        d = tmp_path_factory.mktemp(name)
        rc, log = launch(make_cfg(tiny_cpt_data, tiny_base, d / "run", async_save), d / "run.yaml")
        assert rc == 0, log[-5000:]
        assert ("written in the background (torch.distributed.checkpoint.async_save)" in log) == async_save, log[-5000:]
        out[name] = d / "run"
    return out


def files(ckpt: Path) -> list[str]:
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())


def test_non_blocking_and_synchronous_saves_train_and_write_the_same(runs, tmp_path):
    import torch

    from cpt.checkpoint import list_checkpoints, verify_checkpoint
    from cpt.consolidate import layout, read_model_state, read_optimizer_state

    a, s = runs["async"], runs["sync"]
    assert world_sizes(a) == {2} and sorted(losses(a)) == list(range(1, STEPS + 1))
    assert losses(a) == losses(s)  # bitwise: the saves leave training alone
    assert [p.name for p in list_checkpoints(a)] == [p.name for p in list_checkpoints(s)] == [
        f"step_{k:08d}" for k in range(EVERY, STEPS + 1, EVERY)]
    for ckpt_a, ckpt_s in zip(list_checkpoints(a), list_checkpoints(s)):
        assert verify_checkpoint(ckpt_a) is None and layout(ckpt_a) == layout(ckpt_s) == "fsdp"
        assert files(ckpt_a) == files(ckpt_s), (files(ckpt_a), files(ckpt_s))
        assert {"pytorch_model_fsdp_0/__0_0.distcp", "pytorch_model_fsdp_0/__1_0.distcp", "pytorch_model_fsdp_0/.metadata",
                "optimizer_0/__0_0.distcp", "optimizer_0/__1_0.distcp", "optimizer_0/.metadata", "random_states_0.pkl",
                "random_states_1.pkl"} <= set(files(ckpt_a))
        wa, ws = read_model_state(ckpt_a), read_model_state(ckpt_s)
        assert wa.keys() == ws.keys() and all(torch.equal(wa[k], ws[k]) for k in ws)
        oa, os_ = read_optimizer_state(ckpt_a), read_optimizer_state(ckpt_s)
        assert oa.keys() == os_.keys() and all(torch.equal(oa[k][m], os_[k][m]) for k in os_ for m in os_[k])
        for r in (0, 1):
            ra, rs = (torch.load(c / f"random_states_{r}.pkl", weights_only=False) for c in (ckpt_a, ckpt_s))
            assert torch.equal(ra["torch_manual_seed"], rs["torch_manual_seed"]) and ra["step"] == rs["step"]
        # every file with a digest, each rank's shards and RNG state and the metadata too (they had their size alone,
        # so a same-size corruption went through verification: scripts/soak_faults.py's finding under ZeRO)
        for ckpt in (ckpt_a, ckpt_s):  # (the synchronous save's files read back by the rank that wrote them)
            listed = json.loads((ckpt / "CHECKSUMS.json").read_text())["files"]
            assert sorted(listed) == [f for f in files(ckpt) if f != "CHECKSUMS.json"]
            assert all(meta["digest"] for meta in listed.values()), (ckpt, {k for k, m in listed.items() if not m["digest"]})

    # a flipped byte in rank 1's optimizer shard (the same size): verification names it (a copy of the last checkpoint)
    ckpt = tmp_path / "copy"
    shutil.copytree(list_checkpoints(a)[-1], ckpt)
    assert verify_checkpoint(ckpt) is None
    shard = ckpt / "optimizer_0" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert verify_checkpoint(ckpt) == "optimizer_0/__1_0.distcp checksum mismatch (corrupt)"


def test_a_failed_and_a_killed_background_write_keep_the_previous_checkpoint(runs, tiny_cpt_data, tiny_base, tmp_path):
    import torch

    from cpt.checkpoint import list_checkpoints, verify_checkpoint
    from cpt.consolidate import read_model_state, read_optimizer_state

    out = tmp_path / "run"
    cfg = make_cfg(tiny_cpt_data, tiny_base, out)
    # rank 1's optimizer shards fail at step 2 (disk full inside DCP's write); the job is killed at step 6 once every
    # rank's shards (and DCP's .metadata) are on disk, before the main process commits
    faults = f"enospc:optimizer_0:rank1@{EVERY},save:shards@{3 * EVERY}"
    rc, log = launch(cfg, tmp_path / "run.yaml", env={"CPT_FAULT_INJECT": faults})
    assert rc != 0, log[-5000:]
    # rank 1, whose next collective broke when the main process was killed, says so in one line (no traceback page;
    # the launcher's summary names the killed rank): cpt/rank_failure.py
    lines = [line for line in log.splitlines() if line.startswith("cpt train: error:")]
    assert len(lines) == 1 and lines[0].startswith("cpt train: error: rank 1 of 2 (") and "another rank of this run died" in lines[0], log[-5000:]
    assert "[rank1]:" not in log, log[-5000:]
    assert (f"checkpoint at step {EVERY} FAILED: rank 1 failed to write its shards: no space left on device" in log
            and "(1 of 2 failures in a row allowed)" in log), log[-5000:]
    assert [p.name for p in list_checkpoints(out)] == [f"step_{2 * EVERY:08d}"]  # step 2 failed, step 6 never committed
    assert verify_checkpoint(list_checkpoints(out)[0]) is None
    pending = out / "checkpoints" / f".tmp-step_{3 * EVERY:08d}"  # killed after the shards, before the commit
    assert (pending / "pytorch_model_fsdp_0" / ".metadata").is_file() and (pending / "optimizer_0" / ".metadata").is_file()
    assert not (pending / "CHECKSUMS.json").exists()
    assert set(range(1, 3 * EVERY + 1)) <= set(losses(out))  # (training went on during the write)

    # resumed; rank 1 fails before its host copy at step 6 (agreed on before any rank writes: no rank left waiting); the
    # host (a fake /proc/meminfo: 1 MB available) has no room for the host copy: step 8 is saved synchronously
    host = tmp_path / "host" / "proc"
    host.mkdir(parents=True)
    (host / "meminfo").write_text("MemAvailable:       1024 kB\n")
    rc, log = launch(cfg, tmp_path / "run.yaml", "--resume", env={"CPT_FAULT_INJECT": f"enospc:save_state:rank1@{3 * EVERY}",
                                                                  "CPT_HOST_MEMORY_ROOT": str(host.parent)})
    assert rc == 0 and f"step_{2 * EVERY:08d} at step {2 * EVERY} " in log, log[-5000:]
    assert f"checkpoint at step {3 * EVERY} FAILED" in log, log[-5000:]
    assert losses(out) == losses(runs["async"])  # every step once, bitwise the uninterrupted run's
    assert [p.name for p in list_checkpoints(out)] == [f"step_{2 * EVERY:08d}", f"step_{STEPS:08d}"]
    said = [line for line in log.splitlines() if "writing this save synchronously" in line]
    assert len(said) == 1 and "more host memory on" in said[0] and "(MemAvailable (/proc/meminfo))" in said[0], log[-5000:]
    assert "written in the background" not in log, log[-5000:]
    last, sync_last = list_checkpoints(out)[-1], list_checkpoints(runs["sync"])[-1]
    assert verify_checkpoint(last) is None and files(last) == files(sync_last)
    wa, ws = read_model_state(last), read_model_state(sync_last)
    assert wa.keys() == ws.keys() and all(torch.equal(wa[k], ws[k]) for k in ws)
    oa, os_ = read_optimizer_state(last), read_optimizer_state(sync_last)
    assert oa.keys() == os_.keys() and all(torch.equal(oa[k][m], os_[k][m]) for k in os_ for m in os_[k])
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no leftovers


def test_bench_checkpoint_fsdp(tmp_path):
    """scripts/bench_checkpoint.py --fsdp as its docstring runs it (tiny shape): both saves measured, the slowest
    rank's times, the non-blocking save waiting less than it takes to commit. About 20 s."""
    import json

    args = [str(VENV_BIN / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", *FREE_PORT, "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy",
            "TRANSFORMER_BASED_WRAP", "--fsdp_state_dict_type", "SHARDED_STATE_DICT",
            str(ROOT / "scripts" / "bench_checkpoint.py"), "--fsdp", "--tiny", "--repeats", "2", "--out", str(tmp_path / "b")]
    rc, log = finish(start(args, tmp_path, rank_env(cpu=True)))
    assert rc == 0, log[-5000:]
    out = json.loads([line for line in log.splitlines() if line.startswith('{"bench"')][-1])
    assert out["bench"] == "checkpoint-fsdp2" and out["processes"] == 2 and out["checkpoint_mb"] > 0
    assert 0 < out["async_blocking_s"] <= out["async_total_s"] and out["sync_s"] > 0
