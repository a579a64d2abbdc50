"""Held-out evaluation: forgetting/adaptation bookkeeping, determinism, rank slicing, schedule."""

import math

from functools import partial

import pytest
import torch

from conftest import tiny_llama
from cpt.config import EvalConfig
from cpt.evaluate import (
    HeldoutEvaluator,
    HeldoutSet,
    format_summary_table,
    heldout_loss,
    rank_slice,
)

VOCAB = 97


tiny_model = partial(tiny_llama, VOCAB, hidden=64, intermediate=128, max_position_embeddings=64)


def tokens(n: int, L: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, L), generator=g)


def reference_loss(model, toks: torch.Tensor) -> float:
    """Independent computation: one sequence at a time, via the model's own labels= loss."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in toks:
            out = model(input_ids=row[None], labels=row[None])
            total += out.loss.item() * (row.numel() - 1)
            count += row.numel() - 1
    return total / count


class FakeAccelerator:
    """Stands in for one rank of a multi-process accelerator: records reductions and forward passes."""

    def __init__(self, rank: int, world: int):
        self.process_index, self.num_processes = rank, world
        self.device = torch.device("cpu")
        self.reduced = []

    def reduce(self, t, reduction="sum"):
        assert reduction == "sum"
        self.reduced.append(t.clone())
        return t


def test_heldout_loss_matches_model_loss_and_restores_train_mode():
    model = tiny_model()
    model.train()
    toks = tokens(7)
    got = heldout_loss(model, toks, batch_size=3)
    assert model.training  # mode restored
    assert got == pytest.approx(reference_loss(model, toks), rel=1e-5)
    assert 3.0 < got < 6.0  # random init over 97 tokens: about ln(97) = 4.57


def test_eval_twice_without_training_gives_the_same_loss():
    model = tiny_model()
    toks = tokens(10)
    a = heldout_loss(model, toks, batch_size=4)
    b = heldout_loss(model, toks, batch_size=4)
    assert a == b
    # the batch size changes only the summation order
    assert heldout_loss(model, toks, batch_size=10) == pytest.approx(a, rel=1e-6)


@pytest.mark.parametrize("n,world", [(10, 2), (7, 2), (7, 3), (2, 3), (5, 4)])
def test_rank_slices_are_disjoint_and_cover(n, world):
    seen = []
    for r in range(world):
        s, e = rank_slice(n, r, world)
        seen += list(range(s, e))
    assert seen == list(range(n))


def test_uneven_split_pads_with_weight_zero_and_same_number_of_forwards():
    """7 rows over 3 ranks (3, 2, 2) with batch 2: every rank runs 2 forward passes, the padded pass
    counts for nothing, and the summed per-rank totals give exactly the single-process loss."""
    model = tiny_model()
    toks = tokens(7)
    forwards = []
    handle = model.register_forward_hook(lambda m, i, o: forwards[-1].append(i))
    sums = torch.zeros(2, dtype=torch.float64)
    per_rank_forwards = []
    for r in range(3):
        forwards.append([])
        acc = FakeAccelerator(r, 3)
        heldout_loss(model, toks, batch_size=2, accelerator=acc)
        sums += acc.reduced[0]
        per_rank_forwards.append(len(forwards[-1]))
    handle.remove()
    assert per_rank_forwards == [2, 2, 2]
    assert sums[1].item() == 7 * 15  # each row predicts L-1 tokens; the dummy pass adds nothing
    assert (sums[0] / sums[1]).item() == pytest.approx(reference_loss(model, toks), rel=1e-6)

    # a rank with no rows at all (2 rows over 3 ranks) still runs one forward pass, with weight 0
    acc = FakeAccelerator(2, 3)
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(1))
    with pytest.raises(ValueError, match="no tokens"):  # the fake reduce is local: its own totals are 0
        heldout_loss(model, tokens(2), batch_size=4, accelerator=acc)
    handle.remove()
    assert len(calls) == 1
    assert acc.reduced[-1].tolist() == [0.0, 0.0]


def sets(model_seed=0):
    return [
        HeldoutSet("old", "upstream", tokens(6, seed=11)),
        HeldoutSet("new", "downstream", tokens(6, seed=12)),
    ]


def train_a_bit(model, toks, steps=5, lr=1e-2):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        out = model(input_ids=toks, labels=toks)
        out.loss.backward()
        opt.step()
        opt.zero_grad()


def test_forgetting_is_zero_at_step_0_then_tracks_loss_changes():
    model = tiny_model()
    hs = sets()
    ev = HeldoutEvaluator(hs, EvalConfig(batch_size=4))
    m0 = ev.evaluate(model, step=0)
    assert m0["forgetting/old"] == 0.0
    assert m0["adaptation/new"] == 0.0
    assert "forgetting/new" not in m0 and "adaptation/old" not in m0
    assert m0["eval/old/ppl"] == pytest.approx(math.exp(m0["eval/old/loss"]))
    assert m0["eval/upstream_worst/old"] == m0["eval/old/loss"]
    assert m0["eval/upstream/mean_loss"] == m0["eval/old/loss"]
    assert m0["eval/downstream/mean_loss"] == m0["eval/new/loss"]

    # train on the downstream set only: its loss falls (adaptation > 0), upstream moves
    train_a_bit(model, hs[1].tokens, steps=8)
    m1 = ev.evaluate(model, step=8)
    assert m1["adaptation/new"] == pytest.approx(m0["eval/new/loss"] - m1["eval/new/loss"])
    assert m1["adaptation/new"] > 0.05
    assert m1["forgetting/old"] == pytest.approx(m1["eval/old/loss"] - m0["eval/old/loss"])
    assert m1["eval/upstream_worst/old"] == max(m0["eval/old/loss"], m1["eval/old/loss"])

    rows = {r["name"]: r for r in ev.summary()}
    assert rows["old"]["step0"] == m0["eval/old/loss"]
    assert rows["old"]["final"] == m1["eval/old/loss"] and rows["old"]["final_step"] == 8
    assert rows["new"]["change"] == pytest.approx(m1["adaptation/new"])
    worst_old = max((m0["eval/old/loss"], 0), (m1["eval/old/loss"], 8))
    assert (rows["old"]["worst"], rows["old"]["worst_step"]) == worst_old
    table = format_summary_table(ev.summary())
    assert "old" in table and "upstream" in table and f"{m0['eval/old/loss']:.4f}" in table
    assert f"adaptation {m1['adaptation/new']:+.4f}" in table


def test_without_at_start_the_table_names_the_reference_step():
    """eval.at_start off: changes are measured against the first evaluation, which the table must not call step 0."""
    model = tiny_model()
    ev = HeldoutEvaluator(sets(), EvalConfig(batch_size=4, at_start=False))
    m = ev.evaluate(model, step=10)
    assert ev.summary()[0]["step0_step"] == 10 and m["forgetting/old"] == 0.0
    header = format_summary_table(ev.summary()).splitlines()[0]
    assert "reference (step 10)" in header and "step 0" not in header
    fresh = HeldoutEvaluator(sets(), EvalConfig(batch_size=4))
    fresh.evaluate(model, step=0)
    assert format_summary_table(fresh.summary()).splitlines()[0].split()[2:4] == ["step", "0"]


def test_state_survives_resume():
    model = tiny_model()
    ev = HeldoutEvaluator(sets(), EvalConfig(batch_size=4))
    m0 = ev.evaluate(model, step=0)
    train_a_bit(model, sets()[1].tokens, steps=3)
    ev.evaluate(model, step=3)
    fresh = HeldoutEvaluator(sets(), EvalConfig(batch_size=4))
    fresh.load_state_dict(ev.state_dict())
    m = fresh.evaluate(model, step=4)
    # the reference stays the step-0 loss, not the first evaluation after the resume
    assert m["forgetting/old"] == pytest.approx(m["eval/old/loss"] - m0["eval/old/loss"])
    assert fresh.summary()[0]["step0"] == m0["eval/old/loss"]


def test_a_resume_on_another_sample_restarts_that_sets_reference(caplog):
    """The held-out settings are free to change on a resume (eval.tokens_per_set, sample_seed, the set's files), but
    a reference measured on other tokens made forgetting/<set> compare two samples (a jump of the sample difference,
    logged as forgetting). Such a set now takes its next evaluation as its reference, said in a warning and named in
    the table and the metrics; an unchanged set keeps its step-0 reference."""
    model = tiny_model()
    ev = HeldoutEvaluator(sets(), EvalConfig(batch_size=4))
    m0 = ev.evaluate(model, step=0)
    ev.evaluate(model, step=3)
    other = [HeldoutSet("old", "upstream", tokens(4, seed=11)), sets()[1]]  # fewer rows of "old": another sample
    fresh = HeldoutEvaluator(other, EvalConfig(batch_size=4))
    fresh.load_state_dict(ev.state_dict())
    assert "held-out set 'old' evaluates another sample than its reference was measured on (96 tokens then, 64 now" in caplog.text
    assert "'new'" not in caplog.text
    m = fresh.evaluate(model, step=4)
    assert m["forgetting/old"] == 0.0 and m["eval/old/reference_step"] == 4.0 and m["eval/new/reference_step"] == 0.0
    assert m["adaptation/new"] == pytest.approx(m0["eval/new/loss"] - m["eval/new/loss"])
    rows = {r["name"]: r for r in fresh.summary()}
    assert (rows["old"]["step0_step"], rows["old"]["worst_step"], rows["new"]["step0_step"]) == (4, 4, 0)
    assert "reference (step)" in format_summary_table(fresh.summary())


def test_a_set_left_out_and_added_back_on_another_sample_restarts_its_reference(caplog):
    """A held-out set left out of one resume and added back on a later one, on another sample: its step-0 reference
    was kept silently (the sample it was measured on was no longer in the checkpoint), so forgetting/<set> compared
    two samples. It now gets the warning and a new reference as a changed set does; added back unchanged, it keeps it."""
    model = tiny_model()
    ev = HeldoutEvaluator(sets(), EvalConfig(batch_size=4))
    ev.evaluate(model, step=0)
    without_old = HeldoutEvaluator(sets()[1:], EvalConfig(batch_size=4))  # a resume without "old"
    without_old.load_state_dict(ev.state_dict())
    state = without_old.state_dict()
    same = HeldoutEvaluator(sets(), EvalConfig(batch_size=4))
    same.load_state_dict(state)
    assert "another sample" not in caplog.text and same.evaluate(model, step=6)["eval/old/reference_step"] == 0.0
    other = HeldoutEvaluator([HeldoutSet("old", "upstream", tokens(4, seed=11)), sets()[1]], EvalConfig(batch_size=4))
    other.load_state_dict(state)
    assert "held-out set 'old' evaluates another sample than its reference was measured on (96 tokens then, 64 now" in caplog.text
    m = other.evaluate(model, step=6)
    assert m["forgetting/old"] == 0.0 and m["eval/old/reference_step"] == 6.0 and m["eval/new/reference_step"] == 0.0

def test_schedule_every_n_and_dense_after_each_stage_switch():
    ev = HeldoutEvaluator(sets(), EvalConfig(every=50, dense_steps=20, dense_every=5))
    starts = [0, 100]
    steps = [s for s in range(0, 201) if ev.should_evaluate(s, starts)]
    assert steps == [0, 5, 10, 15, 50, 100, 105, 110, 115, 150, 200]
    assert ev.should_evaluate(173, starts, last_step=173)
    no_start = HeldoutEvaluator(sets(), EvalConfig(every=50, at_start=False))
    assert not no_start.should_evaluate(0, [0])
    assert [s for s in range(0, 120) if no_start.should_evaluate(s, [0, 60])] == [50, 100]
    assert not HeldoutEvaluator([], EvalConfig()).should_evaluate(0, [0])
    # eval.every: null (as lm_eval.every allows): the start, the dense points after each stage switch and the end only
    ends_only = HeldoutEvaluator(sets(), EvalConfig.model_validate({"every": None, "dense_steps": 10, "dense_every": 5}))
    assert [s for s in range(0, 201) if ends_only.should_evaluate(s, [0, 100], last_step=200)] == [0, 5, 100, 105, 200]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="tag"):
        HeldoutSet("x", "sideways", tokens(2))
    with pytest.raises(ValueError, match="duplicate"):
        HeldoutEvaluator([HeldoutSet("a", "upstream", tokens(2)), HeldoutSet("a", "downstream", tokens(2))])
    with pytest.raises(ValueError, match="shape"):
        heldout_loss(tiny_model(), torch.zeros(5, dtype=torch.long), 2)
