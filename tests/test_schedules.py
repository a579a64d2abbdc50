"""LR schedules: closed-form values at and inside every phase, continuity, stage plans, anneal branches,
validation messages that name the field, and resume (a plan is a pure function of the step)."""

from __future__ import annotations

import math
import random

import pytest
import yaml
from pydantic import ValidationError

from cpt.config import StageConfig
from cpt.schedules import LRPlan, ScheduleConfig, plan_for_run, validate_stage_schedules

MAX, MIN, CONST = 1e-3, 1e-4, 3e-4


def S(**kw) -> ScheduleConfig:
    return ScheduleConfig(**kw)


def plan1(steps: int, **kw) -> LRPlan:
    return LRPlan([(steps, S(**kw))])


def cos_between(x, v0, v1):
    return v1 + (v0 - v1) * 0.5 * (1 + math.cos(math.pi * x))


approx = lambda v: pytest.approx(v, rel=1e-12, abs=1e-18)  # noqa: E731


# ------------------------------------------------------------------------------ single-stage shapes


def test_warmup_never_starts_at_zero_and_ends_at_max():
    p = plan1(100, type="constant", max_lr=MAX, warmup_steps=10)
    assert p.lr(0) == approx(MAX / 10)  # the first update is not at LR 0
    for s in range(10):
        assert p.lr(s) == approx(MAX * (s + 1) / 10)
    assert p.lr(9) == MAX
    assert all(p.lr(s) == MAX for s in range(10, 100))


def test_warmup_from_a_number():
    p = plan1(50, type="constant", max_lr=MAX, warmup_steps=4, warmup_from=2e-4)
    assert [p.lr(s) for s in range(5)] == [approx(2e-4 + (MAX - 2e-4) * k / 4) for k in (1, 2, 3, 4, 4)]


def test_cosine_closed_form_at_and_inside_phases():
    p = plan1(110, type="cosine", max_lr=MAX, min_lr=MIN, warmup_steps=10)
    assert p.lr(4) == approx(MAX * 5 / 10)
    for j in (0, 1, 24, 49, 73, 98):
        assert p.lr(10 + j) == approx(cos_between((j + 1) / 100, MAX, MIN))
    assert p.lr(10 + 49) == approx((MAX + MIN) / 2)  # half way through the decay: the midpoint
    assert p.lr(109) == MIN  # the last update is exactly min_lr
    assert p.boundaries()[:4] == [(0, approx(MAX / 10), "warmup begins"), (9, MAX, "warmup ends"),
                                  (10, approx(cos_between(0.01, MAX, MIN)), "cosine decay begins"),
                                  (109, MIN, "cosine decay ends")]


def test_cosine_without_warmup_starts_one_increment_below_max():
    p = plan1(10, type="cosine", max_lr=MAX, min_lr=0.0)
    assert p.lr(0) == approx(cos_between(0.1, MAX, 0.0)) and p.lr(0) < MAX
    assert p.lr(9) == 0.0


def test_linear_to_zero():
    p = plan1(60, type="linear", max_lr=MAX, warmup_steps=10)
    for j in range(50):
        assert p.lr(10 + j) == approx(MAX * (1 - (j + 1) / 50))
    assert p.lr(59) == 0.0


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt", "exponential"])
def test_wsd_warmup_stable_decay(shape):
    p = plan1(100, type="wsd", max_lr=MAX, min_lr=MIN, warmup_steps=10, decay_fraction=0.2, decay_shape=shape)
    assert p.lr(0) == approx(MAX / 10)
    assert all(p.lr(s) == MAX for s in range(9, 80))  # last warmup step and the whole stable phase
    expect = {
        "linear": lambda x: MAX + (MIN - MAX) * x,
        "cosine": lambda x: cos_between(x, MAX, MIN),
        "1-sqrt": lambda x: MIN + (MAX - MIN) * (1 - math.sqrt(x)),
        "exponential": lambda x: MAX * (MIN / MAX) ** x,
    }[shape]
    for j in (0, 5, 9, 18):
        assert p.lr(80 + j) == approx(expect((j + 1) / 20))
    assert p.lr(99) == MIN
    assert [lbl for _, _, lbl in p.boundaries()][2:] == ["stable begins", "stable ends", f"decay ({shape}) begins",
                                                          f"decay ({shape}) ends"]


def test_wsd_decay_steps_and_default_fraction():
    p = plan1(100, type="wsd", max_lr=MAX, decay_steps=7, decay_shape="linear")
    assert p.lr(92) == MAX and p.lr(93) == approx(MAX * (1 - 1 / 7)) and p.lr(99) == 0.0
    q = plan1(100, type="wsd", max_lr=MAX)  # default: the last 20% with 1-sqrt
    assert q.lr(79) == MAX and q.lr(80) == approx(MAX * (1 - math.sqrt(1 / 20)))


def test_inverse_sqrt_is_the_classic_noam_shape():
    W = 100
    p = plan1(1000, type="inverse_sqrt", max_lr=MAX, warmup_steps=W)  # timescale defaults to warmup_steps
    for s in (0, 50, 99, 100, 399, 999):
        assert p.lr(s) == approx(MAX * min((s + 1) / W, math.sqrt(W / (s + 1))))
    assert p.lr(399) == approx(MAX / 2)
    q = plan1(1000, type="inverse_sqrt", max_lr=MAX, min_lr=MIN, warmup_steps=10, timescale=50)
    for t in (1, 7, 500):
        assert q.lr(9 + t) == approx(MIN + (MAX - MIN) / math.sqrt(1 + t / 50))


def test_infinite_all_phases():
    cfg = dict(type="infinite", max_lr=MAX, constant_lr=CONST, min_lr=1e-5, warmup_steps=10, cooldown_steps=40,
               anneal_steps=20, anneal_shape="exponential")
    p = plan1(200, **cfg)
    assert p.lr(3) == approx(MAX * 4 / 10) and p.lr(9) == MAX
    for j in (0, 19, 38):
        assert p.lr(10 + j) == approx(cos_between((j + 1) / 40, MAX, CONST))
    assert p.lr(49) == CONST
    assert all(p.lr(s) == CONST for s in range(49, 180))
    for j in (0, 9, 18):
        assert p.lr(180 + j) == approx(CONST * (1e-5 / CONST) ** ((j + 1) / 20))
    assert p.lr(199) == 1e-5
    labels = [lbl for _, _, lbl in p.boundaries()]
    assert labels == ["warmup begins", "warmup ends", "cooldown (cosine) begins", "cooldown (cosine) ends",
                      "constant begins", "constant ends", "anneal (exponential) begins", "anneal (exponential) ends"]


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_infinite_anneal_shapes(shape):
    p = plan1(100, type="infinite", max_lr=MAX, constant_lr=CONST, min_lr=0.0, warmup_steps=5, cooldown_steps=5,
              anneal_steps=10, anneal_shape=shape)
    f = (lambda x: CONST * (1 - x)) if shape == "linear" else (lambda x: cos_between(x, CONST, 0.0))
    assert [p.lr(90 + j) for j in range(10)] == [approx(f((j + 1) / 10)) for j in range(10)]


def test_infinite_inverse_sqrt_cooldown():
    p = plan1(200, type="infinite", max_lr=MAX, constant_lr=CONST, warmup_steps=10, cooldown_steps=50,
              cooldown_shape="inverse_sqrt", timescale=5)
    h = lambda t: 1 - 1 / math.sqrt(1 + t / 5)  # noqa: E731
    for j in (0, 10, 48):
        assert p.lr(10 + j) == approx(MAX + (CONST - MAX) * h(j + 1) / h(50))
    assert p.lr(59) == CONST and p.lr(60) == CONST and p.lr(199) == CONST
    # no anneal asked: the constant phase runs to the end, and past it
    assert p.lr(10**9) == CONST


def test_constant_lr_equal_to_max_needs_no_cooldown():
    p = plan1(20, type="infinite", max_lr=CONST, constant_lr=CONST, warmup_steps=5)
    assert p.lr(4) == CONST and p.lr(5) == CONST


# ----------------------------------------------------------------------------------- continuity


def _max_jump(plan, lo, hi):
    return max(abs(plan.lr(s + 1) - plan.lr(s)) for s in range(lo, hi - 1))


def test_continuity_within_stages():
    # the largest step of a cosine of D steps between v0 and v1 is at most |v0 - v1| * pi / (2 D)
    p = plan1(1010, type="cosine", max_lr=MAX, min_lr=MIN, warmup_steps=10)
    assert _max_jump(p, 0, 1010) <= max(MAX / 10, (MAX - MIN) * math.pi / 2000) * (1 + 1e-9)
    assert _max_jump(p, 9, 1010) <= (MAX - MIN) * math.pi / 2000 * (1 + 1e-9)  # warmup -> decay: no jump
    q = plan1(2000, type="infinite", max_lr=MAX, constant_lr=CONST, min_lr=1e-5, warmup_steps=10, cooldown_steps=500,
              anneal_steps=400, anneal_shape="linear")
    assert _max_jump(q, 9, 2000) <= (MAX - CONST) * math.pi / 1000 * (1 + 1e-9)


def test_rewarm_from_previous_final_lr():
    a = S(type="cosine", max_lr=MAX, min_lr=MIN, warmup_steps=10)
    b = S(type="cosine", max_lr=5e-4, min_lr=5e-5, warmup_steps=20, warmup_from="previous")
    p = LRPlan([(100, a), (100, b)])
    assert p.starts == [0, 100] and p.total_steps == 200
    assert p.lr(99) == MIN
    for k in range(20):
        assert p.lr(100 + k) == approx(MIN + (5e-4 - MIN) * (k + 1) / 20)  # re-warm starts from the previous final LR
    assert p.lr(100) - p.lr(99) == approx((5e-4 - MIN) / 20)  # no jump at the switch: one warmup increment
    assert p.lr(199) == 5e-5
    # re-warm from 0 instead
    q = LRPlan([(100, a), (100, b.model_copy(update={"warmup_from": 0.0}))])
    assert q.lr(100) == approx(5e-4 / 20)


def test_rewarm_from_previous_inverse_sqrt_final_value():
    a = S(type="inverse_sqrt", max_lr=MAX, warmup_steps=10)
    b = S(type="constant", max_lr=MAX, warmup_steps=4, warmup_from="previous")
    p = LRPlan([(50, a), (10, b)])
    prev = MAX * math.sqrt(10 / 50)  # lr(49) in closed form
    assert p.lr(49) == approx(prev)
    assert p.lr(50) == approx(prev + (MAX - prev) / 4)


def test_previous_over_thousands_of_stages_is_closed_form():
    # each stage re-warms from the previous final LR; lr() must not recurse through earlier stages
    n = 3000
    cfg0 = S(type="linear", max_lr=MAX, min_lr=MIN, warmup_steps=1)
    cfg = S(type="linear", max_lr=MAX, min_lr=MIN, warmup_steps=2, warmup_from="previous")
    p = LRPlan([(5, cfg0)] + [(5, cfg)] * (n - 1))
    last = 5 * n - 1
    assert p.stage_index(last) == n - 1
    assert p.lr(last) == MIN
    assert p.lr(last - 4) == approx(MIN + (MAX - MIN) / 2)  # first warmup update of the last stage


# ------------------------------------------------------------------------------ trunk continuation


TRUNK = dict(type="infinite", max_lr=MAX, constant_lr=CONST, min_lr=1e-5, warmup_steps=10, cooldown_steps=100)


@pytest.mark.parametrize("first", [40, 150])  # the first stage ends inside the cooldown / inside the constant phase
def test_continue_trunk_equals_one_long_stage(first):
    a = S(**TRUNK)
    b = S(**TRUNK, continue_trunk=True)
    split = LRPlan([(first, a), (300 - first, b)])
    whole = LRPlan([(300, a)])
    assert [split.lr(s) for s in range(320)] == [whole.lr(s) for s in range(320)]
    assert split.stage_index(first) == 1 and split.starts == [0, first]
    assert split.lr(first) == split.lr(first - 1) or first < 110  # no re-warm at the switch
    labels = [lbl for _, _, lbl in split.boundaries()]
    assert any(lbl.endswith("(trunk continues) begins") for lbl in labels)


def test_continue_trunk_then_anneal_in_a_later_stage():
    a = S(**TRUNK)
    b = S(**{**TRUNK, "anneal_steps": 50, "anneal_shape": "linear"}, continue_trunk=True)
    c = S(**TRUNK, continue_trunk=True)
    p = LRPlan([(200, a), (100, c), (100, b)])
    assert all(p.lr(s) == CONST for s in range(110, 350))
    assert p.lr(350) == approx(CONST + (1e-5 - CONST) / 50) and p.lr(399) == 1e-5
    whole = LRPlan([(400, S(**{**TRUNK, "anneal_steps": 50, "anneal_shape": "linear"}))])
    assert [p.lr(s) for s in range(400)] == [whole.lr(s) for s in range(400)]


def test_past_the_end_holds_the_final_lr_and_stage_index():
    p = LRPlan([(30, S(type="cosine", max_lr=MAX, min_lr=MIN)), (20, S(type="linear", max_lr=MAX, min_lr=2e-5))])
    assert p.lr(49) == 2e-5 and p.lr(50) == 2e-5 and p.lr(10**7) == 2e-5
    assert [p.stage_index(s) for s in (0, 29, 30, 49, 50, 999)] == [0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="step must be >= 0"):
        p.lr(-1)


# ----------------------------------------------------------------------------------- anneal branches


def test_anneal_branch_from_infinite_constant_phase_leaves_trunk_untouched():
    trunk = LRPlan([(300, S(**TRUNK))])
    before = [trunk.lr(s) for s in range(400)]
    b = trunk.anneal_branch(200, 50, "cosine")
    assert b.branch_from == 200 and b.total_steps == 250
    assert [b.lr(s) for s in range(200)] == before[:200]  # the branch shares the trunk's history
    for j in (0, 24, 48):
        assert b.lr(200 + j) == approx(cos_between((j + 1) / 50, CONST, 1e-5))
    assert b.lr(249) == 1e-5 and b.lr(5000) == 1e-5
    assert b.stage_index(220) == 0 and b.starts == [0]
    assert [trunk.lr(s) for s in range(400)] == before  # the trunk is unchanged


def test_anneal_branch_from_wsd_stable_and_constant_types_and_shapes():
    wsd = LRPlan([(100, S(type="wsd", max_lr=MAX, min_lr=MIN, warmup_steps=10, decay_steps=20))])
    b = wsd.anneal_branch(40, 10, "exponential")
    assert b.lr(40) == approx(MAX * (MIN / MAX) ** 0.1) and b.lr(49) == MIN
    b2 = wsd.anneal_branch(80, 10, "1-sqrt")  # a checkpoint at the very end of the stable phase
    assert b2.lr(80) == approx(MIN + (MAX - MIN) * (1 - math.sqrt(0.1)))
    const = LRPlan([(50, S(type="constant", max_lr=MAX, min_lr=MIN))])
    b3 = const.anneal_branch(50, 10, "linear")  # from the end of the trunk: its constant continues
    assert b3.lr(50) == approx(MAX + (MIN - MAX) / 10) and b3.lr(59) == MIN
    b4 = const.anneal_branch(70, 5, "linear", min_lr=0.0)  # past the end; explicit target
    assert b4.lr(65) == MAX and b4.lr(74) == 0.0 and b4.total_steps == 75


def test_anneal_branch_crossing_a_stage_switch_keeps_trunk_stage_indices():
    a = S(**TRUNK)
    p = LRPlan([(200, a), (100, S(**TRUNK, continue_trunk=True))])
    b = p.anneal_branch(180, 40, "linear")
    assert b.starts == [0, 200] and b.stage_index(199) == 0 and b.stage_index(210) == 1
    assert b.lr(219) == 1e-5


@pytest.mark.parametrize("from_step, where", [(5, "warmup"), (60, "cooldown"), (150, "cosine decay")])
def test_anneal_branch_rejected_outside_constant_phases(from_step, where):
    p = LRPlan([(100, S(**TRUNK)), (100, S(type="cosine", max_lr=MAX, min_lr=MIN, warmup_steps=10))])
    with pytest.raises(ValueError, match=f"step {from_step} is in the '{where}.*not in a constant or stable phase"):
        p.anneal_branch(from_step, 10, "linear")


def test_anneal_branch_bad_arguments():
    p = LRPlan([(100, S(type="constant", max_lr=MAX))])
    with pytest.raises(ValueError, match="anneal_steps: must be > 0"):
        p.anneal_branch(50, 0, "linear")
    with pytest.raises(ValueError, match="anneal_shape"):
        p.anneal_branch(50, 10, "step")
    with pytest.raises(ValueError, match="min_lr: an exponential anneal needs min_lr > 0"):
        p.anneal_branch(50, 10, "exponential")


# ------------------------------------------------------------------------------------- validation


def _loc_and_msgs(err: ValidationError) -> list[str]:
    return [".".join(map(str, e["loc"])) + ": " + e["msg"] for e in err.errors()]


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(max_lr=0.0), "max_lr"),
        (dict(max_lr=-1e-3), "max_lr"),
        (dict(min_lr=-1e-5), "min_lr"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(warmup_from=-0.1), "warmup_from"),
        (dict(warmup_from="prev"), "warmup_from"),
        (dict(type="wsd", decay_fraction=0.0), "decay_fraction"),
        (dict(type="wsd", decay_fraction=1.5), "decay_fraction"),
        (dict(type="wsd", decay_steps=0), "decay_steps"),
        (dict(type="infinite", constant_lr=CONST, cooldown_steps=-5), "cooldown_steps"),
        (dict(type="infinite", constant_lr=CONST, cooldown_steps=5, anneal_steps=0), "anneal_steps"),
        (dict(type="inverse_sqrt", timescale=0), "timescale"),
    ],
)
def test_field_constraints_name_the_field(kw, field):
    with pytest.raises(ValidationError) as e:
        ScheduleConfig(**kw)
    assert any(m.startswith(field) for m in _loc_and_msgs(e.value)), _loc_and_msgs(e.value)


@pytest.mark.parametrize(
    "kw, start",
    [
        (dict(max_lr=1e-4, min_lr=1e-3), "min_lr (0.001) must not exceed max_lr"),
        (dict(max_lr=1e-4, warmup_from=1e-3), "warmup_from (0.001) must not exceed max_lr"),
        (dict(type="infinite"), "constant_lr: required"),
        (dict(type="infinite", constant_lr=2e-3, max_lr=MAX, cooldown_steps=5), "constant_lr (0.002) must not exceed max_lr"),
        (dict(type="infinite", constant_lr=CONST, min_lr=5e-4, cooldown_steps=5), "min_lr (0.0005) must not exceed constant_lr"),
        (dict(type="infinite", max_lr=MAX, constant_lr=CONST), "cooldown_steps: must be > 0 when constant_lr < max_lr"),
        (dict(type="infinite", constant_lr=CONST, cooldown_steps=5, anneal_steps=10), "min_lr: must be > 0 when anneal_shape"),
        (dict(type="wsd", decay_steps=10, decay_fraction=0.1), "decay_steps: set decay_steps or decay_fraction"),
        (dict(type="wsd", decay_shape="exponential"), "min_lr: must be > 0 when decay_shape is exponential"),
        (dict(type="cosine", anneal_steps=10), "anneal_steps: only used by type infinite"),
        (dict(type="cosine", constant_lr=CONST), "constant_lr: only used by type infinite"),
        (dict(type="constant", decay_fraction=0.1), "decay_fraction: only used by type wsd"),
        (dict(type="wsd", continue_trunk=True), "continue_trunk: only used by type infinite"),
        (dict(type="inverse_sqrt"), "timescale: required when warmup_steps is 0"),
    ],
)
def test_cross_field_errors_start_with_the_field(kw, start):
    with pytest.raises(ValidationError) as e:
        ScheduleConfig(**kw)
    assert any(start in m for m in _loc_and_msgs(e.value)), _loc_and_msgs(e.value)


def test_full_dump_round_trips():
    # a saved config (every field written, defaults included) must load again unchanged
    for cfg in (S(type="cosine", warmup_steps=3), S(**TRUNK, anneal_steps=5), S(type="wsd", decay_steps=3)):
        again = ScheduleConfig.model_validate(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json"))))
        assert again == cfg


@pytest.mark.parametrize(
    "stages, message",
    [
        ([(10, S(type="constant", warmup_steps=20))], "stages.0.schedule.warmup_steps: 20 is longer than the stage (10 steps)"),
        ([(10, S(type="cosine", warmup_steps=10))], "stages.0.schedule.warmup_steps: 10 leaves no decay step"),
        ([(100, S(type="wsd", warmup_steps=90, decay_fraction=0.2))], "stages.0.schedule.decay_fraction: warmup (90) + decay (20)"),
        ([(10, S(type="wsd", decay_steps=20))], "stages.0.schedule.decay_steps: 20 is longer than the stage"),
        ([(10, S(**TRUNK, anneal_steps=20))], "stages.0.schedule.anneal_steps: 20 is longer than the stage"),
        ([(100, S(**TRUNK, anneal_steps=20))], "stages.0.schedule.anneal_steps: the anneal (20 steps) would start before"),
        ([(10, S(type="constant", warmup_from="previous"))], "stages.0.schedule.warmup_from: 'previous' needs a previous stage"),
        ([(10, S(**TRUNK, continue_trunk=True))], "stages.0.schedule.continue_trunk: the first stage"),
        ([(10, S(type="cosine")), (200, S(**TRUNK, continue_trunk=True))],
         "stages.1.schedule.continue_trunk: the previous stage (stages.0) is cosine, not infinite"),
        ([(200, S(**TRUNK, anneal_steps=20)), (200, S(**TRUNK, continue_trunk=True))],
         "stages.1.schedule.continue_trunk: the previous stage (stages.0) ends with an anneal"),
        ([(200, S(**TRUNK)), (200, S(**{**TRUNK, "constant_lr": 2e-4}, continue_trunk=True))],
         "stages.1.schedule.constant_lr: must equal stages.0.schedule.constant_lr (0.0003)"),
        ([(50, S(type="cosine")), (20, S(type="linear", warmup_steps=30))], "stages.1.schedule.warmup_steps: 30"),
    ],
)
def test_plan_errors_name_the_stage_field(stages, message):
    with pytest.raises(ValueError) as e:
        LRPlan(stages)
    assert message in str(e.value)
    # the same errors through the RunConfig hook, from StageConfig objects
    stage_cfgs = [StageConfig(name=f"s{i}", steps=n, mix={"a": 1.0}, schedule=c) for i, (n, c) in enumerate(stages)]
    assert any(message in m for m in validate_stage_schedules(stage_cfgs))


def test_problems_name_the_field_and_valid_plans_have_no_errors():
    cfg = S(type="cosine", warmup_steps=10)
    assert cfg.problems(11) == []
    problems = cfg.problems(5, where="stages.3.schedule")
    assert len(problems) == 1 and problems[0].startswith("stages.3.schedule.warmup_steps: 10 leaves no decay step")
    stages = [StageConfig(steps=300, mix={"a": 1.0}, schedule=S(**TRUNK)),
              StageConfig(steps=300, mix={"a": 1.0}, schedule=S(**TRUNK, continue_trunk=True))]
    assert validate_stage_schedules(stages) == []
    assert validate_stage_schedules(stages, anneal_steps=50) == []


def test_anneal_needs_a_constant_or_stable_phase_somewhere():
    stages = [StageConfig(steps=100, mix={"a": 1.0}, schedule=S(type="cosine")),
              StageConfig(steps=100, mix={"a": 1.0}, schedule=S(type="linear"))]
    errors = validate_stage_schedules(stages, anneal_steps=10)
    assert len(errors) == 1 and errors[0].startswith("train.anneal_steps: no stage has a constant or stable phase")


def test_config_layer_finds_a_constant_phase_exactly_where_the_plan_has_one():
    """The config layer checks train.anneal_steps without building an LRPlan (cpt.config imports no cpt.schedules):
    its rule must agree with the phases LRPlan lays out, over every schedule type, stage lengths at the edges
    (a stable/constant phase of 0 or 1 step) and continued trunks."""
    from cpt.config import _has_constant_phase

    kinds = [dict(type="constant", warmup_steps=w) for w in (0, 5, 10)]
    kinds += [dict(type="cosine", warmup_steps=2), dict(type="inverse_sqrt", warmup_steps=3)]
    kinds += [dict(type="wsd", warmup_steps=w, decay_steps=d) for w in (0, 3) for d in (1, 4, 7)]
    trunk = dict(type="infinite", max_lr=MAX, constant_lr=CONST, min_lr=MIN, warmup_steps=3, cooldown_steps=4)
    kinds += [dict(trunk, anneal_steps=a) for a in (None, 1, 3)] + [dict(trunk, cooldown_steps=12)]
    kinds += [dict(trunk, continue_trunk=True), dict(trunk, cooldown_steps=12, continue_trunk=True)]
    checked = {True: 0, False: 0}
    for steps in (7, 10, 11):
        for first in kinds:
            for second in [None] + kinds:
                pairs = [(steps, first)] + ([(steps + 1, second)] if second is not None else [])
                try:
                    plan = LRPlan([(n, S(**kw)) for n, kw in pairs])
                except ValueError:
                    continue  # an invalid plan never reaches the anneal check
                expected = any(p.kind == "constant" for p in plan.phases)
                assert _has_constant_phase(plan.stages) == expected, pairs
                checked[expected] += 1
    assert checked[True] > 50 and checked[False] > 20, checked  # both answers were exercised


# ------------------------------------------------------------------------------------------ resume


def _cfg_dict():
    return {
        "model": {"arch": {"model_type": "llama"}, "tokenizer": "tok"},
        "data": {"sources": [{"name": "a", "path": "does/not/exist"}]},
        "stages": [
            {"name": "s0", "steps": 120, "mix": {"a": 1.0},
             "schedule": {"type": "infinite", "max_lr": MAX, "constant_lr": CONST, "min_lr": 1e-5,
                          "warmup_steps": 10, "cooldown_steps": 40}},
            {"name": "s1", "steps": 80, "mix": {"a": 1.0},
             "schedule": {"type": "infinite", "max_lr": MAX, "constant_lr": CONST, "min_lr": 1e-5,
                          "warmup_steps": 10, "cooldown_steps": 40, "continue_trunk": True}},
            {"name": "s2", "steps": 100, "mix": {"a": 1.0},
             "schedule": {"type": "wsd", "max_lr": 5e-4, "min_lr": 0.0, "warmup_steps": 20, "warmup_from": "previous"}},
        ],
    }


def test_resume_reproduces_the_lr_sequence():
    from cpt.config import config_to_dict, validate

    cfg = validate(_cfg_dict())
    plan = plan_for_run(cfg)
    uninterrupted = [plan.lr(s) for s in range(plan.total_steps)]
    # a resumed run rebuilds the plan from the config saved next to the checkpoint and continues at step k
    saved = yaml.safe_load(yaml.safe_dump(config_to_dict(cfg)))
    for k in (0, 1, 119, 120, 157, 299):
        again = plan_for_run(validate(saved))
        assert [again.lr(s) for s in range(k, plan.total_steps)] == uninterrupted[k:]
    # and the order of queries does not matter (no hidden state)
    order = list(range(plan.total_steps))
    random.Random(0).shuffle(order)
    assert {s: plan.lr(s) for s in order} == dict(enumerate(uninterrupted))


def test_plan_for_run_with_anneal_branch():
    from cpt.config import validate

    d = _cfg_dict()
    d["train"] = {"init_from": "runs/x/checkpoints/step_00000100", "anneal_steps": 30, "anneal_shape": "linear"}
    cfg = validate(d)
    assert plan_for_run(cfg).total_steps == 300  # without the checkpoint step: the trunk
    b = plan_for_run(cfg, anneal_from=100)
    assert b.branch_from == 100 and b.total_steps == 130 and b.lr(129) == 1e-5
