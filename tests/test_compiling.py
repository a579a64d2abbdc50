"""model.compile=regional: each decoder layer compiled in place, traced once for all layers, the rest eager; same
losses as eager, same state_dict keys, checkpoints that resume across compile modes, exports plain transformers loads.

The unit tests compile with the aot_eager backend (dynamo and AOTAutograd, no C++ toolchain, a few seconds); the
end-to-end test runs cpt's real path (inductor: it needs a C++ compiler, as torch.compile on CPU always does)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import tiny_llama, tiny_run_config
from cpt.compiling import CompileError, compile_model, compiled_blocks, repeated_blocks


def _lora(model, dora: bool = False):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                            use_dora=dora))


def test_repeated_blocks_are_the_decoder_layers_through_wrappers():
    model = tiny_llama(layers=3)
    assert repeated_blocks(model) == list(model.model.layers)
    peft_model = _lora(tiny_llama(layers=3))
    assert [type(b).__name__ for b in repeated_blocks(peft_model)] == ["LlamaDecoderLayer"] * 3


def test_repeated_blocks_without_no_split_modules_are_the_longest_uniform_module_list():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(2, 2), nn.ReLU()])  # mixed classes: not a block list
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(2, 2)) for _ in range(3)])
            self.pair = nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])

    net = Net()
    assert repeated_blocks(net) == list(net.blocks)
    with pytest.raises(CompileError, match="no repeated blocks .* in Linear; use model.compile=true"):
        compile_model(nn.Linear(2, 2), "regional")


def _train_steps(model, steps: int = 3) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 16), generator=gen)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return out


@pytest.mark.parametrize("variant, graphs", [("full", 1), ("gradient_checkpointing", 1), ("lora", 2), ("dora", 2)])
def test_regional_equals_eager_and_traces_one_layer_for_all(variant, graphs):
    """4 decoder layers, 3 optimizer steps: the losses of eager; dynamo compiles one frame (LoRA: two, as layer 0's
    input needs no gradient under a frozen embedding and the other layers' does; DoRA the same, where peft's forward
    broke the graph in every layer: cpt.compiling.traceable_dora), not one per layer; only the
    layers are compiled (embedding, norm and head stay eager) and the state_dict keys do not change."""
    from torch._dynamo.utils import counters

    def build():
        model = tiny_llama(layers=4)
        if variant == "gradient_checkpointing":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return _lora(model, dora=variant == "dora") if variant in ("lora", "dora") else model

    eager = _train_steps(build())
    torch._dynamo.reset()
    counters.clear()
    model = build()
    keys = list(model.state_dict())
    assert compile_model(model, "regional", backend="aot_eager") is model
    assert compiled_blocks(model) == repeated_blocks(model) and len(compiled_blocks(model)) == 4
    assert _train_steps(model) == pytest.approx(eager, abs=1e-6)
    assert counters["frames"]["ok"] == graphs and counters["stats"]["unique_graphs"] == graphs
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("frozen, mode", [("lora", True), ("freeze_embedding", True), ("lora", "regional"),
                                          ("freeze_embedding_and_layer_0", "regional"), ("dora", True),
                                          ("dora", "regional")])
def test_checkpointed_layers_under_a_frozen_embedding_compile(frozen, mode):
    """model.gradient_checkpointing with a frozen input embedding (LoRA; model.freeze) under model.compile: the
    gradients of the eager model without checkpointing. Whole model: one graph (transformers' hook that makes the
    embedding's output require grad, which the non-reentrant checkpoint does not need, broke it 6 times). Regional:
    the hook stays (it runs eagerly there); without it a frozen bottom layer compiled as an inference graph, where
    torch cannot rematerialise a checkpoint (BackendCompilerFailed). DoRA: no graph break either (peft's forward
    clears its norm cache at every call, a side effect dynamo refuses inside a checkpointed layer)."""
    from torch._dynamo.utils import counters

    from cpt.layer_options import checkpoint_layers
    from cpt.lm_loss import causal_lm_loss

    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))

    def build(checkpointed: bool):
        torch.manual_seed(0)
        model = tiny_llama(layers=2)
        if frozen in ("lora", "dora"):
            model = _lora(model, dora=frozen == "dora")
            with torch.no_grad():  # (B starts at zero: make the adapter's gradients depend on the layers)
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.1)
        else:
            for n, p in model.named_parameters():
                if "embed_tokens" in n or (frozen.endswith("layer_0") and ".layers.0." in n):
                    p.requires_grad_(False)
        if checkpointed:
            checkpoint_layers(model, 1, mode)
        return model

    def grads(model, run):
        loss = causal_lm_loss(run, ids, None).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    reference = build(False)
    want_loss, want = grads(reference, reference)
    torch._dynamo.reset()
    counters.clear()
    model = build(True)
    loss, got = grads(model, compile_model(model, mode, backend="aot_eager"))
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert torch.allclose(loss, want_loss, atol=1e-6) and got.keys() == want.keys() and len(got) > 2
    assert all(torch.allclose(g, want[n], atol=1e-6) for n, g in got.items())


@pytest.mark.parametrize("lora", [False, True])
def test_an_export_of_a_whole_compiled_model_has_the_plain_keys(tmp_path, lora):
    """export_hf (the run's export/, periodic and EMA exports) of a model.compile: true run wrote the wrapper's keys
    (`_orig_mod.model...`): transformers loaded it as a freshly initialised model (weights reported MISSING), peft
    found no adapter weights. The export now holds the model's own keys and loads its weights."""
    from accelerate import Accelerator
    from safetensors.torch import load_file

    from cpt.export import export_hf

    acc = Accelerator(cpu=True)
    model = _lora(tiny_llama()) if lora else tiny_llama()
    export_hf(acc.prepare(compile_model(model, True, backend="aot_eager")), None, tmp_path / "export", acc)
    weights = load_file(tmp_path / "export" / ("adapter_model.safetensors" if lora else "model.safetensors"))
    own = {k: v for k, v in model.state_dict().items() if "lora_" in k or not lora}
    assert len(weights) == len(own) > 0 and not any("_orig_mod" in k for k in weights)
    if not lora:
        assert all(torch.equal(weights[k], own[k]) for k in weights)


def test_a_portable_load_into_a_whole_compiled_model(tmp_path):
    """A checkpoint of another layout (FSDP2, DeepSpeed) resumed on one process or DDP with model.compile: true: the
    portable load compared the checkpoint with the wrapper's `_orig_mod.` keys and blamed the model config."""
    from accelerate import Accelerator
    from safetensors.torch import save_file

    from cpt.consolidate import load_portable

    src = tiny_llama(seed=1)
    (tmp_path / "ckpt").mkdir()
    save_file({k: v.clone() for k, v in src.state_dict().items()}, tmp_path / "ckpt" / "model.safetensors")
    acc = Accelerator(cpu=True)
    model = tiny_llama(seed=2)
    load_portable(acc, acc.prepare(compile_model(model, True, backend="aot_eager")), None, tmp_path / "ckpt",
                  load_optimizer=False)
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())


def test_a_checkpoint_with_the_wrapper_on_one_side_only_loads_portably(tmp_path):
    """A model.compile: true checkpoint (keys `_orig_mod.<name>`) resumed with false or regional, and the other way
    round, was refused ('resumes only with model.compile: true'): switching a run to regional compile lost its
    optimizer state. Such a pair now goes through the portable load, which reads the plain names."""
    from accelerate import Accelerator
    from safetensors.torch import save_file

    from cpt.consolidate import load_portable, needs_portable_load

    src = tiny_llama(seed=1)
    for name, prefix in (("eager", ""), ("whole", "_orig_mod.")):
        (tmp_path / name).mkdir()
        save_file({prefix + k: v.clone() for k, v in src.state_dict().items()}, tmp_path / name / "model.safetensors")
    acc = Accelerator(cpu=True)
    eager = tiny_llama(seed=2)
    acc.prepare(eager)
    assert not needs_portable_load(tmp_path / "eager", acc) and needs_portable_load(tmp_path / "whole", acc)
    load_portable(acc, acc._models[0], None, tmp_path / "whole", load_optimizer=False)
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in eager.state_dict().items())
    acc = Accelerator(cpu=True)
    acc.prepare(compile_model(tiny_llama(seed=3), True, backend="aot_eager"))
    assert needs_portable_load(tmp_path / "eager", acc) and not needs_portable_load(tmp_path / "whole", acc)


def test_whole_and_off():
    model = tiny_llama()
    assert compile_model(model, False) is model and not compiled_blocks(model)
    assert compile_model(model, True, backend="aot_eager")._orig_mod is model


def test_a_launcher_dynamo_backend_is_refused(tiny_cpt_data, tmp_path, monkeypatch):
    """`accelerate launch --dynamo_backend inductor` would have accelerate compile the model in prepare, on top of
    model.compile (a regionally compiled model whole again): refused in one line naming model.compile."""
    from cpt.accelerator import launcher_compile_conflict
    from cpt.config import load_config
    from cpt.distributed import LaunchError
    from cpt.train import train

    assert launcher_compile_conflict({}) is None
    assert launcher_compile_conflict({"ACCELERATE_DYNAMO_BACKEND": "NO"}) is None  # `accelerate launch`'s default
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")  # as `accelerate launch` exports it
    cfg = tiny_run_config(tiny_cpt_data, tmp_path / "run", model={"compile": "regional"})
    with pytest.raises(LaunchError, match="dynamo backend inductor.*compile comes from model.compile"):
        train(load_config(base=cfg), echo=lambda *a, **k: None)


# ------------------------------------------------------------------ end to end: cpt train with inductor


def _run(data, out: Path, compile_mode, *, resume: bool = False) -> dict[int, float]:
    """A 4-step run with checkpoints at steps 2 and 4; its logged losses by step."""
    from cpt.config import load_config
    from cpt.metrics import read_metrics
    from cpt.train import train

    cfg = tiny_run_config(data, out, eval={"at_start": False}, checkpoint={"every": 2},
                          model={"compile": compile_mode})
    cfg["stages"][0]["steps"] = 4
    cfg["data"]["heldout"] = []
    lines: list[str] = []
    result = train(load_config(base=cfg), resume=resume, echo=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert result.step == 4
    said = ("model.compile=regional: 2 blocks (LlamaDecoderLayer) compiled in place, the rest eager but for the "
            "chunked loss's per-chunk softmax and gradient")  # (inductor: cpt.chunked_loss.chunk_terms compiled)
    assert (said in lines) == (compile_mode == "regional")
    return {r["step"]: r["train/loss"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r}


def _back_to_step_2(run: Path, to: Path) -> Path:
    """A copy of a finished run as if it had stopped after its step-2 checkpoint."""
    shutil.copytree(run, to)
    shutil.rmtree(to / "checkpoints" / "step_00000004")
    shutil.rmtree(to / "export")
    return to


@pytest.mark.slow
def test_regional_runs_resume_across_compile_modes_and_export_plain_weights(tiny_cpt_data, tmp_path):
    """cpt train with model.compile=regional: the losses of an eager run (inductor: float tolerance); its step-2
    checkpoint resumes eagerly, an eager run's resumes regionally, both onto the same losses; the export holds the
    plain transformers keys and loads in transformers. A model.compile=true checkpoint (its keys prefixed
    `_orig_mod.`) resumes regionally onto the same losses, and `cpt export` of it writes the plain keys."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    eager = _run(tiny_cpt_data, tmp_path / "eager", False)
    regional = _run(tiny_cpt_data, tmp_path / "regional", "regional")
    assert sorted(regional) == [1, 2, 3, 4]
    assert [regional[s] for s in range(1, 5)] == pytest.approx([eager[s] for s in range(1, 5)], abs=1e-4)

    resumed_eagerly = _run(tiny_cpt_data, _back_to_step_2(tmp_path / "regional", tmp_path / "r2e"), False, resume=True)
    resumed_regionally = _run(tiny_cpt_data, _back_to_step_2(tmp_path / "eager", tmp_path / "e2r"), "regional",
                              resume=True)
    for resumed in (resumed_eagerly, resumed_regionally):
        assert [resumed[s] for s in (3, 4)] == pytest.approx([eager[s] for s in (3, 4)], abs=1e-4)

    # a model.compile: true run's checkpoint (torch.compile's wrapper writes every key as `_orig_mod.<key>`): resumed
    # regionally through the portable load, onto eager's losses; `cpt export` writes the plain keys
    from safetensors.torch import save_file

    from cpt.checkpoint import write_checksums
    from cpt.checkpoint_export import export_checkpoint

    whole = _back_to_step_2(tmp_path / "eager", tmp_path / "whole")
    ckpt = whole / "checkpoints" / "step_00000002"
    save_file({f"_orig_mod.{k}": v for k, v in load_file(ckpt / "model.safetensors").items()},
              ckpt / "model.safetensors", {"format": "pt"})
    write_checksums(ckpt)
    export_checkpoint(ckpt, tmp_path / "whole_export", echo=lambda *a: None)
    resumed_from_whole = _run(tiny_cpt_data, whole, "regional", resume=True)
    assert [resumed_from_whole[s] for s in (3, 4)] == pytest.approx([eager[s] for s in (3, 4)], abs=1e-4)
    plain = set(load_file(tmp_path / "eager" / "export" / "model.safetensors"))
    assert set(load_file(tmp_path / "whole_export" / "model.safetensors")) == plain

    export = tmp_path / "regional" / "export"
    keys = set(load_file(export / "model.safetensors"))
    assert not any("_orig_mod" in k for k in keys) and "model.layers.0.self_attn.q_proj.weight" in keys
    reloaded = AutoModelForCausalLM.from_pretrained(export)
    ckpt_keys = set(load_file(tmp_path / "regional" / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert ckpt_keys <= set(reloaded.state_dict()) and not any("_orig_mod" in k for k in ckpt_keys)
    assert json.loads((export / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.slow
def test_regional_under_fsdp2_matches_one_eager_process(tiny_cpt_data, tmp_path):
    """FSDP2 (2 CPU processes through accelerate's real FSDP branch, tests/fsdp_on_cpu.py): the layers compiled in
    place before ``fully_shard`` keep FSDP's hooks on their call path; the losses of one eager process, and the
    sharded checkpoint and gathered export carry the plain keys."""
    from safetensors.torch import load_file

    from cpt.config import load_config
    from cpt.train import train
    from launching import FREE_PORT, VENV_BIN, finish, losses, rank_env, start, world_sizes, write_config

    def cfg(out: Path, compile_mode) -> dict:
        c = tiny_run_config(tiny_cpt_data, out, eval={"at_start": False}, checkpoint={"every": 2},
                            model={"compile": compile_mode})
        c["stages"][0]["steps"] = 3
        c["data"]["heldout"] = []
        c["train"].update(global_batch_size=8, micro_batch_size=2)
        return c

    train(load_config(base=cfg(tmp_path / "eager", False)), echo=lambda *a, **k: None)
    fsdp = ["--config_file", str(Path(__file__).parents[1] / "configs" / "accelerate" / "fsdp.yaml")]
    args = [str(VENV_BIN / "accelerate"), "launch", *fsdp, "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", *FREE_PORT, "-m", "cpt.cli", "train",
            str(write_config(cfg(tmp_path / "run", "regional"), tmp_path / "c.yaml"))]
    rc, log = finish(start(args, tmp_path, rank_env(cpu=True, fsdp_on_cpu=True)))
    assert rc == 0, log[-5000:]
    assert "model.compile=regional: 2 blocks (LlamaDecoderLayer) compiled in place" in log
    assert world_sizes(tmp_path / "run") == {2}
    got, ref = losses(tmp_path / "run"), losses(tmp_path / "eager")
    assert sorted(got) == [1, 2, 3] and [got[s] for s in got] == pytest.approx([ref[s] for s in got], rel=1e-4)
    assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "pytorch_model_fsdp_0").is_dir()
    keys = set(load_file(tmp_path / "run" / "export" / "model.safetensors"))
    assert "model.layers.1.mlp.up_proj.weight" in keys and not any("_orig_mod" in k for k in keys)


def _sdpa_calls(seen: list):
    """A dynamo backend (aot_eager underneath) that records each SDPA call's (attn_mask given, is_causal)."""
    from torch._dynamo import lookup_backend

    def backend(gm, example_inputs):
        for n in (n for m in gm.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes):
            if n.op == "call_function" and "scaled_dot_product" in str(n.target):  # (also in checkpointed subgraphs)
                seen.append((n.kwargs.get("attn_mask") is not None, n.kwargs.get("is_causal")))
        return lookup_backend("aot_eager")(gm, example_inputs)
    return backend


@pytest.mark.parametrize("document_masking", [False, True])
def test_whole_compile_keeps_sdpas_causal_kernel_and_the_losses(document_masking):
    """model.compile: true traced transformers' mask building, which then cannot look at the values it decides on
    and gave SDPA the whole [B, 1, L, L] mask (on a GPU: the memory-efficient kernel, every masked block computed,
    where eager runs and the Trainer get FlashAttention with is_causal). cpt's plain causal rows now reach SDPA with
    no mask and is_causal=True; document masking keeps its mask. Loss and gradients equal eager's."""
    from cpt.lm_loss import causal_lm_loss

    eos = 3 if document_masking else None
    ids = torch.randint(4, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    ids[0, 5] = ids[1, 9] = 3

    def loss_and_grads(model, run):
        loss, rows = causal_lm_loss(run, ids, eos)[:2]
        loss.backward()
        return loss.detach(), rows, {n: p.grad.clone() for n, p in model.named_parameters()}

    model = tiny_llama(attn_implementation="sdpa")
    eager = loss_and_grads(model, model)
    torch._dynamo.reset()
    seen: list = []
    model = tiny_llama(attn_implementation="sdpa")
    compiled = loss_and_grads(model, compile_model(model, True, backend=_sdpa_calls(seen)))
    assert seen == [(document_masking, not document_masking)] * 2  # one call per layer
    assert torch.allclose(compiled[0], eager[0], atol=1e-6) and torch.allclose(compiled[1], eager[1], atol=1e-6)
    assert all(torch.allclose(compiled[2][n], g, atol=1e-6) for n, g in eager[2].items())


def test_the_causal_sdpa_model_masks_padding_and_saves_plain_sdpa(tmp_path):
    """Outside cpt's own forward (lm-eval's padded batches, generation) the model given keep_causal_sdpa builds
    transformers' masks: padded rows give the logits of the stock sdpa model, also compiled; the implementation's name
    is not written into the saved config.json."""
    from cpt.compiling import CAUSAL_SDPA, keep_causal_sdpa, packed_rows

    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    pad = torch.ones_like(ids)
    pad[0, :4] = 0  # left padding, as lm-eval batches have
    stock = tiny_llama(attn_implementation="sdpa", training=False)
    expected = stock(input_ids=ids, attention_mask=pad, use_cache=False).logits
    model = tiny_llama(attn_implementation="sdpa", training=False)
    assert keep_causal_sdpa(model) and model.config._attn_implementation == CAUSAL_SDPA
    for run in (model, compile_model(model, True, backend="aot_eager")):
        for flag in (False, True):
            with torch.no_grad(), packed_rows("plain" if flag else None):
                got = run(input_ids=ids, attention_mask=pad, use_cache=False).logits
            assert torch.allclose(got[pad.bool()], expected[pad.bool()], atol=1e-5)
    assert not keep_causal_sdpa(tiny_llama(attn_implementation="eager"))
    model.save_pretrained(tmp_path)
    assert CAUSAL_SDPA not in (tmp_path / "config.json").read_text()


@pytest.mark.parametrize("window, masked", [(8, True), (64, False)])
def test_whole_compile_sliding_window_attention_keeps_its_window(window, masked):
    """A sliding-window model (Mistral) under model.compile: true: a window narrower than the rows keeps
    transformers' windowed mask, a wider one is plain causal (no mask, is_causal); both give eager's loss."""
    from transformers import MistralConfig, MistralForCausalLM

    from cpt.lm_loss import causal_lm_loss

    def build():
        torch.manual_seed(0)
        return MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
                                                attn_implementation="sdpa"))

    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    eager = causal_lm_loss(build(), ids)[0]
    torch._dynamo.reset()
    seen: list = []
    compiled = causal_lm_loss(compile_model(build(), True, backend=_sdpa_calls(seen)), ids)[0]
    assert seen == [(masked, not masked)] * 2
    assert torch.allclose(compiled, eager, atol=1e-6)


_F, _C = (True, False), (False, True)  # a traced SDPA call's (attn_mask given, is_causal): masked, causal kernel
_ARCHS = {  # name: (config class, model class, config fields, the SDPA call per layer for plain causal rows)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, [_C, _C]),
    "qwen2-sliding-layer": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        use_sliding_window=True, sliding_window=8, layer_types=["full_attention", "sliding_attention"]), [_C, _F]),
    "llama-checkpointed": ("LlamaConfig", "LlamaForCausalLM", dict(checkpointing=True), [_C, _C]),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}, [_C, _C]),
    "mistral-window-8": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8), [_F, _F]),
    "gemma3-text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        sliding_window=8, head_dim=8, layer_types=["sliding_attention", "full_attention"]), [_F, _C]),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0, eos_token_id=1, bos_token_id=2), [_C, _C]),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(pad_token_id=0, eos_token_id=1), [_C, _C]),
    "smollm3-no-rope-layer": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(
        pad_token_id=0, eos_token_id=1, bos_token_id=2, no_rope_layers=[1, 0]), [_C, _C]),
}
_REGIONAL = {"llama", "qwen2-sliding-layer", "gemma3-text"}  # (regional compile also checked: mixed layer kinds)


@pytest.mark.parametrize("arch", list(_ARCHS))
def test_architectures_under_compile_get_sdpas_causal_kernel_only_where_safe(arch):
    """Tiny models of the families cpt users train, with cpt's forward and chunked loss, under model.compile: true:
    plain causal rows reach SDPA with no mask and is_causal=True on layers whose mask is only causal (a sliding
    window narrower than the rows keeps its mask; a model that adds to its mask keeps stock sdpa), document masking
    (the same compiled model, next call) masks every layer; loss and gradients equal eager's within 1e-5, without a
    graph break. Regional compile makes the same calls (transformers decides the mask eagerly there). A transformers
    upgrade that changes these paths fails here. (Gemma 2 has no sdpa in transformers 5: not here.)"""
    import transformers
    from torch._dynamo.utils import counters

    from cpt.layer_options import checkpoint_layers
    from cpt.lm_loss import causal_lm_loss, use_chunked_loss

    config_cls, model_cls, fields, plain = _ARCHS[arch]
    ids = torch.randint(4, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    ids[0, 5] = ids[1, 9] = 3

    def build():
        torch.manual_seed(0)
        config = getattr(transformers, config_cls)(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, attn_implementation="sdpa", **{k: v for k, v in fields.items() if k != "checkpointing"})
        model = getattr(transformers, model_cls)(config)
        if fields.get("checkpointing"):  # (model.gradient_checkpointing: the layers traced as checkpointed regions)
            checkpoint_layers(model, 1)
        use_chunked_loss(model, "auto", 1024, log_fn=lambda *a: None)
        return model

    def step(model, run, eos):
        model.zero_grad()
        loss = causal_lm_loss(run, ids, eos).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model = build()
    eager = {eos: step(model, model, eos) for eos in (None, 3)}
    torch._dynamo.reset()
    counters.clear()
    seen: list = []
    model = build()
    run = compile_model(model, True, backend=_sdpa_calls(seen))
    for eos, expected in ((None, plain), (3, [_F, _F])):
        del seen[:]
        loss, grads = step(model, run, eos)
        assert seen == expected, (eos, seen)
        assert torch.allclose(loss, eager[eos][0], atol=1e-5)
        assert grads.keys() == eager[eos][1].keys()
        assert all(torch.allclose(g, eager[eos][1][n], atol=1e-5) for n, g in grads.items())
    assert not counters["graph_break"], dict(counters["graph_break"])
    if arch not in _REGIONAL:
        return
    torch._dynamo.reset()
    seen.clear()
    model = build()
    step(model, compile_model(model, "regional", backend=_sdpa_calls(seen)), None)
    assert set(seen) == set(plain)  # (one graph per kind of layer)


def test_whole_compile_keeps_the_mask_a_model_adds_to():
    """Doge adds its dynamic mask onto the causal mask it asks for (``allow_is_causal_skip=False``, as Falcon's ALiBi
    and Mistral Large 4's indexer do); under tracing that call looks like transformers' own packed-sequence one, so
    keep_causal_sdpa dropped the mask and the compiled loss differed from eager's (by 1.5e-3). Such a model keeps
    stock sdpa and its mask. (Forward only: Doge's compiled backward fails inside torch/transformers, with stock sdpa
    too: "view size is not compatible with input tensor's size and stride".)"""
    from transformers import DogeConfig, DogeForCausalLM

    from cpt.compiling import asks_for_a_mask, keep_causal_sdpa
    from cpt.lm_loss import causal_lm_loss

    def build():
        torch.manual_seed(0)
        return DogeForCausalLM(DogeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, keep_window_size=4,
                                          attn_implementation="sdpa")).eval()

    ids = torch.randint(4, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    assert asks_for_a_mask(build()) and not keep_causal_sdpa(build()) and not asks_for_a_mask(tiny_llama())
    torch._dynamo.reset()
    seen: list = []
    with torch.no_grad():
        eager = causal_lm_loss(build(), ids)[0]
        compiled = causal_lm_loss(compile_model(build(), True, backend=_sdpa_calls(seen)), ids)[0]
    assert seen == [(True, False)] * 2
    assert torch.allclose(compiled, eager, atol=1e-6)


# ------------------------------------------------------------------ model.compile_cache


def test_the_compile_cache_folder(tmp_path, monkeypatch):
    """model.compile_cache: "run" puts inductor's cache in the run directory, a path elsewhere, null leaves torch's
    own; TORCHINDUCTOR_CACHE_DIR set by the user wins; a run after another in one process (cpt experiment) gets its
    own folder, not the earlier run's; a folder whose file locks fail is not used (a warning)."""
    import os

    import cpt.compile_cache as cc

    monkeypatch.delenv(cc.CACHE_ENV, raising=False)  # (restored after the test, whatever the code sets)
    monkeypatch.setattr(cc, "_ours", None)
    said: list[str] = []
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    assert cc.use_compile_cache("run", str(run_a), said.append) == run_a / "compile_cache"
    assert os.environ[cc.CACHE_ENV] == str(run_a / "compile_cache") and (run_a / "compile_cache" / "locks").is_dir()
    assert said[-1].startswith(f"compile cache: {run_a / 'compile_cache'} (model.compile_cache: later starts")
    assert cc.use_compile_cache("run", str(run_b), said.append) == run_b / "compile_cache"  # not "the user's" a/
    assert os.environ[cc.CACHE_ENV] == str(run_b / "compile_cache")
    assert cc.use_compile_cache(str(tmp_path / "shared"), str(run_a), said.append) == tmp_path / "shared"
    assert cc.use_compile_cache(None, str(run_a), said.append) is None and cc.CACHE_ENV not in os.environ
    monkeypatch.setenv(cc.CACHE_ENV, str(tmp_path / "users"))
    assert cc.use_compile_cache("run", str(run_a), said.append) == tmp_path / "users"
    assert said[-1] == f"compile cache: {tmp_path / 'users'} (TORCHINDUCTOR_CACHE_DIR; model.compile_cache is not used)"
    monkeypatch.delenv(cc.CACHE_ENV)

    def no_locks(folder):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(cc, "_check_file_lock", no_locks)
    assert cc.use_compile_cache("run", str(run_a), said.append) is None and cc.CACHE_ENV not in os.environ
    assert said[-1].startswith(f"warning: model.compile_cache: {run_a / 'compile_cache'} cannot hold inductor's cache "
                               "(OSError: [Errno 38] Function not implemented); compiling with torch's own")


@pytest.mark.slow
def test_a_resumed_start_loads_the_compiled_code_from_the_run_directory(tiny_cpt_data, tmp_path):
    """A requeued job starts in a fresh process, often on a node whose /tmp is empty: it compiled the model again
    (about a minute at 1B on an H200). With model.compile_cache (default "run") the resumed start, a new process
    whose own inductor cache is empty (TORCHINDUCTOR_CACHE_DIR unset, HOME and TMPDIR new), loads every graph from
    <run>/compile_cache and compiles none."""
    import os
    import subprocess
    import sys

    import yaml

    cfg = tiny_run_config(tiny_cpt_data, tmp_path / "run", eval={"at_start": False}, checkpoint={"every": 2},
                          model={"compile": "regional"})
    cfg["stages"][0]["steps"] = 4
    cfg["data"]["heldout"] = []
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))

    def start(name: str, *extra: str) -> str:
        tmp = tmp_path / f"tmp-{name}"  # (each start: a node of its own, torch's default cache under its own /tmp)
        tmp.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
        env.update(TMPDIR=str(tmp), HOME=str(tmp), OMP_NUM_THREADS="1")
        out = subprocess.run([sys.executable, "-m", "cpt.cli", "train", str(tmp_path / "run.yaml"), *extra],
                             env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout

    first = start("first")
    assert f"compile cache: {tmp_path / 'run' / 'compile_cache'} (model.compile_cache" in first
    [note] = [line for line in first.splitlines() if line.startswith("compile: ")]
    compiled = int(note.split()[1])  # (a first start into an empty cache says so: it read as "1 of 5 loaded" when a
    assert compiled > 0 and note == f"compile: {compiled} graphs compiled into the empty compile cache"  # graph recurred)
    _back_to_step_2(tmp_path / "run", tmp_path / "requeued")
    shutil.rmtree(tmp_path / "run")
    (tmp_path / "requeued").rename(tmp_path / "run")
    resumed = start("resumed", "--resume")
    assert f"compile: {compiled} of {compiled} graphs loaded from the compile cache, 0 compiled" in resumed, resumed[-3000:]
