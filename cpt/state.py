"""Everything a run resumes goes through one protocol and one registry.

A resumable component implements :class:`Stateful` (``state_dict()`` / ``load_state_dict()``, torch-style) and the
loop registers it under a name: ``{"train": TrainState, "data": ..., "evaluator": ..., "ema": ...}``. A checkpoint
holds each registered component under its name (see :func:`flatten` / :func:`restore`, used by
``cpt.checkpoint.CheckpointManager``):

* the top-level values of its state dict that are tensors go to the checkpoint's safetensors file as ``<name>.<key>``;
* everything else goes to ``trainer_state.json`` under ``<name>`` (JSON: numbers, strings, lists, dicts).

Loading hands each component exactly what it saved (its JSON part and its own tensors, the prefix removed). A
registered component with no entry in the checkpoint is an error naming it: it would otherwise start afresh
silently (an EMA from the current weights, a data stream from its beginning), unless the component says it may
start afresh (``missing_ok = True``: the open log window, cosmetic, absent from older checkpoints; the lm-eval tracker
and the spike guard, which a resume may switch on). A component's own
``load_state_dict`` checks that the state fits it (the data loader: the same data; EMA: the same parameters).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Protocol, runtime_checkable

import torch

FORMAT = 2  # trainer_state.json: {"format": 2, "<name>": {...}, ...}; 1 (no "format" key): the flat layout before the registry


class StateError(ValueError):
    """A checkpoint's state does not fit the registered components (missing, older layout, or refused by one)."""


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """The loop's own counters: optimizer steps done, tokens trained on (global), and the trunk step an anneal
    branch started at (``train.anneal_steps``; None otherwise)."""

    step: int = 0
    tokens: int = 0
    anneal_from: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.anneal_from = None if state.get("anneal_from") is None else int(state["anneal_from"])


def _check_names(components: Mapping[str, Stateful]) -> None:
    for name, c in components.items():
        if not name or "." in name or name == "format":
            raise ValueError(f"state registry: {name!r} is not a usable component name (non-empty, no '.', not 'format')")
        if not isinstance(c, Stateful):
            raise TypeError(f"state registry: {name!r} ({type(c).__name__}) has no state_dict()/load_state_dict()")


def flatten(components: Mapping[str, Stateful]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(the JSON part: ``{"format": 2, name: non-tensor state}``, the tensors: ``{"<name>.<key>": tensor}``)."""
    _check_names(components)
    doc: dict[str, Any] = {"format": FORMAT}
    tensors: dict[str, torch.Tensor] = {}
    for name, c in components.items():
        sd = c.state_dict()
        doc[name] = {k: v for k, v in sd.items() if not isinstance(v, torch.Tensor)}
        tensors.update({f"{name}.{k}": v for k, v in sd.items() if isinstance(v, torch.Tensor)})
    return doc, tensors


def check_format(doc: Mapping[str, Any]) -> None:
    """StateError unless ``doc`` (a trainer_state.json) is in this registry's layout."""
    if doc.get("format") != FORMAT:
        raise StateError(
            f"its trainer_state.json is in the layout of an older cpt (format {doc.get('format', 1)}, this cpt reads "
            f"{FORMAT}): it cannot be resumed from. Its weights still load: `cpt export` it, or start a new stage "
            "from it with train.init_from")


def restore(components: Mapping[str, Stateful], doc: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Load every registered component from a checkpoint's JSON part and tensors (components the checkpoint holds
    but nobody registered are ignored)."""
    _check_names(components)
    check_format(doc)
    missing = [n for n, c in components.items() if n not in doc and not getattr(c, "missing_ok", False)]
    if missing:
        raise StateError(
            f"it holds no state for {', '.join(repr(n) for n in missing)} (it was written with that switched off or "
            "absent): resume with the settings it was written with, or start a new stage from it with train.init_from")
    for name, c in components.items():
        if name not in doc:  # (missing_ok)
            continue
        prefix = name + "."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            c.load_state_dict({**doc[name], **own})
        except (ValueError, KeyError, TypeError) as e:
            reason = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise StateError(f"its {name!r} state does not fit this run: {reason}") from e


def state_dict_mismatch(e: RuntimeError) -> str:
    """torch's load_state_dict error (weights that do not fit a model) in a few words: how many keys are missing /
    unexpected / of another shape, and the first of each."""
    text, parts = str(e), []
    for label, head in (("missing", "Missing key(s)"), ("unexpected", "Unexpected key(s)")):
        keys = re.findall(r'"([^"]+)"', next((line for line in text.splitlines() if head in line), ""))
        if keys:
            parts.append(f"{len(keys)} {label} key(s), e.g. {keys[0]}")
    shapes = re.findall(r"size mismatch for ([^:]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                        r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)", text)
    if shapes:
        name, saved, current = shapes[0]
        parts.append(f"{len(shapes)} of another shape, e.g. {name}: {saved} in the checkpoint, {current} in the model")
    return "; ".join(parts) or text.splitlines()[0]


def json_default(obj):
    """``json.dumps``'s ``default`` for a component's JSON part: NumPy and torch numbers and arrays as numbers and lists."""
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable in trainer state: {type(obj)}")
