"""The CPT modes end to end through the real training loop, on a tiny model and real text, using the shipped
configs (configs/{full,lora,freeze}-cpt.yaml) with only paths and sizes changed:

* full CPT with an EMA of the weights (export-ema/, EMA held-out eval, EMA state across resume);
* LoRA CPT: peft adapter export, `cpt merge` == base + adapter, exact resume after SIGTERM, held-out eval,
  lm-eval in the loop;
* partial freezing: frozen weights unchanged, trainable count printed;
* vocabulary extension: shards prepared with `cpt prepare --extend-vocab RUN.yaml`, full and LoRA runs.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cpt.config import load_config
from launching import losses, records

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# strings the tiny 1024-token BPE splits into several tokens, frequent in the Python corpus
NEW_TOKENS = ["    def __init__(self", "    return self.", " isinstance(", "raise ValueError(", " is not None"]


# ------------------------------------------------------------------------------------------ helpers


def shipped(name: str, data_root: Path, base: Path, out: Path, steps: int = 6, data: Path | None = None, **sections) -> dict:
    """configs/<name>-cpt.yaml as shipped, with the demo paths pointed at the tiny data and base model and the
    sizes shrunk (sequence length, batch, steps, eval set size). Everything else (the mode) is left as shipped."""
    cfg = yaml.safe_load((ROOT / "configs" / f"{name}-cpt.yaml").read_text())
    d = data or data_root / "data"
    cfg["run"]["output_dir"] = str(out)
    cfg["model"]["name_or_path"] = str(base)
    cfg["data"]["seq_len"] = 64
    cfg["data"]["sources"] = [{"name": "python", "path": str(d / "python")},
                              {"name": "shakespeare", "path": str(d / "shakespeare"), "replay": True}]
    cfg["data"]["heldout"] = [{"name": "shakespeare", "path": str(d / "shakespeare" / "heldout"), "tag": "upstream"},
                              {"name": "python", "path": str(d / "python" / "heldout"), "tag": "downstream"}]
    stage = cfg["stages"][0]
    stage["steps"] = steps
    stage["schedule"]["warmup_steps"] = 2
    cfg["train"].update(global_batch_size=8, micro_batch_size=4, log_every=1, progress_bar=False)
    cfg["eval"].update(every=3, dense_steps=0, tokens_per_set=2048, batch_size=8)
    cfg["checkpoint"].update(every=None)
    cfg["logging"] = {"plot": False}
    for section, value in sections.items():
        cfg[section] = {**cfg.get(section, {}), **value}
    return cfg


def run(cfg: dict, **kw):
    from cpt.train import train

    lines: list[str] = []
    result = train(load_config(base=cfg), echo=lambda *a, **k: lines.append(" ".join(map(str, a))), **kw)
    return result, "\n".join(lines)


def cpt_cli(*args, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen([sys.executable, "-m", "cpt.cli", *map(str, args)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def heldout_tokens(data_root: Path, name: str, tokenizer, n_tokens=2048):
    from cpt.data.loader import load_heldout
    from cpt.data.sources import HeldoutConfig

    h = HeldoutConfig(name=name, path=str(data_root / name / "heldout"), tag="downstream")
    return load_heldout(h, tokenizer, 64, n_tokens)


def step0(run_dir) -> dict:
    return next(r for r in records(run_dir) if r["step"] == 0 and "eval/python/loss" in r)


def records_at(run_dir, step: int) -> dict:
    return next(r for r in records(run_dir) if r["step"] == step and "eval/python/loss" in r)


def last_eval(run_dir) -> dict:
    return [r for r in records(run_dir) if "eval/python/loss" in r][-1]


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def base(tiny_base) -> Path:
    return tiny_base


@pytest.fixture(scope="module")
def full_ema(tiny_cpt_data, base, tmp_path_factory):
    """configs/full-cpt.yaml (ema_decay 0.99, eval.ema), checkpoints every 3 of 6 steps."""
    out = tmp_path_factory.mktemp("full") / "run"
    cfg = shipped("full", tiny_cpt_data, base, out, checkpoint={"every": 3, "keep": 5})
    assert cfg["eval"]["ema"] is True and cfg["train"]["ema_decay"] == 0.99  # as shipped
    result, log = run(cfg)
    return cfg, result, log


@pytest.fixture(scope="module")
def lora_run(tiny_cpt_data, base, tmp_path_factory):
    """configs/lora-cpt.yaml, 12 steps, with lm-eval (a local multiple-choice task) at step 0 and the end."""
    out = tmp_path_factory.mktemp("lora") / "run"
    cfg = shipped("lora", tiny_cpt_data, base, out, steps=12,
                  eval={"lm_eval": {"tasks": ["cpt_arith_mc"], "limit": 8, "batch_size": 8}})
    result, log = run(cfg)
    return cfg, result, log


# ------------------------------------------------------------------------------------------ full CPT + EMA


def test_full_config_runs_and_exports_model_and_ema(full_ema, base):
    from transformers import AutoModelForCausalLM

    cfg, result, log = full_ema
    out = Path(cfg["run"]["output_dir"])
    assert result.step == 6 and result.stopped_early is None
    assert (out / "export" / "model.safetensors").is_file() and (out / "export-ema" / "model.safetensors").is_file()
    live, ema = load_file(out / "export" / "model.safetensors"), load_file(out / "export-ema" / "model.safetensors")
    base_w = load_file(base / "model.safetensors")
    assert live.keys() == ema.keys() == base_w.keys()
    # decay 0.99 over 6 steps: the EMA stays close to the base, unlike the live weights
    for k in live:
        assert not torch.equal(live[k], ema[k]), k
        assert (ema[k] - base_w[k]).abs().max() < (live[k] - base_w[k]).abs().max(), k
    AutoModelForCausalLM.from_pretrained(out / "export-ema")  # a loadable HF model
    assert "trainable params: 160,064 of 160,064 (100.00%)" in log
    r0 = step0(out)
    assert r0["forgetting/shakespeare"] == 0.0 and r0["adaptation/python"] == 0.0
    assert last_eval(out)["adaptation/python"] > 0


def test_cpt_export_ema_writes_the_checkpoints_average(full_ema, tmp_path):
    """`cpt export RUN --ema`: the EMA of the weights at a checkpoint, which only the end's export-ema/ held (the
    EMA at step 3 was in the checkpoint, with no way out). At the last step it is export-ema/ bitwise; at step 3 it
    differs from the trained weights; a run without an EMA is one line."""
    from cpt.cli import main

    cfg, _, _ = full_ema
    out = Path(cfg["run"]["output_dir"])
    assert main(["export", str(out), "--ema", "--out", str(tmp_path / "last")]) == 0
    got, want = load_file(tmp_path / "last" / "model.safetensors"), load_file(out / "export-ema" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    step3 = out / "checkpoints" / "step_00000003"
    assert main(["export", str(step3), "--ema", "--out", str(tmp_path / "e3")]) == 0
    assert main(["export", str(step3), "--out", str(tmp_path / "w3")]) == 0
    e3, w3 = load_file(tmp_path / "e3" / "model.safetensors"), load_file(tmp_path / "w3" / "model.safetensors")
    assert any(not torch.equal(e3[k], w3[k]) for k in w3)
    from conftest import tiny_llama
    from cpt.ema import load_ema_weights

    with pytest.raises(ValueError, match=r"its run kept no EMA of the weights \(train.ema_decay\)"):
        load_ema_weights(tmp_path / "w3" / "state.safetensors", tiny_llama(), 0.99)  # (no such file: no EMA)


def test_ema_eval_logs_the_averaged_weights(full_ema, tiny_cpt_data):
    """eval.ema: at step 0 the EMA is the base (same losses); at the end it is the export-ema model's loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt.evaluate import heldout_loss

    cfg, _, _ = full_ema
    out = Path(cfg["run"]["output_dir"])
    r0 = step0(out)
    for name in ("python", "shakespeare"):
        assert r0[f"ema/eval/{name}/loss"] == pytest.approx(r0[f"eval/{name}/loss"], abs=1e-6)
    evals = [r for r in records(out) if "ema/eval/python/loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    final = evals[-1]
    assert final["ema/eval/python/loss"] != pytest.approx(final["eval/python/loss"], abs=1e-4)
    model = AutoModelForCausalLM.from_pretrained(out / "export-ema")
    tok = AutoTokenizer.from_pretrained(out / "export-ema")
    tokens = heldout_tokens(tiny_cpt_data / "data", "python", tok)
    assert heldout_loss(model, tokens, 8) == pytest.approx(final["ema/eval/python/loss"], abs=1e-5)
    # the evaluator's own forgetting/adaptation bookkeeping is about the live weights only
    assert "ema/forgetting/shakespeare" not in final and "eval/python/loss" in final


def test_ema_state_survives_resume(full_ema, tmp_path):
    """Resume from the step-3 checkpoint (EMA in state.safetensors under "ema."): same losses, identical export-ema."""
    cfg, _, _ = full_ema
    src = Path(cfg["run"]["output_dir"])
    ckpt3 = src / "checkpoints" / "step_00000003"
    extra = load_file(ckpt3 / "state.safetensors")
    assert int(extra["ema.num_updates"]) == 3 and float(extra["ema.decay"]) == pytest.approx(0.99)
    assert any(k.startswith("ema.shadow.model.layers.0.") for k in extra)
    out = tmp_path / "run"
    shutil.copytree(src, out)
    for p in ("export", "export-ema", "checkpoints/step_00000006"):
        shutil.rmtree(out / p)
    cfg = json.loads(json.dumps(cfg))
    cfg["run"]["output_dir"] = str(out)
    result, log = run(cfg, resume=True)
    assert "resumed" in log and result.step == 6
    assert losses(out) == losses(src)
    for d in ("export", "export-ema"):
        a, b = load_file(src / d / "model.safetensors"), load_file(out / d / "model.safetensors")
        assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), d


def test_ema_eval_needs_ema_decay(tiny_cpt_data, base, tmp_path):
    from cpt.config import ConfigError

    cfg = shipped("lora", tiny_cpt_data, base, tmp_path / "r", eval={"ema": True})
    with pytest.raises(ConfigError, match="eval.ema"):
        load_config(base=cfg)


# ------------------------------------------------------------------------------------------ LoRA


def test_lora_config_exports_a_peft_adapter(lora_run, base):
    cfg, result, log = lora_run
    out = Path(cfg["run"]["output_dir"])
    assert result.step == 12
    files = {p.name for p in (out / "export").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "cpt_adapter.json", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    acfg = json.loads((out / "export" / "adapter_config.json").read_text())
    assert acfg["r"] == 64 and acfg["lora_alpha"] == 128 and Path(acfg["base_model_name_or_path"]) == base
    weights = load_file(out / "export" / "adapter_model.safetensors")
    assert any("lora_A" in k for k in weights) and any("norm" in k for k in weights)  # train_norms: true
    m = re.search(r"trainable params: ([\d,]+) of ([\d,]+)", log)
    trainable, total = (int(x.replace(",", "")) for x in m.groups())
    assert 0 < trainable < total
    # held-out evaluation ran with the adapter: nothing forgotten at step 0, then adaptation
    r0 = step0(out)
    assert r0["forgetting/shakespeare"] == 0.0 and r0["adaptation/python"] == 0.0
    assert [r["step"] for r in records(out) if "eval/python/loss" in r] == [0, 3, 6, 9, 12]
    assert last_eval(out)["adaptation/python"] > 0


def test_lora_merge_equals_base_plus_adapter(lora_run, base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cpt.commands.merge import main as merge_main

    cfg, _, _ = lora_run
    adapter = Path(cfg["run"]["output_dir"]) / "export"
    assert merge_main([str(adapter), "--out", str(tmp_path / "merged")]) == 0  # base from adapter_config.json
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
    ids = torch.randint(0, 1024, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = merged(ids).logits, with_adapter(ids).logits, plain(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert (a - c).abs().max() > 1e-3  # the adapter does something


def test_lm_eval_in_the_loop_on_a_lora_model(lora_run):
    cfg, _, _ = lora_run
    recs = [r for r in records(cfg["run"]["output_dir"]) if any(k.startswith("lm_eval/") for k in r)]
    assert [r["step"] for r in recs] == [0, 12]  # eval.at_start (the base model) and at_end
    acc = recs[-1]["lm_eval/cpt_arith_mc/acc"]
    assert 0.0 <= acc <= 1.0 and acc * 8 == pytest.approx(round(acc * 8))  # limit: 8 questions


def test_lora_resume_after_sigterm_is_exact(lora_run, tmp_path):
    ref_cfg, _, _ = lora_run
    ref = losses(ref_cfg["run"]["output_dir"])
    cfg = json.loads(json.dumps(ref_cfg))
    out = tmp_path / "run"
    cfg["run"]["output_dir"] = str(out)
    cfg["eval"]["lm_eval"] = {"tasks": []}
    cfg["eval"]["every"] = 100  # held-out evals at 0 and 12 only: they do not change the training losses
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = cpt_cli("train", path)
    import time

    t0 = time.time()
    while len(losses(out)) < 3:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - t0 < 120
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and "preemption" in log, log
    k = int(sorted((out / "checkpoints").glob("step_*"))[-1].name[5:])
    assert 3 <= k < 12
    proc = cpt_cli("train", path, "--resume")
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and "resumed" in log, log
    got = losses(out)
    assert sorted(got) == list(range(1, 13))
    assert got == ref  # bitwise: fp32 on CPU
    a = load_file(out / "export" / "adapter_model.safetensors")
    b = load_file(Path(ref_cfg["run"]["output_dir"]) / "export" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _lora_small(tiny_cpt_data, base, out: Path) -> dict:
    """configs/lora-cpt.yaml at rank 2 (a small fraction of the tiny base, as r=64 is of a real one), 6 steps,
    checkpoints and held-out evaluations at 3 and 6."""
    cfg = shipped("lora", tiny_cpt_data, base, out, checkpoint={"every": 3, "keep": 5})
    cfg["model"]["lora"].update(r=2, alpha=4)
    cfg["eval"].update(at_start=False)
    return cfg


def _run_without_base(cfg: dict, out: Path) -> tuple[dict, Path]:
    """The 6-step run of ``cfg`` (in ``out``): its losses and its step-3 checkpoint, checked to hold the state without
    the frozen base (adapter_state.safetensors, adapter_base.json, the optimizer; no model.safetensors)."""
    from cpt.adapter_checkpoint import ADAPTER_BASE, ADAPTER_STATE

    result, _ = run(cfg)
    ref, ckpt = losses(out), out / "checkpoints" / "step_00000003"
    assert result.step == 6 and sorted(ref) == list(range(1, 7))
    names = {p.name for p in ckpt.iterdir()}
    assert {ADAPTER_STATE, ADAPTER_BASE, "optimizer.bin"} <= names and "model.safetensors" not in names
    return ref, ckpt


def _resume_from_step_3(done: Path, out: Path, cfg: dict, **kw):
    """The finished run ``done`` as if killed after its step-3 checkpoint, resumed in ``out``."""
    shutil.copytree(done, out)
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    shutil.rmtree(out / "export")
    cfg = {**cfg, "run": {**cfg["run"], "output_dir": str(out)}}
    return run(cfg, resume=True, **kw)


def test_lora_checkpoint_holds_the_adapter_not_the_base_and_resumes_exactly(tiny_cpt_data, base, tmp_path, monkeypatch):
    """A LoRA checkpoint (1 process) holds the adapter (LoRA weights, the norms of train_norms), the optimizer and the
    loop's state: a small fraction of the base's size. Resumed, the run rebuilds the base and gives the uninterrupted
    run's losses bitwise; a checkpoint of the whole model (written by earlier cpt) still resumes exactly; a new stage
    from it (train.init_from) starts from its weights; another base under the same adapter is refused in one line,
    nothing trained."""
    from cpt.adapter_checkpoint import ADAPTER_STATE
    from cpt.checkpoint import CheckpointError

    cfg = _lora_small(tiny_cpt_data, base, tmp_path / "a")
    ref, a = _run_without_base(cfg, tmp_path / "a")
    saved = load_file(a / ADAPTER_STATE)
    assert any(".lora_A.default." in k for k in saved) and any("norm.modules_to_save.default" in k for k in saved)
    assert not any("base_layer" in k or "original_module" in k for k in saved)  # nothing of the frozen base
    size = lambda d: sum(p.stat().st_size for p in d.rglob("*") if p.is_file())  # noqa: E731
    base_bytes = (base / "model.safetensors").stat().st_size
    assert (a / ADAPTER_STATE).stat().st_size < 0.05 * base_bytes and size(a) < 0.25 * base_bytes, (size(a), base_bytes)

    _, log = _resume_from_step_3(tmp_path / "a", tmp_path / "b", cfg)
    assert "resumed" in log and losses(tmp_path / "b") == ref  # bitwise: fp32 on CPU
    x, y = (load_file(d / "export" / "adapter_model.safetensors") for d in (tmp_path / "a", tmp_path / "b"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    # the whole-model layout of earlier cpt (written here by switching the adapter layout off) resumes exactly
    with monkeypatch.context() as m:
        m.setattr("cpt.checkpoint_files.without_base", lambda model: False)
        run({**cfg, "run": {**cfg["run"], "output_dir": str(tmp_path / "old")}})
    old = tmp_path / "old" / "checkpoints" / "step_00000003"
    assert (old / "model.safetensors").stat().st_size > base_bytes and not (old / ADAPTER_STATE).exists()
    _, log = _resume_from_step_3(tmp_path / "old", tmp_path / "c", cfg)
    assert "resumed" in log and losses(tmp_path / "c") == ref
    assert (tmp_path / "c" / "checkpoints" / "step_00000006" / ADAPTER_STATE).is_file()  # and saves the new layout

    # a new stage from it (train.init_from): the base built again, the adapter loaded over it (step 0 = step 3)
    stage = {**cfg, "run": {**cfg["run"], "output_dir": str(tmp_path / "stage")}, "train": {**cfg["train"], "init_from": str(a)},
             "eval": {**cfg["eval"], "at_start": True}}
    _, log = run(stage)
    assert f"initialised weights from {a}" in log
    assert step0(tmp_path / "stage")["eval/python/loss"] == records_at(tmp_path / "a", 3)["eval/python/loss"]

    # another base (one weight changed) at model.name_or_path: refused before anything is loaded or trained
    other = tmp_path / "other-base"
    shutil.copytree(base, other)
    weights = load_file(other / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1e-3
    from safetensors.torch import save_file

    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    cfg["model"]["name_or_path"] = str(other)
    with pytest.raises(CheckpointError, match="trained on another base model than this run builds") as e:
        _resume_from_step_3(tmp_path / "a", tmp_path / "d", cfg, allow_config_change=True)
    assert "\n" not in str(e.value) and str(base) in str(e.value) and str(other) in str(e.value)
    assert losses(tmp_path / "d") == ref and not (tmp_path / "d" / "checkpoints" / "step_00000006").exists()  # untouched


def test_a_stage_from_a_lora_checkpoint_of_a_run_started_from_an_hf_init_from_builds_that_base(tiny_cpt_data, base, tmp_path):
    """A LoRA trunk started from an HF train.init_from (another base than model.name_or_path); a new stage from its
    adapter-only checkpoint (train.init_from: the checkpoint) builds that base again (it was refused: "trained on
    another base", the stage's init_from being the checkpoint), starts from the trunk's weights and resumes exactly."""
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other-base"  # the trunk's base: model.name_or_path with one weight changed
    shutil.copytree(base, other)
    weights = load_file(other / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1e-2
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    trunk = _lora_small(tiny_cpt_data, base, tmp_path / "trunk")
    trunk["stages"][0]["steps"] = 3
    trunk["train"]["init_from"] = str(other)
    run(trunk)
    ckpt = tmp_path / "trunk" / "checkpoints" / "step_00000003"
    stage = _lora_small(tiny_cpt_data, base, tmp_path / "stage")
    stage["train"]["init_from"] = str(ckpt)
    stage["eval"]["at_start"] = True
    _, log = run(stage)
    assert f"from {ckpt}" in log
    assert step0(tmp_path / "stage")["eval/python/loss"] == records_at(tmp_path / "trunk", 3)["eval/python/loss"]
    _, log = _resume_from_step_3(tmp_path / "stage", tmp_path / "resumed", stage)
    assert "resumed" in log and losses(tmp_path / "resumed") == losses(tmp_path / "stage")
    from cpt.checkpoint_export import export_checkpoint  # (cpt export builds the same base)

    export_checkpoint(tmp_path / "stage" / "checkpoints" / "step_00000006", tmp_path / "x", adapter=True, echo=lambda *a: None)
    x, y = (load_file(d / "adapter_model.safetensors") for d in (tmp_path / "x", tmp_path / "stage" / "export"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ------------------------------------------------------------------------------------------ freezing


def test_freeze_config_keeps_frozen_weights(tiny_cpt_data, base, tmp_path):
    out = tmp_path / "run"
    result, log = run(shipped("freeze", tiny_cpt_data, base, out))
    assert result.step == 6
    before, after = load_file(base / "model.safetensors"), load_file(out / "export" / "model.safetensors")
    frozen = [k for k in before if k.startswith("model.layers.0.")]  # bottom_half of 2 layers
    trained = [k for k in before if k not in frozen]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert trained and all(not torch.equal(before[k], after[k]) for k in trained), [k for k in trained if torch.equal(before[k], after[k])]
    n_total = sum(v.numel() for v in before.values())
    n_frozen = sum(before[k].numel() for k in frozen)
    assert f"trainable params: {n_total - n_frozen:,} of {n_total:,}" in log
    assert step0(out)["forgetting/shakespeare"] == 0.0


def _freeze_small(tiny_cpt_data, base, out: Path) -> dict:
    """configs/freeze-cpt.yaml (bottom_half: layer 0 of 2 frozen), 6 steps, checkpoints and evaluations at 3 and 6."""
    cfg = shipped("freeze", tiny_cpt_data, base, out, checkpoint={"every": 3, "keep": 5})
    cfg["eval"].update(at_start=False)
    return cfg


def test_freeze_checkpoint_holds_the_trained_part_not_the_frozen_layers(tiny_cpt_data, base, tmp_path, monkeypatch):
    """A model.freeze checkpoint (1 process) holds the trainable parameters alone (no tensor of the frozen layer), the
    optimizer and the loop's state, and the frozen part's fingerprint. Resumed, the run rebuilds the base and gives the
    uninterrupted run's losses bitwise; `cpt export` of it is the run's own export, tensor for tensor; a new stage from
    it starts from its weights (held-out loss at step 0 = the checkpoint's); a whole-model checkpoint of earlier cpt
    still resumes exactly; another frozen base is refused in one line, nothing trained."""
    from cpt.adapter_checkpoint import ADAPTER_STATE, read_base_record
    from cpt.checkpoint import CheckpointError
    from cpt.checkpoint_export import export_checkpoint

    cfg = _freeze_small(tiny_cpt_data, base, tmp_path / "a")
    ref, a = _run_without_base(cfg, tmp_path / "a")
    before, saved = load_file(base / "model.safetensors"), load_file(a / ADAPTER_STATE)
    frozen = {k for k in before if k.startswith("model.layers.0.")}
    assert frozen and not frozen & set(saved) and set(saved) == set(before) - frozen  # (the tied head once)
    assert read_base_record(a)["kind"] == "freeze" and len(read_base_record(a)["fingerprint"]) == 64
    assert (a / ADAPTER_STATE).stat().st_size < (base / "model.safetensors").stat().st_size * 0.9

    _, log = _resume_from_step_3(tmp_path / "a", tmp_path / "b", cfg)
    assert "resumed" in log and losses(tmp_path / "b") == ref  # bitwise: fp32 on CPU
    export_checkpoint(tmp_path / "a" / "checkpoints" / "step_00000006", tmp_path / "x", echo=lambda *a: None)
    x, y = (load_file(d / "model.safetensors") for d in (tmp_path / "x", tmp_path / "a" / "export"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert all(torch.equal(x[k], before[k]) for k in frozen)  # (the frozen part: the base's)

    stage = {**cfg, "run": {**cfg["run"], "output_dir": str(tmp_path / "stage")}, "train": {**cfg["train"], "init_from": str(a)},
             "eval": {**cfg["eval"], "at_start": True}}
    _, log = run(stage)
    assert f"initialised weights from {a}" in log
    assert step0(tmp_path / "stage")["eval/python/loss"] == records_at(tmp_path / "a", 3)["eval/python/loss"]

    with monkeypatch.context() as m:  # the whole-model layout of earlier cpt
        m.setattr("cpt.checkpoint_files.without_base", lambda model: False)
        run({**cfg, "run": {**cfg["run"], "output_dir": str(tmp_path / "old")}})
    assert (tmp_path / "old" / "checkpoints" / "step_00000003" / "model.safetensors").is_file()
    _, log = _resume_from_step_3(tmp_path / "old", tmp_path / "c", cfg)
    assert "resumed" in log and losses(tmp_path / "c") == ref
    assert (tmp_path / "c" / "checkpoints" / "step_00000006" / ADAPTER_STATE).is_file()  # its frozen part is the base

    other = tmp_path / "other-base"  # a frozen weight changed
    shutil.copytree(base, other)
    weights = dict(before)
    weights["model.layers.0.input_layernorm.weight"] = weights["model.layers.0.input_layernorm.weight"] + 1e-3
    from safetensors.torch import save_file

    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    cfg["model"]["name_or_path"] = str(other)
    with pytest.raises(CheckpointError, match=r"trainable part \(model.freeze\) was trained over another base") as e:
        _resume_from_step_3(tmp_path / "a", tmp_path / "d", cfg, allow_config_change=True)
    assert "\n" not in str(e.value) and str(base) in str(e.value) and str(other) in str(e.value)
    assert losses(tmp_path / "d") == ref and not (tmp_path / "d" / "checkpoints" / "step_00000006").exists()


def test_a_freeze_stage_from_a_full_checkpoint_writes_whole_checkpoints_and_resumes_exactly(tiny_cpt_data, base, tmp_path, caplog):
    """A model.freeze stage from a full run's checkpoint (train.init_from): its frozen layer holds the trunk's trained
    weights, not the base a reader would build, so its checkpoints keep the whole model (said once); it resumes
    exactly. A full stage from a model.freeze checkpoint (which leaves the frozen layer out) builds that base again."""
    trunk = _freeze_small(tiny_cpt_data, base, tmp_path / "trunk")
    del trunk["model"]["freeze"]
    trunk["stages"][0]["steps"] = 3
    run(trunk)
    stage = _freeze_small(tiny_cpt_data, base, tmp_path / "stage")
    stage["train"]["init_from"] = str(tmp_path / "trunk" / "checkpoints" / "step_00000003")
    with caplog.at_level("WARNING", logger="cpt.checkpoint"):
        run(stage)
    assert "checkpoints hold the whole model" in caplog.text
    ckpt = tmp_path / "stage" / "checkpoints" / "step_00000003"
    assert (ckpt / "model.safetensors").is_file() and not (ckpt / "adapter_state.safetensors").exists()
    _, log = _resume_from_step_3(tmp_path / "stage", tmp_path / "resumed", stage)
    assert "resumed" in log and losses(tmp_path / "resumed") == losses(tmp_path / "stage")

    full = _freeze_small(tiny_cpt_data, base, tmp_path / "full")  # the other way: a full stage from a freeze checkpoint
    frozen_ckpt = tmp_path / "full-trunk"
    run({**full, "run": {**full["run"], "output_dir": str(frozen_ckpt)}, "stages": [{**full["stages"][0], "steps": 3}]})
    del full["model"]["freeze"]
    full["train"]["init_from"] = str(frozen_ckpt / "checkpoints" / "step_00000003")
    full["eval"]["at_start"] = True
    run(full)
    assert step0(tmp_path / "full")["eval/python/loss"] == records_at(frozen_ckpt, 3)["eval/python/loss"]


# ------------------------------------------------------------------------------------------ vocabulary extension


@pytest.fixture(scope="module")
def vocab_setup(tiny_cpt_data, base, tmp_path_factory):
    """A run config with model.vocab, and both corpora prepared with `cpt prepare --extend-vocab RUN.yaml`."""
    from cpt.commands.prepare import main as prepare_main

    root = tmp_path_factory.mktemp("vocab")
    tokens = root / "tokens.txt"
    tokens.write_text("\n".join(NEW_TOKENS) + "\n")
    vocab = {"add_tokens_file": str(tokens), "pad_to_multiple_of": 8}
    data = root / "data"
    cfg = shipped("full", tiny_cpt_data, base, root / "full", data=data)
    cfg["model"]["vocab"] = vocab
    run_yaml = root / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(cfg))
    for name in ("python", "shakespeare"):
        rc = prepare_main([str(tiny_cpt_data / "raw" / f"{name}.jsonl.gz"), "--extend-vocab", str(run_yaml),
                           "--out", str(data / name), "--heldout-docs", "8", "--no-progress"])
        assert rc == 0
    return cfg, vocab, data


def test_prepare_extend_vocab_uses_the_training_tokenizer(vocab_setup, base):
    from transformers import AutoTokenizer

    from cpt.data.shards import TokenShards, tokenizer_fingerprint
    from cpt.model import build_model, load_tokenizer, prepare_model

    cfg, _, data = vocab_setup
    rc = load_config(base=cfg)
    # exactly what the loop does: load, extend (prepare_model), then the data loader checks the shard hash
    tok = load_tokenizer(rc.model)
    _, ext, new_ids = prepare_model(rc.model, build_model(rc.model, tok), tok, log_fn=lambda *a: None)
    assert len(new_ids) == len(NEW_TOKENS)
    manifest = json.loads((data / "python" / "manifest.json").read_text())
    assert manifest["tokenizer"]["hash"] == tokenizer_fingerprint(ext) != tokenizer_fingerprint(AutoTokenizer.from_pretrained(base))
    assert manifest["tokenizer"]["name"] == f"{base} extended by model.vocab of {data.parent / 'run.yaml'}"
    shards = TokenShards.open(str(data / "python"), expected_tokenizer_hash=tokenizer_fingerprint(ext))
    ids = torch.from_numpy(shards.read(0, shards.num_tokens).astype("int64"))
    assert set(new_ids) <= set(ids.tolist())  # every new token occurs in the prepared Python corpus


def test_dry_run_checks_data_with_the_extended_tokenizer(vocab_setup):
    """`cpt train --dry-run` with model.vocab opens the sources and held-out sets with the tokenizer training uses."""
    from cpt.dryrun import describe_run

    from cpt.model import build_model, load_tokenizer, model_shape, prepare_model

    cfg, _, _ = vocab_setup
    d = describe_run(load_config(base=cfg))
    assert d["model"]["vocab"] == 1024 + len(NEW_TOKENS) and d["heldout"]
    # the model it describes is the one training builds: the new rows counted, and trainable under LoRA and
    # model.freeze (the dry run counted the model before the extension, and no new row as trainable)
    for extra in ({}, {"lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}, {"freeze": {"layers": "0"}}):
        rc = load_config(base={**cfg, "model": {**cfg["model"], **extra}})
        tok = load_tokenizer(rc.model)
        want = model_shape(prepare_model(rc.model, build_model(rc.model, tok), tok, log_fn=lambda *a: None)[0])
        got = describe_run(rc)["model"]
        assert (got["n_params"], got["n_trainable"]) == (want["n_params"], want["n_trainable"]), (extra, got, want)


def test_vocab_extension_full_run(vocab_setup, base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, _, _ = vocab_setup
    result, log = run(cfg)
    out = Path(cfg["run"]["output_dir"])
    assert result.step == 6
    tok = AutoTokenizer.from_pretrained(out / "export")
    assert len(tok) == 1024 + len(NEW_TOKENS)
    vocab = tok.get_vocab()
    assert all(t in vocab for t in NEW_TOKENS)
    assert tok.decode(tok(NEW_TOKENS[0] + "):")["input_ids"]) == NEW_TOKENS[0] + "):"
    model = AutoModelForCausalLM.from_pretrained(out / "export")
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows == model.config.vocab_size == 1032 and rows >= len(tok)  # padded to a multiple of 8
    assert step0(out)["forgetting/shakespeare"] == 0.0


def test_vocab_extension_refuses_shards_of_the_old_tokenizer(tiny_cpt_data, base, vocab_setup, tmp_path):
    from cpt.data.shards import ShardError

    cfg = shipped("full", tiny_cpt_data, base, tmp_path / "r")  # the old tokenizer's shards
    cfg["model"]["vocab"] = vocab_setup[1]
    with pytest.raises(ShardError, match="tokenizer"):
        run(cfg)


def test_vocab_extension_with_lora(vocab_setup, base, tiny_cpt_data, tmp_path):
    """LoRA + new tokens: the new rows are trained (peft trainable_token_indices) and merged; old rows untouched. Its
    checkpoints hold the new rows with the adapter (the extended base is built again on resume, which is exact)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt.adapter_checkpoint import ADAPTER_STATE
    from cpt.model import merge_adapter
    from cpt.vocab import VocabConfig, extend_vocabulary

    _, vocab, data = vocab_setup
    cfg = shipped("lora", tiny_cpt_data, base, tmp_path / "run", data=data, checkpoint={"every": 3, "keep": 5},
                  eval={"lm_eval": {"tasks": ["cpt_arith_mc"], "limit": 4, "batch_size": 8}})
    cfg["model"]["vocab"] = vocab
    result, log = run(cfg)  # lm-eval in the loop: HFLM's tie_weights() failed on the wrapped tied embedding
    assert [r["step"] for r in records(tmp_path / "run") if "lm_eval/cpt_arith_mc/acc" in r] == [0, 6]
    saved = load_file(tmp_path / "run" / "checkpoints" / "step_00000003" / ADAPTER_STATE)
    assert any("trainable_tokens_delta" in k for k in saved)
    _, log = _resume_from_step_3(tmp_path / "run", tmp_path / "again", cfg)
    assert "resumed" in log and losses(tmp_path / "again") == losses(tmp_path / "run")
    export = tmp_path / "run" / "export"
    side = json.loads((export / "cpt_adapter.json").read_text())
    assert side["num_embeddings"] == 1032 and side["new_rows"] == list(range(1024, 1032))
    assert any("trainable_tokens" in k for k in load_file(export / "adapter_model.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(export, tmp_path / "merged"))
    assert len(AutoTokenizer.from_pretrained(tmp_path / "merged")) == 1029
    # the rows as initialised (mean of subtokens) before training
    init_model, _, _ = extend_vocabulary(AutoModelForCausalLM.from_pretrained(base),
                                         AutoTokenizer.from_pretrained(base), VocabConfig(**vocab))
    w0 = init_model.get_input_embeddings().weight.detach()
    w = merged.get_input_embeddings().weight.detach()
    assert w.shape == w0.shape == (1032, 64)
    assert torch.equal(w[:1024], w0[:1024])  # base rows frozen under LoRA
    assert (w[1024:1029] - w0[1024:1029]).abs().amax(dim=1).min() > 0  # every new token's row was trained
    assert last_eval(tmp_path / "run")["adaptation/python"] > 0
    # `cpt eval`'s loader sizes the base as the adapter records (1032 rows), not len(tokenizer) (1029: an IndexError)
    from cpt.evaluate import heldout_loss
    from eval_harness.lm_eval_hook import load_for_eval

    model, tok = load_for_eval(export)
    assert heldout_loss(model, heldout_tokens(data, "python", tok), 8) == pytest.approx(
        last_eval(tmp_path / "run")["eval/python/loss"], abs=1e-5)


def test_a_stage_adding_vocabulary_from_a_full_checkpoint(vocab_setup, base, tiny_cpt_data, tmp_path):
    """model.vocab on a new full (or model.freeze) stage from a cpt checkpoint whose run had no such rows: the
    checkpoint's model is written as the run's base (RUN/base) and extended, as a LoRA stage's is (it stopped with
    'its weights do not fit the model this run builds ... [1024, 64] in the checkpoint, [1032, 64] in the model', though
    the same LoRA stage ran); the new rows start from the checkpoint's embeddings, and the run resumes exactly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt.evaluate import heldout_loss
    from cpt.vocab import VocabConfig, extend_vocabulary

    trunk = shipped("full", tiny_cpt_data, base, tmp_path / "trunk", steps=3, checkpoint={"every": 3},
                    train={"ema_decay": None}, eval={"ema": False, "at_start": False})
    run(trunk)
    ckpt = tmp_path / "trunk" / "checkpoints" / "step_00000003"
    _, vocab, data = vocab_setup
    cfg = shipped("freeze", tiny_cpt_data, base, tmp_path / "run", data=data, steps=4, checkpoint={"every": 2, "keep": 5},
                  train={"init_from": str(ckpt)})
    cfg["model"]["vocab"] = vocab
    result, log = run(cfg)
    assert result.step == 4 and (tmp_path / "run" / "base" / "model.safetensors").is_file()
    # step 0 is the trunk's model, its new rows initialised from the trunk's embeddings
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "trunk" / "export")
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "export")
    extended, _, _ = extend_vocabulary(trained, AutoTokenizer.from_pretrained(base), VocabConfig(**vocab))
    assert step0(tmp_path / "run")["eval/python/loss"] == pytest.approx(
        heldout_loss(extended.eval(), heldout_tokens(data, "python", tok), 8), abs=1e-6)
    frozen = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export").model.layers[0].mlp.up_proj.weight
    assert torch.equal(frozen, trained.model.layers[0].mlp.up_proj.weight)  # the trunk's, not the base's
    _, log = _resume_from_step_2(tmp_path / "run", tmp_path / "again", cfg)
    assert "resumed" in log and losses(tmp_path / "again") == losses(tmp_path / "run")


def _resume_from_step_2(done: Path, out: Path, cfg: dict):
    shutil.copytree(done, out)
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    shutil.rmtree(out / "export")
    return run({**cfg, "run": {**cfg["run"], "output_dir": str(out)}}, resume=True)
