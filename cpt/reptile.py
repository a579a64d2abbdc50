"""Reptile meta-updates over replay-mixed batches: the gradient alignment of meta-experience replay (MER).

MER (Riemer et al., 2019) combines experience replay with the Reptile meta-update, which favours updates on
which old and new examples agree (aligned gradients) instead of ones that trade one for the other. "Revisiting
Replay and Gradient Alignment for Continual Pre-Training of LLMs" (Abbes et al., 2025) makes it cheap enough
for LLM pre-training: train normally on batches that mix replay and new data, and every ``k`` optimizer steps
pull the weights back toward where they were ``k`` steps earlier::

    anchor <- weights at the last meta-update
    every k steps:  weights <- anchor + epsilon * (weights - anchor);  anchor <- weights

``epsilon = 1`` is plain training; smaller values take a shorter step along the direction the last ``k`` steps
agreed on. The cost is one fp32 copy of the trainable parameters (the adapter only, with LoRA) and one
element-wise update every ``k`` steps. The optimizer state is kept.

Supported on one device and DDP (every rank holds the same full weights). Refused under DeepSpeed (the update
would be overwritten from its own fp32 master partitions) and under sharded FSDP (per-rank anchors would need
per-rank checkpoint files).
"""

from __future__ import annotations

import torch
from torch import nn

from cpt.distributed import Backend, LaunchError, backend, refuse_sharded, unwrap


class Reptile:
    """``every`` optimizer steps: ``weights <- anchor + epsilon * (weights - anchor)``, then ``anchor <- weights``."""

    def __init__(self, model: nn.Module, every: int, epsilon: float):
        if every < 1:
            raise ValueError(f"reptile: every must be >= 1, got {every}")
        if not 0.0 < epsilon <= 1.0:
            raise ValueError(f"reptile: epsilon must be in (0, 1], got {epsilon}")
        self.every, self.epsilon = int(every), float(epsilon)
        self.meta_updates = 0
        params = self._trainable(model)
        refuse_sharded(params, "train.reptile", "Reptile meta-updates need the full weights on every rank: use DDP or one device")
        if not params:
            raise ValueError("train.reptile: the model has no trainable parameters")
        self.anchor: dict[str, torch.Tensor] = {n: p.detach().float().clone() for n, p in params}

    @classmethod
    def for_run(cls, cfg, acc, model: nn.Module, say=lambda *a, **k: None) -> "Reptile | None":
        """The meta-updates of a run (``train.reptile``; None when off), anchored at ``model``'s current weights."""
        if not cfg.train.reptile:
            return None
        if backend(acc) is Backend.DEEPSPEED:
            raise LaunchError("train.reptile is not supported under DeepSpeed: its fp32 master partitions would "
                              "overwrite the meta-update; use DDP (or one device)")
        if backend(acc) is Backend.FSDP:
            raise LaunchError("train.reptile is not supported under FSDP (sharded weights); use DDP (or one device)")
        r = cfg.train.reptile
        say(f"reptile: every {r.every} steps, weights <- anchor + {r.epsilon:g} x (weights - anchor)")
        return cls(acc.unwrap_model(model), r.every, r.epsilon)

    @torch.no_grad()
    def restart(self, model: nn.Module) -> None:
        """Anchor at ``model``'s weights again (an anneal branch turning on Reptile its trunk ran without)."""
        self.anchor = {n: p.detach().float().clone() for n, p in self._trainable(model)}
        self.meta_updates = 0

    @staticmethod
    def _trainable(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        return [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]

    @torch.no_grad()
    def step(self, model: nn.Module, step: int) -> bool:
        """Call after every optimizer step with the number of steps done; meta-updates when ``step`` is a
        multiple of ``every``. Returns whether it did."""
        if step % self.every:
            return False
        params = dict(self._trainable(model))
        if params.keys() != self.anchor.keys():
            raise KeyError("train.reptile: the model's trainable parameters changed since the anchor was taken")
        for n, p in params.items():
            a = self.anchor[n]
            if a.device != p.device:
                self.anchor[n] = a = a.to(p.device)
            a.lerp_(p.detach().float(), self.epsilon)  # a = a + epsilon * (p - a): the new weights and anchor
            p.copy_(a)
        self.meta_updates += 1
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors (safetensors-ready): ``anchor.<param name>`` and ``meta_updates``."""
        sd = {f"anchor.{n}": t.detach().cpu().clone() for n, t in self.anchor.items()}
        sd["meta_updates"] = torch.tensor(self.meta_updates, dtype=torch.int64)
        return sd

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        anchor = {k[len("anchor."):]: v for k, v in state.items() if k.startswith("anchor.")}
        if anchor.keys() != self.anchor.keys() or "meta_updates" not in state:
            missing, extra = sorted(self.anchor.keys() - anchor.keys()), sorted(anchor.keys() - self.anchor.keys())
            raise KeyError(f"train.reptile: the checkpoint's Reptile anchor does not match the model (missing "
                           f"{missing[:5]}, unexpected {extra[:5]})")
        for n, t in anchor.items():
            self.anchor[n] = t.detach().float().to(self.anchor[n].device).clone()
        self.meta_updates = int(state["meta_updates"])
