"""Vocabulary extension for new domains and languages."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cpt.configbase import Strict


class VocabConfig(Strict):
    # a text file with one new token per line, or learn `learn_tokens` new tokens from `learn_from`
    add_tokens_file: str | None = None
    learn_from: str | None = None
    learn_tokens: int = Field(0, ge=0)
    init: Literal["mean_of_subtokens", "mean"] = "mean_of_subtokens"
    new_rows_lr_multiplier: float | None = Field(None, gt=0)
