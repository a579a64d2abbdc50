"""LoRA (peft) resume checkpoints without the frozen base model.

On one process and under DDP (where cpt writes the checkpoint files itself: cpt/checkpoint_files.py) a peft model's
checkpoint holds ``adapter_state.safetensors`` instead of accelerate's whole-model ``model.safetensors``: the tensors
of :func:`cpt.adapters.adapter_keys` (the trainable parameters: LoRA A/B, the ``modules_to_save`` copies, the new
vocabulary rows of ``trainable_token_indices``; and adapter weights ``model.freeze`` froze), keyed as the unwrapped
model's ``state_dict``. The optimizer, scaler, RNG and cpt's own files are unchanged. Under FSDP2 and DeepSpeed
ZeRO-2/3 the checkpoint keeps its backend's sharded layout, with the adapter's shards alone
(cpt/adapter_shards.py). Either way ``adapter_base.json`` records the base the adapter was trained on: its name and
:func:`cpt.adapters.base_fingerprint` (SHA-256 of the frozen base as built: weights, vocabulary changes included).

Whoever reads the checkpoint rebuilds the base as the run did (``model.name_or_path`` or an HF ``train.init_from``,
``model.vocab``, ``run.seed`` for a base built from ``model.arch``) and loads the adapter state on top: a resume, a new
stage or anneal branch from it (cpt/checkpoint.py), another backend or world size (cpt/consolidate.py) and
``cpt export`` / ``eval`` / ``interpolate`` / ``average``. A base that differs from the recorded one is refused in one
line (:class:`AdapterCheckpointError`) before anything is loaded.

A checkpoint's layout is told by its files (:func:`is_adapter_layout`), so whole-model checkpoints of any run (earlier
cpt's FSDP2/DeepSpeed LoRA checkpoints among them) load as before.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from cpt.adapters import adapter_keys, base_fingerprint

ADAPTER_STATE = "adapter_state.safetensors"
ADAPTER_BASE = "adapter_base.json"


class AdapterCheckpointError(RuntimeError):
    """An adapter-layout checkpoint that does not fit the model built to read it (the callers add the checkpoint)."""


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def is_adapter_layout(ckpt: str | Path) -> bool:
    """Whether ``ckpt`` holds a LoRA adapter without its base (any backend's layout: ``adapter_base.json``)."""
    return (Path(ckpt) / ADAPTER_STATE).is_file() or (Path(ckpt) / ADAPTER_BASE).is_file()


def adapter_items(model) -> list[tuple[str, str, object]]:
    """A peft model's part of a checkpoint as ``(file name, kind, payload)`` items for
    :func:`cpt.checkpoint_files.write_files`: its adapter state (tensors still on the device) and base record."""
    keys = set(adapter_keys(model))
    state = {k: v.detach() for k, v in model.state_dict().items() if k in keys}
    fingerprint = getattr(model, "_cpt_base_fingerprint", None) or base_fingerprint(model)
    return [(ADAPTER_STATE, "safetensors", state), base_record_item(model, len(state), fingerprint)]


def base_record_item(model, adapter_tensors: int, fingerprint: str | None) -> tuple[str, str, str]:
    """``adapter_base.json`` as a ``(file name, kind, payload)`` item: the base's name and ``fingerprint``."""
    base = model.get_base_model()
    record = {"base": str(getattr(base, "name_or_path", "") or "model.arch"), "fingerprint": fingerprint,
              "adapter_tensors": adapter_tensors}
    return (ADAPTER_BASE, "text", json.dumps(record, indent=1))


def read_base_record(ckpt: str | Path) -> dict:
    """A checkpoint's ``adapter_base.json``: the base's name and fingerprint."""
    return json.loads((Path(ckpt) / ADAPTER_BASE).read_text())


def check_fits(ckpt: str | Path, model, record: dict | None = None) -> None:
    """AdapterCheckpointError unless ``model`` (unwrapped, as built: not yet loaded from anything) is a peft model on
    the base the adapter in ``ckpt`` was trained on (``record``: its :func:`read_base_record`, read when not given)."""
    if not is_peft_model(model):
        raise AdapterCheckpointError(
            "it is a LoRA run's checkpoint and this run has no model.lora (it holds the adapter, not its base): keep "
            f"model.lora, or merge the adapter (`cpt export {ckpt} --out DIR`) and start from DIR (train.init_from)")
    record = record if record is not None else read_base_record(ckpt)
    now = getattr(model, "_cpt_base_fingerprint", None)
    if now is None or record["fingerprint"] is None:  # weights not all here (ZeRO-3 placeholders): nothing to compare
        return
    if now != record["fingerprint"] and not _same_base_in_16_bits(model, record["fingerprint"]):
        built = getattr(model.get_base_model(), "name_or_path", "") or "model.arch"
        raise AdapterCheckpointError(
            f"its LoRA adapter was trained on another base model than this run builds (then: {record['base']}, "
            f"fingerprint {record['fingerprint'][:12]}; now: {built}, fingerprint {now[:12]}); the checkpoint holds the "
            "adapter, not its base: build the base it was trained on (model.name_or_path and model.revision: a hub model "
            "updated since needs the revision pinned; train.init_from, model.vocab and run.seed as in its config.yaml)")


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


def check_keys(model, state: dict) -> None:
    """AdapterCheckpointError unless ``state`` holds exactly ``model``'s adapter tensors (the same LoRA settings)."""
    expected = set(adapter_keys(model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        parts = [f"{len(v)} {what}, e.g. {v[0]}" for what, v in (("missing", missing), ("unexpected", unexpected)) if v]
        raise AdapterCheckpointError(
            f"its adapter state does not fit this run's LoRA model ({'; '.join(parts)}): model.lora (target_modules, "
            "modules_to_save, train_norms) and model.vocab must be those it was trained with")


def load_adapter_state(model, ckpt: str | Path) -> None:
    """Load the adapter state of ``ckpt`` into ``model`` (unwrapped; its base stays as built). ``check_fits`` first."""
    state = read_adapter_state(ckpt)
    check_keys(model, state)
    model.load_state_dict(state, strict=False)  # (torch still refuses tensors of another shape)


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
