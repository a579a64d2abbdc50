"""`accelerate launch` of a test script on 2 CPU processes (gloo), the same way for every test file."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def accelerate_launch(mode: str) -> tuple[list[str], dict[str, str]]:
    """Command prefix (to which the script and its arguments are appended) and environment for ``mode``:

    * ``ddp``: ACCELERATE_USE_CPU=1 + --multi_gpu (multi-CPU DDP);
    * ``zero3``: DeepSpeed ZeRO-3, without ACCELERATE_USE_CPU (which would silently turn it into plain DDP);
    * ``fsdp``: FSDP2 on CPU through accelerate's real FSDP branch; the script must call
      ``fsdp_on_cpu.force_fsdp_on_cpu()`` before building its Accelerator (tests/ is on PYTHONPATH).
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    env.pop("ACCELERATE_USE_CPU", None)
    args = [str(VENV_BIN / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no"]
    if mode == "zero3":
        args += ["--use_deepspeed", "--zero_stage", "3", "--gradient_accumulation_steps", "1"]
    elif mode == "fsdp":
        env["ACCELERATE_USE_CPU"] = "1"
        args += ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"]
    elif mode == "ddp":
        env["ACCELERATE_USE_CPU"] = "1"
        args += ["--multi_gpu"]
    else:
        raise ValueError(f"unknown launch mode {mode!r}")
    return args, env
