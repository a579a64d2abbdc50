"""Benchmarks that track forgetting (eval_harness/benchmarks.py): the bookkeeping on synthetic scores, the seeded
document subsets, the comparison against a baseline, the bundled task data and its generator, and a CPU training
run with one upstream and one downstream bundled task (step-0 scores, deltas with stderrs, summary, report, an
anneal branch measured against the trunk's step 0)."""

import json
import math
import re
import sys
from pathlib import Path

import pytest

from eval_harness.benchmarks import (BenchmarkTracker, TaskSpec, compare_scores, format_benchmark_table,
                                     format_comparison_table, seeded_subset, stderr_name)

DATA = Path(__file__).resolve().parents[1] / "eval_harness" / "tasks" / "data"
HIB = {"up": {"acc": True}, "down": {"bits_per_byte": False}, "plain": {"acc": True}}


def tracker(**kw) -> BenchmarkTracker:
    t = BenchmarkTracker([TaskSpec("up", "upstream"), TaskSpec("down", "downstream"), TaskSpec("plain")], **kw)
    t.task_tags = {"up": "upstream", "down": "downstream", "plain": None}  # what _set_up learns from lm-eval
    return t


def scores(acc, acc_se, bpb, bpb_se, plain=0.5):
    return {"lm_eval/up/acc": acc, "lm_eval/up/acc_stderr": acc_se, "lm_eval/down/bits_per_byte": bpb,
            "lm_eval/down/bits_per_byte_stderr": bpb_se, "lm_eval/plain/acc": plain}


def test_seeded_subset_is_fixed_by_seed_and_task():
    a = seeded_subset("cpt_arith_mc", 300, 50, seed=7)
    assert a == seeded_subset("cpt_arith_mc", 300, 50, seed=7)  # the same run after run
    assert len(a) == 50 and a == sorted(a) and len(set(a)) == 50 and max(a) < 300
    assert a != list(range(50))  # not lm-eval's first 50
    assert a != seeded_subset("cpt_arith_mc", 300, 50, seed=8)
    assert a != seeded_subset("cpt_python_mc", 300, 50, seed=7)
    assert seeded_subset("t", 30, 30, 0) is None and seeded_subset("t", 30, None, 0) is None  # all documents


def test_deltas_are_signed_so_positive_means_worse_or_better():
    t = tracker()
    m0 = t.record(0, scores(0.60, 0.03, 2.0, 0.10), HIB)
    assert m0["lm_eval_forgetting/up/acc"] == 0.0 and m0["lm_eval_adaptation/down/bits_per_byte"] == 0.0
    assert m0["lm_eval_forgetting/up/acc_stderr"] == pytest.approx(math.sqrt(2) * 0.03)
    assert not any(k.endswith("/plain/acc") and not k.startswith("lm_eval/") for k in m0)  # untagged: raw scores only
    # accuracy falls (higher is better) -> forgetting > 0; bits per byte fall (lower is better) -> adaptation > 0
    m1 = t.record(10, scores(0.50, 0.04, 1.5, 0.08), HIB)
    assert m1["lm_eval_forgetting/up/acc"] == pytest.approx(0.10)
    assert m1["lm_eval_forgetting/up/acc_stderr"] == pytest.approx(0.05)
    assert m1["lm_eval_adaptation/down/bits_per_byte"] == pytest.approx(0.5)
    assert m1["lm_eval_adaptation/down/bits_per_byte_stderr"] == pytest.approx(math.hypot(0.10, 0.08))
    assert m1["lm_eval_worst/up/acc"] == 0.50
    m2 = t.record(20, scores(0.58, 0.03, 2.5, 0.1), HIB)
    assert m2["lm_eval_forgetting/up/acc"] == pytest.approx(0.02) and m2["lm_eval_worst/up/acc"] == 0.50
    assert m2["lm_eval_adaptation/down/bits_per_byte"] == pytest.approx(-0.5)  # got worse: negative adaptation

    rows = {r["task"]: r for r in t.summary()}
    assert set(rows) == {"up", "down"}
    up, down = rows["up"], rows["down"]
    assert (up["step0"], up["final"], up["worst"], up["worst_step"], up["final_step"]) == (0.60, 0.58, 0.50, 10, 20)
    assert up["change"] == pytest.approx(0.02) and up["noise"] is True  # 0.02 < 2 x 0.042
    assert (down["worst"], down["worst_step"]) == (2.5, 20) and down["change"] == pytest.approx(-0.5)
    assert down["noise"] is False  # |-0.5| > 2 x 0.141
    table = format_benchmark_table(t.summary())
    assert "up/acc" in table and "forgetting +0.0200 ± 0.0424" in table and "noise" in table
    assert "adaptation -0.5000 ± 0.1414" in table and "significant" in table


def test_state_survives_resume_through_json():
    t = tracker(seed=3)
    t.samples = {"up": [1, 5, 9]}
    t.record(0, scores(0.6, 0.03, 2.0, 0.1), HIB)
    t.record(10, scores(0.5, 0.04, 1.5, 0.08), HIB)
    resumed = tracker(seed=3)
    resumed.load_state_dict(json.loads(json.dumps(t.state_dict())))  # as trainer_state.json holds it
    assert resumed.samples == {"up": [1, 5, 9]} and resumed.reference_step == 0
    assert not resumed.needs_start_evaluation()  # the base model's scores are known: no second "step 0"
    a, b = t.record(20, scores(0.55, 0.03, 1.8, 0.1), HIB), resumed.record(20, scores(0.55, 0.03, 1.8, 0.1), HIB)
    assert a == b and a["lm_eval_forgetting/up/acc"] == pytest.approx(0.05)
    assert t.summary() == resumed.summary()



def test_tasks_added_on_a_resume_are_measured_and_labelled_from_their_first_score(caplog):
    """A task added on a resume is measured against its first score, at a later step: the end-of-run table names
    that step (it said "step 0" for it), the state keeps it. Tasks added to a run that had none (no lm_eval state in
    the checkpoint) are no longer refused: their reference is the evaluation at the resumed step, with a warning."""
    from cpt.state import restore

    t = BenchmarkTracker([TaskSpec("up", "upstream")])
    t.task_tags = {"up": "upstream"}
    t.record(0, {"lm_eval/up/acc": 0.6, "lm_eval/up/acc_stderr": 0.03}, HIB)
    resumed = tracker()  # "down" (and "plain") added on the resume
    resumed.load_state_dict(json.loads(json.dumps(t.state_dict())))
    with caplog.at_level("WARNING", logger="cpt.lm_eval"):
        m = resumed.record(8, scores(0.5, 0.04, 1.5, 0.08), HIB)
    assert m["lm_eval_adaptation/down/bits_per_byte"] == 0.0 and m["lm_eval_forgetting/up/acc"] == pytest.approx(0.1)
    assert "down/bits_per_byte: first scored at step 8" in caplog.text
    rows = {r["task"]: r for r in resumed.summary()}
    assert (rows["up"]["step0_step"], rows["down"]["step0_step"]) == (0, 8)
    table = format_benchmark_table(resumed.summary())
    assert "reference (step)" in table and "0.6000 ± 0.0300 (0)" in table and "1.5000 ± 0.0800 (8)" in table, table
    again = tracker()
    again.load_state_dict(json.loads(json.dumps(resumed.state_dict())))
    assert {r["task"]: r["step0_step"] for r in again.summary()} == {"up": 0, "down": 8}
    # a checkpoint written without lm-eval tasks: no error, and the resumed step's scores become the reference
    fresh = tracker()
    restore({"lm_eval": fresh}, {"format": 2}, {})
    assert fresh.needs_start_evaluation()
    with caplog.at_level("WARNING", logger="cpt.lm_eval"):
        fresh.record(4, scores(0.5, 0.04, 1.5, 0.08), HIB)
    assert "measured against this evaluation, at step 4" in caplog.text
    assert "reference (step 4)" in format_benchmark_table(fresh.summary())


def test_a_resume_keeps_scoring_the_documents_of_its_reference(caplog):
    """eval.lm_eval.limit changed on a resume: the run keeps scoring the documents its reference scores were measured
    on and says so (a new limit was silently ignored; from "all" to a limit, the run silently scored another subset
    against a reference measured on every document)."""
    task = "cpt_arith_mc"
    for before, after in ((4, 8), (None, 4)):
        t = BenchmarkTracker([TaskSpec(task, "upstream")], limit=before, seed=1)
        t._set_up()
        resumed = BenchmarkTracker([TaskSpec(task, "upstream")], limit=after, seed=1)
        resumed.load_state_dict(json.loads(json.dumps(t.state_dict())))
        caplog.clear()
        with caplog.at_level("WARNING", logger="cpt.lm_eval"):
            resumed._set_up()
        assert resumed.samples == t.samples and len(resumed.samples.get(task, range(300))) == (before or 300)
        assert f"lm-eval {task}: the config now chooses {after} of its 300 documents, but this run's reference scores " \
               f"were measured on {before or 'all'}: it keeps scoring those" in caplog.text
    # a task left out of one resume and added back on a later one keeps its documents too
    t = BenchmarkTracker([TaskSpec(task, "upstream")], limit=4, seed=1)
    t._set_up()
    without = BenchmarkTracker([TaskSpec("cpt_python_next", "downstream")], limit=4, seed=1)
    without.load_state_dict(json.loads(json.dumps(t.state_dict())))
    without._set_up()
    back = BenchmarkTracker([TaskSpec(task, "upstream")], limit=8, seed=1)
    back.load_state_dict(json.loads(json.dumps(without.state_dict())))
    back._set_up()
    assert back.samples[task] == t.samples[task] and len(back.samples[task]) == 4

def test_schedule():
    t = tracker(every=10, dense_steps=6, dense_every=2)
    assert t.needs_start_evaluation()
    t.record(0, scores(0.6, 0.03, 2.0, 0.1), HIB)
    assert not t.needs_start_evaluation()
    starts = [0, 25]
    assert [s for s in range(1, 41) if t.should_evaluate(s, starts)] == [2, 4, 10, 20, 25, 27, 29, 30, 40]
    assert not tracker(at_start=False).needs_start_evaluation()
    assert [s for s in range(1, 30) if tracker(every=10).should_evaluate(s, starts)] == [10, 20]


def test_stderr_names_and_comparison_against_a_baseline():
    assert stderr_name("acc") == "acc_stderr" and stderr_name("exact_match@strict") == "exact_match_stderr@strict"
    base = scores(0.60, 0.03, 2.0, 0.10)
    model = scores(0.50, 0.03, 1.9, 0.10)
    rows = {r["task"]: r for r in compare_scores(base, model, HIB)}
    assert rows["up"]["delta"] == pytest.approx(-0.1) and rows["up"]["better"] is False
    assert rows["up"]["delta_stderr"] == pytest.approx(math.sqrt(2) * 0.03) and rows["up"]["noise"] is False
    assert rows["down"]["better"] is True and rows["down"]["noise"] is True  # -0.1 bits/byte within 2 x 0.141
    assert rows["plain"]["delta_stderr"] is None and rows["plain"]["noise"] is None
    table = format_comparison_table(list(rows.values()))
    assert "up/acc" in table and "-0.1000 ± 0.0424" in table and "worse" in table
    assert table.splitlines()[0].split()[-1] == "verdict"  # the better/worse/noise column has a header


def test_bootstrap_fills_the_stderr_lm_eval_leaves_out():
    from eval_harness.lm_eval_hook import add_missing_stderrs, bootstrap_stderr

    docs = [{"filter": "none", "bits_per_byte": (-float(10 + i % 7), 20 + i % 3), "acc": float(i % 2)} for i in range(200)]
    results = {"results": {"t": {"bits_per_byte,none": 0.9, "bits_per_byte_stderr,none": "N/A",
                                 "acc,none": 0.5, "acc_stderr,none": 0.0354}},
               "configs": {"t": {"metric_list": [{"metric": "bits_per_byte"}]}}, "samples": {"t": docs}}
    add_missing_stderrs(results, iters=200, seed=0)
    se = results["results"]["t"]["bits_per_byte_stderr,none"]
    assert 0 < se < 0.1 and results["results"]["t"]["acc_stderr,none"] == 0.0354  # lm-eval's own stderr kept
    # the bootstrap of a mean agrees with the closed form sd / sqrt(n)
    xs = [float(i % 2) for i in range(200)]
    assert bootstrap_stderr(lambda v: sum(v) / len(v), xs, 400, seed=1) == pytest.approx(0.5 / math.sqrt(200), rel=0.15)
    assert bootstrap_stderr(lambda v: sum(v) / len(v), xs, 400, seed=1) == bootstrap_stderr(lambda v: sum(v) / len(v), xs, 400, seed=1)


# ---------------------------------------------------------------- the bundled task data


MC_FILES = ["cpt_arith_mc", "cpt_python_mc", "cpt_shakespeare_mc", "cpt_python_next", "cpt_shakespeare_next"]


def rows_of(name):
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", MC_FILES)
def test_multiple_choice_tasks_are_big_enough_to_measure(name):
    rows = rows_of(name)
    assert len(rows) >= 300  # one stderr of an accuracy near 0.5 is <= 0.029: a 0.05 change is above it
    for r in rows:
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4 and 0 <= r["answer"] < 4


def test_generator_regenerates_the_bundled_data():
    from eval_harness.tasks import generate_data as g

    rows = g.all_rows()
    assert {f"{n}.jsonl" for n in MC_FILES} <= set(rows)
    same_everywhere = ["cpt_arith_mc.jsonl", "cpt_shakespeare_mc.jsonl", "cpt_shakespeare_next.jsonl",
                       "cpt_shakespeare_ppl.jsonl"]  # from the bundled corpus only
    if sys.version_info[:2] == (3, 11):  # the Python items come from this interpreter's standard library
        same_everywhere += ["cpt_python_mc.jsonl", "cpt_python_next.jsonl", "cpt_python_ppl.jsonl"]
    for name in same_everywhere:
        assert g.dumps(rows[name]) == (DATA / name).read_text(encoding="utf-8"), name
    # next-line items: the true line follows the context in the source; the three others come from other scenes
    scenes = g.shakespeare_lines()
    where = {}
    for d, lines in enumerate(scenes):
        for i in range(3, len(lines)):
            where.setdefault("\n".join(lines[i - 3:i]), []).append((d, lines[i]))
    for r in rows["cpt_shakespeare_next.jsonl"][:50]:
        found = where[r["context"]]
        assert any(line == r["choices"][r["answer"]] for _, line in found)
        d = found[0][0]
        assert all(c not in scenes[d] for i, c in enumerate(r["choices"]) if i != r["answer"])
    # cloze items: the prompt followed by the answer is a line of the corpus
    text = "\n".join("\n".join(lines) for lines in scenes)
    for r in rows["cpt_shakespeare_mc.jsonl"][len(g.SHAKESPEARE_FACTS):][:30]:
        assert r["question"] + " " + r["choices"][r["answer"]] in text or r["question"] + r["choices"][r["answer"]] in text


# ---------------------------------------------------------------- in a training run


def test_cpu_run_logs_benchmark_forgetting_from_step_0_and_an_anneal_branch_keeps_it(tiny_cpt_data, tiny_base, tmp_path):
    from conftest import tiny_run_config

    from cpt.config import load_config
    from cpt.metrics import read_metrics
    from cpt.report import benchmark_summary, load_run
    from cpt.train import train

    up, down = "cpt_shakespeare_next", "cpt_python_next"
    out = tmp_path / "trunk"
    cfg = tiny_run_config(tiny_cpt_data, out, eval={"every": 2, "dense_steps": 0, "at_start": True, "tokens_per_set": 1024,
                                                    "lm_eval": {"tasks": [{"name": up, "tag": "upstream"},
                                                                          {"name": down, "tag": "downstream", "limit": 12}],
                                                                "limit": 16, "every": 2, "bootstrap_iters": 20}},
                          checkpoint={"every": 2, "keep": 3})
    cfg["train"]["init_from"] = str(tiny_base)
    cfg["stages"][0]["steps"] = 4
    cfg["stages"][0]["schedule"] = {"type": "infinite", "max_lr": 3e-3, "warmup_steps": 1, "cooldown_steps": 1,
                                    "constant_lr": 2e-3, "min_lr": 1e-4}
    cfg["logging"] = {"plot": True}
    lines = []
    result = train(load_config(base=cfg), echo=lambda *a, **k: lines.append(" ".join(map(str, a))))

    recs = [r for r in read_metrics(out / "metrics.jsonl") if f"lm_eval/{up}/acc" in r]
    assert [r["step"] for r in recs] == [0, 2, 4]  # the base model, every 2 steps, the end
    first, last = recs[0], recs[-1]
    assert first[f"lm_eval_forgetting/{up}/acc"] == 0.0 and first[f"lm_eval_adaptation/{down}/acc"] == 0.0
    for key in (f"lm_eval/{up}/acc_stderr", f"lm_eval/{down}/acc_stderr", f"lm_eval_forgetting/{up}/acc_stderr",
                f"lm_eval_adaptation/{down}/acc_stderr", "time/lm_eval_s", f"lm_eval_worst/{up}/acc"):
        assert last[key] > 0, key
    assert last[f"lm_eval_forgetting/{up}/acc"] == pytest.approx(first[f"lm_eval/{up}/acc"] - last[f"lm_eval/{up}/acc"])
    assert last[f"lm_eval_adaptation/{down}/acc"] == pytest.approx(last[f"lm_eval/{down}/acc"] - first[f"lm_eval/{down}/acc"])
    assert first[f"lm_eval/{down}/acc"] * 12 == round(first[f"lm_eval/{down}/acc"] * 12)  # its own limit: 12 items
    # the summary: printed at the end, returned, and the same in the report's table
    rows = {f"{r['task']}/{r['metric']}": r for r in result.benchmarks}
    assert rows[f"{up}/acc"]["step0"] == first[f"lm_eval/{up}/acc"] and rows[f"{up}/acc"]["final_step"] == 4
    log = "\n".join(lines)
    # a plain line as each lm-eval evaluation starts (a long one was a silent batch log), its result line timed
    starts = [line for line in lines if line.startswith("lm-eval step ") and ": scoring " in line]
    assert starts[0] == f"lm-eval step 0: scoring {up} (16 documents), {down} (12 documents)" and len(starts) == 3
    done = [line for line in lines if line.startswith("lm-eval step 0: ") and "acc" in line]
    assert lines.index(starts[0]) < lines.index(done[0]) and re.search(r" \(\d+\.\d s\)$", done[0])
    assert "benchmarks (lm-eval" in log and f"{up}/acc" in log and "forgetting" in log and "adaptation" in log
    report = {f"{r['task']}/{r['metric']}": r for r in benchmark_summary(load_run(out))}
    for k in (f"{up}/acc", f"{down}/acc"):
        assert report[k]["change"] == pytest.approx(rows[k]["change"])
        assert report[k]["change_stderr"] == pytest.approx(rows[k]["change_stderr"])
        assert report[k]["noise"] == rows[k]["noise"]
    html = (out / "report" / "report.html").read_text()
    assert "benchmark (lm-eval)" in html and f"{up}/acc" in html
    assert (out / "report" / "lm_eval_upstream.png").is_file() and (out / "report" / "lm_eval_downstream.png").is_file()
    state = json.loads((out / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert state["lm_eval"]["reference_step"] == 0 and f"{up}/acc" in state["lm_eval"]["reference"]

    # an anneal branch from step 2: measured against the trunk's step 0 (carried in the checkpoint), same items
    branch = tmp_path / "branch"
    bcfg = {**cfg, "run": {**cfg["run"], "output_dir": str(branch)}, "logging": {"plot": False},
            "train": {**cfg["train"], "init_from": str(out / "checkpoints" / "step_00000002"), "anneal_steps": 2}}
    train(load_config(base=bcfg), echo=lambda *a, **k: None)
    brecs = [r for r in read_metrics(branch / "metrics.jsonl") if f"lm_eval/{up}/acc" in r]
    assert [r["step"] for r in brecs] == [4]  # no new "step 0": the trunk's reference holds
    b = brecs[0]
    assert b[f"lm_eval_forgetting/{up}/acc"] == pytest.approx(first[f"lm_eval/{up}/acc"] - b[f"lm_eval/{up}/acc"])
    # the branch's report: the changes it logged (against the trunk's step 0), not its first evaluation taken as step 0
    from cpt.report import heldout_summary

    trunk0 = {r["name"]: r["step0"] for r in heldout_summary(load_run(out))}
    (held,) = [r for r in read_metrics(branch / "metrics.jsonl") if "forgetting/shakespeare" in r]
    for r in heldout_summary(load_run(branch)):
        logged = held[f"forgetting/{r['name']}"] if r["tag"] == "upstream" else held[f"adaptation/{r['name']}"]
        assert r["change"] == pytest.approx(logged) and abs(logged) > 1e-4
        assert r["step0"] == pytest.approx(trunk0[r["name"]]) and r["step0_step"] is None
    brows = {f"{r['task']}/{r['metric']}": r for r in benchmark_summary(load_run(branch))}
    assert brows[f"{up}/acc"]["change"] == b[f"lm_eval_forgetting/{up}/acc"]
    assert brows[f"{up}/acc"]["step0"] is None  # the trunk's step 0 is not in the branch's log: unknown, not its first score


def test_in_loop_scores_are_lm_eval_on_the_export_and_cpt_eval_of_the_run_reproduces_them(tiny_cpt_data, tiny_base,
                                                                                             tmp_path):
    """Parity with the standard tool: the in-loop scores equal lm-eval's own `hf` model on the run's export given
    max_length=data.seq_len (the in-loop context), and `cpt eval RUN` reproduces them with no flags (the run's
    context, subset seed and limits). The model's context (256) exceeds data.seq_len (64), so lm-eval's default context
    gives other perplexities, and run.seed is not cpt eval's fallback 1234. Its held-out losses likewise."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from conftest import tiny_run_config
    from cpt.commands.eval import main as eval_main
    from cpt.config import load_config
    from cpt.metrics import read_metrics
    from cpt.train import train
    from eval_harness.task_registry import LOCAL_TASKS_DIR

    mc, ppl, limit, seed = "cpt_shakespeare_next", "cpt_python_ppl", 8, 7
    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_cpt_data, out, eval={"at_start": False, "tokens_per_set": 512,
                                                    "lm_eval": {"tasks": [{"name": mc, "tag": "upstream"},
                                                                          {"name": ppl, "tag": "downstream", "limit": 6}],
                                                                "limit": limit, "bootstrap_iters": 10}},
                          run={"seed": seed}, checkpoint={"every": None})
    cfg["train"]["init_from"] = str(tiny_base)
    cfg["model"]["config_overrides"] = {"max_position_embeddings": 256}
    cfg["stages"][0].update(steps=2, schedule={"type": "constant", "max_lr": 2e-3, "warmup_steps": 1})
    train(load_config(base=cfg), echo=lambda *a, **k: None)
    (rec,) = [r for r in read_metrics(out / "metrics.jsonl") if f"lm_eval/{ppl}/bits_per_byte" in r]
    assert rec["step"] == 2 and json.loads((out / "export" / "config.json").read_text())["max_position_embeddings"] == 256

    samples = {mc: seeded_subset(mc, 300, limit, seed), ppl: seeded_subset(ppl, 37, 6, seed)}
    manager = TaskManager(include_path=str(LOCAL_TASKS_DIR), include_defaults=False)

    def lm_eval_alone(extra=""):
        res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={out / 'export'},dtype=float32{extra}",
                                      tasks=[mc, ppl], samples=samples, task_manager=manager, device="cpu", batch_size=8)
        return res["results"]

    alone = lm_eval_alone(",max_length=64")
    assert rec[f"lm_eval/{mc}/acc"] == alone[mc]["acc,none"] and rec[f"lm_eval/{mc}/acc_norm"] == alone[mc]["acc_norm,none"]
    assert rec[f"lm_eval/{mc}/acc_stderr"] == pytest.approx(alone[mc]["acc_stderr,none"], rel=1e-12)
    for metric in ("bits_per_byte", "byte_perplexity", "word_perplexity"):
        assert rec[f"lm_eval/{ppl}/{metric}"] == pytest.approx(alone[ppl][f"{metric},none"], rel=1e-6), metric
    # lm-eval's default context is the model's: other windows, other perplexities (what the README warns about)
    default = lm_eval_alone()
    assert abs(default[ppl]["bits_per_byte,none"] - rec[f"lm_eval/{ppl}/bits_per_byte"]) > 1e-4

    # cpt eval of the run, no flags: its context and seed, and its held-out samples (seq_len, tokens_per_set)
    result_file = tmp_path / "eval.json"
    heldout = [f"--heldout={h['name']}={h['path']}:{h['tag']}" for h in cfg["data"]["heldout"]]
    assert eval_main([str(out), "--tasks", f"{mc},{ppl}", *heldout, "--device", "cpu", "--out", str(result_file)]) == 0
    result = json.loads(result_file.read_text())
    assert result["lm_eval_max_length"] == 64
    assert result["lm_eval_results"]["n-samples"][ppl]["effective"] == 6  # the run's own limit of the task
    (held,) = [r for r in read_metrics(out / "metrics.jsonl") if "eval/python/loss" in r]
    for h in cfg["data"]["heldout"]:
        assert result["heldout"][h["name"]]["tokens"] == held[f"eval/{h['name']}/tokens"] == 512
        assert result["heldout"][h["name"]]["loss"] == pytest.approx(held[f"eval/{h['name']}/loss"], rel=1e-5)
    assert result["lm_eval"][f"lm_eval/{mc}/acc"] == rec[f"lm_eval/{mc}/acc"]
    for key in (f"lm_eval/{ppl}/bits_per_byte", f"lm_eval/{ppl}/bits_per_byte_stderr", f"lm_eval/{mc}/acc_stderr"):
        assert result["lm_eval"][key] == pytest.approx(rec[key], rel=1e-6), key  # the bootstrap too: same seed and iters
    # with neither --tasks nor --heldout: the run's own held-out sets and tasks (it said "nothing to do")
    assert eval_main([str(out), "--device", "cpu", "--out", str(tmp_path / "eval2.json")]) == 0
    again = json.loads((tmp_path / "eval2.json").read_text())
    assert again["heldout"] == result["heldout"] and again["lm_eval"] == result["lm_eval"]


def test_cpt_eval_of_a_run_scores_the_documents_its_checkpoint_records(tiny_cpt_data, tiny_base, tmp_path, capsys):
    """A resume with another eval.lm_eval.limit keeps scoring the first documents (its checkpoint records them), but
    writes the new limit into config.yaml: `cpt eval RUN` took that limit, so it scored other documents than the
    logged scores (here 4, where the run scored 6)."""
    import shutil

    import yaml

    from conftest import tiny_run_config
    from cpt.commands.eval import main as eval_main

    run, task, seed = tmp_path / "run", "cpt_arith_mc", 5
    cfg = tiny_run_config(tiny_cpt_data, run, run={"seed": seed},
                          eval={"lm_eval": {"tasks": [{"name": task, "tag": "upstream"}], "limit": 4}})
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "metrics.jsonl").write_text("")
    shutil.copytree(tiny_base, run / "export")
    first = seeded_subset(task, 300, 6, seed)
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run / "checkpoints" / "step_00000004" / "trainer_state.json").write_text(
        json.dumps({"lm_eval": {"samples": {task: first}, "leaves": [task]}}))
    out = tmp_path / "r.json"
    assert eval_main([str(run), "--device", "cpu", "--bootstrap-iters", "0", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["lm_eval_results"]["n-samples"][task]["effective"] == 6
    assert f"{task}: the documents the run scored (6 of 300" in capsys.readouterr().out
    assert eval_main([str(run), "--device", "cpu", "--bootstrap-iters", "0", "--limit", "3", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["lm_eval_results"]["n-samples"][task]["effective"] == 3  # a flag still wins


def test_cpt_eval_of_a_checkpoint_takes_its_own_settings(tiny_cpt_data, tmp_path):
    """A resume that changed eval.tokens_per_set (allowed: that set's reference restarts) rewrites the run's
    config.yaml; `cpt eval RUN/checkpoints/step_N` of an earlier checkpoint took the new budget, so it scored another
    held-out sample than the one logged at step N. The checkpoint's own config.yaml is what it was evaluated with."""
    import yaml

    from conftest import tiny_run_config
    from cpt.commands.eval import run_eval_settings

    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    (ckpt / "trainer_state.json").write_text("{}")
    (ckpt / "config.yaml").write_text(yaml.safe_dump(tiny_run_config(tiny_cpt_data, run, eval={"tokens_per_set": 512})))
    (run / "config.yaml").write_text(yaml.safe_dump(tiny_run_config(tiny_cpt_data, run, eval={"tokens_per_set": 2048})))
    assert run_eval_settings(ckpt)["max_tokens"] == 512
    assert run_eval_settings(run)["max_tokens"] == 2048  # the run (its export): its newest settings


def test_experiment_results_get_benchmark_columns(tmp_path):
    """A spec naming lm-eval tasks: every run config scores them; results.md/csv gain benchmark columns."""
    from cpt.experiment import load_spec
    from cpt.experiment.grid import plan_runs
    from cpt.experiment.plan import run_configs
    from cpt.experiment.results import COLUMNS, benchmark_cells, write_results

    root = Path(__file__).resolve().parents[1]
    spec = load_spec(root / "configs" / "experiments" / "tiny_cpu.yaml",
                     ["eval.lm_eval_tasks=[{name: cpt_shakespeare_next, tag: upstream}, {name: cpt_python_next, tag: downstream}]",
                      "eval.lm_eval_limit=50"])
    cfgs = run_configs(plan_runs(spec, tmp_path, tmp_path / "tok", tmp_path / "data"))
    for cfg in cfgs.values():
        assert [(t.name, t.tag) for t in cfg.eval.lm_eval.tasks] == [("cpt_shakespeare_next", "upstream"),
                                                                      ("cpt_python_next", "downstream")]
        assert cfg.eval.lm_eval.limit == 50 and cfg.eval.lm_eval.every == cfg.eval.every

    run = tmp_path / "cpt-run"
    run.mkdir()
    recs = [{"step": 0, "train/tokens": 0, "lm_eval/t/acc": 0.60, "lm_eval/t/acc_stderr": 0.03,
             "lm_eval_forgetting/t/acc": 0.0, "lm_eval_forgetting/t/acc_stderr": 0.0424},
            {"step": 5, "train/tokens": 50, "lm_eval/t/acc": 0.40, "lm_eval/t/acc_stderr": 0.03,
             "lm_eval_forgetting/t/acc": 0.20, "lm_eval_forgetting/t/acc_stderr": 0.0424},
            {"step": 10, "train/tokens": 100, "lm_eval/t/acc": 0.55, "lm_eval/t/acc_stderr": 0.03,
             "lm_eval_forgetting/t/acc": 0.05, "lm_eval_forgetting/t/acc_stderr": 0.0424}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    cells = benchmark_cells(run, "cpt")
    assert cells == {"t/acc final": 0.55, "t/acc forgetting": 0.05, "t/acc stderr": 0.0424, "t/acc worst": 0.40,
                     "t/acc noise": True}
    assert benchmark_cells(run, "baseline") == {"t/acc final": 0.55}  # its step 0 is not the base model
    row = {k: None for k, _ in COLUMNS} | {"run": "cpt-run", "kind": "cpt", "schedule": "infinite", "replay": 0.05} | cells
    md = write_results(spec, [row], tmp_path, 1.0, {"n_params": 1e6, "n_layers": 2, "hidden": 64}, {}).read_text()
    assert "| t/acc final | t/acc forgetting | t/acc stderr | t/acc worst | t/acc noise |" in md
    assert "| 0.5500 | +0.0500 | 0.0424 | 0.4000 | yes |" in md and "Benchmarks (tagged lm-eval tasks)" in md
    assert "t/acc forgetting" in (tmp_path / "results.csv").read_text().splitlines()[0]


def test_config_takes_plain_names_and_tagged_tasks():
    from cpt.config import ConfigError, LmEvalConfig, apply_overrides, validate

    cfg = LmEvalConfig(tasks=["cpt_arith_mc", {"name": "cpt_shakespeare_next", "tag": "upstream", "limit": 100}])
    assert [(t.name, t.tag, t.limit) for t in cfg.tasks] == [("cpt_arith_mc", None, None),
                                                             ("cpt_shakespeare_next", "upstream", 100)]
    base = {"model": {"arch": {"model_type": "llama"}, "tokenizer": "t"}, "data": {"sources": [{"name": "a", "path": "p"}]},
            "stages": [{"steps": 1, "mix": {"a": 1.0}}]}
    ok = validate(apply_overrides(base, ["eval.lm_eval.tasks=[{name: x, tag: downstream}, y]"]))
    assert [(t.name, t.tag) for t in ok.eval.lm_eval.tasks] == [("x", "downstream"), ("y", None)]
    # lm-eval's context in the loop: data.seq_len unless eval.lm_eval.max_length says otherwise
    from eval_harness.benchmarks import lm_eval_context

    assert lm_eval_context(ok) == ok.data.seq_len
    assert lm_eval_context(validate(apply_overrides(base, ["eval.lm_eval.max_length=4096"]))) == 4096
    for bad, msg in ((["eval.lm_eval.tasks=[{name: x, tag: sideways}]"], "eval.lm_eval.tasks.0.tag"),
                     (["eval.lm_eval.tasks=[x, x]"], "duplicate tasks"),
                     (["eval.lm_eval.tasks=[{name: x, limit: 0}]"], "eval.lm_eval.tasks.0.limit"),
                     (["eval.lm_eval.bootstrap_iters=1"], "eval.lm_eval.bootstrap_iters"),
                     (["eval.lm_eval.max_length=0"], "eval.lm_eval.max_length")):
        with pytest.raises(ConfigError, match=msg):
            validate(apply_overrides(base, bad))
