"""What cpt needs to know about the processes of a run, in one place: the Accelerator the loop trains with
(:func:`build_accelerator`), which backend accelerate set up, whether all ranks agree on a decision, sums over ranks,
the model inside the wrappers, refusing sharded weights, the preemption signal (:class:`PreemptionFlag`), and the
end of a run's process group (:func:`retire_process_group`).

Every function takes the ``Accelerator`` (``acc``) the loop built (or ``None``: one process, no accelerator where
noted). Collectives must be called by every rank at the same point, like any collective.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
import signal
from datetime import timedelta
from enum import Enum
from typing import Any

import torch
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from torch import nn

from cpt import is_cpt_program
from cpt.rank_failure import SignalWatch, cancel_stacks, lost_peer, remember_store, stacks_if_still_running
from cpt.stop_signals import ignore_signals_after_the_run  # (re-exported)


class LaunchError(RuntimeError):
    """The processes a launch gave cannot train this config (one clear line, no traceback, from ``cpt train``)."""


class Backend(Enum):
    """How the processes of a run share the model (from accelerate's ``distributed_type``)."""

    SINGLE = "single"  # no distributed backend (accelerate's NO): one process
    DDP = "ddp"  # data parallel with the full weights on every rank (MULTI_GPU, MULTI_CPU, MULTI_XPU, ...)
    FSDP = "fsdp"
    DEEPSPEED = "deepspeed"  # any ZeRO stage: see zero_stage()
    OTHER = "other"  # XLA, Megatron-LM: nothing in cpt is specialised for them


_BACKENDS = {DistributedType.NO: Backend.SINGLE, DistributedType.FSDP: Backend.FSDP,
             DistributedType.DEEPSPEED: Backend.DEEPSPEED, DistributedType.XLA: Backend.OTHER,
             DistributedType.MEGATRON_LM: Backend.OTHER}  # every MULTI_* type (MULTI_GPU, MULTI_CPU, ...) is DDP


def backend(acc) -> Backend:
    """The backend of ``acc`` (``None``: no accelerator, one process)."""
    if acc is None:
        return Backend.SINGLE
    return _BACKENDS.get(DistributedType(acc.distributed_type), Backend.DDP)


def zero_stage(acc) -> int:
    """The DeepSpeed ZeRO stage of ``acc`` (0 when it is not DeepSpeed)."""
    if backend(acc) is not Backend.DEEPSPEED:
        return 0
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    return int(getattr(plugin, "zero_stage", None) or 0) if plugin is not None else 0


def shards_weights(acc) -> bool:
    """Whether no rank holds the full weights between steps: FSDP or DeepSpeed ZeRO-3."""
    return backend(acc) is Backend.FSDP or zero_stage(acc) == 3


# ---------------------------------------------------------------- collectives


def all_ranks_agree(acc, ok: bool) -> bool:
    """True on every rank only if ``ok`` is true on every rank (so all ranks take the same branch); one collective
    and one host read with several processes, nothing with one."""
    if acc.num_processes == 1:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=acc.device)
    return float(acc.reduce(flag, reduction="sum").item()) == 0.0


def any_rank(acc, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    return not all_ranks_agree(acc, not flag)


def from_main_process(acc, value):
    """The main process's ``value`` (a picklable object) on every rank: one collective with several processes."""
    if acc.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def from_every_rank(acc, value) -> list:
    """Every rank's ``value`` (a picklable object), in rank order, on every rank: one collective with several
    processes, ``[value]`` with one."""
    if acc is None or acc.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def rank_and_world(acc) -> tuple[int, int]:
    """(rank, world size): of ``acc``; without one, of an initialised ``torch.distributed`` group, else (0, 1)."""
    if acc is not None:
        return acc.process_index, acc.num_processes
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def sum_across_ranks(t: torch.Tensor, acc) -> torch.Tensor:
    """``t`` summed over the ranks (a device collective, no host read); ``t`` itself with one process. Without an
    accelerator, over an initialised ``torch.distributed`` group (on a copy)."""
    if acc is not None:
        if acc.num_processes > 1:
            return acc.reduce(t, reduction="sum")
        return t
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        t = t.clone()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


# ---------------------------------------------------------------- the model inside the wrappers


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / accelerate wrappers (kept in .module) and torch.compile's (._orig_mod); parameter
    names then match the bare model's."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def refuse_sharded(named_params, feature: str, advice: str) -> None:
    """ZeRO-3 and sharded FSDP leave placeholders or local shards instead of the weights: a ``feature`` that reads
    or rewrites whole weights (EMA, Reptile) would be silently wrong there, so it stops with ``advice`` (a
    LaunchError: one line from ``cpt train``)."""
    for n, p in named_params:
        if hasattr(p, "ds_id") or (p.numel() == 0 and getattr(p, "ds_numel", 0)):
            raise LaunchError(f"{feature}: parameter {n} is partitioned (sharded) by DeepSpeed ZeRO-3, so {feature} "
                               f"cannot use it; {advice}")
        if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor":
            raise LaunchError(f"{feature}: parameter {n} is sharded (FSDP2 DTensor); {advice}")


# ---------------------------------------------------------------- the accelerator of a run


def fit_micro_batch(global_batch: int, micro_batch: int, world_size: int) -> int:
    """The micro-batch size for ``world_size`` processes: ``micro_batch``, or the largest smaller size that splits
    the global batch evenly over the processes (a job requeued on more GPUs keeps its global batch, and so its
    trajectory). A world size that does not divide the global batch is refused, naming the ones that do."""
    if global_batch % world_size:
        fits = [w for w in range(1, global_batch + 1) if global_batch % w == 0]
        raise LaunchError(f"train.global_batch_size ({global_batch}) cannot be split evenly over {world_size} processes; "
                          f"it can over {', '.join(map(str, fits))} (the global batch is part of the run's trajectory: "
                          "a resume must keep it)")
    return max(m for m in range(1, micro_batch + 1) if (global_batch // world_size) % m == 0)


@contextlib.contextmanager
def accelerator_for(cfg):
    """``with accelerator_for(cfg) as acc:`` :func:`build_accelerator`, and ``acc.end_training()`` on every exit path
    (trackers finished, the process group destroyed: ``cpt experiment`` trains many runs in one process), the group
    itself kept until the run's models are gone (:func:`retire_process_group`). accelerate's process-wide state is
    cleared at the end too, so the next run in this process may choose another ``train.precision`` (accelerate
    refuses to change it once set) and, after a distributed run, sets up its process group again."""
    release_retired_groups()  # (an earlier run's, in this process)
    acc = build_accelerator(cfg)
    try:
        yield acc
    finally:
        retire_process_group()
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        acc.end_training()
        AcceleratorState._reset_state(reset_partial_state=distributed)  # (PartialState: the destroyed group's)


# Process groups of finished runs, kept alive until their models are collected (see retire_process_group).
_RETIRED_GROUPS: list = []


def retire_process_group() -> None:
    """Keep a handle on the default process group before it is destroyed, so that it outlives the run's models.

    DDP's C++ Reducer owns the group too. Were the Reducer its last owner, the group's destructor, which joins
    gloo's worker threads, would run inside the Reducer's deallocation with the GIL held, whenever the model is
    freed; a worker thread still freeing the tensors of the last collective (the final barrier) waits for the GIL,
    and the rank hangs at exit (seen in 2-process runs stopped by SIGTERM), or the group is destroyed during
    interpreter shutdown (``terminate called without an active exception``). The handle's own destructor
    releases the GIL; :func:`release_retired_groups` drops it once the models are collected."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        _RETIRED_GROUPS.append(torch.distributed.group.WORLD)


def release_retired_groups() -> None:
    """Collect what is left of the finished runs (their models), then destroy their process groups: at the next
    run's start in this process, and at exit."""
    if _RETIRED_GROUPS:
        gc.collect()
        _RETIRED_GROUPS.clear()


atexit.register(release_retired_groups)


def build_accelerator(cfg):
    """The Accelerator of a run (``cfg``: the RunConfig): precision from ``train.precision`` (conflicting launcher or
    DeepSpeed settings refused), gradient accumulation from the batch geometry, gloo for CPU processes, TF32 on
    CUDA; a launch of several processes that accelerate left unsynchronised is refused."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs

    from cpt.accelerator import (ACCELERATE, configure_deepspeed, deepspeed_block_conflict, launcher_compile_conflict,
                                 precision_conflict)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    mbs = fit_micro_batch(cfg.train.global_batch_size, cfg.train.micro_batch_size, world)
    if mbs != cfg.train.micro_batch_size:
        if int(os.environ.get("RANK", "0")) == 0:
            logging.getLogger("cpt.distributed").warning(
                f"train.micro_batch_size {cfg.train.micro_batch_size} does not split train.global_batch_size "
                f"{cfg.train.global_batch_size} evenly over {world} processes: using {mbs} (the same global batch)")
        cfg.train.micro_batch_size = mbs
    grad_accum = cfg.train.global_batch_size // (world * mbs)  # micro-batches per step on each rank (exact: see above)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    # gloo for CPU processes (tests, laptops); on GPUs accelerate's choice (NCCL). The timeout of every collective,
    # train.distributed_timeout_s, replaces torch's defaults (NCCL 10 min, gloo 30 min); DeepSpeed gets it too.
    pg_backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs = ([InitProcessGroupKwargs(backend=pg_backend, timeout=timedelta(seconds=cfg.train.distributed_timeout_s))]
              if world > 1 else [])
    if problem := launcher_compile_conflict():  # model.compile is the one source of torch.compile
        raise LaunchError(problem)
    acc = Accelerator(
        mixed_precision=ACCELERATE[cfg.train.precision],
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=grad_accum, sync_with_dataloader=False),
        kwargs_handlers=kwargs,
    )
    remember_store()  # where a rank that fails tells the others why (cpt/rank_failure.py)
    if acc.num_processes > 1 and backend(acc) is Backend.SINGLE:
        # e.g. `accelerate launch --use_fsdp` or --multi_gpu without GPUs: N processes that never synchronise
        raise LaunchError(
            f"{acc.num_processes} processes were launched but accelerate set up no distributed backend "
            "(distributed_type NO): they would train unsynchronised copies. On CPU, launch DDP with ACCELERATE_USE_CPU=1 "
            "or use DeepSpeed; FSDP needs GPUs."
        )
    if (asked := launch_mismatch(acc)) and acc.is_main_process:  # e.g. the fsdp launcher with ACCELERATE_USE_CPU=1
        logging.getLogger("cpt.distributed").warning(asked)
    problem = precision_conflict(cfg.train.precision, acc)  # train.precision is the one source of precision
    if problem:
        raise LaunchError(problem)
    ds = getattr(acc.state, "deepspeed_plugin", None)
    if ds is not None:  # no prepared dataloader: tell DeepSpeed the batch geometry and clipping ourselves
        if problem := deepspeed_block_conflict(ds.deepspeed_config):  # its own LR schedule or optimizer: cpt's
            raise LaunchError(problem)
        configure_deepspeed(ds.deepspeed_config, micro_batch=cfg.train.micro_batch_size, grad_accum=grad_accum,
                            global_batch=cfg.train.global_batch_size, grad_clip=cfg.optim.grad_clip)
    return acc


# what `accelerate launch` asked for (its config's distributed_type or flags), as it tells the ranks
_LAUNCHED = (("ACCELERATE_USE_FSDP", Backend.FSDP, "FSDP"), ("ACCELERATE_USE_DEEPSPEED", Backend.DEEPSPEED, "DeepSpeed"))


def launch_mismatch(acc, env=None) -> str | None:
    """A warning when the launch asked for FSDP or DeepSpeed and accelerate set up another backend (with
    ACCELERATE_USE_CPU=1 it sets up plain DDP for both: `scripts/launch.sh run.yaml fsdp` on CPU trained as DDP
    without a word); None otherwise."""
    env = os.environ if env is None else env
    got = backend(acc)
    for var, wanted, name in _LAUNCHED:
        if env.get(var, "").lower() in ("true", "1") and got is not wanted:
            cpu = " (ACCELERATE_USE_CPU=1 does that)" if env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1") else ""
            return (f"the launch asked for {name}, but accelerate set up {got.name} (distributed_type "
                    f"{DistributedType(acc.distributed_type).value}){cpu}: this run trains as {got.name}, "
                    f"{acc.num_processes} process(es)")
    return None


def collective_timeout(error: BaseException, cfg) -> str | None:
    """One line for a collective that gave up waiting for another rank (gloo raises it; NCCL's watchdog ends the process
    with its own message), naming ``train.distributed_timeout_s``; None for any other error."""
    text = str(error)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "timed out" not in text.lower():
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return (f"a collective operation waited longer than train.distributed_timeout_s ({cfg.train.distributed_timeout_s} s) "
            f"for another rank, which hung, died or worked alone for longer (e.g. an export): {first}. Raise the "
            "setting if a rank legitimately works alone that long; --resume continues from the last checkpoint.")


# ---------------------------------------------------------------- preemption


def unprotected_batch_job(cfg, env=None) -> str | None:
    """The start-up warning for a SLURM job without periodic checkpoints (``checkpoint.every`` unset, the default):
    the time-limit warning (SIGUSR1) still saves one, but a node failure, a preemption without the warning or a
    crash costs the whole run (the requeued job starts at step 0). None otherwise."""
    env = os.environ if env is None else env
    if cfg.checkpoint.every is not None or not env.get("SLURM_JOB_ID"):
        return None
    return (f"warning: checkpoint.every is not set in SLURM job {env['SLURM_JOB_ID']}: a node failure, a preemption "
            "without the USR1 warning or a crash restarts this run from step 0; set checkpoint.every")


class PreemptionFlag:
    """SIGTERM / SIGUSR1 (cluster preemption) ask for a checkpoint and a clean exit at the end of a step.

    ``with PreemptionFlag(check_every) as stop:`` installs the handlers and restores the previous ones on exit, on
    every path (an error included), except after a clean end in the `cpt` program that ends the process: a stop on a
    signal (this rank's or another's), or any end with ``last_run`` (`cpt train`); the signals are then ignored
    (:func:`ignore_signals_after_the_run`). With several processes all ranks must stop at the same step, so the flag
    is combined over ranks every ``check_every`` steps (a collective and a host read); one process reads its own flag
    every step for free.

    A signal also arms the stack dump of a rank still running ``stack_dump_s`` seconds later (``train.stop_stack_dump_s``,
    :func:`cpt.rank_failure.stacks_if_still_running`): a hang on the way out is otherwise killed without a word. It
    stays armed while the process is ending (the `cpt` program after a stop, ``last_run`` or a lost rank) and is
    disarmed when the process goes on (another run of `cpt experiment`, a caller's code)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, check_every: int = 1, last_run: bool = False, stack_dump_s: float | None = None):
        self.flag = False
        self.stopped = False  # requested() said stop: on every rank, whichever rank got the signal
        self.early = False  # the signal came before install(), while the run was starting (cpt.cli.EarlyWarning)
        self.check_every = max(1, int(check_every))
        self.last_run = last_run
        self.stack_dump_s = stack_dump_s
        self.watch: SignalWatch | None = None  # arms the stack dump while the main thread is blocked in C++
        self.previous: dict[int, Any] = {}

    @classmethod
    def for_run(cls, cfg, acc, last_run: bool = False) -> "PreemptionFlag":
        """Checked every step on one process or on CPU (no device to wait for), else every
        ``train.preemption_check_every`` steps (each check is a collective plus a host read)."""
        one = acc.num_processes == 1 or acc.device.type == "cpu"
        return cls(1 if one else cfg.train.preemption_check_every, last_run, cfg.train.stop_stack_dump_s)

    def _handler(self, signum, frame):  # noqa: ARG002
        self.flag = True
        stacks_if_still_running(self.stack_dump_s, signal.Signals(signum).name)

    def install(self) -> None:
        if self.stack_dump_s is not None and is_cpt_program():  # (a main thread cpt owns: see SignalWatch)
            self.watch = SignalWatch(self.stack_dump_s, self.SIGNALS)
        for sig in self.SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                continue
            if getattr(self.previous[sig], "start_only", False):  # cpt.stop_signals.StopWhileStarting: retired by the loop
                self.previous[sig] = signal.SIG_DFL
            if getattr(self.previous[sig], "received", False):  # cpt.cli.EarlyWarning: a signal during start-up
                self.flag = self.early = True
                self.previous[sig].received = False  # (taken: a later run must not see it again)
                stacks_if_still_running(self.stack_dump_s, f"{signal.Signals(sig).name} (during start-up)")

    def uninstall(self) -> None:
        for sig, prev in self.previous.items():
            signal.signal(sig, prev)
        self.previous.clear()
        if self.watch is not None:
            self.watch.close()
            self.watch = None

    def __enter__(self) -> "PreemptionFlag":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        lost = exc[1] is not None and lost_peer(exc[1])
        if lost:
            # another rank died: the launcher is stopping the others (SIGTERM); this rank reports first, then exits
            # (cpt/rank_failure.py), rather than being cut off on its way to the error handler. Ignored before the
            # handlers are restored: a SIGTERM landing between the two (the default action) ended the rank silently
            with contextlib.suppress(ValueError):  # (not the main thread)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                self.previous.pop(signal.SIGTERM, None)
        self.uninstall()
        ending = exc[1] is None and (self.stopped or self.last_run)  # nothing left to save (the `cpt` program only)
        if ending:
            ignore_signals_after_the_run()
        if not (is_cpt_program() and (ending or lost)):  # the process goes on: no stack dump in its later work
            cancel_stacks()

    def stopped_line(self, step: int, saved: bool = True) -> str:
        """The log line of a stop on the signal, once the checkpoint at ``step`` was written (``saved``) or failed."""
        when = " during start-up" if self.early else ""
        if not saved:  # (the failure and the intact checkpoint were logged by the save)
            return (f"preemption signal received{when}: the checkpoint at step {step} FAILED (see the error above); "
                    "exiting; a resume starts from the newest checkpoint")
        return f"preemption signal received{when}: checkpoint saved at step {step}; exiting cleanly"

    def requested(self, acc, step: int = 0) -> bool:
        """True on every rank if any rank received a signal (so all ranks save together); with several
        processes only at steps that are multiples of ``check_every`` (the same steps on every rank)."""
        if acc.num_processes == 1:
            self.stopped = self.flag
        elif step % self.check_every == 0:
            self.stopped = any_rank(acc, self.flag)
        return self.stopped
