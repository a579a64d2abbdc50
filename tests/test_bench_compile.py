"""scripts/bench_compile.py stays runnable: 2 layers with the aot_eager backend (no code generation), each mode in its
own process, its JSON line checked (what it measured, not how fast: no timing assertions)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_compile_small():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_compile.py"), "--layers", "2", "--hidden", "32",
                           "--seq-len", "16", "--steps", "1", "--backend", "aot_eager", "--modes", "whole,regional",
                           "--warm"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (report["layers"], report["hidden"], report["backend"]) == (2, 32, "aot_eager")
    modes = report["modes"]
    assert sorted(modes) == ["regional", "whole"]
    assert modes["whole"]["graphs"] == modes["regional"]["graphs"] == 1  # regional: one graph for both layers
    assert modes["whole"]["first_loss"] == modes["regional"]["first_loss"]  # the same model and batch
    assert all(modes[m]["first_step_s"] > 0 and modes[m]["step_s"] > 0 for m in modes)
    ratio = modes["whole"]["first_step_s"] / modes["regional"]["first_step_s"]
    assert abs(report["first_step_ratio_whole_to_regional"] - ratio) < 0.01
    # --warm: each mode again in a fresh process over the first one's cache (aot_eager generates no code to cache)
    for m in ("whole", "regional"):
        warm = modes[m]["warm"]
        assert warm["first_loss"] == modes[m]["first_loss"] and warm["first_step_s"] > 0
        assert report[f"first_step_ratio_cold_to_warm_{m}"] == round(modes[m]["first_step_s"] / warm["first_step_s"], 2)
