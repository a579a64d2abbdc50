"""LoRA (peft) and partial-parameter training (layer freezing) for continual pre-training.

Order of application when a run uses several of these (see docs/adapters.md):

1. vocabulary extension (:func:`cpt.vocab.extend_vocabulary`), so that LoRA sees the final embedding size;
2. LoRA (:func:`apply_lora`), which freezes every base weight and adds the adapter;
3. freezing (:func:`apply_freeze`), which can further freeze parts (also adapter weights, e.g. the LoRA
   weights of the bottom layers) — without LoRA it freezes parts of the full model.

All of it must happen before the optimizer is built and before ``accelerator.prepare``. A setting that does not fit
the loaded model (a LoRA module name that names no module, a layer range past the last layer) is a ``ConfigError``
naming the field: one line from ``cpt train``, no traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from cpt import quantized_base
from cpt.adapter_init import init_peft_model, refuse_unsupported
from cpt.config import ConfigError, FreezeConfig, LoraConfig, parse_layer_ranges

ADAPTER_SIDECAR = "cpt_adapter.json"


# ----------------------------------------------------------------------------- counting


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied (shared) parameters are counted once."""
    trainable = total = 0
    for p in model.parameters():  # .parameters() already de-duplicates shared tensors
        n = quantized_base.numel(p)  # (ZeRO-3's placeholders: ds_numel; a 4-bit base packs two weights a byte)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def describe_trainable(model: nn.Module) -> str:
    """The line every run prints and logs: ``trainable params: X of Y (Z%)``."""
    trainable, total = count_parameters(model)
    pct = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} of {total:,} ({pct:.2f}%)"


def trainable_metrics(model: nn.Module) -> dict[str, float]:
    """The same numbers as a metrics dict, for the run's logger."""
    trainable, total = count_parameters(model)
    return {"params/trainable": trainable, "params/total": total,
            "params/trainable_fraction": trainable / total if total else 0.0}


# ----------------------------------------------------------------------------- freezing


def find_decoder_layers(model: nn.Module) -> tuple[str, int]:
    """The qualified name of the decoder-layer ``ModuleList`` and its length.

    Looks for the longest ``nn.ModuleList`` whose name ends in ``layers``, ``h``, ``blocks`` or ``block``
    (Llama/Mistral/Qwen: ``model.layers``; GPT-2: ``transformer.h``; GPT-NeoX: ``gpt_neox.layers``), so it also
    works through a peft wrapper (``base_model.model.model.layers``).
    """
    best: tuple[str, int] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            last = name.rsplit(".", 1)[-1]
            if last in ("layers", "h", "blocks", "block") and (best is None or len(module) > best[1]):
                best = (name, len(module))
    if best is None:
        raise ConfigError(f"model.freeze.layers: cannot find the decoder layers of {type(model).__name__} "
                          "(no ModuleList named layers/h/blocks); freeze by `patterns` instead")
    return best


def layer_indices(spec: str, num_layers: int) -> list[int]:
    """The layer indices a ``FreezeConfig.layers`` spec selects in a model with ``num_layers`` layers."""
    if spec == "bottom_half":
        return list(range(num_layers // 2))
    if spec == "top_half":
        return list(range(num_layers - num_layers // 2, num_layers))
    if spec == "every_other":
        return list(range(0, num_layers, 2))
    return parse_layer_ranges(spec, num_layers)


def apply_freeze(model: nn.Module, cfg: FreezeConfig, new_token_ids: Iterable[int] | None = None) -> list[str]:
    """Set ``requires_grad=False`` on the selected parameters; returns the names it froze.

    Only freezes, never unfreezes: with LoRA the base weights stay frozen whatever the config says.
    ``new_token_ids`` (model.vocab's new tokens): a spec that freezes the tensors holding their rows is refused
    (their rows would keep their initial values while the data is tokenized with them).
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    aliases: dict[int, list[str]] = {}  # every name of each tensor: a tied lm_head.weight is the embedding's tensor
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    every_name = {n: aliases[id(p)] for n, p in model.named_parameters() if p.requires_grad}
    all_names = [n for names_of in aliases.values() for n in names_of]
    for field, specs in (("train_only", cfg.train_only), ("patterns", cfg.patterns)):  # a typo froze nothing, silently
        unmatched = [p for p in specs or [] if not any(re.search(p, n) for n in all_names)]
        if unmatched:
            raise ConfigError(f"model.freeze.{field}: no parameter of this {type(model).__name__} matches "
                              f"{', '.join(unmatched)} (its names look like {all_names[len(all_names) // 2]})")
    selected: set[str] = set()
    if cfg.train_only:
        keep = [re.compile(p) for p in cfg.train_only]
        selected |= {n for n in names if not any(r.search(a) for r in keep for a in every_name[n])}
    if cfg.layers is not None:
        list_name, n_layers = find_decoder_layers(model)
        try:
            idx = layer_indices(cfg.layers, n_layers)
        except ValueError as e:  # e.g. a range past the last layer
            raise ConfigError(f"model.freeze.layers: {e}") from None
        prefixes = tuple(f"{list_name}.{i}." for i in idx)
        selected |= {n for n in names if n.startswith(prefixes)}
    if cfg.patterns:
        pats = [re.compile(p) for p in cfg.patterns]
        selected |= {n for n in names if any(r.search(a) for r in pats for a in every_name[n])}
    for n, p in model.named_parameters():
        if n in selected:
            p.requires_grad_(False)
    if names and len(selected) == len(names):
        raise ConfigError("model.freeze: the freeze config freezes every trainable parameter; nothing would be trained")
    frozen_rows = [n for n in _new_row_holders(model) if n in selected] if new_token_ids else []
    if frozen_rows:
        raise ConfigError(f"model.freeze freezes {frozen_rows[0]}, which holds the rows of model.vocab's "
                          f"{len(list(new_token_ids))} new tokens: they would keep their initial values; leave it "
                          "trainable (or use model.lora, which trains the new rows alone)")
    return sorted(selected)


def _new_row_holders(model: nn.Module) -> list[str]:
    """The names of the trainable parameters holding the new vocabulary rows: peft's trainable-token deltas with
    LoRA, else the input and output embedding weights."""
    deltas = [n for n, _ in model.named_parameters() if "trainable_tokens_delta" in n]
    if deltas:
        return deltas
    ids = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings())
           if m is not None and getattr(m, "weight", None) is not None}
    return [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids]


# ----------------------------------------------------------------------------- LoRA


def norm_module_names(model: nn.Module) -> list[str]:
    """Qualified names of every normalisation module (class name contains 'Norm')."""
    return [n for n, m in model.named_modules() if n and "norm" in type(m).__name__.lower()]


def _embedding_names(model: nn.Module) -> tuple[str, str | None, bool]:
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    tied = out is not None and out.weight is emb.weight
    return names[id(emb)], (names[id(out)] if out is not None else None), tied


def new_row_ids(model: nn.Module, new_token_ids: Iterable[int]) -> list[int]:
    """The embedding rows a vocabulary extension created: the new tokens' ids plus every row after the
    largest of them (padding rows from ``pad_to_multiple_of``; they feed the softmax, so they are trained too)."""
    ids = sorted(set(int(i) for i in new_token_ids))
    if not ids:
        return []
    n_rows = model.get_input_embeddings().weight.shape[0]
    return sorted(set(ids) | set(range(ids[-1] + 1, n_rows)))


def check_lora_modules(model: nn.Module, cfg: LoraConfig) -> None:
    """Every module name in ``target_modules`` and ``modules_to_save`` must match a module of ``model``, as peft matches
    them (a target: the module's name or its last dotted parts; a module to save: the end of its name). peft adapts
    what matches and skips the rest without a word, so a misspelt name next to a correct one would train less than
    the config says. ``ConfigError`` names the field and the model's linear layers."""
    names = [n for n, _ in model.named_modules() if n]
    targets = [] if cfg.target_modules == "all-linear" else (
        [cfg.target_modules] if isinstance(cfg.target_modules, str) else list(cfg.target_modules))
    errors = []
    bad = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if bad:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        errors.append(f"model.lora.target_modules: {bad} match no module of this {type(model).__name__} "
                      f"(its linear layers: {', '.join(linear)}; or 'all-linear')")
    bad = [m for m in cfg.modules_to_save if not any(n.endswith(m) for n in names)]
    if bad:
        errors.append(f"model.lora.modules_to_save: {bad} match no module of this {type(model).__name__}")
    if errors:
        raise ConfigError("; ".join(errors))


# peft reads `model.is_gradient_checkpointing`, which transformers 5 deprecates with a FutureWarning: every LoRA run
# and `cpt merge` printed it, a library's note to itself that no cpt user can act on
PEFT_READS_DEPRECATED = "`is_gradient_checkpointing` is deprecated"


def load_peft_adapter(model, adapter_dir):
    """``PeftModel.from_pretrained`` (not trainable), without peft's deprecation noise."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_READS_DEPRECATED, category=FutureWarning)
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)


def apply_lora(model: nn.Module, cfg: LoraConfig, new_token_ids: Iterable[int] | None = None, log_fn=None,
               factors_from: str | Path | None = None):
    """Wrap ``model`` in a peft LoRA adapter (a ``PeftModel``); every base weight becomes frozen.

    ``new_token_ids`` (from :func:`cpt.vocab.extend_vocabulary`): the rows of the new tokens stay trainable
    through peft's ``trainable_token_indices`` (input embeddings, and the output head when untied) and are
    saved in the adapter — unless ``embed_tokens`` is already trained in full through ``modules_to_save``.

    A side of tied embeddings in ``modules_to_save`` or ``target_modules``: peft warns that merging or converting
    may go wrong (peft issue 2777; ``ensure_weight_tying`` would tie the trained copies instead). cpt handles both
    (the copy unties the model and its config says so; :func:`merge_lora` gives a LoRA'd side its own weight), so
    peft's warning is replaced by one line (``log_fn``) saying what the model becomes.
    ``factors_from``: the checkpoint the weights load from (PiSSA/OLoRA: its initial factors, cpt/adapter_init.py).
    """
    from peft import LoraConfig as PeftLoraConfig

    check_lora_modules(model, cfg)
    modules_to_save = list(cfg.modules_to_save)
    if cfg.train_norms:
        modules_to_save += [n for n in norm_module_names(model) if n not in modules_to_save]
    kwargs = {}
    rows = new_row_ids(model, new_token_ids or [])
    if rows:
        emb_name, out_name, tied = _embedding_names(model)
        emb_short = emb_name.rsplit(".", 1)[-1]
        full = {m.rsplit(".", 1)[-1] for m in modules_to_save}
        if emb_short not in full:
            tti = {emb_short: rows}
            if out_name is not None and not tied:
                out_short = out_name.rsplit(".", 1)[-1]
                if out_short not in full:
                    tti[out_short] = rows
            kwargs["trainable_token_indices"] = tti
        elif out_name is not None and not tied and out_name.rsplit(".", 1)[-1] not in full:
            modules_to_save.append(out_name.rsplit(".", 1)[-1])
    targets = [t] if isinstance(t := cfg.target_modules, str) and t != "all-linear" else cfg.target_modules
    pcfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        modules_to_save=modules_to_save or None,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        init_lora_weights=True if cfg.init_lora_weights == "default" else cfg.init_lora_weights,
        task_type="CAUSAL_LM",
        **kwargs,
    )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Model has `tie_word_embeddings=True` and a tied layer is part of")
            warnings.filterwarnings("ignore", message=PEFT_READS_DEPRECATED, category=FutureWarning)
            # (cpt sets no rank/alpha pattern: peft's own, for a fused expert weight, which it applies; the warning
            # compares the patterns with module names only and says they were ignored)
            warnings.filterwarnings("ignore", message="The following (rank|alpha)_pattern keys did not match")
            peft_model = init_peft_model(model, pcfg, factors_from)  # (PiSSA/OLoRA: keeps A0, B0 for the export)
    except ValueError as e:  # e.g. a target module of a type LoRA cannot adapt (a norm layer)
        if isinstance(e, ConfigError):  # (cpt's own, naming its field)
            raise
        if cfg.use_dora and "dora" in str(e).lower():  # peft's ParamWrapper (fused MoE experts), lora_bias, ...
            raise ConfigError(f"model.lora.use_dora: DoRA cannot adapt every module model.lora.target_modules selects "
                              f"({e}); name the attention/MLP projections in target_modules (not the fused experts "
                              "peft adds to all-linear on an MoE model) or set use_dora: false") from None
        raise ConfigError(f"model.lora: {e}") from None
    peft_model._cpt_new_rows = rows  # recorded in the adapter's sidecar by save_adapter
    peft_model._cpt_loraplus_lr_ratio = cfg.loraplus_lr_ratio  # read by cpt.optim.param_groups
    note = _untie_trained_copies(peft_model)
    if note and log_fn is not None:
        log_fn(note)
    if pcfg.target_parameters and log_fn is not None:
        fused = "".join(f"; {k.rsplit('.', 1)[-1]} at rank {r}, alpha {pcfg.alpha_pattern.get(k, pcfg.lora_alpha):g} (it "
                        f"fuses {r // pcfg.r} projections, each at r={pcfg.r})" for k, r in pcfg.rank_pattern.items())
        log_fn(f"model.lora: peft also adapts the experts' fused weights {', '.join(sorted(pcfg.target_parameters))}"
               f"{fused}")
    note_base(peft_model)  # (before any sharding: every backend can compare a checkpoint's base with it)
    return peft_model


def adapter_keys(peft_model) -> list[str]:
    """The state-dict keys of a model that are not its frozen base's. A peft model: the trainable parameters (LoRA A/B,
    the ``modules_to_save`` copies, the new vocabulary rows of ``trainable_token_indices``) and every tensor peft keeps
    under the adapter's name (``...lora_A.default.weight``: also adapter weights ``model.freeze`` froze). Any other
    model (``model.freeze`` without LoRA): its trainable parameters (a tied one under both names).

    Matched by name, not by tensor identity: FSDP2 leaves the root module's parameters (embeddings, final norm, a
    tied head) unsharded after a forward without backward (a held-out evaluation) and its ``state_dict`` hook
    registers the sharded ones again, so the objects ``parameters()`` and ``state_dict`` return differ; a model.freeze
    checkpoint written after an evaluation left the trained embeddings and norm out (and could not be resumed)."""
    active = getattr(peft_model, "active_adapter", None) if hasattr(peft_model, "peft_config") else None
    own = re.compile(rf"\.{re.escape(active)}(\.|$)") if active else None
    named = list(peft_model.named_parameters(remove_duplicate=False))
    trainable = {id(p) for _, p in named if p.requires_grad}
    names = {n for n, p in named if p.requires_grad}
    return [k for k, v in peft_model.state_dict(keep_vars=True).items()
            if k in names or id(v) in trainable or (own is not None and own.search(k))]


def base_fingerprint(peft_model, hash_here: bool = True, as_dtype: torch.dtype | None = None,
                     ours: set[str] | None = None) -> str | None:
    """SHA-256 over every frozen base tensor of a model (name, shape, dtype and the SHA-256 of its bytes; sorted by
    name): every state-dict tensor but :func:`adapter_keys` (``ours``: but those), the base as built, vocabulary changes
    included. One pass over the base weights, the tensors hashed in
    parallel (~1.2 GB/s per CPU core). None when the weights are not all here (meta tensors). Under DeepSpeed ZeRO-3's
    zero.Init (partitioned placeholders) the tensors are gathered ~1 GB at a time, a collective every process joins;
    those with ``hash_here`` False only take part in it (and get None). ``as_dtype``: the fingerprint the same base
    has when built in that dtype (its floating-point tensors cast), as ZeRO-3's zero.Init builds it under bf16/fp16."""
    from concurrent.futures import ThreadPoolExecutor

    ours = set(adapter_keys(peft_model)) if ours is None else ours
    base = [(n, t) for n, t in sorted(peft_model.state_dict(keep_vars=True).items()) if n not in ours]
    if any(t.is_meta for _, t in base):
        return None  # (transformers leaves weights a checkpoint lacks on meta on FSDP's other ranks, cpu_ram_efficient_loading)

    def dtype(t: torch.Tensor) -> torch.dtype:
        return as_dtype if as_dtype is not None and t.is_floating_point() else t.dtype

    def digest(t: torch.Tensor) -> bytes:  # (hashlib releases the GIL while it hashes)
        return hashlib.sha256(t.detach().to("cpu", dtype(t)).contiguous().reshape(-1).view(torch.uint8).numpy().data).digest()

    h = hashlib.sha256()
    zero3 = any(t.numel() == 0 and getattr(t, "ds_numel", 0) for _, t in base)
    if not (hash_here or zero3):
        return None
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        for group in _groups_of(base, 1 << 30) if zero3 else [base]:  # ZeRO-3: ~1 GB gathered whole at a time
            with _gathered([t for _, t in group], zero3):
                if hash_here:
                    for (name, t), d in zip(group, pool.map(digest, [t for _, t in group])):
                        h.update(f"{name}|{list(t.shape)}|{dtype(t)}|".encode() + d)
    return h.hexdigest() if hash_here else None


def _groups_of(named: list, max_bytes: int) -> list[list]:
    """Consecutive runs of ``(name, tensor)`` of at most ``max_bytes`` (a larger tensor alone), by full size."""
    groups, size = [[]], 0
    for name, t in named:
        n = quantized_base.numel(t) * t.element_size()
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, t))
        size += n
    return groups


def _gathered(tensors: list, zero3: bool):
    """ZeRO-3 placeholders gathered whole on every process (a collective) within; otherwise nothing."""
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(tensors, modifier_rank=None)


def note_base(peft_model) -> str | None:
    """Record the base fingerprint on the model (``_cpt_base_fingerprint``) as its weights are now; returns it.

    In a run of several processes (collective) the main process alone hashes and hands the fingerprint to the others.
    Their bases are the main process's: DDP and DeepSpeed broadcast rank 0's weights when they wrap the model, ZeRO-3's
    zero.Init and FSDP2's ``cpu_ram_efficient_loading`` (the shipped fsdp.yaml) load them on rank 0 alone; otherwise
    every process built it from the same files with the same code and seed. The others' own pass over the same bytes
    (all ranks of a node reading them at once) told nothing more. Each process still compares the fingerprint with a
    checkpoint's, and a mismatch stops all of them together (cpt/checkpoint.py)."""
    import torch.distributed as dist

    # a quantized base (QLoRA): the fingerprint of its original weight files and quantization settings
    fingerprint = quantized_base.files_fingerprint if quantized_base.is_quantized(peft_model) else base_fingerprint
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        peft_model._cpt_base_fingerprint = fingerprint(peft_model)
        return peft_model._cpt_base_fingerprint
    shared = [fingerprint(peft_model, hash_here=dist.get_rank() == 0)]
    dist.broadcast_object_list(shared, src=0)
    peft_model._cpt_base_fingerprint = shared[0]
    return shared[0]


def _untie_trained_copies(peft_model) -> str | None:
    """A tied embedding or output head in ``modules_to_save`` is trained as its own copy: the model is no longer
    tied, and its config says so (as peft's merge does). Otherwise a later ``tie_weights()`` tries to tie a peft
    wrapper: accelerate's FSDP2 preparation (``fsdp_cpu_ram_efficient_loading``) calls it and fails with
    ``KeyError: "attribute 'weight' already exists"``. Returns a line saying what became of the tied embeddings."""
    base = peft_model.get_base_model()
    if not getattr(base.config, "tie_word_embeddings", False):
        return None
    sides = {"input embedding": base.get_input_embeddings(), "output head": base.get_output_embeddings()}
    if any(type(m).__name__ == "ModulesToSaveWrapper" for m in sides.values()):
        base.config.tie_word_embeddings = False
        return ("model.lora: modules_to_save unties the tied embeddings: each side listed there is trained as its own "
                "copy (a side not listed keeps the base weights); the exported and merged model is untied")
    if any(hasattr(m, "base_layer") for m in sides.values()):
        return ("model.lora: LoRA on one side of the tied embeddings adapts that side only: the merged model gives it "
                "its own weight and is untied")
    return None


def merge_lora(peft_model):
    """``peft_model.merge_and_unload()`` that keeps the adapter's logits when a LoRA layer sits on one side of tied
    embeddings (``target_modules`` naming ``lm_head`` or ``embed_tokens`` of a ``tie_word_embeddings`` model): the
    adapter changes that side only, but merging its delta into the one shared weight would change the other side
    too. That side gets its own copy first, and the merged model's config says it is untied (as with a tied module
    in ``modules_to_save``). A quantized base (QLoRA): merged into the original full-precision base instead."""
    if quantized_base.is_quantized(peft_model):
        peft_model = quantized_base.on_original_base(peft_model, adapter_keys)
    base = peft_model.get_base_model()
    emb, head = base.get_input_embeddings(), base.get_output_embeddings()
    if head is not None and getattr(base.config, "tie_word_embeddings", False):
        emb_layer, head_layer = getattr(emb, "base_layer", emb), getattr(head, "base_layer", head)
        adapted = emb_layer is not emb or head_layer is not head  # a LoRA wrapper on either side
        if adapted and emb_layer.weight is head_layer.weight:
            head_layer.weight = nn.Parameter(head_layer.weight.detach().clone(), requires_grad=False)
            base.config.tie_word_embeddings = False
    return peft_model.merge_and_unload()


def adapter_base_identity(adapter_dir: str | Path) -> str:
    """The base an exported adapter was trained on, for comparing adapters: a two-stage run's own copy of its base
    (``RUN/base``) by the digest of the checkpoint it was written from (``cpt_base.json``: two runs from one checkpoint
    share it), another local base by its real path, a hub id as written."""
    name = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
    stamp = Path(name) / "cpt_base.json" if name else None
    if stamp is not None and stamp.is_file():
        return "checkpoint " + str(json.loads(stamp.read_text()).get("checksums_sha256"))
    return os.path.realpath(name) if name and Path(name).is_dir() else name


def refuse_unshardable(model: nn.Module, acc) -> None:
    """LoRA with ``model.vocab`` on a model whose embeddings are tied: peft trains the new rows through one delta
    shared by ``embed_tokens`` and ``lm_head``, and FSDP2 (which accelerate shards as separate units: the embedding,
    the output head) cannot shard one parameter twice; it would fail deep inside ``fully_shard``. Refused here in
    one line naming the fields (before anything is written)."""
    from cpt.distributed import Backend, backend

    quantized_base.refuse_backend(model, acc)  # QLoRA: one process or DDP
    if not hasattr(model, "get_base_model"):
        return
    refuse_unsupported(model, acc)  # (PiSSA/OLoRA under DeepSpeed)
    if backend(acc) is not Backend.FSDP:
        return
    head = model.get_base_model().get_output_embeddings()
    if getattr(getattr(head, "token_adapter", None), "tied_adapter", None) is not None:
        raise ConfigError("model.lora with model.vocab on a model with tied embeddings (tie_word_embeddings) cannot "
                          "run under FSDP: peft shares the new rows' weights between embed_tokens and lm_head, which "
                          "FSDP cannot shard twice; launch with DDP or DeepSpeed ZeRO-2/3")
