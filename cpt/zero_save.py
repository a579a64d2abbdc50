"""Non-blocking DeepSpeed ZeRO checkpoints (``checkpoint.async_save``): DeepSpeed's own save, its files written later.

``accelerator.save_state`` under DeepSpeed calls the engine's ``save_checkpoint``, which hands every file it writes
(``pytorch_model/mp_rank_00_model_states.pt`` or ``zero_pp_rank_<r>_mp_rank_00_model_states.pt``, each rank's
``*zero_pp_rank_<r>_mp_rank_00_optim_states.pt``: the fp32 master partitions and Adam moments) to its checkpoint engine
(``deepspeed/runtime/checkpoint_engine/``). For the length of a save cpt puts :class:`_Staging` in the engine's place:
it copies each state dict into host buffers kept between saves (pinned on CUDA; every tensor, the ones ZeRO-Offload
keeps on the CPU too, since training changes them in place) and writes nothing. So the files, their names and their
contents are DeepSpeed's own, for every ZeRO stage, offload and LoRA's ``exclude_frozen_parameters``; DeepSpeed's load,
cpt/consolidate.py and ``cpt export`` read them unchanged. The small files (``latest``, ``zero_to_fp32.py``,
``zero_to_torch.py``, ``random_states_<rank>.pkl``) are written during the save as before, then read back and hashed
by the rank that wrote them (a few KB), so that CHECKSUMS.json holds a digest for every file of the checkpoint (they
had their size alone: a flipped byte in a rank's RNG state went unnoticed; found by scripts/soak_faults.py).

Why not one of DeepSpeed's engines: ``fast`` (DeepNVMe) needs the async_io op, which needs libaio (not on this machine,
nor on the GPU machines) and only speeds up the writes, which stay in the save; ``decoupled`` sends each state dict to a
spawned writer process per rank and waits for it at the next optimizer step (``engine.step`` commits before updating),
so at most one step's forward and backward overlap the write; a failed write kills that rank's writer and surfaces on
that rank only, while the others wait in DeepSpeed's barrier; ``datastates`` needs a package that is not on PyPI.
None writes a commit mark cpt can check (CHECKSUMS.json, the rename).

A save, on every rank: :meth:`AsyncZero.stage` (the loop waits for it) runs the save with the staging engine;
:meth:`Writes.start` writes this rank's files in a thread (streamed, hashed, fsynced: cpt/checkpoint_files.py's
writer), then every rank's outcome is exchanged on a gloo group of its own (background collectives never share the
training group): a write fails on every rank if it failed on any, naming the rank. The main process's commit
(cpt/checkpoint.py's ``_Commit``) waits for that, then writes cpt's files, CHECKSUMS.json (DeepSpeed's files with their
digests) and renames ``.tmp-step_N`` into place; a kill before that leaves the previous checkpoint the newest valid one.
A rank that dies mid-write (``kill -9``, out of memory) closes its sockets: the others' next collective, the outcome
exchange or a training step's, fails at once ("Connection closed/reset by peer") and cpt/rank_failure.py prints one line
(measured on 2 CPU processes, ZeRO-3, the main process or rank 1 killed in its writer: the survivor gone about 2 s
later, its report wait). Only a rank that hangs, or a node lost without closing its connections, leaves them waiting,
up to the process group's timeout (``train.distributed_timeout_s``).
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import threading
from pathlib import Path

import torch

from cpt import adapter_shards, sharded_save
from cpt.checkpoint_files import backend_file_digests, reusable, staged_copy
from cpt.distributed import Backend, backend
from cpt.fileio import HashingFile, describe_io_error, fault_point, fsync_dir
from cpt.host_memory import GiB, Guard, tensor_bytes

log = logging.getLogger("cpt.checkpoint")


def supported(acc) -> bool:
    """DeepSpeed with one model and nothing registered that only ``accelerator.save_state`` knows how to save."""
    return (backend(acc) is Backend.DEEPSPEED and len(acc._models) == 1 and hasattr(acc._models[0], "checkpoint_engine")
            and not acc._custom_objects and not acc._save_model_state_pre_hook)


def for_run(acc, wanted: bool):
    """The non-blocking saver of this run when ``wanted``: :class:`AsyncZero` (DeepSpeed), cpt/sharded_save.py's
    (FSDP2) or None (synchronous, said once by sharded_save.for_run)."""
    if wanted and supported(acc):
        return AsyncZero(acc)
    return sharded_save.for_run(acc, wanted)


class AsyncZero:
    """Every rank's part of non-blocking DeepSpeed saves: the host buffers and the gloo group, kept between saves."""

    def __init__(self, acc):
        """On every rank at once (the group is made collectively; not at the first save, which a rank may not reach)."""
        self.acc = acc
        self.group = sharded_save._gloo_group()
        self.buffers: dict[tuple, torch.Tensor] = {}  # (file, key path) -> host tensor
        self.saves = 0
        self.guard = Guard(acc)  # (a file whose new host buffers would not fit in host memory: written in the save)

    def stage(self, folder: Path, step: int, items: list) -> Writes:
        """The blocking part (collective: DeepSpeed's save): every file DeepSpeed writes copied into host buffers, the
        small ones written; the main process's own files (a LoRA model's ``adapter_base.json``) added to ``items``."""
        acc, engine = self.acc, self.acc._models[0]
        if self.saves == 0 and acc.is_main_process:
            log.info("checkpoint.async_save: DeepSpeed's checkpoint files are written in the background (cpt/zero_save.py); "
                     "the loop waits only for their host copy")
        self.saves += 1
        fault_point(f"save_state:rank{acc.process_index}@{step}")
        staging = _Staging(folder, self.buffers, step, self.guard)
        engine.checkpoint_engine, own = staging, engine.checkpoint_engine
        try:
            items += adapter_shards.save_state_or_stop(acc, folder, step)
        finally:
            engine.checkpoint_engine = own
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
        if staging.error is not None:  # (after DeepSpeed's collectives: every rank got through them; agreed on next)
            raise staging.error
        # the small files this rank wrote in the save (its RNG state; the main process's `latest` and recovery
        # scripts): hashed now, a few KB read back
        staging.written.update(backend_file_digests(acc, folder, hashed=staging.written))
        return Writes(self, folder, step, staging.files, staging.written)


class _Staging:
    """A DeepSpeed checkpoint engine that copies what it is given to save into host buffers and writes nothing (the
    interface of deepspeed.runtime.checkpoint_engine.CheckpointEngine). It never raises inside DeepSpeed's save, whose
    collectives the other ranks are in: the first error is kept for :meth:`AsyncZero.stage` to raise after it.

    A state dict whose new host buffers would take this rank past its share of the node's host memory (cpt/host_memory.py:
    an equal part per local rank) is written at once instead, from the live tensors, as DeepSpeed's own engine would:
    each rank writes its own files, so no other rank need decide the same."""

    name = "cpt-staging"

    def __init__(self, folder: Path, buffers: dict, step: int, guard: Guard):
        self.folder, self.buffers, self.step, self.guard = folder, buffers, step, guard
        self.files: list[tuple[str, object]] = []  # (path relative to folder, host copy of the state dict)
        self.written: dict[str, str] = {}  # files written in the save (no host memory for their copy) -> digest
        self.error: BaseException | None = None
        self.room = guard.rank_share()  # bytes this rank's new buffers may take in this save; None: unknown

    def save(self, state_dict, path: str) -> None:
        if self.error is not None:
            return
        try:
            rel = str(Path(path).relative_to(self.folder))
            need = tensor_bytes(state_dict, lambda key, t: reusable(self.buffers.get(key), t), (rel,))
            if self.room is not None and need > self.room:
                self._write_now(rel, state_dict, need)
                return
            self.room = None if self.room is None else self.room - need
            self.files.append((rel, _host_copy(state_dict, self.buffers, rel)))
        except Exception as e:  # noqa: BLE001 - out of host memory, a path outside the folder: raised after the save
            self.error = e

    def _write_now(self, rel: str, state_dict, need: int) -> None:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        self.guard.say(True, f"rank {rank} ({socket.gethostname()}) needs {need / GiB:.2f} GB more host memory for "
                             f"{rel} and its share of what is available is {self.room / GiB:.2f} GB ({self.guard.source}: "
                             f"{self.guard.avail / GiB:.2f} GB, less a margin, over LOCAL_WORLD_SIZE ranks)")
        self.written[rel] = _write(self.folder, rel, _compact(state_dict), self.step, rank)

    def makedirs(self, path, exist_ok=False) -> None:
        try:
            os.makedirs(path, exist_ok=exist_ok)
        except OSError as e:
            self.error = self.error or e

    def load(self, path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False)

    def create(self, info) -> None:
        pass

    def commit(self, info) -> bool:
        return True

    def is_data_parallel_writer(self, dp_rank) -> bool:
        return dp_rank == 0

    def is_decoupled(self) -> bool:
        return False

    def set_commit_info(self, info) -> None:
        pass

    def get_commit_info(self):
        return None

    def cleanup(self) -> None:
        pass

    def preserves_storage_sharing(self) -> bool:
        return False  # (DeepSpeed then skips its own clone of the module state: the host copy below is one)


def _host_copy(state, buffers: dict, rel: str):
    """``state`` with every tensor reached through dicts, lists and tuples copied into ``buffers`` (keyed by file and key
    path; made on first use, again if the shape or dtype changed) and everything else deep-copied (a loss scaler's
    state changes after the save too). Tensors saved under several keys (a tied head) stay one tensor."""
    return _with_tensors(state, lambda t, path: staged_copy(t, buffers, path), (rel,))


def _compact(state):
    """``state`` with each tensor that is a view of a larger storage (a flat ZeRO buffer) or on the GPU cloned to the
    host, as DeepSpeed's ``clone_tensors_for_torch_save`` (torch.save writes a view's whole storage); others kept."""
    def compact(t, _path):
        whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        return t.detach() if t.device.type == "cpu" and whole else t.detach().to("cpu", copy=True)

    return _with_tensors(state, compact, ())


def _with_tensors(state, replace, path: tuple):
    """A deep copy of ``state`` in which each tensor reached through dicts, lists and tuples is ``replace(tensor, key
    path)``, once per tensor (one tensor under several keys stays one)."""
    memo: dict[int, object] = {}

    def walk(obj, path):
        if isinstance(obj, torch.Tensor):
            if id(obj) not in memo:
                memo[id(obj)] = replace(obj, path)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, (*path, k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, (*path, i))

    walk(state, path)
    return copy.deepcopy(state, memo)  # (the tensors come from memo)


def _write(folder: Path, rel: str, state, step: int, rank: int) -> str:
    """``torch.save`` of ``state`` into ``folder/rel``, hashed and fsynced as written; its digest."""
    fault_point(f"{rel}:rank{rank}@{step}")
    with HashingFile(folder / rel, partial_fault=f"{rel}:partial@{step}") as f:
        torch.save(state, f)
    return f.digest


class Writes:
    """One save's background writes on this rank (the job of a rank other than the main process; the main process's
    commit waits for them first): ``start`` launches them, ``wait`` raises (on every rank) if any rank's failed,
    ``join`` returns that error or None. ``digests``: every rank's files and their digests, once written."""

    def __init__(self, owner: AsyncZero, folder: Path, step: int, files: list, written: dict | None = None):
        self.owner, self.folder, self.step, self.files = owner, folder, step, files
        self.written = written or {}  # (files written in the save: their digests)
        self.digests: dict[str, str] = {}
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def start(self, background: bool = True) -> None:
        if background:  # not a daemon: an exiting interpreter still finishes the write
            self.thread = threading.Thread(target=self._run, name=f"cpt-checkpoint-zero-{self.step}")
            self.thread.start()
        else:
            self._run()

    def _run(self) -> None:
        import torch.distributed as dist

        rank = self.owner.acc.process_index
        outcome: dict = dict(self.written)
        try:
            for rel, state in self.files:
                outcome[rel] = _write(self.folder, rel, state, self.step, rank)
            for folder in {(self.folder / rel).parent for rel in [*(rel for rel, _ in self.files), *self.written]}:
                fsync_dir(folder)
        except BaseException as e:  # noqa: BLE001 - reported on every rank below
            outcome = {"error": f"rank {rank} ({socket.gethostname()}) failed to write its DeepSpeed files: "
                                f"{describe_io_error(e, self.folder)}"}
        self.files = None  # (the host buffers stay with AsyncZero for the next save)
        gathered = [outcome]
        if self.owner.acc.num_processes > 1:
            gathered = [None] * self.owner.acc.num_processes
            try:
                dist.all_gather_object(gathered, outcome, group=self.owner.group)
            except Exception as e:  # noqa: BLE001 - a rank gone, or the group timed out
                gathered = [{"error": f"the ranks could not agree on the write ({e})"}]
        failed = [g["error"] for g in gathered if "error" in g]
        if failed:
            self.error = sharded_save.ShardWriteError(failed[0])
        else:
            self.digests = {k: v for g in gathered for k, v in g.items()}

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            raise self.error

    def join(self) -> BaseException | None:
        if self.thread is not None:
            self.thread.join()
        return self.error
