"""scripts/soak_faults.py (a benchmark-like tool run by hand: docs/checkpoints.md "Fault soak") stays runnable: one
seeded faulted start of its everything-on run and the clean starts that finish it, on 1 process, compared bitwise with
the uninterrupted run; two stages of 8 steps, not 20 (~25 s of CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_soak_script_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak_faults.py"), "--root", str(tmp_path), "--seeds",
                          "1", "--cycles", "1", "--worlds", "1",
                          "--stage-steps", "8", "8"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "seed 1 run 0: finished on worlds [1], compared bitwise" in out.stdout, out.stdout
    assert "; 0 failure(s)" in out.stdout, out.stdout
