"""Writing a Hugging Face export: the folder, its weight files' format and its tokenizer.

Every export (the run's ``export/`` and ``exports/step_N``, ``cpt export``, ``cpt merge``, ``cpt interpolate
--save-alpha``) goes through :func:`write_hf` (a training run's model, on every rank: :func:`export_hf`):

* the folder: written to a hidden staging folder and renamed into place when complete, replacing an earlier
  export whole (:func:`staging_dir`, :func:`publish_dir`; ``cpt average`` writes its folder with them too); an
  ``--out`` that is a file or holds something other than an export is refused, not deleted
  (:func:`check_export_target`);
* dtype (``checkpoint.export_dtype``, the commands' ``--dtype``): fp32 writes the trained master weights exactly;
  bf16/fp16 cast every floating-point tensor once, at write time, and config.json's ``dtype`` says what the tensors
  are, so ``from_pretrained(dtype="auto")`` and serving stacks that read it get the tensors' own dtype;
* shards (``checkpoint.max_shard_size``, ``--max-shard-size``): transformers 5's ``save_pretrained`` writes files of
  up to 50 GB by default (4.x: 5 GB): an 8B model in fp32 was one 32 GB file. cpt passes ``max_shard_size`` (default
  5GB, what published checkpoints use: parallel, resumable downloads), and a larger model becomes
  ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``, which ``from_pretrained``, vLLM, TGI and
  the hub read;
* the tokenizer: its tokenizer_config.json loadable by every supported transformers (:func:`make_tokenizer_portable`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from cpt.config.outputs import shard_size_bytes
from cpt.fileio import fault_point, fsync_dir, readable_as_umask_allows

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
DEFAULT_MAX_SHARD_SIZE = "5GB"


def export_hf(model, tokenizer, out_dir: str | os.PathLike, accelerator, options=None, masters: bool = True) -> Path:
    """Write a Hugging Face checkpoint (safetensors + tokenizer) any transformers/peft user can load; ``options``:
    the run's ``checkpoint`` section (its ``export_dtype`` and ``max_shard_size``); ``masters``: the fp32 master
    weights under DeepSpeed bf16/fp16 (False: the module's own values, e.g. an EMA swapped in).

    Works from DDP, FSDP and DeepSpeed ZeRO-3 states: `accelerator.get_state_dict` gathers the full
    state on the main process (every rank must call this function); a whole-model torch.compile is looked through.
    """
    from cpt.compiling import without_compile_prefix

    # (model.compile: true's wrapper keys the state `_orig_mod.<name>`: the export had keys transformers does not
    # know, and loaded as a freshly initialised model with a MISSING-weights report)
    state_dict = accelerator.get_state_dict(model)  # (None on ranks that do not gather, under some backends)
    state_dict = without_compile_prefix(state_dict) if state_dict is not None else None
    state_dict = with_master_weights(accelerator, model, state_dict) if masters else state_dict
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    if accelerator.is_main_process:
        if said := dtype_note(unwrapped, export_options(options).get("dtype")):
            import logging

            logging.getLogger("cpt.export").warning(said)
        write_hf(unwrapped, tokenizer, out_dir, state_dict, **export_options(options))
    accelerator.wait_for_everyone()
    return Path(out_dir)


def export_options(checkpoint_cfg) -> dict:
    """``write_hf``'s dtype and max_shard_size from a run's ``checkpoint`` section (None: the defaults)."""
    if checkpoint_cfg is None:
        return {}
    return {"dtype": checkpoint_cfg.export_dtype, "max_shard_size": checkpoint_cfg.max_shard_size}


MODEL_DIR_MARKERS = ("config.json", "adapter_config.json")


class ExportFolderError(ValueError):
    """An export's --out that is a file, or a folder holding something other than an earlier export."""


def check_export_target(out_dir: str | os.PathLike, inputs=(), inputs_are: str = "one of the command's inputs") -> Path:
    """The export folder, absolute. An export replaces its folder whole (never mixes with an older export's
    files), so an existing folder must be empty or hold an earlier model or adapter (``config.json`` or
    ``adapter_config.json``); any other folder, or a file, is refused instead of deleted, and so is any of the
    command's ``inputs`` that is a folder (said as ``inputs_are``: it would be replaced by its own output)."""
    out = Path(out_dir).expanduser().absolute()
    if out.resolve() in {Path(p).resolve() for p in inputs if p and Path(p).is_dir()}:
        raise ExportFolderError(f"--out {out_dir} is {inputs_are}; give another folder")
    if out.exists() and not out.is_dir():
        raise ExportFolderError(f"--out {out_dir}: a file, not a folder")
    blocker = next((a for a in out.parents if a.exists() and not a.is_dir()), None)
    if blocker is not None:  # (was mkdir's traceback, or "[Errno 17] File exists")
        raise ExportFolderError(f"--out {out_dir}: {blocker} is a file, not a folder")
    inside = next((a for a in out.parents if (a / "trainer_state.json").is_file()), None)  # (cpt.checkpoint.TRAINER_STATE)
    if inside is not None:  # (was written there: the checkpoint's pruning by checkpoint.keep then deleted the export)
        raise ExportFolderError(f"--out {out_dir} lies inside the checkpoint {inside}, which its run prunes or replaces; "
                                "give a folder outside it")
    if out.is_dir() and any(out.iterdir()) and not any((out / m).is_file() for m in MODEL_DIR_MARKERS):
        raise ExportFolderError(f"--out {out_dir}: the folder holds files that are not a model export, which the export "
                               "would replace; give a new or empty folder (or an earlier export's, replaced whole)")
    return out


def write_hf(model, tokenizer, out_dir: str | os.PathLike, state_dict: dict | None = None, *,
             dtype: str | torch.dtype | None = None, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write an (unwrapped) model as an HF directory, or a peft adapter for a LoRA model, with its tokenizer
    (one process). Written to a hidden temporary folder and renamed into place when complete, so an interrupted
    export never leaves a directory ``from_pretrained`` would half-load; secret-named config keys are redacted.
    ``dtype`` (``fp32``/``bf16``/``fp16``; None: as the model holds them) and ``max_shard_size``: the weight
    files (see the module's docstring; a peft adapter is written as peft writes it)."""
    out = Path(out_dir)
    tmp = staging_dir(out)
    if hasattr(model, "peft_config"):  # LoRA: the adapter in peft format (+ tokenizer, embedding size)
        save_adapter(model, tmp, tokenizer, state_dict=state_dict)
    else:
        dtype = export_dtype(dtype)
        if dtype is not None:
            state_dict = cast_state(model.state_dict() if state_dict is None else state_dict, dtype)
        state_dict = without_tied_copies(model, state_dict) if state_dict is not None else None
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True,
                              max_shard_size=shard_size_bytes(max_shard_size))
        fault_point(f"export:weights:{out.name}")
        if dtype is not None:
            set_config_dtype(tmp, dtype)
        if tokenizer is not None:  # (a model handed in without one: cpt.averaging.interpolate)
            tokenizer.save_pretrained(tmp)
        from cpt.redaction import redact_json_file

        redact_json_file(tmp / "config.json")  # a secret-named model.arch key became a config attribute
    make_tokenizer_portable(tmp, tokenizer)
    fault_point(f"export:written:{out.name}")
    return publish_dir(tmp, out)


def staging_dir(out: Path) -> Path:
    """The hidden sibling folder an export of ``out`` is written to (what an interrupted one left removed)."""
    tmp, old = out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.name}.old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    return tmp


def publish_dir(tmp: Path, out: Path) -> Path:
    """Rename a complete export from its staging folder into place, replacing an earlier one whole."""
    readable_as_umask_allows(tmp)
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)
    return out


# transformers 5 writes tokenizer_class "TokenizersBackend" for a tokenizer.json-backed tokenizer, a class that
# transformers 4.x (which pyproject still allows) does not have; PreTrainedTokenizerFast loads the same
# tokenizer.json in both
PORTABLE_TOKENIZER_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}
# how transformers 5 loaded the tokenizer cpt saved ("is_local": true, "local_files_only": true offline), not what it is
LOADING_KEYS = ("is_local", "local_files_only")


def make_tokenizer_portable(model_dir: str | os.PathLike, tokenizer=None) -> None:
    """Rewrite a saved tokenizer_config.json's tokenizer_class to one every supported transformers loads, without
    the :data:`LOADING_KEYS` transformers 5 records from the load (they told a hub user the tokenizer was local),
    and without the pad token cpt gave a ``tokenizer`` that had none (``cpt.model.load_tokenizer``: pad = eos, which
    the export of a Llama-3-like base carried, so a collator masking pad labels masked every eos downstream)."""
    path = Path(model_dir) / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    cls = config.get("tokenizer_class")
    changed = {k: config.pop(k) for k in LOADING_KEYS if k in config}
    if getattr(tokenizer, "cpt_pad_from_eos", False):
        changed["pad_token"] = config.pop("pad_token", None)
        _drop_pad_from_special_tokens_map(Path(model_dir))
    if cls in PORTABLE_TOKENIZER_CLASS and (Path(model_dir) / "tokenizer.json").is_file():
        config["tokenizer_class"] = changed["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS[cls]
    if changed:
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _drop_pad_from_special_tokens_map(model_dir: Path) -> None:
    """special_tokens_map.json (written by transformers 4.x) without its pad_token."""
    path = model_dir / "special_tokens_map.json"
    if path.is_file():
        tokens = json.loads(path.read_text())
        if tokens.pop("pad_token", None) is not None:
            path.write_text(json.dumps(tokens, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- the weight files: dtype, master weights, tied names


def export_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``fp32``/``bf16``/``fp16`` (or a torch dtype, or None: as the model holds them) as a torch dtype."""
    if name is None or isinstance(name, torch.dtype):
        return name
    return DTYPES[name]


_SAID: set = set()


def dtype_note(model, dtype: str | torch.dtype | None) -> str | None:
    """A line to say (once per process) when an export's float32 weights are twice the size of the 16-bit weights the
    model was loaded from (``cpt_saved_dtype``, set by cpt.model.build_model): a bf16 base came back as fp32 without a
    word in the run's log; the default is deliberate (the trained weights exactly) and ``export_dtype`` changes it."""
    saved = getattr(model, "cpt_saved_dtype", None)
    dtype = export_dtype(dtype)
    written = dtype if dtype is not None else getattr(model, "dtype", None)
    if written != torch.float32 or saved not in (torch.bfloat16, torch.float16) or saved in _SAID:
        return None
    _SAID.add(saved)
    return (f"HF exports hold float32 weights (checkpoint.export_dtype: fp32, the trained weights exactly), twice the "
            f"size of the {dtype_name(saved)} base model; checkpoint.export_dtype: {DTYPE_NAMES[saved]} (cpt export "
            f"--dtype {DTYPE_NAMES[saved]}) writes {dtype_name(saved)}")


def cast_state(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Every floating-point tensor of ``state`` in ``dtype`` (a tensor already in it is not copied)."""
    if dtype is None:
        return state
    cast: dict = {}  # tensors that share storage (tied embeddings) stay one tensor: save_pretrained writes it once
    return {k: cast.setdefault((v.data_ptr(), v.shape, v.stride()), v.to(dtype))
            if torch.is_tensor(v) and v.is_floating_point() else v for k, v in state.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def set_config_dtype(model_dir: str | os.PathLike, dtype: torch.dtype) -> None:
    """Make a written config.json's dtype (transformers 5: ``dtype``; 4.x: ``torch_dtype``) name ``dtype``:
    save_pretrained records the model's parameter dtype, not that of the state it was given."""
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
    for k in keys:
        config[k] = dtype_name(dtype)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def with_master_weights(acc, model, state: dict | None) -> dict | None:
    """``state`` (``accelerator.get_state_dict``'s, on the main process) with every trainable parameter's fp32
    master weights, under DeepSpeed with bf16/fp16 (ZeRO-1/2/3): accelerate gathers the engine's 16-bit copies, and
    the run's exports held the fp32 masters rounded to bf16 (stored as float32, e.g. a norm weight off by 4e-3
    from what `cpt export` of the same step's checkpoint writes). DeepSpeed's ``safe_get_full_fp32_param`` is
    collective: every rank calls this, one parameter at a time (no rank holds more than one full master at once
    beyond the main process's ``state``). Frozen parameters have no master and stay as gathered."""
    from cpt.distributed import Backend, backend

    if backend(acc) is not Backend.DEEPSPEED or acc.mixed_precision == "no":
        return state
    from deepspeed.utils import safe_get_full_fp32_param

    names: dict[int, list[str]] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for name, p in acc.unwrap_model(model, keep_torch_compile=False).named_parameters(remove_duplicate=False):
        if p.requires_grad:
            names.setdefault(id(p), []).append(name)
            params[id(p)] = p
    for key, p in params.items():
        full = safe_get_full_fp32_param(p)
        if state and full is not None:  # (one tensor for all the names of a tied parameter: written once)
            full = full.detach().to("cpu", copy=True)
            for name in names[key]:
                if name in state:
                    state[name] = full.reshape(state[name].shape)
    return state


def without_tied_copies(model, state_dict: dict) -> dict:
    """``state_dict`` without the second name of a tied parameter (a tied head's ``lm_head.weight``), as
    ``save_pretrained`` writes the model's own state dict, whose tied names share one storage. A gathered state (ZeRO-1/2's
    cloned tensors) shares none, so a ZeRO-2 export held the tied head twice: other tensors than a 1-process export's,
    which `cpt average` refused to average with it."""
    first, tied = {}, set()
    for name, param in model.named_parameters(remove_duplicate=False):
        (tied.add(name) if id(param) in first else first.setdefault(id(param), name))
    return {k: v for k, v in state_dict.items() if k not in tied}


# ------------------------------------------------------------------------------------------ LoRA adapters


def save_adapter(model, out_dir: str | Path, tokenizer=None, state_dict: dict | None = None) -> Path:
    """Save a LoRA run's adapter in peft format (``adapter_model.safetensors`` + ``adapter_config.json``),
    the tokenizer, and ``cpt_adapter.json`` (embedding size, so that ``cpt merge`` can resize the base; the
    config overrides and the base), and the frozen new rows (:func:`frozen_new_rows`).

    ``state_dict``: pass the full (gathered) state dict under FSDP / ZeRO-3, e.g.
    ``accelerator.get_state_dict(model)``; call on the main process only.
    """
    from cpt.adapter_init import as_plain_lora
    from cpt.adapters import ADAPTER_SIDECAR

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # never let peft guess by looking the base model up on the hub (network); embeddings resized by a
    # vocabulary extension are saved through trainable_token_indices / modules_to_save instead
    pcfg = model.peft_config[model.active_adapter]
    pcfg.base_model_name_or_path = portable_base_path(pcfg.base_model_name_or_path)
    model.save_pretrained(out, safe_serialization=True, save_embedding_layers=False, state_dict=state_dict)
    _card_base_paths(out / "README.md")
    as_plain_lora(model, out)  # PiSSA/OLoRA: a plain LoRA of the original base (cpt/adapter_init.py)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    base = model.get_base_model()
    sidecar = {
        "num_embeddings": embedding_rows(base.get_input_embeddings()),
        "new_rows": list(getattr(model, "_cpt_new_rows", [])),
        "base_model_name_or_path": model.peft_config[model.active_adapter].base_model_name_or_path,
        # model.config_overrides as the base's config took them: a base loaded without them (a long-context run's
        # RoPE and context) gave other losses, silently; cpt merge / cpt eval apply them (cpt.model.load_adapter_model)
        "config_overrides": dict(getattr(base, "cpt_config_overrides", None) or {}),
    }
    (out / ADAPTER_SIDECAR).write_text(json.dumps(sidecar, indent=2))
    rows = frozen_new_rows(model, sidecar["new_rows"], state_dict)
    if rows:
        from safetensors.torch import save_file

        save_file(rows, str(out / NEW_ROWS_FILE))
    return out


NEW_ROWS_FILE = "cpt_new_rows.safetensors"


def embedding_rows(embedding) -> int:
    """The rows of an embedding (peft-wrapped or not) however it is held: ZeRO-3 leaves a ``[0]``-shaped placeholder
    with the full shape in ``ds_shape`` (an in-run adapter export recorded 0 rows, and `cpt merge` resized the base
    to 0); an FSDP2 DTensor's shape is the global one."""
    module = getattr(embedding, "original_module", embedding)
    w = getattr(module, "base_layer", module).weight
    return int(getattr(w, "ds_shape", w.shape)[0])


def frozen_new_rows(model, ids: list[int], state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """The vocabulary extension's new rows (``ids``) of a peft ``model``'s frozen base embedding and output head, as
    the run initialised them (mean of subtokens): the adapter holds the rows it trains, but not these, which a model
    keeps where they stay frozen (a tied head under ``modules_to_save: [embed_tokens]``: ``cpt merge`` left them at
    the resize's random values, and the merged model's losses differed). Read from ``state_dict`` (the gathered full
    state under FSDP / ZeRO-3, whose modules hold shards or placeholders) where it holds the weight, else from the
    module's whole weight (one process, DDP); ``{}`` without new rows."""
    out: dict[str, torch.Tensor] = {}
    if not ids:
        return out
    names = {id(m): n for n, m in model.named_modules()}
    base = model.get_base_model()
    for key, module in (("input", base.get_input_embeddings()), ("output", base.get_output_embeddings())):
        module = getattr(module, "original_module", module)  # peft's modules_to_save wrapper: the frozen original
        module = getattr(module, "base_layer", module)  # a LoRA or trainable-tokens wrapper: its base layer
        w = getattr(module, "weight", None)
        if w is None:
            continue
        weight = (state_dict or {}).get(f"{names[id(module)]}.weight") if id(module) in names else None
        if weight is None and type(w.data) is torch.Tensor and not hasattr(w, "ds_id"):  # (a whole weight)
            weight = w.detach()
        if weight is not None and weight.shape[0] > max(ids):
            out[key] = weight[ids].to("cpu", copy=True).contiguous()
    return out


def _card_base_paths(card: Path) -> None:
    """peft's generated model card names the base as the run's model was loaded (``base_model: demo/base``, and the
    tag ``base_model:adapter:demo/base``): a local base there as its absolute path too, as in adapter_config.json."""
    if not card.is_file():
        return
    head, sep, rest = card.read_text().partition("\n---\n")  # (the YAML front matter, after the opening ---)
    fixed = re.sub(r"^(base_model: |- base_model:adapter:)(.+)$",
                   lambda m: m.group(1) + (portable_base_path(m.group(2).strip()) or m.group(2)), head, flags=re.M)
    if sep and fixed != head:
        card.write_text(fixed + sep + rest)


def portable_base_path(base: str | None) -> str | None:
    """A local base model directory as an absolute path (a relative one only works from the launch directory);
    hub ids unchanged."""
    if base and Path(base).is_dir():
        return str(Path(base).resolve())
    return base
