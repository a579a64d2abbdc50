"""scripts/bench_data.py stays runnable: both parts (`cpt prepare` against raw tokenizers, the stream + mixer in a
pinned child process) at tiny sizes, in a subprocess; the printed JSON has every measured field with consistent
values. No timing assertions (the sizes are far too small for the numbers to mean anything)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 5


@pytest.mark.slow
def test_bench_data_tiny(tmp_path):
    work = tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_data.py"), "--workdir", str(work), "--text-mb", "0.2",
         "--stream-tokens", "300000", "--steps", str(STEPS), "--repeats", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["cores"] >= 1 and results["cpu"]

    prep = results["prepare"]
    assert prep["documents"] > 0 and prep["tokens"] > prep["documents"] and 0 < prep["megabytes"] < 1
    for variant in ("raw_encode_batch_fast", "raw_encode_batch", "prepare_np1", "prepare_np2"):
        assert prep[f"{variant}_tokens_per_s"] > 0, variant
    for n in (1, 2):  # ratio of the best times = inverse ratio of the throughputs
        assert prep[f"prepare_np{n}_vs_raw_fast_best"] == pytest.approx(
            prep[f"prepare_np{n}_tokens_per_s"] / prep["raw_encode_batch_fast_tokens_per_s"])
    assert prep["prepare_np1_vs_raw_fast_median_round"] == pytest.approx(prep["prepare_np1_vs_raw_fast_best"])  # 1 round
    # both prepares tokenized the same texts as the raw encoder: its tokens plus one EOS per document
    for n in (1, 2):
        manifest = json.loads((work / f"prepared_np{n}" / "manifest.json").read_text())
        assert (manifest["num_tokens"], manifest["num_documents"]) == (prep["tokens"] + prep["documents"], prep["documents"])

    stream = results["stream"]
    assert stream["tokens"] == STEPS * 64 * 2048  # STEPS batches of [64, 2048]
    assert stream["seconds"] > 0 and stream["cpu_seconds"] > 0
    assert stream["tokens_per_s"] == pytest.approx(stream["tokens"] / stream["seconds"])
    assert stream["batches_per_s"] == pytest.approx(STEPS / stream["seconds"])
    assert stream["tokens_per_cpu_s"] == pytest.approx(stream["tokens"] / stream["cpu_seconds"])
    for source, tokens in (("new", 300_000), ("old", 30_000)):  # the synthetic sources at the requested sizes
        assert json.loads((work / source / "manifest.json").read_text())["num_tokens"] == tokens
