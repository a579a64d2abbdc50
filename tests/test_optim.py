"""Parameter groups (no decay for norms/biases, LR multipliers by pattern and by layer) and AdamW."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from conftest import tiny_llama
from cpt.config import OptimConfig
from cpt.optim import build_optimizer, layer_index, param_groups, set_lr


llama = partial(tiny_llama, layers=3, bias=True, max_position_embeddings=32)


def by_name(groups) -> dict[str, dict]:
    return {n: g for g in groups for n in g["param_names"]}


def test_no_decay_for_norms_and_biases_and_every_param_once():
    model = llama()
    groups = param_groups(model, weight_decay=0.1)
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each trainable parameter exactly once
    g = by_name(groups)
    assert g["model.norm.weight"]["weight_decay"] == 0.0
    assert g["model.layers.0.input_layernorm.weight"]["weight_decay"] == 0.0
    assert g["model.layers.1.self_attn.q_proj.bias"]["weight_decay"] == 0.0
    assert g["model.layers.1.self_attn.q_proj.weight"]["weight_decay"] == 0.1
    assert g["model.embed_tokens.weight"]["weight_decay"] == 0.1 and g["lm_head.weight"]["weight_decay"] == 0.1
    assert all(p.ndim >= 2 for grp in groups if grp["weight_decay"] for p in grp["params"])
    assert all(grp["lr_mult"] == 1.0 for grp in groups) and len(groups) == 2


def test_embeddings_decay_is_configurable():
    g = by_name(param_groups(llama(), 0.1, decay_embeddings=False))
    assert g["model.embed_tokens.weight"]["weight_decay"] == 0.0
    assert g["lm_head.weight"]["weight_decay"] == 0.1  # a Linear, not an embedding


def test_frozen_parameters_are_left_out():
    model = llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    names = [n for g in param_groups(model, 0.1) for n in g["param_names"]]
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" in names


def test_lr_multipliers_by_pattern_and_lower_layers_multiply():
    model = llama()
    groups = param_groups(model, 0.1, lr_multipliers={r"embed_tokens": 0.1, r"lm_head": 0.5, r"\.mlp\.": 0.2},
                          lower_layers={"below": 2, "multiplier": 0.5})
    g = by_name(groups)
    assert g["model.embed_tokens.weight"]["lr_mult"] == pytest.approx(0.1)
    assert g["lm_head.weight"]["lr_mult"] == pytest.approx(0.5)
    assert g["model.layers.0.self_attn.k_proj.weight"]["lr_mult"] == pytest.approx(0.5)
    assert g["model.layers.1.mlp.up_proj.weight"]["lr_mult"] == pytest.approx(0.1)  # 0.2 * 0.5
    assert g["model.layers.2.mlp.up_proj.weight"]["lr_mult"] == pytest.approx(0.2)
    assert g["model.layers.2.self_attn.k_proj.weight"]["lr_mult"] == 1.0
    assert g["model.norm.weight"]["lr_mult"] == 1.0
    # one group per (decay, multiplier)
    keys = [(grp["weight_decay"] > 0, grp["lr_mult"]) for grp in groups]
    assert len(keys) == len(set(keys))


def test_tied_weights_match_through_either_name():
    model = llama(tied=True)
    g = by_name(param_groups(model, 0.1, lr_multipliers={"lm_head": 0.5}))
    assert "lm_head.weight" not in g  # one tensor, listed once
    assert g["model.embed_tokens.weight"]["lr_mult"] == 0.5


def test_layer_index_parsing():
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") == 0
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_index("model.layers_norm.weight") is None


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(lr_multipliers={"embd": 0.1}), r"optim.lr_multipliers: pattern 'embd' matches no parameter"),
        (dict(lr_multipliers={"(": 0.1}), r"optim.lr_multipliers: '\(' is not a valid regex"),
        (dict(lr_multipliers={"lm_head": -1.0}), r"optim.lr_multipliers.lm_head: must be >= 0"),
        (dict(lower_layers={"below": 2}), r"optim.lower_layers: expected keys"),
        (dict(lower_layers={"below": 1.5, "multiplier": 0.5}), r"optim.lower_layers.below"),
        (dict(lower_layers={"below": 2, "multiplier": -0.5}), r"optim.lower_layers.multiplier"),
        (dict(lower_layers={"below": 40, "multiplier": 0.5}), r"optim.lower_layers.below: 40 is more than the model's"),
    ],
)
def test_bad_options_are_rejected_naming_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        param_groups(llama(), 0.1, **kw)


def test_lower_layers_needs_numbered_layers():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="optim.lower_layers: the model has no numbered layers"):
        param_groups(model, 0.1, lower_layers={"below": 1, "multiplier": 0.1})


def test_build_optimizer_and_set_lr():
    model = llama()
    cfg = OptimConfig(weight_decay=0.05, betas=(0.9, 0.99), eps=1e-7, lr_multipliers={"embed_tokens": 0.1})
    opt = build_optimizer(model, cfg, "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    assert not opt.defaults["fused"]  # fused=None: fused kernels only on CUDA
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.05}
    assert all(g["betas"] == (0.9, 0.99) and g["eps"] == 1e-7 for g in opt.param_groups)
    set_lr(opt, 2e-3)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(2e-3 * g["lr_mult"])
    assert sorted({g["lr"] for g in opt.param_groups}) == [pytest.approx(2e-4), pytest.approx(2e-3)]
    fused = build_optimizer(model, cfg.model_copy(update={"fused": True}), "cpu")
    assert fused.defaults["fused"] is True


def test_lr_multipliers_act_on_updates():
    model = llama()
    cfg = OptimConfig(weight_decay=0.1, lr_multipliers={"embed_tokens": 0.0})
    opt = build_optimizer(model, cfg, "cpu")
    set_lr(opt, 1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 64, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    after = dict(model.named_parameters())
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])  # multiplier 0: frozen
    assert not torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    # a no-decay norm weight with zero gradient would not move; q_proj with decay does
    assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"])


def test_group_order_is_deterministic_and_state_dicts_line_up():
    cfg = OptimConfig(lr_multipliers={"lm_head": 0.5}, lower_layers={"below": 1, "multiplier": 0.3})
    m1, m2 = llama(), llama()
    o1, o2 = build_optimizer(m1, cfg, "cpu"), build_optimizer(m2, cfg, "cpu")
    assert [g["param_names"] for g in o1.param_groups] == [g["param_names"] for g in o2.param_groups]
    ids = torch.randint(0, 64, (2, 8))
    m1(input_ids=ids, labels=ids).loss.backward()
    set_lr(o1, 1e-3)
    o1.step()
    o2.load_state_dict(o1.state_dict())
    assert [g["lr_mult"] for g in o2.param_groups] == [g["lr_mult"] for g in o1.param_groups]
    p1 = o1.param_groups[0]["params"][0]
    p2 = o2.param_groups[0]["params"][0]
    assert torch.equal(o1.state[p1]["exp_avg"], o2.state[p2]["exp_avg"])
