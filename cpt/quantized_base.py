"""QLoRA: a LoRA run's frozen base loaded quantized by bitsandbytes (``model.lora.quantize_base``: nf4, fp4, int8).

The base is loaded through transformers' ``quantization_config`` (``BitsAndBytesConfig``: NF4/FP4 with double
quantization and a compute dtype, or LLM.int8()), on the process's own device (``device_map``: ``cuda:LOCAL_RANK``, or
the CPU, which bitsandbytes >= 0.48 supports). Every Linear layer but the output head becomes a bitsandbytes layer
(``Linear4bit``/``Linear8bitLt``) holding packed weights; embeddings, norms and the head stay fp32 (cpt loads in fp32:
what peft's ``prepare_model_for_kbit_training`` casts up is already there, checked by :func:`prepare_for_training`),
and peft's LoRA wraps the quantized layers.

Fingerprint. The adapter-only checkpoints (cpt/adapter_checkpoint.py) record the base as the SHA-256 of the
*original* weight files (every tensor's name, shape, dtype and bytes, as stored) and the quantization settings:
:func:`files_fingerprint`. bitsandbytes' quantization is a deterministic function of those, so a resume that loads
the same files with the same settings re-quantizes the base bit for bit (tested: a resumed QLoRA run gives the
uninterrupted run's losses bitwise); other files or settings are refused before anything is loaded.

Merging. cpt.adapters.merge_lora merges the adapter into the *original* full-precision base (:func:`on_original_base`:
loaded again, unquantized), not into the dequantized 4-bit weights: those differ from the original by the
quantization error (NF4: each weight rounded to one of 16 levels of its 64-weight block's scale), which a merge into
them would bake into every weight of the exported model.
The adapter was trained to correct the quantized base, so the merged model is close to, not equal to, the QLoRA
model (docs/adapters.md: the measured gap).

Where: one process, DDP and DeepSpeed ZeRO-1/2 (the quantized weights are frozen: outside DDP's gradient buckets and
outside what ZeRO-1/2 partitions, the trained adapter's gradients and optimizer state; each rank holds the whole
4-bit base). FSDP2 and ZeRO-3 shard the weights themselves and cannot shard bitsandbytes' packed parameters as cpt
launches them: refused at start (:func:`refuse_backend`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from pathlib import Path

import torch

from cpt.config.base import ConfigError

INSTALL = "pip install 'cpt[qlora]' (bitsandbytes>=0.48)"
MARK = "_cpt_quantized_from"  # on the loaded base: where it came from and how it was quantized (a dict)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def require_bitsandbytes() -> None:
    """One line saying what to install when bitsandbytes is missing."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"model.lora.quantize_base needs bitsandbytes, which is not installed: {INSTALL}") from None


def spec(lora) -> dict:
    """The quantization settings that decide the quantized weights (recorded with the fingerprint)."""
    out = {"quantize_base": lora.quantize_base}
    if lora.quantize_base in ("nf4", "fp4"):
        out.update(double_quant=lora.double_quant, compute_dtype=lora.quant_compute_dtype)
    return out


def bnb_config(lora):
    """transformers' ``BitsAndBytesConfig`` for ``model.lora``."""
    from transformers import BitsAndBytesConfig

    if lora.quantize_base == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=lora.quantize_base,
                              bnb_4bit_use_double_quant=lora.double_quant,
                              bnb_4bit_compute_dtype=DTYPES[lora.quant_compute_dtype])


def device() -> torch.device:
    """Where this process loads the quantized base: its GPU (``LOCAL_RANK``) or the CPU (also with accelerate's
    ``ACCELERATE_USE_CPU``, where the run trains on the CPU)."""
    if torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def load_kwargs(cfg, source: str | None, config) -> dict:
    """``from_pretrained`` arguments that load the base quantized (``cfg``: the ``model`` section), or {} when
    ``model.lora.quantize_base`` is not set. Records on ``config`` (copied) what :func:`note_loaded` puts on the model."""
    lora = cfg.lora
    if lora is None or lora.quantize_base is None:
        return {}
    if source is None:
        raise ConfigError("model.lora.quantize_base quantizes pretrained weights as they load: set model.name_or_path "
                          "(or train.init_from an HF export), not only model.arch")
    require_bitsandbytes()
    from transformers.integrations import deepspeed as hf_deepspeed

    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):  # (before FSDP's loading meets it)
        raise ConfigError(_refusal(lora.quantize_base, "FSDP"))
    if hf_deepspeed.is_deepspeed_zero3_enabled():  # (before ZeRO-3's zero.Init meets it; ZeRO-1/2 load as DDP)
        raise ConfigError(_refusal(lora.quantize_base, "DeepSpeed ZeRO-3"))
    return {"quantization_config": bnb_config(lora), "device_map": {"": device()}}


def note_loaded(model, cfg, source: str, revision: str | None, config) -> None:
    """Record on a base loaded by :func:`load_kwargs` where it came from (for the fingerprint and the merge), and
    check that everything not quantized is fp32 (:func:`prepare_for_training`)."""
    plain = copy.deepcopy(config)
    if hasattr(plain, "quantization_config"):
        del plain.quantization_config
    setattr(model, MARK, {"source": str(source), "revision": revision, "spec": spec(cfg.lora), "config": plain,
                          "attn_implementation": getattr(model.config, "_attn_implementation", None)})
    prepare_for_training(model)
    if cfg.lora.quantize_base == "int8":  # (said once by describe(), not at every matmul)
        import logging

        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    for m in model.modules():  # bitsandbytes' CPU inference path repacks a Linear4bit's weights in place (once, in
        if hasattr(m, "support_avx512bf16_for_cpu"):  # eval mode, with AVX512-BF16): it fails for small layers and
            m.support_avx512bf16_for_cpu = False  # changes the quantized state; training and evaluation share one path


def numel(p: torch.Tensor) -> int:
    """A parameter's number of weights: a 4-bit one's before packing (two to a byte); DeepSpeed ZeRO-3's
    placeholders' real size (``ds_numel``)."""
    state = getattr(p, "quant_state", None)
    if state is not None and type(p).__name__ == "Params4bit":
        return int(torch.Size(state.shape).numel())
    return int(getattr(p, "ds_numel", p.numel()))


def is_quantized(model) -> bool:
    return getattr(model, MARK, None) is not None


def _quantized(p) -> bool:
    return type(p).__name__ in ("Params4bit", "Int8Params")


def prepare_for_training(model) -> None:
    """What peft's ``prepare_model_for_kbit_training`` does, done for cpt: every parameter frozen (peft's LoRA freezes
    the base anyway), every floating-point parameter that is not quantized kept in fp32 (norms, embeddings, the head:
    bitsandbytes layers cast their input to the compute dtype themselves). Its other step, hooking the input
    embeddings so that the reentrant activation checkpoint sees a tensor that requires grad, is not needed: cpt's
    activation checkpointing is non-reentrant (cpt/layer_options.py)."""
    for p in model.parameters():
        p.requires_grad_(False)
        if not _quantized(p) and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.to(torch.float32)


def quantized_bytes(model) -> tuple[int, int]:
    """(bytes of the quantized weights with their quantization constants, their size in fp32). Each weight once: peft's
    LoRA layer shows its base layer's ``weight`` too (it was counted twice: the start line said 2x the memory)."""
    held = full = 0
    seen: set[int] = set()
    for m in model.modules():
        w = getattr(m, "weight", None)
        if w is None or not _quantized(w) or id(w) in seen:
            continue
        seen.add(id(w))
        held += w.numel() * w.element_size()
        state = getattr(w, "quant_state", None)
        if state is not None:  # 4-bit: the shape before packing, absmax (double-quantized: its own constants)
            full += int(torch.Size(state.shape).numel()) * 4
            for t in (state.absmax, getattr(getattr(state, "state2", None), "absmax", None), state.code):
                held += t.numel() * t.element_size() if t is not None else 0
        else:
            full += w.numel() * 4
            scb = getattr(w, "SCB", None)
            held += scb.numel() * scb.element_size() if scb is not None else 0
    return held, full


def describe(model) -> str:
    held, full = quantized_bytes(model)
    info = getattr(model, MARK)["spec"]
    how = ", ".join(f"{k} {v}" for k, v in info.items() if k != "quantize_base")
    int8 = "; bitsandbytes casts their matmuls' inputs to fp16" if info["quantize_base"] == "int8" else ""
    return (f"model.lora.quantize_base: the frozen base's Linear weights loaded as {info['quantize_base']}"
            f"{f' ({how})' if how else ''}: {held / 2**20:.1f} MiB instead of {full / 2**20:.1f} MiB in fp32{int8}")


# ---------------------------------------------------------------- the fingerprint of the original base files


def weight_files(source: str, revision: str | None) -> list[Path]:
    """The base's safetensors files: a local directory's, or a hub model's from the local cache (loaded already)."""
    p = Path(source)
    if not p.is_dir():
        from huggingface_hub import snapshot_download

        p = Path(snapshot_download(source, revision=revision, allow_patterns=["*.safetensors"]))
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"model.lora.quantize_base: {source} has no *.safetensors weights to fingerprint")
    return files


def files_fingerprint(model, hash_here: bool = True, **_) -> str | None:
    """SHA-256 over every tensor of the base's original weight files (name, shape, dtype as stored, SHA-256 of its
    bytes; sorted by name) and the quantization settings; None where ``hash_here`` is False (the main process hashes,
    cpt.adapters.note_base hands it out). One pass over the files, tensors hashed in parallel."""
    if not hash_here:
        return None
    from concurrent.futures import ThreadPoolExecutor

    from safetensors import safe_open

    info = getattr(model, MARK)
    h = hashlib.sha256(("qlora|" + json.dumps(info["spec"], sort_keys=True) + "|").encode())
    entries = []
    for f in weight_files(info["source"], info["revision"]):
        with safe_open(str(f), framework="pt") as st:
            entries += [(k, f) for k in st.keys()]

    def digest(entry) -> str:
        key, f = entry
        with safe_open(str(f), framework="pt") as st:
            t = st.get_tensor(key)
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().data
        return f"{key}|{list(t.shape)}|{t.dtype}|{hashlib.sha256(raw).hexdigest()}"

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        for line in pool.map(digest, sorted(entries)):
            h.update(line.encode())
    return h.hexdigest()


# ---------------------------------------------------------------- strategies, merge


def refuse_backend(model, acc) -> None:
    """A quantized base under FSDP2 or DeepSpeed ZeRO-3: one line before anything is written."""
    from cpt.distributed import Backend, backend, shards_weights

    if is_quantized(model) and shards_weights(acc):
        launch = "FSDP" if backend(acc) is Backend.FSDP else "DeepSpeed ZeRO-3"
        raise ConfigError(_refusal(getattr(model, MARK)["spec"]["quantize_base"], launch))


def _refusal(kind: str, launch: str) -> str:
    return (f"model.lora.quantize_base ({kind}) runs on one process, under DDP or DeepSpeed ZeRO-1/2; this launch "
            f"uses {launch}, which cannot shard bitsandbytes' packed weights as cpt launches it: launch with DDP or "
            "ZeRO-2 (each GPU holds the whole 4-bit base), or set model.lora.quantize_base: null")


def on_original_base(peft_model, adapter_keys):
    """The adapter of a QLoRA model on its *original* full-precision base (the module docstring: the merge is into
    that): the base loaded again from its files unquantized (fp32), the same LoRA layers put on it and the adapter's
    tensors (``adapter_keys(model)``: their names) copied over. Returns that peft model, to be merged."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    info = getattr(peft_model, MARK)
    quantized = peft_model.get_base_model()
    kwargs = {"attn_implementation": info["attn_implementation"]} if info["attn_implementation"] else {}
    base = AutoModelForCausalLM.from_pretrained(info["source"], config=copy.deepcopy(info["config"]),
                                                revision=info["revision"], dtype=torch.float32, use_safetensors=True,
                                                **kwargs)
    pcfg = copy.deepcopy(peft_model.peft_config[peft_model.active_adapter])
    with warnings.catch_warnings():  # (peft's, as cpt.adapters.apply_lora filters them: cpt handles tied embeddings)
        warnings.filterwarnings("ignore", message="Model has `tie_word_embeddings=True` and a tied layer is part of")
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        fresh = get_peft_model(base, pcfg, adapter_name=peft_model.active_adapter)
    if not getattr(quantized.config, "tie_word_embeddings", True):  # (a tied side trained as its own copy: untied)
        base.config.tie_word_embeddings = False
    keys = set(adapter_keys(peft_model))
    state = {k: v.detach().to("cpu", torch.float32) for k, v in peft_model.state_dict().items() if k in keys}
    missing = sorted(set(adapter_keys(fresh)) - set(state))
    if missing:
        raise RuntimeError(f"the QLoRA adapter does not fit its unquantized base ({len(missing)} tensors missing, "
                           f"e.g. {missing[0]})")
    fresh.load_state_dict(state, strict=False)
    return fresh
