"""The host-memory guard of non-blocking saves (cpt/host_memory.py): the available-memory reader on fake /proc and
cgroup files (v1, v2, no limit), the node sum of the ranks' needs, and the one-process saver (cpt/checkpoint_files.py)
falling back to a synchronous save, complete and equal to a background one, when the host has no room for its
buffers; under DDP on 2 processes (one launch) both ranks decide the same. (FSDP2 and DeepSpeed under a fake small
host on 2 processes: tests/test_async_sharded_saves.py and tests/test_async_deepspeed_saves.py, their resumed launches;
DeepSpeed's per-file fallback below without a launch.)"""

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cpt import host_memory
from cpt.host_memory import GiB, Guard, available, usable

MB = 1 << 20


def fake_host(root: Path, mem_available_kb: int, cgroup: str = "", files: dict | None = None) -> Path:
    (root / "proc" / "self").mkdir(parents=True, exist_ok=True)
    (root / "proc" / "meminfo").write_text(f"MemTotal:       99999999 kB\nMemAvailable:   {mem_available_kb} kB\n")
    (root / "proc" / "self" / "cgroup").write_text(cgroup)
    for rel, text in (files or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_available_reads_meminfo_and_the_tighter_cgroup_limit(tmp_path):
    assert available(fake_host(tmp_path / "plain", 8 * 1024 * 1024)) == (8 * GiB, "MemAvailable (/proc/meminfo)")
    # cgroup v2 (a SLURM job): the step's own cgroup says "max", the job's above it has the limit; inactive page
    # cache counts as room (the kernel reclaims it first)
    v2 = fake_host(tmp_path / "v2", 64 * 1024 * 1024, "0::/slurm/job_7/step_0\n", {
        "sys/fs/cgroup/slurm/job_7/step_0/memory.max": "max\n", "sys/fs/cgroup/slurm/job_7/step_0/memory.current": "5\n",
        "sys/fs/cgroup/slurm/job_7/memory.max": f"{16 * GiB}\n", "sys/fs/cgroup/slurm/job_7/memory.current": f"{10 * GiB}\n",
        "sys/fs/cgroup/slurm/job_7/memory.stat": f"anon 1\ninactive_file {GiB}\nactive_file 7\n"})
    avail, source = available(v2)
    assert avail == 7 * GiB and "slurm/job_7/memory.max" in source and "16.0 GB" in source
    # cgroup v1: limit_in_bytes - usage_in_bytes + total_inactive_file; MemAvailable tighter than it wins
    v1_files = {"sys/fs/cgroup/memory/job/memory.limit_in_bytes": f"{32 * GiB}\n",
                "sys/fs/cgroup/memory/job/memory.usage_in_bytes": f"{4 * GiB}\n",
                "sys/fs/cgroup/memory/job/memory.stat": f"total_inactive_file {2 * GiB}\n"}
    v1 = fake_host(tmp_path / "v1", 64 * 1024 * 1024, "12:cpuset:/job\n7:memory:/job\n", v1_files)
    assert available(v1)[0] == 30 * GiB and "memory.limit_in_bytes" in available(v1)[1]
    v1_tight = fake_host(tmp_path / "v1t", 3 * 1024 * 1024, "7:memory:/job\n", v1_files)
    assert available(v1_tight) == (3 * GiB, "MemAvailable (/proc/meminfo)")
    # no limit: v2 "max" everywhere, v1's page-rounded LONG_MAX
    free = fake_host(tmp_path / "free", 5 * 1024 * 1024, "0::/a\n7:memory:/b\n", {
        "sys/fs/cgroup/a/memory.max": "max\n", "sys/fs/cgroup/memory/b/memory.limit_in_bytes": "9223372036854771712\n"})
    assert available(free)[0] == 5 * GiB
    assert available(tmp_path / "nothing") == (None, "")  # not Linux: no guard
    assert usable(100 * GiB) == 90 * GiB and usable(10 * GiB) == 8 * GiB and usable(GiB) == 0


def test_the_decision_sums_the_ranks_of_each_node_and_is_the_same_on_every_rank(monkeypatch, caplog):
    """Two ranks on one node need 5 + 5 GB of 10 GB available (8 usable): no; on two nodes: yes. Every rank gets the
    same gathered list, so every rank decides the same; the main process says why, once. A rank's failure is part of
    the same gather."""
    import accelerate.utils

    def decide(ranks, main=True):
        monkeypatch.setattr(accelerate.utils, "gather_object", lambda mine: ranks)
        return Guard(SimpleNamespace(num_processes=len(ranks), is_main_process=main))

    one_node = [("n1", 5 * GiB, 10 * GiB, "MemAvailable", False), ("n1", 5 * GiB, 10 * GiB, "MemAvailable", False)]
    two_nodes = [("n1", 5 * GiB, 10 * GiB, "MemAvailable", False), ("n2", 5 * GiB, 10 * GiB, "MemAvailable", False)]
    monkeypatch.setattr(host_memory, "available", lambda: (10 * GiB, "MemAvailable"))
    with caplog.at_level(logging.WARNING, logger="cpt.checkpoint"):
        guard = decide(one_node)
        assert not guard.fits(5 * GiB) and not guard.fits(5 * GiB)
        assert not decide(one_node, main=False).fits(5 * GiB)
        assert decide(two_nodes).fits(5 * GiB)
        assert decide([("n1", 0, None, "", False), ("n1", 7 * GiB, 10 * GiB, "x", False)]).fits(0)
        # a rank that failed before its host copy joins the gather all the same: every rank raises (the save is
        # skipped everywhere; no rank goes on to a synchronous, collective save alone)
        failed = [("n1", 0, None, "", True), ("n1", 5 * GiB, 10 * GiB, "x", False)]
        with pytest.raises(OSError, match="disk full"):
            decide(failed).fits(0, OSError("disk full"))
        with pytest.raises(RuntimeError, match="another rank failed"):
            decide(failed).fits(5 * GiB)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "needs 10.00 GB more host memory on n1" in lines[0] and "10.00 GB is available" in lines[0]
    assert "checkpoint.async_save: false" in lines[0] and "writing this save synchronously" in lines[0]


def test_a_save_without_host_memory_for_its_buffers_is_synchronous_and_the_same(trained, tmp_path, monkeypatch, caplog):
    from test_checkpoint_io import assert_same, read_state

    from cpt.checkpoint import CheckpointManager, list_checkpoints, verify_checkpoint
    from cpt.state import TrainState

    acc, model, _ = trained
    small, big = fake_host(tmp_path / "small", 1024), fake_host(tmp_path / "big", 100 * 1024 * 1024)
    monkeypatch.setenv("CPT_HOST_MEMORY_ROOT", str(big))
    roomy = CheckpointManager(tmp_path / "roomy", keep=3, accelerator=acc, async_save=True)
    roomy.save(1, {"train": TrainState(step=1)}, "config: 1\n")
    assert roomy._job is not None and roomy._staging  # in the background, from the kept buffers
    roomy.wait()

    monkeypatch.setenv("CPT_HOST_MEMORY_ROOT", str(small))
    tight = CheckpointManager(tmp_path / "tight", keep=3, accelerator=acc, async_save=True)
    with caplog.at_level(logging.WARNING, logger="cpt.checkpoint"):
        for step in (1, 2):
            tight.save(step, {"train": TrainState(step=step)}, "config: 1\n")
            assert tight._job is None and tight._pending_step is None and not tight._staging  # written, nothing kept
    lines = [r.getMessage() for r in caplog.records if "writing this save synchronously" in r.getMessage()]
    assert len(lines) == 1 and "GB more host memory" in lines[0] and "0.00 GB is available there (MemAvailable" in lines[0], lines
    a, b = list_checkpoints(tmp_path / "roomy")[0], list_checkpoints(tmp_path / "tight")[0]
    assert verify_checkpoint(b) is None and sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    assert_same(read_state(a), read_state(b))
    before = {k: v.clone() for k, v in acc.unwrap_model(model).state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    acc.load_state(str(b))
    assert_same(before, dict(acc.unwrap_model(model).state_dict()))

    # buffers kept from an earlier save cost nothing new: a host that is short later keeps the save in the background
    monkeypatch.setenv("CPT_HOST_MEMORY_ROOT", str(small))
    roomy.save(2, {"train": TrainState(step=2)}, "config: 1\n")
    assert roomy._job is not None
    roomy.wait()
    assert verify_checkpoint(list_checkpoints(tmp_path / "roomy")[-1]) is None


def test_deepspeeds_staging_engine_writes_a_file_now_past_its_share_of_host_memory(tmp_path, monkeypatch, caplog):
    """cpt/zero_save.py's staging engine (no DeepSpeed launch): a state dict whose new buffers exceed this rank's share
    (usable / LOCAL_WORLD_SIZE) is written at once (a view of a larger storage compacted, as DeepSpeed's clone does),
    hashed; the others staged and written by the background writer; the digests of both reported."""
    from cpt.fileio import file_digest
    from cpt.zero_save import Writes, _Staging

    flat = torch.arange(4 * MB, dtype=torch.float32)  # 16 MB; the partition a view of part of it
    states = {"a/optim.pt": {"optimizer_state_dict": {"fp32": [flat[: MB]]}, "ds_version": "x"},
              "a/model.pt": {"module": {"w": torch.ones(8)}}}
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    # 2 GiB + 6 MB available: 6 MB usable, 3 MB per local rank: the 4 MB partition does not fit, the small model does
    monkeypatch.setenv("CPT_HOST_MEMORY_ROOT", str(fake_host(tmp_path / "host", 2 * 1024 * 1024 + 6 * 1024)))
    (tmp_path / "ckpt" / "a").mkdir(parents=True)
    acc = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True)
    engine = _Staging(tmp_path / "ckpt", {}, 4, Guard(acc))
    with caplog.at_level(logging.WARNING, logger="cpt.checkpoint"):
        for rel, state in states.items():
            engine.save(state, str(tmp_path / "ckpt" / rel))
    assert engine.error is None and list(engine.written) == ["a/optim.pt"] and [r for r, _ in engine.files] == ["a/model.pt"]
    assert len(engine.buffers) == 1  # only the model's buffer
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "rank 0 (" in lines[0] and "a/optim.pt" in lines[0], lines
    assert "over LOCAL_WORLD_SIZE ranks" in lines[0] and "checkpoint.async_save: false" in lines[0]
    written = tmp_path / "ckpt" / "a" / "optim.pt"
    assert written.stat().st_size < 2 * MB * 4  # the partition alone, not the 16 MB storage it is a view of
    assert torch.equal(torch.load(written, weights_only=True)["optimizer_state_dict"]["fp32"][0], flat[: MB])
    writes = Writes(SimpleNamespace(acc=acc), tmp_path / "ckpt", 4, engine.files, engine.written)
    writes.start(background=False)
    assert writes.wait() is None and set(writes.digests) == {"a/optim.pt", "a/model.pt"}
    assert all(writes.digests[rel] == file_digest(tmp_path / "ckpt" / rel) for rel in states)
    assert torch.equal(torch.load(tmp_path / "ckpt" / "a" / "model.pt", weights_only=True)["module"]["w"], torch.ones(8))


DDP_SCRIPT = '''
import json, os, sys
from pathlib import Path
import torch
from accelerate import Accelerator
from conftest import tiny_llama
from cpt.checkpoint import CheckpointManager, list_checkpoints, verify_checkpoint
from cpt.state import TrainState

out, small, big = map(Path, sys.argv[1:4])
acc = Accelerator(cpu=True)
assert acc.num_processes == 2
torch.manual_seed(0)
model = tiny_llama(64, hidden=16, intermediate=32, layers=1, heads=2, tied=True)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
model, opt = acc.prepare(model, opt)
seen = []
for step, host in ((1, small if acc.process_index == 0 else big), (2, big)):  # rank 0 alone short at step 1
    os.environ["CPT_HOST_MEMORY_ROOT"] = str(host)
    ckpts = CheckpointManager(out / str(step), keep=2, accelerator=acc, async_save=True)
    ckpts.save(step, {"train": TrainState(step=step)}, "config: 1\\n")
    seen.append({"background": ckpts._pending_step is not None, "kept": bool(ckpts._staging)})  # (sync: waited in save)
    ckpts.wait()
valid = [verify_checkpoint(c) is None for s in (1, 2) for c in list_checkpoints(out / str(s))]
(out / f"rank{acc.process_index}.json").write_text(json.dumps({"rank": acc.process_index, "seen": seen, "valid": valid}))
'''


def test_ddp_ranks_take_the_same_decision(tmp_path):
    """DDP on 2 CPU processes (one launch, about 15 s): rank 0 alone sees a host without room (rank 1 stages nothing
    and sees plenty): both ranks save synchronously, the checkpoint complete; with room on both, both in the background."""
    import json

    from launching import FREE_PORT, VENV_BIN, finish, rank_env, start

    script = tmp_path / "ddp_guard.py"
    script.write_text(DDP_SCRIPT)
    small, big = fake_host(tmp_path / "small", 1024), fake_host(tmp_path / "big", 100 * 1024 * 1024)
    args = [str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", *FREE_PORT, str(script), str(tmp_path / "out"),
            str(small), str(big)]
    rc, log = finish(start(args, tmp_path, rank_env(cpu=True)))
    assert rc == 0, log[-5000:]
    results = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]  # (not stdout: interleaved)
    assert [r["seen"][0]["background"] for r in results] == [False, False]  # the same decision on both ranks
    assert [r["seen"][1]["background"] for r in results] == [True, True]
    assert results[0]["seen"] == [{"background": False, "kept": False}, {"background": True, "kept": True}]
    assert results[0]["valid"] == [True, True]
    assert sum("writing this save synchronously" in line for line in log.splitlines()) == 1, log[-5000:]
