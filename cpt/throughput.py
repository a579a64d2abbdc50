"""Throughput and compute accounting: what a run's training speed and cost are.

* :class:`Throughput` (tokens/s over a sliding window, total and per device) and :class:`TrainClock` (its training
  wall time without a host sync per step): the loop's ``perf/*`` metrics;
* :func:`model_flops_per_token` and :func:`mfu` over :func:`peak_flops_for` a device (:data:`PEAK_BF16_FLOPS`):
  model FLOPs utilisation, following the llm-foundry convention (see :func:`model_flops_per_token`);
* :class:`ComputeAccount`: a run's training FLOPs, wall and device hours, carried across resumes (``compute/*``),
  and :func:`format_compute`, its line at the end of a run;
* :func:`peak_memory_gb`: peak device (or host) memory.

The records themselves are written by cpt/metrics.py.
"""

from __future__ import annotations

import re
import resource
import sys
import time
from collections import deque
from typing import Any


class Throughput:
    """Tokens per second over a sliding window of the last ``window`` updates.

    ``update(tokens, seconds)``: ``tokens`` processed by all ranks together in ``seconds`` of wall time.
    """

    def __init__(self, num_devices: int = 1, window: int = 20):
        if num_devices <= 0 or window <= 0:
            raise ValueError("num_devices and window must be positive")
        self.num_devices = num_devices
        self._window: deque[tuple[float, float]] = deque(maxlen=window)

    def update(self, tokens: int | float, seconds: float) -> None:
        if seconds < 0 or tokens < 0:
            raise ValueError("tokens and seconds must not be negative")
        self._window.append((float(tokens), float(seconds)))

    @property
    def tokens_per_s(self) -> float:
        secs = sum(s for _, s in self._window)
        return sum(t for t, _ in self._window) / secs if secs > 0 else 0.0

    @property
    def tokens_per_s_per_device(self) -> float:
        return self.tokens_per_s / self.num_devices

    def metrics(self, flops_per_token: float | None = None, peak_flops: float | None = None) -> dict[str, float]:
        """``perf/tokens_per_s``, ``perf/tokens_per_s_per_device`` and, when both FLOPs numbers are
        known, ``perf/tflops_per_device`` and ``perf/mfu``."""
        out = {"perf/tokens_per_s": self.tokens_per_s, "perf/tokens_per_s_per_device": self.tokens_per_s_per_device}
        if flops_per_token:
            out["perf/tflops_per_device"] = self.tokens_per_s_per_device * flops_per_token / 1e12
            if peak_flops:
                out["perf/mfu"] = mfu(self.tokens_per_s_per_device, flops_per_token, peak_flops)
        return out


class TrainClock:
    """Training wall time for :class:`Throughput` without a host sync per step.

    On a GPU the host queues steps ahead of the device, so the time of one step is only known at a host sync.
    The loop calls :meth:`add` per step, :meth:`lap` right after a host sync (a log step), and around work that
    is not training (evaluation, checkpoints) ``lap(sync_device=True)`` before and :meth:`restart` after."""

    def __init__(self, meter: Throughput, clock=time.perf_counter):
        self.meter, self._clock = meter, clock
        self.tokens = 0
        self.start = clock()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def lap(self, sync_device: bool = False) -> None:
        """Credit the tokens since the last lap to the meter, with the time since then."""
        if sync_device:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
        now = self._clock()
        if self.tokens:
            self.meter.update(self.tokens, max(now - self.start, 0.0))
        self.tokens, self.start = 0, now

    def restart(self) -> None:
        """Start timing again (after evaluation or a checkpoint, which do not count as training time)."""
        self.start = self._clock()


class ComputeAccount:
    """What a run has cost so far, carried across resumes (papers.md: report compute next to quality).

    * ``compute/flops``: training FLOPs, tokens x FLOPs per token (the MFU convention; evaluation not counted);
    * ``compute/wall_hours``: wall-clock hours of the run's processes, start-up, evaluation and checkpoints included;
    * ``compute/device_hours``: the same times the number of devices (GPU-hours), segment by segment, so a run
      resumed on a different number of GPUs is charged correctly.

    After a crash the time between the last checkpoint and the crash is not in the restored totals (the work
    it paid for was lost too; the next segment pays for it again).
    """

    def __init__(self, num_devices: int = 1, clock=time.monotonic):
        if num_devices <= 0:
            raise ValueError("num_devices must be positive")
        self.num_devices = num_devices
        self._clock = clock
        self._start = clock()
        self._prior_wall_s = 0.0
        self._prior_device_s = 0.0

    def state_dict(self) -> dict[str, float]:
        """Totals so far, in seconds (one clock reading)."""
        elapsed = self._clock() - self._start
        return {"wall_s": self._prior_wall_s + elapsed, "device_s": self._prior_device_s + elapsed * self.num_devices}

    def metrics(self, tokens: int | float, flops_per_token: float | None = None) -> dict[str, float]:
        now = self.state_dict()
        out = {"compute/wall_hours": now["wall_s"] / 3600, "compute/device_hours": now["device_s"] / 3600}
        if flops_per_token:
            out["compute/flops"] = float(tokens) * flops_per_token
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Totals from an earlier segment; this process's own time (since it started) is added on top."""
        self._prior_wall_s = float(state.get("wall_s", 0.0))
        self._prior_device_s = float(state.get("device_s", 0.0))


def format_compute(m: dict[str, float], num_devices: int) -> str:
    """One line for the end of a run: FLOPs, device-hours, wall hours."""
    flops = f"{m['compute/flops']:.3g} training FLOPs, " if "compute/flops" in m else ""
    wall, device = m["compute/wall_hours"], m["compute/device_hours"]
    where = f"on {num_devices} device{'s' if num_devices > 1 else ''}"
    if abs(device - wall * num_devices) > 1e-6 * max(device, 1e-12):  # resumed on another number of devices
        where += " in this segment, other numbers before"
    return f"compute: {flops}{device:.3g} device-hours ({wall:.3g} h wall {where})"


def model_flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int,
                          n_trainable: int | None = None) -> float:
    """Training FLOPs per token, llm-foundry convention (forward + backward = 3 x forward) for full training:

        flops_per_token = 6 * n_params + 12 * n_layers * hidden * seq_len

    6N: 2 FLOPs per parameter per token in the forward matmuls, 2 more in the backward for the gradient wrt the
    activations and 2 for the gradient wrt the weights. 12 * n_layers * hidden * seq_len: the attention score and
    value matmuls (QK^T and AV, each 2 * hidden * seq_len FLOPs per token and layer in the forward pass), 3x for the
    backward, counted without the causal-mask halving (as llm-foundry does). ``n_params`` is every parameter the
    forward pass multiplies with (llm-foundry counts all of them, embeddings included).

    ``n_trainable`` (LoRA, frozen layers): only trainable weights get the weight-gradient matmuls, so the count is
    ``4 * n_params + 2 * n_trainable`` (+ attention): about 4N for LoRA, where 6N would overstate the work by half.
    (Still an upper bound when the lowest layers are frozen: no backward runs below the lowest trainable one.)
    """
    weight_grads = n_params if n_trainable is None else min(n_trainable, n_params)
    return 4.0 * n_params + 2.0 * weight_grads + 12.0 * n_layers * hidden * seq_len



def shape_flops_per_token(shape: dict[str, int], seq_len: int) -> float:
    """:func:`model_flops_per_token` of a :func:`cpt.model.model_shape`: with the parameters a token passes through
    (a mixture of experts counts its routed experts by top-k / E, as MoE MFU is reported), trainable ones too."""
    return model_flops_per_token(shape.get("n_params_active", shape["n_params"]), shape["n_layers"], shape["hidden"],
                                 seq_len, shape.get("n_trainable_active", shape["n_trainable"]))


# bf16 dense peak FLOP/s per device (no sparsity), from the vendors' data sheets
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("h200 nvl", 835e12),  # (the NVL cards: 1,671 TFLOP/s with 2:4 sparsity, half that dense)
    ("h100 nvl", 835e12),
    ("h200", 989e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM / HBM3
    ("a100", 312e12),
    ("a10g", 125e12),
    ("l40s", 362e12),
    ("l40", 181e12),
    ("l4", 121e12),
    ("rtx 4090", 165e12),
]


def device_name(device) -> str:
    """The name :func:`peak_flops_for` looks up: the CUDA device's name, else the device type ("cpu", ...)."""
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def peak_flops_for(device_name: str | None = None) -> float | None:
    """Peak dense bf16 FLOP/s for a device name (e.g. ``torch.cuda.get_device_name()``); None when
    unknown or a CPU. Without a name, the current CUDA device's name is used (None without CUDA).
    Override with ``train.peak_flops`` for devices not in :data:`PEAK_BF16_FLOPS`."""
    if device_name is None:
        try:
            import torch

            if not torch.cuda.is_available():
                return None
            device_name = torch.cuda.get_device_name()
        except Exception:  # pragma: no cover
            return None
    name = " ".join(device_name.lower().replace("nvidia", " ").replace("geforce", " ").split())
    if "cpu" in name.split():
        return None
    for key, flops in PEAK_BF16_FLOPS:
        if key == "l4":  # not L40/L40S (matched above)
            if re.search(r"\bl4\b", name):
                return flops
        elif key == "h100 pcie":
            if "h100" in name and "pcie" in name:
                return flops
        elif key in name:
            return flops
    return None


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s per device over the device's peak. None
    without a peak (e.g. CPU)."""
    if not peak_flops:
        return None
    return tokens_per_s_per_device * flops_per_token / peak_flops


def peak_memory_gb() -> float:
    """Peak memory in GB (1e9 bytes): CUDA ``max_memory_allocated`` of the current device when CUDA is
    in use, else the process's peak resident set size (host memory)."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda.max_memory_allocated() / 1e9
    except Exception:  # pragma: no cover
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss * (1 if sys.platform == "darwin" else 1024) / 1e9
