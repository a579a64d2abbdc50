"""`cpt report` on two synthetic runs: PNGs and a self-contained HTML page with the right numbers."""

import base64
import json
import re
from pathlib import Path

import pytest

from cpt.commands.report import main as report_main
from cpt.report import heldout_groups, heldout_summary, load_run, write_report


def write_run(run_dir: Path, bump: float, tokens_per_step: int):
    """Two stages (switch at step 10); upstream loss rises after the switch then recovers partly."""
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(0, 21):
            tokens = step * tokens_per_step
            stage = 0 if step < 10 else 1
            rec = {"step": step, "train/tokens": tokens, "stage": stage, "train/loss": 5.0 - 0.1 * step,
                   "train/lr": 1e-4 if step < 10 else 3e-4, **({"perf/tokens_per_s": 1000.0 + 2 * step} if step else {}),
                   "data/share/new": 0.0 if stage == 0 else 0.9, "data/share/old": 1.0 if stage == 0 else 0.1,
                   "data/realised_share/new": 0.9 * max(0, step - 9) / (step + 1),
                   "train/loss/old": 4.0 + 0.01 * step}
            f.write(json.dumps(rec) + "\n")
            if step % 5 == 0 or 10 <= step <= 13:
                up = 3.0 + (bump if step == 12 else 0.0) + 0.01 * step
                down = 6.0 - 0.1 * step
                f.write(json.dumps({"step": step, "train/tokens": tokens, "eval/old/loss": up,
                                    "forgetting/old": up - 3.0, "eval/new/loss": down,
                                    "adaptation/new": 6.0 - down}) + "\n")
        f.write(json.dumps({"step": 20, "train/tokens": 20 * tokens_per_step, "lm_eval/cpt_arith_mc/acc": 0.25 + bump}) + "\n")
        f.write(json.dumps({"step": 20, "train/tokens": 20 * tokens_per_step, "compute/flops": 1.5e15 * tokens_per_step,
                            "compute/device_hours": 0.02 * tokens_per_step, "compute/wall_hours": 0.005 * tokens_per_step}) + "\n")
        f.write('{"step": 21, "train/tok')  # a torn last line (killed mid-write) is skipped


def test_report_renders_two_runs(tmp_path):
    write_run(tmp_path / "replay5", bump=0.5, tokens_per_step=100)
    write_run(tmp_path / "replay25", bump=0.2, tokens_per_step=200)
    out = tmp_path / "rep"
    assert report_main([str(tmp_path / "replay5"), str(tmp_path / "replay25"), "--out", str(out)]) == 0
    page = out / "report.html"
    for name in ("upstream", "downstream", "train_loss", "train_loss_by_source", "lr", "data_shares", "realised_shares",
                 "throughput", "lm_eval"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    text = page.read_text()
    # self-contained: every image is embedded, nothing is linked
    imgs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
    assert len(imgs) == 9 and all(base64.b64decode(i)[:4] == b"\x89PNG" for i in imgs)
    assert "src='http" not in text and ".png'" not in text
    headings = re.findall(r"<h3>([^<]+)</h3><img", text)  # each plot under a title, not its file name
    assert len(headings) == 9 and "Realised data shares (cumulative)" in headings and "realised_shares" not in headings

    # the table: step 0, final, worst (the bump after the switch at step 12) per set, per run
    rows = {r["name"]: r for r in heldout_summary(load_run(tmp_path / "replay5"))}
    old, new = rows["old"], rows["new"]
    assert old["tag"] == "upstream" and new["tag"] == "downstream"
    assert old["step0"] == pytest.approx(3.0) and old["final"] == pytest.approx(3.2)
    assert (old["worst"], old["worst_step"], old["worst_tokens"]) == (pytest.approx(3.62), 12, 1200)
    assert old["change"] == pytest.approx(0.2) and old["max_forgetting"] == pytest.approx(0.62)
    assert new["change"] == pytest.approx(2.0) and new["final"] == pytest.approx(4.0)
    for cell in ("3.0000", "3.2000", "3.6200", "forgetting +0.2000", "adaptation +2.0000", "+0.6200",
                 "12 (1.2e+03 tok)", "3.3200", "+0.3200", "12 (2.4e+03 tok)", "replay5", "replay25"):
        assert cell in text, cell
    # compute next to quality, per run
    for cell in ("training FLOPs: 1.5e+17", "device-hours: 2;", "wall hours: 0.5</p>",
                 "training FLOPs: 3e+17", "device-hours: 4;", "wall hours: 1</p>", "median tokens/s: 1,021"):  # (20 values: the mean of the middle two)
        assert cell in text, cell
    assert "cpt_arith_mc/acc" in text and "0.7500" in text and "0.4500" in text


def test_a_set_added_on_a_resume_shows_its_own_reference_step(tmp_path):
    """A held-out set added to a run on a resume (with a stage mixing in a new source) is first evaluated at step 15:
    its reference cell says so instead of passing that loss off as the base model's (`step 0`)."""
    run = tmp_path / "grown"
    run.mkdir()
    recs = [{"step": s, "train/tokens": 10 * s, "eval/old/loss": 3.0 + s / 100, "forgetting/old": s / 100} for s in (0, 10, 20)]
    recs += [{"step": s, "train/tokens": 10 * s, "eval/newer/loss": 5.0 - (s - 15) / 10, "adaptation/newer": (s - 15) / 10}
             for s in (15, 20)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sorted(recs, key=lambda r: r["step"])))
    text = write_report([run], tmp_path / "rep").read_text()
    assert "<td>4.5000</td>" in text and "<td>5.0000 (step 15)</td>" in text and "<td>3.0000</td>" in text


def test_stage_switches_and_missing_runs(tmp_path):
    write_run(tmp_path / "a", bump=0.1, tokens_per_step=50)
    assert load_run(tmp_path / "a").stage_switches() == [500.0]
    assert report_main([str(tmp_path / "nope")]) == 2
    page = write_report([tmp_path / "a"])  # default output folder: <run>/report
    assert page == tmp_path / "a" / "report" / "report.html" and page.exists()


def test_a_stage_switch_is_drawn_where_the_stage_starts_not_where_it_is_first_logged(tmp_path):
    """Stages of 8, 2 and 6 steps, 512 tokens a step, a training record every 5 steps (train.log_every) and dense
    evaluations: the switch lines were drawn where the logged stage index changed (step 10: 2 steps late, the
    stability gap's evaluations at steps 8 and 9 drawn before it) and the 2-step stage's start never; they are at the
    stages' first tokens now (steps 8 and 10), read from the run's config.yaml. Without it: the logged changes."""
    import yaml

    run = tmp_path / "run"
    run.mkdir()
    stage_of = lambda step: 0 if step <= 8 else 1 if step <= 10 else 2  # noqa: E731 (a record's stage: its last update's)
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(0, 17):
            if step % 5 == 0 or step == 16:
                f.write(json.dumps({"step": step, "train/tokens": 512 * step, "stage": stage_of(step), "train/loss": 5.0}) + "\n")
            if step in (0, 9, 10, 16):  # (step 8: interpolated between the records at 5 and 9)
                f.write(json.dumps({"step": step, "train/tokens": 512 * step, "eval/old/loss": 3.0}) + "\n")
    assert load_run(run).stage_switches() == [512.0 * 10, 512.0 * 15]  # (no config: where the index changed)
    (run / "config.yaml").write_text(yaml.safe_dump({"stages": [{"name": "a", "steps": 8}, {"name": "b", "steps": 2},
                                                                 {"name": "c", "steps": 6}]}))
    assert load_run(run).stage_switches() == [512.0 * 8, 512.0 * 10]
    (run / "config.yaml").write_text("stages: [unreadable")
    assert load_run(run).stage_switches() == [512.0 * 10, 512.0 * 15]


def test_a_report_rewritten_into_its_folder_leaves_no_plot_of_the_earlier_one(tmp_path, capsys):
    """Re-running `cpt report` into the same folder for runs without lm-eval (or per-source losses) removed nothing:
    the earlier lm_eval.png stayed beside the new plots and the command listed it as written."""
    write_run(tmp_path / "a", bump=0.1, tokens_per_step=50)
    assert report_main([str(tmp_path / "a"), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "lm_eval.png").exists()
    lines = [line for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines() if "lm_eval" not in line]
    (tmp_path / "a" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert report_main([str(tmp_path / "a"), "--out", str(tmp_path / "rep")]) == 0
    assert not (tmp_path / "rep" / "lm_eval.png").exists() and "lm_eval.png" not in capsys.readouterr().out
    assert (tmp_path / "rep" / "upstream.png").exists()


def test_a_set_is_drawn_where_its_run_tags_it(tmp_path):
    """Two runs in opposite directions (old -> new, new -> old): each set's curve of a run goes to the plot of the
    tag it has in that run. The upstream plot drew every run's curve of a set some run tagged upstream."""
    for name, old, new in (("ab", "a", "b"), ("ba", "b", "a")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(
            {"step": s, "train/tokens": 10 * s, f"eval/{old}/loss": 3.0 + s, f"forgetting/{old}": float(s),
             f"eval/{new}/loss": 5.0 - s, f"adaptation/{new}": float(s)}) + "\n" for s in range(3)))
    runs = [load_run(tmp_path / "ab"), load_run(tmp_path / "ba")]
    up = {name: [(r.label, key) for r, key, _ in members] for name, members in heldout_groups(runs, "upstream")}
    assert up == {"a": [("ab", "eval/a/loss")], "b": [("ba", "eval/b/loss")]}


def test_lines_that_are_not_records_and_an_out_that_is_a_file(tmp_path, capsys):
    """A metrics.jsonl line that is JSON but not a record (another program's `[...]` or `3` appended to it) is skipped
    like a torn line (was AttributeError: 'list' object has no attribute 'keys'); --out naming a file is one line
    (was a FileExistsError traceback)."""
    write_run(tmp_path / "a", bump=0.1, tokens_per_step=50)
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "a" / "metrics.jsonl").write_text("\n".join(lines[:3] + ["[1, 2]", "3", '"x"'] + lines[3:]) + "\n")
    assert report_main([str(tmp_path / "a"), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.html").is_file()
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert report_main([str(tmp_path / "a"), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.strip() == f"cpt report: --out {out}: {tmp_path / 'file'} is a file, not a folder", err


def test_the_text_samples_first_and_last_per_prompt(tmp_path):
    """eval.samples: the report shows each prompt's continuation at the first and the last evaluation (escaped), and
    the EMA weights' at the last in a column of its own."""
    write_run(tmp_path / "run", bump=0.5, tokens_per_step=100)
    with open(tmp_path / "run" / "samples.jsonl", "w") as f:
        for step in (0, 10, 20):
            for p in ("ROMEO:", "def f(x):"):
                f.write(json.dumps({"step": step, "prompt": p, "completion": f"<{p} at {step}>", "new_tokens": 4}) + "\n")
    text = write_report([tmp_path / "run"]).read_text()
    for cell in ("step 0</th>", "step 20</th>", "&lt;ROMEO: at 0&gt;", "&lt;def f(x): at 20&gt;"):
        assert cell in text, cell
    assert "at 10&gt;" not in text and "<ROMEO:" not in text and "EMA" not in text

    # eval.ema: the EMA weights' rows (after each evaluation's live rows) are a column of their own, not the live text
    with open(tmp_path / "run" / "samples.jsonl", "a") as f:
        for p in ("ROMEO:", "def f(x):"):
            f.write(json.dumps({"step": 20, "prompt": p, "completion": f"<{p} ema>", "new_tokens": 4, "weights": "ema"}) + "\n")
    text = write_report([tmp_path / "run"]).read_text()
    for cell in ("step 20, EMA</th>", "&lt;ROMEO: ema&gt;", "&lt;def f(x): at 20&gt;", "&lt;ROMEO: at 20&gt;"):
        assert cell in text, cell


def test_an_empty_log_and_the_benchmark_verdict_are_valid_html(tmp_path):
    """A run with no record yet said "steps: None; tokens: None"; the benchmark table's verdict "noise (< 2 se)" was
    written with a raw `<`."""
    from cpt.report import _benchmark_table

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert report_main([str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "report.html").read_text()
    assert "<p>no step logged yet</p>" in text and "None" not in text
    row = {"task": "t", "metric": "acc", "tag": "upstream", "step0": 0.5, "step0_stderr": 0.01, "final": 0.49,
           "final_stderr": 0.01, "change": 0.01, "change_stderr": 0.014, "worst": 0.49, "worst_step": 3, "noise": True}
    table = _benchmark_table([row])
    assert "<td>noise (&lt; 2 se)</td>" in table and "(< 2" not in table
