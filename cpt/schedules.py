"""Learning-rate schedules as pure functions of the optimizer step, composed into a stage plan.

(First version: cosine with warmup. The full set — WSD, inverse-sqrt, linear, infinite with
anneal branches, re-warm from the previous stage — is built on the same interface.)
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from cpt.configbase import Strict


class ScheduleConfig(Strict):
    type: Literal["constant", "cosine", "linear", "wsd", "inverse_sqrt", "infinite"] = "cosine"
    max_lr: float = Field(3e-4, gt=0)
    min_lr: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    # where the warmup starts: a number, or "previous" = the previous stage's final LR (re-warm)
    warmup_from: float | Literal["previous"] = 0.0


class LRPlan:
    """The LR of every optimizer step of a multi-stage run: ``plan.lr(step)``."""

    def __init__(self, stages: list[tuple[int, ScheduleConfig]]):
        self.stages = stages
        self.starts = []
        t = 0
        for steps, _ in stages:
            self.starts.append(t)
            t += steps
        self.total_steps = t

    def stage_index(self, step: int) -> int:
        for i in reversed(range(len(self.starts))):
            if step >= self.starts[i]:
                return i
        return 0

    def lr(self, step: int) -> float:
        i = self.stage_index(step)
        steps, cfg = self.stages[i]
        s = step - self.starts[i]
        start = cfg.warmup_from
        if start == "previous":
            start = self.lr(self.starts[i] - 1) if i > 0 else 0.0
        if s < cfg.warmup_steps:
            return start + (cfg.max_lr - start) * (s + 1) / cfg.warmup_steps
        if cfg.type == "constant":
            return cfg.max_lr
        frac = (s - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps - 1)
        frac = min(1.0, frac)
        return cfg.min_lr + 0.5 * (cfg.max_lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))
