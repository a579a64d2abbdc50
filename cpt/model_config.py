"""The transformers config of a run's model where cpt makes or changes it: built from ``model.arch`` (each key checked
against the config class and what the model's code reads) and ``model.config_overrides`` applied on a loaded one
(checked the same way; RoPE parameters merged with the model's own). cpt/model.py builds the model from it."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig


class ModelLoadError(ValueError):
    """A model or tokenizer that cannot be loaded from the path or hub id the config names."""


def config_from_arch(arch: dict[str, Any], field: str = "model.arch", **defaults: Any):
    """A transformers config from an architecture dict (``model.arch``, an experiment spec's ``model``:
    ``{model_type: llama, hidden_size: ..., ...}``; model_type defaults to llama); ``defaults`` fill the keys it
    leaves out. The one builder of a model config from an architecture (the loop, `cpt experiment`, the benchmarks).

    A key the config class does not know (``num_hiden_layers``: transformers keeps it as an unused attribute and
    builds the default 32 layers), a value it refuses and an unknown ``model_type`` are one :class:`ModelLoadError`
    naming ``field`` (a key transformers converts, such as a legacy ``rope_theta``, is known)."""
    import difflib

    from transformers import CONFIG_MAPPING

    kw = dict(arch)
    model_type = kw.pop("model_type", "llama")
    if model_type not in CONFIG_MAPPING:
        near = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
        raise ModelLoadError(f"{field}.model_type: {model_type!r} is not a model type of transformers"
                             + (f" (similar: {', '.join(near)})" if near else ""))
    for key, value in defaults.items():
        kw.setdefault(key, value)
    try:
        config = AutoConfig.for_model(model_type, **kw)
    except Exception as e:  # noqa: BLE001 - transformers' validators: ValueError, TypeError, StrictDataclass*Error
        raise ModelLoadError(f"{field}: {' '.join(str(e).split())}") from None
    known = set(AutoConfig.for_model(model_type).to_dict()) | _config_names_read(config)
    unknown = sorted(k for k in arch if k != "model_type" and k not in known and k in config.to_dict())
    if unknown:
        near = sorted({m for k in unknown for m in difflib.get_close_matches(k, list(known), n=2)})
        raise ModelLoadError(f"{field}: {', '.join(unknown)}: not a field of {type(config).__name__} (transformers would "
                             "keep it unused)" + (f"; similar fields: {', '.join(near)}" if near else ""))
    return config


def _config_names_read(config) -> set[str]:
    """The config attributes the model's code reads (``config.head_dim``, ``getattr(config, "head_dim", ...)``): some
    are not fields of the config class (Qwen3-MoE's ``head_dim``), yet set the model's shape."""
    import inspect
    import re
    import sys

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    try:
        src = inspect.getsource(sys.modules[cls.__module__]) if cls is not None else ""
    except (OSError, TypeError, KeyError):
        src = ""
    return set(re.findall(r"config\.(\w+)", src)) | set(
        re.findall(r"getattr\(\s*(?:self\.)?config\s*,\s*[\'\"](\w+)[\'\"]", src))


def apply_config_overrides(config, overrides: dict[str, Any]) -> None:
    """Set ``model.config_overrides`` on a transformers config. Every key must already be a field of the
    config: transformers would silently keep a misspelt key as an unused attribute."""
    known = config.to_dict()
    unknown = sorted(k for k in overrides if k not in known)
    if unknown:
        near = sorted(k for k in known if any(part in k for u in unknown for part in u.split("_") if len(part) > 3))
        raise ModelLoadError(f"model.config_overrides: {unknown} are not fields of this {type(config).__name__}"
                         + (f" (similar fields: {near})" if near else ""))
    old_context = getattr(config, "max_position_embeddings", None)
    for key, value in overrides.items():
        if key in _SIZES and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ModelLoadError(f"model.config_overrides.{key}: {value!r}: give a whole number >= 1")
        if key == "rope_parameters":
            value = _rope_parameters(getattr(config, "rope_parameters", None), value, old_context,
                                     overrides.get("max_position_embeddings"))
        try:
            setattr(config, key, value)
        except Exception as e:  # noqa: BLE001 - transformers' validators (a StrictDataclass*Error traceback)
            raise ModelLoadError(f"model.config_overrides.{key}: {' '.join(str(e).split())}") from None
    if "rope_parameters" in overrides and hasattr(config, "validate_rope"):
        try:
            config.validate_rope()
        except (KeyError, ValueError) as e:
            said = " ".join(str(e).strip("'\"").split())
            raise ModelLoadError(f"model.config_overrides.rope_parameters: {said}") from None


# sizes a config_overrides value must give as a whole number >= 1 (max_position_embeddings: -5 was exported as it was)
_SIZES = ("max_position_embeddings", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "intermediate_size", "vocab_size", "head_dim")
# RoPE types whose frequencies depend on the context the model was pre-trained with
_ROPE_WITH_ORIGINAL_CONTEXT = ("yarn", "llama3", "longrope")


def _rope_parameters(current, given, old_context: int | None, new_context: int | None):
    """``model.config_overrides.rope_parameters`` on top of the model's own: keys given without a ``rope_type``, or with
    the model's, update its parameters (``{rope_theta: 1e6}`` raises the base and keeps the rest); another
    ``rope_type`` replaces them but for ``rope_theta`` (the base frequency every type scales) and
    ``partial_rotary_factor`` (how much of each head rotates: Pythia, Phi's architecture, not a scaling choice). A scaled type (yarn, llama3, longrope) whose ``original_max_position_embeddings`` is
    not given, next to a raised ``max_position_embeddings``, gets the model's own context there (transformers would
    take the raised one as the original and compute other frequencies)."""
    if not isinstance(given, dict):
        return given
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    known = sorted({"default", *ROPE_INIT_FUNCTIONS})
    if "rope_type" in given and given["rope_type"] not in known:  # (a KeyError traceback)
        raise ModelLoadError(f"model.config_overrides.rope_parameters.rope_type: {given['rope_type']!r} is not a RoPE "
                             f"type of transformers ({', '.join(known)})")
    factor = given.get("factor")
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1):
        # (transformers only logs it: a negative factor trained and was exported)
        raise ModelLoadError(f"model.config_overrides.rope_parameters.factor: {factor!r}: give a number >= 1 (how many "
                             "times the context grows)")
    flat = isinstance(current, dict) and "rope_type" in current  # (not per layer type, as Gemma 3's)
    if flat and given.get("rope_type", current["rope_type"]) == current["rope_type"]:
        given = {**current, **given}
    elif flat:  # another type: the base frequency and the rotating share carry over (without rope_theta, yarn's
        # frequencies were computed from None: a TypeError traceback)
        given = {**{k: current[k] for k in ("rope_theta", "partial_rotary_factor") if k in current}, **given}
    if (given.get("rope_type") in _ROPE_WITH_ORIGINAL_CONTEXT and "original_max_position_embeddings" not in given
            and old_context and new_context and new_context != old_context):
        given = {**given, "original_max_position_embeddings": old_context}
    return given
