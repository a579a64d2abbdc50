"""Loss-spike guard (``train.skip_spikes``): skip the update of a step whose loss or gradient norm is far above
the recent ones, as OLMo 2's skip-step optimizer does.

A step is a spike when, with at least ``min_history`` earlier steps in the rolling window of the last ``window``
steps, its loss or its (pre-clipping) gradient norm exceeds ``mean + sigma * std`` of that window. Every step's
values enter the window, spikes included, so a lasting level shift (a harder data mix) is absorbed after a few
steps instead of blocking training. The window is cleared at each stage switch, where CPT *expects* the loss to
jump (new data, re-warmed LR), and at most ``max_in_a_row`` consecutive steps are skipped.

Pure and deterministic: the loop passes the global (all-rank mean) loss and the global gradient norm, so every
rank takes the same decision; the window is part of the resume state.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from cpt.distributed import Backend, LaunchError, backend


class SpikeGuard:
    # switched on by a --resume (--allow-config-change) of a run without it: its window starts empty there, as at a
    # stage switch, instead of the resume being refused (cpt/state.py: restore)
    missing_ok = True

    @classmethod
    def for_run(cls, cfg, acc) -> "SpikeGuard | None":
        """The guard of a run (``train.skip_spikes``; None when off). Refused under DeepSpeed, whose engine applies
        the update inside the last backward pass, before the step's loss is known."""
        if cfg.train.skip_spikes is None:
            return None
        if backend(acc) is Backend.DEEPSPEED:
            raise LaunchError("train.skip_spikes is not supported under DeepSpeed: its engine applies the update inside "
                              "the last backward pass, before the step's loss is known; use DDP or FSDP")
        return cls(**cfg.train.skip_spikes.model_dump())

    def __init__(self, sigma: float = 6.0, window: int = 128, min_history: int | None = None, max_in_a_row: int = 8):
        if sigma <= 0 or window < 2 or max_in_a_row < 1:
            raise ValueError("skip_spikes: sigma > 0, window >= 2 and max_in_a_row >= 1 are required")
        self.sigma, self.window, self.max_in_a_row = float(sigma), int(window), int(max_in_a_row)
        self.min_history = int(min_history) if min_history is not None else max(2, window // 2)
        if not 2 <= self.min_history <= self.window:
            raise ValueError(f"skip_spikes: min_history must be in [2, window], got {self.min_history}")
        self.losses: deque[float] = deque(maxlen=self.window)
        self.grad_norms: deque[float] = deque(maxlen=self.window)
        self.in_a_row = 0
        self.skipped = 0  # spikes found over the whole run (kept by reset())

    def _above(self, history: deque[float], value: float) -> bool:
        n = len(history)
        mean = sum(history) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in history) / (n - 1))
        return value > mean + self.sigma * std

    def is_spike(self, loss: float, grad_norm: float) -> bool:
        """Decide for this step, then record its values. Non-finite values are not this guard's business
        (the loop skips those separately) and are neither judged nor recorded."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return False
        spike = len(self.losses) >= self.min_history and (
            self._above(self.losses, loss) or self._above(self.grad_norms, grad_norm))
        if spike and self.in_a_row >= self.max_in_a_row:
            spike = False  # a new normal, not a spike: let it through
        self.in_a_row = self.in_a_row + 1 if spike else 0
        self.skipped += int(spike)
        self.losses.append(float(loss))
        self.grad_norms.append(float(grad_norm))
        return spike

    def reset(self) -> None:
        """Forget the history (stage switch: the loss is expected to move)."""
        self.losses.clear()
        self.grad_norms.clear()
        self.in_a_row = 0

    def restart(self, model=None) -> None:
        """A guard with no history and no spike counted (an anneal branch turning it on; ``model`` unused)."""
        self.reset()
        self.skipped = 0

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms), "in_a_row": self.in_a_row,
                "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        self.losses.extend(float(x) for x in state.get("losses", []))
        self.grad_norms.extend(float(x) for x in state.get("grad_norms", []))
        self.in_a_row = int(state.get("in_a_row", 0))
        self.skipped = int(state.get("skipped", 0))
