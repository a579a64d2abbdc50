"""`cpt experiment` on a dataset sequence: trunks through 3 corpora, anneal branches, seeds, the forgetting matrix.

One tiny 3-corpus sequence (2 seeds, both strategies, the from-scratch baseline at every boundary) runs once per
module on CPU (about 15-30 s); the tests check what must hold at any scale: every stage starts from the previous
stage's model and data position, the matrix rows are the trunk's evaluations at the boundaries, anneal branches
start from the trunk's boundary checkpoint and anneal on the finished stage's data, the tables hold mean ± std over
the seeds, and the derived metrics and noise statements are computed as documented.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from conftest import Echo, tiny_experiment_spec
from cpt.experiment import ExperimentError, load_spec, run_experiment
from cpt.experiment.matrix import compare, derived, mean_std
from cpt.experiment.plan import run_configs
from cpt.experiment.sequence import plan_sequence, replay_mix, tokens_seen
from cpt.experiment.spec import is_sequence_spec
from cpt.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CPU_SPEC = ROOT / "configs" / "experiments" / "sequence_cpu.yaml"
GPU_SPEC = ROOT / "configs" / "experiments" / "gpu_h100_sequence.yaml"
NAMES = ["verse", "code", "sums"]


def tiny_spec(root: Path) -> dict:
    """Three corpora (verse, code, sums), 2 seeds, both strategies, the baseline at every boundary."""
    r = random.Random(0)
    third = root / "sums.jsonl"
    with open(third, "w") as f:
        for _ in range(60):
            f.write(json.dumps({"text": " ".join(f"{a} plus {b} is {a + b}." for a, b in
                                                 [(r.randint(0, 99), r.randint(0, 99)) for _ in range(40)])}) + "\n")
    return tiny_experiment_spec([
        {"name": "verse", "inputs": [{"builtin": "shakespeare"}], "max_mb": 0.15, "heldout_docs": 4},
        {"name": "code", "inputs": [{"builtin": "python_stdlib"}], "max_mb": 0.15, "heldout_docs": 6},
        {"name": "sums", "inputs": [str(third)], "heldout_docs": 6},
    ], replay=0.25, seeds=[1, 2], baseline=True)


@pytest.fixture(scope="module")
def seq(tmp_path_factory):
    root = tmp_path_factory.mktemp("sequence")
    spec = tiny_spec(root)
    out = root / "out"
    echo = Echo()
    md = run_experiment(spec, out, echo=echo)
    return spec, out, md, echo.text


def _eval(run_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


def test_every_run_and_output(seq):
    spec, out, md, log = seq
    runs = sorted(p.name for p in (out / "runs").iterdir())
    expect = [f"seed{s}-{r}" for s in (1, 2) for r in
              ("rewarm_cosine", "infinite", "infinite-anneal0", "infinite-anneal1", "infinite-anneal2",
               "scratch-upto1", "scratch-upto2")]
    assert runs == sorted(expect)
    for f in ("results.md", "results.csv", "forgetting_matrix.png", "curves.png", "report/report.html"):
        assert (out / f).is_file(), f
    text = md.read_text()
    for label in ("rewarm_cosine", "infinite (trunk)", "infinite (annealed)", "scratch (union)"):
        assert f"## Forgetting matrix: {label}" in text
    assert " ± " in text and "95% interval" in text
    assert "runs: 14 trained" in log
    # the held-out coverage is logged and recorded
    assert "held-out set verse (upstream): evaluating 1,024 of" in log
    m = read_metrics(out / "runs" / "seed1-rewarm_cosine")
    assert any(r.get("eval/code/tokens") == 1024 and r.get("eval/code/docs", 0) >= 1 for r in m)


def test_trunk_stages_continue_model_and_data(seq):
    spec, out, _, _ = seq
    for strategy in ("rewarm_cosine", "infinite"):
        run = out / "runs" / f"seed1-{strategy}"
        recs = read_metrics(run)
        lr = {r["step"]: r["train/lr"] for r in recs if "train/lr" in r}
        # one run, three stages: data positions carry on (tokens per corpus only grow), no restart at a boundary
        code = [r["data/tokens/code"] for r in recs if "data/tokens/code" in r]
        assert code == sorted(code) and code[-1] > 0
        stage = {r["step"]: r["stage"] for r in recs if "stage" in r}
        assert max(stage.values()) == 2
        if strategy == "rewarm_cosine":  # re-warm and re-decay in stages 1 and 2
            assert lr[25] > 2 * lr[20] and lr[35] > 2 * lr[30] and lr[30] < lr[25]
        else:  # one constant trunk after stage 0's cooldown
            assert [v for s, v in lr.items() if s >= 20] == pytest.approx([1.5e-3] * len([s for s in lr if s >= 20]))
        # configured vs realised shares: stage 2's mix has 12.5% verse; the realised share is cumulative
        last = [r for r in recs if "data/realised_share/verse" in r][-1]
        assert last["data/share/verse"] == pytest.approx(0.125)
        assert last["data/realised_share/verse"] == pytest.approx((20 + 2.5 + 1.25) / 40)


def test_matrix_rows_are_boundary_evaluations(seq):
    spec, out, _, _ = seq
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    cell = {(r["strategy"], r["seed"], r["after_stage"], r["corpus"]): float(r["loss"]) for r in rows}
    for seed in (1, 2):
        for strategy, label in (("rewarm_cosine", "rewarm_cosine"), ("infinite", "infinite (trunk)")):
            run = out / "runs" / f"seed{seed}-{strategy}"
            for k, step in enumerate((20, 30, 40)):
                for j in NAMES:
                    assert cell[(label, str(seed), str(k), j)] == _eval(run, f"eval/{j}/loss")[step]
        for k, step in enumerate((20, 30, 40)):
            branch = out / "runs" / f"seed{seed}-infinite-anneal{k}"
            assert cell[("infinite (annealed)", str(seed), str(k), "code")] == _eval(branch, "eval/code/loss")[step + 2]
    # derived metrics per seed, as defined
    for seed in ("1", "2"):
        m = [[cell[("rewarm_cosine", seed, str(k), j)] for j in NAMES] for k in range(3)]
        d = derived(m)
        assert cell[("rewarm_cosine", seed, "", "average_loss")] == pytest.approx(d["average_loss"])
        assert d["backward_transfer"] == pytest.approx(((m[2][0] - m[0][0]) + (m[2][1] - m[1][1])) / 2)
        assert d["forward_adaptation"] == pytest.approx(((m[0][1] - m[1][1]) + (m[1][2] - m[2][2])) / 2)
    # mean ± std over the two seeds in the markdown table
    a, b = cell[("rewarm_cosine", "1", "2", "sums")], cell[("rewarm_cosine", "2", "2", "sums")]
    mu, sd, n = mean_std([a, b])
    assert n == 2 and f"{mu:.4f} ± {sd:.4f}" in (out / "results.md").read_text()


def test_anneal_branches_start_from_the_trunk_and_anneal_on_the_finished_stage(seq):
    _, out, _, _ = seq
    trunk = out / "runs" / "seed2-infinite"
    for k, b in enumerate((20, 30, 40)):
        branch = out / "runs" / f"seed2-infinite-anneal{k}"
        recs = read_metrics(branch)
        assert min(r["step"] for r in recs) >= b and max(r["step"] for r in recs) == b + 2
        lrs = [r["train/lr"] for r in recs if "train/lr" in r]
        assert lrs[-1] == pytest.approx(3e-4)  # annealed to min_lr
        toks = [r for r in recs if "data/tokens/sums" in r][-1]
        trunk_toks = [r for r in read_metrics(trunk) if r.get("step") == b and "data/tokens/sums" in r]
        if k < 2:  # the next corpus is not touched by the branch: it anneals on stage k's mix
            assert toks["data/share/sums"] == 0 and toks["data/tokens/sums"] == (trunk_toks[-1]["data/tokens/sums"] if trunk_toks else 0)
        # the branch continued the trunk's data position (cumulative counts start from the trunk's)
        assert toks["data/tokens/verse"] >= 20 * 4 * 32


def test_rerun_skips_everything(seq):
    spec, out, _, _ = seq
    echo = Echo()
    run_experiment(spec, out, echo=echo)
    assert "runs: 0 trained, 0 resumed, 14 skipped" in echo.text


def test_replay_mix_and_tokens():
    spec = load_spec(tiny_spec_stub(replay=0.2))
    assert replay_mix(spec, 0) == {"a": 1.0, "b": 0.0, "c": 0.0}
    assert replay_mix(spec, 2) == pytest.approx({"a": 0.1, "b": 0.1, "c": 0.8})
    by_tokens = load_spec(tiny_spec_stub(replay=0.2, replay_split="tokens"))
    assert replay_mix(by_tokens, 2, {"a": 300, "b": 100, "c": 5}) == pytest.approx({"a": 0.15, "b": 0.05, "c": 0.8})
    seen = tokens_seen(spec, 1)
    assert seen == pytest.approx({"a": (20 + 0.2 * 10) * 128, "b": 0.8 * 10 * 128})
    assert load_spec(tiny_spec_stub()).replay_split == "equal"


def tiny_spec_stub(**fields) -> dict:
    """A sequence spec over corpora a, b, c that plans but never reads its (missing) inputs."""
    return tiny_experiment_spec([{"name": n, "inputs": ["/nonexistent"]} for n in "abc"], **fields)


def test_derived_and_noise_statements():
    m = [[2.0, 5.0, 6.0], [2.5, 3.0, 5.5], [2.8, 3.4, 4.0]]
    d = derived(m)
    assert d["average_loss"] == pytest.approx((2.8 + 3.4 + 4.0) / 3)
    assert d["backward_transfer"] == pytest.approx((0.8 + 0.4) / 2)
    assert d["forward_adaptation"] == pytest.approx((2.0 + 1.5) / 2)
    assert derived([[2.0, None], [None, 1.0]])["backward_transfer"] is None
    assert "within the noise" in compare([1.00, 1.10, 0.90], [1.01, 1.05, 0.96], "avg", "x", "y")
    assert "lower for x, beyond the noise" in compare([1.00, 1.10, 0.90], [1.20, 1.31, 1.09], "avg", "x", "y")
    assert "one seed" in compare([1.0], [2.0], "avg", "x", "y")
    mu, sd, n = mean_std([1.0, 2.0, 3.0])
    assert (mu, sd, n) == (2.0, 1.0, 3)
    # Student's t beyond 10 degrees of freedom (a flat 2.2 was used: +8% at 30)
    from cpt.experiment.matrix import t95

    for df, exact in ((1, 12.706), (10, 2.228), (11, 2.201), (15, 2.131), (20, 2.086), (30, 2.042), (120, 1.980)):
        assert t95(df) == pytest.approx(exact, abs=1e-3), df
    a, b = [1.0 + 0.1 * (i % 3) for i in range(31)], [1.0] * 31
    half = float(compare(a, b, "avg", "x", "y").split("± ")[1].split(" ")[0])
    assert half == pytest.approx(2.042 * mean_std([x - y for x, y in zip(a, b)])[1] / 31 ** 0.5, abs=1e-4)


def test_the_seeds_column_counts_the_seeds_behind_the_numbers(tmp_path):
    """A seed whose runs are missing cells adds to none of the summary's numbers: the column said 2 for one seed's
    values."""
    from cpt.experiment.matrix import write_results

    spec = load_spec(ROOT / "configs" / "experiments" / "sequence_cpu.yaml", ["seeds=[1, 2]"])
    K = len(spec.corpora)
    full = [[2.0 + 0.1 * k + 0.01 * j for j in range(K)] for k in range(K)]
    part = [[2.0] + [None] * (K - 1)] + [[None] * K for _ in range(K - 1)]
    shape = {"n_params": 1000, "n_params_non_embedding": 500, "n_layers": 2, "hidden": 8}
    md = write_results(spec, {("rewarm_cosine", 1): full, ("rewarm_cosine", 2): part}, [], tmp_path, shape,
                       {c.name: 100 for c in spec.corpora})
    row = next(line for line in md.read_text().splitlines() if line.startswith("| rewarm_cosine |"))
    assert row.split(" | ")[1] == "1", row


@pytest.mark.parametrize("path", [CPU_SPEC, GPU_SPEC])
def test_shipped_sequence_specs_validate_and_plan(path, tmp_path):
    assert is_sequence_spec(path)
    spec = load_spec(path)
    assert len(spec.corpora) >= 3 and len(spec.seeds) >= 2 and set(spec.strategies) == {"rewarm_cosine", "infinite"}
    runs = plan_sequence(spec, tmp_path, tmp_path / "tok", tmp_path / "data", {c.name: 10**6 for c in spec.corpora})
    cfgs = run_configs(runs)  # every run config validates, LR plans included
    trunk = next(r for r in runs if r.label == "infinite")
    assert len(cfgs[trunk.name].stages) > 1
    assert all(st.schedule.continue_trunk for st in cfgs[trunk.name].stages[1:])
    # evaluations and checkpoints land on every boundary
    ev, ck = cfgs[trunk.name].eval, cfgs[trunk.name].checkpoint
    assert spec.boundaries and all(b % ev.every == 0 and b % ck.every == 0 for b in spec.boundaries)


def test_bad_sequence_specs():
    with pytest.raises(ExperimentError, match="duplicate names"):
        load_spec({**tiny_spec_stub(), "corpora": [{"name": "a", "inputs": ["x"]}] * 2})
    with pytest.raises(ExperimentError, match="seeds"):
        load_spec(tiny_spec_stub(seeds=[1, 1]))
    with pytest.raises(ExperimentError, match="replay"):
        load_spec(tiny_spec_stub(replay=1.0))
    assert not is_sequence_spec({"corpus_a": {}})
    # lm-eval tasks are the pair grid's: a sequence refuses them rather than dropping them silently
    for ev in ({"lm_eval_tasks": ["cpt_python_next"]}, {"lm_eval_limit": 50}):
        with pytest.raises(ExperimentError, match="a dataset sequence does not run lm-eval tasks"):
            load_spec(tiny_spec_stub(eval=ev))
