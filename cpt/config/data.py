"""The ``data`` section: training sources (prepared shards or a `datasets` spec) and named held-out sets
(read by cpt/data)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cpt.config.base import PathText, Strict


class SourceConfig(Strict):
    """A training source: a prepared shard directory (local or remote), or a `datasets` spec tokenized on the fly."""

    name: str
    # type "shards": a directory with manifest.json written by `cpt prepare` (local path or fsspec URL)
    # type "hf": a `datasets.load_dataset` path (hub id, local folder, or a builder name like "json")
    path: PathText
    type: Literal["shards", "hf"] = "shards"
    replay: bool = False  # old pre-training data fed back to limit forgetting
    # options for type "hf"
    hf_name: str | None = None
    data_files: PathText | list[PathText] | None = None
    split: str = "train"
    text_field: str = "text"
    streaming: bool = True
    # type "hf", a hub dataset: the commit, branch or tag to load (default: the latest). The commit it resolves to is
    # saved with the position; a --resume that resolves to another is refused (pin the checkpoint's here)
    revision: str | None = None
    # type "hf": a seeded `datasets` shuffle buffer of this many examples (0: dataset order; exact resume)
    shuffle_buffer: int = Field(0, ge=0)
    # type "hf": BOS before each document (EOS always follows); None: where the tokenizer starts its own encodings
    # with BOS (Llama 3, Gemma, Mistral), as `cpt prepare` does
    add_bos: bool | None = None

    @model_validator(mode="after")
    def _hf_options_only_for_hf(self) -> "SourceConfig":
        # (values other than the defaults: a saved config.yaml holds every field)
        given = [f for f in sorted(HF_ONLY) if getattr(self, f) != type(self).model_fields[f].default] \
            if self.type == "shards" else []
        if given:  # (a shard directory is read as `cpt prepare` wrote it: these would be ignored silently)
            raise ValueError(f"{', '.join(given)}: only for a source of type: hf, and {self.name!r} is type: shards "
                             "(set these when running cpt prepare, or use type: hf)")
        return self


HF_ONLY = {"hf_name", "data_files", "split", "text_field", "streaming", "revision", "shuffle_buffer", "add_bos"}


class HeldoutConfig(Strict):
    """A named held-out set, tagged upstream (old distribution: forgetting) or downstream (new: adaptation)."""

    name: str
    path: PathText  # a prepared shard directory (e.g. the `heldout` split written by `cpt prepare`)
    tag: Literal["upstream", "downstream"]
    max_tokens: int | None = Field(None, gt=0)  # overrides eval.tokens_per_set for this set


class RemoteConfig(Strict):
    """Reading prepared shards from remote storage (s3://, gs://, http(s)://, any fsspec URL): a transient failure (a
    reset connection, a timeout, a 5xx/408/429, a short read) is retried ``read_retries`` times, waiting
    ``retry_wait_s`` and doubling, at most ``retry_max_wait_s`` a wait (cpt/data/remote.py). Rank 0 lists each remote
    source's folder again every ``recheck_s`` seconds during the run, to stop on a shard replaced on the store."""

    read_retries: int = Field(8, ge=0)
    retry_wait_s: float = Field(1.0, ge=0)
    retry_max_wait_s: float = Field(60.0, ge=0)
    recheck_s: float = Field(600.0, ge=0)

    def worst_wait_s(self) -> float:
        """The seconds one read can spend waiting before its last retry fails (about 3 minutes with the defaults)."""
        return sum(min(self.retry_wait_s * 2**i, self.retry_max_wait_s) for i in range(self.read_retries))


class DataConfig(Strict):
    seq_len: int = Field(2048, ge=2)  # (next-token targets need 2 positions)
    sources: list[SourceConfig] = Field(min_length=1)
    heldout: list[HeldoutConfig] = Field(default_factory=list)
    # warn when a source is seen more than this many epochs (repeated data hurts; see docs)
    max_epochs_warning: float = Field(4.0, gt=0)
    # false (default): a start reads the manifests and checks file sizes (rank 0), no shard bytes, whatever the
    # corpus size; true: rank 0 also checks every file's checksum at every start (reads the whole corpus).
    # `cpt prepare` verifies what it writes; `cpt verify DIR` re-checks on demand (e.g. after an upload).
    verify_checksums: bool = False
    prefetch: bool = True  # read the next global batch in a background thread while a step runs (pinned on CUDA)
    # intra-document attention: packed documents do not attend across EOS and their positions restart
    # (training and held-out evaluation; see cpt/data/masking.py)
    document_masking: bool = False
    remote: RemoteConfig = Field(default_factory=RemoteConfig)  # retries and re-listing of remote shard sources

    @model_validator(mode="after")
    def _unique_names(self) -> "DataConfig":
        for kind, items in (("sources", self.sources), ("heldout", self.heldout)):
            names = [s.name for s in items]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"data.{kind}: duplicate names {dup}")
        return self
