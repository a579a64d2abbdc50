"""LoRA through peft, adapter save/merge, and partial freezing (cpt/adapters.py, `cpt merge`)."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from functools import partial

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from conftest import tiny_llama
from cpt.demo import byte_level_bpe

from cpt.adapters import (
    FreezeConfig,
    LoraConfig,
    apply_freeze,
    apply_lora,
    count_parameters,
    describe_trainable,
    find_decoder_layers,
    layer_indices,
)
from cpt.export import save_adapter
from cpt.model import merge_adapter

CORPUS = ["To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"] * 10


tiny_model = partial(tiny_llama, vocab=300, hidden=64, intermediate=128, layers=4, training=False)


@pytest.fixture
def base_dir(tmp_path):
    d = tmp_path / "base"
    tiny_model().save_pretrained(d)
    byte_level_bpe(CORPUS, 300).save_pretrained(d)
    return d


def _perturb_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "trainable_tokens_delta" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_lora_all_linear_targets_every_projection_but_not_lm_head():
    model = apply_lora(tiny_model(), LoraConfig(r=4, alpha=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    targeted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head" in n for n in trainable)
    t, total = count_parameters(model)
    # per layer: 4 attention (64->64) + 3 mlp (64<->128) projections, each r*(in+out)
    per_layer = 4 * 4 * (64 + 64) + 3 * 4 * (64 + 128)
    assert t == 4 * per_layer
    assert total == count_parameters(tiny_model())[1] + t
    assert describe_trainable(model) == f"trainable params: {t:,} of {total:,} ({100 * t / total:.2f}%)"


def test_lora_modules_to_save_and_norms_are_trained_in_full():
    model = apply_lora(tiny_model(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                modules_to_save=["embed_tokens", "lm_head"], train_norms=True))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("embed_tokens.modules_to_save" in n for n in trainable)
    assert any("lm_head.modules_to_save" in n for n in trainable)
    assert sum("layernorm.modules_to_save" in n for n in trainable) == 8  # 2 norms x 4 layers
    assert any(n.endswith("model.norm.modules_to_save.default.weight") for n in trainable)
    assert not any("k_proj.lora" in n or "mlp" in n and "lora" in n for n in trainable)


def test_adapter_saved_in_peft_format_and_merge_matches_base_plus_adapter(base_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tok = PreTrainedTokenizerFast.from_pretrained(base_dir)
    model = apply_lora(base, LoraConfig(r=4, alpha=8, modules_to_save=["lm_head"]))
    _perturb_lora(model)
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.1)
    adapter = save_adapter(model, tmp_path / "adapter", tokenizer=tok)
    files = set(os.listdir(adapter))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "cpt_adapter.json"} <= files
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    assert acfg["peft_type"] == "LORA" and acfg["r"] == 4 and acfg["base_model_name_or_path"] == str(base_dir)

    ids = torch.tensor([tok("To be, or not to be: the question")["input_ids"]])
    with torch.no_grad():
        expected = model(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()(ids).logits
    assert (expected - plain).abs().max() > 1e-3  # the adapter really changes the model

    out = merge_adapter(adapter, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        got = merged(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_cli_merge_with_explicit_base(base_dir, tmp_path):
    from cpt.commands.merge import main

    model = apply_lora(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), LoraConfig(r=2))
    _perturb_lora(model, seed=3)
    adapter = save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "/nonexistent"  # --base must win
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    assert main([str(adapter), "--out", str(tmp_path / "m"), "--base", str(base_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    ids = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model.eval()(ids).logits, atol=1e-5, rtol=1e-5)


def test_layer_specs():
    assert layer_indices("0-6", 12) == [0, 1, 2, 3, 4, 5]
    assert layer_indices("bottom_half", 12) == list(range(6))
    assert layer_indices("top_half", 5) == [3, 4]
    assert layer_indices("every_other", 5) == [0, 2, 4]
    assert layer_indices("0-2,7", 10) == [0, 1, 7]
    assert layer_indices("-2-10", 10) == [8, 9]
    with pytest.raises(ValueError):
        layer_indices("0-13", 12)
    with pytest.raises(ValueError):
        FreezeConfig(layers="first four")
    with pytest.raises(ValueError):
        FreezeConfig(patterns=["("])


def _layer_params(model, i):
    return sum(p.numel() for n, p in model.named_parameters() if f"layers.{i}." in n)


def test_freeze_bottom_half_counts():
    model = tiny_model()
    total = count_parameters(model)[1]
    frozen = apply_freeze(model, FreezeConfig(layers="bottom_half"))
    assert frozen and all(n.startswith(("model.layers.0.", "model.layers.1.")) for n in frozen)
    t, tot = count_parameters(model)
    assert tot == total and t == total - _layer_params(model, 0) - _layer_params(model, 1)
    assert all(p.requires_grad for n, p in model.named_parameters() if "layers.3." in n or "lm_head" in n)


def test_freeze_range_and_patterns_and_train_only():
    model = tiny_model()
    apply_freeze(model, FreezeConfig(layers="1-3", patterns=[r"embed_tokens", r"mlp\.down_proj"]))
    state = {n: p.requires_grad for n, p in model.named_parameters()}
    assert not state["model.embed_tokens.weight"] and state["lm_head.weight"]
    assert not state["model.layers.1.self_attn.q_proj.weight"] and not state["model.layers.2.mlp.up_proj.weight"]
    assert state["model.layers.0.self_attn.q_proj.weight"] and not state["model.layers.0.mlp.down_proj.weight"]
    assert state["model.layers.3.mlp.up_proj.weight"] and not state["model.layers.3.mlp.down_proj.weight"]

    model = tiny_model()
    apply_freeze(model, FreezeConfig(train_only=[r"layers\.3\.", r"lm_head"]))
    t, _ = count_parameters(model)
    assert t == _layer_params(model, 3) + model.lm_head.weight.numel()
    with pytest.raises(ValueError, match="nothing would be trained"):
        apply_freeze(tiny_model(), FreezeConfig(patterns=[".*"]))
    # a pattern that matches no parameter (a typo) froze nothing, silently: full CPT instead of partial freezing
    with pytest.raises(ValueError, match=r"^model.freeze.patterns: no parameter of this LlamaForCausalLM matches "
                                         r"mlp\\.dwn_proj \(its names look like model\."):
        apply_freeze(tiny_model(), FreezeConfig(patterns=[r"embed_tokens", r"mlp\.dwn_proj"]))
    with pytest.raises(ValueError, match=r"^model.freeze.train_only: no parameter of this LlamaForCausalLM matches lm_haed "):
        apply_freeze(tiny_model(), FreezeConfig(train_only=[r"layers\.3\.", "lm_haed"]))
    lora = apply_lora(tiny_model(), LoraConfig(r=2))  # a pattern matching only frozen base weights is no typo
    assert apply_freeze(lora, FreezeConfig(patterns=[r"base_layer"])) == []


def test_freeze_names_of_a_tied_head_reach_the_shared_tensor():
    """A tied lm_head.weight is the embedding's tensor, listed once under model.embed_tokens.weight: ``patterns:
    [lm_head]`` froze nothing and ``train_only: [lm_head]`` froze the head (every name of a tensor counts now)."""
    model = tiny_model(tied=True)
    assert apply_freeze(model, FreezeConfig(patterns=["lm_head"])) == ["model.embed_tokens.weight"]
    assert not model.lm_head.weight.requires_grad
    model = tiny_model(tied=True)
    apply_freeze(model, FreezeConfig(train_only=["lm_head"]))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["model.embed_tokens.weight"]


@pytest.mark.parametrize("tied", [True, False])
def test_freezing_the_rows_of_new_tokens_is_refused(tied):
    """model.vocab + a freeze spec that freezes the embedding (or, with LoRA, peft's new-token rows): the new tokens'
    rows would keep their initial values, silently (the data is tokenized with them)."""
    new = [300, 301]
    for spec in (FreezeConfig(patterns=["embed_tokens"]), FreezeConfig(train_only=[r"layers\."])):
        model = tiny_model(tied=tied)
        model.resize_token_embeddings(302)
        with pytest.raises(ValueError, match=r"model.freeze freezes .*holds the rows of model.vocab's 2 new tokens"):
            apply_freeze(model, spec, new_token_ids=new)
    model = tiny_model(tied=tied)
    model.resize_token_embeddings(302)
    apply_freeze(model, FreezeConfig(layers="bottom_half"), new_token_ids=new)  # the embeddings stay trainable
    lora = apply_lora(model, LoraConfig(r=2), new_token_ids=new)
    with pytest.raises(ValueError, match="trainable_tokens_delta"):
        apply_freeze(lora, FreezeConfig(patterns=["embed_tokens"]), new_token_ids=new)


def test_freeze_after_lora_freezes_the_bottom_adapters():
    model = apply_lora(tiny_model(), LoraConfig(r=2))
    assert find_decoder_layers(model) == ("base_model.model.model.layers", 4)
    before = count_parameters(model)[0]
    apply_freeze(model, FreezeConfig(layers="bottom_half"))
    after = count_parameters(model)[0]
    assert after == before // 2
    assert all(not p.requires_grad for n, p in model.named_parameters() if "layers.0." in n)


def test_adapter_keys_are_everything_but_the_frozen_base_and_the_fingerprint_sees_only_the_base():
    """What a LoRA resume checkpoint holds (cpt/adapter_checkpoint.py): LoRA A/B (also those model.freeze froze), the
    modules_to_save and norm copies, the new vocabulary rows; not the base. The base fingerprint ignores the adapter
    and changes with any base weight."""
    from cpt.adapters import adapter_keys, base_fingerprint

    model = apply_lora(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                                train_norms=True), new_token_ids=[298, 299])
    apply_freeze(model, FreezeConfig(layers="bottom_half"))
    keys = adapter_keys(model)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in keys  # frozen, still saved
    assert "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default" in keys
    assert "base_model.model.lm_head.modules_to_save.default.weight" in keys
    assert "base_model.model.model.norm.modules_to_save.default.weight" in keys
    assert not any("base_layer" in k or "original_module" in k for k in keys)
    sd = model.state_dict()
    assert {k for k in sd if k not in keys} == {k for k in sd if ".default" not in k}  # the rest is the base
    before = model._cpt_base_fingerprint  # (apply_lora records it)
    assert before == base_fingerprint(model)
    _perturb_lora(model)
    assert base_fingerprint(model) == before
    with torch.no_grad():
        model.get_base_model().model.layers[2].mlp.up_proj.weight[5, 7] += 1e-6
    assert base_fingerprint(model) != before
    with torch.device("meta"):  # weights not here (as ZeRO-3's placeholders): none, not a crash at apply_lora
        assert apply_lora(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"]))._cpt_base_fingerprint is None


def test_a_freeze_checkpoint_without_its_frozen_layers_is_read_by_what_fits_its_base(tmp_path):
    """cpt/adapter_checkpoint.py for a model.freeze model (no LoRA): the state holds the trainable tensors alone, and
    is read by a model of the same base whatever it freezes (the tensors the checkpoint lacks hashed again), refused
    in one line by a LoRA model, by a model whose frozen weights differ, and by a wrong kind of checkpoint."""
    from cpt.adapter_checkpoint import (AdapterCheckpointError, adapter_items, check_fits, load_adapter_state,
                                        note_loaded_base, without_base)
    from safetensors.torch import load_file

    from cpt.adapters import note_base
    from cpt.checkpoint_files import write_files

    def frozen(layers="bottom_half"):
        torch.manual_seed(0)
        m = tiny_model()
        apply_freeze(m, FreezeConfig(layers=layers))
        note_base(m)
        return m

    model = frozen()
    with torch.no_grad():
        model.model.layers[3].mlp.up_proj.weight.add_(1.0)  # "trained"
    write_files(tmp_path, [(n, k, p) for n, k, p in adapter_items(model)], 1)
    state = load_file(tmp_path / "adapter_state.safetensors")
    assert state and not any(k.startswith(("model.layers.0.", "model.layers.1.")) for k in state)
    check_fits(tmp_path, frozen())  # the same base
    other = frozen("0-1")  # freezes less: layer 1 (saved by neither) compared as the checkpoint left it out
    check_fits(tmp_path, other)
    load_adapter_state(other, tmp_path)
    note_loaded_base(other, tmp_path, adapter=True)  # its frozen part is still the base as built
    assert without_base(other) and torch.equal(other.model.layers[3].mlp.up_proj.weight, model.model.layers[3].mlp.up_proj.weight)
    fewer = frozen("0-3")  # freezes layer 2, which the checkpoint holds trained: whole-model checkpoints from now on
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight.add_(1.0)
    write_files(tmp_path, [(n, k, p) for n, k, p in adapter_items(model)], 2)
    load_adapter_state(fewer, tmp_path)
    note_loaded_base(fewer, tmp_path, adapter=True)
    assert not without_base(fewer)
    changed = frozen()
    with torch.no_grad():
        changed.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-6
    note_base(changed)
    with pytest.raises(AdapterCheckpointError, match=r"trainable part \(model.freeze\) was trained over another base"):
        check_fits(tmp_path, changed)
    with pytest.raises(AdapterCheckpointError, match="model.freeze run's checkpoint .* this run uses model.lora"):
        check_fits(tmp_path, apply_lora(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"])))


def test_a_base_fingerprinted_in_bf16_fits_the_same_base_built_in_fp32():
    """A LoRA run under DeepSpeed ZeRO-3 with train.precision bf16 builds its base in bf16 (zero.Init) and records that
    fingerprint; `cpt export` of its checkpoint (and a resume on another backend, train.init_from) builds the base in
    fp32 and refused it: "trained on another base model". The same base in 16 bits now fits; another base does not
    (also checked by hand: a `scripts/launch.sh ... zero3` bf16 LoRA run, whose `cpt export --adapter` equals the
    run's own adapter export bitwise)."""
    from cpt.adapter_checkpoint import AdapterCheckpointError, check_fits
    from cpt.adapters import base_fingerprint

    lora = LoraConfig(r=2, target_modules=["q_proj"])
    trained = apply_lora(tiny_model(), lora)
    for p in trained.get_base_model().parameters():  # as zero.Init builds it under bf16
        p.data = p.data.to(torch.bfloat16)
    record = {"base": "x", "fingerprint": base_fingerprint(trained)}
    check_fits("ckpt", apply_lora(tiny_model(), lora), record)  # (refused before)
    with pytest.raises(AdapterCheckpointError, match="another base model"):
        check_fits("ckpt", apply_lora(tiny_model(seed=1), lora), record)


def test_an_adapter_checkpoint_into_zero3_gathers_the_adapter_alone(monkeypatch):
    """A LoRA adapter-only checkpoint resumed under ZeRO-3 (cpt/consolidate.py): only the adapter's parameters are
    gathered and written; the frozen base stays partitioned as built (all of it was gathered on every rank at once)."""
    import contextlib
    from types import SimpleNamespace

    import deepspeed

    import cpt.consolidate as consolidate
    from cpt.adapters import adapter_keys

    model = apply_lora(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"]))
    gathered, written = [], []

    @contextlib.contextmanager
    def gather(params, modifier_rank=None, enabled=True):
        gathered.extend(params)
        yield

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", gather)
    monkeypatch.setattr(consolidate, "_z3_set_full", lambda p, value, key=None: written.append(p))
    opt = SimpleNamespace(fp16_partitioned_groups_flat=[], fp32_partitioned_groups_flat=[])
    engine = SimpleNamespace(module=model, optimizer=opt, zero_optimization_partition_weights=lambda: True)
    sd = model.state_dict()
    weights = {k: sd[k].clone() + 1 for k in adapter_keys(model)}
    consolidate._load_into_deepspeed(engine, weights, {}, adapter=True)
    params = dict(model.named_parameters())
    assert {id(p) for p in gathered} == {id(params[k]) for k in weights} and len(gathered) == len(weights)
    assert {id(p) for p in written} == {id(p) for p in params.values() if p.requires_grad}
    assert all(torch.equal(params[k], weights[k]) for k in weights)


@pytest.mark.parametrize("name", ["full-cpt", "lora-cpt", "freeze-cpt"])
def test_shipped_configs_validate_and_apply(name):
    from pathlib import Path

    from cpt.config import load_config

    cfg = load_config(Path(__file__).parent.parent / "configs" / f"{name}.yaml")
    model = tiny_model()
    total = count_parameters(model)[1]
    if cfg.model.lora is not None:
        model = apply_lora(model, cfg.model.lora)
    if cfg.model.freeze is not None:
        apply_freeze(model, cfg.model.freeze)
    trainable = count_parameters(model)[0]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if name == "full-cpt":
        assert trainable == total
    elif name == "lora-cpt":  # adapters + norms only; the base weights are frozen
        assert names and all("lora_" in n or "norm.modules_to_save" in n for n in names)
        assert any("norm.modules_to_save" in n for n in names)
    else:  # bottom half of the 4 layers frozen
        assert not any("layers.0." in n or "layers.1." in n for n in names)
        assert any("layers.3." in n for n in names) and trainable < total


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["embed_tokens", "v_proj"]])
def test_merge_keeps_the_adapter_logits_with_lora_on_one_side_of_tied_embeddings(tmp_path, targets):
    """LoRA on a tied lm_head (or input embedding) changes that side only; merging the delta into the one shared
    weight changed the other side too (merged logits off by ~2.6 on the demo's model). `cpt merge` (and `cpt export`,
    `cpt average`/`interpolate`, through the same cpt.adapters.merge_lora) give that side its own merged copy and an
    untied config."""
    from cpt.averaging import load_model_dir

    d = tmp_path / "base"
    tiny_model(tied=True).save_pretrained(d)
    byte_level_bpe(CORPUS, 300).save_pretrained(d)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32), LoraConfig(r=4, alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # both LoRA factors (an embedding's A starts at zero)
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        expected = model.eval()(ids).logits
    adapter = save_adapter(model, tmp_path / "adapter")
    out = merge_adapter(adapter, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(load_model_dir(adapter)[0].eval()(ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


@pytest.mark.parametrize("lora,said", [({"modules_to_save": ["embed_tokens", "lm_head"]}, "trained as its own copy"),
                                       ({"target_modules": ["q_proj", "lm_head"]}, "adapts that side only")])
def test_lora_on_tied_embeddings_says_what_cpt_does_instead_of_pefts_warning(lora, said):
    """peft warned "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but
    `ensure_weight_tying` is not set ... complications when merging" (peft issue 2777) on every such run: cpt
    already unties a trained copy (config included) and merges a LoRA'd side into its own weight (the test above),
    so the warning is replaced by one line saying what the model becomes."""
    import warnings

    lines = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = apply_lora(tiny_model(tied=True), LoraConfig(r=4, **lora), log_fn=lines.append)
    assert not [w for w in caught if "tie_word_embeddings" in str(w.message)], [str(w.message) for w in caught]
    assert len(lines) == 1 and said in lines[0] and "untied" in lines[0], lines
    untied = "modules_to_save" in lora
    assert model.get_base_model().config.tie_word_embeddings is not untied


@pytest.mark.parametrize("rslora", [False, True])
def test_average_of_adapters_is_the_average_of_their_updates(base_dir, tmp_path, rslora):
    """`cpt average` of LoRA adapters: mean(B) mean(A) is not the mean of the adapters' updates B A (it averaged the
    factors); the average adapter's merged model equals the average of the merged models (weighted, any scale)."""
    from cpt.averaging import average_checkpoints

    cfg = LoraConfig(r=2, alpha=8, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"], use_rslora=rslora)
    adapters, merged = [], []
    for i in range(2):
        model = apply_lora(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), cfg)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in (p for p in model.parameters() if p.requires_grad):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        adapters.append(save_adapter(model, tmp_path / f"a{i}"))
        merged.append(merge_adapter(adapters[-1], tmp_path / f"m{i}"))
    weights = [0.25, 0.75]
    avg = average_checkpoints(adapters, tmp_path / "avg", weights=weights)
    expected = average_checkpoints(merged, tmp_path / "avg-merged", weights=weights)
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(expected, dtype=torch.float32).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merge_adapter(avg, tmp_path / "avg-m"), dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert json.loads((avg / "adapter_config.json").read_text())["r"] == 4  # the two adapters side by side


def test_average_of_adapters_on_different_bases_is_refused(base_dir, tmp_path):
    """`cpt average` of a LoRA run's adapter and a two-stage run's (trained on RUN/base, a full run's weights) wrote
    an adapter of the first's base holding the mean of both updates: a model neither run made, silently. Adapters
    on copies of one checkpoint (each two-stage run writes its own RUN/base, with the same cpt_base.json) still
    average."""
    import shutil

    from cpt.averaging import average_checkpoints

    def adapter_on(base, name):
        return save_adapter(apply_lora(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2)), tmp_path / name)

    for copy in ("b1", "b2"):  # one full checkpoint written as the base of two runs
        shutil.copytree(base_dir, tmp_path / copy)
        (tmp_path / copy / "cpt_base.json").write_text(json.dumps({"checkpoint": "/x/step_4", "checksums_sha256": "ab"}))
    assert (average_checkpoints([adapter_on(tmp_path / "b1", "a1"), adapter_on(tmp_path / "b2", "a2")], tmp_path / "avg")
            / "adapter_model.safetensors").is_file()
    with pytest.raises(ValueError, match="was trained on another base .*b1.* than .*a0 .*merge each"):
        average_checkpoints([adapter_on(base_dir, "a0"), tmp_path / "a1"], tmp_path / "avg2")
    assert not (tmp_path / "avg2").exists()


def test_cli_merge_onto_another_base_is_one_line(base_dir, tmp_path, capsys):
    """`cpt merge --base` naming a model the adapter was not trained on: one line, nothing written (it was a
    60-line traceback of torch's load_state_dict)."""
    from cpt.commands.merge import main

    adapter = save_adapter(apply_lora(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=2)), tmp_path / "adapter")
    other = tmp_path / "other"
    tiny_llama(vocab=300, hidden=32, intermediate=64, layers=4).save_pretrained(other)
    byte_level_bpe(CORPUS, 300).save_pretrained(other)
    assert main([str(adapter), "--out", str(tmp_path / "m"), "--base", str(other)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cpt merge: error: adapter ") and "does not fit the base model" in err[-1]
    assert not any("Traceback" in line for line in err) and not (tmp_path / "m").exists()


def test_deepspeed_lora_save_leaves_out_a_head_tied_to_the_frozen_embedding():
    """DeepSpeed's exclude_frozen_parameters drops a frozen parameter under its first name only: the output head tied to
    the frozen embedding stayed in ZeRO-2's checkpoint (the embedding whole). While cpt saves, the model's state_dict
    has neither name of it (nor any other base tensor DeepSpeed leaves out); afterwards it is whole again."""
    from cpt.adapter_shards import _without_frozen_aliases

    model = apply_lora(tiny_llama(vocab=300, hidden=64, intermediate=128, layers=2, tied=True),
                       LoraConfig(r=2, target_modules=["q_proj"]))
    whole = set(model.state_dict())
    assert "base_model.model.lm_head.weight" in whole
    with _without_frozen_aliases(model):
        inside = set(model.state_dict())
    assert whole - inside == {"base_model.model.lm_head.weight"}  # the alias; DeepSpeed drops the first name itself
    assert set(model.state_dict()) == whole


def test_deepspeed_lora_checkpoints_keep_the_whole_model_when_model_freeze_froze_adapter_weights(caplog):
    """exclude_frozen_parameters would leave out LoRA weights model.freeze froze (a stage from an earlier LoRA checkpoint
    trained them: a fresh initialisation would not bring them back): such a DeepSpeed run keeps whole-model
    checkpoints, saying so once; with every adapter weight trainable the checkpoint leaves the base out."""
    from types import SimpleNamespace

    from cpt.adapter_shards import _adapter_model

    model = apply_lora(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"]))
    acc = SimpleNamespace(distributed_type="DEEPSPEED", _models=[model], _optimizers=[object()], is_main_process=True,
                          unwrap_model=lambda m, keep_torch_compile=False: m)
    assert _adapter_model(acc) is model
    apply_freeze(model, FreezeConfig(layers="bottom_half"))
    with caplog.at_level("WARNING", logger="cpt.checkpoint"):
        assert _adapter_model(acc) is None and _adapter_model(acc) is None
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "hold the whole model" in caplog.records[0].message and "lora_A" in caplog.records[0].message


def test_deepspeed_model_freeze_checkpoints_leave_the_frozen_layers_out():
    """A model.freeze model whose frozen part is the base as built saves without it under DeepSpeed too
    (exclude_frozen_parameters: its checkpoints held the whole model); one whose frozen part was loaded from a
    checkpoint (no fingerprint of the base as built) keeps the whole model."""
    from types import SimpleNamespace

    from cpt.adapter_shards import _adapter_model

    model = tiny_model()
    apply_freeze(model, FreezeConfig(layers="bottom_half"))
    acc = SimpleNamespace(distributed_type="DEEPSPEED", _models=[model], _optimizers=[object()], is_main_process=True,
                          unwrap_model=lambda m, keep_torch_compile=False: m)
    assert _adapter_model(acc) is None  # (no fingerprint: not the base as built)
    model._cpt_base_fingerprint = "0" * 64
    assert _adapter_model(acc) is model


def test_a_deepspeed_checkpoint_without_its_model_states_is_one_error(tmp_path):
    """Its parameter names come from a *model_states.pt file: without one (a damaged copy) it was an IndexError."""
    from cpt.adapter_checkpoint import DEEPSPEED_TAG, AdapterCheckpointError, saved_keys

    (tmp_path / DEEPSPEED_TAG).mkdir()
    with pytest.raises(AdapterCheckpointError, match="no DeepSpeed \\*model_states.pt file"):
        saved_keys(tmp_path, tiny_model())


def test_lora_wrap_and_merge_print_no_library_deprecation(base_dir, tmp_path):
    """peft reads `model.is_gradient_checkpointing`, deprecated in transformers 5: every LoRA run and `cpt merge`
    (README section 6, run by hand) printed a FutureWarning no user can act on."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = apply_lora(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), LoraConfig(r=2))
        merge_adapter(save_adapter(model, tmp_path / "adapter"), tmp_path / "merged")
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)], [str(w.message) for w in caught]
