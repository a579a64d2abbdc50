"""scripts/bench_throughput.py stays runnable: the tiny CPU shape end to end, both frameworks, in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_throughput_tiny_cpu(tmp_path):
    out = tmp_path / "out.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_throughput.py"), "--shapes", "tiny", "--steps", "4", "--warmup", "2",
         "--workdir", str(tmp_path / "work"), "--json", str(out), "--cpt-set", "train.loss_chunk_tokens=64",
         "--cpt-profile", str(tmp_path / "profile")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "cpt/Trainer" in proc.stdout  # the table was printed

    report = json.loads(out.read_text())
    by = {r["framework"]: r for r in report["results"] if r["shape"] == "tiny"}
    assert set(by) == {"trainer", "cpt"}
    for fw, r in by.items():
        assert "error" not in r, (fw, r)
        assert r["tokens_per_s"] > 0 and r["peak_mem_gb"] > 0 and r["step_time_s"] > 0
        assert r["mfu"] is None  # no peak FLOP/s on a CPU
        assert r["n_params"] == by["trainer"]["n_params"]  # the same model shape on both sides
        assert abs(r["final_loss"] - 6.238) < 0.2  # ln(512): random tokens, random init
    assert by["cpt"]["cpt_logged_tokens_per_s"] > 0  # read from cpt's metrics.jsonl
    # the start-up cost to the first log record: step 2 here (log_every = gcd(warmup 2, steps 4)), step 1 in gpu_session.sh
    assert 0 < by["cpt"]["cpt_first_step_s"] < by["cpt"]["train_s"] and by["cpt"]["cpt_first_logged_step"] == 2
    ratio = report["ratio_cpt_over_trainer"]["tiny"]
    assert ratio == pytest.approx(by["cpt"]["tokens_per_s"] / by["trainer"]["tokens_per_s"])

    s = report["settings"]["tiny"]
    assert (s["seq_len"], s["micro_batch"], s["global_batch"], s["precision"]) == (128, 4, 8, "fp32")
    assert s["cpt_overrides"] == ["train.loss_chunk_tokens=64"]
    saved = [yaml.safe_load(p.read_text()) for p in (tmp_path / "work").rglob("config.yaml")]
    assert [c["train"]["loss_chunk_tokens"] for c in saved if "train" in c] == [64]  # --cpt-set reached cpt's run
    assert report["versions"]["torch"] and report["device"].startswith("cpu")
    # --cpt-profile: one step after the timed window, profiled; its ops table and trace copied out
    assert sorted(p.name for p in (tmp_path / "profile").iterdir()) == ["tiny-cpt.ops.txt", "tiny-cpt.trace.json.gz"]
    assert (tmp_path / "profile" / "tiny-cpt.ops.txt").read_text().startswith("# steps 7..7, rank 0")
    assert by["cpt"]["cpt_profile"] == [str(tmp_path / "profile" / n) for n in ("tiny-cpt.ops.txt", "tiny-cpt.trace.json.gz")]


def test_gpu_session_script_runs_its_parts_and_skips_those_set_to_zero(tmp_path):
    """scripts/gpu_session.sh as docs/benchmarks.md runs it (benchmarks skipped so that it fits a CPU machine): a
    limit of 0 skips a part, the GPU tests run (and skip without CUDA), every part's log is packed into
    $OUT/results.tgz, and BUDGET skips the parts it has no time left for."""
    import tarfile

    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "WHEELS": str(tmp_path / "no-wheels"), "CUDA_VISIBLE_DEVICES": "",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "T_LLAMA_TR": "0", "T_MB8": "0", "T_SMOL_TR": "0", "T_SMOL16": "0", "T_LIGER": "0", "T_SMOL": "0",
           "T_MB8R": "0", "T_MB8RW": "0", "T_SMOL16R": "0", "T_FP8": "0", "T_FP8W": "0", "T_MB8C": "0"}
    proc = subprocess.run(["bash", "scripts/gpu_session.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for part in ("llama1b_trainer", "llama1b_mb8", "smollm2_trainer", "smollm2_mb16", "llama1b_mb8_liger",
                 "smollm2_mb8", "llama1b_mb8_chunk8k", "llama1b_mb8_regional", "llama1b_mb8_regional_warm", "smollm2_mb16_regional", "llama1b_mb8_regional_fp8", "llama1b_mb8_fp8", "bench_loss"):
        assert f"=== {part}: skipped" in proc.stdout
    assert "=== gpu_tests: exit 0" in proc.stdout and "=== gpu_launchers: exit 0" in proc.stdout, proc.stdout
    with tarfile.open(out / "results.tgz") as tar:
        assert "skipped" in tar.extractfile("./gpu_tests.log").read().decode()  # no CUDA here
    assert not (out / "r").exists()
    env["BUDGET"] = "10"  # no part starts with under 30 s of the budget left
    proc = subprocess.run(["bash", "scripts/gpu_session.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert "=== gpu_tests: skipped (" in proc.stdout, proc.stdout
