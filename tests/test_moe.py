"""Mixture-of-experts models: the router load-balancing loss is trained with (transformers leaves it out unless its
forward gets labels and output_router_logits), and FLOPs/MFU count the experts a token passes through."""

from __future__ import annotations

import shutil

import pytest
import torch

from cpt.config import ConfigError, load_config
from cpt.metrics import read_metrics
from conftest import tiny_run_config

VOCAB = 64
MOE = {  # tiny configs of three MoE families, 4 routed experts, top-2
    "mixtral": dict(num_local_experts=4),
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=32, decoder_sparse_step=1),
    "qwen2_moe": dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32),
}


def _moe(model_type: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, num_experts_per_tok=2,
                                  **MOE[model_type])
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


@pytest.mark.parametrize("model_type", sorted(MOE))
@pytest.mark.parametrize("chunked", [False, True])
def test_training_loss_is_transformers_loss_with_the_router_term(model_type, chunked):
    """cpt's loss (full logits or chunked) equals transformers' own `labels` loss with output_router_logits on:
    cross-entropy + router_aux_loss_coef x load-balancing loss, and so do the gradients; the per-row losses and
    the logged aux loss are the cross-entropy's and transformers' aux_loss."""
    from cpt import chunked_loss
    from cpt.lm_loss import LossWeights, causal_lm_loss, router_aux_coefficient

    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    ref_model, model = _moe(model_type), _moe(model_type)
    coef = router_aux_coefficient(model, None)
    assert coef == ref_model.config.router_aux_loss_coef > 0
    ref = ref_model(input_ids=ids, labels=ids, output_router_logits=True, use_cache=False)
    ref.loss.backward()
    if chunked:
        chunked_loss.install(model, chunk_tokens=5)
    got = causal_lm_loss(model, ids, None, LossWeights(router_aux=coef))
    got.loss.backward()
    assert torch.allclose(got.loss, ref.loss, atol=1e-6), (float(got.loss), float(ref.loss))
    assert torch.allclose(got.router_aux, ref.aux_loss.detach(), atol=1e-6)
    assert torch.allclose(got.row_losses.mean(), ref.loss - coef * ref.aux_loss, atol=1e-6)
    grads = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[name].grad, atol=1e-6), name
    # off: the plain next-token loss, no router term
    off = causal_lm_loss(_moe(model_type), ids, None)
    assert off.router_aux is None and torch.allclose(off.loss, ref.loss - coef * ref.aux_loss, atol=1e-6)


def test_router_coefficient_setting():
    from cpt.lm_loss import router_aux_coefficient
    from conftest import tiny_llama

    model = _moe("mixtral")
    assert router_aux_coefficient(model, 0.05) == 0.05 and router_aux_coefficient(model, 0.0) == 0.0
    assert router_aux_coefficient(tiny_llama(), None) == 0.0  # dense: nothing to add
    with pytest.raises(ConfigError, match=r"train.router_aux_loss_coef: 0.01 is set, but LlamaForCausalLM has no router"):
        router_aux_coefficient(tiny_llama(), 0.01)


def test_flops_count_the_experts_a_token_uses():
    """6N of a mixture of experts counts its routed experts by top-k / E (here 2 of 4); shared experts, attention,
    routers and embeddings in full. A dense model's active count is its parameter count."""
    from cpt.model import model_shape
    from cpt.throughput import model_flops_per_token, shape_flops_per_token
    from conftest import tiny_llama

    model = _moe("qwen2_moe")
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    shared = sum(p.numel() for n, p in model.named_parameters() if ".shared_expert." in n)
    total = sum(p.numel() for p in model.parameters())
    assert routed > 0 and shared > 0
    shape = model_shape(model)
    assert shape["n_params"] == total and shape["n_params_active"] == total - routed // 2
    assert shape_flops_per_token(shape, 16) == model_flops_per_token(total - routed // 2, 2, 32, 16)
    dense = model_shape(tiny_llama())
    assert dense["n_params_active"] == dense["n_params"] and dense["n_trainable_active"] == dense["n_trainable"]


def test_moe_run_logs_the_router_loss_and_resumes_exactly(tiny_cpt_data, tmp_path):
    """`cpt train` of a Mixtral built from `model.arch`: the start-up line, train/router_aux_loss at every log step
    (near top-k = 2 for a balanced router), and a run stopped at step 3 resumes onto the uninterrupted records."""
    from cpt.train import train

    def cfg(out, steps):
        c = tiny_run_config(tiny_cpt_data, out, eval={"at_start": False}, checkpoint={"every": 3, "export_at_end": False})
        c["model"]["arch"] = {"model_type": "mixtral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
                              "num_experts_per_tok": 2, "max_position_embeddings": 256}
        c["stages"][0]["steps"] = steps
        c["data"]["heldout"] = []
        return c

    lines: list[str] = []
    train(load_config(base=cfg(tmp_path / "full", 6)), echo=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert any("router load-balancing loss x 0.001 (the model's router_aux_loss_coef)" in line for line in lines), lines
    full = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "train/loss" in r]
    assert len(full) == 6 and all(1.9 < r["train/router_aux_loss"] < 4.0 for r in full), full
    shutil.copytree(tmp_path / "full", tmp_path / "part")  # as if stopped after its step-3 checkpoint
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step_00000006")
    train(load_config(base=cfg(tmp_path / "part", 6)), resume=True, echo=lambda *a, **k: None)
    part = [r for r in read_metrics(tmp_path / "part" / "metrics.jsonl") if "train/loss" in r]
    keys = ("step", "train/loss", "train/router_aux_loss", "train/grad_norm")
    assert [[r[k] for k in keys] for r in part] == [[r[k] for k in keys] for r in full]



def test_lora_on_a_mixture_of_experts_trains_with_the_router_term():
    """peft (0.21) adapts the fused experts too under `all-linear`; through the PeftModel the loss is still
    transformers' labelled loss with the router term, and the coefficient is found through the wrapper."""
    from cpt.adapters import apply_lora
    from cpt.config import LoraConfig
    from cpt.lm_loss import LossWeights, causal_lm_loss, router_aux_coefficient

    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    model = apply_lora(_moe("qwen3_moe"), LoraConfig(r=2, target_modules="all-linear"))
    assert any("lora_" in n for n, _ in model.named_parameters() if ".experts." in n)
    coef = router_aux_coefficient(model, None)
    assert coef == 0.001
    ref = model(input_ids=ids, labels=ids, output_router_logits=True, use_cache=False).loss
    assert torch.allclose(causal_lm_loss(model, ids, None, LossWeights(router_aux=coef)).loss, ref, atol=1e-6)


def _compiled_like_eager(eager_model, model, mode, graphs: int, ids, weights) -> list[str]:
    """``model`` under model.compile ``mode`` (aot_eager) against its eager twin: no graph break, ``graphs`` graphs, eager's
    loss and router loss, and eager's gradient for every trained parameter (whose names are returned)."""
    from torch._dynamo.utils import counters

    from cpt.compiling import compile_model
    from cpt.lm_loss import causal_lm_loss

    eager = causal_lm_loss(eager_model, ids, None, weights)
    eager.loss.backward()
    torch._dynamo.reset()
    counters.clear()
    got = causal_lm_loss(compile_model(model, mode, backend="aot_eager"), ids, None, weights)
    got.loss.backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch.allclose(got.loss, eager.loss, atol=1e-6) and torch.allclose(got.router_aux, eager.router_aux, atol=1e-6)
    grads = dict(eager_model.named_parameters())
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(torch.allclose(p.grad, grads[n].grad, atol=1e-6) for n, p in trained)
    return [n for n, _ in trained]


@pytest.mark.parametrize("mode, graphs", [(True, 1), ("regional", 2)])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_compile_traces_the_router_loss_without_graph_breaks(mode, graphs, checkpointed):
    """model.compile of an MoE trained with its router term, with and without gradient checkpointing. Whole:
    transformers installed its router-logit hooks inside the first compiled forward (8 graph breaks, kept in the
    compiled code). Regional: the hook in every layer read transformers' ContextVar (6 breaks, 7 graphs). Checkpointed:
    the hook's append inside the checkpointed layer broke each layer's graph. Now one graph (regional: 2 for the layer
    code, as layer 0's input needs no gradient), with eager's loss, router loss and gradients (each router recorded
    once)."""
    from cpt.layer_options import checkpoint_layers
    from cpt.lm_loss import LossWeights

    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    weights = LossWeights(router_aux=0.01, z=1e-3)
    eager_model, model = _moe("mixtral"), _moe("mixtral")
    if checkpointed:
        checkpoint_layers(model, 1, mode)
    trained = _compiled_like_eager(eager_model, model, mode, graphs, ids, weights)
    assert len(trained) == len(list(model.parameters()))


@pytest.mark.parametrize("mode, graphs", [(True, 1), ("regional", 2)])
def test_compile_traces_lora_on_the_fused_experts(mode, graphs):
    """LoRA (all-linear) on a mixture of experts under model.compile. peft adapts the fused expert weights through
    ParamWrapper, whose forward registers and removes an nn.utils.parametrize parametrization: dynamo could not
    trace it (regional: 8 graph breaks, 16 graphs; the experts ran eagerly every step). Now one graph (regional: 2),
    with peft's eager loss, router loss and LoRA gradients, and the model's weights and parametrizations untouched."""
    from cpt.adapters import apply_lora
    from cpt.config import LoraConfig
    from cpt.lm_loss import LossWeights

    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    weights = LossWeights(router_aux=0.01)
    models = []
    for _ in range(2):
        m = apply_lora(_moe("mixtral"), LoraConfig(r=2, target_modules="all-linear"))
        for n, p in m.named_parameters():  # peft starts B at zero: give the adapters something to add
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(n)))
        models.append(m)
    eager_model, model = models
    assert any(".experts." in n and "lora_A" in n for n, _ in model.named_parameters())
    assert _compiled_like_eager(eager_model, model, mode, graphs, ids, weights)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    assert set(model.state_dict()) == set(eager_model.state_dict())


def test_lora_on_fused_experts_is_said_and_refused_by_adapter_averaging(tmp_path):
    """peft adapts a Mixtral's fused gate_up_proj at rank 2r / alpha 2 alpha (its two projections at r each) and said
    in a RuntimeWarning that these patterns "were ignored" (they are applied: the factors have rank 2r): now one log
    line says what is adapted, at what rank. `cpt average` of two such adapters refused them as having a
    rank_pattern; their factors interleave every expert's rank rows, so a side-by-side cat would be wrong anyway: the
    refusal now says why and what to do (merge each, average the merged models)."""
    import warnings

    from cpt.adapters import apply_lora
    from cpt.export import save_adapter
    from cpt.averaging import average_checkpoints
    from cpt.config import LoraConfig

    lines: list[str] = []
    adapters = []
    for i in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = apply_lora(_moe("mixtral", seed=i), LoraConfig(r=2, alpha=4, target_modules="all-linear"),
                               log_fn=lines.append)
        assert not [w for w in caught if "pattern" in str(w.message)], [str(w.message) for w in caught]
        adapters.append(save_adapter(model, tmp_path / f"a{i}"))
    a_gate_up = dict(model.named_parameters())["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.default.weight"]
    assert a_gate_up.shape[0] == 4 * 4  # 4 experts x rank 2r
    assert lines[0] == ("model.lora: peft also adapts the experts' fused weights down_proj, gate.weight, gate_up_proj; "
                        "gate_up_proj at rank 4, alpha 8 (it fuses 2 projections, each at r=2)"), lines
    with pytest.raises(ValueError, match=r"fused expert weights .*cannot be averaged factor by factor: merge each"):
        average_checkpoints(adapters, tmp_path / "avg")
