"""The ``stages`` section: each stage's length, data mix and LR schedule (``ScheduleConfig``, whose formulas are in
cpt/schedules.py), and the checks of a stage plan that need the stage lengths or the neighbouring stages."""

from __future__ import annotations

from typing import Annotated, Any, Iterable, Literal, Sequence

from pydantic import Field, field_validator, model_validator

from cpt.config.base import Strict


ScheduleType = Literal["constant", "cosine", "linear", "wsd", "inverse_sqrt", "infinite"]
DecayShape = Literal["linear", "cosine", "1-sqrt", "exponential"]
CooldownShape = Literal["cosine", "inverse_sqrt"]
DECAY_SHAPES: tuple[str, ...] = ("linear", "cosine", "1-sqrt", "exponential")

DEFAULT_DECAY_FRACTION = 0.2

# Fields that only some schedule types use; setting one on another type is an error (a typo guard).
_TYPE_FIELDS: dict[str, tuple[str, ...]] = {
    "decay_fraction": ("wsd",),
    "decay_steps": ("wsd",),
    "decay_shape": ("wsd",),
    "timescale": ("inverse_sqrt", "infinite"),
    "cooldown_steps": ("infinite",),
    "cooldown_shape": ("infinite",),
    "constant_lr": ("infinite",),
    "anneal_steps": ("infinite",),
    "anneal_shape": ("infinite",),
    "continue_trunk": ("infinite",),
}
# The trunk of an infinite schedule: a stage with continue_trunk must repeat these unchanged.
_TRUNK_FIELDS = ("max_lr", "warmup_steps", "warmup_from", "cooldown_steps", "cooldown_shape", "constant_lr", "timescale")


class ScheduleConfig(Strict):
    """The LR schedule of one stage (see cpt/schedules.py for the exact formulas)."""

    type: ScheduleType = "cosine"
    max_lr: float = Field(3e-4, gt=0)  # peak LR, reached on the last warmup step
    # the decay target (cosine, linear, wsd), inverse_sqrt's asymptote, the anneal target (infinite,
    # and of anneal branches from a constant/stable phase)
    min_lr: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    # where the warmup starts: a number, or "previous" = the previous stage's final LR (re-warm)
    warmup_from: Annotated[float, Field(ge=0)] | Literal["previous"] = 0.0
    # wsd: the decay takes the last decay_steps steps, or decay_fraction of the stage (default 0.2)
    decay_fraction: float | None = Field(None, gt=0, le=1)
    decay_steps: int | None = Field(None, gt=0)
    decay_shape: DecayShape = "1-sqrt"
    # inverse_sqrt (and infinite's inverse_sqrt cooldown): steps; default warmup_steps
    timescale: float | None = Field(None, gt=0)
    # infinite
    cooldown_steps: int = Field(0, ge=0)
    cooldown_shape: CooldownShape = "cosine"
    constant_lr: float | None = Field(None, gt=0)
    anneal_steps: int | None = Field(None, gt=0)  # None: no anneal (the constant phase lasts to the stage end)
    anneal_shape: DecayShape = "exponential"
    continue_trunk: bool = False  # continue the previous infinite stage's trunk: no re-warm, no new cooldown

    @model_validator(mode="after")
    def _consistent(self) -> "ScheduleConfig":
        errors = []
        for name, types in _TYPE_FIELDS.items():
            if self.type not in types and getattr(self, name) != type(self).model_fields[name].default:
                errors.append(f"{name}: only used by type {' or '.join(types)} (this schedule's type is {self.type})")
        if self.min_lr > self.max_lr:
            errors.append(f"min_lr ({self.min_lr:g}) must not exceed max_lr ({self.max_lr:g})")
        if isinstance(self.warmup_from, float) and self.warmup_from > self.max_lr:
            errors.append(f"warmup_from ({self.warmup_from:g}) must not exceed max_lr ({self.max_lr:g})")
        if self.type == "wsd":
            if self.decay_steps is not None and self.decay_fraction is not None:
                errors.append("decay_steps: set decay_steps or decay_fraction, not both")
            if self.decay_shape == "exponential" and self.min_lr <= 0:
                errors.append("min_lr: must be > 0 when decay_shape is exponential (a geometric decay never reaches 0)")
        if self.needs_timescale and self.timescale is None and self.warmup_steps == 0:
            errors.append("timescale: required when warmup_steps is 0 (it defaults to warmup_steps)")
        if self.type == "infinite":
            if self.constant_lr is None:
                errors.append("constant_lr: required for type infinite (the LR of the constant phase)")
            else:
                if self.constant_lr > self.max_lr:
                    errors.append(f"constant_lr ({self.constant_lr:g}) must not exceed max_lr ({self.max_lr:g})")
                if self.min_lr > self.constant_lr:
                    errors.append(f"min_lr ({self.min_lr:g}) must not exceed constant_lr ({self.constant_lr:g})")
                if self.cooldown_steps == 0 and self.constant_lr < self.max_lr:
                    errors.append("cooldown_steps: must be > 0 when constant_lr < max_lr (or set constant_lr = max_lr)")
            if self.anneal_steps is not None and self.anneal_shape == "exponential" and self.min_lr <= 0:
                errors.append("min_lr: must be > 0 when anneal_shape is exponential (a geometric anneal never reaches 0)")
        if errors:
            raise ValueError("\n".join(errors))  # (one problem line each)
        return self

    @property
    def needs_timescale(self) -> bool:
        return self.type == "inverse_sqrt" or (self.type == "infinite" and self.cooldown_shape == "inverse_sqrt")

    @property
    def effective_timescale(self) -> float:
        return self.timescale if self.timescale is not None else float(max(self.warmup_steps, 1))

    def decay_length(self, steps: int) -> int:
        """wsd: the number of decay steps in a stage of ``steps`` steps (at least 1)."""
        if self.decay_steps is not None:
            return self.decay_steps
        fraction = self.decay_fraction if self.decay_fraction is not None else DEFAULT_DECAY_FRACTION
        return max(1, round(fraction * steps))

    def problems(self, steps: int, where: str = "schedule", trunk_offset: int = 0) -> list[str]:
        """What is wrong with this schedule for a stage of ``steps`` steps (messages name ``where.<field>``).

        ``trunk_offset`` is the clock position the stage starts at (non-zero only for ``continue_trunk``).
        """
        if steps <= 0:
            return [f"{where}: the stage must have a positive number of steps (got {steps})"]
        out = []
        W = self.warmup_steps
        if self.continue_trunk:
            W = max(0, W - trunk_offset)  # the part of the trunk's warmup still to come in this stage
        if self.type in ("cosine", "linear") and W >= steps:
            out.append(f"{where}.warmup_steps: {W} leaves no decay step in a stage of {steps} steps (must be < {steps})")
        elif W > steps:
            out.append(f"{where}.warmup_steps: {W} is longer than the stage ({steps} steps)")
        if self.type == "wsd":
            D = self.decay_length(steps)
            field = "decay_steps" if self.decay_steps is not None else "decay_fraction"
            if D > steps:
                out.append(f"{where}.decay_steps: {D} is longer than the stage ({steps} steps)")
            elif W + D > steps:
                out.append(f"{where}.{field}: warmup ({W}) + decay ({D}) is longer than the stage ({steps} steps)")
        if self.type == "infinite" and self.anneal_steps is not None:
            A = self.anneal_steps
            trunk_end = self.warmup_steps + self.cooldown_steps  # clock position where the constant phase starts
            if A > steps:
                out.append(f"{where}.anneal_steps: {A} is longer than the stage ({steps} steps)")
            elif trunk_offset + steps - A < trunk_end:
                out.append(
                    f"{where}.anneal_steps: the anneal ({A} steps) would start before the constant phase: warmup "
                    f"({self.warmup_steps}) + cooldown ({self.cooldown_steps}) must end by step {trunk_offset + steps - A} "
                    f"of the trunk"
                )
        return out


# ---------------------------------------------------------------- stage plan checks


def stage_schedule_problems(stages: Sequence[tuple[int, ScheduleConfig]], where: str = "stages") -> list[str]:
    """Every problem of a stage plan that needs the stage lengths or the neighbouring stages."""
    errors = []
    offset = 0
    for i, (steps, cfg) in enumerate(stages):
        here = f"{where}.{i}.schedule"
        if i == 0 and cfg.warmup_from == "previous":
            errors.append(f"{here}.warmup_from: 'previous' needs a previous stage (use a number for the first stage)")
        if cfg.continue_trunk:
            if i == 0:
                errors.append(f"{here}.continue_trunk: the first stage has no trunk to continue (a trunk continues in "
                              "its own run: append the stage to that run's config and --resume it; a new run from "
                              "train.init_from keeps the constant LR with warmup_steps: 0 and cooldown_steps: 0 at "
                              "max_lr = constant_lr)")
                offset = 0
            else:
                prev_steps, prev = stages[i - 1]
                if prev.type != "infinite":
                    errors.append(f"{here}.continue_trunk: the previous stage ({where}.{i - 1}) is {prev.type}, not infinite")
                elif prev.anneal_steps is not None:
                    errors.append(
                        f"{here}.continue_trunk: the previous stage ({where}.{i - 1}) ends with an anneal "
                        f"(anneal_steps set); a trunk can only be continued from its constant phase"
                    )
                else:
                    for name in _TRUNK_FIELDS:
                        mine, theirs = getattr(cfg, name), getattr(prev, name)
                        if mine != theirs:
                            errors.append(
                                f"{here}.{name}: must equal {where}.{i - 1}.schedule.{name} ({theirs!r}) when continue_trunk "
                                f"is true (got {mine!r})"
                            )
                offset += prev_steps
        else:
            offset = 0
        errors += cfg.problems(steps, here, trunk_offset=offset)
    return errors


def validate_stage_schedules(stages: Iterable[Any], anneal_steps: int | None = None) -> list[str]:
    """Errors (``stages.<i>.schedule.<field>: ...``) of the stages' schedules; empty when the plan is valid.

    ``stages``: objects with ``.steps`` and ``.schedule`` (``cpt.config.StageConfig``). With
    ``anneal_steps`` (``train.anneal_steps``), also checks that some stage has a constant or stable
    phase an anneal branch could start from.
    """
    pairs = [(s.steps, s.schedule) for s in stages]
    errors = stage_schedule_problems(pairs)
    if not errors and anneal_steps is not None:
        if not _has_constant_phase(pairs):
            types = ", ".join(cfg.type for _, cfg in pairs)
            phased = [cfg.type for _, cfg in pairs if cfg.type in ("constant", "wsd", "infinite")]
            why = (f"their {', '.join(sorted(set(phased)))} phases leave no constant step: the warmup, cooldown or "
                   "decay fill the stage; make the stage longer or those phases shorter") if phased else \
                "use constant, wsd or infinite"
            errors.append(f"train.anneal_steps: no stage has a constant or stable phase to branch from (schedule "
                          f"types: {types}): {why}")
    return errors


def _has_constant_phase(stages: Sequence[tuple[int, ScheduleConfig]]) -> bool:
    """Whether a valid plan has a step in a constant (or wsd stable) phase, as ``cpt.schedules.LRPlan`` lays the
    phases out on each stage's clock (tests/test_schedules.py checks the two agree)."""
    offset = 0
    for i, (steps, cfg) in enumerate(stages):
        offset = offset + stages[i - 1][0] if cfg.continue_trunk else 0
        lo, hi = offset, offset + steps  # the stage's window on its clock
        if cfg.type == "constant":
            begin, end = cfg.warmup_steps, hi
        elif cfg.type == "wsd":
            begin, end = cfg.warmup_steps, hi - cfg.decay_length(steps)
        elif cfg.type == "infinite":
            begin, end = cfg.warmup_steps + cfg.cooldown_steps, hi - (cfg.anneal_steps or 0)
        else:
            continue
        if max(begin, lo) < min(end, hi):
            return True
    return False


class StageConfig(Strict):
    """One stage of a continual pre-training plan: its length, data mix and LR schedule."""

    name: str = "stage"
    steps: int = Field(gt=0)
    # source name -> share of every global batch; shares are normalised to sum to 1
    mix: dict[str, float]
    # optional: a replay share that follows a linear ramp within the stage {source: [start, end]}
    mix_ramp: dict[str, tuple[float, float]] = Field(default_factory=dict)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    reset_optimizer: bool = False

    @field_validator("mix")
    @classmethod
    def _shares(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("mix must name at least one source")
        bad = {k: s for k, s in v.items() if not 0 <= s < float("inf")}  # (NaN too)
        if bad:
            raise ValueError(f"shares must be finite and not negative: {bad}")
        if sum(v.values()) <= 0:
            raise ValueError("shares must not all be zero")
        return v

    @field_validator("mix_ramp")
    @classmethod
    def _ramp_shares(cls, v: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        """Absolute shares in [0, 1] whose sum stays within 1 at both ends (they were checked by the mixer only,
        after the model had loaded, as a traceback)."""
        bad = {k: list(r) for k, r in v.items() if not all(0 <= x <= 1 for x in r)}
        if bad:
            raise ValueError(f"shares must be in [0, 1]: {bad}")
        for end, which in ((0, "start"), (1, "end")):
            if sum(r[end] for r in v.values()) > 1 + 1e-12:
                raise ValueError(f"the shares at the stage's {which} sum to more than 1: {v}")
        return v

    @model_validator(mode="after")
    def _ramps_fill_the_batch(self) -> "StageConfig":
        """With no unramped source left to take the rest (every source ramped, or the others weighing 0), the ramped
        shares must sum to 1 at both ends: the mixer divided them by their sum at each step, a ratio that is neither
        the shares given nor linear (a constant 0.2 became 0.40 ... 0.67), without a word."""
        if self.mix_ramp and sum(w for k, w in self.mix.items() if k not in self.mix_ramp) == 0:
            ends = [sum(r[e] for r in self.mix_ramp.values()) for e in (0, 1)]
            if any(abs(x - 1) > 1e-9 for x in ends):
                raise ValueError(f"mix_ramp: no other source of the stage takes the rest of the batch, so the ramped "
                                 f"shares must sum to 1 at the start and at the end (they sum to {ends[0]:g} and "
                                 f"{ends[1]:g}); add a source with a weight in mix, or fix the shares")
        return self

    def shares_at(self, fraction: float) -> dict[str, float]:
        """The shares ``fraction`` of the way through the stage (0: its first step, 1: its last), as the mixer takes
        them: each ramped source's own, the others splitting the rest by their mix weights."""
        ramped = {k: a + (b - a) * fraction for k, (a, b) in self.mix_ramp.items()}
        rest, weights = 1 - sum(ramped.values()), {k: w for k, w in self.mix.items() if k not in ramped}
        total = sum(weights.values())
        return {k: ramped[k] if k in ramped else (rest * weights[k] / total if total else 0.0) for k in self.mix}

    @property
    def shares(self) -> dict[str, float]:
        """The mix normalised to sum to 1 (what the mixer uses)."""
        total = sum(self.mix.values())
        return {k: v / total for k, v in self.mix.items()}


def describe_shares(st: StageConfig, replay: frozenset[str] = frozenset()) -> str:
    """A stage's shares as trained: normalised (``python 75.0%, ...``), a ``mix_ramp``'s first -> last step
    (``tiny 20.0% -> 80.0%``; a 1-step stage trains its first step's shares only, as the mixer does); sources in
    ``replay`` marked so."""
    first = st.shares_at(0.0) if st.mix_ramp else st.shares
    last = st.shares_at(1.0) if st.mix_ramp and st.steps > 1 else first
    return ", ".join(f"{k}{' (replay)' if k in replay else ''} {first[k]:.1%}"
                     + (f" -> {last[k]:.1%}" if abs(first[k] - last[k]) > 1e-12 else "") for k in st.mix)


def format_mixes(stages: list[StageConfig]) -> list[str]:
    """One line per stage with its normalised shares, noting when the given weights did not sum to 1."""
    lines = []
    for i, st in enumerate(stages):
        total = sum(st.mix.values())
        note = "" if abs(total - 1) < 1e-9 else f" (the weights given sum to {total:g}: normalised)"
        if st.mix_ramp and st.steps > 1:  # (it printed the mix weights, which a ramped source's share does not follow)
            lines.append(f"stage {i} {st.name} mix (first -> last step, mix_ramp): {describe_shares(st)}")
        else:  # (a 1-step stage's ramp: only its first step's shares are trained)
            lines.append(f"stage {i} {st.name} mix: {describe_shares(st)}{'' if st.mix_ramp else note}")
    return lines
