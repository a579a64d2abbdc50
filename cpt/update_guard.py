"""Apply or skip each optimizer update: non-finite loss or gradient (and loss spikes, ``train.skip_spikes``).

A skipped update leaves weights, AdamW moments and the AdamW step count exactly as they were. How the decision
is taken decides what it costs:

* **on the device** (fused AdamW, one device or DDP, no spike guard): the all-rank "anything non-finite?" flag is
  handed to the fused kernel as its ``found_inf`` tensor, which skips the update inside the kernel (the path
  ``torch.amp.GradScaler`` uses). The host never waits for the GPU: the counters live on the device and reach
  the host only when :meth:`UpdateGuard.sync` is called (log steps, checkpoints, the end).
* **on the host** otherwise (foreach AdamW, FSDP, DeepSpeed, or a spike guard, which needs the loss value):
  one host read per step of one small tensor (the flag, with the loss and gradient norm when the spike guard
  needs them), then ``optimizer.step()`` or not (with fp16's loss scaler, a skipped step still updates the scale).

Both paths count ``nonfinite_total``/``in_a_row`` identically; the "too many in a row" stop is checked wherever
the counts are on the host: every step on the host path, at every :meth:`sync` on the device path (where the
skipped updates have not touched the weights in between).

fp16's loss scaler (``torch.amp.GradScaler``, FSDP's ``ShardedGradScaler``) overflows by design: a step whose loss
is finite but whose scaled gradients are not lowers the scale and is skipped, several times in a row at the start
of a run (the scale starts at 2^16). Such a step is a *loss-scale overflow* (``overflow_total``), not a non-finite
step: it neither counts toward nor resets ``in_a_row``. Only once the scale is at or below 1 (lowering it cannot
help any more: DeepSpeed's ``min_loss_scale`` default) does an overflow count as non-finite, so a model whose
gradients are truly broken still stops after ``max_in_a_row`` steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from cpt.distributed import Backend, backend, sum_across_ranks


@dataclass
class Outcome:
    """What happened to one step's update: ``applied`` is a bool, or a 0-d bool tensor on the device path."""

    applied: bool | torch.Tensor
    spike: bool = False

    @property
    def finite(self) -> bool | torch.Tensor:
        """Whether the step's loss counts in the logged training loss: every finite step, spikes included."""
        return True if self.spike else self.applied


def supports_device_skip(optimizer: Any) -> bool:
    """True for torch optimizers whose fused kernels honour ``found_inf`` (AdamW/Adam/SGD with ``fused=True``)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, torch.optim.Optimizer) or type(inner).__module__.startswith("deepspeed"):
        return False
    return bool(getattr(inner, "_step_supports_amp_scaling", False)) and all(
        g.get("fused") for g in inner.param_groups)


class UpdateGuard:
    """Decides and applies every update of the loop (see the module docstring)."""

    def __init__(self, acc: Any, optimizer: Any, max_in_a_row: int, spikes: Any = None,
                 say: Callable[[str], None] = print):
        self.acc, self.optimizer, self.max_in_a_row, self.spikes, self.say = acc, optimizer, max_in_a_row, spikes, say
        self.inner = getattr(optimizer, "optimizer", optimizer)
        self.on_device = (spikes is None and supports_device_skip(optimizer)
                          and backend(acc) in (Backend.SINGLE, Backend.DDP))
        scaler = getattr(optimizer, "scaler", None)  # fp16's loss scaler (accelerate's wrapper holds it), or None
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.nonfinite_total = 0
        self.overflow_total = 0  # loss-scale overflows (fp16): skipped, the scale lowered, not counted as non-finite
        self.in_a_row = 0
        self.steps_done = 0  # after the last step() call: named by sync() when a checkpoint brings the counts over
        self._dev_total = torch.zeros((), dtype=torch.int64, device=acc.device)
        self._dev_in_a_row = torch.zeros((), dtype=torch.int64, device=acc.device)
        self._dev_overflow = torch.zeros((), dtype=torch.int64, device=acc.device)

    # ------------------------------------------------------------------ per step

    def step(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int) -> Outcome:
        """Apply this step's update unless the loss or gradient is non-finite on any rank (or it is a spike).

        ``loss``: this rank's mean loss of the step (0-d tensor); ``grad_norm``: the global gradient norm
        (0-d tensor, before clipping). ``step`` (0-based) is only used in messages, which name the update as every
        other line does (1-based: "step 3" is the third update, metrics.jsonl's step 3)."""
        self.steps_done = step + 1
        loss_bad = ~torch.isfinite(loss)
        flags = torch.stack([loss_bad | ~torch.isfinite(grad_norm), loss_bad]).float()
        if self.scaler is not None:  # the scale before this step's update() lowers it: a scale <= 1 cannot help any more
            flags = torch.cat([flags, (self._scale() <= 1).float().reshape(1).to(flags.device)])
        flags = sum_across_ranks(flags, self.acc)  # all ranks take the same decision (a collective, not a host read)
        bad = flags[:1]
        if self.on_device:
            self.inner.found_inf = (bad > 0).float().reshape(())
            try:
                self.optimizer.step()
            finally:
                self.inner.found_inf = None
            b = (bad > 0).reshape(()).long()
            nonfinite = b * self._counts_as_nonfinite(flags).long() if self.scaler is not None else b
            self._dev_total += nonfinite
            self._dev_overflow += b - nonfinite
            self._dev_in_a_row.mul_(b).add_(nonfinite)  # +1 when non-finite, 0 when applied, kept on an overflow
            return Outcome(applied=(b == 0))

        if self.spikes is not None:  # one host read: the flags, the all-rank mean loss and the gradient norm
            mean_loss = self.acc.reduce(loss.detach().float().reshape(1), reduction="mean")
            values = torch.cat([flags, mean_loss, grad_norm.detach().float().reshape(1)]).tolist()
            flag_values, loss_value, norm = values[:-2], values[-2], values[-1]
        else:
            flag_values, loss_value, norm = flags.tolist(), None, None  # the one host read of a step on this path
        finite = flag_values[0] == 0
        spike = finite and self.spikes is not None and self.spikes.is_spike(loss_value, norm)
        if finite and not spike:
            self.optimizer.step()
            self.in_a_row = 0
            return Outcome(applied=True)
        scale = self._scale_value() if self.scaler is not None and not spike else None
        self._end_scaler_step()
        if spike:
            self.say(f"step {self.steps_done}: loss or gradient-norm spike (grad norm {norm:.3g}), update skipped")
            return Outcome(applied=False, spike=True)
        if scale is not None and not self._counts_as_nonfinite(flag_values):
            self.overflow_total += 1
            self.say(f"step {self.steps_done}: fp16 gradient overflow at loss scale {scale:g}, update skipped, scale lowered to "
                     f"{self._scale_value():g}")
            return Outcome(applied=False)
        self.in_a_row += 1
        self.nonfinite_total += 1
        self.say(f"step {self.steps_done}: non-finite loss or gradient, update skipped ({self.in_a_row} in a row)")
        return Outcome(applied=False)

    @staticmethod
    def _counts_as_nonfinite(flags):
        """With a loss scaler: a skipped step is non-finite when its loss is (on some rank), or when the scale was
        already <= 1; otherwise it is a loss-scale overflow. ``flags``: [bad, loss_bad, scale_floor] summed over ranks."""
        return (flags[1] > 0) | (flags[2] > 0)

    def _scale(self) -> torch.Tensor:
        """The loss scaler's current scale as a device tensor (no host read)."""
        get = getattr(self.scaler, "_get_scale_async", None)
        scale = get() if get is not None else None
        return scale if scale is not None else torch.tensor(float(self.scaler.get_scale()))

    def _scale_value(self) -> float:
        return float(self.scaler.get_scale())

    def _end_scaler_step(self) -> None:
        """fp16's loss scaler (accelerate's GradScaler, FSDP's ShardedGradScaler) after an update skipped here: its
        ``update()`` is what the skipped ``optimizer.step()`` would have called. It lowers the scale after an overflow
        (the usual fp16 skip) and ends the step, whose gradients ``clip_grad_norm`` has unscaled; without it the scale
        never came down and the next step's unscale raised "unscale_() has already been called"."""
        if self.scaler is not None:
            self.scaler.update()

    # ------------------------------------------------------------------ host view

    def sync(self, step: int) -> None:
        """Bring the device counters to the host (a host read on the device path; free otherwise)."""
        if not self.on_device:
            return
        total, in_a_row, overflow = torch.stack([self._dev_total, self._dev_in_a_row, self._dev_overflow]).tolist()
        if total > self.nonfinite_total:
            self.say(f"step {step}: {total - self.nonfinite_total} update(s) with a non-finite loss or gradient skipped "
                     f"since the last report ({in_a_row} in a row now)")
        if overflow > self.overflow_total:
            self.say(f"step {step}: {overflow - self.overflow_total} fp16 gradient overflow(s) since the last report, "
                     f"update(s) skipped; loss scale now {self._scale_value():g}")
        self.nonfinite_total, self.in_a_row, self.overflow_total = int(total), int(in_a_row), int(overflow)

    def too_many_in_a_row(self) -> bool:
        return self.in_a_row >= self.max_in_a_row

    def state_dict(self) -> dict[str, int]:
        """``nonfinite_total`` (brought to the host first on the device path: a host read)."""
        self.sync(self.steps_done)
        return {"nonfinite_total": self.nonfinite_total, "overflow_total": self.overflow_total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.nonfinite_total = int(state["nonfinite_total"])
        self.overflow_total = int(state.get("overflow_total", 0))  # (checkpoints written before it was counted)
        self.in_a_row = 0
        self._dev_total.fill_(self.nonfinite_total)
        self._dev_overflow.fill_(self.overflow_total)
        self._dev_in_a_row.zero_()

    def metrics(self) -> dict[str, float | int]:
        """A log record's counters (host values: call :meth:`sync` first); the loss scale and its overflows with fp16."""
        record: dict[str, float | int] = {"train/nonfinite_skipped": self.nonfinite_total}
        if self.scaler is not None:
            record.update({"train/overflow_skipped": self.overflow_total, "train/loss_scale": self._scale_value()})
        return record
