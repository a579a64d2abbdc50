"""Non-blocking resume checkpoints under FSDP2 (``checkpoint.async_save``): ``torch.distributed.checkpoint.async_save``.

What accelerate's ``save_state`` writes for FSDP2 with ``SHARDED_STATE_DICT`` (configs/accelerate/fsdp.yaml), under
the same names and keys, so that accelerate's ``load_state``, cpt/consolidate.py and ``cpt export`` read it unchanged:
``pytorch_model_fsdp_0/`` (DCP of ``{"model": get_model_state_dict(model)}``; a LoRA model's adapter shards alone:
cpt/adapter_shards.py), ``optimizer_0/`` (DCP of ``{"optimizer": get_optimizer_state_dict(model, optimizer)}``) and
``random_states_<rank>.pkl`` (+ scheduler, sampler, scaler files if any: accelerate's ``save_accelerator_state``).

A save, on every rank:

1. :meth:`AsyncShards.stage` (the loop waits for it): the sharded state dicts, copied into host buffers (torch's
   ``_create_cpu_state_dict``/``_copy_state_dict``, what its own stagers use; pinned on CUDA, kept between saves), and
   the RNG-state files written. First every rank, failed or not, joins one gather (cpt/host_memory.py): where a node has
   no host memory for the buffers this save would add, every rank saves synchronously instead (accelerate's
   ``save_state``). Nothing else here is collective, so a rank that fails is agreed on by cpt/checkpoint.py and the save
   skipped before any rank has started writing.
2. :meth:`Uploads.start`: ``dcp.async_save`` of the model and of the optimizer state, each in torch's writer thread
   and on its own gloo group (background collectives never share the training process group; a gloo group because
   DCP's plan and result exchange are CPU object collectives), with the copies of step 1 (no second staging).
3. DCP's save exchanges the ranks' plans, writes each rank's shard files (fsynced; then read back and hashed by that
   rank, in the same background thread, with its RNG-state file's digest from step 1: the digests travel with the
   write results), gathers every rank's write results on the coordinator (rank 0), which writes ``.metadata`` (and
   hashes it) only if no rank failed, then broadcasts the outcome: a
   future completes (on every rank) only after every rank's files and the metadata are on disk, or fails on every
   rank with the failing ranks' errors (no rank waits for ever on another's failure). A rank that dies mid-write
   (``kill -9``, out of memory) closes its sockets: the others' DCP collectives fail at once and torchrun stops them
   (measured on 2 CPU processes: every process gone within 5 s of the kill, the previous checkpoint the newest valid
   one, ``--resume`` exact); only a rank that hangs, or a node lost without closing its connections, leaves them
   waiting, up to the process group's timeout (``train.distributed_timeout_s``).
4. The main process's commit thread (cpt/checkpoint.py's ``_Commit``) waits for both futures, then writes cpt's own
   files, CHECKSUMS.json (every file with its digest: a shard, a rank's RNG state or the metadata whose bytes changed
   after the save fails verification, as cpt's own files do) and renames ``.tmp-step_N`` into place; a kill before
   that leaves the previous checkpoint the newest valid one.

Used when the run is FSDP2 with ``SHARDED_STATE_DICT``, one model and one optimizer and nothing registered that only
``accelerator.save_state`` knows how to save (custom objects, save hooks); otherwise saves stay synchronous (DeepSpeed's
non-blocking saves: cpt/zero_save.py).
"""

from __future__ import annotations

import functools
import logging
import socket
from concurrent.futures import Future
from pathlib import Path

import torch

from cpt.adapter_shards import FSDP_MODEL, fsdp_model_state
from cpt.checkpoint_files import backend_file_digests
from cpt.distributed import Backend, backend
from cpt.fileio import describe_io_error, fault_point, file_digest
from cpt.host_memory import Guard, tensor_bytes

log = logging.getLogger("cpt.checkpoint")

OPTIMIZER = "optimizer_0"  # accelerate's f"{OPTIMIZER_NAME}_{index}"


def supported(acc) -> bool:
    """Whether this run's saves can go through :class:`AsyncShards` (else ``accelerator.save_state``, synchronous)."""
    if backend(acc) is not Backend.FSDP or not getattr(acc, "is_fsdp2", False):
        return False
    kind = acc.state.fsdp_plugin.state_dict_type
    return (getattr(kind, "name", str(kind)).endswith("SHARDED_STATE_DICT") and len(acc._models) == 1
            and len(acc._optimizers) == 1 and not acc._custom_objects and not acc._save_model_state_pre_hook)


def for_run(acc, wanted: bool) -> AsyncShards | None:
    """:class:`AsyncShards` when ``wanted`` (``checkpoint.async_save`` where cpt does not write the files itself) and
    supported; else None, saying once (main process) that the run's saves block the loop, and why."""
    if not wanted:
        return None
    if supported(acc):
        return AsyncShards(acc)
    if acc.is_main_process:
        log.info("checkpoint.async_save: %s saves synchronously (accelerator.save_state): the loop waits for each save"
                 "%s", "DeepSpeed" if backend(acc) is Backend.DEEPSPEED else f"this {backend(acc).value} setup",
                 "" if backend(acc) is Backend.DEEPSPEED else " (non-blocking: FSDP2 with SHARDED_STATE_DICT, one model "
                 "and optimizer, nothing registered with accelerator.register_for_checkpointing)")
    return None


class AsyncShards:
    """Every rank's part of non-blocking FSDP2 saves: the host buffers and the gloo groups, kept between saves."""

    def __init__(self, acc):
        """On every rank at once (it makes the groups: collective; not at the first save, which a rank may not reach)."""
        self.acc = acc
        self.groups = {name: _gloo_group() for name in (FSDP_MODEL, OPTIMIZER)}  # one per DCP save: both run at once
        self.buffers: dict[str, tuple] = {}  # kind -> (structure, host state dict)
        self.guard = Guard(acc)  # (a save whose new host buffers would not fit in host memory: synchronous)

    def stage(self, folder: Path, step: int, items: list) -> Uploads | None:
        """The blocking part: the RNG files written, the shards copied to host memory; the main process's own files
        (a LoRA model's ``adapter_base.json``) added to ``items``. Returns the uploads to start once every rank staged;
        None (on every rank, nothing written) where a node has no host memory for the copy (cpt/host_memory.py)."""
        from accelerate.checkpointing import save_accelerator_state
        from accelerate.utils.fsdp_utils import _prepare_sd_options
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        acc, error, need = self.acc, None, 0
        try:
            fault_point(f"save_state:rank{acc.process_index}@{step}")
            model_state, own = fsdp_model_state(acc)
            optim_state = get_optimizer_state_dict(acc._models[0], acc._optimizers[0], options=_prepare_sd_options(acc.state.fsdp_plugin))
            states = {FSDP_MODEL: {"model": model_state}, OPTIMIZER: {"optimizer": optim_state}}
            need = sum(tensor_bytes(state) for kind, state in states.items()
                       if kind not in self.buffers or self.buffers[kind][0] != _structure(state))
        except Exception as e:  # noqa: BLE001 - raised once every rank has been through the guard's gather
            error = e
        if not self.guard.fits(need, error):  # (collective; raises if a rank failed) no room: the
            # caller saves synchronously, and kept buffers too small for this save are let go (the save needs the room)
            self.buffers.clear()
            return None
        if not self.buffers and acc.is_main_process:  # (the first save)
            log.info("checkpoint.async_save: FSDP2 shards are written in the background "
                     "(torch.distributed.checkpoint.async_save); the loop waits only for their host copy")
        items += own
        save_accelerator_state(str(folder), [], [], acc._schedulers, acc._dataloaders, acc.process_index, acc.step, acc.scaler)
        own_files = backend_file_digests(acc, folder)  # (its RNG state, a few KB: the digests go with its shards')
        staged = {kind: self._host_copy(kind, state) for kind, state in states.items()}
        return Uploads(self, folder, step, staged, own_files)

    def _host_copy(self, kind: str, state: dict) -> dict:
        """``state`` copied into this kind's host buffers (made on first use, again if its structure changed)."""
        from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

        shape = _structure(state)
        if kind not in self.buffers or self.buffers[kind][0] != shape:
            self.buffers[kind] = (shape, _create_cpu_state_dict(state, pin_memory=torch.cuda.is_available()))
        copy = _copy_state_dict(state, self.buffers[kind][1], non_blocking=torch.cuda.is_available())
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
        return copy


class Uploads:
    """One save's background DCP writes on this rank (the job of a rank other than the main process; the main
    process's commit waits for them first): ``start`` launches them, ``join`` waits and returns their error or None."""

    def __init__(self, owner: AsyncShards, folder: Path, step: int, staged: dict, own_files: dict | None = None):
        self.owner, self.folder, self.step, self.staged = owner, folder, step, staged
        self.own_files = own_files or {}  # this rank's other files of the save -> digest (sent with its model shards)
        self.futures: dict[str, Future] = {}
        self.writers: dict = {}

    @property
    def digests(self) -> dict[str, str]:
        """On the main process (DCP's coordinator) once :meth:`wait` returned: every rank's shard files, RNG-state
        files and the metadata, by their paths in the checkpoint, with their digests (elsewhere: empty)."""
        return {path: digest for writer in self.writers.values() for path, digest in writer.digests.items()}

    def start(self, background: bool = True) -> None:
        import torch.distributed.checkpoint as dcp

        rank, (staged_cls, writer_cls) = self.owner.acc.process_index, _dcp_classes()
        for name, state in self.staged.items():
            writer = self.writers[name] = writer_cls(str(self.folder / name), fault=f"{name}:rank{rank}@{self.step}",
                                                     per_thread_copy_ahead=0,
                                                     others=self.own_files if name == FSDP_MODEL else None)
            try:
                self.futures[name] = dcp.async_save(state, storage_writer=writer, process_group=self.owner.groups[name],
                                                    async_stager=staged_cls())
            except Exception as e:  # noqa: BLE001 - reported by join(), as a failed write is
                self.futures[name] = failed = Future()
                failed.set_exception(e)
        self.staged = None
        if not background:
            self.wait()

    def wait(self) -> None:
        """Until every rank's shard files and the metadata are on disk; raises a CheckpointError-like RuntimeError
        naming the first failing rank otherwise."""
        errors = []
        for name, future in self.futures.items():
            try:
                future.result()
            except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
                errors.append((name, e))
        if errors:
            name, e = errors[0]
            raise ShardWriteError(_describe(e, self.folder / name)) from None

    def join(self) -> BaseException | None:
        try:
            self.wait()
        except ShardWriteError as e:
            return e
        return None


class ShardWriteError(RuntimeError):
    pass


def _describe(error: BaseException, where: Path) -> str:
    """DCP's error (every failing rank's exception and traceback) as one line naming the first failing rank."""
    failures = getattr(error, "failures", None)
    if failures:
        rank, (cause, _trace) = sorted(failures.items())[0]
        return f"rank {rank} failed to write its shards: {describe_io_error(cause, where)}"
    return f"{socket.gethostname()}: {describe_io_error(error, where)}"


def _structure(obj, path: str = "") -> tuple:
    """The keys, shapes and dtypes of a (nested) state dict: host buffers are reused only for the same structure."""
    if isinstance(obj, dict):
        return tuple(_structure(v, f"{path}/{k}") for k, v in sorted(obj.items(), key=lambda kv: str(kv[0])))
    if isinstance(obj, (list, tuple)):
        return tuple(_structure(v, f"{path}/{i}") for i, v in enumerate(obj))
    if isinstance(obj, torch.Tensor):
        return (path, tuple(obj.shape), obj.dtype)
    return (path,)


def _gloo_group():
    """A gloo group of every rank, with the training group's timeout (train.distributed_timeout_s)."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=_default_timeout())


def _default_timeout():
    from torch.distributed.distributed_c10d import _get_default_group

    group = _get_default_group()
    for device in ("cpu", "cuda"):
        try:
            return group._get_backend(torch.device(device)).options._timeout
        except Exception:  # noqa: BLE001 - no such backend, or a torch without these attributes: gloo's default
            continue
    return None


@functools.cache
def _dcp_classes():
    """(AlreadyStaged, Writer), made on first use: torch.distributed.checkpoint takes a second to import."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import AsyncStager

    class AlreadyStaged(AsyncStager):
        """The state dict is already a host copy (:meth:`AsyncShards.stage`): DCP stages nothing more."""

        _synchronize_after_execute = False

        def stage(self, state_dict):
            return state_dict

        def synchronize_staging(self) -> None:
            pass

        def close(self) -> None:
            pass

    class Writer(dcp.FileSystemWriter):
        """DCP's file writer with the crash-test hook (cpt/fileio.py) at the start of this rank's writes (inside DCP's
        error handling, so an injected disk-full error on one rank reaches every rank as DCP's failure), which hashes
        the files it wrote once they are on disk and sends the digests (and ``others``: this rank's other files of the
        save, e.g. its RNG state) with its write results to the coordinator; there, ``digests`` gathers every rank's
        and the metadata's, by their paths in the checkpoint (``<folder name>/__0_0.distcp``)."""

        def __init__(self, path: str, fault: str, others: dict | None = None, **kwargs):
            super().__init__(path, **kwargs)
            self.fault, self.others = fault, dict(others or {})
            self.digests: dict[str, str] = {}

        def write_data(self, plan, planner):
            fault_point(self.fault)
            results = super().write_data(plan, planner).wait()  # (DCP's file writer returns a completed future)
            folder = Path(self.path)
            files = sorted({r.storage_data.relative_path for r in results})
            if results:  # (a frozen dataclass: the attribute is pickled with it into the coordinator's gather)
                object.__setattr__(results[0], "cpt_digests", {
                    **self.others, **{f"{folder.name}/{f}": file_digest(folder / f) for f in files}})
            done = torch.futures.Future()  # (what DCP waits on: torch's future, not concurrent.futures')
            done.set_result(results)
            return done

        def finish(self, metadata, results) -> None:
            for rank_results in results:
                for r in rank_results:
                    self.digests.update(getattr(r, "cpt_digests", {}))
            super().finish(metadata, results)
            meta = Path(self._get_metadata_path())
            self.digests[f"{Path(self.path).name}/{meta.name}"] = file_digest(meta)

    return AlreadyStaged, Writer
