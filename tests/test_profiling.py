"""train.profile (cpt/profiling.py): torch.profiler over a window of optimizer steps, written per rank under
<output_dir>/profile/; off by default, and a profiled run trains exactly like an unprofiled one."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from conftest import Echo, tiny_run_config
from launching import losses

from cpt.config import ConfigError, ProfileConfig, load_config
from cpt.profiling import StepProfiler


def _trace_names(path) -> set[str]:
    with gzip.open(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    return {e.get("name", "") for e in events}


def _work():
    a = torch.randn(64, 64)
    return (a @ a).sum()


def test_window_is_recorded_and_stops_after_its_steps(tmp_path):
    say = Echo()
    prof = StepProfiler(ProfileConfig(start_step=2, steps=2), tmp_path, rank=0, device_type="cpu", say=say)
    with prof:
        for done in range(6):  # the loop: at() at the top of each step, then the step
            prof.at(done)
            _work()
        prof.close(6)
    out = tmp_path / "profile" / "steps_00000002-00000003"
    assert sorted(p.name for p in (tmp_path / "profile").iterdir()) == ["steps_00000002-00000003"]
    assert sorted(p.name for p in out.iterdir()) == ["rank0.ops.txt", "rank0.trace.json.gz"]
    assert "aten::mm" in _trace_names(out / "rank0.trace.json.gz")
    table = (out / "rank0.ops.txt").read_text()
    assert table.startswith("# steps 2..3, rank 0, sorted by self_cpu_time_total") and "aten::mm" in table
    assert any("profile: steps 2..3 written to" in line for line in say)


def test_run_ending_inside_the_window_writes_what_it_recorded(tmp_path):
    prof = StepProfiler(ProfileConfig(start_step=3, steps=10), tmp_path, rank=0, device_type="cpu", say=Echo())
    for done in range(4):
        prof.at(done)
        _work()
    prof.close(4)
    assert (tmp_path / "profile" / "steps_00000003-00000004" / "rank0.trace.json.gz").is_file()


def test_error_inside_the_window_still_writes_the_recording(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with StepProfiler(ProfileConfig(start_step=1, steps=5), tmp_path, rank=0, device_type="cpu", say=Echo()) as prof:
            prof.at(0)
            _work()
            prof.at(1)
            raise RuntimeError("boom")
    assert (tmp_path / "profile" / "steps_00000001-00000001" / "rank0.ops.txt").is_file()


@pytest.mark.parametrize("first_seen, total, expected", [
    (0, 4, "nothing was profiled: it ended before step 6"),
    (7, 9, "nothing was profiled: it resumed at step 7, past step 6"),
])
def test_a_missed_window_is_said(tmp_path, first_seen, total, expected):
    say = Echo()
    prof = StepProfiler(ProfileConfig(start_step=6), tmp_path, rank=0, device_type="cpu", say=say)
    for done in range(first_seen, total):
        prof.at(done)
    prof.close(total)
    assert not (tmp_path / "profile").exists()
    assert say == ["train.profile: " + expected.removeprefix("train.profile: ")]


def test_only_the_chosen_ranks_record(tmp_path):
    for rank, ranks, records in ((1, [0], False), (1, [0, 1], True), (3, "all", True)):
        out = tmp_path / f"{rank}-{ranks}"
        prof = StepProfiler(ProfileConfig(start_step=1, steps=1, ranks=ranks), out, rank=rank, device_type="cpu", say=Echo())
        for done in range(3):
            prof.at(done)
        prof.close(3)
        assert (out / "profile" / "steps_00000001-00000001" / f"rank{rank}.trace.json.gz").is_file() == records


def test_profile_config_from_overrides_and_errors(tiny_cpt_data, tmp_path):
    base = tiny_run_config(tiny_cpt_data, tmp_path / "run")
    assert load_config(base=base).train.profile is None  # off by default
    cfg = load_config(base=base, overrides=["train.profile.start_step=3", "train.profile.ranks=all"])
    assert (cfg.train.profile.start_step, cfg.train.profile.steps, cfg.train.profile.ranks) == (3, 2, "all")
    with pytest.raises(ConfigError, match=r"train\.profile\.steps"):
        load_config(base=base, overrides=["train.profile.steps=0"])


def test_profiled_training_run_trains_like_an_unprofiled_one(tiny_cpt_data, tmp_path):
    from cpt.train import train

    runs = {}
    for name, profile in (("plain", None), ("profiled", {"start_step": 2, "steps": 2, "memory": True})):
        cfg = tiny_run_config(tiny_cpt_data, tmp_path / name, eval={"at_start": False}, checkpoint={"every": None})
        cfg["stages"][0]["steps"] = 5
        cfg["data"]["heldout"] = []
        cfg["train"]["profile"] = profile
        say = Echo()
        train(load_config(base=cfg), echo=say)
        runs[name] = losses(tmp_path / name)
    assert runs["plain"] == runs["profiled"] and len(runs["plain"]) == 5
    out = tmp_path / "profiled" / "profile" / "steps_00000002-00000003"
    names = _trace_names(out / "rank0.trace.json.gz")
    assert "aten::mm" in names or "aten::addmm" in names
    assert "CPU Mem" in (out / "rank0.ops.txt").read_text()  # memory: allocations in the table
    assert not (tmp_path / "plain" / "profile").exists()
