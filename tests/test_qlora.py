"""QLoRA (``model.lora.quantize_base``, cpt/quantized_base.py): the frozen base loaded 4-bit by bitsandbytes with LoRA on
top, on CPU: the config's refusals, a run's exact resume from its adapter-only checkpoint (the base re-quantized from
its original files), the refusal of another base or other quantization settings, the exports (the adapter on the
original and on the 4-bit base; the merge into the original full-precision base) and `cpt eval` of its checkpoint; int8 and fp4 (with activation checkpointing) resumed;
2 DDP processes and 2 DeepSpeed ZeRO-2 processes (`scripts/launch.sh run.yaml zero2`, with a resume) against 1."""

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from cpt.config import ConfigError, load_config
from launching import ROOT, VENV_BIN, assert_close, finish, losses, rank_env, records, start, world_sizes, write_config
from conftest import tiny_run_config


def qlora_config(data: Path, base: Path, out: Path, **lora) -> dict:
    """A 6-step LoRA run (r=4, every linear layer) over ``base`` quantized to NF4, checkpoints at 3 and 6."""
    cfg = tiny_run_config(data, out, checkpoint={"every": 3, "keep": 5}, eval={"at_start": False})
    cfg["model"].update(name_or_path=str(base), arch=None, tokenizer=None,
                        lora={"r": 4, "alpha": 8, "quantize_base": "nf4", **lora})
    cfg["stages"][0]["steps"] = 6
    return cfg


def run(cfg: dict, **kw) -> str:
    from cpt.train import train

    lines: list[str] = []
    train(load_config(base=cfg), echo=lambda *a, **k: lines.append(" ".join(map(str, a))), **kw)
    return "\n".join(lines)


def evals(out: Path, name: str = "python") -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r[f"eval/{name}/loss"] for r in rows if f"eval/{name}/loss" in r}


# ------------------------------------------------------------------------------------------ config (no bitsandbytes)


@pytest.mark.parametrize("extra, named", [({"freeze": {"layers": "bottom_half"}}, "model.freeze"),
                                          ({"vocab": {"add_tokens_file": "t.txt"}}, "model.vocab"),
                                          ({"compile": "regional"}, "model.compile")])
def test_quantized_base_with_what_cannot_handle_it_is_one_error_naming_the_fields(tiny_cpt_data, tmp_path, extra, named):
    cfg = qlora_config(tiny_cpt_data, tmp_path / "base", tmp_path / "run")
    cfg["model"].update(extra)
    with pytest.raises(ConfigError, match=rf"model\.lora\.quantize_base \(nf4\) cannot be combined with {named}"):
        load_config(base=cfg)
    cfg["model"]["lora"]["quantize_base"] = None
    load_config(base=cfg)  # (without the quantized base: accepted)


def test_missing_bitsandbytes_arch_only_and_sharding_backends_are_one_line(monkeypatch):
    from cpt import quantized_base
    from cpt.config.model import ModelConfig

    model_cfg = ModelConfig(arch={"hidden_size": 32}, tokenizer="t", lora={"quantize_base": "nf4"})
    with pytest.raises(ConfigError, match="model.name_or_path"):
        quantized_base.load_kwargs(model_cfg, None, None)
    if importlib.util.find_spec("bitsandbytes") is not None:
        import transformers.integrations.deepspeed as hf_deepspeed

        with monkeypatch.context() as m:  # ranks under ZeRO-3 (zero.Init active) or FSDP: refused before loading
            m.setattr(hf_deepspeed, "is_deepspeed_zero3_enabled", lambda: True)
            with pytest.raises(ConfigError, match="this launch uses DeepSpeed ZeRO-3"):
                quantized_base.load_kwargs(model_cfg, "some/base", None)
        with monkeypatch.context() as m:
            m.setenv("ACCELERATE_USE_FSDP", "true")
            with pytest.raises(ConfigError, match="this launch uses FSDP"):
                quantized_base.load_kwargs(model_cfg, "some/base", None)
        with monkeypatch.context() as m:  # ZeRO-2 (accelerate's variable, no zero.Init): loads
            m.setenv("ACCELERATE_USE_DEEPSPEED", "true")
            assert "quantization_config" in quantized_base.load_kwargs(model_cfg, "some/base", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # (import bitsandbytes: ImportError)
    with pytest.raises(ConfigError, match=r"needs bitsandbytes, which is not installed: pip install 'cpt\[qlora\]'"):
        quantized_base.load_kwargs(model_cfg, "some/base", None)
    quantized = SimpleNamespace(**{quantized_base.MARK: {"spec": {"quantize_base": "nf4"}}})
    def deepspeed(stage):
        return SimpleNamespace(distributed_type="DEEPSPEED",
                               state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)))

    for acc, kind in ((SimpleNamespace(distributed_type="FSDP"), "FSDP"), (deepspeed(3), "DeepSpeed ZeRO-3")):
        with pytest.raises(ConfigError, match=f"this launch uses {kind}.*launch with DDP or ZeRO-2"):
            quantized_base.refuse_backend(quantized, acc)
    for acc in (SimpleNamespace(distributed_type="MULTI_CPU"), deepspeed(1), deepspeed(2)):  # DDP, ZeRO-1/2: fine
        quantized_base.refuse_backend(quantized, acc)


def test_dry_run_says_bitsandbytes_is_missing(tiny_cpt_data, tiny_base, tmp_path, monkeypatch):
    from cpt.dryrun import describe_run

    cfg = load_config(base=qlora_config(tiny_cpt_data, tiny_base, tmp_path / "run"))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ConfigError, match=r"pip install 'cpt\[qlora\]'"):
        describe_run(cfg)


# ------------------------------------------------------------------------------------------ a QLoRA run on CPU


@pytest.fixture(scope="module")
def qlora_run(tiny_cpt_data, tiny_base, tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    out = tmp_path_factory.mktemp("qlora") / "a"
    cfg = qlora_config(tiny_cpt_data, tiny_base, out)
    log = run(cfg)
    return cfg, out, log


def _resume_from_step_3(done: Path, out: Path, cfg: dict, **kw) -> str:
    shutil.copytree(done, out)
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    shutil.rmtree(out / "export")
    return run({**cfg, "run": {**cfg["run"], "output_dir": str(out)}}, resume=True, **kw)


def test_qlora_checkpoint_holds_the_adapter_and_resumes_bitwise_on_the_requantized_base(qlora_run, tiny_base, tmp_path):
    from cpt.adapter_checkpoint import ADAPTER_STATE, read_base_record
    from cpt.checkpoint import CheckpointError

    cfg, out, log = qlora_run
    assert "model.lora.quantize_base: the frozen base's Linear weights loaded as nf4" in log, log
    base_weights = sum(t.numel() for t in load_file(tiny_base / "model.safetensors").values())
    trainable, total = (int(x.replace(",", "")) for x in re.search(r"trainable params: ([\d,]+) of ([\d,]+)", log).groups())
    assert total == base_weights + trainable  # 4-bit weights counted as weights, not as packed bytes
    # the memory line counts each quantized weight once (peft's LoRA layer shows its base layer's weight too: 2x)
    linear = sum(t.numel() for k, t in load_file(tiny_base / "model.safetensors").items() if k.endswith("proj.weight"))
    assert f"instead of {linear * 4 / 2 ** 20:.1f} MiB in fp32" in log, log
    ckpt = out / "checkpoints" / "step_00000003"
    saved = load_file(ckpt / ADAPTER_STATE)
    assert saved and all(".lora_" in k for k in saved) and not any("base_layer" in k for k in saved)
    assert read_base_record(ckpt)["base"] == str(tiny_base)

    ref = losses(out)
    _resume_from_step_3(out, tmp_path / "b", cfg)
    assert losses(tmp_path / "b") == ref and evals(tmp_path / "b") == evals(out)  # bitwise: the same 4-bit base
    per_source = lambda d: {(r["step"], k): v for r in records(d) for k, v in r.items()  # noqa: E731
                            if k.startswith("train/loss/") or k in ("train/nonfinite_skipped", "train/spikes_skipped")}
    assert per_source(tmp_path / "b") and per_source(tmp_path / "b") == per_source(out)  # per-source losses, guards
    x, y = (load_file(d / "export" / "adapter_model.safetensors") for d in (out, tmp_path / "b"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    # other quantization settings, or other original files at the same path (even where their quantized weights are
    # the same): refused before anything trains
    other = {**cfg, "model": {**cfg["model"], "lora": {**cfg["model"]["lora"], "quantize_base": "fp4"}}}
    with pytest.raises(CheckpointError, match="another base model.*model.lora.quantize_base"):
        _resume_from_step_3(out, tmp_path / "c", other, allow_config_change=True)
    changed = tmp_path / "base2"
    shutil.copytree(tiny_base, changed)
    w = load_file(changed / "model.safetensors")
    k = next(k for k in w if k.endswith("mlp.up_proj.weight"))
    row = w[k][0]  # its smallest weight nudged by one ulp: the 4-bit base stays the same, the original base does not
    i = int(row.abs().argmin())
    row[i] = torch.nextafter(row[i], torch.tensor(1.0))
    save_file(w, str(changed / "model.safetensors"), metadata={"format": "pt"})
    moved = {**cfg, "model": {**cfg["model"], "name_or_path": str(changed)}}
    with pytest.raises(CheckpointError, match="another base model"):
        _resume_from_step_3(out, tmp_path / "d", moved, allow_config_change=True)


@pytest.mark.parametrize("quantize, model_extra", [("int8", {}), ("fp4", {"gradient_checkpointing": True})],
                         ids=["int8", "fp4-gradient-checkpointing"])
def test_int8_and_fp4_with_gradient_checkpointing_train_and_resume_bitwise(tiny_cpt_data, tiny_base, tmp_path, quantize,
                                                                            model_extra):
    """The other quantizations (int8: LLM.int8 weights; fp4, here with activation checkpointing, whose recomputed
    forward runs through the 4-bit base again): the run's log names them, the losses are finite, the checkpoint holds the
    adapter alone and a resume from step 3 gives the same losses bitwise."""
    pytest.importorskip("bitsandbytes")
    from cpt.adapter_checkpoint import ADAPTER_STATE

    out = tmp_path / "a"
    cfg = qlora_config(tiny_cpt_data, tiny_base, out, quantize_base=quantize)
    cfg["model"].update(model_extra)
    log = run(cfg)
    assert f"model.lora.quantize_base: the frozen base's Linear weights loaded as {quantize}" in log, log
    ref = losses(out)
    assert len(ref) == 6 and all(torch.isfinite(torch.tensor(v)) for v in ref.values())
    saved = load_file(out / "checkpoints" / "step_00000003" / ADAPTER_STATE)
    assert saved and all(".lora_" in k for k in saved)
    _resume_from_step_3(out, tmp_path / "b", cfg)
    assert losses(tmp_path / "b") == ref and evals(tmp_path / "b") == evals(out)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_qlora_exports_adapter_for_both_bases_and_merges_into_the_original_base(qlora_run, tiny_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from cpt.checkpoint_export import export_checkpoint

    cfg, out, _ = qlora_run
    ckpt = out / "checkpoints" / "step_00000006"
    merged_dir = export_checkpoint(ckpt, tmp_path / "merged", echo=lambda *a, **k: None)
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert all(p.dtype == torch.float32 for p in merged.parameters())

    ids = torch.randint(0, merged.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    adapter = out / "export"
    original = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    on_original = PeftModel.from_pretrained(original, adapter).eval()
    # the merge is into the original fp32 base (= original base + adapter), not into the dequantized 4-bit weights
    assert torch.allclose(_logits(merged, ids), _logits(on_original, ids), atol=1e-5)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    four_bit = AutoModelForCausalLM.from_pretrained(tiny_base, quantization_config=bnb, device_map="cpu",
                                                    dtype=torch.float32)
    for m in four_bit.modules():  # (bitsandbytes 0.50's CPU inference repacking fails on layers this small, as in cpt)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    on_4bit = PeftModel.from_pretrained(four_bit, adapter).eval()
    q, m = _logits(on_4bit, ids), _logits(merged, ids)
    assert torch.isfinite(q).all() and 0 < (q - m).abs().max() < 0.25  # the quantization error (measured 0.08)


def test_cpt_eval_of_the_qlora_checkpoint_is_close_to_the_runs_own_evaluation(qlora_run, tmp_path):
    """`cpt eval CHECKPOINT` merges the adapter into the original base and scores the run's held-out sets: the
    held-out loss of that full-precision model against the QLoRA model's, logged by the run at the same step."""
    from cpt.commands.eval import main

    cfg, out, _ = qlora_run
    assert main([str(out / "checkpoints" / "step_00000006"), "--out", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    for name in ("python", "shakespeare"):
        got, logged = result["heldout"][name]["loss"], evals(out, name)[6]
        assert got != logged and abs(got - logged) / logged < 1e-3, (name, got, logged)  # measured: 8e-5


@pytest.mark.slow
def test_qlora_under_two_ddp_processes_matches_one(qlora_run, tiny_cpt_data, tiny_base, tmp_path):
    import bitsandbytes

    cfg, out, _ = qlora_run
    cfg2 = {**cfg, "run": {**cfg["run"], "output_dir": str(tmp_path / "ddp")}}
    env = rank_env(cpu=True)
    where = Path(bitsandbytes.__file__).parents[1]
    if where.name != "site-packages":  # (a private install on PYTHONPATH, as before the qlora extra was in the venv)
        env["PYTHONPATH"] += f":{where}"
    args = [str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", "-m", "cpt.cli", "train",
            str(write_config(cfg2, tmp_path / "c.yaml"))]
    rc, log = finish(start(args, tmp_path, env))
    assert rc == 0, log[-4000:]
    assert world_sizes(tmp_path / "ddp") == {2}
    assert_close(losses(tmp_path / "ddp"), losses(out))  # fp32 sums in another order: within launching.REL
    assert_close(evals(tmp_path / "ddp"), evals(out))


@pytest.mark.slow
def test_qlora_under_zero2_as_launched_matches_one_process_and_resumes_bitwise(qlora_run, tmp_path):
    """`scripts/launch.sh run.yaml zero2` (the shipped ZeRO-2 files, 2 CPU ranks): ZeRO-2 partitions only the trained
    adapter's gradients and Adam state, so the frozen 4-bit base stays whole on each rank as under DDP. The losses and
    held-out losses of the 1-process run; its step-3 checkpoint is adapter-only (DeepSpeed's files without the frozen
    base, and the fingerprint of the original base), and the same launch with --resume from it gives the
    uninterrupted run's losses bitwise; the export is the 1-process run's adapter. (ZeRO-3 and FSDP2 are refused:
    the unit test above.)"""
    from cpt.adapter_checkpoint import ADAPTER_BASE

    cfg, out, _ = qlora_run

    def launch(run: Path, *extra: str) -> None:
        at = {**cfg, "run": {**cfg["run"], "output_dir": str(run)}}
        env = {**rank_env(cpu=False), "NUM_GPUS": "2"}  # (ACCELERATE_USE_CPU would turn DeepSpeed into plain DDP)
        rc, log = finish(start([str(ROOT / "scripts" / "launch.sh"), str(write_config(at, run.parent / f"{run.name}.yaml")),
                                "zero2", *extra], run.parent, env))
        assert rc == 0, log[-5000:]

    run = tmp_path / "zero2"
    launch(run)
    assert world_sizes(run) == {2}
    assert_close(losses(run), losses(out))
    assert_close(evals(run), evals(out))
    ckpt = run / "checkpoints" / "step_00000003"
    assert (ckpt / ADAPTER_BASE).is_file() and not (ckpt / "model.safetensors").exists()
    base_bytes = sum(f.stat().st_size for f in Path(cfg["model"]["name_or_path"]).glob("*.safetensors"))
    assert sum(f.stat().st_size for f in (ckpt / "pytorch_model").glob("*model_states.pt")) < base_bytes / 2
    mine, reference = (load_file(d / "export" / "adapter_model.safetensors") for d in (run, out))
    assert mine.keys() == reference.keys()
    assert all(torch.allclose(mine[k], reference[k], atol=1e-4) for k in mine)

    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")
    shutil.rmtree(resumed / "export")
    launch(resumed, "--resume")
    assert [losses(resumed)[s] for s in (4, 5, 6)] == [losses(run)[s] for s in (4, 5, 6)]
