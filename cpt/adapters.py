"""LoRA (peft) and partial-parameter training (layer freezing) for continual pre-training."""

from __future__ import annotations

from pydantic import Field

from cpt.configbase import Strict


class LoraConfig(Strict):
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # "all-linear" (peft's shortcut) or a list of module names
    target_modules: str | list[str] = "all-linear"
    # modules trained in full next to the adapter, e.g. [embed_tokens, lm_head] for new tokens
    modules_to_save: list[str] = Field(default_factory=list)


class FreezeConfig(Strict):
    # freeze decoder layers with index in [start, end) ("0-6"), or "bottom_half" (HFT-style)
    layers: str | None = None
    # freeze parameters whose name matches any of these regexes
    patterns: list[str] = Field(default_factory=list)
