"""Build or load the model and tokenizer, then apply the CPT options (vocab extension, freezing, LoRA, kernels);
the extended tokenizer of a run; load a LoRA adapter over its base, or merge it into one. Writing a model as an HF
export is cpt/export.py's."""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from cpt import quantized_base
from cpt.config import ModelConfig, RunConfig, load_config
from cpt.data.tokenizer_identity import vocab_size
from cpt.export import DEFAULT_MAX_SHARD_SIZE, NEW_ROWS_FILE, check_export_target, write_hf
from cpt.model_config import ModelLoadError, apply_config_overrides, config_from_arch  # noqa: F401 (re-exported)

log = logging.getLogger("cpt.model")
_ARCH_WARNED: set[str] = set()


def load_or_explain(what: str, name: str, loader, *args, **kwargs):
    """``loader(*args, **kwargs)`` (a transformers ``from_pretrained``) of ``what`` named ``name``; a missing model,
    a hub id while offline, a folder transformers cannot read or a peft adapter given as a model: one ModelLoadError
    line."""
    try:
        return loader(*args, **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"{what} {name!r}: not a local model directory and not loadable from the hub ({first})") from None
    except ValueError as e:  # e.g. a local folder without tokenizer files: transformers' multi-line ValueError
        if not Path(str(name)).is_dir():
            raise
        if (Path(str(name)) / "adapter_config.json").is_file() and not (Path(str(name)) / "config.json").is_file():
            raise ModelLoadError(f"{what} {name!r}: a peft adapter, not a model; merge it into its base first "
                                 f"(cpt merge {name} --out MERGED) and name MERGED") from None
        said = " ".join(str(e).split()) or type(e).__name__
        if "trust_remote_code=True" in said:  # (transformers' advice names an argument no cpt command has)
            raise ModelLoadError(f"{what} {name!r}: the folder names code of its own (auto_map), which cpt does not run "
                                 "unless a run config sets model.trust_remote_code: true (cpt train); cpt eval, merge "
                                 "and interpolate never run it") from None
        raise ModelLoadError(f"{what} {name!r}: transformers cannot load this folder ({said})") from None


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The run's tokenizer: a local `save_pretrained` directory or a hub id (never remote code unless asked)."""
    name = cfg.tokenizer or cfg.name_or_path
    field = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
    tok = load_or_explain(field, name, AutoTokenizer.from_pretrained, name, revision=cfg.revision,
                          trust_remote_code=cfg.trust_remote_code)
    if tok.eos_token is None:
        raise ModelLoadError(f"tokenizer {name!r} has no eos_token: packing needs one to separate documents")
    if tok.pad_token is None:  # (cpt's evaluation batches pad; packed training never does)
        tok.pad_token = tok.eos_token
        tok.cpt_pad_from_eos = True  # not the tokenizer's own: its exports leave it out (cpt.export.make_tokenizer_portable)
    return tok


def extended_tokenizer_for_run(run, save_to: str | Path | None = None):
    """The extended tokenizer that ``cpt train`` builds for a run config (a YAML path or a ``RunConfig``):
    ``model.tokenizer`` (or ``model.name_or_path``) loaded as the loop loads it, extended by ``model.vocab``.

    ``cpt prepare --extend-vocab RUN.yaml`` tokenizes with it, so the shards' tokenizer hash matches the one the
    training loop checks. ``save_to``: also ``save_pretrained`` it there (e.g. for other tools).
    """
    from cpt.vocab import build_extended_tokenizer

    cfg = run if isinstance(run, RunConfig) else load_config(run)
    if cfg.model.vocab is None:
        raise ValueError("the run config has no model.vocab section: there is nothing to extend")
    tokenizer, _ = build_extended_tokenizer(load_tokenizer(cfg.model), cfg.model.vocab)
    if save_to is not None:
        tokenizer.save_pretrained(str(save_to))
    return tokenizer


def model_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, weights_from: str | None = None):
    """The transformers config of the run's model, ``model.config_overrides`` applied: the pretrained model's
    (``weights_from`` or ``model.name_or_path``), or one built from ``model.arch`` sized to the tokenizer."""
    source = weights_from or cfg.name_or_path
    if source is not None:
        field = "train.init_from" if weights_from else "model.name_or_path"
        config = load_or_explain(field, source, AutoConfig.from_pretrained, source,
                                 revision=None if weights_from else cfg.revision,
                                 trust_remote_code=cfg.trust_remote_code)
        unused = {k: (v, getattr(config, k)) for k, v in (cfg.arch or {}).items()
                  if hasattr(config, k) and getattr(config, k) != v}
        said = ", ".join(f"{k}: {v!r} (the model's: {m!r})" for k, (v, m) in unused.items())
        if unused and said not in _ARCH_WARNED:  # (was silent: `--set model.arch.hidden_size=...` with an init_from
            _ARCH_WARNED.add(said)  # trained the loaded model as it was); once per process (the config is built twice)
            log.warning(f"model.arch is not applied to a model loaded from {field} {source}: {said}; "
                        "model.config_overrides changes a loaded model's config")
    else:
        ids = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        # a pad id that is also eos or bos (load_tokenizer's pad = eos) would make that real token the embedding's
        # padding_idx: a zero row that never gets a gradient; packed training never pads, so no pad id
        if ids["pad_token_id"] in (ids["eos_token_id"], ids["bos_token_id"]):
            ids["pad_token_id"] = None
        config = config_from_arch(cfg.arch or {}, vocab_size=vocab_size(tokenizer), **ids)  # (its largest id + 1)
    apply_config_overrides(config, cfg.config_overrides)
    return config


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, weights_from: str | None = None) -> PreTrainedModel:
    """The model in fp32 (mixed precision is accelerate's autocast; a bf16 LoRA run casts its frozen base: base_dtype.py).

    `weights_from` (an HF export directory) overrides `cfg.name_or_path`: it is how a run continues
    from the model of an earlier run or stage.
    """
    config = model_config(cfg, tokenizer, weights_from)
    common = dict(trust_remote_code=cfg.trust_remote_code, attn_implementation=attn_implementation(cfg, config))
    source = weights_from or cfg.name_or_path
    quantized = quantized_base.load_kwargs(cfg, source, config)  # model.lora.quantize_base (QLoRA), else {}
    if source is not None:
        field = "train.init_from" if weights_from else "model.name_or_path"
        saved_dtype = getattr(config, "dtype", None)  # (from_pretrained's config says float32 after the load)
        plain_config = copy.deepcopy(config) if quantized else None
        model = load_or_explain(field, source, AutoModelForCausalLM.from_pretrained, source, config=config,
                                revision=None if weights_from else cfg.revision, dtype=torch.float32,
                                use_safetensors=require_safetensors(source, field), **common, **quantized)
        model.cpt_saved_dtype = saved_dtype  # what its exports are compared with (cpt.export.say_dtype)
        if quantized:
            quantized_base.note_loaded(model, cfg, source, None if weights_from else cfg.revision, plain_config)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **common)
    weight = model.get_input_embeddings().weight
    check_vocab_fits(cfg, tokenizer, getattr(weight, "ds_shape", weight.shape)[0])  # ZeRO-3: an empty placeholder
    # what model.config_overrides made of the config (a LoRA adapter's export records it: cpt/adapters.py)
    model.cpt_config_overrides = {k: getattr(config, k) for k in cfg.config_overrides}
    return model


def attn_implementation(cfg: ModelConfig, config) -> str:
    """``model.attn_implementation``, but eager for a model class without SDPA attention (Gemma 2: transformers 5
    refuses sdpa for its soft-capped attention) when sdpa, the default, is asked for: such a model failed to load
    with `transformers cannot load this folder`, naming neither the field nor the fix."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    impl = cfg.attn_implementation
    cls = None if cfg.trust_remote_code else MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if impl == "sdpa" and cls is not None and getattr(cls, "_supports_sdpa", True) is False:
        if cls.__name__ not in _ARCH_WARNED:  # (once per process: the model is built more than once)
            _ARCH_WARNED.add(cls.__name__)
            log.warning(f"model.attn_implementation: {cls.__name__} has no sdpa attention in transformers: "
                        "using eager (set model.attn_implementation: eager to say so)")
        return "eager"
    return impl


def check_vocab_fits(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, rows: int) -> None:
    """The tokenizer's ids must all have an embedding row (before any model.vocab extension): by its largest id, not its
    length (a tokenizer with gaps in its ids passed by length, then failed with an index error at the first batch)."""
    needed = vocab_size(tokenizer)
    if rows >= needed:
        return
    name = cfg.tokenizer or cfg.name_or_path
    size = (f"{len(tokenizer):,} tokens" if needed == len(tokenizer)
            else f"{len(tokenizer):,} tokens with ids up to {needed - 1:,}")
    raise ModelLoadError(
        f"the tokenizer {name!r} has {size} but the model's embedding has {rows:,} rows: "
        "give the model's own tokenizer (model.tokenizer), or, to add tokens, start from the model's tokenizer and "
        "set model.vocab (add_tokens_file / learn_from), which resizes the embeddings and initialises the new rows"
    )


def check_attn_implementation(cfg: ModelConfig) -> None:
    """``model.attn_implementation: flash_attention_2/3`` needs its package and a GPU (or transformers' `kernels`
    fallback); checked before anything loads, so a run does not fail after the model is built."""
    impl = cfg.attn_implementation
    if not impl.startswith("flash_attention_"):
        return
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available
    from transformers.utils.import_utils import is_kernels_available

    available = is_flash_attn_2_available() if impl == "flash_attention_2" else is_flash_attn_3_available()
    if available or is_kernels_available():  # transformers falls back to the `kernels` package's hub build
        return
    import importlib.util

    package, module = ("flash-attn", "flash_attn") if impl == "flash_attention_2" else ("flash-attn-3", "flash_attn_interface")
    if importlib.util.find_spec(module) is None:
        reason = f"{package} is not installed (pip install {package} --no-build-isolation)"
    else:
        reason = "no CUDA GPU is available" if not torch.cuda.is_available() else f"the installed {package} is too old"
    raise ModelLoadError(f"model.attn_implementation: {impl} needs the {package} package and a CUDA GPU, but {reason}; "
                         "use sdpa (the default) or eager")


def require_safetensors(source: str | os.PathLike, what: str = "model") -> bool:
    """cpt loads weights from safetensors only (a pickle can run code): a local directory must hold
    ``*.safetensors`` weights, else one error line says how to convert it. Returns the ``use_safetensors``
    argument for ``from_pretrained`` (True, also for hub ids: a hub repo without safetensors is refused)."""
    p = Path(source)
    if p.is_dir() and not (any(p.glob("*.safetensors")) or any(p.glob("*.safetensors.index.json"))):
        pickles = sorted(f.name for f in p.glob("*.bin")) + sorted(f.name for f in p.glob("*.pt"))
        found = f"it holds {', '.join(pickles[:3])} (pickle)" if pickles else "it holds no weights"
        raise ModelLoadError(
            f"{what} {source}: no *.safetensors weights ({found}); cpt loads safetensors only. Convert once with "
            "transformers: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)"
        )
    if p.is_dir():
        check_weight_files(sorted(p.glob("*.safetensors")), f"{what} {source}")
    return True


def check_weight_files(files, what: str) -> None:
    """A truncated or damaged weight file is one line naming it (safetensors' own error names no file)."""
    from cpt.fileio import safetensors_damage

    for f in files:
        if damage := safetensors_damage(f):
            raise ModelLoadError(f"{what}: {damage}; copy, download or export it again")


def require_adapter_safetensors(adapter_dir: str | os.PathLike) -> None:
    """A peft adapter directory must hold adapter_model.safetensors (peft would torch.load adapter_model.bin)."""
    d = Path(adapter_dir)
    if not (d / "adapter_model.safetensors").is_file():
        found = " (it holds adapter_model.bin, a pickle)" if (d / "adapter_model.bin").is_file() else ""
        raise ModelLoadError(f"adapter {d}: no adapter_model.safetensors{found}; cpt loads safetensors only. "
                             "Convert once with peft: PeftModel.from_pretrained(...).save_pretrained(DIR, safe_serialization=True)")
    check_weight_files([d / "adapter_model.safetensors"], f"adapter {d}")


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """A peft adapter's adapter_config.json; an unreadable one is one ModelLoadError line naming it."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path}: not a JSON object")
    return cfg


def load_adapter_model(adapter_dir: str | Path, base: str | None = None, dtype: torch.dtype | None = None):
    """Load base model + adapter as a ``PeftModel`` (and the tokenizer: the adapter's own if saved, else the base's).

    The base's embeddings are resized to the size recorded in ``cpt_adapter.json`` (vocabulary extension);
    the new rows' values come from the adapter.
    """
    from cpt.adapters import ADAPTER_SIDECAR, load_peft_adapter

    adir = Path(adapter_dir)
    cfg_path = adir / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{adir} is not a peft adapter directory (no adapter_config.json)")
    acfg = read_adapter_config(adir)
    base = base or acfg.get("base_model_name_or_path")
    sidecar = adir / ADAPTER_SIDECAR
    recorded = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    if not base:  # (a ValueError traceback from cpt merge and cpt eval)
        raise ModelLoadError(
            f"{cfg_path} names no base model: an adapter of a run whose base was built from model.arch has none on "
            "disk; export the run merged from its checkpoint instead (cpt export RUN --out DIR)"
            if sidecar.is_file() else f"{cfg_path} names no base model: give it (cpt merge --base)")
    require_adapter_safetensors(adir)
    config = None
    if recorded.get("config_overrides"):  # the base as the run trained it (long-context: its RoPE and context)
        config = load_or_explain("base model", base, AutoConfig.from_pretrained, base, trust_remote_code=False)
        for key, value in recorded["config_overrides"].items():
            setattr(config, key, value)
    model = load_or_explain("base model", base, AutoModelForCausalLM.from_pretrained, base, dtype=dtype or "auto",
                            trust_remote_code=False, **({"config": config} if config is not None else {}),
                            use_safetensors=require_safetensors(base, "base model"))  # (moved: one line)
    tok_src = adir if (adir / "tokenizer_config.json").is_file() else Path(base)
    tokenizer = load_or_explain("tokenizer", str(tok_src), AutoTokenizer.from_pretrained, str(tok_src),
                                trust_remote_code=False)
    n_rows = recorded.get("num_embeddings", len(tokenizer))
    if n_rows != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(n_rows, mean_resizing=False)
    _set_new_rows(model, adir, recorded.get("new_rows") or [])
    try:
        peft_model = load_peft_adapter(model, adir)
    except RuntimeError as e:  # torch's load_state_dict: the adapter was trained on another model
        if "Error(s) in loading state_dict" not in str(e):
            raise
        from cpt.state import state_dict_mismatch

        raise ModelLoadError(f"adapter {adir} does not fit the base model {base} ({state_dict_mismatch(e)}): give the "
                             "base it was trained on (cpt merge --base)") from None
    return peft_model, tokenizer


def _set_new_rows(model, adapter_dir: Path, ids: list[int]) -> None:
    """The new rows the run's frozen embedding and head held (``cpt_new_rows.safetensors``), set on the resized base
    before the adapter loads over it (its trained rows win)."""
    path = adapter_dir / NEW_ROWS_FILE
    if not path.is_file() or not ids:
        return
    from safetensors.torch import load_file

    rows = load_file(str(path))
    with torch.no_grad():
        for key, module in (("input", model.get_input_embeddings()), ("output", model.get_output_embeddings())):
            if key in rows and module is not None:
                module.weight[ids] = rows[key].to(module.weight.dtype)


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, base: str | None = None,
                  dtype: torch.dtype | None = None, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Merge a LoRA adapter into its base model and save a plain HF model (safetensors) with the tokenizer, in
    ``dtype`` (None: the dtype the base was saved in)."""
    acfg = Path(adapter_dir) / "adapter_config.json"
    recorded = read_adapter_config(adapter_dir).get("base_model_name_or_path") if acfg.is_file() else None
    out = check_export_target(out_dir, (adapter_dir, base or recorded), "the adapter or its base model")
    peft_model, tokenizer = load_adapter_model(adapter_dir, base=base, dtype=dtype)
    # written like every export: replaces an earlier export's folder whole (no stale shards or index left)
    from cpt.adapters import merge_lora

    return write_hf(merge_lora(peft_model), tokenizer, out, max_shard_size=max_shard_size)


def prepare_model(cfg: ModelConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, log_fn=print,
                  weights_from: str | None = None, checkpoint: str | Path | None = None):
    """Apply vocab extension -> LoRA -> freezing -> kernels -> activation checkpointing, in that order.

    ``weights_from``: the HF export the weights were loaded from (``train.init_from``); new tokens its own tokenizer
    already holds at the same ids keep the rows it trained (an export of an extended run, continued). So do those of
    ``model.name_or_path``'s own tokenizer, which holds them already (:data:`cpt.vocab.RECORD`). ``checkpoint``: the cpt
    checkpoint the weights will be loaded from (PiSSA/OLoRA rebuild their residual base from its stored factors).

    (Freezing after LoRA: peft freezes the whole base model, so a freeze spec then selects among the
    adapter and modules_to_save.) Returns (model, tokenizer, new_token_ids).
    """
    from cpt.adapters import apply_freeze, apply_lora, describe_trainable, note_base
    from cpt.layer_options import apply_liger, checkpoint_layers

    new_ids: list[int] = []
    if cfg.vocab is not None:
        from cpt.vocab import extend_vocabulary

        own = cfg.name_or_path and cfg.tokenizer in (None, cfg.name_or_path)  # the tokenizer came with the weights
        trained = _vocab_of(weights_from) if weights_from else (tokenizer.get_vocab() if own else None)
        model, tokenizer, new_ids = extend_vocabulary(model, tokenizer, cfg.vocab, trained_vocab=trained)
        plan = model._cpt_vocab_plan
        if len(new_ids) > plan.present:  # (the run's log said nothing of the tokens it added)
            log_fn(f"model.vocab: {len(new_ids) - plan.present} tokens added to the tokenizer ({len(tokenizer):,} in all)")
        if plan.present:
            log_fn(f"model.vocab: {plan.present} of its {len(new_ids)} tokens are already in the tokenizer (an export "
                   "of a run with this model.vocab): not added again")
        if plan.kept:
            log_fn(f"model.vocab: {plan.kept} of the {len(new_ids)} new tokens keep the rows "
                   f"{weights_from or cfg.name_or_path} trained for them (its tokenizer has them at the same ids)")
    _train_separator_embedding(model, tokenizer, log_fn)
    if cfg.lora is not None:
        model = apply_lora(model, cfg.lora, new_token_ids=new_ids or None, log_fn=log_fn, factors_from=checkpoint)
        if quantized_base.is_quantized(model):
            log_fn(quantized_base.describe(model))
    if cfg.freeze is not None:
        if apply_freeze(model, cfg.freeze, new_token_ids=new_ids) and cfg.lora is None:
            note_base(model)  # its checkpoints leave the frozen part out (cpt/adapter_checkpoint.py): as built, hashed
    if cfg.liger_kernel:
        apply_liger(model, log_fn)
    if cfg.gradient_checkpointing:
        checkpoint_layers(model, cfg.gradient_checkpointing_every, cfg.compile)
    log_fn(describe_trainable(model))
    return model, tokenizer, new_ids


def _vocab_of(export: str | None) -> dict[str, int] | None:
    """The vocabulary of an HF export's own tokenizer; None without one."""
    if export is None:
        return None
    try:
        return AutoTokenizer.from_pretrained(export, trust_remote_code=False).get_vocab()
    except (OSError, ValueError):
        return None


def _train_separator_embedding(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, log_fn) -> None:
    """A config whose ``pad_token_id`` is its eos or bos token (Phi-3, many fine-tunes) makes transformers build the
    input embedding with that token as ``padding_idx``: its row never gets a gradient. cpt packs documents separated
    by eos and never pads, so the row is trained like any other (the saved config is unchanged)."""
    emb = model.get_input_embeddings()
    idx = getattr(emb, "padding_idx", None)
    if idx is not None and idx in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        emb.padding_idx = None
        log_fn(f"the input embedding's padding_idx {idx} (config pad_token_id) is the tokenizer's eos/bos token, which "
               "packed sequences contain: its row is trained like any other")


def model_shape(model: torch.nn.Module) -> dict[str, int]:
    """Numbers needed for FLOP accounting: parameter count (non-embedding, trainable too), layers, hidden size, and
    the parameters a token passes through (``n_params_active``, ``n_trainable_active``): all of them in a dense
    model; in a mixture of experts the routed experts' weights count by the share a token uses (top-k of E)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    numel = quantized_base.numel  # (ZeRO-3 placeholders are empty; a 4-bit base's weights packed two to a byte)
    share = expert_share(cfg)
    n_params = n_trainable = active = trainable_active = 0
    for name, p in base.named_parameters():
        n = numel(p)
        used = n * share if share is not None and "experts" in name.split(".") else n
        n_params, active = n_params + n, active + used
        if p.requires_grad:
            n_trainable, trainable_active = n_trainable + n, trainable_active + used
    emb = numel(base.get_input_embeddings().weight)
    return {
        "n_params": int(n_params),
        "n_trainable": int(n_trainable),
        "n_params_non_embedding": int(n_params - emb),
        "n_params_active": int(round(active)),
        "n_trainable_active": int(round(trainable_active)),
        "n_layers": int(getattr(cfg, "num_hidden_layers", 0)),
        "hidden": int(getattr(cfg, "hidden_size", 0)),
    }


def expert_share(config) -> float | None:
    """The share of a mixture of experts' routed expert weights one token passes through, top-k / E (Mixtral 8x7B:
    2/8), from its config (``num_experts_per_tok`` of ``num_local_experts`` / ``num_experts`` / ``n_routed_experts``);
    None for a dense model. The routed experts are the parameters under a module named ``experts`` (shared experts,
    ``shared_expert(s)``, every token uses)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    k = getattr(config, "num_experts_per_tok", None)
    e = next((getattr(config, a) for a in ("num_local_experts", "num_experts", "n_routed_experts")
              if isinstance(getattr(config, a, None), int)), None)
    return k / e if isinstance(k, int) and e and 0 < k <= e else None
