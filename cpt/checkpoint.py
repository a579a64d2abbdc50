"""Resume checkpoints: written atomically, hashed while written, verified on load, the last K kept.

Layout of a run directory::

    <run_dir>/checkpoints/step_00000100/   accelerate state (model, optimizer, every rank's RNG; LoRA, model.freeze:
                                           no frozen base, cpt/adapter_checkpoint.py, cpt/adapter_shards.py),
                                           trainer_state.json + state.safetensors: every registered component's
                                           state (the loop's counters, data position, evaluator, EMA, ...: cpt/state.py),
                                           config.yaml, trainable.json (each optimizer group's parameter names
                                           and shapes), CHECKSUMS.json (written last: the "complete" mark)
    <run_dir>/checkpoints/.tmp-step_...    a save in progress: never read, removed by the next save
    <run_dir>/checkpoints/.trash-step_...  an old checkpoint being pruned: never read, removed by the next save
    <run_dir>/checkpoints/unusable-step_.. a checkpoint that failed verification, set aside by --resume

A save goes to a temporary directory that is renamed into place only once every rank has finished
and CHECKSUMS.json is written, so a kill at any moment leaves the previous checkpoint intact (tested
by killing the process at every file boundary: tests/test_crash_consistency.py). Only committed
``step_N`` directories count as checkpoints, for the fresh-run check and for resume alike.

Non-blocking saves (``checkpoint.async_save``): the loop blocks only for the copy to host memory; the files are written
in the background (one process, DDP: hashed as written; FSDP2: DCP's async_save, cpt/sharded_save.py; DeepSpeed: its own
files, cpt/zero_save.py), committed once every rank's are on disk. The next save, the end and a preemption exit wait for
it; its failure counts toward ``checkpoint.max_failed_saves``. FSDP1 and FULL_STATE_DICT save synchronously; so does a
save whose host copy would not fit in host memory (cpt/host_memory.py; DeepSpeed: file by file).

On resume the newest checkpoint whose files match CHECKSUMS.json is used; a truncated or corrupt
one is skipped with one warning. Its optimizer state is loaded only for the trainable parameters and groups it was
saved with (trainable.json, compared before anything loads, whatever the strategy).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import threading
from pathlib import Path
from typing import Mapping

from cpt import adapter_shards, host_memory, sharded_save, zero_save
from cpt.adapter_checkpoint import AdapterCheckpointError, base_problem, is_adapter_layout, note_loaded_base
from cpt.base_dtype import in_fp32
from cpt.distributed import Backend, all_ranks_agree, backend, from_every_rank
from cpt.checkpoint_dir import (CHECKSUMS, PREFIX, STATE_TENSORS, TMP_PREFIX, TRAINABLE, TRAINER_STATE,  # noqa: F401 (re-exported)
                                 TRASH_PREFIX, UNUSABLE_PREFIX, CheckpointError, discard, latest_valid_checkpoint,
                                 list_checkpoints, remove_partial_saves, resolve_checkpoint, saved_step,
                                 saved_train_state, verify_checkpoint, write_checksums)
from cpt.checkpoint_files import backend_file_digests, cpt_can_write, host_copy, host_snapshot, write_files
from cpt.fileio import describe_io_error, fault_point, fsync_dir
from cpt.optim import group_settings, layout_difference, param_shapes, restore_group_settings, trainable_layout
from cpt.pickle_scan import PickleCheckError
from cpt.state import StateError, Stateful, check_format, flatten, json_default, restore, state_dict_mismatch

log = logging.getLogger("cpt.checkpoint")


class ShardedSaveError(CheckpointError):
    """A rank failed inside FSDP's or DeepSpeed's own save, whose collectives the other ranks are waiting in: it stops
    at once (were it to join the ranks' agreement on skipping the save instead, every rank would wait for ever)."""


ON_FAILURE = {  # CheckpointManager.save(on_failure=...): what follows a failed save, as its log line says
    "retry": "retrying at the next interval",
    "retry_at_end": "retrying once more at the run's end",
    "stop": "not retried: the run stops here, and a resume starts from the newest checkpoint",
    "raise": "",  # (a CheckpointError instead of the log line)
}


def on_failure_in_loop(preempted: bool, last_step: bool) -> str:
    """What follows a failed save in the training loop (:meth:`CheckpointManager.save`'s ``on_failure``): on a
    preemption the run stops anyway; at the run's last step its end tries once more; else the next interval does."""
    return "stop" if preempted else "retry_at_end" if last_step else "retry"


class CheckpointManager:
    """Saves and loads full resume state through accelerate (DDP, FSDP and DeepSpeed all supported).

    ``save`` is collective: every rank calls it at the same step. The failure policy is explicit: a failed save is
    reported in plain words (no space left, permission denied, the path), its partial files removed and the previous
    checkpoint kept; the next interval tries again, and after ``max_failed_saves`` failures in a row the run stops with
    a CheckpointError rather than training on without a checkpoint. ``async_save``: call ``wait()`` before exiting."""

    def __init__(self, run_dir: str | os.PathLike, keep: int, accelerator, async_save: bool = False, max_failed_saves: int = 3,
                 portable=None, lock=None):
        """``portable``: what loads a checkpoint of another backend or world size, an object with
        ``needs_portable_load(ckpt, acc)`` and ``load_portable(acc, model, optimizer, ckpt)`` (the loop passes
        :mod:`cpt.consolidate`, which builds on this module); None: accelerate's ``load_state`` only. ``lock``: the
        run's :class:`cpt.runlock.RunLock` (the main process's), checked before each save (:meth:`save`)."""
        self.portable, self.lock = portable, lock
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.acc = accelerator
        self.cpt_writes = cpt_can_write(accelerator)  # else FSDP2's shards through DCP (async_save), or accelerator.save_state
        self.shards = zero_save.for_run(accelerator, async_save and not self.cpt_writes)  # FSDP2, DeepSpeed; None: synchronous
        self.async_save = async_save and (self.cpt_writes or self.shards is not None)
        self.max_failed_saves = max_failed_saves
        self.failed_in_a_row, self.last_saved = 0, None  # (last_saved: the step of the last committed save, every rank)
        self._pending_step: int | None = None  # a save whose outcome is not known yet (every rank)
        self._pending_on_failure = "retry"  # (its save's on_failure)
        self._job = None  # its writer (main process: _Commit; the other ranks: FSDP2's background shard writes, if any)
        self._staging: dict = {}  # host buffers of a background save, reused by the next one (allocated once)
        self._fits = host_memory.Guard(accelerator).fits if self.async_save else None  # (FSDP2, DeepSpeed: their own guards)
        self._background = self.async_save
        self.trainable = trainable_layout(accelerator)  # this run's, before any load replaces the optimizer's groups
        self.settings = group_settings(accelerator)  # (put back after each load: restore_group_settings)

    def save(self, step: int, components: Mapping[str, Stateful], config_yaml: str, on_failure: str = "retry") -> None:
        """Save on every rank (collective): the accelerate state and every registered component (cpt/state.py).
        Blocks for the host copy; writes in the background with ``async_save``. ``on_failure`` is what follows a
        failed save (:data:`ON_FAILURE`): the next interval retries (``retry``), the run's end retries (``retry_at_end``:
        the loop's save at the last step), the run stops anyway (``stop``: a preemption, too many non-finite steps), or no try
        is left (``raise``: the run's final save, a CheckpointError)."""
        if on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure must be one of {sorted(ON_FAILURE)}, not {on_failure!r}")
        self.wait()  # one save at a time: the previous one must be on disk (and counted) first
        if step == self.last_saved:  # committed already (a run's end after a periodic save of its last step)
            return
        acc = self.acc
        # the run directory removed (rm -rf) or taken over under the run: its metrics.jsonl, config.yaml and log went
        # with it (written on into unlinked files), and a save would only recreate checkpoints/ beside another run
        lost = self.lock.lost() if self.lock is not None and acc.is_main_process else None
        if not all_ranks_agree(acc, lost is None):
            raise CheckpointError(f"stopping before the checkpoint at step {step}: "
                                  f"{lost or 'the main process lost the run lock'}; this run's metrics.jsonl and "
                                  "train.log there may be gone. Restore the run directory (or use another one) and "
                                  "--resume from its newest checkpoint")
        tmp = self.root / f"{TMP_PREFIX}{PREFIX}{step:08d}"
        error = None
        if acc.is_main_process:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                remove_partial_saves(self.root)
                tmp.mkdir()
            except OSError as e:
                error = e
        self._background = self.async_save  # (this save's: _stage may find no host memory for it)
        if all_ranks_agree(acc, error is None):
            fault_point(f"save:begin@{step}")
            try:
                doc, tensors = flatten(components)
                job = self._stage(step, tmp, json.dumps(doc, indent=1, default=json_default), config_yaml, tensors)
            except adapter_shards.CollectiveSaveError as e:  # the other ranks are inside the backend's save: no agreement
                raise ShardedSaveError(str(e)) from e.__cause__
            except Exception as e:  # noqa: BLE001 - any failure must leave the old checkpoints intact
                error = e
        if not all_ranks_agree(acc, error is None):
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            self._record(step, error or CheckpointError("another rank failed while saving"), on_failure)
            return
        self._pending_step, self._pending_on_failure, self._job = step, on_failure, job
        if job is not None:
            job.start(background=self._background)
        if not self._background:
            self.wait()

    def finish(self, step: int, stop=None, say=print) -> None:
        """Wait for the last (background) write; after a stop (``stop``: the run's PreemptionFlag), log whether the
        stop's checkpoint at ``step`` was written (a failed one was logged by the save)."""
        self.wait()
        if stop is not None:
            say(stop.stopped_line(step, saved=self.last_saved == step))

    def wait(self) -> None:
        """Wait for the pending save (collective); report its outcome and apply the failure policy."""
        if self._pending_step is None:
            return
        step, self._pending_step = self._pending_step, None
        error, self._job = (self._job.join() if self._job is not None else None), None
        if not all_ranks_agree(self.acc, error is None):
            error = error or CheckpointError("the main process failed to write it")
        self._record(step, error, self._pending_on_failure)

    def _stage(self, step: int, tmp: Path, state_json: str, config_yaml: str, tensors):
        """Everything every rank must do before the commit; returns this rank's job (_Commit, FSDP2 shard writes or None)."""
        acc = self.acc
        items = [(TRAINER_STATE, "text", state_json), ("config.yaml", "text", config_yaml)]
        if self.trainable is not None:
            items.append((TRAINABLE, "text", json.dumps(self.trainable)))
        # EMA, Reptile (replicated; main process): a fresh host copy for a background write (counted by the host-memory
        # guards: DeepSpeed's reads the memory after it), the live tensors for a synchronous one
        tensors = dict(tensors) if acc.is_main_process else {}
        ema = [(STATE_TENSORS, "safetensors", host_copy(tensors, {}) if self.async_save else tensors)] if tensors else []
        digests, uploads = {}, None  # uploads: FSDP2's background shard writes, started once every rank has staged
        if self.cpt_writes:
            own, rng_name, rng, staged = host_snapshot(acc, self._staging if self.async_save else None, self._fits)
            self._background = staged  # (the same on every rank: host memory short on any node writes it now)
            if acc.is_main_process:
                items += own + [(rng_name, "torch", rng)]
            else:  # a few KB: written now, so every rank's part is on disk before the main process commits
                try:
                    digests = write_files(tmp, [(rng_name, "torch", rng)], step)
                except OSError as e:
                    digests = {"error": f"rank {acc.process_index} ({socket.gethostname()}): {describe_io_error(e, tmp)}"}
            digests = _gathered(acc, digests)
        elif self.shards is not None:  # FSDP2, DeepSpeed, non-blocking: staged here, written once all ranks agree
            uploads = self.shards.stage(tmp, step, items)  # (the fault point save_state:rank<r>@<step> in it)
            if uploads is None:  # no room for the host copy on some node (every rank): this save written now
                self._background = False
                items += adapter_shards.save_state_or_stop(acc, tmp, step)
                digests = _gathered(acc, _read_back(acc, tmp))
        else:  # FSDP / DeepSpeed shards, on every rank, through collectives inside the backend's save (LoRA: no base)
            items += adapter_shards.save_state_or_stop(acc, tmp, step)
            digests = _gathered(acc, _read_back(acc, tmp))
        if not acc.is_main_process:
            return uploads
        return _Commit(self, step, tmp, items + ema, digests, uploads)

    def _record(self, step: int, error: BaseException | None, on_failure: str = "retry") -> None:
        if error is None:
            self.failed_in_a_row, self.last_saved = 0, step
            return
        if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: a stop, not a failed save
            raise error
        self.failed_in_a_row += 1
        cause = str(error) if isinstance(error, (CheckpointError, sharded_save.ShardWriteError)) else describe_io_error(error, self.root)
        last = list_checkpoints(self.root.parent)
        previous = f"the checkpoint {last[-1].name} is intact" if last else "no earlier checkpoint exists"
        if on_failure == "raise":  # the run's last save: training on to a later try is not possible
            raise CheckpointError(
                f"the run's final checkpoint at step {step} FAILED: {cause}; {previous}. The run trained to its end "
                f"but its last state is not saved: fix the cause, then --resume (it trains again from "
                f"{last[-1].name if last else 'the start'})")
        stops = self.failed_in_a_row >= self.max_failed_saves  # (then the error below says so, not a retry)
        if self.acc.is_main_process:
            log.error(f"checkpoint at step {step} FAILED: {cause}; {previous}; "
                      f"{'no retry: the run stops' if stops else ON_FAILURE[on_failure]} "
                      f"({self.failed_in_a_row} of {self.max_failed_saves} failures in a row allowed)")
        if stops:
            raise CheckpointError(
                f"{self.failed_in_a_row} checkpoint saves in a row failed (the last at step {step}: {cause}); stopping rather "
                f"than training on without a checkpoint. Newest checkpoint: {last[-1] if last else 'none'}. Fix the cause, "
                "then continue with --resume (checkpoint.max_failed_saves sets how many failures are tolerated)"
            )

    def _prune(self) -> None:
        ckpts = list_checkpoints(self.root.parent)
        for old in ckpts[: max(0, len(ckpts) - self.keep)]:
            discard(old)

    def load(self, ckpt: Path, components: Mapping[str, Stateful] | None = None, optimizer_state: bool = True) -> None:
        """Restore model, optimizer and RNG states in place, then every registered component (``components``; None:
        the weights and optimizer only, e.g. a new stage from a checkpoint). A component missing from the
        checkpoint, or refusing its state, is one CheckpointError naming the checkpoint and the component.
        ``optimizer_state=False``: the caller resets the optimizer state next (its parameters need not match).

        A checkpoint of another backend or ZeRO world size goes through ``portable`` (cpt.consolidate: weights and
        Adam state carried over, RNG states not)."""
        if components is not None:  # refused before anything is loaded
            try:
                check_format(json.loads((ckpt / TRAINER_STATE).read_text()))
            except StateError as e:
                raise CheckpointError(f"checkpoint {ckpt}: {e}") from None
        model = self.acc.unwrap_model(self.acc._models[0], keep_torch_compile=False) if self.acc._models else None
        adapter = is_adapter_layout(ckpt)  # LoRA, model.freeze: no frozen base, the run built it (adapter_checkpoint.py)
        if adapter:  # (collective: a rank without all base weights here, e.g. FSDP's meta ones, has no fingerprint)
            problem = base_problem(ckpt, model)
            if not all_ranks_agree(self.acc, problem is None):
                raise CheckpointError(f"checkpoint {ckpt}: {problem or 'its adapter does not fit (another process says why)'}")
        if optimizer_state and self.trainable is not None and (ckpt / TRAINABLE).is_file():  # (older: checked below)
            first = layout_difference(json.loads((ckpt / TRAINABLE).read_text()), self.trainable, param_shapes(self.acc))
            if first:
                _refuse_other_params(ckpt, first)
        fp32_base = contextlib.ExitStack()  # a whole-model checkpoint: its fp32 base loads (and is fingerprinted) exactly
        if not adapter and model is not None:  # (a LoRA base stored in bf16/fp16: cpt/base_dtype.py)
            fp32_base.enter_context(in_fp32(model))
        with fp32_base:  # (undone also when the load fails)
            self._load_weights(ckpt, optimizer_state)
            if model is not None:  # a base from the checkpoint: fingerprinted again (or whole-model checkpoints)
                note_loaded_base(model, ckpt, adapter, hash_here=self.cpt_writes)
        restore_group_settings(self.acc, self.settings)
        # accelerate restores its micro-step counter, which places the gradient-accumulation boundaries; a checkpoint
        # is always at an optimizer-step boundary, and another world size accumulates another number of micro-steps
        self.acc.step = 0
        if components is not None:
            load_components(ckpt, components)

    def _load_weights(self, ckpt: Path, optimizer_state: bool) -> None:
        """Model and optimizer state (and RNG states) of ``ckpt``: this backend's own load, or ``portable``'s."""
        if self.portable is not None and self.portable.needs_portable_load(ckpt, self.acc):
            log.warning("%s was written with another backend, number of processes or model.compile wrapper: loading "
                        "it through cpt.consolidate (weights and optimizer state; RNG states are not carried over)", ckpt)
            self.portable.load_portable(self.acc, self.acc._models[0], self.acc._optimizers[0], ckpt)
        else:
            names = _optimizer_param_names(self.acc)
            try:
                adapter_shards.load_state(self.acc, ckpt)  # (a LoRA checkpoint: the adapter over the base as built)
            except (AdapterCheckpointError, PickleCheckError) as e:
                raise CheckpointError(f"checkpoint {ckpt}: {e}") from None
            except ValueError as e:  # torch's Optimizer.load_state_dict: other groups or group sizes
                if "parameter group" not in str(e) or not any(names):
                    raise
                if optimizer_state:
                    _check_optimizer_params(ckpt, names, [])
                # (the weights loaded first; the caller resets the optimizer state, RNG states start afresh)
                log.warning("%s: its optimizer state is for other parameter groups: not loaded", ckpt)
            except RuntimeError as e:  # torch's load_state_dict: keys or shapes that do not fit the model
                if "Error(s) in loading state_dict" not in str(e):
                    raise
                raise CheckpointError(
                    f"checkpoint {ckpt}: its weights do not fit the model this run builds ({state_dict_mismatch(e)}): "
                    "the run config's model section (model.name_or_path / model.arch) must be the model the "
                    f"checkpoint was trained from{_lora_mismatch_hint(str(e), ckpt)}") from None
            if optimizer_state:
                _check_optimizer_params(ckpt, names, _optimizer_param_names(self.acc))


def _optimizer_param_names(acc) -> list[list[str]]:
    """The parameter names of each optimizer group (cpt.optim.param_groups records them; torch saves them in the
    optimizer state and keeps the loaded ones on load); none under FSDP and DeepSpeed, which load their own way."""
    if backend(acc) not in (Backend.SINGLE, Backend.DDP):
        return []
    return [list(g.get("param_names", ())) for opt in acc._optimizers
            for g in getattr(opt, "optimizer", opt).param_groups]


def _check_optimizer_params(ckpt: Path, before: list[list[str]], loaded: list[list[str]]) -> None:
    """The check after torch's load, for a checkpoint without trainable.json (written before cpt recorded it)."""
    if loaded == before or not any(before):
        return
    now, then = [n for g in before for n in g], [n for g in loaded for n in g]
    _refuse_other_params(ckpt, next((f"{a} vs {b}" for a, b in zip(now, then) if a != b),
                                    f"{len(now)} vs {len(then)} parameters" if then else "the number or sizes of the parameter groups"))


def _refuse_other_params(ckpt: Path, first: str) -> None:
    """torch loads Adam moments by position (FSDP2's load failed in a DCP traceback; ZeRO's flat partitions are laid
    out by position): a checkpoint of other trainable parameters (another model.freeze, LoRA target or lr multiplier, past
    --allow-config-change or as train.init_from with init_optimizer) would hand one parameter's moments to another
    of the same shape, silently."""
    raise CheckpointError(
        f"checkpoint {ckpt}: its optimizer state is for other trainable parameters or groups than this run's "
        f"(model.freeze, model.lora or optim changed; first difference: {first}): Adam's moments would go to the "
        "wrong parameters; keep those settings, or start from its weights alone (train.init_from with "
        "train.init_optimizer: false)")


def _lora_mismatch_hint(error: str, ckpt: Path) -> str:
    """What to do when one side of a weight mismatch is a LoRA (peft) model and the other is not."""
    unexpected = next((line for line in error.splitlines() if "Unexpected key(s)" in line), "")
    missing = next((line for line in error.splitlines() if "Missing key(s)" in line), "")
    export = f"`cpt export {ckpt} --out DIR`"
    if "base_model.model." in unexpected and "base_model.model." not in missing:
        return (f"; it is a LoRA run's checkpoint and this run has no model.lora: keep model.lora, or merge the adapter "
                f"({export}) and start from DIR (train.init_from)")
    if "base_model.model." in missing and "base_model.model." not in unexpected:
        return ("; this run uses model.lora and the checkpoint is a full model's: train the adapter on it as a new "
                f"stage (train.init_from {ckpt}, without --resume or --anneal: its model becomes that run's base)")
    if ("_orig_mod." in unexpected) != ("_orig_mod." in missing):  # torch.compile's wrapper on one side only
        return ("; model.compile: true (torch.compile's wrapper) keys the weights `_orig_mod.<name>`, and one side "
                f"only has them: export the checkpoint ({export}) and start from DIR (train.init_from)")
    return ""


def load_components(ckpt: Path, components: Mapping[str, Stateful]) -> None:
    """Load every registered component from a checkpoint's trainer_state.json and state.safetensors."""
    tensors = {}
    if (ckpt / STATE_TENSORS).is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(ckpt / STATE_TENSORS))
    try:
        restore(components, json.loads((ckpt / TRAINER_STATE).read_text()), tensors)
    except StateError as e:
        raise CheckpointError(f"checkpoint {ckpt}: {e}") from None


def _read_back(acc, tmp: Path) -> dict[str, str]:
    """This rank's share of a synchronous backend save's files, read back and hashed (cpt/checkpoint_files.py), or
    the error that stopped it (reported by :func:`_gathered` on every rank)."""
    try:
        return backend_file_digests(acc, tmp)
    except OSError as e:
        return {"error": f"rank {acc.process_index} ({socket.gethostname()}): {describe_io_error(e, tmp)}"}


def _gathered(acc, digests: dict[str, str]) -> dict[str, str]:
    """Every rank's digests (collective), on every rank; a rank's error raised on every rank."""
    gathered = from_every_rank(acc, digests)
    failed = [d["error"] for d in gathered if "error" in d]
    if failed:
        raise CheckpointError(f"a rank could not write its part: {failed[0]}")
    return {k: v for d in gathered for k, v in d.items()}


class _Commit:
    """The main process's part of a save: wait for every rank's FSDP2 shard writes (``uploads``, cpt/sharded_save.py), write
    its files (hashed as written), CHECKSUMS.json, rename, prune. Inline or in a thread; ``join()`` returns its error."""

    def __init__(self, manager: CheckpointManager, step: int, tmp: Path, items: list, digests: dict[str, str], uploads=None):
        self.manager, self.step, self.tmp, self.items, self.digests, self.uploads = manager, step, tmp, items, digests, uploads
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def start(self, background: bool) -> None:
        if self.uploads is not None:
            self.uploads.start()
        if background:  # not a daemon: an exiting interpreter still finishes the write
            self.thread = threading.Thread(target=self.run, name=f"cpt-checkpoint-{self.step}")
            self.thread.start()
        else:
            self.run()

    def join(self) -> BaseException | None:
        if self.thread is not None:
            self.thread.join()
        return self.error

    def run(self) -> None:
        step, tmp = self.step, self.tmp
        final = tmp.with_name(tmp.name[len(TMP_PREFIX):])
        replaced = final.with_name(TRASH_PREFIX + final.name)
        try:
            if self.uploads is not None:  # every rank's shard files and DCP's .metadata on disk, or an error
                self.uploads.wait()
                fault_point(f"save:shards@{step}")
            digests = {**self.digests, **getattr(self.uploads, "digests", {}), **write_files(tmp, self.items, step)}
            self.items = None  # free the host copy
            write_checksums(tmp, digests)
            fault_point(f"save:checksums@{step}")
            if final.exists():  # a save of the same step (a resumed run that passed it again, e.g. at its last step):
                os.replace(final, replaced)  # deleted once the new one is in place (a kill while deleting it keeps one)
            os.replace(tmp, final)
            fsync_dir(tmp.parent)
            fault_point(f"save:renamed@{step}")
        except BaseException as e:  # noqa: BLE001 - reported by wait()
            self.error = e
            shutil.rmtree(tmp, ignore_errors=True)
            if replaced.exists() and not final.exists():
                with contextlib.suppress(OSError):
                    os.replace(replaced, final)  # the earlier save of this step stays
            if not isinstance(e, Exception) and threading.current_thread() is threading.main_thread():
                raise  # Ctrl-C in a synchronous save: the run stops (it was counted as a failed save, training went on)
            return
        shutil.rmtree(replaced, ignore_errors=True)
        try:
            self.manager._prune()
        except OSError as e:  # the new checkpoint is safe; an old one stays behind
            log.warning(f"could not remove an old checkpoint: {describe_io_error(e, tmp.parent)}")
        fault_point(f"save:pruned@{step}")


def wait_for_writers() -> None:
    """Wait for every background checkpoint writer of this process (before giving up the run lock)."""
    for t in threading.enumerate():
        if t.name.startswith("cpt-checkpoint-") and t is not threading.current_thread():
            t.join()
