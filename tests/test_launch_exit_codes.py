"""scripts/accelerate_launch.sh (what scripts/launch.sh and scripts/launch_deepspeed.sh exec) with
`--preempted-exit-code 75`: the exit status it gives for each way its ranks can stop, from the line the node's first
rank writes to $CPT_PREEMPTED_MARKER (`cpt train`: preempted | start-up | finished) and the signal the script itself
got. A stand-in `accelerate` starts one stand-in rank (no training); about 1 s per case. The real launchers are
tested end to end in tests/test_launch_shipped.py and tests/test_train.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# the stand-in rank: ``MARKER(line)`` writes the node's line as `cpt train` does; READY once its handlers are in place
RANK_PRELUDE = ("import os, signal, sys, time\n"
                "def MARKER(line):\n"
                "    open(os.environ['CPT_PREEMPTED_MARKER'], 'w').write(line + '\\n')\n")
CASES = {
    # the run finished (its export written); the launcher, signalled during the export, exits 1: the run is done
    "finished": (RANK_PRELUDE + "MARKER('finished')\nopen('READY', 'w')\n", "1", False, 0),
    # SIGTERM to the script while the rank starts: `cpt train` stops (nothing to save) and writes start-up
    "start-up": (RANK_PRELUDE + "def stop(*_):\n    MARKER('start-up')\n    sys.exit(0)\n"
                 "signal.signal(signal.SIGTERM, stop)\nopen('READY', 'w')\ntime.sleep(60)\n", "rc", True, 75),
    # the same line without a signal to the script: the launcher ended the rank after another rank failed
    "start-up, launcher's SIGTERM": (RANK_PRELUDE + "MARKER('start-up')\nopen('READY', 'w')\n", "1", False, 1),
    # the rank ends by the signal's default action before `cpt` installed its handlers: nothing was trained
    "before the handlers": (RANK_PRELUDE + "open('READY', 'w')\ntime.sleep(60)\n", "1 if rc else 0", True, 75),
    # a preempted stop: checkpoint saved; torchrun, signalled too, exits 1
    "preempted": (RANK_PRELUDE + "def stop(*_):\n    MARKER('preempted')\n    sys.exit(0)\n"
                  "signal.signal(signal.SIGTERM, stop)\nopen('READY', 'w')\ntime.sleep(60)\n", "1", True, 75),
    # a failure, no signal anywhere: the launcher's status
    "failed": (RANK_PRELUDE + "open('READY', 'w')\nsys.exit(1)\n", "1 if rc else 0", False, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_launch_exit_status_follows_how_the_ranks_stopped(tmp_path, case):
    rank, launcher_exit, signal_script, want = CASES[case]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "accelerate"
    fake.write_text(f"#!{sys.executable}\nimport subprocess, sys\n"
                    f"rc = subprocess.call([sys.executable, '-c', {rank!r}], cwd={str(tmp_path)!r})\n"
                    f"sys.exit({launcher_exit})\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "accelerate_launch.sh"), "-m", "cpt.cli", "train", "run.yaml",
                             "--preempted-exit-code", "75"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    t0 = time.time()
    while not (tmp_path / "READY").exists():
        assert proc.poll() is None or case in ("finished", "start-up, launcher's SIGTERM", "failed"), proc.stdout.read()
        assert time.time() - t0 < 30, "the stand-in rank did not start"
        time.sleep(0.02)
    if signal_script:
        proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == want, (case, out)
    expected_line = {"finished": "after its ranks finished the run (it was signalled too): exit 0",
                     "start-up": "the run was stopped while starting",
                     "before the handlers": "the ranks ended on the TERM passed to them before they could answer it",
                     "preempted": "the run was preempted (its checkpoint is saved): exit 75"}.get(case)
    if expected_line:
        assert expected_line in out, out
    else:
        assert "accelerate_launch.sh:" not in out, out
    assert not list(tmp_path.glob("cpt-launch.*"))  # the marker's folder is removed


def test_num_gpus_that_is_not_a_count_is_one_line():
    """NUM_GPUS=0 (or a typo) ran `accelerate launch --num_processes 0`: a torchrun AssertionError traceback."""
    for script, args in (("launch.sh", ["ddp"]), ("launch_deepspeed.sh", ["2"])):
        for bad in ("0", "x", "-1"):
            done = subprocess.run(["bash", str(ROOT / "scripts" / script), str(ROOT / "configs" / "full-cpt.yaml"), *args],
                                  env={**os.environ, "NUM_GPUS": bad}, capture_output=True, text=True, timeout=60)
            assert done.returncode == 2 and done.stderr.strip() == (
                f"scripts/{script}: NUM_GPUS must be a whole number >= 1, not '{bad}'"), (script, bad, done.stderr)
