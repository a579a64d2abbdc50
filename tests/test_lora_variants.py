"""LoRA variants (model.lora.use_dora, loraplus_lr_ratio, init_lora_weights): the adapter, its optimizer groups, its
training run with an exact resume, export (a peft adapter peft loads), `cpt merge`, and what `cpt average` refuses."""

import contextlib
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cpt.adapters import adapter_keys, apply_lora
from cpt.export import save_adapter
from cpt.config import ConfigError, LoraConfig, load_config
from cpt.model import merge_adapter
from cpt.optim import param_groups
from launching import assert_close, losses
from test_adapters import base_dir, tiny_model  # noqa: F401  (fixture)
from test_train_modes import (_lora_small, _resume_from_step_3, _run_without_base, base, heldout_tokens,  # noqa: F401
                              records_at, run)


def assert_export_gives_last_heldout_loss(run_dir: Path, base: Path, data_root: Path, work: Path) -> tuple:
    """The run's export (an adapter), merged by `cpt merge`'s path and loaded in peft on ``base``, gives the run's
    last logged python held-out loss (step 6) within 1e-5; returns (the held-out tokens, that loss)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from cpt.evaluate import heldout_loss
    from launching import records

    export = run_dir / "export"
    tokens = heldout_tokens(data_root / "data", "python", AutoTokenizer.from_pretrained(export))
    logged = [r for r in records(run_dir) if "eval/python/loss" in r][-1]
    assert logged["step"] == 6
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(export, work)).eval()
    assert heldout_loss(merged, tokens, 8) == pytest.approx(logged["eval/python/loss"], abs=1e-5)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(export)).eval()
    assert heldout_loss(peft_model, tokens, 8) == pytest.approx(logged["eval/python/loss"], abs=1e-5)
    return tokens, logged["eval/python/loss"]


def _perturb(model, seed=1):
    """Every trained tensor moved off its initial value (B off zero, DoRA's magnitudes off ||W||)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@contextlib.contextmanager
def cpu_threads(n: int):
    """torch's CPU threads set to ``n`` within (as OMP_NUM_THREADS sets them for a job, 1 per process under a launch)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def without_stored_factors(ckpt: Path) -> None:
    """``ckpt`` as cpt wrote it before it stored a base-rewriting init's factors: the file gone, CHECKSUMS.json too."""
    from cpt.adapter_init import FACTORS_FILE
    from cpt.checkpoint import write_checksums

    (ckpt / FACTORS_FILE).unlink()
    write_checksums(ckpt)


def test_config_fields_and_their_errors():
    cfg = LoraConfig(use_dora=True, loraplus_lr_ratio=16, init_lora_weights="gaussian")
    assert cfg.use_dora and cfg.loraplus_lr_ratio == 16
    for bad in ({"loraplus_lr_ratio": 0}, {"init_lora_weights": "eva"}, {"use_dora": "maybe"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LoraConfig(**bad)


def test_dora_adapter_is_saved_with_its_magnitudes_loads_in_peft_and_merges_to_the_same_logits(base_dir, tmp_path):
    from peft import PeftModel

    model = apply_lora(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                       LoraConfig(r=4, alpha=8, use_dora=True))
    magnitudes = [n for n in adapter_keys(model) if ".lora_magnitude_vector.default" in n]
    assert len(magnitudes) == 4 * 7  # one per adapted projection, part of every checkpoint (adapter_keys)
    _perturb(model)
    adapter = save_adapter(model, tmp_path / "adapter")
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    assert sum("lora_magnitude_vector" in k for k in load_file(adapter / "adapter_model.safetensors")) == 28
    ids = torch.arange(3, 60).unsqueeze(0)
    with torch.no_grad():
        want = model.eval()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()(ids).logits
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                           str(adapter)).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merge_adapter(adapter, tmp_path / "m"), dtype=torch.float32).eval()
        got = merged(ids).logits
    assert (want - plain).abs().max() > 1e-3
    torch.testing.assert_close(loaded, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not any("lora" in k for k in merged.state_dict())
    from cpt.averaging import interpolate  # the adapter directory merged in memory (peft's DoRA merge), then mixed

    half = interpolate(base_dir, adapter, 0.5)
    with torch.no_grad():
        want_half = {k: (v + merged.state_dict()[k]) / 2 for k, v in
                     AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).state_dict().items()}
    assert all(torch.allclose(half.state_dict()[k], v, atol=1e-6) for k, v in want_half.items())


def test_gaussian_init_is_pefts_and_starts_as_the_base(base_dir):
    torch.manual_seed(0)
    default = apply_lora(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4))
    torch.manual_seed(0)
    gauss = apply_lora(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, init_lora_weights="gaussian"))
    a_default = default.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    a_gauss = gauss.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert a_gauss.std().item() == pytest.approx(1 / 4, rel=0.15)  # peft: N(0, 1/r)
    assert a_default.abs().max() <= 1 / 8 and not torch.equal(a_default, a_gauss)  # kaiming-uniform bound 1/sqrt(in)
    assert all(p.abs().max() == 0 for n, p in gauss.named_parameters() if "lora_B" in n)  # still the base at step 0


def test_average_of_dora_adapters_is_refused(base_dir, tmp_path):
    from cpt.averaging import average_checkpoints

    adapters = []
    for i in range(2):
        m = apply_lora(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=2, use_dora=True))
        _perturb(m, seed=i)
        adapters.append(save_adapter(m, tmp_path / f"a{i}"))
    with pytest.raises(ValueError, match=r"a0: a DoRA adapter \(model.lora.use_dora\) cannot be averaged.*cpt merge"):
        average_checkpoints(adapters, tmp_path / "avg")
    assert not (tmp_path / "avg").exists()


def test_loraplus_groups_give_the_b_factors_and_vectors_the_ratio(base_dir):
    model = apply_lora(AutoModelForCausalLM.from_pretrained(base_dir),
                       LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], use_dora=True, loraplus_lr_ratio=8,
                                  modules_to_save=["lm_head"]))
    mult = {n: g["lr_mult"] for g in param_groups(model, 0.1, {"lm_head": 0.5}) for n in g["param_names"]}
    assert mult and all(v == (8.0 if ".lora_B." in n or "lora_embedding_B" in n or "magnitude" in n
                              else 0.5 if "lm_head" in n else 1.0) for n, v in mult.items()), mult
    assert any("lora_embedding_B" in n for n in mult) and any("magnitude" in n for n in mult)
    plain = apply_lora(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=2))
    assert {g["lr_mult"] for g in param_groups(plain, 0.1)} == {1.0}


def test_dora_on_fused_moe_experts_is_one_error_naming_the_field():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_experts=4,
                               num_experts_per_tok=2, head_dim=16)
    moe = AutoModelForCausalLM.from_config(cfg)
    if not any(p.ndim == 3 for p in moe.parameters()):
        pytest.skip("this transformers keeps per-expert Linear layers (nothing fused)")
    with pytest.raises(ConfigError, match=r"^model.lora.use_dora: DoRA cannot adapt .*target_modules"):
        apply_lora(moe, LoraConfig(r=2, use_dora=True))


def test_dora_keeps_the_base_fp32_under_bf16(base_dir, tiny_cpt_data, tmp_path):
    from cpt.base_dtype import cast_frozen_base

    class Acc:  # one process with native autocast
        native_amp = True
        distributed_type = "NO"

    lines = []
    for dora in (True, False):
        model = apply_lora(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=2, use_dora=dora))
        cfg = _lora_small(tiny_cpt_data, base_dir, tmp_path / "r")
        cfg["model"]["lora"].update(use_dora=dora)
        cfg["train"]["precision"] = "bf16"
        cast_frozen_base(model, load_config(base=cfg), Acc(), say=lines.append)
        q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
        assert q.dtype == (torch.float32 if dora else torch.bfloat16)
    assert "stays fp32 with use_dora" in lines[0]


# ----------------------------------------------------------------------------- a training run, resumed


@pytest.mark.slow
def test_dora_with_loraplus_trains_resumes_exactly_and_exports_what_peft_and_merge_reproduce(tiny_cpt_data, base,
                                                                                              tmp_path, monkeypatch):
    """DoRA + LoRA+ (ratio 4) on one process: the B factors' and magnitudes' LR is 4x the schedule's at every step
    (warmup and decay, read back from the optimizer), the step-3 checkpoint holds the magnitudes and resumes to the
    same losses, LRs and adapter bitwise; the export loads in peft and merges (cpt merge) to a model whose held-out
    loss is the run's last logged one."""
    import cpt.optim as optim
    from cpt.adapter_checkpoint import ADAPTER_STATE

    seen: dict[Path, list] = {}
    real_set_lr = optim.set_lr

    def recording(optimizer, lr):
        real_set_lr(optimizer, lr)
        seen.setdefault(Path(current[0]), []).append(
            (lr, [(g["lr"], g["param_names"]) for g in optimizer.param_groups]))

    monkeypatch.setattr(optim, "set_lr", recording)
    current = [tmp_path / "a"]
    cfg = _lora_small(tiny_cpt_data, base, tmp_path / "a")
    cfg["model"]["lora"].update(use_dora=True, loraplus_lr_ratio=4.0)
    ref, ckpt = _run_without_base(cfg, tmp_path / "a")
    assert any(".lora_magnitude_vector.default" in k for k in load_file(ckpt / ADAPTER_STATE))

    steps = seen[tmp_path / "a"]
    assert len({lr for lr, _ in steps}) >= 4  # warmup and cosine: the schedule really moves
    for lr, groups in steps:
        for group_lr, names in groups:
            fast = [".lora_B." in n or "magnitude" in n or "norm" in n for n in names]
            assert all(fast) or not any(fast), names  # a group is one or the other
            assert group_lr == pytest.approx(lr * (4.0 if fast[0] else 1.0), rel=1e-12)
        assert any(".lora_B." in n for g in groups for n in g[1])

    current[0] = tmp_path / "b"
    _, log = _resume_from_step_3(tmp_path / "a", tmp_path / "b", cfg)
    assert "resumed" in log and losses(tmp_path / "b") == ref  # bitwise: fp32 on CPU
    assert seen[tmp_path / "b"] == steps[-len(seen[tmp_path / "b"]):]  # the same LRs after the resume
    x, y = (load_file(d / "export" / "adapter_model.safetensors") for d in (tmp_path / "a", tmp_path / "b"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert any("lora_magnitude_vector" in k for k in x)

    assert_export_gives_last_heldout_loss(tmp_path / "a", base, tiny_cpt_data, tmp_path / "merged")


# ----------------------------------------------------------------------------- PiSSA / OLoRA (cpt/adapter_init.py)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_a_base_rewriting_init_exports_a_plain_lora_of_the_original_base(base_dir, tmp_path, init):
    """PiSSA/OLoRA rewrite the base (W_res = W - s B0 A0). The export is converted as peft's documented
    path_initial_model_for_weight_conversion converts it (same tensors and config, checked against peft's own output):
    on the *original* base, through peft or `cpt merge`, it gives the trained model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    original = lambda: AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()  # noqa: E731
    torch.manual_seed(0)
    model = apply_lora(original(), LoraConfig(r=4, alpha=8, init_lora_weights=init))
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert not torch.equal(q.base_layer.weight, original().model.layers[0].self_attn.q_proj.weight)  # rewritten
    ids = torch.arange(3, 60).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, original()(ids).logits, atol=1e-5, rtol=1e-5)  # starts as W
    # peft's documented way: the initial adapter saved before training (as a default-init LoRA), converted at the end
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(tmp_path / "peft-init")
    model.peft_config["default"].init_lora_weights = init
    _perturb(model)
    adapter = save_adapter(model, tmp_path / "adapter")
    model.save_pretrained(tmp_path / "peft-way", path_initial_model_for_weight_conversion=str(tmp_path / "peft-init"))
    ours, theirs = (load_file(d / "adapter_model.safetensors") for d in (adapter, tmp_path / "peft-way"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    c1, c2 = (json.loads((d / "adapter_config.json").read_text()) for d in (adapter, tmp_path / "peft-way"))
    assert (c1["r"], c1["lora_alpha"], c1["init_lora_weights"]) == (c2["r"], c2["lora_alpha"], c2["init_lora_weights"]) == (8, 16, True)

    with torch.no_grad():
        want = model(ids).logits
        assert (want - original()(ids).logits).abs().max() > 1e-3
        loaded = PeftModel.from_pretrained(original(), str(adapter)).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merge_adapter(adapter, tmp_path / "m")).eval()(ids).logits
    torch.testing.assert_close(loaded, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, want, atol=1e-5, rtol=1e-5)


def test_base_rewriting_inits_refuse_what_they_cannot_do(base_dir, tmp_path, monkeypatch):
    from cpt.adapters import refuse_unshardable
    from cpt.averaging import average_checkpoints
    from cpt.distributed import Backend

    with pytest.raises(ValueError, match="use_dora with init_lora_weights: pissa is not supported"):
        LoraConfig(use_dora=True, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoraConfig(init_lora_weights="pissa_niter_")
    for variant in ({"use_dora": True}, {"init_lora_weights": "olora"}):  # QLoRA (cpt/quantized_base.py)
        with pytest.raises(ValueError, match=r"(use_dora|init_lora_weights: olora) with quantize_base \(nf4\)"):
            LoraConfig(quantize_base="nf4", **variant)
    LoraConfig(quantize_base="nf4", loraplus_lr_ratio=16, init_lora_weights="gaussian")  # these two are fine
    with pytest.raises(ConfigError, match=r"^model.lora.init_lora_weights: olora initialises linear layers only.*Embedding"):
        apply_lora(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=2, init_lora_weights="olora",
                                                                               target_modules=["q_proj", "embed_tokens"]))
    model = apply_lora(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=2, init_lora_weights="pissa"))
    with monkeypatch.context() as m:  # (undone before average_checkpoints imports modules that bind `backend`)
        m.setattr("cpt.distributed.backend", lambda acc: Backend.DEEPSPEED)
        m.setattr("cpt.distributed.zero_stage", lambda acc: 3)
        with pytest.raises(ConfigError, match="^model.lora.init_lora_weights: pissa is not supported under DeepSpeed ZeRO-3"):
            refuse_unshardable(model, object())
        m.setattr("cpt.distributed.zero_stage", lambda acc: 2)
        refuse_unshardable(model, object())  # ZeRO-2: the base whole on every rank (tests/test_lora_variants_sharded.py)
    # an adapter of a residual base saved as peft saves it unconverted: cpt average refuses it (cpt's are converted)
    model.save_pretrained(tmp_path / "raw")
    with pytest.raises(ValueError, match=r"raw: an adapter of a pissa residual base"):
        average_checkpoints([tmp_path / "raw", tmp_path / "raw"], tmp_path / "avg")


@pytest.mark.slow
def test_a_pissa_run_resumes_exactly_and_its_export_on_the_original_base_gives_its_heldout_loss(tiny_cpt_data, base,
                                                                                                tmp_path):
    """PiSSA (randomised SVD, pissa_niter_4) on one process: the step-3 checkpoint resumes bitwise (the resumed run
    rewrites the base again, to the fingerprint the checkpoint holds); the export, a plain LoRA of rank 2r against the
    original base, gives the run's last held-out loss through peft and `cpt merge`."""
    from peft import PeftModel

    from cpt.evaluate import heldout_loss

    cfg = _lora_small(tiny_cpt_data, base, tmp_path / "a")
    cfg["model"]["lora"].update(init_lora_weights="pissa_niter_4", loraplus_lr_ratio=2.0)
    ref, _ = _run_without_base(cfg, tmp_path / "a")
    _, log = _resume_from_step_3(tmp_path / "a", tmp_path / "b", cfg)
    assert "resumed" in log and losses(tmp_path / "b") == ref  # bitwise: fp32 on CPU
    x, y = (load_file(d / "export" / "adapter_model.safetensors") for d in (tmp_path / "a", tmp_path / "b"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    export = tmp_path / "a" / "export"
    acfg = json.loads((export / "adapter_config.json").read_text())
    assert acfg["init_lora_weights"] is True and acfg["r"] == 2 * cfg["model"]["lora"]["r"]
    tokens, last = assert_export_gives_last_heldout_loss(tmp_path / "a", base, tiny_cpt_data, tmp_path / "merged")
    assert heldout_loss(AutoModelForCausalLM.from_pretrained(base).eval(), tokens, 8) != pytest.approx(
        last, abs=1e-3)  # the run did learn something

    # `cpt export` of its step-3 checkpoint: merged (the residual base + the adapter) and --adapter (converted)
    from cpt.cli import main

    ckpt, at_3 = tmp_path / "a" / "checkpoints" / "step_00000003", records_at(tmp_path / "a", 3)["eval/python/loss"]
    assert main(["export", str(ckpt), "--out", str(tmp_path / "e-merged")]) == 0
    assert main(["export", str(ckpt), "--adapter", "--out", str(tmp_path / "e-adapter")]) == 0
    assert json.loads((tmp_path / "e-adapter" / "adapter_config.json").read_text())["init_lora_weights"] is True
    for model in (AutoModelForCausalLM.from_pretrained(tmp_path / "e-merged"),
                  PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(tmp_path / "e-adapter"))):
        assert heldout_loss(model.eval(), tokens, 8) == pytest.approx(at_3, abs=1e-5)


def test_average_of_converted_pissa_exports_is_the_average_of_their_updates(base_dir, tmp_path):
    """Each export is a plain LoRA of the original base: `cpt average` of two is the mean of the merged models."""
    from cpt.averaging import average_checkpoints

    adapters, merged = [], []
    for i in range(2):
        model = apply_lora(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=2, alpha=4, init_lora_weights="pissa"))
        _perturb(model, seed=10 + i)
        adapters.append(save_adapter(model, tmp_path / f"a{i}"))
        merged.append(merge_adapter(adapters[-1], tmp_path / f"m{i}"))
    avg = average_checkpoints(adapters, tmp_path / "avg", weights=[0.25, 0.75])
    expected = average_checkpoints(merged, tmp_path / "avg-merged", weights=[0.25, 0.75])
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(expected).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merge_adapter(avg, tmp_path / "avg-m")).eval()(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_residual_base_that_comes_out_different_is_refused_saying_why(tiny_cpt_data, base, tmp_path, monkeypatch):
    """A checkpoint whose residual base differs from the one this run builds is refused (never loaded over the wrong
    base). Over its stored factors that is another base, said as for any LoRA run; a checkpoint written before cpt
    stored them has the decomposition redone (the SVD/QR of PiSSA/OLoRA depends on the CPU thread count), and the line
    says what to do."""
    from cpt.checkpoint import CheckpointError

    cfg = _lora_small(tiny_cpt_data, base, tmp_path / "a")
    cfg["model"]["lora"].update(init_lora_weights="olora")
    ref, ckpt = _run_without_base(cfg, tmp_path / "a")

    def other_residual(model):  # as another base (or a decomposition made with other threads) comes out
        model._cpt_base_fingerprint = "0" * 64
        return model._cpt_base_fingerprint

    monkeypatch.setattr("cpt.adapters.note_base", other_residual)
    with pytest.raises(CheckpointError, match=r"another base model than this run builds") as e:
        _resume_from_step_3(tmp_path / "a", tmp_path / "b", cfg)
    assert "OMP_NUM_THREADS" not in str(e.value) and not (tmp_path / "b" / "checkpoints" / "step_00000006").exists()

    without_stored_factors(ckpt)
    with pytest.raises(CheckpointError, match=r"another base model.*init_lora_weights olora rewrites the base.*"
                                              r"OMP_NUM_THREADS") as e:
        _resume_from_step_3(tmp_path / "a", tmp_path / "c", cfg)
    assert "\n" not in str(e.value) and not (tmp_path / "c" / "checkpoints" / "step_00000006").exists()


@pytest.mark.slow
def test_a_pissa_run_requeued_with_other_cpu_threads_resumes_and_exports_on_the_residual_it_trained_on(
        tiny_cpt_data, base, tmp_path):
    """Full-SVD PiSSA trained on 1 CPU thread, its step-3 checkpoint resumed and exported (`cpt export`) on 2: the SVD
    comes out different there (measured: the tiny base's residual differs in ~40k of its elements between 1 and 2
    threads), so the residual is rebuilt from the original base and the factors the checkpoint stores. The resumed run
    has the checkpoint's base fingerprint (the same residual, bit for bit) and the uninterrupted run's losses; its
    export is a plain LoRA of the original base that gives its last held-out loss; the exported step-3 checkpoint
    gives the held-out loss logged at step 3."""
    from cpt.adapter_checkpoint import ADAPTER_BASE
    from cpt.adapter_init import FACTORS_FILE
    from cpt.cli import main
    from cpt.evaluate import heldout_loss

    cfg = _lora_small(tiny_cpt_data, base, tmp_path / "a")
    cfg["model"]["lora"].update(init_lora_weights="pissa")
    with cpu_threads(1):
        ref, ckpt = _run_without_base(cfg, tmp_path / "a")
    factors = load_file(ckpt / FACTORS_FILE)
    assert factors.keys() == {k for k in load_file(tmp_path / "a" / "export" / "adapter_model.safetensors")
                              if ".lora_" in k}  # A0, B0 of every LoRA layer, keyed as the adapter
    with cpu_threads(2):
        _, log = _resume_from_step_3(tmp_path / "a", tmp_path / "b", cfg)
        assert main(["export", str(ckpt), "--out", str(tmp_path / "e")]) == 0
    assert "resumed" in log
    assert_close(losses(tmp_path / "b"), ref)
    fingerprint = lambda d: json.loads((d / ADAPTER_BASE).read_text())["fingerprint"]  # noqa: E731
    assert fingerprint(tmp_path / "b" / "checkpoints" / "step_00000006") == fingerprint(ckpt)
    tokens, _ = assert_export_gives_last_heldout_loss(tmp_path / "b", base, tiny_cpt_data, tmp_path / "merged")
    at_3 = records_at(tmp_path / "a", 3)["eval/python/loss"]
    assert heldout_loss(AutoModelForCausalLM.from_pretrained(tmp_path / "e").eval(), tokens, 8) == pytest.approx(at_3, abs=1e-5)


def test_the_residual_is_the_same_bits_for_any_thread_count_and_stored_factors_of_another_rank_are_refused(base_dir,
                                                                                                         tmp_path):
    """cpt's residual W - s B0 A0 (no matmul) is the same bits on 1 and 2 threads (the resume tests above and in
    test_lora_variants_sharded.py rebuild a whole residual base on other threads); a model built over stored factors
    has the residual base of the model that stored them; factors of another rank are refused naming the field and
    the file."""
    from safetensors.torch import save_file

    from cpt.adapter_init import ADAPTER_BASE, factors_items, residual

    g = torch.Generator().manual_seed(0)
    w, a, b = (torch.randn(shape, generator=g) for shape in ((256, 1024), (16, 1024), (256, 16)))
    with cpu_threads(1):
        one = residual(w, a, b, 0.5)
    with cpu_threads(2):
        assert torch.equal(residual(w, a, b, 0.5), one)
    torch.testing.assert_close(one, w - 0.5 * b @ a, atol=1e-5, rtol=1e-5)

    lora = LoraConfig(r=2, alpha=4, init_lora_weights="olora")
    model = apply_lora(AutoModelForCausalLM.from_pretrained(base_dir), lora)
    (name, _, factors), = factors_items(model)
    save_file(factors, str(tmp_path / name))
    (tmp_path / ADAPTER_BASE).write_text("{}")
    again = apply_lora(AutoModelForCausalLM.from_pretrained(base_dir), lora, factors_from=tmp_path)
    assert again._cpt_base_fingerprint == model._cpt_base_fingerprint
    with pytest.raises(ConfigError, match=r"^model.lora: the initial factors stored in .*lora_init_factors"
                                          r".safetensors do not fit .*\(2, 64\) vs \(4, 64\)"):
        apply_lora(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, alpha=4, init_lora_weights="olora"),
                   factors_from=tmp_path)
