"""LoRA and ``model.freeze`` resume checkpoints under FSDP2 and DeepSpeed ZeRO-1/2/3: the adapter's (the trainable
parameters') shards, without the frozen base.

accelerate's ``save_state`` writes the whole model under FSDP2 and DeepSpeed: the frozen base again at every save
(140 GB for a 70B base). For a peft model cpt keeps each backend's own sharded layout (cpt/consolidate.py reads it,
so such a checkpoint moves to another world size or backend, and exports, as a whole-model one does) but leaves the
base out, through the libraries' own means:

* FSDP2 (``fsdp_state_dict_type: SHARDED_STATE_DICT``, configs/accelerate/fsdp.yaml): the model's sharded state dict
  (``torch.distributed.checkpoint.state_dict.get_model_state_dict``) restricted to :func:`cpt.adapters.adapter_keys`
  is saved by DCP into accelerate's ``pytorch_model_fsdp_0/``; the optimizer (it holds the trainable parameters only)
  by accelerate's ``save_fsdp_optimizer`` into ``optimizer_0/``; RNG states (and a scaler) by accelerate's
  ``save_accelerator_state``. Loaded back by the same functions' counterparts (DCP loads into this run's shards).
* DeepSpeed: ``save_state(..., exclude_frozen_parameters=True)``, which accelerate hands to DeepSpeed's
  ``save_checkpoint``: the frozen parameters leave the module state and ZeRO's frozen-parameter fragments (the ZeRO
  optimizer partitions only ever hold trainable ones; an output head tied to the frozen embedding is left out too);
  loaded by ``load_state(..., load_module_strict=False)`` (the frozen parameters keep the values the run built them
  with). A ``model.freeze`` run's the same way: the frozen layers are what is left out.
  Adapter weights that ``model.freeze`` froze would be left out too (they need not equal a fresh initialisation: a
  stage from an earlier LoRA checkpoint trained them), so such a run keeps the whole-model checkpoint, saying so.

With ``checkpoint.async_save`` the FSDP2 files (model and optimizer shards, RNG states) are the same, written in the
background by DCP's async_save (cpt/sharded_save.py, through :func:`fsdp_model_state`); DeepSpeed's too, :func:`save_state`
run with cpt/zero_save.py's staging engine in DeepSpeed's, the files written in the background.

Beside them ``adapter_base.json`` (cpt/adapter_checkpoint.py) records the base fingerprint taken when the model was
built; it is what marks the checkpoint as one without its base (:func:`cpt.adapter_checkpoint.is_adapter_layout`).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from pathlib import Path

from cpt.adapter_checkpoint import (ADAPTER_STATE, FSDP_MODEL, base_items, is_adapter_layout, models_from_adapter_state,
                                    refuse_other_keys_sharded, saved_keys, without_base)
from cpt.adapters import adapter_keys
from cpt.distributed import Backend, backend
from cpt.fileio import describe_io_error, fault_point
from cpt.pickle_scan import check_checkpoint_pickles

log = logging.getLogger("cpt.checkpoint")



class CollectiveSaveError(RuntimeError):
    """A rank failed inside FSDP's or DeepSpeed's own save, whose collectives the other ranks are waiting in: the run
    stops at once (were it to join the ranks' agreement on skipping the save instead, every rank would wait for ever)."""


def save_state_or_stop(acc, folder: Path, step: int) -> list[tuple[str, str, str]]:
    """:func:`save_state`; a failure on one rank of several is a :class:`CollectiveSaveError` naming the rank, the
    step and the cause in plain words."""
    try:
        fault_point(f"save_state:rank{acc.process_index}@{step}")
        return save_state(acc, folder)
    except Exception as e:
        if acc.num_processes == 1:
            raise
        raise CollectiveSaveError(
            f"checkpoint at step {step}: rank {acc.process_index} ({socket.gethostname()}) failed in the "
            f"{backend(acc).value} save, a collective one the run cannot skip: {describe_io_error(e, folder)}. The "
            "previous checkpoint (if any) is intact; fix the cause, then --resume") from e


def save_state(acc, folder: Path) -> list[tuple[str, str, str]]:
    """accelerate's ``save_state`` into ``folder`` on every rank (collective) under FSDP2 or DeepSpeed; a LoRA model's
    adapter shards without the frozen base. Returns the main process's own files to add (``adapter_base.json``)."""
    model = _adapter_model(acc)
    if model is None:
        acc.save_state(str(folder), safe_serialization=True)
        return []
    if backend(acc) is Backend.DEEPSPEED:
        with _without_frozen_aliases(model):
            acc.save_state(str(folder), safe_serialization=True, exclude_frozen_parameters=True)
    else:
        _save_fsdp(acc, model, folder)
    return base_items(model, len(adapter_keys(model)), getattr(model, "_cpt_base_fingerprint", None))


def fsdp_model_state(acc) -> tuple[dict, list[tuple[str, str, str]]]:
    """FSDP2 (SHARDED_STATE_DICT): the model's sharded state dict as accelerate's ``save_fsdp_model`` saves it under
    ``"model"`` (a LoRA model: its adapter shards alone), and the main process's own files to add (a LoRA model's
    ``adapter_base.json``). For cpt/sharded_save.py, which saves it in the background."""
    model = _adapter_model(acc)
    if model is None:
        from accelerate.utils.fsdp_utils import _prepare_sd_options
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(acc._models[0], options=_prepare_sd_options(acc.state.fsdp_plugin)), []
    return _adapter_shards(model), base_items(model, len(adapter_keys(model)), getattr(model, "_cpt_base_fingerprint", None))


def load_state(acc, ckpt: Path) -> None:
    """accelerate's ``load_state`` of a checkpoint of this run's backend and world size (collective); a LoRA
    checkpoint without its base (any layout) loads its adapter over the base the run built. The pickles DeepSpeed or
    DCP would read unrestricted are checked first (:class:`cpt.pickle_scan.PickleCheckError`)."""
    check_checkpoint_pickles(ckpt)
    if not is_adapter_layout(ckpt):
        acc.load_state(str(ckpt))
    elif (ckpt / ADAPTER_STATE).is_file():  # one process or DDP: cpt's adapter file
        with models_from_adapter_state(acc, ckpt):
            acc.load_state(str(ckpt))
    elif backend(acc) is Backend.DEEPSPEED:
        acc.load_state(str(ckpt), load_module_strict=False)
    else:
        _load_fsdp(acc, acc.unwrap_model(acc._models[0], keep_torch_compile=False), ckpt)


def _adapter_model(acc):
    """The (unwrapped) peft or model.freeze model (:func:`cpt.adapter_checkpoint.without_base`) whose checkpoint can
    leave its base out under this run's backend, else None."""
    if len(acc._models) != 1 or len(acc._optimizers) != 1:
        return None
    model = acc.unwrap_model(acc._models[0], keep_torch_compile=False)
    if not without_base(model):
        return None
    if backend(acc) is Backend.FSDP:
        plugin = acc.state.fsdp_plugin
        sharded = getattr(plugin.state_dict_type, "name", str(plugin.state_dict_type)).endswith("SHARDED_STATE_DICT")
        return model if acc.is_fsdp2 and sharded else None
    if backend(acc) is Backend.DEEPSPEED:
        keys = set(adapter_keys(model))
        frozen = [n for n, p in model.named_parameters() if n in keys and not p.requires_grad]
        if frozen:
            if not getattr(model, "_cpt_whole_model_said", False) and acc.is_main_process:
                log.warning("model.freeze froze adapter weights (%s, ...): DeepSpeed's exclude_frozen_parameters would "
                            "leave them out, so this run's checkpoints hold the whole model", frozen[0])
            model._cpt_whole_model_said = True
            return None
        return model
    return None


@contextlib.contextmanager
def _without_frozen_aliases(model):
    """DeepSpeed's ``exclude_frozen_parameters`` drops each frozen parameter under its first name only: the output
    head tied to a frozen embedding (Llama-3.2, SmolLM2, Gemma) stayed in ZeRO-2's module state, the embedding whole.
    Within, the model's ``state_dict`` leaves out every frozen parameter's other names too."""
    first = {n for n, _ in model.named_parameters()}
    aliases = {n for n, p in model.named_parameters(remove_duplicate=False) if n not in first and not p.requires_grad}

    def drop(module, state_dict, prefix, local_metadata):
        for name in aliases:
            state_dict.pop(prefix + name, None)

    handle = model.register_state_dict_post_hook(drop)
    try:
        yield
    finally:
        handle.remove()


def _adapter_shards(model) -> dict:
    """The model's sharded state dict (DTensors: nothing gathered) restricted to its adapter tensors."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    keys = set(adapter_keys(model))
    return {k: v for k, v in get_model_state_dict(model).items() if k in keys}


def _save_fsdp(acc, model, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from accelerate.checkpointing import save_accelerator_state
    from accelerate.utils import save_fsdp_optimizer

    dcp.save({"model": _adapter_shards(model)}, storage_writer=dcp.FileSystemWriter(str(folder / FSDP_MODEL)))
    save_fsdp_optimizer(acc.state.fsdp_plugin, acc, acc._optimizers[0], acc._models[0], str(folder), 0)
    save_accelerator_state(str(folder), [], [], acc._schedulers, acc._dataloaders, acc.process_index, acc.step, acc.scaler)


def _load_fsdp(acc, model, ckpt: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from accelerate.checkpointing import load_accelerator_state
    from accelerate.utils import load_fsdp_optimizer
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    refuse_other_keys_sharded(model, saved_keys(ckpt, model), ckpt)
    state = _adapter_shards(model)
    dcp.load({"model": state}, storage_reader=dcp.FileSystemReader(str(ckpt / FSDP_MODEL)))
    set_model_state_dict(model, state, options=StateDictOptions(strict=False))
    load_fsdp_optimizer(acc.state.fsdp_plugin, acc, acc._optimizers[0], acc._models[0], str(ckpt), 0)
    load_accelerator_state(str(ckpt), [], [], acc._schedulers, acc._dataloaders, acc.process_index, acc.scaler)
