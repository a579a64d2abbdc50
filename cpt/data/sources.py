"""Config of data sources (training corpora) and held-out evaluation sets."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cpt.configbase import Strict


class SourceConfig(Strict):
    """A training source: a prepared shard directory (local or remote), or a `datasets` spec tokenized on the fly."""

    name: str
    # type "shards": a directory with manifest.json written by `cpt prepare` (local path or fsspec URL)
    # type "hf": a `datasets.load_dataset` path (hub id, local folder, or a builder name like "json")
    path: str
    type: Literal["shards", "hf"] = "shards"
    replay: bool = False  # old pre-training data fed back to limit forgetting
    # options for type "hf"
    hf_name: str | None = None
    data_files: str | list[str] | None = None
    split: str = "train"
    text_field: str = "text"
    streaming: bool = True
    # type "hf": a seeded `datasets` shuffle buffer of this many examples (0: dataset order; exact resume)
    shuffle_buffer: int = Field(0, ge=0)


class HeldoutConfig(Strict):
    """A named held-out set, tagged upstream (old distribution: forgetting) or downstream (new: adaptation)."""

    name: str
    path: str  # a prepared shard directory (e.g. the `heldout` split written by `cpt prepare`)
    tag: Literal["upstream", "downstream"]
    max_tokens: int | None = Field(None, gt=0)  # overrides eval.tokens_per_set for this set
