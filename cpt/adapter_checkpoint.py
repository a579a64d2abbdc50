"""Resume checkpoints without the frozen base: LoRA (peft) runs and ``model.freeze`` runs.

On one process and under DDP (where cpt writes the checkpoint files itself: cpt/checkpoint_files.py) such a model's
checkpoint holds ``adapter_state.safetensors`` instead of accelerate's whole-model ``model.safetensors``: the tensors
of :func:`cpt.adapters.adapter_keys`, keyed as the unwrapped model's ``state_dict``. A peft model: its trainable
parameters (LoRA A/B, the ``modules_to_save`` copies, the new vocabulary rows of ``trainable_token_indices``) and
adapter weights ``model.freeze`` froze. A ``model.freeze`` run without LoRA: its trainable parameters (the frozen
layers are left out). The optimizer, scaler, RNG and cpt's own files are unchanged. Under FSDP2 and DeepSpeed
ZeRO-2/3 a LoRA checkpoint keeps its backend's sharded layout, with the adapter's shards alone
(cpt/adapter_shards.py), and so does a ``model.freeze`` run's (its trainable shards; DeepSpeed's
exclude_frozen_parameters). Either way ``adapter_base.json`` records the base it was trained on: its name, what was
left out (``kind``: ``lora`` or ``freeze``) and :func:`cpt.adapters.base_fingerprint` (SHA-256 of the frozen base
as built: weights, vocabulary changes included); a base-rewriting init's (PiSSA, OLoRA) checkpoint also holds the
initial factors its residual base is rebuilt from (``lora_init_factors.safetensors``, cpt/adapter_init.py).

Whoever reads the checkpoint rebuilds the base as the run did (``model.name_or_path`` or an HF ``train.init_from``,
``model.vocab``, ``run.seed`` for a base built from ``model.arch``) and loads the saved state on top: a resume, a new
stage or anneal branch from it (cpt/checkpoint.py), another backend or world size (cpt/consolidate.py) and
``cpt export`` / ``eval`` / ``interpolate`` / ``average``. A base that differs from the recorded one is refused in one
line (:class:`AdapterCheckpointError`) before anything is loaded. A LoRA run started from a full model's cpt
checkpoint built its base from ``RUN/base`` (cpt/stage_base.py): the record names that checkpoint (``base_from``), and
a base that is gone or changed is refused saying how to put it back. A ``model.freeze`` run whose frozen part is not the
base as built (a stage from a whole-model checkpoint: :func:`note_loaded_base`) writes whole-model checkpoints.

A checkpoint's layout is told by its files (:func:`is_adapter_layout`), so whole-model checkpoints of any run (earlier
cpt's LoRA and ``model.freeze`` checkpoints among them) load as before.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

from cpt.adapter_init import ADAPTER_BASE, factors_items, mismatch_hint
from cpt.adapters import adapter_keys, base_fingerprint, note_base
from cpt.pickle_scan import DEEPSPEED_FOLDER, zero_safe_classes

log = logging.getLogger("cpt.checkpoint")

ADAPTER_STATE = "adapter_state.safetensors"
DEEPSPEED_TAG = DEEPSPEED_FOLDER  # accelerate's folder of DeepSpeed's files (its MODEL_NAME)
FSDP_MODEL = "pytorch_model_fsdp_0"  # accelerate's DCP folder of an FSDP model (FSDP_MODEL_NAME); its optimizer_0 beside
STAGE_BASE_DIR = "base"  # RUN/base: a LoRA run's base written from a full model's cpt checkpoint (cpt/stage_base.py)
STAGE_BASE_SOURCE = "cpt_base.json"  # in it: the checkpoint it was written from


class AdapterCheckpointError(RuntimeError):
    """An adapter-layout checkpoint that does not fit the model built to read it (the callers add the checkpoint)."""


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def without_base(model) -> bool:
    """Whether ``model`` (unwrapped) saves its checkpoints without the frozen base: a peft model, or a ``model.freeze``
    one whose frozen part is the base as built (:func:`cpt.adapters.note_base` recorded it: cpt/model.py)."""
    return is_peft_model(model) or hasattr(model, "_cpt_base_fingerprint")


def is_adapter_layout(ckpt: str | Path) -> bool:
    """Whether ``ckpt`` holds a model without its base (any backend's layout: ``adapter_base.json``)."""
    return (Path(ckpt) / ADAPTER_STATE).is_file() or (Path(ckpt) / ADAPTER_BASE).is_file()


def adapter_items(model) -> list[tuple[str, str, object]]:
    """A model's part of a checkpoint (:func:`without_base`) as ``(file name, kind, payload)`` items for
    :func:`cpt.checkpoint_files.write_files`: its state without the base (tensors still on the device), base record."""
    keys, seen = set(adapter_keys(model)), set()
    state = {}
    for k, v in model.state_dict(keep_vars=True).items():  # (model.freeze: a tied head once, tied again when built)
        if k in keys and (is_peft_model(model) or id(v) not in seen):
            state[k] = v.detach()
            seen.add(id(v))
    fingerprint = getattr(model, "_cpt_base_fingerprint", None) or base_fingerprint(model)
    return [(ADAPTER_STATE, "safetensors", state), *base_items(model, len(state), fingerprint)]


def base_items(model, adapter_tensors: int, fingerprint: str | None) -> list[tuple[str, str, object]]:
    """What a checkpoint without the base records of it: ``adapter_base.json`` (:func:`base_record_item`) and, for a
    base-rewriting init (PiSSA, OLoRA), the initial factors its residual base is rebuilt from (cpt/adapter_init.py)."""
    return [base_record_item(model, adapter_tensors, fingerprint), *factors_items(model)]


def base_record_item(model, adapter_tensors: int, fingerprint: str | None) -> tuple[str, str, str]:
    """``adapter_base.json`` as a ``(file name, kind, payload)`` item: the base's name, ``kind``, ``fingerprint``."""
    base = model.get_base_model() if is_peft_model(model) else model
    record = {"base": str(getattr(base, "name_or_path", "") or "model.arch"), "fingerprint": fingerprint,
              "adapter_tensors": adapter_tensors, "kind": "lora" if is_peft_model(model) else "freeze"}
    source = Path(record["base"]) / STAGE_BASE_SOURCE  # a base written from a cpt checkpoint: which one
    if record["base"] != "model.arch" and source.is_file():
        record["base_from"] = json.loads(source.read_text())
    return (ADAPTER_BASE, "text", json.dumps(record, indent=1))


def read_base_record(ckpt: str | Path) -> dict:
    """A checkpoint's ``adapter_base.json``: the base's name, fingerprint and kind (``lora`` when not recorded)."""
    return {"kind": "lora", **json.loads((Path(ckpt) / ADAPTER_BASE).read_text())}


def saved_keys(ckpt: str | Path, model) -> set[str]:
    """The model's state-dict keys the checkpoint's adapter state holds (a tied tensor saved once: under all its names;
    FSDP2's layout: the keys of its DCP metadata)."""
    if (Path(ckpt) / ADAPTER_STATE).is_file():
        from safetensors import safe_open

        with safe_open(str(Path(ckpt) / ADAPTER_STATE), framework="pt") as f:
            saved = set(f.keys())
    elif (Path(ckpt) / DEEPSPEED_TAG).is_dir():
        saved = _deepspeed_saved_keys(Path(ckpt) / DEEPSPEED_TAG)
    else:
        from cpt.pickle_scan import PickleCheckError, read_dcp_metadata

        try:
            meta = read_dcp_metadata(Path(ckpt) / FSDP_MODEL).state_dict_metadata
        except PickleCheckError as e:
            raise AdapterCheckpointError(str(e)) from None
        saved = {k[len("model."):] for k in meta if k.startswith("model.")}
    return _with_aliases(model, saved)


def _deepspeed_saved_keys(folder: Path) -> set[str]:
    """The parameters a DeepSpeed checkpoint holds (written with ``exclude_frozen_parameters``: the trainable ones): the
    names of its ZeRO partitions (``param_shapes``), from one rank's model states file (memory-mapped: its tensors are
    not read)."""
    files = sorted(folder.glob("*model_states.pt"))
    if not files:
        raise AdapterCheckpointError(f"{folder}: no DeepSpeed *model_states.pt file (an incomplete or damaged checkpoint)")
    first = files[0]
    with torch.serialization.safe_globals(zero_safe_classes()):
        state = torch.load(first, map_location="cpu", weights_only=True, mmap=True)
    return {name for group in state.get("param_shapes") or [] for name in group}


def _with_aliases(model, keys) -> set[str]:
    """``keys`` and every other state-dict name of the same tensors in ``model`` (a tied head saved once)."""
    sd = model.state_dict(keep_vars=True)
    ids = {id(sd[k]) for k in keys if k in sd}
    return set(keys) | {k for k, v in sd.items() if id(v) in ids}


def check_fits(ckpt: str | Path, model, record: dict | None = None) -> None:
    """AdapterCheckpointError unless ``model`` (unwrapped, as built: not yet loaded from anything) is built on the base
    the state in ``ckpt`` was trained on (``record``: its :func:`read_base_record`, read when not given): a LoRA
    checkpoint's by a peft model; a ``model.freeze`` one's by a model without LoRA (whatever it freezes: the tensors
    the checkpoint leaves out are hashed again when this model's frozen ones are others)."""
    record = {"kind": "lora", **(record if record is not None else read_base_record(ckpt))}
    export = f"`cpt export {ckpt} --out DIR` and start from DIR (train.init_from)"
    if record["kind"] == "lora" and not is_peft_model(model):
        raise AdapterCheckpointError(
            "it is a LoRA run's checkpoint and this run has no model.lora (it holds the adapter, not its base): keep "
            f"model.lora, or merge the adapter ({export})")
    if record["kind"] == "freeze" and is_peft_model(model):
        raise AdapterCheckpointError(
            "it is a model.freeze run's checkpoint (its trainable part, not the frozen base) and this run uses "
            f"model.lora: train the adapter on it as a new stage (train.init_from {ckpt}, without --resume or --anneal: "
            "its whole model becomes that run's base)")
    now = getattr(model, "_cpt_base_fingerprint", None)
    if record["kind"] == "freeze" and record["fingerprint"] is not None:
        saved = saved_keys(ckpt, model)
        if saved != set(adapter_keys(model)):  # another model.freeze (or none): the base is what the checkpoint lacks
            if sharded(model):  # (FSDP2: not hashed here; refused as it loads, after the optimizer layout's check)
                return
            now = base_fingerprint(model, ours=saved)
    if now is None or record["fingerprint"] is None:  # weights not all here (ZeRO-3 placeholders): nothing to compare
        return
    if now != record["fingerprint"] and not (record["kind"] == "lora" and _same_base_in_16_bits(model, record["fingerprint"])):
        built = getattr(model.get_base_model() if is_peft_model(model) else model, "name_or_path", "") or "model.arch"
        what = ("its LoRA adapter was trained on" if record["kind"] == "lora"
                else "its trainable part (model.freeze) was trained over")
        if "base_from" in record:  # RUN/base, written from a full model's checkpoint when the run started: gone or changed
            raise AdapterCheckpointError(
                f"{what} the full model of checkpoint {record['base_from']['checkpoint']}, written as its run's base "
                f"({record['base']}, fingerprint {record['fingerprint'][:12]}) when that run started; this run builds "
                f"{built} (fingerprint {now[:12]}): that base/ folder is missing or changed; put it back (a copy of the "
                f"run's base/), or write it again from that checkpoint while it exists (`cpt export "
                f"{record['base_from']['checkpoint']} --out RUN/base --dtype fp32`, or --resume with it in place)")
        raise AdapterCheckpointError(
            f"{what} another base model than this run builds (then: {record['base']}, "
            f"fingerprint {record['fingerprint'][:12]}; now: {built}, fingerprint {now[:12]}); the checkpoint holds the "
            f"{'adapter' if record['kind'] == 'lora' else 'trained part'}, not its base: build the base it was trained "
            "on (model.name_or_path and model.revision: a hub model "
            "updated since needs the revision pinned; train.init_from, model.vocab, run.seed and "
            "model.lora.quantize_base/double_quant/quant_compute_dtype as in its config.yaml)" + mismatch_hint(model))


def _same_base_in_16_bits(model, fingerprint: str) -> bool:
    """Whether ``fingerprint`` is this (fp32-built) base's in bf16 or fp16: a run under DeepSpeed ZeRO-3 with
    train.precision bf16/fp16 builds its base in that dtype (zero.Init) and fingerprints it so; its checkpoints were
    refused by `cpt export`, by a resume on another backend and by train.init_from, which build the base in fp32."""
    base = model.get_base_model()
    if any(getattr(p, "ds_numel", 0) for p in base.parameters()) or next(base.parameters()).dtype != torch.float32:
        return False  # (only a full fp32 base is recast here)
    return any(base_fingerprint(model, as_dtype=d) == fingerprint for d in (torch.bfloat16, torch.float16))


def base_problem(ckpt: str | Path, model) -> str | None:
    """:func:`check_fits`'s refusal in words, or None."""
    try:
        check_fits(ckpt, model)
    except AdapterCheckpointError as e:
        return str(e)
    return None


def read_adapter_state(ckpt: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(ckpt) / ADAPTER_STATE))


def sharded(model) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def refuse_other_keys_sharded(model, saved: set[str], ckpt) -> None:
    """Under FSDP2 (its frozen part sharded: not hashed again) a model.freeze checkpoint loads only into a model that
    trains the same tensors (``saved``: the checkpoint's, aliases included)."""
    if not is_peft_model(model) and sharded(model) and saved != set(adapter_keys(model)):
        raise AdapterCheckpointError(
            "it is a model.freeze run's checkpoint (its trainable part, not the frozen base) and under FSDP2 it loads "
            f"only into a run that trains the same parameters: keep model.freeze, or `cpt export {ckpt} --out DIR` and "
            "start from DIR (train.init_from)")


def check_keys(model, state: dict, ckpt="CKPT") -> None:
    """AdapterCheckpointError unless ``state`` holds exactly ``model``'s adapter tensors (the same LoRA settings); for a
    model without LoRA (a ``model.freeze`` checkpoint's trainable part), tensors of the model, whatever it freezes."""
    refuse_other_keys_sharded(model, _with_aliases(model, state), ckpt)
    expected = set(adapter_keys(model)) if is_peft_model(model) else set(model.state_dict(keep_vars=True))
    missing = sorted(expected - set(state)) if is_peft_model(model) else []
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = [f"{len(v)} {what}, e.g. {v[0]}" for what, v in (("missing", missing), ("unexpected", unexpected)) if v]
        fields = ("model.lora (target_modules, modules_to_save, train_norms)" if is_peft_model(model)
                  else "the model (model.name_or_path or model.arch, model.config_overrides)")
        raise AdapterCheckpointError(f"its adapter state does not fit this run's {'LoRA ' if is_peft_model(model) else ''}"
                                     f"model ({'; '.join(parts)}): {fields} and model.vocab must be those it was trained with")


def load_adapter_state(model, ckpt: str | Path) -> None:
    """Load the adapter state of ``ckpt`` into ``model`` (unwrapped; its base stays as built). ``check_fits`` first."""
    state = read_adapter_state(ckpt)
    check_keys(model, state, ckpt)
    model.load_state_dict(state, strict=False)  # (torch still refuses tensors of another shape)


def note_loaded_base(model, ckpt: Path, adapter: bool, hash_here: bool = True) -> None:
    """After a checkpoint loaded into ``model`` (unwrapped; collective). A peft model given a whole-model checkpoint has
    its base from it: its fingerprint is taken again (one process, DDP: ``hash_here``). A ``model.freeze`` model keeps
    checkpoints without its frozen part only while that part is still the base as built (hashed again: a stage from a
    whole-model checkpoint, or from one that froze less, changed it; FSDP2, where its weights are sharded: only a
    checkpoint of its own trainable tensors keeps it); otherwise it writes whole-model ones."""
    if is_peft_model(model):
        if not adapter and hash_here:
            note_base(model)
        return
    if not hasattr(model, "_cpt_base_fingerprint") or (adapter and saved_keys(ckpt, model) == set(adapter_keys(model))):
        return  # (its own trained part loaded over the base as built, checked: nothing else changed)
    built = model._cpt_base_fingerprint
    if not hash_here or note_base(model) != built:
        del model._cpt_base_fingerprint
        log.warning("model.freeze: the frozen weights were loaded from %s, not built from the base: this run's "
                    "checkpoints hold the whole model (those of a run whose frozen part is the base as built hold the "
                    "trained part alone)", ckpt)


@contextlib.contextmanager
def models_from_adapter_state(acc, ckpt: str | Path):
    """Within: ``accelerator.load_state(ckpt)`` loads the models from the adapter state (accelerate's load pre-hook,
    which takes them off its own list) and everything else (optimizer, scaler, RNG) itself."""

    def hook(models: list, input_dir: str) -> None:
        for m in models:
            load_adapter_state(acc.unwrap_model(m, keep_torch_compile=False), ckpt)
        models.clear()

    handle = acc.register_load_state_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
