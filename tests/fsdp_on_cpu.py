"""Run accelerate's real FSDP2 code paths on CPU processes (gloo), for tests.

accelerate 1.x only turns a launch into `DistributedType.FSDP` when the processes sit on an accelerator
(the switch lives in the MULTI_GPU/MULTI_NPU/... branch of `AcceleratorState`); on CPU it falls back to plain
multi-CPU DDP. PyTorch's FSDP2 (`fully_shard`, DTensor parameters) itself works on CPU with gloo. So a test
process first sets up the usual multi-CPU gloo state, then relabels it MULTI_GPU *after* the process group and
the (CPU) device are fixed: the `Accelerator()` built next takes accelerate's FSDP branch — `fsdp2_prepare_model`,
sharded `save_state`/`load_state`, `get_state_dict` gathering — exactly as on GPUs, only the collectives run on gloo.

Test scaffolding only: cpt itself refuses FSDP without GPUs (see `cpt.distributed.build_accelerator`).

Usage: `force_fsdp_on_cpu()` at the top of a script started by `accelerate launch --use_fsdp ...` with
ACCELERATE_USE_CPU=1; to run an unmodified `cpt train` (or launch script), tests/fsdp_shim calls it in every rank
(`launching.rank_env(cpu=True, fsdp_on_cpu=True)`).
"""


def force_fsdp_on_cpu() -> None:
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(cpu=True, backend="gloo")
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(f"expected a multi-CPU launch (ACCELERATE_USE_CPU=1, 2+ processes), got {state.distributed_type}")
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
