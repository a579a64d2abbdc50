"""The chunked next-token loss (cpt/chunked_loss.py) equals today's full-logits loss: the loss, every per-row loss
and every gradient, in fp32, with tied and untied heads, document masking, a bias, LoRA (also on lm_head) and
held-out evaluation; models whose forward changes the logits after lm_head keep the full-logits path."""

from functools import partial

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaForCausalLM

from conftest import tiny_llama
from cpt import chunked_loss
from cpt.evaluate import heldout_loss
from cpt.lm_loss import causal_lm_loss, use_chunked_loss

EOS = 1


llama = partial(tiny_llama, 97, kv_heads=2, max_position_embeddings=64)


def rows(b: int = 3, length: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 97, (b, length), generator=g)
    ids[0, 5], ids[1, 11], ids[2, 3] = EOS, EOS, EOS  # documents inside rows (document masking cuts there)
    return ids


def loss_and_grads(model, ids, eos_id):
    model.zero_grad(set_to_none=True)
    loss, row_losses = causal_lm_loss(model, ids, eos_id)[:2]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), row_losses, grads


def assert_same_as_full_logits(model, ids, eos_id, chunk_tokens):
    ref_loss, ref_rows, ref_grads = loss_and_grads(model, ids, eos_id)
    assert chunked_loss.install(model, chunk_tokens) is chunked_loss.installed(model)
    try:
        loss, row_losses, grads = loss_and_grads(model, ids, eos_id)
    finally:
        chunked_loss.uninstall(model)
    assert chunked_loss.installed(model) is None
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(row_losses, ref_rows, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("eos_id", [None, EOS])
@pytest.mark.parametrize("chunk_tokens", [7, 1000])  # chunks that do not divide the 69 positions; one chunk
def test_loss_and_gradients_equal_full_logits(tied, eos_id, chunk_tokens):
    assert_same_as_full_logits(llama(tied=tied), rows(), eos_id, chunk_tokens)


def test_linear_head_with_bias_and_leaf_hidden_states():
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    head = torch.nn.Linear(16, 53)
    t = torch.randint(0, 53, (37,))
    ref = torch.nn.functional.cross_entropy(head(h), t, reduction="none")
    ref_grads = torch.autograd.grad(ref.mean() * 3.0, [h, head.weight, head.bias])
    loss, per_token, _ = chunked_loss.linear_cross_entropy(h, head.weight, head.bias, t, chunk_tokens=10)
    grads = torch.autograd.grad(loss * 3.0, [h, head.weight, head.bias])  # the incoming gradient scales them
    torch.testing.assert_close(per_token, ref.detach())
    assert not per_token.requires_grad
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation: no gradient work, same losses
        loss_ng, per_token_ng, _ = chunked_loss.linear_cross_entropy(h, head.weight, head.bias, t, chunk_tokens=10)
    torch.testing.assert_close(per_token_ng, ref.detach())


@pytest.mark.parametrize("z_coef", [0.0, 1e-2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_terms_give_the_eager_loops_losses_and_gradients(z_coef, dtype):
    """chunk_terms (the one-expression form model.compile=regional compiles) against the in-place eager loop: the
    same losses, log-partitions and gradients, fp32 and bf16 (autocast's compute dtype), with the z-loss and a bias."""
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    head = torch.nn.Linear(16, 53).to(dtype)
    t = torch.randint(0, 53, (37,))
    hd = h.to(dtype)
    out = {}
    for fn in (None, chunked_loss.chunk_terms):
        loss, per_token, lse = chunked_loss.linear_cross_entropy(hd, head.weight, head.bias, t, 10, z_coef, fn)
        out[fn] = (loss.detach(), per_token, lse, *torch.autograd.grad(loss, [h, head.weight, head.bias]))
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-3}
    for want, got in zip(out[None], out[chunked_loss.chunk_terms]):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, **tol)
    assert (out[None][2] is None) == (z_coef == 0)


def test_regional_compile_compiles_the_chunk_terms_and_keeps_the_loss():
    """model.compile=regional (aot_eager here) has the patched head compute each chunk through chunk_terms under
    torch.compile: the eager run's loss, per-row losses and gradients; the head's state says so, the log too."""
    from cpt.compiling import compile_model

    model, ids = llama(), rows()
    ref_loss, ref_rows, ref_grads = loss_and_grads(model, ids, EOS)
    state = chunked_loss.install(model, 16)
    assert state.chunk_fn is None
    said = []
    compile_model(model, "regional", said.append, backend="aot_eager")
    assert state.chunk_fn is not None and "but for the chunked loss's per-chunk softmax and gradient" in said[0]
    compiled, calls = state.chunk_fn, []
    state.chunk_fn = lambda *a: calls.append(1) or compiled(*a)
    loss, row_losses, grads = loss_and_grads(model, ids, EOS)
    assert len(calls) == 5  # 69 positions in chunks of 16
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(row_losses, ref_rows, rtol=1e-6, atol=1e-6)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)
    calls.clear()
    assert heldout_loss(model, ids, batch_size=3, eos_id=EOS) > 0
    assert not calls  # evaluation keeps the eager loop (no gradient to compute)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]])
def test_lora_including_lm_head(targets):
    """LoRA on attention keeps the plain linear head; LoRA on lm_head runs the adapter per chunk (checkpointed)."""
    model = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    assert_same_as_full_logits(model, rows(), EOS, chunk_tokens=16)
    linear = chunked_loss.install(model, 16).linear
    chunked_loss.uninstall(model)
    assert linear == ("lm_head" not in targets)
    with pytest.raises(chunked_loss.Unsupported, match="FSDP / ZeRO-3"):
        if not linear:
            chunked_loss.install(model, 16, sharded=True)
        else:
            raise chunked_loss.Unsupported("FSDP / ZeRO-3 (linear head: supported; nothing to check)")


def test_heldout_evaluation_uses_the_chunked_path():
    model, ids = llama(), rows(5)
    ref = heldout_loss(model, ids, batch_size=2, eos_id=EOS)
    state = chunked_loss.install(model, 5)
    calls = []
    original = chunked_loss.linear_cross_entropy
    try:
        chunked_loss.linear_cross_entropy = lambda *a, **k: calls.append(1) or original(*a, **k)
        got = heldout_loss(model, ids, batch_size=2, eos_id=EOS)
    finally:
        chunked_loss.linear_cross_entropy = original
    assert calls and state.input_ids is None
    assert got == pytest.approx(ref, rel=1e-6)
    with torch.no_grad():  # outside head_targets the head is the ordinary lm_head (generation, lm-eval, exports)
        assert model(input_ids=ids).logits.shape == (5, 24, 97)


def test_softcapped_logits_keep_the_full_logits_path():
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           num_key_value_heads=1, head_dim=16, intermediate_size=64,
                                           final_logit_softcapping=30.0))
    with pytest.raises(chunked_loss.Unsupported, match="soft-caps"):
        chunked_loss.install(model)
    model.config.final_logit_softcapping = None  # its forward still holds soft-capping code: refused, conservatively
    messages = []
    assert use_chunked_loss(model, "auto", 64, None, messages.append) is False
    assert chunked_loss.installed(model) is None and "changes its logits" in messages[0]
    from cpt.config import ConfigError

    with pytest.raises(ConfigError, match="train.chunked_loss: true, but .* soft-caps its logits"):  # (one line)
        use_chunked_loss(Gemma2ForCausalLM(model.config.__class__(**{**model.config.to_dict(), "final_logit_softcapping": 5.0})),
                         True, 64, None)
    assert use_chunked_loss(llama(), False, 64, None) is False


def test_scaled_logits_are_detected_from_the_forward_source():
    class Scaled(LlamaForCausalLM):
        def forward(self, input_ids=None, **kwargs):
            hidden_states = self.model(input_ids=input_ids, **kwargs).last_hidden_state
            logits = self.lm_head(hidden_states)
            logits = logits * 0.5
            return logits

    model = Scaled(llama().config)
    with pytest.raises(chunked_loss.Unsupported, match="changes its logits"):
        chunked_loss.install(model)
    messages = []
    assert use_chunked_loss(model, "auto", 64, None, messages.append) is False
    assert "full-logits" in messages[0]


def test_through_torch_compile():
    """model.compile: the patched head is traced with the model (aot_eager here: no C++ toolchain needed in CI)."""
    model, ids = llama(tied=True), rows()
    ref_loss, ref_rows, ref_grads = loss_and_grads(model, ids, EOS)
    chunked_loss.install(model, 16)
    compiled = torch.compile(model, backend="aot_eager")
    assert chunked_loss.installed(compiled) is not None
    for _ in range(2):  # the second call reuses the compiled graph
        model.zero_grad(set_to_none=True)
        loss, row_losses = causal_lm_loss(compiled, ids, EOS)[:2]
        loss.backward()
        torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(row_losses, ref_rows, rtol=1e-6, atol=1e-6)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_training_run_equals_full_logits_run(tiny_cpt_data, tmp_path):
    """`cpt train` with the chunked loss (the default) logs the same training, per-source and held-out losses as
    with train.chunked_loss: false, step by step."""
    from conftest import tiny_run_config
    from cpt.config import load_config
    from cpt.metrics import read_metrics
    from cpt.train import train

    logs = {}
    for mode in ("auto", False):
        out = tmp_path / str(mode)
        cfg = tiny_run_config(tiny_cpt_data, out, checkpoint={"every": None, "export_at_end": False},
                              train={"chunked_loss": mode, "loss_chunk_tokens": 100})
        cfg["stages"][0]["steps"] = 4
        cfg["eval"]["every"] = 2
        messages = []
        train(load_config(base=cfg), echo=messages.append)
        assert any("chunked next-token loss" in str(m) for m in messages) == (mode == "auto")
        assert not any("full-logits" in str(m) for m in messages)  # no fallback
        logs[mode] = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    keys = {k for r in logs[False].values() for k in r if k.startswith("train/loss") or (k.startswith("eval/") and k.endswith("/loss"))}
    assert any(k.startswith("train/loss/") for k in keys) and any(k.startswith("eval/") for k in keys)
    for step, ref in logs[False].items():
        for k in keys:
            if k in ref:
                assert logs["auto"][step][k] == pytest.approx(ref[k], rel=1e-5), (step, k)


# ------------------------------------------------------------------------------------------ the z-loss (train.z_loss)


def _z_reference(model, ids, z):
    """The z-loss by hand from the full logits: mean cross-entropy + z x mean(logsumexp^2), and its gradients."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
    term = z * torch.logsumexp(logits, dim=-1).square().mean()
    (ce + term).backward()
    return (ce + term).detach(), term.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("path", ["full", "chunked", "lora_head"])
def test_z_loss_equals_its_definition(path):
    """train.z_loss on every loss path (full logits, the chunked linear head, a LoRA-wrapped head recomputed per
    chunk): the loss, the logged z term and every gradient equal mean CE + z x mean(logsumexp^2) from the full
    logits; the per-row losses stay the next-token loss."""
    from cpt.lm_loss import LossWeights

    z, ids = 0.05, rows()
    model = llama()
    if path == "lora_head":
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    ref_loss, ref_term, ref_grads = _z_reference(model, ids, z)
    if path != "full":
        chunked_loss.install(model, 7)
    model.zero_grad(set_to_none=True)
    got = causal_lm_loss(model, ids, None, LossWeights(z=z))
    got.loss.backward()
    torch.testing.assert_close(got.loss.detach(), ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.z_loss, ref_term, rtol=1e-6, atol=1e-7)
    plain = causal_lm_loss(model, ids, None)  # (no z: the next-token loss alone)
    assert plain.z_loss is None and torch.allclose(plain.loss, ref_loss - ref_term, atol=1e-6)
    torch.testing.assert_close(got.row_losses, plain.row_losses)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_a_run_with_z_loss_logs_its_term(tiny_cpt_data, tmp_path):
    """`train.z_loss` in a run: said at start, `train/z_loss` (z x mean logsumexp^2) at every log step next to the
    next-token `train/loss`; the held-out evaluation is the plain next-token loss."""
    from conftest import tiny_run_config
    from cpt.config import load_config
    from cpt.metrics import read_metrics
    from cpt.train import train

    cfg = tiny_run_config(tiny_cpt_data, tmp_path / "run", eval={"at_start": True}, checkpoint={"every": None, "export_at_end": False})
    cfg["stages"][0]["steps"] = 3
    cfg["train"]["z_loss"] = 1e-3
    said: list[str] = []
    train(load_config(base=cfg), echo=lambda *a, **k: said.append(" ".join(map(str, a))))
    assert any("z-loss: 0.001 x mean(logsumexp(logits)^2) added to the training loss" in line for line in said), said
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert len(steps) == 3 and all(0 < r["train/z_loss"] < 1 for r in steps), steps
