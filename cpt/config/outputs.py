"""The ``checkpoint`` and ``logging`` sections: what a run writes (resume checkpoints, HF exports, W&B, plots)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cpt.config.base import Strict


class CheckpointConfig(Strict):
    every: int | None = Field(None, gt=0)  # resume checkpoints every N steps
    keep: int = Field(2, gt=0)
    export_every: int | None = Field(None, gt=0)  # HF exports every N steps (always at the end)
    export_at_end: bool = True
    resume: bool = False  # take the latest valid checkpoint in output_dir
    async_save: bool = True  # write in the background (one process, DDP, FSDP2 sharded; DeepSpeed saves synchronously)
    max_failed_saves: int = Field(3, gt=0)  # stop the run after this many failed saves in a row


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
