"""The ``checkpoint`` and ``logging`` sections: what a run writes (resume checkpoints, HF exports, W&B, plots)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from cpt.config.base import Strict

# an HF export's largest weight file, as transformers writes it ("5GB" = 5 * 10**9 bytes, "500MB", "2GiB"; or bytes)
SHARD_SIZE = re.compile(r"^[1-9][0-9]*[KMG]i?B$")
# a hub model repository: "name" (in the token's own namespace) or "org/name"
HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


_UNITS = {"KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30}


def shard_size_bytes(size: str | int) -> int:
    """A ``max_shard_size`` (checked by :data:`SHARD_SIZE`, or bytes) in bytes, as ``save_pretrained`` is given it:
    huggingface_hub parses KB/MB/GB/TB only, so ``2GiB`` (which the docs offer) ended every export in a ValueError."""
    if isinstance(size, int):
        return size
    return int(size[:-3 if size[-2] == "i" else -2]) * _UNITS[size[-3:] if size[-2] == "i" else size[-2:]]


def check_hub_repo(repo_id: str) -> str:
    from cpt.redaction import url_credentials

    if url_credentials(repo_id) is not None:  # (not repeated: the value holds a secret, and stderr is a job's log)
        raise ValueError("a URL with credentials, not a hub repository: give it as NAME or ORG/NAME (the token through "
                         "HF_TOKEN or `hf auth login`)")
    if not HUB_REPO.match(repo_id) or "--" in repo_id or ".." in repo_id:
        # (not repeated with ':' or '@' in it: `user:password@host/...`, `org/name:TOKEN` hold a credential)
        shown = "the value (not repeated: it holds ':' or '@')" if re.search(r"[:@]", repo_id) else repr(repo_id)
        raise ValueError(f"{shown}: give a hub repository as NAME or ORG/NAME (letters, digits, '-', '_', '.')")
    return repo_id


class CheckpointConfig(Strict):
    every: int | None = Field(None, gt=0)  # resume checkpoints every N steps
    keep: int = Field(2, gt=0)
    export_every: int | None = Field(None, gt=0)  # HF exports every N steps (always at the end)
    export_at_end: bool = True
    # the dtype of the exports' weights (config.json's dtype says the same): fp32 = the trained master weights
    # exactly; bf16/fp16 = half the size, what serving usually loads (not LoRA adapters: peft's own, fp32)
    export_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    # exports larger than this are split into model-0000k-of-0000n.safetensors + model.safetensors.index.json
    max_shard_size: str | int = "5GB"
    resume: bool = False  # take the latest valid checkpoint in output_dir
    async_save: bool = True  # write in the background (one process, DDP, FSDP2 sharded, DeepSpeed ZeRO)
    max_failed_saves: int = Field(3, gt=0)  # stop the run after this many failed saves in a row
    # publish the final export (with a model card) on the Hugging Face Hub: "org/name"; the token is
    # huggingface_hub's own (HF_TOKEN or `hf auth login`), never in the config; a failed push keeps the export
    push_to_hub: str | None = None
    hub_private: bool = True  # a repository the push creates is private unless this is false
    hub_revision: str | None = None  # a branch to push to (created if needed); None: main

    @field_validator("push_to_hub")
    @classmethod
    def _hub_repo(cls, v: str | None) -> str | None:
        return v if v is None else check_hub_repo(v)

    @model_validator(mode="after")
    def _pushed_export(self) -> "CheckpointConfig":
        if self.push_to_hub and not self.export_at_end:
            raise ValueError("push_to_hub: the final export is what is pushed; it needs export_at_end: true")
        given = [f for f, on in (("hub_private: false", not self.hub_private), ("hub_revision", self.hub_revision)) if on]
        if given and not self.push_to_hub:  # (accepted, and nothing was pushed)
            raise ValueError(f"{', '.join(given)}: set with no push_to_hub (nothing is pushed without it)")
        return self

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, v: str | int) -> str | int:
        if isinstance(v, int) and not isinstance(v, bool) and v > 0 or isinstance(v, str) and SHARD_SIZE.match(v):
            return v
        raise ValueError(f"{v!r}: give a size such as 5GB, 500MB or 2GiB (or a number of bytes)")


class WandbConfig(Strict):
    enabled: bool = False
    project: str = "cpt"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = Field(default_factory=list)
    mode: Literal["online", "offline", "disabled"] | None = None  # None: wandb's default / WANDB_MODE
    log_exports_as_artifacts: bool = False


class LoggingConfig(Strict):
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    plot: bool = True  # write plots (PNG) at the end of the run
