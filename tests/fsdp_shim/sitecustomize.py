"""Test scaffolding: lets an unmodified `scripts/launch.sh run.yaml fsdp` run FSDP2 on CPU processes.

With this folder on PYTHONPATH and CPT_TEST_FSDP_ON_CPU=1, every rank started by `accelerate launch` (LOCAL_RANK
set; the launcher process itself is left alone) relabels its multi-CPU gloo state before cpt builds its
Accelerator, as tests/fsdp_on_cpu.py explains. Subprocesses of a rank are left alone too.
"""

import os
import sys

if os.environ.get("CPT_TEST_FSDP_ON_CPU") == "1" and "LOCAL_RANK" in os.environ:
    # only this rank, not the Python subprocesses it starts (lm-eval runs `python -m pip list` to record the
    # environment): they inherit LOCAL_RANK and would join the rank's process group and wait there forever
    del os.environ["CPT_TEST_FSDP_ON_CPU"]
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
    from fsdp_on_cpu import force_fsdp_on_cpu

    force_fsdp_on_cpu()
