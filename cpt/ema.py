"""The EMA of the weights during training (``train.ema_decay``): ``shadow = decay * shadow + (1 - decay) * param``
after every optimizer step, in fp32, over the trainable parameters only (with LoRA: the adapter).
``with ema.swapped(model): evaluate(model)`` evaluates or exports the averaged weights and restores the live ones
afterwards; :func:`load_ema_weights` puts a checkpoint's EMA into a model (`cpt export --ema`). Averaging finished
models (`cpt average`, `cpt interpolate`) is cpt/averaging.py."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from cpt.distributed import refuse_sharded, unwrap


EMA_ADVICE = ("use ZeRO-1/2, DDP or one device for train.ema_decay, or turn the EMA off (--set train.ema_decay=null "
              "--set eval.ema=false: configs/full-cpt.yaml sets both) and average exports afterwards (cpt average)")


class EMA:
    """Exponential moving average of a model's trainable parameters (fp32 shadow copies).

    Call :meth:`update` after every ``optimizer.step()``. ``warmup=True`` uses the decay
    ``min(decay, (1 + n) / (10 + n))`` at update ``n`` (the EMA does not remember the random start for long).
    Supported on one device, DDP and ZeRO-1/2; ZeRO-3 and sharded FSDP (placeholders / DTensor shards instead
    of the weights) are refused with an error at construction or at the first :meth:`update`.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.warmup, self.num_updates = float(decay), bool(warmup), 0
        params = [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]
        refuse_sharded(params, "EMA", EMA_ADVICE)
        self.shadow: dict[str, torch.Tensor] = {n: p.detach().float().clone() for n, p in params}
        if not self.shadow:
            raise ValueError("EMA: the model has no trainable parameters")

    def restart(self, model: nn.Module) -> None:  # at model's weights: an anneal branch switching on an EMA (cpt/resume.py)
        self.shadow, self.num_updates = {n: p.detach().float().clone() for n, p in self._params(model)}, 0

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    def _params(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        params = dict(unwrap(model).named_parameters())
        missing = [n for n in self.shadow if n not in params]
        if missing:
            raise KeyError(f"EMA: the model has no parameters named {missing[:5]}{'...' if len(missing) > 5 else ''}")
        for n in self.shadow:
            yield n, params[n]

    @torch.no_grad()
    def update(self, model: nn.Module, applied: bool | torch.Tensor = True) -> None:
        """Move the average towards the weights after an optimizer step. ``applied``: whether the step updated
        the weights (False: nothing to do); a 0-d bool tensor when that is only known on the device (the
        update is then masked there, with no host sync, and counts towards the warmup either way)."""
        if applied is False:
            return
        d = self.current_decay()
        if self.num_updates == 0:  # parameters may have been partitioned by accelerate.prepare since __init__
            refuse_sharded(self._params(model), "EMA", EMA_ADVICE)
        for n, p in self._params(model):
            s = self.shadow[n]
            if s.device != p.device:
                self.shadow[n] = s = s.to(p.device)
            if applied is True:
                s.lerp_(p.detach().float(), 1.0 - d)  # s = d * s + (1 - d) * p
            else:
                s.lerp_(p.detach().float(), applied.to(s.dtype) * (1.0 - d))
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the EMA weights into ``model`` (cast to each parameter's dtype)."""
        for n, p in self._params(model):
            p.copy_(self.shadow[n].to(device=p.device, dtype=p.dtype))

    @contextlib.contextmanager
    def swapped(self, model: nn.Module):
        """Temporarily load the EMA weights (for evaluation or export); the live weights come back afterwards,
        also when the body raises."""
        backup = {n: p.detach().clone() for n, p in self._params(model)}
        try:
            self.copy_to(model)
            yield model
        finally:
            with torch.no_grad():
                for n, p in self._params(model):
                    p.copy_(backup[n])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A flat dict of tensors (safetensors-ready): ``shadow.<param name>`` plus ``decay``, ``warmup`` and
        ``num_updates`` as 0-d tensors."""
        sd = {f"shadow.{n}": t.detach().cpu().clone() for n, t in self.shadow.items()}
        sd["decay"] = torch.tensor(self.decay, dtype=torch.float64)
        sd["warmup"] = torch.tensor(int(self.warmup), dtype=torch.int64)
        sd["num_updates"] = torch.tensor(self.num_updates, dtype=torch.int64)
        return sd

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        shadow = {k[len("shadow."):]: v for k, v in state.items() if k.startswith("shadow.")}
        keys, mine = set(shadow), set(self.shadow)
        if keys != mine or "num_updates" not in state:
            raise KeyError(f"EMA state does not match the model: missing {sorted(mine - keys)[:5]}, "
                           f"unexpected {sorted(keys - mine)[:5]}")
        self.warmup, self.num_updates = bool(int(state.get("warmup", torch.tensor(0)))), int(state["num_updates"])
        # (not the decay: a setting, train.ema_decay, the resuming run's; the checkpoint's replaced a changed one silently)
        for n, t in shadow.items():
            self.shadow[n] = t.detach().float().to(self.shadow[n].device).clone()

    def save(self, path: str | Path) -> None:
        """Write :meth:`state_dict` as a safetensors file."""
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path))

    def load(self, path: str | Path) -> None:
        from safetensors.torch import load_file

        self.load_state_dict(state := load_file(str(path)))
        self.decay = float(state["decay"])  # a saved EMA file's own decay (a resume keeps train.ema_decay's)


def load_ema_weights(state_file: Path, model: nn.Module, decay: float | None) -> None:
    """Put a checkpoint's EMA of the trainable weights (the ``ema`` component of its state.safetensors) into
    ``model``, built as its run built it, in place of the trained weights: what `cpt export --ema` writes, the run's
    ``export-ema/`` at any checkpoint. ValueError when the run kept no EMA or it is not of the model's trainable
    parameters."""
    from safetensors.torch import load_file

    saved = load_file(str(state_file)) if state_file.is_file() else {}
    state = {k[len("ema."):]: v for k, v in saved.items() if k.startswith("ema.")}
    if not state or decay is None:
        raise ValueError("its run kept no EMA of the weights (train.ema_decay)")
    average = EMA(model, decay)
    try:
        average.load_state_dict(state)
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    with torch.no_grad():
        average.copy_to(model)
