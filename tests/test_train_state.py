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
    with pytest.raises(ValueError, match="differs from this config's data"):
        other.load_state_dict(state)
    with pytest.raises(StateError, match="its 'data' state does not fit this run: the data of the checkpoint"):
        restore({"data": Prefetcher(other, enabled=False)}, {"format": FORMAT, "data": state}, {})
    same = Prefetcher(CPTDataLoader(cfg.data, cfg.stages, tok, cfg.train.global_batch_size, seed=1), enabled=False)
    restore({"data": same}, {"format": FORMAT, "data": state}, {})  # through the prefetcher, before its first batch
    assert torch.equal(same.batch(1)["input_ids"], a.batch(1)["input_ids"])
    with pytest.raises(RuntimeError, match="already started"):
        same.load_state_dict(state)
