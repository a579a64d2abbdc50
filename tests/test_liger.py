"""model.liger_kernel: Liger's Triton kernels for the layers, never its fused loss, so the loss stays cpt's (chunked,
per-source training loss kept). Liger needs CUDA and triton: here its entry point is replaced by a recorder (the
real kernels run in tests/test_gpu.py on a GPU machine)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from conftest import Echo, tiny_llama, tiny_run_config
from launching import records

import cpt.layer_options


@pytest.fixture
def fake_liger(monkeypatch):
    """A stand-in liger_kernel package whose instance patcher records its calls; CUDA reported available."""
    calls = []
    pkg, trans, patch = (types.ModuleType(n) for n in
                         ("liger_kernel", "liger_kernel.transformers", "liger_kernel.transformers.monkey_patch"))
    trans._apply_liger_kernel_to_instance = lambda model, **kw: calls.append((model, kw))
    patch.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": object()}
    for mod in (pkg, trans, patch):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return calls


def test_liger_patches_the_layers_not_the_loss(fake_liger):
    model, say = tiny_llama(), Echo()
    cpt.layer_options.apply_liger(model, say)
    assert fake_liger == [(model, {"cross_entropy": False, "fused_linear_cross_entropy": False})]
    assert say == ["model.liger_kernel: Liger kernels applied to the llama layers (the loss stays cpt's)"]


def test_liger_patches_the_base_model_under_lora(fake_liger):
    from cpt.adapters import apply_lora
    from cpt.config import LoraConfig

    model = apply_lora(tiny_llama(), LoraConfig(r=4, alpha=8))
    cpt.layer_options.apply_liger(model, Echo())
    assert [m for m, _ in fake_liger] == [model.get_base_model()]


def test_liger_is_skipped_with_a_reason(fake_liger, monkeypatch):
    say = Echo()
    model = tiny_llama()
    model.config.model_type = "not-a-liger-model"
    cpt.layer_options.apply_liger(model, say)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpt.layer_options.apply_liger(tiny_llama(), say)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)  # not installed: the import fails
    cpt.layer_options.apply_liger(tiny_llama(), say)
    assert fake_liger == []
    assert say == ["model.liger_kernel: Liger has no kernels for model type 'not-a-liger-model'; continuing without them",
                   "model.liger_kernel: Liger's kernels need a CUDA GPU; continuing without them",
                   "model.liger_kernel: liger-kernel is not installed; continuing without its kernels"]


def test_run_with_liger_kernel_keeps_the_chunked_loss_and_per_source_loss(tiny_cpt_data, tmp_path):
    """(Here liger-kernel's kernels cannot run: the run goes on without them, and its loss path is the usual one.)"""
    from cpt.config import load_config
    from cpt.train import train

    cfg = tiny_run_config(tiny_cpt_data, tmp_path / "run", eval={"at_start": False}, checkpoint={"every": None})
    cfg["stages"][0]["steps"] = 3
    cfg["data"]["heldout"] = []
    cfg["model"]["liger_kernel"] = True
    say = Echo()
    train(load_config(base=cfg), echo=say)
    assert "loss: chunked next-token loss" in say.text and "model.liger_kernel:" in say.text
    logged = [r for r in records(tmp_path / "run") if "train/loss" in r]
    assert len(logged) == 3 and all("train/loss/python" in r and "train/loss/shakespeare" in r for r in logged)
