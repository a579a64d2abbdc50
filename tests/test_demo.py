"""The demo end to end at reduced size: base pre-training on Shakespeare, then CPT on Python with replay."""

import json
import math

import pytest
import torch

from cpt.cli import main
from cpt.metrics import read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    import contextlib
    import io

    out = tmp_path_factory.mktemp("demo") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--out", str(out), "--scale", "tiny", "--set", "train.progress_bar=false"]) == 0
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def demo(demo_run):
    return demo_run[0]


def test_outputs_exist(demo):
    cpt = demo / "cpt"
    for path in ("metrics.jsonl", "config.yaml", "export/config.json", "export/model.safetensors",
                 "export/tokenizer.json", "report/report.html"):
        assert (cpt / path).is_file(), path
    assert list((cpt / "report").glob("*.png"))
    assert list((cpt / "wandb").glob("offline-run-*/run-*.wandb"))
    assert (demo / "base" / "export" / "model.safetensors").is_file()
    for name in ("shakespeare", "python"):
        manifest = json.loads((demo / "data" / name / "manifest.json").read_text())
        assert manifest["num_tokens"] > 0
        # named by its folder (a run given shards of another tokenizer names it: it said 'TokenizersBackend')
        assert manifest["tokenizer"]["name"] == str(demo / "tokenizer")
        assert (demo / "data" / name / "heldout" / "manifest.json").is_file()


def test_losses_finite_and_both_sets_at_step_zero(demo):
    recs = read_metrics(demo / "cpt" / "metrics.jsonl")
    step0 = {k: v for r in recs if r["step"] == 0 for k, v in r.items()}
    assert "eval/shakespeare/loss" in step0 and "eval/python/loss" in step0
    assert step0["forgetting/shakespeare"] == 0.0 and step0["adaptation/python"] == 0.0
    train = [r["train/loss"] for r in recs if "train/loss" in r]
    assert train and all(math.isfinite(v) for v in train)
    evals = [r for r in recs if "eval/python/loss" in r]
    assert len(evals) >= 3
    # CPT adapts: downstream loss falls from the base model's
    assert evals[-1]["eval/python/loss"] < step0["eval/python/loss"]
    # the mixer delivered the configured 25% replay exactly
    last = [r for r in recs if "data/tokens/shakespeare" in r][-1]
    total = last["data/tokens/shakespeare"] + last["data/tokens/python"]
    assert last["data/tokens/shakespeare"] / total == pytest.approx(0.25)
    # the CPT run started from the base model: its step-0 upstream loss is the base run's final one
    base_final = [r for r in read_metrics(demo / "base" / "metrics.jsonl") if "eval/shakespeare/loss" in r][-1]
    assert step0["eval/shakespeare/loss"] == pytest.approx(base_final["eval/shakespeare/loss"], abs=1e-4)


def test_export_reloads_with_the_trained_weights(demo):
    """AutoModelForCausalLM loads the export, and its held-out loss is the one the run logged at the end."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt.data.loader import load_heldout
    from cpt.data.sources import HeldoutConfig
    from cpt.evaluate import heldout_loss

    export = demo / "cpt" / "export"
    model = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    import yaml

    cfg = yaml.safe_load((demo / "cpt" / "config.yaml").read_text())
    held = HeldoutConfig(name="python", path=str(demo / "data" / "python" / "heldout"), tag="downstream")
    tokens = load_heldout(held, tok, cfg["data"]["seq_len"], cfg["eval"]["tokens_per_set"])
    loss = heldout_loss(model, tokens, batch_size=8)
    logged = [r for r in read_metrics(demo / "cpt" / "metrics.jsonl") if "eval/python/loss" in r][-1]
    assert loss == pytest.approx(logged["eval/python/loss"], abs=1e-4)
    # and loading it twice gives identical logits
    again = AutoModelForCausalLM.from_pretrained(export)
    x = tokens[:2]
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)


def test_demo_prints_summary_and_where_outputs_are(demo_run):
    out, printed = demo_run
    table = printed[printed.rindex("step 0"):]
    assert "shakespeare" in table and "upstream" in table and "python" in table and "downstream" in table
    assert "forgetting" in table and "adaptation" in table and "worst" in table
    for line in ("metrics (JSONL)", "W&B offline run", "HF checkpoint", "plots + report"):
        assert line in printed
    assert str(out / "cpt" / "export") in printed


def test_demo_runs_again_into_the_same_folder(demo_run):
    """Running the demo a second time replaces its two runs (cpt train alone refuses to start over in a finished
    run's folder) and ends as the first did. Last in this file: it rewrites the shared demo folder."""
    import contextlib
    import io

    out, _ = demo_run
    first = [r["train/loss"] for r in read_metrics(out / "cpt") if "train/loss" in r]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--out", str(out), "--scale", "tiny", "--set", "train.progress_bar=false"]) == 0
    text = printed.getvalue()
    for run in ("base", "cpt"):
        assert f"(replacing the previous demo run in {out / run})" in text
    assert not (out / "cpt" / "metrics.jsonl.1").exists()  # replaced, not appended to
    assert [r["train/loss"] for r in read_metrics(out / "cpt") if "train/loss" in r] == pytest.approx(first, rel=1e-5)
