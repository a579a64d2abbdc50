"""model.lora.base_in_compute_dtype (cpt/base_dtype.py): a LoRA run's frozen base Linear weights stored in bf16 under
bf16 autocast. Which tensors are cast and the memory it frees; the training numerics bitwise those of the fp32 base
(eager, gradient checkpointing, model.compile regional and whole, on CPU bf16 autocast); generate under
autocast_for; and cpt's real training path end to end: losses, held-out and EMA evaluations, lm-eval, the adapter
export, resume (the checkpoint of a cast run, and a whole-model checkpoint of an fp32 base) and `cpt export`."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama
from cpt.adapters import apply_lora
from cpt.base_dtype import MARK, autocast_for, cast_frozen_linears, frozen_linears
from cpt.config import LoraConfig

BF16 = torch.bfloat16


def _lora(lora=None, tied=False, new_token_ids=None, gradient_checkpointing=False, **llama):
    model = tiny_llama(tied=tied, **llama)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(model, LoraConfig(r=2, alpha=4, **(lora or {})), new_token_ids=new_token_ids)
    if gradient_checkpointing:
        model.enable_input_require_grads()
    with torch.no_grad():  # LoRA B starts at zero: make the adapter matter from the first step
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    return model


def _short(name: str) -> str:
    return name.removeprefix("base_model.model.")


@pytest.mark.parametrize("case, extra", [
    ("untied", {"lm_head"}),  # a frozen, untied output head: cast too
    ("tied", set()),  # lm_head is the embedding's tensor: a lookup, never cast
    ("modules_to_save", set()),  # [lm_head, embed_tokens] trained in full: their copies and originals stay fp32
    ("new_tokens", set()),  # trainable_token_indices overlay lm_head: it stays fp32
])
def test_the_frozen_linears_are_cast_and_nothing_else(case, extra):
    model = _lora(lora={"modules_to_save": ["lm_head", "embed_tokens"], "train_norms": True} if case == "modules_to_save"
                  else None, tied=case == "tied", new_token_ids=[60, 61] if case == "new_tokens" else None)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    projections = {f"model.layers.{i}.{p}.base_layer" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj")}
    assert {_short(n) for n, _ in frozen_linears(model)} == projections | extra
    cast_bytes = sum(p.numel() * 4 for _, m in frozen_linears(model) for p in m.parameters())
    n, freed = cast_frozen_linears(model, BF16)
    assert n == len(projections | extra) and freed == cast_bytes // 2  # their memory halved
    for name, p in model.named_parameters():
        cast = _short(name).removesuffix(".weight") in projections | extra
        assert p.dtype == (BF16 if cast else torch.float32), name
        assert torch.equal(p.float(), before[name].to(BF16).float() if cast else before[name]), name
        assert not (cast and p.requires_grad), name


@pytest.mark.parametrize("distributed_type, precision, on, cast", [
    ("NO", "bf16", True, True), ("MULTI_CPU", "bf16", True, True), ("MULTI_GPU", "fp16", True, True),  # 1 process, DDP
    ("NO", "fp32", True, False), ("NO", "bf16", False, False),  # no autocast; switched off
    ("FSDP", "bf16", True, False), ("DEEPSPEED", "bf16", True, False),  # their own mixed precision: the base stays fp32
])
def test_where_the_base_is_cast(distributed_type, precision, on, cast):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from cpt.base_dtype import cast_frozen_base

    cfg = SimpleNamespace(model=SimpleNamespace(lora=LoraConfig(base_in_compute_dtype=on)),
                          train=SimpleNamespace(precision=precision))
    acc = SimpleNamespace(distributed_type=DistributedType[distributed_type], native_amp=precision != "fp32")
    model, said = _lora(), []
    cast_frozen_base(model, cfg, acc, said.append)
    dtypes = {p.dtype for _, m in frozen_linears(model) for p in m.parameters()}
    assert dtypes == ({BF16 if precision == "bf16" else torch.float16} if cast else {torch.float32})
    assert getattr(model, MARK, None) == (next(iter(dtypes)) if cast else None)
    if distributed_type in ("FSDP", "DEEPSPEED"):  # said in one line
        assert len(said) == 1 and "the frozen base stays fp32 under" in said[0]
    else:
        assert len(said) == int(cast)


@pytest.mark.parametrize("variant, dtype", [("eager", BF16), ("eager", torch.float16), ("gradient_checkpointing", BF16),
                                            ("regional", BF16), ("whole", BF16)])
def test_training_under_autocast_is_bitwise_that_of_the_fp32_base(variant, dtype):
    """3 AdamW steps on a LoRA model (an untied frozen head), under CPU bf16 (fp16) autocast: losses, LoRA weights and
    their gradients bitwise equal with the base cast and with the fp32 base (model.compile, aot_eager backend: dynamo
    and AOTAutograd, against the eager fp32 base)."""
    from cpt.compiling import compile_model

    def steps(cast: bool):
        torch._dynamo.reset()
        model = _lora(gradient_checkpointing=variant == "gradient_checkpointing")
        if cast:
            cast_frozen_linears(model, dtype)
        run = model
        if variant in ("regional", "whole") and cast:  # (the fp32 base: eager)
            run = compile_model(model, "regional" if variant == "regional" else True, backend="aot_eager")
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        opt = torch.optim.AdamW([p for _, p in trainable], lr=1e-2)
        gen, losses, grads = torch.Generator().manual_seed(1), [], []
        for _ in range(3):
            ids = torch.randint(0, 64, (2, 16), generator=gen)
            with torch.autocast("cpu", dtype=dtype):
                loss = run(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            grads.append([p.grad.clone() for _, p in trainable])
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        return losses, grads, {n: p.detach().clone() for n, p in trainable}

    (l0, g0, w0), (l1, g1, w1) = steps(False), steps(True)
    assert all(torch.equal(a, b) for a, b in zip(l0, l1)), (l0, l1)
    assert all(torch.equal(a, b) for x, y in zip(g0, g1) for a, b in zip(x, y))
    assert w0.keys() == w1.keys() and all(w0[k].dtype == torch.float32 and torch.equal(w0[k], w1[k]) for k in w0)


def test_generate_of_a_cast_base_runs_under_autocast_for():
    """generate reaches the inner model's forward, outside accelerate's autocast wrapper: a cast base fails there
    with a dtype error, and runs under autocast_for (as lm-eval's generation tasks do) like the fp32 base under
    autocast."""
    ids = torch.tensor([[1, 2, 3, 4]])
    fp32, cast = _lora().eval(), _lora().eval()
    cast_frozen_linears(cast, BF16)
    setattr(cast, MARK, BF16)
    with pytest.raises(RuntimeError, match="dtype"):
        cast.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    with autocast_for(cast):
        got = cast.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    with torch.autocast("cpu", dtype=BF16):
        want = fp32.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)
    assert isinstance(autocast_for(fp32), contextlib.nullcontext)  # not cast: nothing changes


# ------------------------------------------------------------------------------------------ cpt's training path


def _config(tiny_cpt_data, base, out: Path, cast: bool) -> dict:
    from test_train_modes import shipped

    cfg = shipped("lora", tiny_cpt_data, base, out, checkpoint={"every": 3, "keep": 5},
                  eval={"ema": True, "lm_eval": {"tasks": ["cpt_arith_mc"], "limit": 8, "batch_size": 8}})
    cfg["model"]["lora"].update(r=2, alpha=4, base_in_compute_dtype=cast)
    cfg["train"].update(precision="bf16", ema_decay=0.9)
    return cfg


def _run(cfg: dict, **kw):
    from cpt.config import load_config
    from cpt.train import train

    lines: list[str] = []
    train(load_config(base=cfg), echo=lambda *a, **k: lines.append(" ".join(map(str, a))), **kw)
    return "\n".join(lines)


def _numbers(run_dir: Path) -> list[dict]:
    """Every logged loss, evaluation and lm-eval score (not timings) of a run."""
    from launching import records

    keep = ("train/loss", "eval/", "ema/eval/", "lm_eval/", "forgetting/", "adaptation/")
    numbers = [(r["step"], {k: v for k, v in r.items() if k.startswith(keep)}) for r in records(run_dir)]
    return [{"step": step, **n} for step, n in numbers if n]


def _resume_at_3(done: Path, out: Path, cfg: dict) -> str:
    shutil.copytree(done, out)
    for p in ("checkpoints/step_00000006", "export", "export-ema"):
        shutil.rmtree(out / p)
    return _run({**cfg, "run": {**cfg["run"], "output_dir": str(out)}}, resume=True)


def _same_files(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    return bool(x) and x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture
def bf16_in_process():
    """accelerate keeps one AcceleratorState per process, refusing another mixed precision than its first: the
    in-process fp32 runs of other tests (and this test's bf16 ones) each start from a fresh one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.mark.slow
def test_a_bf16_lora_run_is_bitwise_that_of_the_fp32_base(tiny_cpt_data, tiny_base, tmp_path, monkeypatch,
                                                          bf16_in_process):
    """configs/lora-cpt.yaml in bf16 with an EMA, held-out and EMA evaluations and lm-eval in the loop, 6 steps: with
    the base cast (the default) every logged loss and score, the adapter export and the EMA's are bitwise those of
    the same run with model.lora.base_in_compute_dtype: false (an fp32 base, as before). Its adapter checkpoint
    resumes onto the same losses; so does a whole-model checkpoint of the fp32 base (earlier cpt's layout), its
    base fingerprinted in fp32; a new stage starts from it; `cpt export` of the checkpoint and `cpt merge` of the
    export merge into the fp32 base."""
    from cpt.adapter_checkpoint import read_base_record
    from cpt.checkpoint_export import export_checkpoint

    a, b = tmp_path / "cast", tmp_path / "fp32"
    cast_log = _run(_config(tiny_cpt_data, tiny_base, a, True))
    with monkeypatch.context() as m:  # the fp32 run writes the whole-model checkpoints of earlier cpt
        m.setattr("cpt.checkpoint_files.without_base", lambda model: False)
        fp32_log = _run(_config(tiny_cpt_data, tiny_base, b, False))
    assert "frozen base's Linear weights are stored in bf16 (14 tensors" in cast_log and "stored in" not in fp32_log
    ref = _numbers(a)
    assert ref == _numbers(b) and any("lm_eval/cpt_arith_mc/acc" in r for r in ref) and any("ema/eval/python/loss" in r for r in ref)
    for d in ("export", "export-ema"):
        assert _same_files(a / d / "adapter_model.safetensors", b / d / "adapter_model.safetensors"), d

    # resumed from the cast run's adapter checkpoint, and from the fp32 run's whole-model one: the same run
    assert "resumed" in _resume_at_3(a, tmp_path / "ra", _config(tiny_cpt_data, tiny_base, a, True))
    assert (b / "checkpoints" / "step_00000003" / "model.safetensors").is_file()
    assert "resumed" in _resume_at_3(b, tmp_path / "rb", _config(tiny_cpt_data, tiny_base, b, True))
    for r in (tmp_path / "ra", tmp_path / "rb"):
        assert _numbers(r) == ref
        assert _same_files(a / "export" / "adapter_model.safetensors", r / "export" / "adapter_model.safetensors")
    fingerprints = {read_base_record(d / "checkpoints" / f"step_0000000{s}")["fingerprint"]
                    for d, s in ((a, 3), (a, 6), (tmp_path / "rb", 6))}
    assert len(fingerprints) == 1  # the fp32 base's, whatever the storage

    # a new stage from the cast run's checkpoint (train.init_from): its base check passes, it starts from its weights
    stage = _config(tiny_cpt_data, tiny_base, tmp_path / "stage", True)
    stage["train"]["init_from"] = str(a / "checkpoints" / "step_00000003")
    stage["stages"][0]["steps"], stage["eval"]["lm_eval"]["tasks"] = 3, []
    assert "initialised weights from" in _run(stage)
    at = lambda run, step: next(r for r in _numbers(run) if r["step"] == step and "eval/python/loss" in r)  # noqa: E731
    assert at(tmp_path / "stage", 0)["eval/python/loss"] == at(a, 3)["eval/python/loss"]

    # cpt export of the cast run's checkpoint: the adapter merged into the fp32 base (its untouched tensors exact)
    from safetensors.torch import load_file

    export_checkpoint(a / "checkpoints" / "step_00000006", tmp_path / "merged", echo=lambda *a: None)
    merged, base = load_file(tmp_path / "merged" / "model.safetensors"), load_file(tiny_base / "model.safetensors")
    assert all(merged[k].dtype == torch.float32 for k in merged)
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    adapter, q = load_file(a / "export" / "adapter_model.safetensors"), "model.layers.0.self_attn.q_proj"
    delta = adapter[f"base_model.model.{q}.lora_B.weight"] @ adapter[f"base_model.model.{q}.lora_A.weight"] * 2.0
    assert delta.abs().max() > 0  # (a base rounded to bf16 would be off by ~1e-4 here)
    assert torch.allclose(merged[f"{q}.weight"], base[f"{q}.weight"] + delta, rtol=0, atol=1e-7)
    from cpt.model import merge_adapter  # `cpt merge` of the run's export: the same merged weights

    merge_adapter(a / "export", tmp_path / "merged2")
    assert _same_files(tmp_path / "merged" / "model.safetensors", tmp_path / "merged2" / "model.safetensors")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_cast_frees_half_the_frozen_linears_and_training_is_bitwise_unchanged():
    """On a GPU (eager attention: deterministic kernels): the device memory the cast frees is half the frozen Linear
    weights', and 3 steps under bf16 autocast give bitwise the losses and LoRA weights of the fp32 base."""

    def steps(cast: bool):
        model = _lora(attn_implementation="eager").cuda()
        before = torch.cuda.memory_allocated()
        _, freed = cast_frozen_linears(model, BF16) if cast else (0, 0)
        torch.cuda.synchronize()
        assert before - torch.cuda.memory_allocated() == freed
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt, gen, losses = torch.optim.AdamW(trainable, lr=1e-2), torch.Generator().manual_seed(1), []
        for _ in range(3):
            ids = torch.randint(0, 64, (2, 16), generator=gen).cuda()
            with torch.autocast("cuda", dtype=BF16):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses, [p.detach().cpu() for p in trainable], freed

    (l0, w0, _), (l1, w1, freed) = steps(False), steps(True)
    assert freed == sum(p.numel() * 2 for _, m in frozen_linears(_lora()) for p in m.parameters())
    assert l0 == l1 and all(torch.equal(a, b) for a, b in zip(w0, w1))
