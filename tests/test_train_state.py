"""The state registry (cpt/state.py, cpt/checkpoint.py): every resumable component saved under its name, tensors
apart from JSON, a component missing from a checkpoint refused, the data loader refusing another data's state."""

import json

import pytest
import torch

from conftest import tiny_run_config
from cpt.config import load_config
from cpt.state import FORMAT, StateError, TrainState, flatten, restore


class Counter:
    """A component with both kinds of state: JSON values and a tensor."""

    def __init__(self):
        self.n, self.history, self.weights = 0, [], torch.zeros(3)

    def state_dict(self):
        return {"n": self.n, "history": list(self.history), "weights": self.weights.clone()}

    def load_state_dict(self, state):
        if state["weights"].shape != self.weights.shape:
            raise ValueError(f"weights of shape {tuple(state['weights'].shape)}, expected {tuple(self.weights.shape)}")
        self.n, self.history, self.weights = int(state["n"]), list(state["history"]), state["weights"].clone()


def test_registry_round_trip_keeps_tensors_apart_from_json():
    a = Counter()
    a.n, a.history, a.weights = 4, [1.5, 2.5], torch.tensor([1.0, 2.0, 3.0])
    doc, tensors = flatten({"train": TrainState(step=7, tokens=896, anneal_from=3), "counter": a})
    assert doc == {"format": FORMAT, "train": {"step": 7, "tokens": 896, "anneal_from": 3},
                   "counter": {"n": 4, "history": [1.5, 2.5]}}
    assert list(tensors) == ["counter.weights"]
    doc = json.loads(json.dumps(doc))  # as trainer_state.json holds it
    state, b = TrainState(), Counter()
    restore({"train": state, "counter": b}, doc, tensors)
    assert (state.step, state.tokens, state.anneal_from) == (7, 896, 3)
    assert b.n == 4 and b.history == [1.5, 2.5] and torch.equal(b.weights, a.weights)
    restore({"train": TrainState()}, doc, tensors)  # what the checkpoint holds beyond the registry is not needed


def test_missing_component_old_layout_and_refused_state_are_one_clear_error():
    doc, tensors = flatten({"train": TrainState(step=2)})
    with pytest.raises(StateError, match=r"it holds no state for 'counter' .*train.init_from"):
        restore({"train": TrainState(), "counter": Counter()}, doc, tensors)
    with pytest.raises(StateError, match=r"layout of an older cpt \(format 1"):
        restore({"train": TrainState()}, {"step": 2, "tokens": 0, "data": {}}, {})  # the flat layout before the registry
    c = Counter()
    c.weights = torch.zeros(5)
    doc, tensors = flatten({"counter": c})
    with pytest.raises(StateError, match=r"its 'counter' state does not fit this run: weights of shape \(5,\)"):
        restore({"counter": Counter()}, doc, tensors)
    with pytest.raises(ValueError, match="not a usable component name"):
        flatten({"a.b": Counter()})
    with pytest.raises(TypeError, match="no state_dict"):
        flatten({"x": object()})


def test_loader_refuses_the_state_of_other_data(tiny_cpt_data):
    """The data loader checks its own fingerprint in load_state_dict (another seed: another stream)."""
    from cpt.data.loader import CPTDataLoader
    from cpt.data.prefetch import Prefetcher
    from cpt.model import load_tokenizer

    cfg = load_config(base=tiny_run_config(tiny_cpt_data, "unused"))
    tok = load_tokenizer(cfg.model)
    a = CPTDataLoader(cfg.data, cfg.stages, tok, cfg.train.global_batch_size, seed=1)
    a.batch(0)
    state = json.loads(json.dumps(a.state_dict()))
    other = CPTDataLoader(cfg.data, cfg.stages, tok, cfg.train.global_batch_size, seed=2)
    with pytest.raises(ValueError, match=r"does not continue on this run's data: run.seed 1 -> 2 \(") as e:
        other.load_state_dict(state)
    assert "Restore the checkpoint's value (its config.yaml), even with --allow-config-change" in str(e.value)
    with pytest.raises(StateError, match="its 'data' state does not fit this run: the data position of the checkpoint"):
        restore({"data": Prefetcher(other, enabled=False)}, {"format": FORMAT, "data": state}, {})
    older = {k: v for k, v in state.items() if k not in ("source_data", "seq_len", "seed")}  # (before per-source data)
    with pytest.raises(ValueError, match="differs from this config's data") as e:
        other.load_state_dict(older)
    # what to do, also for an anneal branch (the advice was 'use train.init_from', which a branch already does)
    assert "data.seq_len and run.seed must be the checkpoint's" in str(e.value) and "without --anneal" in str(e.value)
    same = Prefetcher(CPTDataLoader(cfg.data, cfg.stages, tok, cfg.train.global_batch_size, seed=1), enabled=False)
    restore({"data": same}, {"format": FORMAT, "data": state}, {})  # through the prefetcher, before its first batch
    assert torch.equal(same.batch(1)["input_ids"], a.batch(1)["input_ids"])
    with pytest.raises(RuntimeError, match="already started"):
        same.load_state_dict(state)


def test_log_window_round_trip_and_checkpoints_without_it():
    """The open log window (train/loss and train/loss/<source> since the last log line) is saved and restored; a
    checkpoint written before it was registered resumes with an empty window (it is cosmetic), while any other
    missing component is still refused."""
    from types import SimpleNamespace

    from cpt.lm_loss import LogWindow

    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0, is_main_process=True,
                          reduce=lambda t, reduction: t.clone())
    a = LogWindow(acc, ["new", "old"])
    a.loss.add(torch.tensor(2.5), True)
    a.loss.add(torch.tensor(7.0), False)  # a skipped (non-finite) step does not count
    a.by_source.add(torch.tensor([0, 1, 1]), torch.tensor([1.0, 2.0, 4.0]))
    a.by_source.end_step(keep=True)
    doc, tensors = flatten({"train": TrainState(step=3), "log_window": a})
    doc = json.loads(json.dumps(doc))
    b = LogWindow(acc, ["new", "old"])
    restore({"train": TrainState(), "log_window": b}, doc, tensors)
    assert b.loss.mean(acc) == 2.5 and b.by_source.metrics() == {"train/loss/new": 1.0, "train/loss/old": 3.0}
    rank1 = SimpleNamespace(device=torch.device("cpu"), num_processes=2, process_index=1, is_main_process=False)
    d = LogWindow(rank1, ["new", "old"])
    d.load_state_dict({**doc["log_window"], "ranks": [[1.0, 1.0, 6.0, 1.0, 2.0], [4.0, 0.0, 3.0, 0.0, 1.0]]})
    assert float(d.loss.sum) == 4.0 and d.by_source.sum.tolist() == [0.0, 3.0]  # same world size: its own sums
    d.load_state_dict(doc["log_window"])  # written by 1 process: every rank the mean loss sum, the main one the rest
    assert float(d.loss.sum) == 2.5 and float(d.loss.count) == 1 and d.by_source.rows.tolist() == [0.0, 0.0]
    with pytest.raises(StateError, match="its 'log_window' state does not fit this run: .*sources"):
        restore({"log_window": LogWindow(acc, ["other"])}, doc, tensors)
    # by source name: a source added since (a new stage's) has an empty window, the others keep theirs
    e = LogWindow(acc, ["old", "web", "new"])
    e.load_state_dict(doc["log_window"])
    assert e.by_source.metrics() == {"train/loss/old": 3.0, "train/loss/new": 1.0} and e.loss.mean(acc) == 2.5
    f = LogWindow(acc, ["new", "old", "web"])
    f.load_state_dict({**doc["log_window"], "sources": ["new", "old", "gone"], "ranks": [[2.5, 1.0, 6.0, 0.0, 1.0, 2.0, 0.0]]})
    assert f.by_source.metrics() == {"train/loss/new": 1.0, "train/loss/old": 3.0}  # "gone" had no rows in it
    # the router and z terms' windows (means over the window's finite steps, as train/loss) resume too
    step = lambda z, finite=True: SimpleNamespace(loss=torch.tensor(1.0), outcome=SimpleNamespace(finite=finite),  # noqa: E731
                                                  router_aux=None, z_loss=torch.tensor(z))
    g = LogWindow(acc, ["new", "old"])
    g.add(step(0.5))
    g.add(step(float("nan"), finite=False))
    h = LogWindow(acc, ["new", "old"])
    h.load_state_dict(json.loads(json.dumps(g.state_dict())))
    h.add(step(0.25))
    assert h.term_metrics() == {"train/z_loss": 0.375} and h.loss.mean(acc) == 1.0
    older = {k: v for k, v in doc.items() if k != "log_window"}
    c = LogWindow(acc, ["new", "old"])
    restore({"train": TrainState(), "log_window": c}, older, tensors)
    assert c.by_source.metrics() == {} and float(c.loss.count) == 0
    with pytest.raises(StateError, match="holds no state for 'counter'"):
        restore({"log_window": c, "counter": Counter()}, older, tensors)


@pytest.mark.slow
def test_preempted_mid_log_window_with_every_stateful_part_resumes_exactly(tiny_cpt_data, tmp_path, monkeypatch):
    """One run with every resumable part on (two stages: mix ramp, optimizer reset, re-warm from the previous LR;
    EMA with EMA evaluations, Reptile every 3, spike skipping with an injected spike, held-out sets (one with
    max_tokens) evaluated densely after the switch, lm-eval every 5 and densely, checkpoints every 4, exports every
    6, a log line every 3 steps), preempted (the SIGTERM flag) at step 7: between two log lines, right after the
    skipped spike and a Reptile update, one step after a checkpoint and before the stage switch. `--resume` then
    logs exactly the uninterrupted run's records (losses, per-source losses, data counts, LR, counters, held-out,
    EMA and lm-eval scores) and writes the same exports, bit for bit (fp32, one CPU process)."""
    import cpt.lm_loss as lm_loss
    import cpt.train as train_mod
    from cpt.distributed import PreemptionFlag
    from safetensors.torch import load_file

    from cpt.metrics import read_metrics
    from cpt.train import train

    cfg = tiny_run_config(tiny_cpt_data, tmp_path / "ref")
    cfg["stages"] = [
        {"name": "s0", "steps": 8, "mix": {"python": 0.5, "shakespeare": 0.5},
         "schedule": {"type": "cosine", "max_lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 2}},
        {"name": "s1", "steps": 6, "mix": {"python": 0.75, "shakespeare": 0.25}, "mix_ramp": {"shakespeare": [0.5, 0.1]},
         "reset_optimizer": True,
         "schedule": {"type": "cosine", "max_lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2, "warmup_from": "previous"}}]
    cfg["data"]["heldout"][0]["max_tokens"] = 1000
    cfg["train"].update(log_every=3, ema_decay=0.9, reptile={"every": 3, "epsilon": 0.5},
                        skip_spikes={"sigma": 6.0, "window": 16, "min_history": 4})
    cfg["eval"].update(every=5, dense_steps=2, dense_every=1, ema=True, tokens_per_set=2048,
                       lm_eval={"tasks": [{"name": "cpt_shakespeare_next", "tag": "upstream"}], "limit": 4, "every": 5,
                                "dense": True, "bootstrap_iters": 10})
    cfg["checkpoint"].update(every=4, keep=5, export_every=6)

    current, stop_at = {"step": -1}, {"step": None}
    real_step, real_loss, real_requested = train_mod.train_step, lm_loss.causal_lm_loss, PreemptionFlag.requested

    def step_of(acc, model, batch, guard, step, *a, **k):
        current["step"] = step
        try:
            return real_step(acc, model, batch, guard, step, *a, **k)
        finally:
            current["step"] = -1

    def spiked(*a, **k):  # the training loss of step index 6 (update 7) times 50: a spike the guard skips
        out = real_loss(*a, **k)
        return out._replace(loss=out.loss * 50, row_losses=out.row_losses * 50) if current["step"] == 6 else out

    def requested(self, acc, step=0):
        self.flag = self.flag or step == stop_at["step"]
        return real_requested(self, acc, step)

    monkeypatch.setattr(train_mod, "train_step", step_of)
    monkeypatch.setattr(lm_loss, "causal_lm_loss", spiked)
    monkeypatch.setattr(PreemptionFlag, "requested", requested)
    quiet = lambda *a, **k: None  # noqa: E731
    train(load_config(base=cfg), echo=quiet)
    cfg["run"]["output_dir"] = str(tmp_path / "cut")
    stop_at["step"] = 7
    first = train(load_config(base=cfg), echo=quiet)
    assert (first.stopped_early, first.step) == ("preempted", 7)
    stop_at["step"] = None
    assert train(load_config(base=cfg), resume=True, echo=quiet).step == 14

    def records(run):
        out = {}
        for r in read_metrics(tmp_path / run / "metrics.jsonl"):
            out.setdefault(r["step"], {}).update({k: v for k, v in r.items() if k != "time" and not k.startswith(
                ("perf/", "time/", "compute/wall", "compute/device", "params/"))})  # (timings; params: logged at a start)
        return out

    ref, got = records("ref"), records("cut")
    assert ref[14]["train/spikes_skipped"] >= 1 and "ema/eval/python/loss" in ref[9] and "lm_eval/cpt_shakespeare_next/acc" in ref[9]
    assert got[7].keys() <= {"step", "train/tokens", "compute/flops"}  # the stopped run's closing record, no more
    del got[7]
    assert got == ref
    for export in ("export", "export-ema", "exports/step_00000006", "exports/step_00000012"):
        a, b = load_file(tmp_path / "ref" / export / "model.safetensors"), load_file(tmp_path / "cut" / export / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), export


def test_the_resumed_line_on_another_world_size_says_when_the_global_batch_changed(tmp_path):
    """A resume on another number of processes said 'the global batch and the data stream are the same' even when
    the global batch was changed with it (--allow-config-change)."""
    import json
    from types import SimpleNamespace

    import yaml

    from cpt.checkpoint import TRAINER_STATE
    from cpt.resume import world_change

    (tmp_path / TRAINER_STATE).write_text(json.dumps({"data": {"world_size": 2}}))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"train": {"global_batch_size": 8}}))
    acc = SimpleNamespace(num_processes=1, gradient_accumulation_steps=2)
    assert world_change(tmp_path, acc, 8).endswith("the global batch and the data stream are the same")
    assert world_change(tmp_path, acc, 16).endswith("the global batch is 16 sequences from here (it was 8)")
    assert world_change(tmp_path, SimpleNamespace(num_processes=2, gradient_accumulation_steps=1), 16) == ""
    # train.micro_batch_size changed, same world size: said too (README's resume table says so; it was not)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"train": {"global_batch_size": 8, "micro_batch_size": 2}}))
    line = world_change(tmp_path, SimpleNamespace(num_processes=2, gradient_accumulation_steps=4), 8)
    assert line == ("; micro-batch 1 sequences (it was 2): each process accumulates 4 micro-batch(es) per step, the "
                    "global batch and the data stream are the same"), line
    assert world_change(tmp_path, SimpleNamespace(num_processes=2, gradient_accumulation_steps=2), 8) == ""
    assert "written by 2 processes, now 1, micro-batch 4 sequences (it was 2)" in world_change(
        tmp_path, SimpleNamespace(num_processes=1, gradient_accumulation_steps=2), 8)
