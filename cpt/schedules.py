"""Learning-rate schedules as pure functions of the optimizer step, composed into a multi-stage plan.

Step convention
---------------
``step`` is the index of an optimizer update, starting at 0: ``plan.lr(0)`` is the LR of the first
update, and a checkpoint "at step s" has done updates ``0 .. s-1`` (its next update is ``s``).

Every phase of ``L`` updates moves from a start value ``v0`` to an end value ``v1`` and its
``j``-th update (``j = 0 .. L-1``) uses progress ``x = (j + 1) / L``: the first update is one
increment past ``v0`` and the **last update is exactly** ``v1``. So a linear warmup from 0 never
uses LR 0 (``lr(s) = max_lr * (s + 1) / warmup_steps``), a warmup ends exactly at ``max_lr``, a
decay ends exactly at ``min_lr``, and the next phase starts one increment later (no plateau, no
jump). With ``warmup_steps: 0`` a decaying stage therefore starts one increment below ``max_lr``.

Shapes (``x`` in (0, 1]; value = ``v0 + (v1 - v0) * p(x)`` unless noted):

==============  ==============================================================
``linear``      ``p = x``
``cosine``      ``p = (1 - cos(pi x)) / 2``
``1-sqrt``      ``p = sqrt(x)`` (Hägele et al. 2024: ``lr = max * (1 - sqrt(x))`` to 0)
``exponential`` geometric: ``v0 * (v1 / v0) ** x`` (needs ``v1 > 0``)
==============  ==============================================================

Inverse square root (``type: inverse_sqrt``, no fixed end): after warmup,
``lr = min_lr + (max_lr - min_lr) / sqrt(1 + t / timescale)`` with ``t = s + 1 - warmup_steps``
updates since the warmup. With ``timescale = warmup_steps`` and ``min_lr = 0`` this is the classic
``max_lr * min((s + 1) / W, sqrt(W / (s + 1)))``.

Schedule types (one :class:`ScheduleConfig` per stage of ``N`` steps, ``W`` warmup steps):

* ``constant``: warmup -> ``max_lr`` for the rest of the stage.
* ``cosine`` / ``linear``: warmup -> decay to ``min_lr`` over the remaining ``N - W`` steps
  (``linear`` with ``min_lr: 0`` is linear-to-zero).
* ``wsd``: warmup -> stable at ``max_lr`` -> decay to ``min_lr`` over the last ``decay_steps``
  (or ``decay_fraction * N``) steps with ``decay_shape``.
* ``inverse_sqrt``: warmup -> inverse square root decay towards ``min_lr`` (see above).
* ``infinite`` (Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually Pre-train
  LLMs"): warmup to ``max_lr`` -> cooldown to ``constant_lr`` over ``cooldown_steps``
  (``cosine``, or ``inverse_sqrt``: ``v0 + (v1 - v0) * h(j + 1) / h(L)`` with
  ``h(t) = 1 - 1 / sqrt(1 + t / timescale)``) -> constant at ``constant_lr`` with no fixed end ->
  optionally, only when ``anneal_steps`` is set, an anneal to ``min_lr`` over the stage's last
  ``anneal_steps`` steps with ``anneal_shape``.

Stages: stage ``i`` occupies global steps ``[starts[i], starts[i] + steps_i)`` and runs its own
schedule on a local clock starting at 0 (a re-warm and re-decay per stage). Its warmup starts from
``warmup_from``: a number, or ``"previous"`` = the previous stage's final LR (computed in closed
form). An ``infinite`` stage with ``continue_trunk: true`` does not restart its clock: it continues
the previous (infinite, not annealed) stage's warmup/cooldown/constant trunk where it stopped, so
the constant phase carries across stages with no re-warm.

Past the end of a plan the final LR is held: ``lr(s) = lr(total_steps - 1)`` for
``s >= total_steps`` (for an infinite trunk this is simply its constant phase going on).

Anneal branches: ``plan.anneal_branch(from_step, steps, shape)`` is the plan of a branch that
takes the trunk's checkpoint at ``from_step`` (in a constant or stable phase) and anneals from that
constant LR to the stage's ``min_lr`` over ``steps`` updates, the last one exactly at ``min_lr``.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass, replace
from typing import Sequence

# the schedule's config and its validation live in the config layer (ScheduleConfig, validate_stage_schedules
# re-exported here for their callers)
from cpt.config import DECAY_SHAPES, RunConfig, ScheduleConfig, stage_schedule_problems, validate_stage_schedules  # noqa: F401

# ----------------------------------------------------------------------------- phase functions
# Pure functions of (position in the phase, phase length, values). Positions are 0-based update
# indices j; progress x = (j + 1) / length is in (0, 1].


def warmup(j: int, length: int, start: float, peak: float) -> float:
    """Linear warmup: ``start + (peak - start) * (j + 1) / length``; never ``start`` itself, exactly ``peak`` at the end."""
    return start + (peak - start) * (j + 1) / length


def linear(x: float, v0: float, v1: float) -> float:
    return v0 + (v1 - v0) * x


def cosine(x: float, v0: float, v1: float) -> float:
    return v1 + (v0 - v1) * 0.5 * (1.0 + math.cos(math.pi * x))


def one_minus_sqrt(x: float, v0: float, v1: float) -> float:
    return v1 + (v0 - v1) * (1.0 - math.sqrt(x))


def exponential(x: float, v0: float, v1: float) -> float:
    """Geometric interpolation ``v0 * (v1 / v0) ** x`` (both values > 0)."""
    return v0 * (v1 / v0) ** x


def inverse_sqrt(t: float, v0: float, v_inf: float, timescale: float) -> float:
    """``v_inf + (v0 - v_inf) / sqrt(1 + t / timescale)``: ``v0`` at ``t = 0``, towards ``v_inf`` as ``t`` grows."""
    return v_inf + (v0 - v_inf) / math.sqrt(1.0 + t / timescale)


def inverse_sqrt_cooldown(j: int, length: int, v0: float, v1: float, timescale: float) -> float:
    """An inverse-sqrt shaped move from ``v0`` to ``v1`` that ends exactly at ``v1`` on update ``length - 1``."""

    def h(t: float) -> float:
        return 1.0 - 1.0 / math.sqrt(1.0 + t / timescale)

    return v0 + (v1 - v0) * h(j + 1) / h(length)


_SHAPES = {"linear": linear, "cosine": cosine, "1-sqrt": one_minus_sqrt, "exponential": exponential}


def decay(j: int, length: int, v0: float, v1: float, shape: str) -> float:
    """Update ``j`` of a ``length``-step move from ``v0`` to ``v1`` with ``shape`` (exactly ``v1`` at the end)."""
    if j + 1 >= length:
        return v1
    return _SHAPES[shape]((j + 1) / length, v0, v1)


# ------------------------------------------------------------------------------------- phases


@dataclass(frozen=True)
class Phase:
    """A piece of a plan: updates ``start .. start + steps - 1`` of one phase.

    ``kind``: "warmup", "constant", "decay" (with ``shape``), "inverse_sqrt" or "cooldown_inverse_sqrt".
    A trunk phase continued across stages is split into pieces; ``offset`` is the position of this
    piece's first update inside the whole phase of ``length`` updates (``None``: no fixed end).
    """

    start: int
    steps: int
    stage: int
    kind: str
    label: str
    v0: float
    v1: float
    length: int | None
    offset: int = 0
    shape: str = "linear"
    timescale: float = 1.0

    @property
    def end(self) -> int:
        return self.start + self.steps

    def value(self, step: int) -> float:
        j = step - self.start + self.offset
        if self.kind == "constant":
            return self.v0
        if self.kind == "warmup":
            return self.v1 if j + 1 >= self.length else warmup(j, self.length, self.v0, self.v1)
        if self.kind == "decay":
            return decay(j, self.length, self.v0, self.v1, self.shape)
        if self.kind == "inverse_sqrt":
            return inverse_sqrt(j + 1, self.v0, self.v1, self.timescale)
        if self.kind == "cooldown_inverse_sqrt":
            return self.v1 if j + 1 >= self.length else inverse_sqrt_cooldown(j, self.length, self.v0, self.v1, self.timescale)
        raise AssertionError(f"unknown phase kind {self.kind!r}")


@dataclass(frozen=True)
class _ClockPhase:
    """A phase on a stage's own clock: positions ``[begin, begin + length)`` (``length`` None: to the stage end)."""

    begin: int
    length: int | None
    kind: str
    label: str
    v0: float
    v1: float
    shape: str = "linear"
    timescale: float = 1.0


def _clock_phases(cfg: ScheduleConfig, steps: int, trunk_offset: int, warm_start: float) -> list[_ClockPhase]:
    """The phases of one stage on its clock; the stage covers clock positions ``[trunk_offset, trunk_offset + steps)``."""
    W, peak = cfg.warmup_steps, cfg.max_lr
    out = [_ClockPhase(0, W, "warmup", "warmup", warm_start, peak)] if W > 0 else []
    end = trunk_offset + steps
    if cfg.type == "constant":
        out.append(_ClockPhase(W, None, "constant", "constant", peak, peak))
    elif cfg.type in ("cosine", "linear"):
        out.append(_ClockPhase(W, end - W, "decay", f"{cfg.type} decay", peak, cfg.min_lr, shape=cfg.type))
    elif cfg.type == "wsd":
        D = cfg.decay_length(steps)
        out.append(_ClockPhase(W, end - D - W, "constant", "stable", peak, peak))
        out.append(_ClockPhase(end - D, D, "decay", f"decay ({cfg.decay_shape})", peak, cfg.min_lr, shape=cfg.decay_shape))
    elif cfg.type == "inverse_sqrt":
        out.append(_ClockPhase(W, None, "inverse_sqrt", "inverse-sqrt decay", peak, cfg.min_lr, timescale=cfg.effective_timescale))
    elif cfg.type == "infinite":
        C, const = cfg.cooldown_steps, cfg.constant_lr
        if C > 0:
            kind = "cooldown_inverse_sqrt" if cfg.cooldown_shape == "inverse_sqrt" else "decay"
            out.append(_ClockPhase(W, C, kind, f"cooldown ({cfg.cooldown_shape})", peak, const, shape="cosine",
                                   timescale=cfg.effective_timescale))
        A = cfg.anneal_steps or 0
        out.append(_ClockPhase(W + C, None if A == 0 else end - A - W - C, "constant", "constant", const, const))
        if A:
            out.append(_ClockPhase(end - A, A, "decay", f"anneal ({cfg.anneal_shape})", const, cfg.min_lr, shape=cfg.anneal_shape))
    else:  # pragma: no cover - the Literal type rules this out
        raise AssertionError(cfg.type)
    return out


def _stage_pieces(stage: int, start: int, steps: int, cfg: ScheduleConfig, trunk_offset: int, warm_start: float) -> list[Phase]:
    """Cut the stage's clock phases to its window and place them at global steps."""
    lo, hi = trunk_offset, trunk_offset + steps
    pieces = []
    for cp in _clock_phases(cfg, steps, trunk_offset, warm_start):
        c_end = hi if cp.length is None else cp.begin + cp.length
        a, b = max(cp.begin, lo), min(c_end, hi)
        if a >= b:
            continue
        label = cp.label + (" (trunk continues)" if a > cp.begin and a == lo else "")
        pieces.append(Phase(start=start + a - lo, steps=b - a, stage=stage, kind=cp.kind, label=label, v0=cp.v0, v1=cp.v1,
                            length=cp.length, offset=a - cp.begin, shape=cp.shape, timescale=cp.timescale))
    return pieces


# ---------------------------------------------------------------------------------- the plan


class LRPlan:
    """The LR of every optimizer step of a multi-stage run: ``plan.lr(step)``.

    ``LRPlan([(steps, ScheduleConfig), ...])``: stage ``i`` covers steps ``starts[i] .. starts[i] +
    steps_i - 1``. ``lr`` is a pure function of the step (a binary search over the phases), so a
    resumed run gets exactly the LRs of an uninterrupted one. Raises ``ValueError`` naming
    ``stages.<i>.schedule.<field>`` if the plan is invalid.
    """

    def __init__(self, stages: Sequence[tuple[int, ScheduleConfig]]):
        stages = [(int(n), cfg) for n, cfg in stages]
        if not stages:
            raise ValueError("stages: a plan needs at least one stage")
        errors = stage_schedule_problems(stages)
        if errors:
            raise ValueError("; ".join(errors))
        pieces: list[Phase] = []
        starts, warm_starts = [], []
        t = offset = 0
        for i, (steps, cfg) in enumerate(stages):
            starts.append(t)
            offset = offset + stages[i - 1][0] if cfg.continue_trunk else 0
            if cfg.continue_trunk:
                warm_start = warm_starts[-1]  # the trunk's warmup started where the trunk's first stage said
            elif cfg.warmup_from == "previous":
                warm_start = pieces[-1].value(t - 1)  # the previous stage's final LR, in closed form
            else:
                warm_start = float(cfg.warmup_from)
            warm_starts.append(warm_start)
            pieces += _stage_pieces(i, t, steps, cfg, offset, warm_start)
            t += steps
        self._init(stages, starts, pieces, t)

    def _init(self, stages, starts, pieces, total_steps, branch_from: int | None = None) -> None:
        self.stages: list[tuple[int, ScheduleConfig]] = stages
        self.starts: list[int] = starts
        self.phases: tuple[Phase, ...] = tuple(pieces)
        self.total_steps: int = total_steps
        self.branch_from: int | None = branch_from  # set on anneal branches: the trunk step they start from
        self._piece_starts = [p.start for p in pieces]

    # -- queries

    def _piece(self, step: int) -> Phase:
        if step < 0:
            raise ValueError(f"step must be >= 0 (got {step})")
        step = min(step, self.total_steps - 1)
        return self.phases[bisect_right(self._piece_starts, step) - 1]

    def lr(self, step: int) -> float:
        """The LR of update ``step`` (0-based); past the end of the plan, the final LR is held."""
        step = int(step)
        return self._piece(step).value(min(step, self.total_steps - 1))

    def phase_at(self, step: int) -> Phase:
        """The phase that update ``step`` belongs to (the last one past the end)."""
        return self._piece(int(step))

    def stage_index(self, step: int) -> int:
        """The stage of update ``step`` (the last stage past the end)."""
        if step < 0:
            raise ValueError(f"step must be >= 0 (got {step})")
        return bisect_right(self.starts, int(step)) - 1

    def boundaries(self) -> list[tuple[int, float, str]]:
        """``(step, lr, label)`` at the first and the last update of every phase, in step order."""
        out = []
        for p in self.phases:
            out.append((p.start, p.value(p.start), f"{p.label} begins"))
            if p.steps > 1:
                out.append((p.end - 1, p.value(p.end - 1), f"{p.label} ends"))
        return out

    # -- anneal branches

    def anneal_branch(self, from_step: int, steps: int, shape: str = "linear", min_lr: float | None = None) -> "LRPlan":
        """The plan of an anneal branch from the trunk's checkpoint at ``from_step``.

        The checkpoint must lie in a constant or stable phase: update ``from_step`` is in one, or
        update ``from_step - 1`` was the last of one (a checkpoint at the end of a constant phase).
        The branch's updates ``from_step .. from_step + steps - 1`` anneal from that constant LR to
        ``min_lr`` (default: the ``min_lr`` of the constant phase's stage) with ``shape``, the last
        one exactly at ``min_lr``; earlier steps are the trunk's. Stage indices are the trunk's
        (past the trunk's end: its last stage), so data mixes follow the trunk's stage plan.
        """
        from_step, steps = int(from_step), int(steps)
        if steps <= 0:
            raise ValueError(f"anneal_steps: must be > 0 (got {steps})")
        if from_step < 0:
            raise ValueError(f"anneal_branch: from_step must be >= 0 (got {from_step})")
        if shape not in DECAY_SHAPES:
            raise ValueError(f"anneal_shape: {shape!r} is not one of {list(DECAY_SHAPES)}")
        source = None
        for s in (from_step, from_step - 1):
            if s >= 0 and self.phase_at(s).kind == "constant":
                source = self.phase_at(s)
                break
        if source is None:
            p = self.phase_at(from_step)
            raise ValueError(
                f"anneal_branch: step {from_step} is in the {p.label!r} phase of stage {p.stage} "
                f"({self.stages[p.stage][1].type} schedule), not in a constant or stable phase; an anneal branch needs "
                f"a constant LR to start from (use type constant, wsd or infinite, and branch before the decay)"
            )
        target = self.stages[source.stage][1].min_lr if min_lr is None else float(min_lr)
        if target > source.v0:
            raise ValueError(f"min_lr: the anneal target ({target:g}) is above the constant LR ({source.v0:g})")
        if shape == "exponential" and target <= 0:
            raise ValueError(f"min_lr: an exponential anneal needs min_lr > 0 (stage {source.stage} has {target:g})")
        end = from_step + steps
        kept = [p for p in self.phases if p.start < from_step]
        if kept and kept[-1].end != from_step:
            # cut the piece that holds from_step; or, branching past the trunk's end, let its final constant run on
            kept[-1] = replace(kept[-1], steps=from_step - kept[-1].start)
        branch_stage = self.stage_index(from_step)
        kept.append(Phase(start=from_step, steps=steps, stage=branch_stage, kind="decay", label=f"anneal branch ({shape})",
                          v0=source.v0, v1=target, length=steps, shape=shape))
        starts = [s for s in self.starts if s < end]
        stages = [(min(n, end - s), cfg) for (n, cfg), s in zip(self.stages, self.starts) if s < end]
        stages[-1] = (end - starts[-1], stages[-1][1])
        branch = LRPlan.__new__(LRPlan)
        branch._init(stages, starts, kept, end, branch_from=from_step)
        return branch

    def __repr__(self) -> str:
        kind = f"anneal branch from {self.branch_from}, " if self.branch_from is not None else ""
        return f"LRPlan({kind}{len(self.stages)} stages, {self.total_steps} steps, {len(self.phases)} phases)"


def plan_for_run(cfg: RunConfig, anneal_from: int | None = None) -> LRPlan:
    """The LR plan of a run config (the one builder: the loop, its preflight, ``cpt schedule`` and the dry run use it);
    with ``anneal_from`` and ``train.anneal_steps``, the anneal branch's plan."""
    plan = LRPlan([(s.steps, s.schedule) for s in cfg.stages])
    if anneal_from is not None and cfg.train.anneal_steps:
        plan = plan.anneal_branch(anneal_from, cfg.train.anneal_steps, cfg.train.anneal_shape)
    return plan
