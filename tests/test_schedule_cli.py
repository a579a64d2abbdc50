"""`cpt schedule`: the boundary table, the PNG, overrides, anneal branches, errors; the example configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from cpt.cli import main
from cpt.commands.schedule import format_tokens, plot_plan
from cpt.schedules import LRPlan, ScheduleConfig

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_config(tmp_path: Path, stages: list[dict], **extra) -> Path:
    cfg = {
        "run": {"name": "t", "output_dir": str(tmp_path / "run")},
        "model": {"arch": {"model_type": "llama", "hidden_size": 32}, "tokenizer": str(tmp_path / "no-tokenizer")},
        # the data does not exist: `cpt schedule` must only read the config
        "data": {"seq_len": 64, "sources": [{"name": "a", "path": str(tmp_path / "missing" / "a")}]},
        "stages": stages,
        "train": {"global_batch_size": 8, "micro_batch_size": 4},
        **extra,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def rows(out: str) -> list[tuple[str, int, str, float, str]]:
    """Parse the table: (stage, step, tokens, lr, phase)."""
    found = []
    for line in out.splitlines():
        m = re.match(r"^(\d+ \S+)\s+(\d+)\s+(\S+)\s+([0-9.e+-]+)\s+(.+)$", line)
        if m:
            found.append((m[1], int(m[2]), m[3], float(m[4]), m[5].strip()))
    return found


REWARM = [
    {"name": "one", "steps": 100, "mix": {"a": 1.0},
     "schedule": {"type": "cosine", "max_lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10}},
    {"name": "two", "steps": 50, "mix": {"a": 1.0},
     "schedule": {"type": "linear", "max_lr": 5e-4, "min_lr": 0.0, "warmup_steps": 5, "warmup_from": "previous"}},
]


def test_table_and_png(tmp_path, capsys):
    cfg = write_config(tmp_path, REWARM)
    out_png = tmp_path / "plot" / "lr.png"
    assert main(["schedule", str(cfg), "--out", str(out_png)]) == 0
    out = capsys.readouterr().out
    assert out_png.read_bytes()[:8] == PNG_MAGIC and out_png.stat().st_size > 10_000
    assert "2 stages, 150 steps, 76.8K tokens (512 tokens per step)" in out
    table = rows(out)
    assert [(r[0], r[1], r[4]) for r in table] == [
        ("0 one", 0, "warmup begins"), ("0 one", 9, "warmup ends"),
        ("0 one", 10, "cosine decay begins"), ("0 one", 99, "cosine decay ends"),
        ("1 two", 100, "warmup begins"), ("1 two", 104, "warmup ends"),
        ("1 two", 105, "linear decay begins"), ("1 two", 149, "linear decay ends"),
    ]
    lrs = {r[1]: r[3] for r in table}
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) and lrs[99] == pytest.approx(1e-4)
    assert lrs[100] == pytest.approx(1e-4 + (5e-4 - 1e-4) / 5, rel=1e-3)  # re-warm from the previous final LR
    assert lrs[149] == 0.0
    assert {r[1]: r[2] for r in table}[100] == "51.2K"  # tokens = step * 8 * 64
    assert f"wrote {out_png}" in out


def test_default_output_and_overrides(tmp_path, capsys):
    cfg = write_config(tmp_path, REWARM)
    assert main(["schedule", str(cfg), "--set", "stages.0.schedule.warmup_steps=20", "--set", "stages.1.steps=30"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "run" / "schedule.png").read_bytes()[:8] == PNG_MAGIC
    table = rows(out)
    assert ("0 one", 19, "warmup ends") in [(r[0], r[1], r[4]) for r in table]
    assert table[-1][1] == 129


def test_anneal_branch_is_printed_and_plotted(tmp_path, capsys):
    stages = [{"name": "trunk", "steps": 300, "mix": {"a": 1.0},
               "schedule": {"type": "infinite", "max_lr": 1e-3, "constant_lr": 3e-4, "min_lr": 3e-5,
                            "warmup_steps": 10, "cooldown_steps": 90}}]
    cfg = write_config(tmp_path, stages)
    png = tmp_path / "b.png"
    assert main(["schedule", str(cfg), "--out", str(png), "--anneal-from", "200", "--anneal-steps", "40",
                 "--anneal-shape", "exponential"]) == 0
    out = capsys.readouterr().out
    branch = out.split("anneal branch from step 200 (40 steps):")[1]
    b = rows(branch)
    assert [(r[1], r[4]) for r in b] == [(200, "anneal branch (exponential) begins"), (239, "anneal branch (exponential) ends")]
    assert b[0][3] == pytest.approx(3e-4 * 0.1 ** (1 / 40), rel=1e-3) and b[1][3] == pytest.approx(3e-5)
    assert png.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    "args, stages, message",
    [
        (["--anneal-from", "50", "--anneal-steps", "10"], REWARM, "not in a constant or stable phase"),
        (["--anneal-from", "50"], REWARM, "--anneal-from needs --anneal-steps"),
        (["--anneal-steps", "10"], REWARM, "--anneal-steps needs --anneal-from"),
        (["--set", "stages.0.schedule.warmup_steps=500"], REWARM, "stages.0.schedule.warmup_steps: 500"),
        (["--set", "stages.1.schedule.min_lr=1.0"], REWARM, "stages.1.schedule: min_lr (1) must not exceed max_lr"),
    ],
)
def test_errors_exit_2_with_the_field(tmp_path, capsys, args, stages, message):
    cfg = write_config(tmp_path, stages)
    assert main(["schedule", str(cfg), "--no-plot", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "schedule.png").exists()


def test_anneal_steps_0_is_refused_as_such(tmp_path, capsys):
    """`--anneal-steps 0` was taken for a missing option: "--anneal-from needs --anneal-steps N"."""
    cfg = write_config(tmp_path, REWARM)
    with pytest.raises(SystemExit) as e:
        main(["schedule", str(cfg), "--no-plot", "--anneal-from", "50", "--anneal-steps", "0"])
    assert e.value.code == 2 and "argument --anneal-steps: '0': give a whole number >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["rewarm_cosine", "wsd", "infinite"])
def test_example_configs(name, tmp_path, capsys):
    path = ROOT / "configs" / "schedules" / f"{name}.yaml"
    png = tmp_path / f"{name}.png"
    assert main(["schedule", str(path), "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert png.read_bytes()[:8] == PNG_MAGIC
    labels = [r[4] for r in rows(out)]
    expected = {
        "rewarm_cosine": ["warmup begins", "warmup ends", "cosine decay begins", "cosine decay ends"] * 2,
        "wsd": ["warmup begins", "warmup ends", "stable begins", "stable ends", "decay (1-sqrt) begins", "decay (1-sqrt) ends"],
        "infinite": ["warmup begins", "warmup ends", "cooldown (cosine) begins", "cooldown (cosine) ends", "constant begins",
                     "constant ends", "constant (trunk continues) begins", "constant (trunk continues) ends"],
    }[name]
    assert labels == expected


def test_plot_plan_library_function(tmp_path):
    plan = LRPlan([(200, ScheduleConfig(type="wsd", max_lr=1e-3, warmup_steps=10, decay_steps=40))])
    path = plot_plan(plan, tmp_path / "deep" / "x.png", tokens_per_step=4096, stage_names=["only"],
                     branches=[plan.anneal_branch(100, 30, "linear")], title="t")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_format_tokens():
    assert [format_tokens(n) for n in (0, 999, 1000, 51_200, 2_500_000, 3e9, 1.2e12)] == \
        ["0", "999", "1K", "51.2K", "2.5M", "3B", "1.2T"]


def test_a_plot_that_cannot_be_written_is_one_line(tmp_path, capsys):
    """A file where the plot's folder should be (or no permission, a full disk) ended in mkdir's traceback."""
    cfg = write_config(tmp_path, REWARM)
    (tmp_path / "file").write_text("x")
    assert main(["schedule", str(cfg), "--out", str(tmp_path / "file" / "lr.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"cpt schedule: error: cannot write the plot {tmp_path / 'file' / 'lr.png'}: ") and \
        err.count("\n") == 1, err
