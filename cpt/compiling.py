"""``model.compile``: torch.compile of the whole model (``true``) or of each repeated transformer block
(``regional``, the PyTorch "regional compilation" recipe and torchtitan's per-block compile).

Whole-model compile traces every decoder layer into one graph, so its start-up cost grows with the depth (about 60 s
for a 16-layer 1.2B Llama on an H200 before the first step). Regional compile compiles the decoder layers in place
(``nn.Module.compile``): dynamo traces one layer once and every other layer reuses that code (with
``inline_inbuilt_nn_modules``, the default in recent torch, a layer's parameters are graph inputs, not constants, so
there is no recompile per layer); the embedding, the final norm and the output head (which the chunked loss patches)
stay eager.

In-place compile leaves the module tree as it is: the model keeps its class and its ``state_dict`` keys (no
``_orig_mod.`` prefix), so checkpoints and exports are the same with and without it; hooks added later (FSDP2's
``fully_shard``, accelerate's) stay on the call path, as in accelerate's own ``compile_regions_fsdp2``; peft's LoRA
layers sit inside the blocks and are compiled with them; transformers' gradient checkpointing of a layer's
``forward`` is traced by dynamo as a checkpointed region.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from cpt.config import ConfigError

CompileMode = bool | Literal["regional"]
COMPILE_PREFIX = "_orig_mod."  # torch.compile's wrapper (OptimizedModule) holds the model as its `_orig_mod` child


class CompileError(ConfigError):
    """``model.compile: regional`` on a model without repeated blocks (`cpt train` prints it as one line)."""


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated transformer blocks (its decoder layers), outermost only, in module order.

    The blocks are the modules whose class transformers names in ``_no_split_modules`` (the units it never splits
    across devices: the decoder layer of every causal LM), looked up through wrappers (peft, DDP) by walking the
    module tree; without such a declaration, the children of the longest ``nn.ModuleList`` whose children all share
    one class (the ``layers`` list). Empty if neither exists."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(type(m), "_no_split_modules", None) or ())
    blocks = _outermost(model, lambda m: type(m).__name__ in names) if names else []
    if blocks:
        return blocks
    lists = [m for m in model.modules()
             if isinstance(m, nn.ModuleList) and len(m) and all(type(c) is type(m[0]) for c in m)]
    return list(max(lists, key=len)) if lists else []


def _outermost(model: nn.Module, is_block) -> list[nn.Module]:
    """Modules for which ``is_block`` holds and that lie inside no other such module."""
    found: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if is_block(m) and not any(name.startswith(f"{outer}.") for outer, _ in found):
            found.append((name, m))
    return [m for _, m in found]


def compile_model(model: nn.Module, mode: CompileMode, log=None, **compile_kwargs) -> nn.Module:
    """The model to train under ``model.compile``: ``False`` the model itself; ``True`` ``torch.compile(model)``;
    ``"regional"`` the model itself with each repeated block compiled in place (:func:`repeated_blocks`), reported
    through ``log``. ``compile_kwargs`` go to ``torch.compile`` (e.g. ``backend="aot_eager"`` in tests)."""
    if mode is False:
        return model
    if mode is True:
        return torch.compile(model, **compile_kwargs)
    if mode != "regional":
        raise CompileError(f"model.compile must be true, false or regional, not {mode!r}")
    blocks = repeated_blocks(model)
    if not blocks:
        raise CompileError(f"model.compile=regional: no repeated blocks (decoder layers) found in "
                           f"{type(model).__name__}; use model.compile=true to compile the whole model")
    for block in blocks:
        block.compile(**compile_kwargs)
    if log is not None:
        kinds = sorted({type(b).__name__ for b in blocks})
        log(f"model.compile=regional: {len(blocks)} blocks ({', '.join(kinds)}) compiled in place, the rest eager")
    return model


def compiled_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules compiled in place (``nn.Module.compile``) inside ``model``."""
    return [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]


def without_compile_prefix(state: dict) -> dict:
    """``state`` keyed as the plain model's ``state_dict``: the keys a whole-model compile (``model.compile: true``,
    torch.compile's wrapper) writes start with ``_orig_mod.``, those of eager and regional runs do not."""
    return {k[len(COMPILE_PREFIX):] if k.startswith(COMPILE_PREFIX) else k: v for k, v in state.items()}
