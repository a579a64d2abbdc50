"""The ``model`` section: where the model and tokenizer come from, kernels, and the sections of what is applied to
the model: vocabulary extension (cpt/vocab.py), LoRA and layer freezing (cpt/adapters.py)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cpt.config.base import PathText, Strict


class VocabConfig(Strict):
    # a text file with one new token per line, or learn `learn_tokens` new tokens from `learn_from`
    add_tokens_file: PathText | None = None
    # what `cpt prepare` reads (jsonl/.gz/.zst, parquet, text; field `text_field`): a file, a folder or a glob
    learn_from: PathText | None = None
    learn_tokens: int = Field(0, ge=0)
    learn_max_chars: int = Field(20_000_000, gt=0)  # read at most this much of `learn_from`
    text_field: str = "text"
    init: Literal["mean_of_subtokens", "mean"] = "mean_of_subtokens"
    # pad the embedding matrix to a multiple of this (tensor-core friendly shapes); None: exact size
    pad_to_multiple_of: int | None = Field(None, gt=0)
    # the new rows learn this many times faster (or slower) than the rest: see cpt.vocab.NewRowsLR
    new_rows_lr_multiplier: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _something_to_add(self) -> "VocabConfig":
        if self.add_tokens_file is None and self.learn_from is None:
            raise ValueError("set add_tokens_file and/or learn_from (with learn_tokens > 0)")
        if self.learn_from is not None and self.learn_tokens == 0:
            raise ValueError("learn_from is set but learn_tokens is 0")
        if self.learn_tokens > 0 and self.learn_from is None:
            raise ValueError("learn_tokens > 0 needs learn_from (the new corpus)")
        return self


# ---------------------------------------------------------------- LoRA and freezing (cpt/adapters.py)

NAMED_LAYER_SETS = ("bottom_half", "top_half", "every_other")


REGEX_CHARS = re.compile(r"[*+?()\[\]{}|^$\\]")  # in a target_modules entry: a regular expression, not a name


class LoraConfig(Strict):
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # "all-linear" (peft's shortcut: every Linear layer except the output head) or a list of module names
    target_modules: str | list[str] = "all-linear"
    # modules trained in full next to the adapter, e.g. [embed_tokens, lm_head]; saved inside the adapter
    modules_to_save: list[str] = Field(default_factory=list)
    # also train every normalisation layer in full (RMSNorm/LayerNorm; a few thousand parameters per layer)
    train_norms: bool = False
    # rank-stabilised LoRA scaling (alpha / sqrt(r) instead of alpha / r); helps at high rank (MoRA's concern)
    use_rslora: bool = False
    # with train.precision bf16/fp16: store the frozen base's Linear weights in that dtype (half their memory; the
    # training numerics are bitwise those of an fp32 base under autocast, which casts them anyway); one process and
    # DDP; false keeps them fp32 (cpt/base_dtype.py)
    base_in_compute_dtype: bool = True
    # ---- QLoRA (cpt/quantized_base.py): the frozen base loaded quantized by bitsandbytes (pip install 'cpt[qlora]')
    # nf4 / fp4: 4-bit (QLoRA: nf4); int8: LLM.int8(); null: not quantized
    quantize_base: Literal["nf4", "fp4", "int8"] | None = None
    double_quant: bool = True  # 4-bit: quantize the quantization constants too (QLoRA's double quantization)
    quant_compute_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"  # 4-bit: the dtype the base's matmuls run in
    # ---- variants (docs/adapters.md#dora-lora-and-initialisations)
    # DoRA (peft use_dora): each adapted weight as a trained magnitude per output row times the direction of
    # W + BA (docs/adapters.md: what works with which strategy; `cpt average` refuses DoRA adapters)
    use_dora: bool = False
    # LoRA+: the B factors (and 1-D trained vectors: DoRA magnitudes, norms, as peft's and LLaMA-Factory's LoRA+) learn
    # at this many times the schedule's LR; the A factors and full copies at the LR itself. The LoRA+ paper uses 16
    loraplus_lr_ratio: float | None = Field(None, gt=0)
    # peft's init_lora_weights: default (A Kaiming-uniform, B zero), gaussian (A ~ N(0, 1/r), B zero), or from the base
    # weights, which these rewrite (exports converted to a plain LoRA of the original base: cpt/adapter_init.py):
    # pissa (SVD), pissa_niter_N (randomised SVD, N iterations; fast on large models), olora (QR)
    init_lora_weights: str = "default"

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("target_modules must name at least one module (or be 'all-linear')")
        regexes = [t for t in ([v] if isinstance(v, str) else v) if t != "all-linear" and REGEX_CHARS.search(t)]
        if regexes:  # peft takes a string as a regex (re.fullmatch); cpt names modules, checked against the model
            raise ValueError(f"{regexes} look like regular expressions, which cpt does not accept here: give module "
                             "names, each matched as the last part(s) of a module's name (e.g. [q_proj, v_proj] or "
                             "[self_attn.q_proj]; every name must match a module), or 'all-linear'")
        return v

    @field_validator("init_lora_weights")
    @classmethod
    def _init(cls, v: str) -> str:
        if v not in ("default", "gaussian", "pissa", "olora") and not re.fullmatch(r"pissa_niter_\d+", v):
            raise ValueError(f"{v!r} is not one of default, gaussian, pissa, pissa_niter_N (N iterations), olora")
        return v

    @model_validator(mode="after")
    def _variants(self) -> "LoraConfig":
        if self.use_dora and self.init_lora_weights not in ("default", "gaussian"):
            raise ValueError(f"use_dora with init_lora_weights: {self.init_lora_weights} is not supported (the export's "
                             "conversion to a plain LoRA of the original base has no DoRA form): choose one")
        if self.quantize_base is not None and (self.use_dora or self.init_lora_weights not in ("default", "gaussian")):
            what = "use_dora" if self.use_dora else f"init_lora_weights: {self.init_lora_weights}"
            raise ValueError(f"{what} with quantize_base ({self.quantize_base}) is not supported: "
                             + ("DoRA's magnitudes would be trained against the quantized weights, not tested with "
                                "cpt's QLoRA" if self.use_dora else "it rewrites the base, and a quantized residual base "
                                "no longer adds up to the base the export is converted against")
                             + "; leave one out")
        return self


class FreezeConfig(Strict):
    # freeze decoder layers: "0-6" (indices 0..5, end exclusive), "0-4,10,12-14", "bottom_half",
    # "top_half", "every_other" (even indices); negative indices count from the top ("-4--1")
    layers: str | None = None
    # freeze parameters whose name matches any of these regexes (re.search), e.g. ["embed_tokens", "lm_head"]
    patterns: list[str] = Field(default_factory=list)
    # if set: freeze everything whose name matches none of these regexes (applied first)
    train_only: list[str] = Field(default_factory=list)

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: str | None) -> str | None:
        if v is not None and v not in NAMED_LAYER_SETS:
            parse_layer_ranges(v, None)  # syntax check only
        return v

    @field_validator("patterns", "train_only")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"{p!r} is not a valid regex: {e}") from None
        return v


def parse_layer_ranges(spec: str, n: int | None) -> list[int]:
    """'0-6' -> 0..5; '0-4,10' -> 0..3,10; negative numbers count from the end when n is known."""
    out: list[int] = []
    for part in (x.strip() for x in spec.split(",")):
        m = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part)
        if not m:
            raise ValueError(f"bad layer spec {part!r} in {spec!r}: use 'a-b' (end exclusive), an index, "
                             f"or one of {', '.join(NAMED_LAYER_SETS)}")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else None
        if n is not None:
            a = a + n if a < 0 else a
            if b is not None:
                b = b + n if b < 0 else b
        if b is None:
            b = a + 1
        if n is not None and not (0 <= a < b <= n):
            raise ValueError(f"layer spec {part!r} is out of range for a model with {n} layers")
        if n is None and b <= a and a >= 0 and b >= 0:
            raise ValueError(f"layer spec {part!r}: empty range (the end is exclusive)")
        out.extend(range(a, b))
    return sorted(set(out))


class ModelConfig(Strict):
    # A hub id, a local `save_pretrained` directory, or None to build from `arch` (random init).
    name_or_path: PathText | None = None
    # transformers config kwargs for a model built from scratch, e.g. {model_type: llama, hidden_size: 256, ...}
    arch: dict[str, Any] | None = None
    # Tokenizer: a hub id or local directory; defaults to name_or_path.
    tokenizer: PathText | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    # set on the model's config before the weights load, e.g. long-context CPT:
    # {max_position_embeddings: 32768, rope_parameters: {rope_type: default, rope_theta: 1000000}}
    config_overrides: dict[str, Any] = Field(default_factory=dict)
    # sdpa: eager for a model class without sdpa attention (Gemma 2), with a log line (cpt.model.attn_implementation)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = "sdpa"
    gradient_checkpointing: bool = False
    # with gradient_checkpointing: recompute only every N-th decoder layer (1: every layer); the others keep their
    # activations, so N > 1 spends memory left over on less recompute (torchtitan's per-layer selective checkpointing)
    gradient_checkpointing_every: int = Field(1, ge=1)
    # torch.compile: true = the whole model, regional = each decoder layer (compiled once, reused), false = eager
    compile: bool | Literal["regional"] = False
    # where torch.compile keeps its compiled code (inductor's cache; with model.compile): "run" = <run.output_dir>/
    # compile_cache, so that a resumed or requeued start (on any node that sees the run directory) loads it instead of
    # compiling again; a directory; null = torch's own (/tmp on each node). TORCHINDUCTOR_CACHE_DIR, when set, wins
    compile_cache: PathText | None = "run"
    liger_kernel: bool = False  # Liger's Triton kernels for the layers (RMSNorm, RoPE, SwiGLU) on CUDA when installed
    lora: LoraConfig | None = None
    freeze: FreezeConfig | None = None
    vocab: VocabConfig | None = None

    @model_validator(mode="after")
    def _source_given(self) -> "ModelConfig":
        if self.name_or_path is None and self.arch is None:
            raise ValueError("set model.name_or_path (pretrained model) or model.arch (build from scratch)")
        if self.name_or_path is None and self.tokenizer is None:
            raise ValueError("model.tokenizer is required when the model is built from model.arch")
        if self.gradient_checkpointing_every != 1 and not self.gradient_checkpointing:
            raise ValueError("model.gradient_checkpointing_every needs model.gradient_checkpointing: true")
        if self.lora is not None and self.lora.quantize_base is not None:
            refuse_with_quantized_base(self)
        return self


def refuse_with_quantized_base(cfg: ModelConfig) -> None:
    """``model.lora.quantize_base`` with options that cannot work on a bitsandbytes-quantized base (cpt/quantized_base.py):
    one line naming the fields."""
    clash = [name for name, on in (("model.freeze", cfg.freeze is not None), ("model.vocab", cfg.vocab is not None),
                                   ("model.compile", bool(cfg.compile))) if on]
    if clash:
        raise ValueError(f"model.lora.quantize_base ({cfg.lora.quantize_base}) cannot be combined with "
                         f"{', '.join(clash)}: the quantized base's layers are bitsandbytes modules that those do not "
                         "handle; leave them out, or set model.lora.quantize_base: null")
