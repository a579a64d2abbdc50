"""`cpt experiment`: the replay x schedule grid against a re-training baseline, end to end on CPU.

One shrunken copy of configs/experiments/tiny_cpu.yaml runs once per module (8 runs); the tests then
check what must hold at any scale (every row, forgetting 0 at step 0, the baseline's token count,
FLOPs accounting), that a second call skips everything without touching a run directory, that a
killed run resumes from its checkpoint to the same result, and that a changed spec is refused.
"""

from __future__ import annotations

import csv
import math
import shutil
import time
from pathlib import Path

import pytest
import yaml

from conftest import Echo, tiny_experiment_spec
from cpt.experiment import ExperimentError, load_spec, run_experiment
from cpt.experiment.grid import cpt_run_name, plan_runs, replay_label
from cpt.experiment.plan import cosine_schedule, infinite_schedule, run_configs
from cpt.experiment.spec import LRSpec
from cpt.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "experiments" / "tiny_cpu.yaml"
GPU = ROOT / "configs" / "experiments" / "gpu_h100.yaml"

TOKENS_PER_STEP = 8 * 64
BASE_TOKENS = 40 * TOKENS_PER_STEP
CPT_TOKENS = 20 * TOKENS_PER_STEP
SMALL = [
    "seq_len=64", f"base_tokens={BASE_TOKENS}", f"cpt_tokens={CPT_TOKENS}",
    "corpus_a.max_mb=0.3", "corpus_b.max_mb=0.3", "tokenizer.train.vocab_size=512", "tokenizer.train.sample_mb=0.3",
    "eval.tokens_per_set=2048", "eval.evals_per_run=4", "checkpoints_per_run=2", "progress_bar=false",
]
GRID_CPT_RUNS = [cpt_run_name(s, r) for s in ("rewarm_cosine", "infinite") for r in (0.0, 0.05, 0.25)]
GRID_RUNS = ["base", *GRID_CPT_RUNS, "baseline-scratch"]  # the grid without variants
MER = "cpt-infinite-replay25-mer"  # the shipped specs' variant
CPT_RUNS = GRID_CPT_RUNS + [MER]
ALL_RUNS = ["base", *CPT_RUNS, "baseline-scratch"]


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "results.csv") as f:
        return {r["run"]: r for r in csv.DictReader(f)}


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def _eval_at(run_dir: Path, key: str, step: int) -> float:
    vals = [r[key] for r in read_metrics(run_dir) if r.get("step") == step and key in r]
    assert vals, f"{run_dir.name}: no {key} at step {step}"
    return vals[-1]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment")
    echo = Echo()
    t0 = time.perf_counter()
    md = run_experiment(TINY, out, echo=echo, overrides=SMALL)
    return {"out": out, "md": md, "echo": echo, "seconds": time.perf_counter() - t0,
            "spec": load_spec(TINY, SMALL)}


# ---------------------------------------------------------------- the grid


def test_every_row_present(grid):
    out = grid["out"]
    rows = _rows(out)
    assert list(rows) == ALL_RUNS
    md = grid["md"].read_text()
    for name in ALL_RUNS:
        assert f"| {name} |" in md
        assert (out / "runs" / name / "export" / "config.json").is_file()
    assert rows["cpt-infinite-replay25"]["replay"] == "0.25" and rows["cpt-infinite-replay25"]["schedule"] == "infinite"
    assert rows["cpt-rewarm_cosine-replay0"]["replay"] == "0.0"
    for name in ALL_RUNS:  # every loss column is filled
        for col in ("upstream_final", "downstream_final", "mean_final"):
            assert math.isfinite(float(rows[name][col]))
    for name in CPT_RUNS:
        assert float(rows[name]["worst_upstream"]) >= float(rows[name]["upstream_step0"])
    assert (out / "curves.png").stat().st_size > 0
    assert (out / "report" / "report.html").is_file() and (out / "report" / "upstream.png").is_file()
    assert "9 trained, 0 resumed, 0 skipped" in grid["echo"].text
    # the MER variant: same data and schedule as its twin, a different curve after the first meta-update
    twin = {r["step"]: r["train/loss"] for r in read_metrics(out / "runs" / "cpt-infinite-replay25") if "train/loss" in r}
    mer = {r["step"]: r["train/loss"] for r in read_metrics(out / "runs" / MER) if "train/loss" in r}
    assert mer[5] != twin[5] and rows[MER]["replay"] == "0.25" and rows[MER]["schedule"] == "infinite"
    assert f"- Variant `{MER}` against `cpt-infinite-replay25`: forgetting" in md
    assert "25% +" in md and md.count("forgetting by replay share") == 2


def test_forgetting_zero_at_step_zero_and_cpt_starts_from_base(grid):
    runs = grid["out"] / "runs"
    base_up = _eval_at(runs / "base", "eval/shakespeare/loss", 40)
    base_down = _eval_at(runs / "base", "eval/python/loss", 40)
    rows = _rows(grid["out"])
    for name in CPT_RUNS:
        assert _eval_at(runs / name, "forgetting/shakespeare", 0) == 0.0
        assert _eval_at(runs / name, "adaptation/python", 0) == 0.0
        assert _eval_at(runs / name, "train/tokens", 0) == 0
        # step 0 of every CPT run is the base model: its losses are the base run's final ones (fp32, CPU)
        assert _eval_at(runs / name, "eval/shakespeare/loss", 0) == pytest.approx(base_up, abs=1e-5)
        assert _eval_at(runs / name, "eval/python/loss", 0) == pytest.approx(base_down, abs=1e-5)
        r = rows[name]
        assert float(r["forgetting_vs_base"]) == pytest.approx(float(r["upstream_final"]) - float(r["upstream_step0"]))
        assert float(r["adaptation_vs_base"]) == pytest.approx(float(r["downstream_step0"]) - float(r["downstream_final"]))
    # the baseline is compared with the base model's final losses
    b = rows["baseline-scratch"]
    assert float(b["forgetting_vs_base"]) == pytest.approx(float(b["upstream_final"]) - base_up, abs=1e-6)
    # replay reduces forgetting even at this size, for both schedules
    for sched in ("rewarm_cosine", "infinite"):
        f = [float(rows[cpt_run_name(sched, r)]["forgetting_vs_base"]) for r in (0.0, 0.25)]
        assert f[1] < f[0]


def test_token_counts(grid):
    runs = grid["out"] / "runs"
    rows = _rows(grid["out"])
    last = read_metrics(runs / "baseline-scratch")[-1]
    assert last["train/tokens"] == BASE_TOKENS + CPT_TOKENS
    final = [r for r in read_metrics(runs / "baseline-scratch") if "data/tokens/shakespeare" in r][-1]
    assert final["data/tokens/shakespeare"] + final["data/tokens/python"] == BASE_TOKENS + CPT_TOKENS
    assert final["data/tokens/shakespeare"] == 2 * final["data/tokens/python"]  # budget mix = 2:1
    assert int(rows["baseline-scratch"]["tokens"]) == BASE_TOKENS + CPT_TOKENS
    assert int(rows["base"]["tokens"]) == BASE_TOKENS
    for name in CPT_RUNS:
        assert int(rows[name]["tokens"]) == CPT_TOKENS
        assert int(rows[name]["tokens_incl_base"]) == BASE_TOKENS + CPT_TOKENS
        assert read_metrics(runs / name)[-1]["train/tokens"] == CPT_TOKENS
    replay = [r for r in read_metrics(runs / "cpt-infinite-replay25") if "data/tokens/shakespeare" in r][-1]
    assert replay["data/tokens/shakespeare"] == CPT_TOKENS // 4  # exact replay share


def test_flops_consistent(grid):
    from transformers import AutoModelForCausalLM

    from cpt.throughput import model_flops_per_token
    from cpt.model import model_shape

    rows = _rows(grid["out"])
    shape = model_shape(AutoModelForCausalLM.from_pretrained(grid["out"] / "runs" / "base" / "export"))
    fpt = model_flops_per_token(shape["n_params"], shape["n_layers"], shape["hidden"], 64)
    base_flops = float(rows["base"]["flops"])
    for name, r in rows.items():
        assert float(r["flops"]) == pytest.approx(int(r["tokens"]) * fpt, rel=1e-9)
        extra = base_flops if r["kind"] == "cpt" else 0.0
        assert float(r["flops_incl_base"]) == pytest.approx(float(r["flops"]) + extra, rel=1e-9)
    # base + CPT used exactly the baseline's compute
    assert float(rows["baseline-scratch"]["flops"]) == pytest.approx(float(rows["cpt-infinite-replay0"]["flops_incl_base"]))
    # and the training loop's own accounting agrees (perf/tflops_per_device = tokens/s x FLOPs/token)
    rec = [r for r in read_metrics(grid["out"] / "runs" / "base") if r.get("perf/tflops_per_device")][-1]
    assert rec["perf/tflops_per_device"] * 1e12 / rec["perf/tokens_per_s_per_device"] == pytest.approx(fpt, rel=1e-6)
    # the loop's cumulative compute/flops ends at the table's FLOPs; device-hours are the run's measured time
    last = [r for r in read_metrics(grid["out"] / "runs" / "base") if "compute/flops" in r][-1]
    assert last["compute/flops"] == pytest.approx(base_flops, rel=1e-6)
    for r in rows.values():
        assert float(r["device_hours"]) > 0, r


def test_schedules_in_the_runs(grid):
    runs = grid["out"] / "runs"
    cfg = yaml.safe_load((runs / "cpt-infinite-replay5" / "config.yaml").read_text())
    sched = cfg["stages"][0]["schedule"]
    assert sched["type"] == "infinite" and sched["anneal_steps"] == 4  # the last 20% of 20 steps
    assert cfg["train"]["init_from"].endswith("base/export")
    assert cfg["stages"][0]["mix"] == {"python": 0.95, "shakespeare": 0.05}
    cfg = yaml.safe_load((runs / "cpt-rewarm_cosine-replay0" / "config.yaml").read_text())
    assert cfg["stages"][0]["schedule"]["type"] == "cosine" and cfg["stages"][0]["schedule"]["warmup_from"] == 0.0
    assert [s["name"] for s in cfg["data"]["sources"]] == ["python"]
    lrs = [r["train/lr"] for r in read_metrics(runs / "cpt-infinite-replay0") if "train/lr" in r and r["step"] > 0]
    assert lrs[-1] == pytest.approx(3e-4, rel=1e-6)  # annealed to min_lr
    cfg = yaml.safe_load((runs / "baseline-scratch" / "config.yaml").read_text())
    assert cfg["train"]["init_from"] is None


# ---------------------------------------------------------------- skip, resume, refuse


def test_rerun_skips_finished_runs(grid, monkeypatch):
    """The same folder under another spelling of its path (relative, ./x/: it was refused as "a tokenizer trained for
    a different spec", the experiment's files name paths under it) is the same experiment."""
    out = grid["out"]
    before = _mtimes(out / "runs")
    echo = Echo()
    t0 = time.perf_counter()
    monkeypatch.chdir(out.parent)
    run_experiment(TINY, f"./{out.name}/", echo=echo, overrides=SMALL)
    seconds = time.perf_counter() - t0
    assert "0 trained, 0 resumed, 9 skipped" in echo.text
    assert _mtimes(out / "runs") == before  # no run directory touched
    assert seconds < grid["seconds"] / 2


def test_killed_run_resumes_to_the_same_result(grid):
    out = grid["out"]
    run = out / "runs" / "cpt-infinite-replay5"
    before = _rows(out)[run.name]
    ckpts = sorted((run / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step_00000010", "step_00000020"]
    # a kill after step 10's checkpoint: the later checkpoint and the export never happened
    shutil.rmtree(ckpts[-1])
    shutil.rmtree(run / "export")
    others = {p: (p / "export" / "config.json").stat().st_mtime_ns for p in (out / "runs").iterdir() if p != run}
    echo = Echo()
    run_experiment(TINY, out, echo=echo, overrides=SMALL)
    assert "0 trained, 1 resumed, 8 skipped" in echo.text
    assert "resuming from" in echo.text and "step_00000010" in echo.text
    after = _rows(out)[run.name]
    for col in ("upstream_final", "downstream_final", "worst_upstream", "tokens"):
        assert float(after[col]) == pytest.approx(float(before[col]), rel=1e-6, abs=1e-6), col
    assert {p: (p / "export" / "config.json").stat().st_mtime_ns for p in others} == others
    steps = [r["step"] for r in read_metrics(run) if "eval/shakespeare/loss" in r]
    assert steps == sorted(set(steps))  # no duplicated evaluations after the resume


def test_max_runs_then_continue(grid):
    out = grid["out"]
    shutil.rmtree(out / "runs" / "baseline-scratch")
    echo = Echo()
    run_experiment(TINY, out, echo=echo, overrides=SMALL, max_runs=0)
    assert "stopped after 0 run(s)" in echo.text
    assert "baseline-scratch" not in _rows(out)
    echo = Echo()
    run_experiment(TINY, out, echo=echo, overrides=SMALL)
    assert "1 trained, 0 resumed, 8 skipped" in echo.text
    assert list(_rows(out)) == ALL_RUNS


def test_changed_spec_is_refused(grid):
    with pytest.raises(ExperimentError, match="different config"):
        run_experiment(TINY, grid["out"], echo=Echo(), overrides=SMALL + ["cpt_lr.max_lr=0.002"])


def test_changed_config_names_the_changed_fields(tmp_path):
    """The refusal names each differing field, inside lists too (a stage's LR was the whole `stages` list dumped
    twice, hundreds of characters, instead of `stages.0.schedule.max_lr: 0.003 -> 0.002`)."""
    from cpt.config import config_to_dict
    from cpt.experiment.runner import check_same_config

    plans = plan_runs(load_spec(TINY), tmp_path, tmp_path / "tok", tmp_path / "data")
    old = run_configs(plans)["base"]
    run_dir = tmp_path / "runs" / "base"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(old), sort_keys=False))
    check_same_config(run_dir, old)  # the same config: accepted
    changed = run_configs(plan_runs(load_spec(TINY, ["base_lr.max_lr=0.002"]), tmp_path, tmp_path / "tok",
                                    tmp_path / "data"))["base"]
    with pytest.raises(ExperimentError) as e:
        check_same_config(run_dir, changed)
    message = str(e.value)
    assert "(stages.0.schedule.max_lr: 0.003 -> 0.002): the spec changed" in message, message
    assert len(message) < 300, message


# ---------------------------------------------------------------- specs, CLI, schedules (no training)


def test_specs_validate_and_plan(tmp_path):
    for path in (TINY, GPU):
        spec = load_spec(path)
        plans = plan_runs(spec, tmp_path, tmp_path / "tok", tmp_path / "data")
        cfgs = run_configs(plans)
        assert [p.name for p in plans] == ALL_RUNS
        assert cfgs["baseline-scratch"].total_steps == spec.base_steps + spec.cpt_steps
        for p in plans:
            assert p.config["checkpoint"]["every"] <= p.steps  # a killed run can resume
    gpu = load_spec(GPU)
    assert gpu.precision == "bf16" and gpu.seq_len == 1024
    assert gpu.base_tokens % gpu.tokens_per_step == 0 and gpu.cpt_tokens % gpu.tokens_per_step == 0


def test_variants_are_extra_cpt_runs_with_overrides(tmp_path):
    """spec.variants: e.g. MER (Reptile) and document masking next to the grid, same data and schedule as the
    grid run they vary, validated with the rest; bad overrides or duplicate names are spec errors."""
    variants = ('variants=[{name: mer, schedule: infinite, replay: 0.05, overrides: [train.reptile.every=4, '
                'train.reptile.epsilon=0.5]}, {name: docmask, schedule: rewarm_cosine, replay: 0.25, '
                'overrides: [data.document_masking=true]}]')
    spec = load_spec(TINY, [variants])
    plans = {p.name: p for p in plan_runs(spec, tmp_path, tmp_path / "tok", tmp_path / "data")}
    assert list(plans)[:-1] == GRID_RUNS[:-1] + ["cpt-infinite-replay5-mer", "cpt-rewarm_cosine-replay25-docmask"]
    cfgs = run_configs(list(plans.values()))
    mer, twin = cfgs["cpt-infinite-replay5-mer"], cfgs["cpt-infinite-replay5"]
    assert mer.train.reptile.every == 4 and mer.train.reptile.epsilon == 0.5 and twin.train.reptile is None
    assert mer.stages == twin.stages and mer.data.sources == twin.data.sources
    assert mer.run.output_dir.endswith("runs/cpt-infinite-replay5-mer")
    assert cfgs["cpt-rewarm_cosine-replay25-docmask"].data.document_masking is True
    assert plans["cpt-infinite-replay5-mer"].kind == "cpt" and plans["cpt-infinite-replay5-mer"].replay == 0.05
    with pytest.raises(ExperimentError, match="variants: mer"):
        plan_runs(load_spec(TINY, ['variants=[{name: mer, schedule: infinite, replay: 0.05, overrides: [nokey]}]']),
                  tmp_path, tmp_path / "tok", tmp_path / "data")
    with pytest.raises(ExperimentError, match="duplicate variant names"):
        load_spec(TINY, ['variants=[{name: a, schedule: infinite, replay: 0, overrides: [x=1]}, '
                         '{name: a, schedule: infinite, replay: 0, overrides: [x=1]}]'])


def test_spec_values_take_environment_variables(monkeypatch):
    """`${VAR}` in a spec (a corpus on $SCRATCH) is expanded as in run configs; an unset one is an ExperimentError."""
    monkeypatch.setenv("CPT_TEST_NAME", "grid7")
    assert load_spec(TINY, ["name=${CPT_TEST_NAME}-b"]).name == "grid7-b"
    monkeypatch.delenv("CPT_TEST_NAME")
    with pytest.raises(ExperimentError, match="name: environment variable CPT_TEST_NAME is not set"):
        load_spec(TINY, ["name=${CPT_TEST_NAME}"])


def test_bad_specs(tmp_path):
    with pytest.raises(ExperimentError, match="unknown field"):
        load_spec(TINY, ["replay_share=[0.1]"])
    with pytest.raises(ExperimentError, match="replay shares must be in"):
        load_spec(TINY, ["replay_shares=[0, 1.5]"])
    with pytest.raises(ExperimentError, match="must differ"):
        load_spec(TINY, ["corpus_b.name=shakespeare"])
    with pytest.raises(ExperimentError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")
    spec = load_spec(TINY, ["corpus_b.inputs=[/does/not/exist]"])
    with pytest.raises(ExperimentError, match="inputs not found"):
        run_experiment(spec, tmp_path / "x", echo=Echo())


def test_spec_yaml_and_errors_read_in_spec_file_order():
    """Both specs share most fields (SpecCommon, declared first by pydantic), yet spec.yaml and the error lines list
    the fields in the order a spec file reads in: name, the corpora, tokenizer, model, ..., unknown keys last."""
    corpora = [{"name": n, "inputs": ["/nonexistent"]} for n in "abc"]
    pair = load_spec(tiny_experiment_spec(corpora[:2], sequence=False))
    seq = load_spec(tiny_experiment_spec(corpora))
    for spec, own in ((pair, ["corpus_a", "corpus_b"]), (seq, ["corpora"])):
        text = yaml.safe_dump(spec.dump(), sort_keys=False)
        keys = list(yaml.safe_load(text))
        assert keys[:len(own) + 4] == ["name", *own, "tokenizer", "model", "seq_len"]
        assert keys[-3:] == ["run_overrides", "torch_threads", "assumed_tokens_per_s"]
        assert sorted(keys) == sorted(type(spec).model_fields)
        assert load_spec(yaml.safe_load(text)) == spec
    bad = tiny_experiment_spec(corpora[:2], sequence=False)
    del bad["corpus_a"], bad["model"]
    with pytest.raises(ExperimentError) as e:
        load_spec(bad, ["zzz=1", "keep_checkpoints=0", "precision=fp8"])
    assert [line.split(":")[0] for line in str(e.value).splitlines()] == [
        "invalid experiment spec (5 problems)", "  - corpus_a", "  - model", "  - precision", "  - keep_checkpoints",
        "  - zzz"]
    bad = tiny_experiment_spec(corpora)
    del bad["tokenizer"]
    with pytest.raises(ExperimentError) as e:
        load_spec(bad, ["seed=x", "replay=2", "name=a b"])
    assert [line.split(":")[0] for line in str(e.value).splitlines()][1:] == [
        "  - name", "  - tokenizer", "  - replay", "  - seed"]


def test_cli_dry_run_writes_nothing(tmp_path, capsys):
    from cpt.cli import main

    out = tmp_path / "exp"
    assert main(["experiment", str(TINY), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    for name in ALL_RUNS:
        assert name in text
    assert "variant overrides: train.reptile.every=4 train.reptile.epsilon=0.5" in text
    assert "total: " in text and not out.exists()
    assert main(["experiment", str(TINY), "--set", "nope=1", "--dry-run"]) == 2
    assert "unknown field" in capsys.readouterr().err


def test_a_stop_outside_a_runs_training_is_one_line_and_the_preempted_exit_code(tmp_path, monkeypatch):
    """SIGTERM while `cpt experiment` prepares data or starts a run (here: the first run's start, held by a fault
    point) ended it silently, exit 143: now one line, the --preempted-exit-code status (the option was missing), the
    run's lock released; a run preempted inside its training loop (checkpoint saved) exits with it too."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "exp"
    args = [sys.executable, "-m", "cpt.cli", "experiment", str(TINY), "--out", str(out), "--preempted-exit-code", "75",
            *[x for item in SMALL for x in ("--set", item)]]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "CPT_FAULT_INJECT": "hang:start:model"})
    head = []
    for line in proc.stdout:
        head.append(line)
        if line.startswith("--- base:"):
            break
    time.sleep(2)  # (into the start: the fault point holds it)
    proc.send_signal(signal.SIGTERM)
    log = "".join(head) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, log
    assert log.rstrip().splitlines()[-1] == ("cpt experiment: stopped by SIGTERM outside a run's training (preparing "
                                             "data, starting a run or between runs): nothing to save; run the same "
                                             "command again to continue"), log
    assert "Traceback" not in log and not (out / "runs" / "base" / "run.lock").exists()

    from cpt.commands import experiment as command
    from cpt.experiment import ExperimentPreempted

    def preempted(*a, **k):
        raise ExperimentPreempted("base was preempted (checkpoint saved): run the same command again to resume")

    monkeypatch.setattr("cpt.experiment.run_experiment", preempted)
    assert command.main([str(TINY), "--preempted-exit-code", "75"]) == 75
    assert command.main([str(TINY)]) == 0


def test_one_dry_run_for_both_kinds_of_spec(tmp_path):
    """The pair grid and a dataset sequence go through the same dry run: corpora, model, every run with LRs read off
    its own run config's LR plan, totals; nothing is written."""
    verse = {"name": "verse", "inputs": [{"builtin": "shakespeare"}], "max_mb": 0.05}
    code = {"name": "code", "inputs": [{"builtin": "python_stdlib"}], "max_mb": 0.05}
    said = {}
    for kind, spec in (("pair", tiny_experiment_spec([verse, code], sequence=False, replay_shares=[0.25])),
                       ("sequence", tiny_experiment_spec([verse, code]))):
        echo = Echo()
        assert run_experiment(spec, tmp_path / kind, echo=echo, dry_run=True) == tmp_path / kind / "results.md"
        assert not (tmp_path / kind).exists()
        said[kind] = echo.text
        assert echo[0].startswith("corpus verse: 1 files") and echo[1].startswith("corpus code: 1 files")
        assert echo[2].startswith("model: ") and "M non-embedding), 1 layers, hidden 32" in echo[2]
    pair, seq = said["pair"], said["sequence"]
    # pair: base 20 steps + 2 CPT runs of 10 + the baseline's 30 = 70 steps of 128 tokens
    assert "total: 8,960 training tokens" in pair
    infinite = next(line for line in pair.splitlines() if line.startswith("  cpt-infinite-replay25 "))
    assert "10 steps" in infinite and "lr[9]=3.00e-04" in infinite  # annealed to min_lr at the last step
    # sequence: 2 trunks of 30 steps and 2 anneal branches of 2 steps (the last stage's 10 x 0.2) = 64 steps
    assert "total: 8,192 training tokens" in seq
    branch = next(line for line in seq.splitlines() if line.startswith("  seed1234-infinite-anneal0 "))
    assert "steps 20..22 (256 tokens)" in branch and "lr[21]=3.00e-04" in branch
    trunk = next(line for line in seq.splitlines() if line.startswith("  seed1234-infinite "))
    assert "lr[20]=1.50e-03" in trunk  # the constant trunk after stage 0


def test_one_model_config_builder():
    """cpt.model.config_from_arch builds every model config from an architecture dict (the run's model.arch, the
    experiment's FLOPs, the benchmarks): given keys win over the defaults, model_type defaults to llama."""
    from cpt.experiment.runner import flops_per_token
    from cpt.model import config_from_arch

    arch = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 300}
    cfg = config_from_arch(arch, vocab_size=999, bos_token_id=7)
    assert (cfg.model_type, cfg.vocab_size, cfg.bos_token_id, cfg.hidden_size) == ("llama", 300, 7, 32)
    assert arch["model_type"] == "llama"  # the caller's dict is left alone
    assert config_from_arch({"hidden_size": 32, "num_attention_heads": 2}).model_type == "llama"
    # the experiment's FLOPs come from the spec's model at the tokenizer's vocabulary and the spec's seq_len
    spec = load_spec(tiny_experiment_spec([{"name": n, "inputs": ["/nonexistent"]} for n in "ab"], sequence=False))
    fpt, shape = flops_per_token(spec, 300)
    assert shape["hidden"] == 32 and shape["n_layers"] == 1
    # tied embeddings: 300 x 32 once, plus one layer (attention 4 x 32 x 32, MLP 3 x 32 x 64, 2 norms) and the final norm
    assert shape["n_params"] == 300 * 32 + 4 * 32 * 32 + 3 * 32 * 64 + 3 * 32


def test_file_inputs_globs_and_caps(tmp_path):
    from cpt.experiment.corpora import resolve_corpus
    from cpt.experiment.spec import CorpusSpec

    src = tmp_path / "src"
    for i in range(20):
        (src / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
        (src / f"pkg{i % 3}" / f"m{i}.py").write_text("x = 1\n" * 200)
        (src / f"pkg{i % 3}" / f"m{i}.h").write_text("int x;\n" * 200)
    (src / "pkg0" / "__pycache__").mkdir()
    (src / "pkg0" / "__pycache__" / "m0.py").write_text("cached")
    c = CorpusSpec(name="py", inputs=[str(src), str(src / "pkg1")], globs=["*.py"])
    files, nbytes = resolve_corpus(c, tmp_path / "raw", 0, echo=Echo())
    assert len(files) == 20 and all(f.endswith(".py") for f in files) and nbytes == 20 * 1200  # duplicates merged
    c = CorpusSpec(name="h", inputs=[f"{src}/**/*.h"], exclude=["*/pkg2/*"])
    files, _ = resolve_corpus(c, tmp_path / "raw", 0, echo=Echo())
    assert len(files) == 14 and not any("/pkg2/" in f for f in files)
    c = CorpusSpec(name="py", inputs=[str(src)], globs=["*.py"], max_mb=0.005)
    capped, nbytes = resolve_corpus(c, tmp_path / "raw", 0, echo=Echo())
    assert 4 <= len(capped) <= 5 and nbytes >= 5000
    assert resolve_corpus(c, tmp_path / "raw", 0, echo=Echo())[0] == capped  # deterministic
    c = CorpusSpec(name="py", inputs=[str(src), "/does/not/exist"], globs=["*.py"], allow_missing=True)
    assert len(resolve_corpus(c, tmp_path / "raw", 0, echo=Echo())[0]) == 20


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10, 37, 240])
def test_schedules_valid_for_any_length(steps):
    from cpt.schedules import LRPlan, ScheduleConfig

    lr = LRSpec(max_lr=1e-3, min_lr=1e-4, constant_lr=5e-4)
    for build in (cosine_schedule, infinite_schedule):
        plan = LRPlan([(steps, ScheduleConfig(**build(lr, steps)))])
        values = [plan.lr(i) for i in range(steps)]
        assert max(values) <= 1e-3 + 1e-12 and min(values) >= 0
    if steps >= 10:  # the infinite schedule ends its anneal at min_lr and holds constant_lr before it
        plan = LRPlan([(steps, ScheduleConfig(**infinite_schedule(lr, steps)))])
        assert plan.lr(steps - 1) == pytest.approx(1e-4)
        assert plan.lr(int(steps * 0.75)) == pytest.approx(5e-4)


def test_replay_labels():
    assert [replay_label(s) for s in (0.0, 0.05, 0.25, 0.125)] == ["0", "5", "25", "12.5"]
    assert cpt_run_name("infinite", 0.05) == "cpt-infinite-replay5"


def test_a_variant_curve_is_drawn_apart_from_its_grid_twin():
    """curves.png: a variant (same schedule and replay as its grid twin) was drawn in the twin's exact style, so the
    two lines could not be told apart; it is dash-dot with square markers now, the grid runs as before."""
    from cpt.experiment.grid import cpt_run_name
    from cpt.experiment.plan import RunPlan
    from cpt.experiment.results import curve_style

    def plan(name, kind="cpt", schedule="infinite", replay=0.25):
        return RunPlan(name=name, kind=kind, schedule=schedule, replay=replay, steps=1, config={})

    colours, shares = ["C0", "C1", "C2"], [0.0, 0.05, 0.25]
    twin = curve_style(plan(cpt_run_name("infinite", 0.25)), shares, colours)
    variant = curve_style(plan(cpt_run_name("infinite", 0.25) + "-mer"), shares, colours)
    assert twin == {"color": "C2", "linewidth": 1.5, "linestyle": ":", "marker": "o", "markersize": 2}
    assert variant["color"] == "C2" and (variant["linestyle"], variant["marker"]) == ("-.", "s")
    assert curve_style(plan(cpt_run_name("rewarm_cosine", 0.0), schedule="rewarm_cosine", replay=0.0), shares,
                       colours)["linestyle"] == "-"
    assert curve_style(plan("base", kind="base", schedule="cosine", replay=None), shares, colours)["color"] == "black"
