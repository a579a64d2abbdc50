"""The replay mixer: how many rows of every global batch come from each source.

Shares (exact rationals, from the stage configs):

- A run is a list of stages (``StageConfig``: ``steps``, ``mix``, ``mix_ramp``); global step ``s``
  belongs to the stage whose cumulative step range holds it (steps past the last stage keep the
  last stage's shares).
- ``mix`` weights are normalised to sum to 1. A source in ``mix_ramp: {src: [start, end]}`` gets an
  absolute share going linearly from ``start`` (first step of the stage) to ``end`` (last step);
  the other sources share what is left in proportion to their ``mix`` weights.

Rows (deterministic error-carrying rounding): every source carries its rounding error ``e``
(target rows minus given rows, exact). At each step the owed amount is ``d = e + B * share``;
each source gets ``floor(d)`` rows, the rows left over go to the largest remainders (ties to the
earlier source), and ``e = d - rows``. The error stays within (-1, 1), so cumulative counts are
exact up to one row at every step, and exact whenever the target is an integer: 5% of 64-row
batches is exactly 64 rows in every 20 consecutive steps. Errors reset to 0 at a stage switch.
The counts do not depend on the world size; the mixer's state is a few numbers (O(1) resume).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Sequence


def to_fraction(x: float | int | str | Fraction) -> Fraction:
    """The decimal value as written (0.05 -> 1/20), not the binary float's expansion."""
    if isinstance(x, Fraction):
        return x
    return Fraction(repr(x)) if isinstance(x, float) else Fraction(x)


class MixPlan:
    """Stage lookup and the exact share of every source at any step (a pure function of the step)."""

    def __init__(self, stages: Sequence[Any], sources: Sequence[str]):
        if not stages:
            raise ValueError("at least one stage is needed")
        self.stages = list(stages)
        self.sources = list(sources)
        self.starts: list[int] = []
        total = 0
        for st in self.stages:
            self.starts.append(total)
            total += int(st.steps)
        self.total_steps = total
        self._constant: dict[int, list[Fraction]] = {}  # stage -> shares, for stages without mix_ramp
        for i, st in enumerate(self.stages):
            unknown = sorted(set(st.mix) - set(self.sources))
            if unknown:
                raise ValueError(f"stage {i} ({st.name}): mix names unknown sources {unknown}; sources are {self.sources}")
            self._check_ramp(i, st)

    def _check_ramp(self, i: int, st: Any) -> None:
        ramp = getattr(st, "mix_ramp", None) or {}
        for name, (a, b) in ramp.items():
            if name not in st.mix:
                raise ValueError(f"stage {i} ({st.name}): mix_ramp source {name!r} is not in the stage's mix")
            if not (0 <= a <= 1 and 0 <= b <= 1):
                raise ValueError(f"stage {i} ({st.name}): mix_ramp {name}: shares must be in [0, 1] (got {a}, {b})")
        for end in (0, 1):
            if sum(to_fraction(v[end]) for v in ramp.values()) > 1:
                raise ValueError(f"stage {i} ({st.name}): mix_ramp shares sum to more than 1")

    def stage_index(self, step: int) -> int:
        i = 0
        for j, start in enumerate(self.starts):
            if step >= start:
                i = j
        return i

    def shares(self, step: int) -> list[Fraction]:
        """Exact shares (summing to 1) of every source at ``step``, in ``self.sources`` order."""
        i = self.stage_index(step)
        st = self.stages[i]
        local = step - self.starts[i]
        ramp = getattr(st, "mix_ramp", None) or {}
        if not ramp:  # constant over the stage: exact fractions computed once
            cached = self._constant.get(i)
            if cached is None:
                cached = self._constant[i] = self._shares(i, st, local, ramp, step)
            return list(cached)
        return self._shares(i, st, local, ramp, step)

    def _shares(self, i: int, st: Any, local: int, ramp: dict, step: int) -> list[Fraction]:
        t = Fraction(min(local, st.steps - 1), st.steps - 1) if st.steps > 1 else Fraction(0)
        ramped = {n: to_fraction(a) + (to_fraction(b) - to_fraction(a)) * t for n, (a, b) in ramp.items()}
        weights = {n: to_fraction(w) for n, w in st.mix.items() if n not in ramped}
        rest = 1 - sum(ramped.values(), Fraction(0))
        wsum = sum(weights.values(), Fraction(0))
        out = dict.fromkeys(self.sources, Fraction(0))
        if wsum > 0:
            out.update({n: rest * w / wsum for n, w in weights.items()})
            out.update(ramped)
        else:
            rsum = sum(ramped.values(), Fraction(0))
            if rsum == 0:
                raise ValueError(f"stage {i} ({st.name}): every share is zero at step {step}")
            out.update({n: v / rsum for n, v in ramped.items()})
        return [out[n] for n in self.sources]


class Mixer:
    """Rows per source for consecutive global batches, exact over steps (see the module docstring)."""

    def __init__(self, plan: MixPlan, global_batch_size: int):
        if global_batch_size <= 0:
            raise ValueError("global_batch_size must be positive")
        self.plan = plan
        self.batch_size = global_batch_size
        self.step = 0  # the next step to allocate
        self.stage = 0
        self.errors = [Fraction(0)] * len(plan.sources)
        self.rows = [0] * len(plan.sources)  # cumulative rows given to each source
        self.last_shares: list[Fraction] = plan.shares(0)

    def counts(self, step: int) -> list[int]:
        """Rows of each source in global batch ``step`` (call with 0, 1, 2, ... or after a resume)."""
        if step != self.step:
            raise ValueError(f"mixer: expected step {self.step}, got {step} (steps must be consecutive; resume with load_state_dict)")
        stage = self.plan.stage_index(step)
        if stage != self.stage:
            self.stage, self.errors = stage, [Fraction(0)] * len(self.errors)
        shares = self.plan.shares(step)
        owed = [e + self.batch_size * s if s > 0 else Fraction(0) for e, s in zip(self.errors, shares)]
        rows = allocate(owed, [s > 0 for s in shares], self.batch_size)
        self.errors = [d - n for d, n in zip(owed, rows)]
        self.rows = [a + n for a, n in zip(self.rows, rows)]
        self.last_shares = shares
        self.step += 1
        return rows

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "stage": self.stage, "errors": [str(e) for e in self.errors], "rows": list(self.rows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["rows"]) != len(self.rows):
            raise ValueError(f"mixer state has {len(state['rows'])} sources, this run has {len(self.rows)}")
        self.step, self.stage = int(state["step"]), int(state["stage"])
        self.errors = [Fraction(e) for e in state["errors"]]
        self.rows = [int(r) for r in state["rows"]]
        self.last_shares = self.plan.shares(max(self.step - 1, 0))


def allocate(owed: Sequence[Fraction], active: Sequence[bool], total: int) -> list[int]:
    """Integer rows summing to ``total``: floors of ``owed`` (at least 0), then the largest remainders.

    Rows above ``total`` (possible only when errors are negative) are taken back from the sources
    most over-served; ties go to the earlier source when giving and the later one when taking.
    """
    rows = [max(0, math.floor(d)) if a else 0 for d, a in zip(owed, active)]
    while sum(rows) > total:
        j = min((i for i, n in enumerate(rows) if n > 0), key=lambda i: (owed[i] - rows[i], -i))
        rows[j] -= 1
    while sum(rows) < total:
        j = max((i for i, a in enumerate(active) if a), key=lambda i: (owed[i] - rows[i], -i))
        rows[j] += 1
    return rows
