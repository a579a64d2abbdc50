"""Activation checkpointing of every N-th decoder layer (model.gradient_checkpointing_every, cpt/layer_options.py):
which layers recompute, that the numbers do not change, the config's rules, and a run through cpt's loop.
(Liger's kernels, the other option of that module, are tested in tests/test_liger.py.)"""

from __future__ import annotations

import pytest
import torch
from conftest import Echo, tiny_llama, tiny_run_config
from launching import records

from cpt.config import ConfigError, LoraConfig, ModelConfig, load_config
from cpt.layer_options import checkpoint_layers


def _step(model, ids):
    """Which decoder layers' MLPs ran, in order (a recomputed layer runs again in backward), the loss, the gradients."""
    calls = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda *a, i=i: calls.append(i))
             for i, layer in enumerate(model.get_base_model().model.layers if hasattr(model, "get_base_model")
                                       else model.model.layers)]
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return calls, loss.detach(), grads


@pytest.mark.parametrize("lora", [False, True])
def test_every_nth_layer_is_recomputed_and_the_step_is_bitwise_the_same(lora):
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))

    def model():
        m = tiny_llama(layers=4)
        if lora:
            from cpt.adapters import apply_lora

            m = apply_lora(m, LoraConfig(r=4, alpha=8), log_fn=lambda *a: None)
        return m

    plain_calls, plain_loss, plain_grads = _step(model(), ids)
    assert plain_calls == [0, 1, 2, 3]
    for every, recomputed in ((1, [3, 2, 1, 0]), (2, [2, 0]), (3, [3, 0]), (4, [0])):
        m = model()
        checkpoint_layers(m, every)
        calls, loss, grads = _step(m, ids)
        assert calls == [0, 1, 2, 3, *recomputed], (every, calls)
        assert torch.equal(loss, plain_loss)
        assert grads.keys() == plain_grads.keys() and all(torch.equal(grads[n], plain_grads[n]) for n in grads)


def test_a_transformers_without_every_n_layers_is_one_config_error():
    class OldModel(torch.nn.Module):  # transformers before activation_checkpointing_enable(every_n_layers)
        def __init__(self):
            super().__init__()
            self.calls = []

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.calls.append(gradient_checkpointing_kwargs)

    old = OldModel()
    checkpoint_layers(old, 1)
    assert old.calls == [{"use_reentrant": False}]
    with pytest.raises(ConfigError, match=r"^model.gradient_checkpointing_every: 2 needs a transformers with "):
        checkpoint_layers(old, 2)


def test_the_setting_needs_gradient_checkpointing_and_a_positive_number():
    ModelConfig(name_or_path="x", gradient_checkpointing=True, gradient_checkpointing_every=2)
    with pytest.raises(ValueError, match="model.gradient_checkpointing_every needs model.gradient_checkpointing: true"):
        ModelConfig(name_or_path="x", gradient_checkpointing_every=2)
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        ModelConfig(name_or_path="x", gradient_checkpointing=True, gradient_checkpointing_every=0)


def test_a_run_checkpointing_every_second_layer_logs_the_losses_of_one_without(tiny_cpt_data, tmp_path, monkeypatch):
    """Through cpt's loop (chunked loss, per-source losses, held-out evaluation): the same numbers as without
    checkpointing; the setting may change on --resume (it is not part of the trajectory)."""
    from cpt.config.run import config_to_dict, trajectory_changes
    from cpt.train import train

    def run(name, **model):
        cfg = tiny_run_config(tiny_cpt_data, tmp_path / name, checkpoint={"every": None}, eval={"every": 2})
        cfg["stages"][0]["steps"] = 3
        cfg["model"].update(model)
        train(load_config(base=cfg), echo=Echo())
        return [{k: v for k, v in r.items() if k.startswith(("train/loss", "eval/"))} for r in records(tmp_path / name)]

    import cpt.layer_options

    applied = []
    monkeypatch.setattr(cpt.layer_options, "checkpoint_layers",
                        lambda model, every, *mode: applied.append(every) or checkpoint_layers(model, every, *mode))
    plain = run("plain")
    assert applied == []
    assert sum("train/loss/python" in r for r in plain) == 3 and sum(any(k.startswith("eval/") for k in r) for r in plain) >= 2
    assert run("every2", gradient_checkpointing=True, gradient_checkpointing_every=2) == plain
    assert applied == [2]
    a = load_config(base=tiny_run_config(tiny_cpt_data, tmp_path / "a"))
    b = a.model_copy(update={"model": a.model.model_copy(update={"gradient_checkpointing": True,
                                                                 "gradient_checkpointing_every": 2})})
    assert trajectory_changes(config_to_dict(a), b) == []
    c = a.model_copy(update={"model": a.model.model_copy(update={"attn_implementation": "eager",
                                                                 "name_or_path": "another"})})
    assert trajectory_changes(config_to_dict(a), c) == []  # (NOT_TRAJECTORY: names, kernels, checkpointing)
    d = a.model_copy(update={"train": a.train.model_copy(update={"global_batch_size": 32})})
    assert trajectory_changes(config_to_dict(a), d) != []  # (the comparison can fail)
