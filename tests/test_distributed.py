"""cpt/distributed.py: the backend of every accelerate distributed type, the ZeRO stage, and the all-rank
decisions (with a fake accelerator whose reduce sums the values of several simulated ranks; the real collectives
run in the 2-process tests: test_train_distributed.py, test_evaluate_distributed.py, test_crash_consistency.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from cpt.distributed import (Backend, all_ranks_agree, any_rank, backend, rank_and_world, shards_weights, sum_across_ranks,
                             unwrap, zero_stage)


def acc(kind: str, stage: int | None = None, n: int = 2, peers: list[float] | None = None):
    """A fake accelerator; ``reduce(sum)`` adds ``peers`` (the other ranks' values) to this rank's."""
    plugin = SimpleNamespace(zero_stage=stage) if stage is not None else None
    return SimpleNamespace(distributed_type=DistributedType(kind), num_processes=n, process_index=1, device="cpu",
                           state=SimpleNamespace(deepspeed_plugin=plugin),
                           reduce=lambda t, reduction: t + sum(peers or []))


def test_every_accelerate_distributed_type_has_a_backend():
    expected = {"NO": Backend.SINGLE, "FSDP": Backend.FSDP, "DEEPSPEED": Backend.DEEPSPEED,
                "XLA": Backend.OTHER, "MEGATRON_LM": Backend.OTHER}
    for kind in DistributedType:
        want = Backend.DDP if kind.value.startswith("MULTI_") else expected[kind.value]
        assert backend(acc(kind.value)) is want, kind
    assert backend(None) is Backend.SINGLE


@pytest.mark.parametrize("kind, stage, want_stage, sharded", [
    ("NO", None, 0, False), ("MULTI_GPU", None, 0, False), ("FSDP", None, 0, True),
    ("DEEPSPEED", 1, 1, False), ("DEEPSPEED", 2, 2, False), ("DEEPSPEED", 3, 3, True), ("DEEPSPEED", None, 0, False),
])
def test_zero_stage_and_sharded_weights(kind, stage, want_stage, sharded):
    a = acc(kind, stage)
    assert zero_stage(a) == want_stage and shards_weights(a) is sharded
    assert shards_weights(None) is False


def test_all_ranks_agree_only_when_no_rank_disagrees():
    assert all_ranks_agree(acc("MULTI_CPU", peers=[0.0]), True) is True
    assert all_ranks_agree(acc("MULTI_CPU", peers=[1.0]), True) is False  # another rank is not ok
    assert all_ranks_agree(acc("MULTI_CPU", peers=[0.0]), False) is False
    assert any_rank(acc("MULTI_CPU", peers=[1.0]), False) is True  # another rank raised the flag
    assert any_rank(acc("MULTI_CPU", peers=[0.0]), False) is False
    one = acc("NO", n=1, peers=[1.0])  # one process: no collective, its own answer
    assert all_ranks_agree(one, True) is True and any_rank(one, True) is True


def test_rank_sums_and_world():
    t = torch.tensor([1.0, 2.0])
    assert sum_across_ranks(t, acc("MULTI_CPU", peers=[torch.tensor([3.0, 4.0])])).tolist() == [4.0, 6.0]
    assert sum_across_ranks(t, acc("NO", n=1, peers=[torch.tensor([3.0, 4.0])])) is t
    assert sum_across_ranks(t, None) is t  # no accelerator and no process group
    assert rank_and_world(acc("MULTI_CPU", n=4)) == (1, 4) and rank_and_world(None) == (0, 1)


def test_unwrap_finds_the_model_inside_wrappers():
    inner = torch.nn.Linear(2, 2)
    wrapped = torch.nn.Module()
    wrapped.module = torch.nn.Module()
    wrapped.module.module = inner
    assert unwrap(wrapped) is inner and unwrap(inner) is inner


def test_preemption_flag_installs_and_restores_the_handlers():
    """A context manager: its handlers while inside, the caller's again on exit, also when the body raises."""
    import os
    import signal

    from cpt.distributed import PreemptionFlag

    mine = lambda signum, frame: None  # noqa: E731
    before = {sig: signal.signal(sig, mine) for sig in PreemptionFlag.SIGNALS}
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with PreemptionFlag() as stop:
                assert all(signal.getsignal(sig) == stop._handler for sig in PreemptionFlag.SIGNALS)
                os.kill(os.getpid(), signal.SIGUSR1)
                assert stop.requested(acc("NO", n=1)) is True
                raise RuntimeError("boom")
        assert all(signal.getsignal(sig) is mine for sig in PreemptionFlag.SIGNALS)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_the_start_up_sigterm_handler_is_retired_by_the_training_loop():
    """`cpt train`'s start-up SIGTERM handler (cpt.stop_signals.StopWhileStarting) raises StopSignal; once the loop's
    PreemptionFlag has taken over, it is not put back on the loop's way out (an error path): a SIGTERM there is what
    it was before the change (the default action), not a "stopped while starting" line about a run that trained."""
    import os
    import signal

    from cpt.distributed import PreemptionFlag
    from cpt.stop_signals import StopSignal, StopWhileStarting

    before = signal.signal(signal.SIGTERM, StopWhileStarting())
    try:
        with pytest.raises(StopSignal, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):  # (delivered at the next bytecode boundaries)
                pass
        with pytest.raises(RuntimeError, match="boom"):
            with PreemptionFlag():
                raise RuntimeError("boom")
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)


def test_after_a_stop_or_the_last_run_a_late_signal_is_ignored_in_the_cpt_program(tmp_path):
    """In the `cpt` program, once the loop's flag is left cleanly after a stop (this rank's signal or, under several
    processes, another rank's) or after `cpt train`'s only run (``last_run``), SIGTERM/SIGUSR1 are ignored: the
    teardown that follows has nothing to save, and a SLURM warning relayed late to one node's rank (after the other
    ranks had made every rank stop) killed it there, so srun failed the job (seen in CI). Otherwise (`cpt experiment`'s
    finished runs, callers running train() in their own process: the test above) the previous handlers come back.
    A SIGUSR1 while `cpt train` starts is held (cpt.cli.EarlyWarning) and taken by the loop's flag, once. One subprocess whose ``__main__`` is the cpt program, as the guard requires."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys
        from types import SimpleNamespace
        from cpt.cli import main  # (this process counts as the `cpt` program)
        from cpt.distributed import PreemptionFlag

        one = SimpleNamespace(num_processes=1)
        two = SimpleNamespace(num_processes=2)
        def late(label):
            os.kill(os.getpid(), signal.SIGUSR1); os.kill(os.getpid(), signal.SIGTERM)
            print(label, "survived", flush=True)
            for sig in PreemptionFlag.SIGNALS: signal.signal(sig, signal.SIG_DFL)
        from cpt.cli import hold_stop_signals
        hold_stop_signals("train")  # `cpt train`: a warning while the run starts is held for the loop
        os.kill(os.getpid(), signal.SIGUSR1)
        with PreemptionFlag() as stop:
            assert stop.early and stop.requested(one)
        late("early-warning")
        hold_stop_signals("train")
        os.kill(os.getpid(), signal.SIGUSR1)
        with PreemptionFlag() as stop:  # (a run of `cpt experiment` that ends without asking: the holder is back)
            assert stop.early
        with PreemptionFlag() as stop:  # taken by the first run: not seen again
            assert not stop.early and not stop.requested(one)
        for sig in PreemptionFlag.SIGNALS: signal.signal(sig, signal.SIG_DFL)
        with PreemptionFlag() as stop:  # this process's own signal
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.requested(one)
        late("own-signal")
        import cpt.distributed as d
        d.any_rank = lambda acc, flag: True  # another rank got the warning: this one stops without its own signal
        with PreemptionFlag() as stop:
            assert stop.requested(two, 0) and not stop.flag
        late("other-rank")
        with PreemptionFlag(last_run=True):  # `cpt train`: a finished run
            pass
        late("last-run")
        with PreemptionFlag():  # a finished run of `cpt experiment`: the default action again
            pass
        print("finished-run", flush=True)
        os.kill(os.getpid(), signal.SIGUSR1)
        print("not reached", flush=True)
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split("\n")[:5] == ["early-warning survived", "own-signal survived", "other-rank survived",
                                           "last-run survived", "finished-run"], (proc.stdout, proc.stderr[-2000:])
    assert proc.returncode == -10 and "not reached" not in proc.stdout, (proc.returncode, proc.stderr[-2000:])


def test_a_stop_requested_before_the_process_could_take_the_signal_is_taken_once(tmp_path, monkeypatch):
    """scripts/slurm_node.sh creates $CPT_STOP_REQUESTED before it relays the time-limit warning: a rank in its first
    fraction of a second still ignores SIGUSR1 (inherited from the node script), so the signal is lost, but the file
    counts as a warning held during start-up (cpt.cli.EarlyWarning), taken by the training loop once."""
    import signal

    from cpt.cli import STOP_REQUESTED, EarlyWarning
    from cpt.distributed import PreemptionFlag

    requested = tmp_path / "stop-requested"
    monkeypatch.setenv(STOP_REQUESTED, str(requested))
    previous = signal.signal(signal.SIGUSR1, EarlyWarning())
    try:
        with PreemptionFlag() as stop:  # no file, no signal
            assert not stop.early and not stop.requested(SimpleNamespace(num_processes=1))
        requested.touch()  # the relay (its signal lost)
        with PreemptionFlag() as stop:
            assert stop.early and stop.requested(SimpleNamespace(num_processes=1))
        with PreemptionFlag() as stop:  # taken: a later run in the process (`cpt experiment`) does not see it again
            assert not stop.early and not stop.flag
        signal.raise_signal(signal.SIGUSR1)  # a new warning, as a signal this time
        with PreemptionFlag() as stop:
            assert stop.early
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_preemption_check_cadence():
    """Every step on one process or on CPU; every train.preemption_check_every steps across GPU ranks (the same
    steps on every rank: off-cadence steps take no collective)."""
    from cpt.distributed import PreemptionFlag

    def on(device_type, kind="MULTI_GPU", n=2):
        return SimpleNamespace(num_processes=n, device=SimpleNamespace(type=device_type), distributed_type=kind)

    cfg = SimpleNamespace(train=SimpleNamespace(preemption_check_every=10, stop_stack_dump_s=45.0))
    assert PreemptionFlag.for_run(cfg, on("cpu", "MULTI_CPU")).check_every == 1
    assert PreemptionFlag.for_run(cfg, on("cpu", "MULTI_CPU")).stack_dump_s == 45.0  # (train.stop_stack_dump_s)
    assert PreemptionFlag.for_run(cfg, on("cuda", "NO", n=1)).check_every == 1
    stop = PreemptionFlag.for_run(cfg, on("cuda"))
    assert stop.check_every == 10
    ranks = acc("MULTI_GPU", peers=[1.0])  # (collectives on the host) another rank has raised its flag
    assert stop.requested(ranks, 7) is False and stop.requested(ranks, 10) is True


_RETIRE_SCRIPT = r"""
import json, tempfile
import torch.distributed as dist
from accelerate import Accelerator
import cpt.distributed as d

def threads():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("Threads:"))

def build(cfg):  # as accelerate does: the process group is set up with the accelerator (the teardown is tested)
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.FileStore(tempfile.mktemp(), 1))
    return Accelerator(cpu=True)

d.build_accelerator = build
counts = [threads()]
for run in range(2):  # two runs in one process, as `cpt experiment` does
    with d.accelerator_for(None):
        dist.barrier()
        counts.append(threads())
    assert not dist.is_initialized()
    counts.append(threads())
d.release_retired_groups()
counts.append(threads())
print(json.dumps(counts))
"""


def test_a_finished_runs_process_group_is_kept_until_its_models_are_collected(tmp_path):
    """accelerator_for destroys the process group (end_training) but keeps a handle on it, so that DDP's Reducer
    is never its last owner: were it, the group's destructor would join gloo's worker threads inside the model's
    deallocation with the GIL held, and hang when a worker still needs the GIL (a rank hanging at exit after
    SIGTERM, seen 1 run in ~10). The handle goes at the next run's start and at exit; gloo's worker threads show
    when the group is really destroyed."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _RETIRE_SCRIPT], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr
    before, run1, after1, run2, after2, released = json.loads(proc.stdout.strip().splitlines()[-1])
    assert run1 > before  # gloo's threads
    assert after1 == run1  # destroyed (unregistered) but kept alive by the handle...
    assert run2 == run1  # ...until the next run starts: the first group is gone, the second has its threads
    assert after2 == run2
    assert released == before  # at the end (atexit does the same)


def test_micro_batch_is_fitted_to_the_world_size_and_impossible_splits_are_refused():
    """A job requeued on another number of GPUs keeps its global batch: the micro-batch size drops to the largest one
    that splits it evenly; a world size that does not divide the global batch is one error naming those that do."""
    from cpt.distributed import LaunchError, fit_micro_batch

    assert fit_micro_batch(64, 8, 8) == 8
    assert fit_micro_batch(64, 8, 16) == 4
    assert fit_micro_batch(12, 4, 2) == 3
    assert fit_micro_batch(64, 8, 64) == 1
    with pytest.raises(LaunchError, match=r"over 6 processes; it can over 1, 2, 4, 8, 16, 32, 64 \("):
        fit_micro_batch(64, 8, 6)


def test_a_launch_asking_for_fsdp_or_deepspeed_that_got_ddp_says_so():
    """`scripts/launch.sh run.yaml fsdp` (or a ZeRO launcher) with ACCELERATE_USE_CPU=1: accelerate sets up plain DDP
    and the run trained as DDP without a word; now the start-up log names both."""
    from cpt.distributed import launch_mismatch

    env = {"ACCELERATE_USE_FSDP": "true", "ACCELERATE_USE_CPU": "1"}
    assert launch_mismatch(acc("MULTI_CPU"), env) == (
        "the launch asked for FSDP, but accelerate set up DDP (distributed_type MULTI_CPU) (ACCELERATE_USE_CPU=1 does "
        "that): this run trains as DDP, 2 process(es)")
    assert "asked for DeepSpeed, but accelerate set up DDP" in launch_mismatch(acc("MULTI_CPU"),
                                                                              {"ACCELERATE_USE_DEEPSPEED": "true"})
    assert launch_mismatch(acc("FSDP"), env) is None  # what was asked for
    assert launch_mismatch(acc("DEEPSPEED", 3), {"ACCELERATE_USE_DEEPSPEED": "true"}) is None
    assert launch_mismatch(acc("MULTI_GPU"), {}) is None  # a DDP launch


def test_each_run_in_a_process_may_choose_its_own_precision():
    """accelerate keeps its state process-wide and refuses a second Accelerator with another mixed precision
    ("AcceleratorState has already been initialized"): a notebook, `cpt experiment`, or the GPU launcher test's
    reference run (fp32 base model, then a bf16 run, the first GPU session's failure) could not train a bf16 run
    after an fp32 one. accelerator_for clears that state when its run ends."""
    from types import SimpleNamespace

    from accelerate.state import AcceleratorState

    import cpt.distributed as d

    def cfg(precision):
        train = SimpleNamespace(global_batch_size=4, micro_batch_size=2, tf32=True, distributed_timeout_s=60,
                                precision=precision)
        return SimpleNamespace(train=train, optim=SimpleNamespace(grad_clip=1.0))

    AcceleratorState._reset_state(reset_partial_state=True)  # (an earlier test's, outside accelerator_for)
    seen = []
    for precision in ("fp32", "bf16", "fp32"):
        with d.accelerator_for(cfg(precision)) as acc:
            seen.append(acc.mixed_precision)
    assert seen == ["no", "bf16", "no"]
    assert not AcceleratorState._shared_state  # cleared for the next run
