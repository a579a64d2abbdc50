"""model.config_overrides (long-context CPT: a longer context and a larger RoPE base on a pretrained model):
applied before the weights load, checked against the config's real fields, carried into the HF export."""

import pytest
import torch

from cpt.config import load_config
from cpt.model import ModelLoadError, apply_config_overrides, build_model, load_tokenizer

LONG = {"max_position_embeddings": 256, "rope_parameters": {"rope_type": "default", "rope_theta": 1.0e6}}


def model_cfg(path, **overrides):
    base = {"model": {"name_or_path": str(path), **overrides}, "data": {"sources": [{"name": "a", "path": "x"}]},
            "stages": [{"steps": 1, "mix": {"a": 1}}]}
    return load_config(base=base).model


def test_overrides_change_the_loaded_model(tiny_base):
    tok = load_tokenizer(model_cfg(tiny_base))
    plain = build_model(model_cfg(tiny_base), tok)
    long = build_model(model_cfg(tiny_base, config_overrides=LONG), tok)
    assert long.config.max_position_embeddings == 256 and long.config.rope_parameters["rope_theta"] == 1.0e6
    # same weights, another RoPE base: different inverse frequencies and logits
    for (n, a), (_, b) in zip(plain.state_dict().items(), long.state_dict().items(), strict=True):
        if "rotary" not in n:
            assert torch.equal(a, b), n
    assert not torch.allclose(plain.model.rotary_emb.inv_freq, long.model.rotary_emb.inv_freq)
    ids = torch.arange(40)[None] % len(tok)
    with torch.no_grad():
        assert not torch.allclose(plain(ids).logits, long(ids).logits, atol=1e-4)


def test_misspelt_override_is_an_error(tiny_base):
    from transformers import LlamaConfig

    with pytest.raises(ModelLoadError, match=r"\['rope_theta'\].*similar fields: \['rope_parameters'\]"):
        apply_config_overrides(LlamaConfig(), {"rope_theta": 1e6})  # transformers 5 keeps it in rope_parameters
    tok = load_tokenizer(model_cfg(tiny_base))
    with pytest.raises(ModelLoadError, match="max_position_embedings"):
        build_model(model_cfg(tiny_base, config_overrides={"max_position_embedings": 4096}), tok)


@pytest.mark.slow
def test_long_context_cpt_run_exports_the_new_config(tiny_cpt_data, tiny_base, tmp_path, capsys):
    from transformers import AutoConfig

    from conftest import tiny_run_config
    from cpt.train import train

    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_cpt_data, out, checkpoint={"every": None}, eval={"at_start": False})
    cfg["model"] = {"name_or_path": str(tiny_base), "config_overrides": LONG}
    cfg["data"]["seq_len"] = 128  # twice the base model's context (64)
    cfg["data"]["heldout"] = []
    cfg["stages"][0]["steps"] = 3
    said = []
    train(load_config(base=cfg), echo=lambda *a, **k: said.append(" ".join(map(str, a))))
    exported = AutoConfig.from_pretrained(out / "export")
    assert exported.max_position_embeddings == 256 and exported.rope_parameters["rope_theta"] == 1.0e6
    assert not any("longer than the model's context" in s for s in said)
    # the same run without the overrides warns that it trains beyond the model's context
    cfg["model"] = {"name_or_path": str(tiny_base)}
    cfg["run"]["output_dir"] = str(tmp_path / "run2")
    said.clear()
    train(load_config(base=cfg), echo=lambda *a, **k: said.append(" ".join(map(str, a))))
    assert any("data.seq_len 128 is longer than the model's context (max_position_embeddings 64)" in s for s in said)


def test_partial_rope_parameters_update_the_models_own():
    """``{rope_parameters: {rope_theta: X}}`` raises the base and keeps the model's RoPE type and scaling (it was a
    KeyError 'rope_type' traceback when the model was built); another rope_type replaces the parameters."""
    from transformers import LlamaConfig

    llama3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    config = LlamaConfig(max_position_embeddings=131072, rope_parameters=dict(llama3))
    apply_config_overrides(config, {"rope_parameters": {"rope_theta": 4e6}})
    assert config.rope_parameters == {**llama3, "rope_theta": 4e6}
    config = LlamaConfig(max_position_embeddings=131072, rope_parameters=dict(llama3))
    apply_config_overrides(config, {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}
    from transformers import GPTNeoXConfig  # (partial rotary: another rope_type keeps how much of a head rotates)

    config = GPTNeoXConfig(rotary_pct=0.25)
    apply_config_overrides(config, {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}})
    assert config.rope_parameters == {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4, "partial_rotary_factor": 0.25}


@pytest.mark.parametrize("rope_type", ["yarn", "llama3"])
def test_scaled_rope_takes_the_models_context_as_the_original(tiny_base, rope_type):
    """A yarn/llama3 override next to a raised max_position_embeddings, without original_max_position_embeddings:
    the original context is the model's own (64), not the raised one (transformers silently took 256, other
    frequencies than the same config written out in full)."""
    tok = load_tokenizer(model_cfg(tiny_base))
    rope = {"rope_type": rope_type, "rope_theta": 10000.0, "factor": 4.0}
    if rope_type == "llama3":
        rope.update(low_freq_factor=1.0, high_freq_factor=4.0)
    implicit = build_model(model_cfg(tiny_base, config_overrides={"max_position_embeddings": 256, "rope_parameters": rope}), tok)
    explicit = build_model(model_cfg(tiny_base, config_overrides={
        "max_position_embeddings": 256, "rope_parameters": {**rope, "original_max_position_embeddings": 64}}), tok)
    assert implicit.config.rope_parameters["original_max_position_embeddings"] == 64
    assert torch.equal(implicit.model.rotary_emb.inv_freq, explicit.model.rotary_emb.inv_freq)
    assert implicit.model.rotary_emb.attention_scaling == explicit.model.rotary_emb.attention_scaling


def test_incomplete_rope_parameters_are_one_line(tiny_base):
    tok = load_tokenizer(model_cfg(tiny_base))
    with pytest.raises(ModelLoadError, match=r"^model.config_overrides.rope_parameters: Missing required keys .*'factor'"):
        build_model(model_cfg(tiny_base, config_overrides={"rope_parameters": {"rope_type": "linear"}}), tok)


def test_model_arch_keys_and_values_are_checked_against_the_config_class():
    """model.arch built a model from any keys: a misspelt one was kept unused (the default 32 layers built silently);
    a value transformers refuses, and an unknown model_type, were tracebacks (the type: an 11,933-character line)."""
    from cpt.model import ModelLoadError, config_from_arch

    arch = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 128, "vocab_size": 256}
    assert config_from_arch(arch).num_hidden_layers == 2
    assert config_from_arch({**arch, "rope_theta": 5e5}).rope_parameters["rope_theta"] == 5e5  # (converted: known)
    bad = {k if k != "num_hidden_layers" else "num_hiden_layers": v for k, v in arch.items()}
    with pytest.raises(ModelLoadError, match=r"^model.arch: num_hiden_layers: not a field of LlamaConfig .*; similar "
                                             r"fields: num_hidden_layers$"):
        config_from_arch(bad)
    with pytest.raises(ModelLoadError, match=r"^model.arch: .*not a multiple of the number of attention heads \(5\)"):
        config_from_arch({**arch, "num_attention_heads": 5})
    with pytest.raises(ModelLoadError, match=r"^model.arch: .*hidden_size.*expected int, got str"):
        config_from_arch({**arch, "hidden_size": "abc"})
    with pytest.raises(ModelLoadError, match=r"^model.arch.model_type: 'lama' is not a model type of transformers "
                                             r"\(similar: llama, .*\)$") as e:
        config_from_arch({**arch, "model_type": "lama"})
    assert len(str(e.value)) < 200
    with pytest.raises(ModelLoadError, match=r"^model: hidden_sise"):  # (an experiment spec's `model`)
        config_from_arch({**arch, "hidden_sise": 8}, field="model")


def test_model_arch_takes_what_the_model_code_reads_beyond_the_config_fields():
    """Qwen3-MoE's modeling reads `head_dim` (getattr with a default), which is not a field of Qwen3MoeConfig: the
    check of model.arch keys refused it, so such a shape (head_dim != hidden / heads) could not be built."""
    from transformers import AutoModelForCausalLM

    from cpt.model import config_from_arch

    config = config_from_arch({"model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 1,
                               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 96,
                               "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2, "vocab_size": 64})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (4 * 32, 64)


def test_a_lora_adapter_of_a_long_context_run_carries_its_overrides_to_merge_and_eval(tiny_base, tmp_path, capsys):
    """A LoRA run with model.config_overrides (RoPE scaling, a longer context): its adapter export recorded nothing of
    them, so `cpt merge`, `cpt eval` (and peft on the named base) rebuilt the base with its own RoPE and context and
    gave other losses, silently. cpt_adapter.json records them; loading the adapter applies them."""
    import json

    from cpt.export import save_adapter
    from cpt.model import load_adapter_model, merge_adapter, prepare_model

    rope = {"rope_type": "yarn", "factor": 4.0}
    cfg = model_cfg(tiny_base, config_overrides={"max_position_embeddings": 256, "rope_parameters": rope},
                    lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    model, tok, _ = prepare_model(cfg, build_model(cfg, tok), tok, log_fn=lambda *a: None)
    with torch.no_grad():  # (trained LoRA weights, so that the adapter changes the outputs)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    save_adapter(model, tmp_path / "adapter", tok)
    recorded = json.loads((tmp_path / "adapter" / "cpt_adapter.json").read_text())["config_overrides"]
    assert recorded["max_position_embeddings"] == 256 and recorded["rope_parameters"]["rope_type"] == "yarn"
    assert recorded["rope_parameters"]["rope_theta"] == model.get_base_model().config.rope_parameters["rope_theta"]
    loaded, _ = load_adapter_model(tmp_path / "adapter")
    ids = torch.randint(0, len(tok), (1, 200))
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
    merged = merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    config = json.loads((merged / "config.json").read_text())
    assert config["max_position_embeddings"] == 256 and config["rope_parameters"]["rope_type"] == "yarn"


def test_bad_rope_and_size_overrides_are_one_line(tiny_base):
    """Another rope_type without rope_theta (yarn's frequencies from None: a TypeError traceback), an unknown type (a
    KeyError), a size that is not a positive whole number (-5 was exported; "abc" a validator's traceback)."""
    cfg = model_cfg(tiny_base)
    tok = load_tokenizer(cfg)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    built = build_model(model_cfg(tiny_base, config_overrides={"rope_parameters": yarn}), tok)
    assert built.config.rope_parameters["rope_theta"] == build_model(cfg, tok).config.rope_parameters["rope_theta"]
    for overrides, said in (({"rope_parameters": {"rope_type": "yarnn", "factor": 2.0}}, "rope_parameters.rope_type: 'yarnn' is not a RoPE type"),
                            ({"max_position_embeddings": -5}, "max_position_embeddings: -5: give a whole number >= 1"),
                            ({"rope_parameters": {"rope_type": "linear", "factor": -4.0}},
                             "rope_parameters.factor: -4.0: give a number >= 1"),  # (transformers only logged it)
                            ({"max_position_embeddings": "abc"}, "max_position_embeddings: 'abc': give a whole number")):
        with pytest.raises(ModelLoadError, match=f"^model.config_overrides.{said}"):
            build_model(model_cfg(tiny_base, config_overrides=overrides), tok)
