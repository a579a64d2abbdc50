"""lm-eval hook on a tiny model with a real (tiny, trained here) byte-level BPE tokenizer."""

import json
import math
import random

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from conftest import tiny_llama, tiny_tokenizer
from eval_harness.lm_eval_hook import choose_strategy, flatten_results, run_lm_eval_detailed
from eval_harness.task_registry import LOCAL_TASKS_DIR

MC, PPL = "cpt_arith_mc", "cpt_shakespeare_ppl"


def corpus_lines():
    lines = []
    for f in sorted((LOCAL_TASKS_DIR / "data").glob("*.jsonl")):
        for line in f.read_text().splitlines()[:100]:
            row = json.loads(line)
            lines.append(row.get("text") or (row.get("question", row.get("context")) + " " + " ".join(row["choices"])))
    return lines


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    fast = tiny_tokenizer(corpus_lines(), 512, specials=("<|endoftext|>",), pad_token="<|endoftext|>")
    path = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(len(tokenizer), hidden=64, intermediate=128, max_position_embeddings=256,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)


def test_local_tasks_are_registered_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data paths must not depend on the current directory
    from lm_eval.tasks import TaskManager

    names = TaskManager(include_path=[str(LOCAL_TASKS_DIR)], include_defaults=False).all_tasks
    assert {"cpt_arith_mc", "cpt_python_mc", "cpt_shakespeare_mc", "cpt_python_next", "cpt_shakespeare_next",
            "cpt_python_ppl", "cpt_shakespeare_ppl"} <= set(names)


def test_hook_returns_results_for_local_mc_and_perplexity_tasks(model, tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model.train()
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    expect_py, expect_np, expect_torch = random.random(), np.random.rand(), torch.rand(1)
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)

    flat, raw = run_lm_eval_detailed(model, tokenizer, [MC, PPL], limit=8, batch_size=4, max_length=128)

    # the training process's RNG streams and train mode are untouched
    assert (random.random(), np.random.rand(), torch.rand(1)) == (expect_py, expect_np, expect_torch)
    assert model.training

    acc = flat[f"lm_eval/{MC}/acc"]
    assert 0.0 <= acc <= 1.0 and acc * 8 == round(acc * 8)  # 8 examples
    assert 0.0 <= flat[f"lm_eval/{MC}/acc_norm"] <= 1.0
    # a random model over a 512-token vocabulary: a few bits per byte, finite perplexities
    assert 1.0 < flat[f"lm_eval/{PPL}/bits_per_byte"] < 20.0
    assert flat[f"lm_eval/{PPL}/word_perplexity"] > flat[f"lm_eval/{PPL}/byte_perplexity"] > 1.0
    assert raw["n-samples"][MC]["effective"] == 8
    json.dumps(raw)  # serialisable as it is

    # same model, same data: the same numbers again
    again, _ = run_lm_eval_detailed(model, tokenizer, [MC, PPL], limit=8, batch_size=2, max_length=128)
    assert again[f"lm_eval/{MC}/acc"] == acc
    assert again[f"lm_eval/{PPL}/bits_per_byte"] == pytest.approx(flat[f"lm_eval/{PPL}/bits_per_byte"], rel=1e-5)


def test_no_request_bars_when_stderr_is_a_log_file(model, tokenizer, capsys):
    """In a batch job (stderr a file) an evaluation in the loop put lm-eval's "Running loglikelihood requests" and
    "Tokenizing inputs" bars into the log, carriage-return redraws, every evaluation."""
    flat, _ = run_lm_eval_detailed(model, tokenizer, [MC, PPL], limit=2, batch_size=4, max_length=128)
    err = capsys.readouterr().err
    assert flat and "Running loglikelihood requests" not in err and "Tokenizing inputs" not in err, err


def test_no_git_error_in_the_log_outside_a_repository(model, tokenizer, tmp_path, monkeypatch, capfd):
    """lm-eval runs `git describe` for the results' git_hash (which cpt does not keep) with git's stderr on the
    process's: from a folder outside a repository every evaluation wrote "fatal: not a git repository" into the
    batch log. Skipped while cpt evaluates (and torch's environment report with it); lm-eval's own are restored."""
    import lm_eval.evaluator as evaluator

    originals = evaluator.get_git_commit_hash, evaluator.add_env_info
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # (git looks no further up)
    flat, _ = run_lm_eval_detailed(model, tokenizer, [MC], limit=2, batch_size=4, max_length=128)
    err = capfd.readouterr().err
    assert flat and "not a git repository" not in err, err
    assert (evaluator.get_git_commit_hash, evaluator.add_env_info) == originals


def test_training_changes_the_perplexity_result(model, tokenizer):
    """The hook evaluates the live weights, not a copy taken earlier."""
    before, _ = run_lm_eval_detailed(model, tokenizer, [PPL], limit=4, batch_size=4, max_length=128)
    text = json.loads((LOCAL_TASKS_DIR / "data" / "cpt_shakespeare_ppl.jsonl").read_text().splitlines()[0])["text"]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :128]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    after, _ = run_lm_eval_detailed(model, tokenizer, [PPL], limit=4, batch_size=4, max_length=128)
    key = f"lm_eval/{PPL}/bits_per_byte"
    assert after[key] < before[key] - 0.05


def test_flatten_results_names():
    flat = flatten_results({"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A",
                                              "exact_match,strict-match": 0.25, "bits_per_byte,none": 1.5}}})
    assert flat == {"lm_eval/t/acc": 0.5, "lm_eval/t/exact_match@strict-match": 0.25, "lm_eval/t/bits_per_byte": 1.5}


def test_strategy_choice():
    from accelerate.utils import DistributedType

    class Plugin:
        def __init__(self, stage):
            self.zero_stage = stage

    class Acc:
        def __init__(self, n, dt, stage=None):
            self.num_processes, self.distributed_type = n, dt
            self.state = type("S", (), {"deepspeed_plugin": Plugin(stage) if stage else None})()

    assert choose_strategy(None) == "single"
    assert choose_strategy(Acc(1, DistributedType.NO)) == "single"
    assert choose_strategy(Acc(2, DistributedType.MULTI_GPU)) == "data_parallel"
    assert choose_strategy(Acc(2, DistributedType.MULTI_CPU)) == "data_parallel"
    assert choose_strategy(Acc(2, DistributedType.DEEPSPEED, 2)) == "data_parallel"
    assert choose_strategy(Acc(2, DistributedType.DEEPSPEED, 3)) == "replicated"
    assert choose_strategy(Acc(2, DistributedType.FSDP)) == "replicated"


# ---- cpt eval on saved checkpoints (HF export and LoRA adapter)


def test_cpt_eval_on_export_and_lora_adapter(model, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    from cpt.commands.eval import main as eval_main
    from cpt.commands.eval import text_heldout_tokens
    from cpt.evaluate import heldout_loss

    base_dir = tmp_path / "run" / "export"
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    text = tmp_path / "shk.jsonl"
    text.write_text((LOCAL_TASKS_DIR / "data" / "cpt_shakespeare_ppl.jsonl").read_text())

    out = tmp_path / "base.json"
    args = ["--tasks", MC, "--limit", "4", "--heldout", f"shk={text}:upstream", "--seq-len", "32",
            "--max-tokens", "512", "--bootstrap-iters", "0", "--device", "cpu"]
    assert eval_main([str(tmp_path / "run"), *args, "--out", str(out)]) == 0  # a run dir: uses run/export
    base = json.loads(out.read_text())
    toks = text_heldout_tokens(text, tokenizer, 32, 512)
    assert base["heldout"]["shk"]["loss"] == pytest.approx(heldout_loss(model, toks, 8), rel=1e-5)
    assert base["heldout"]["shk"]["tokens"] == 512 and base["heldout"]["shk"]["tag"] == "upstream"
    assert 0 <= base["lm_eval"][f"lm_eval/{MC}/acc"] <= 1
    assert base["lm_eval_results"]["n-samples"][MC]["effective"] == 4
    # --document-masking: the held-out documents attend only to themselves
    out = tmp_path / "masked.json"
    assert eval_main([str(base_dir), "--heldout", f"shk={text}:upstream", "--seq-len", "32", "--max-tokens", "512",
                      "--device", "cpu", "--document-masking", "--out", str(out)]) == 0
    masked = json.loads(out.read_text())["heldout"]["shk"]
    assert masked["document_masking"] is True and base["heldout"]["shk"]["document_masking"] is False
    assert masked["loss"] == pytest.approx(heldout_loss(model, toks, 8, eos_id=tokenizer.eos_token_id), rel=1e-5)
    assert masked["loss"] != pytest.approx(base["heldout"]["shk"]["loss"], rel=1e-6)

    # a LoRA adapter whose B matrices are not zero, so it really changes the model
    torch.manual_seed(3)
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    out = tmp_path / "lora.json"
    assert eval_main([str(adapter_dir), *args, "--out", str(out)]) == 0  # base from adapter_config.json
    lora = json.loads(out.read_text())
    expected = heldout_loss(peft_model, toks, 8)
    assert lora["heldout"]["shk"]["loss"] == pytest.approx(expected, rel=1e-5)
    assert abs(lora["heldout"]["shk"]["loss"] - base["heldout"]["shk"]["loss"]) > 1e-3

    assert eval_main([str(tmp_path / "nothing-here"), "--tasks", MC]) == 2
    assert eval_main([str(base_dir), "--heldout", "x=foo"]) == 2


# ---- benchmarks that track forgetting: tagged tasks on seeded subsets, stderrs, deltas


def test_tracker_scores_tagged_tasks_on_a_fixed_seeded_subset(model, tokenizer, tmp_path, monkeypatch):
    from eval_harness.benchmarks import BenchmarkTracker, TaskSpec, seeded_subset

    monkeypatch.chdir(tmp_path)
    up, down = "cpt_shakespeare_next", PPL
    tracker = BenchmarkTracker([TaskSpec(up, "upstream", 12), TaskSpec(down, "downstream")], limit=6, seed=5,
                               batch_size=4, max_length=128, bootstrap_iters=50)
    m0 = tracker.evaluate(model, tokenizer, 0)
    assert tracker.samples == {up: seeded_subset(up, 300, 12, 5), down: seeded_subset(down, 40, 6, 5)}
    assert tracker.samples[up] != list(range(12))
    assert m0[f"lm_eval/{up}/acc"] * 12 == round(m0[f"lm_eval/{up}/acc"] * 12)  # 12 documents
    # standard errors for every score: lm-eval's closed form for accuracy, a bootstrap for bits per byte
    acc, n = m0[f"lm_eval/{up}/acc"], 12
    assert m0[f"lm_eval/{up}/acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / (n - 1)))
    assert 0 < m0[f"lm_eval/{down}/bits_per_byte_stderr"] < m0[f"lm_eval/{down}/bits_per_byte"]
    assert m0[f"lm_eval_forgetting/{up}/acc"] == 0.0 and m0[f"lm_eval_adaptation/{down}/bits_per_byte"] == 0.0
    assert m0["time/lm_eval_s"] > 0

    # the same model on the same documents: the same scores, no change
    again = tracker.evaluate(model, tokenizer, 1)
    assert again[f"lm_eval/{up}/acc"] == m0[f"lm_eval/{up}/acc"]
    assert again[f"lm_eval_adaptation/{down}/bits_per_byte"] == pytest.approx(0.0, abs=1e-6)

    # a changed model: deltas against step 0, signed by higher_is_better, with their stderrs
    torch.manual_seed(1)
    changed = type(model)(model.config)
    later = tracker.evaluate(changed, tokenizer, 2)
    bpb0, bpb = m0[f"lm_eval/{down}/bits_per_byte"], later[f"lm_eval/{down}/bits_per_byte"]
    assert bpb != pytest.approx(bpb0, rel=1e-4)
    assert later[f"lm_eval_adaptation/{down}/bits_per_byte"] == pytest.approx(bpb0 - bpb)  # lower is better
    assert later[f"lm_eval_forgetting/{up}/acc"] == pytest.approx(m0[f"lm_eval/{up}/acc"] - later[f"lm_eval/{up}/acc"])
    assert later[f"lm_eval_adaptation/{down}/bits_per_byte_stderr"] == pytest.approx(
        math.hypot(m0[f"lm_eval/{down}/bits_per_byte_stderr"], later[f"lm_eval/{down}/bits_per_byte_stderr"]))
    rows = {r["task"] + "/" + r["metric"]: r for r in tracker.summary()}
    assert rows[f"{down}/bits_per_byte"]["step0"] == bpb0 and rows[f"{down}/bits_per_byte"]["final_step"] == 2


def test_tracker_says_when_a_score_is_not_finite(model, tokenizer, caplog):
    """lm-eval's NaN scores (here a model gone NaN) are dropped from the logged metrics; nothing said so, and the
    summary's "final" (printed without its step) silently stayed an earlier evaluation's."""
    import copy

    from eval_harness.benchmarks import BenchmarkTracker, TaskSpec

    tracker = BenchmarkTracker([TaskSpec(PPL, "downstream")], limit=2, seed=0, max_length=128, bootstrap_iters=0)
    tracker.evaluate(model, tokenizer, 0)
    diverged = copy.deepcopy(model)
    with torch.no_grad():
        diverged.lm_head.weight.fill_(float("nan"))
    with caplog.at_level("WARNING"):
        metrics = tracker.evaluate(diverged, tokenizer, 3)
    assert f"lm_eval/{PPL}/bits_per_byte" not in metrics
    assert (f"lm-eval step 3: {PPL}/bits_per_byte is not finite (NaN or inf): not logged; the summary keeps step 0's"
            in caplog.text)


def test_cpt_eval_against_a_baseline_prints_deltas_with_stderrs(model, tokenizer, tmp_path, capsys):
    """`cpt eval ADAPTER --baseline BASE`: a LoRA adapter's scores beside its base model's, on the same seeded items."""
    from peft import LoraConfig, get_peft_model

    from cpt.commands.eval import main as eval_main
    from eval_harness.benchmarks import seeded_subset

    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    torch.manual_seed(4)
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)

    out = tmp_path / "cmp.json"
    tasks = f"cpt_shakespeare_next,{PPL}"
    assert eval_main([str(adapter_dir), "--baseline", str(base_dir), "--tasks", tasks, "--limit", "8", "--seed", "3",
                      "--bootstrap-iters", "50", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    model_scores, base_scores = result["lm_eval"], result["baseline"]["lm_eval"]
    rows = {f"{r['task']}/{r['metric']}": r for r in result["comparison"]}
    key = f"{PPL}/bits_per_byte"
    assert rows[key]["delta"] == pytest.approx(model_scores[f"lm_eval/{key}"] - base_scores[f"lm_eval/{key}"])
    assert rows[key]["delta"] != 0.0 and rows[key]["delta_stderr"] > 0
    assert rows[key]["better"] == (rows[key]["delta"] < 0)  # lower bits per byte is better
    assert rows["cpt_shakespeare_next/acc"]["delta_stderr"] is not None
    assert "against the baseline" in printed and key in printed and " ± " in printed
    # both models were scored on the same seeded subset
    for r in (result, result["baseline"]):
        assert r["lm_eval_results"]["n-samples"]["cpt_shakespeare_next"]["effective"] == 8
    assert len(seeded_subset("cpt_shakespeare_next", 300, 8, 3)) == 8


def test_bundled_tasks_load_without_lm_eval_warnings(caplog):
    """Every bundled task gives each metric its aggregation and direction: lm-eval warned, for every metric of the
    perplexity tasks, at every evaluation ("metric word_perplexity is defined, but aggregation is not")."""
    import logging

    from lm_eval.tasks import get_task_dict

    from eval_harness.task_registry import make_task_manager

    names = ["cpt_local"]
    with caplog.at_level(logging.WARNING):
        tasks = get_task_dict(names, make_task_manager(names))
    loaded = {t.config.task for t in tasks.values() if hasattr(t, "config")}
    assert {"cpt_python_ppl", "cpt_shakespeare_ppl", "cpt_arith_mc"} <= loaded, loaded
    assert not [r.getMessage() for r in caplog.records if "aggregation is not" in r.getMessage()
                or "higher_is_better" in r.getMessage()]


def test_cpt_eval_out_is_strict_json_and_says_non_finite_scores(model, tokenizer, tmp_path, capsys):
    """A diverged model (NaN weights): `--out` held NaN (json.dumps' default, refused by strict parsers: jq, JS, Go)
    and the summary left out the perplexity task, whose scores lm-eval computed as NaN, without a word."""
    import copy

    from cpt.commands.eval import main as eval_main

    diverged = copy.deepcopy(model)
    with torch.no_grad():
        diverged.lm_head.weight.fill_(float("nan"))
    export = tmp_path / "export"
    diverged.save_pretrained(export)
    tokenizer.save_pretrained(export)
    text = tmp_path / "shk.jsonl"
    text.write_text((LOCAL_TASKS_DIR / "data" / "cpt_shakespeare_ppl.jsonl").read_text())
    out = tmp_path / "r.json"
    assert eval_main([str(export), "--heldout", f"shk={text}:upstream", "--seq-len", "32", "--max-tokens", "128",
                      "--tasks", PPL, "--limit", "2", "--bootstrap-iters", "0", "--device", "cpu", "--out", str(out)]) == 0

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    result = json.loads(out.read_text(), parse_constant=refuse)
    assert result["heldout"]["shk"]["loss"] is None and result["heldout"]["shk"]["tokens"] == 128
    printed = capsys.readouterr().out
    assert f"lm_eval/{PPL}/bits_per_byte" in printed and "not finite" in printed
    # a plain line as each part starts (lm-eval's bars are off in a batch log: it was silent until the end)
    assert f"cpt eval: {export}: held-out shk\n" in printed and f"cpt eval: {export}: lm-eval {PPL}\n" in printed
