"""Next-token loss without the full logits: lm_head + cross-entropy over chunks of positions.

Today's path (``next_token_losses``) materialises ``[B, L, V]`` logits and their fp32 upcast: at a 128,256-token
vocabulary and sequence 2048 that is 1 GB per sequence in fp32, and the log-softmax, its gradient and the
logits' gradient each as much again. Here the head and the loss are fused, as fused-linear-cross-entropy kernels
do (Liger's FLCE): per chunk of positions, logits = h @ W^T in the compute dtype (autocast's, else the weight's),
upcast to fp32, per-token cross-entropy, and at once the gradient wrt the logits ``(softmax - onehot) / N``,
from which the chunk's ``grad_h`` and its share of ``grad_W`` are accumulated in the forward pass; backward only
scales them by the incoming gradient. Peak memory is one chunk of logits (plus ``grad_W``, which any path
produces), and the lm_head costs the same three matmuls as today. Every per-token loss is kept (detached), so
per-row and per-source losses stay available.

How it reaches the model: :func:`install` patches the lm_head module's ``forward`` (an instance attribute on the
module, so ``nn.Module.__call__`` and every hook on it still run). While :func:`head_targets` is active, the
head receives the final hidden states, computes the loss over them and returns the scalar mean loss in place of
the logits; otherwise it is the original head. The model is still called through its wrappers, so DDP's reducer,
FSDP2's parameter all-gather and DeepSpeed ZeRO-3's gather hooks see a normal forward and backward: the head's
weight is used inside the wrapped forward (gathered there under FSDP2/ZeRO-3) and receives its gradient in the
backward pass like any other parameter (tied embeddings included: the same tensor gets both contributions).

Heads that are not a plain ``nn.Linear`` (LoRA or ``modules_to_save`` on lm_head) are run per chunk under
activation checkpointing (the chunk is recomputed in backward: one more matmul); that needs the whole weight in
backward, so under sharded training (FSDP, ZeRO-3) such heads keep today's path. Models that change the logits
after lm_head (final logit soft-capping as in Gemma 2, logit scaling as in Cohere and Granite) keep today's path.
"""

from __future__ import annotations

import contextlib
import inspect
import re

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_TOKENS = 1024
_MARK = "_cpt_chunked_loss"  # attribute set on a patched head: its _ChunkedHead state


# ------------------------------------------------------------------------------------------ the loss itself


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """(mean loss, per-token losses, per-token log-partition or None) of ``hidden[N, H] @ weight[V, H]^T (+ bias)``
    against ``targets[N]``, the mean loss with ``z_coef`` x mean(logsumexp^2) when ``z_coef`` > 0; gradients are
    computed chunk by chunk in forward (the loss is a scalar, so backward only scales them)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens, z_coef, chunk_fn):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        loss, per_token, lse, grads = _chunked_linear_ce(hidden, weight, bias, targets, chunk_tokens, need_h, need_w,
                                                         need_b, z_coef, chunk_fn)
        ctx.grads = grads
        ctx.mark_non_differentiable(per_token, *([] if lse is None else [lse]))
        return loss, per_token, lse

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_token, _grad_lse):
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None
        scale = lambda g: None if g is None else g.mul_(grad_loss.to(g.dtype))  # noqa: E731  (in place: no copy of grad_W)
        return scale(grad_h), scale(grad_w), scale(grad_b), None, None, None, None


def chunk_terms(logits: torch.Tensor, targets: torch.Tensor, inv_n: float, z_coef: float = 0.0):
    """One chunk's (per-token losses, log-partitions, d(mean loss)/d logits) from its logits ``[c, V]`` (computed in
    fp32; the gradient returned in the logits' dtype): what the loop in :func:`_chunked_linear_ce` does in place, as
    one expression. Eager, its temporaries would cost more than the loop's in-place passes; under ``torch.compile``
    it fuses into a few passes over the chunk, without the fp32 copy of the logits. :func:`compile_chunk_terms` has
    the patched head use it where the model's repeated blocks are compiled (``model.compile: regional``), whose
    lm_head and loss otherwise run eager (a whole compiled model traces the loop itself)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    per_token = lse - x.gather(1, targets[:, None]).squeeze(1)
    probs = torch.exp(x - lse[:, None])
    if z_coef:  # the z-loss adds 2 z lse softmax / n
        probs = probs * (1.0 + 2.0 * z_coef * lse)[:, None]
    onehot = torch.arange(x.size(1), device=x.device)[None, :] == targets[:, None]
    grad = (probs - onehot.to(x.dtype)) * inv_n
    return per_token, lse, grad.to(logits.dtype)


@torch.no_grad()
def _chunked_linear_ce(hidden, weight, bias, targets, chunk_tokens, need_h=False, need_w=False, need_b=False,
                       z_coef: float = 0.0, chunk_fn=None):
    n, device = hidden.size(0), hidden.device
    cd = _compute_dtype(weight)
    with torch.autocast(device.type, enabled=False):
        w = weight.to(cd)
        b = None if bias is None else bias.to(cd)
        per_token = torch.empty(n, dtype=torch.float32, device=device)
        lse_all = torch.empty(n, dtype=torch.float32, device=device) if z_coef else None
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        inv_n = 1.0 / max(n, 1)
        for s in range(0, n, chunk_tokens):
            e = min(s + chunk_tokens, n)
            h, t = hidden[s:e].to(cd), targets[s:e]
            if chunk_fn is not None and (need_h or need_w or need_b):  # (compiled: chunk_terms)
                per_token[s:e], lse, grad_logits = chunk_fn(F.linear(h, w, b), t, inv_n, z_coef)
                if lse_all is not None:
                    lse_all[s:e] = lse
                _accumulate(grad_logits, h, w, s, e, grad_h, grad_w, grad_b, cd)
                del grad_logits
                continue
            logits = F.linear(h, w, b).float()  # [c, V] fp32, the only chunk-sized buffer: the rest is in place
            target_logit = logits.gather(1, t[:, None]).squeeze(1)
            top = logits.amax(dim=-1, keepdim=True)
            exp = logits.sub_(top).exp_()  # exp(logits - max)
            total = exp.sum(dim=-1, keepdim=True)
            lse = total.log() + top  # [c, 1] the log-partition
            per_token[s:e] = lse.squeeze(1) - target_logit  # logsumexp - target logit
            if lse_all is not None:
                lse_all[s:e] = lse.squeeze(1)
            if not (need_h or need_w or need_b):
                del logits, exp  # (before the next chunk's logits are allocated)
                continue
            # d(mean loss)/d logits = (softmax - onehot) / n; the z-loss adds 2 z lse softmax / n
            grad_logits = exp.mul_(total.reciprocal_().mul_(inv_n))
            if lse_all is not None:
                grad_logits.mul_(lse.mul(2.0 * z_coef).add_(1.0))
            grad_logits[torch.arange(e - s, device=device), t] -= inv_n
            _accumulate(grad_logits.to(cd), h, w, s, e, grad_h, grad_w, grad_b, cd)
            del logits, exp, grad_logits  # before the next chunk's logits are allocated
        loss = per_token.mean() if n else per_token.sum()
        if lse_all is not None and n:
            loss = loss + z_coef * lse_all.square().mean()
    return loss, per_token, lse_all, (grad_h, grad_w, grad_b)


def _accumulate(grad_logits, h, w, s, e, grad_h, grad_w, grad_b, cd) -> None:
    """A chunk's share of the head's gradients from its ``grad_logits`` (compute dtype): rows ``s:e`` of ``grad_h``,
    added to ``grad_w`` and ``grad_b``."""
    if grad_h is not None:
        grad_h[s:e] = grad_logits @ w
    if grad_w is not None:
        if grad_w.dtype == cd:
            grad_w.addmm_(grad_logits.t(), h)
        else:
            grad_w += grad_logits.t() @ h
    if grad_b is not None:
        grad_b += grad_logits.sum(0).to(grad_b.dtype)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                         chunk_tokens: int = DEFAULT_CHUNK_TOKENS, z_coef: float = 0.0, chunk_fn=None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Mean cross-entropy (differentiable wrt ``hidden``, ``weight``, ``bias``), the per-token losses (detached,
    fp32) of the linear head ``hidden[N, H] -> [N, V]`` against ``targets[N]``, ``chunk_tokens`` positions at a time,
    and with ``z_coef`` > 0 the per-token log-partition (detached), the mean loss then including ``z_coef`` x
    mean(logsumexp^2) (the z-loss). Without autograd (eval, ``torch.no_grad``) no gradient work is done.
    ``chunk_fn``: :func:`chunk_terms` compiled, for the per-chunk softmax and gradient (:func:`compile_chunk_terms`)."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_tokens, z_coef, chunk_fn)
    loss, per_token, lse, _ = _chunked_linear_ce(hidden, weight, bias, targets, chunk_tokens, z_coef=z_coef)
    return loss, per_token, lse


def _head_chunk_losses(head_forward, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[2, c]``: each position's cross-entropy and log-partition (logsumexp of its logits)."""
    logits = head_forward(hidden).float()
    lse = torch.logsumexp(logits, dim=-1)
    return torch.stack([lse - logits.gather(1, targets[:, None]).squeeze(1), lse])


def checkpointed_cross_entropy(head_forward, hidden: torch.Tensor, targets: torch.Tensor,
                               chunk_tokens: int = DEFAULT_CHUNK_TOKENS, z_coef: float = 0.0
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The same for any head (a LoRA-wrapped lm_head...): each chunk is recomputed in backward."""
    grad = torch.is_grad_enabled()
    chunks = []
    for s in range(0, hidden.size(0), chunk_tokens):
        h, t = hidden[s:s + chunk_tokens], targets[s:s + chunk_tokens]
        chunks.append(checkpoint(_head_chunk_losses, head_forward, h, t, use_reentrant=False) if grad
                      else _head_chunk_losses(head_forward, h, t))
    per_token, lse = torch.cat(chunks, dim=1) if chunks else hidden.new_zeros(2, 0, dtype=torch.float32)
    loss = per_token.mean() + (z_coef * lse.square().mean() if z_coef else 0.0)
    return loss, per_token.detach(), lse.detach() if z_coef else None


# ------------------------------------------------------------------------------------------ putting it in the model


class Unsupported(RuntimeError):
    """The chunked loss cannot be used for this model: the message says why."""


class _ChunkedHead:
    """State of a patched lm_head: the original forward, the chunk size, and the targets/result of the current call."""

    def __init__(self, head: nn.Module, chunk_tokens: int, linear: bool):
        self.head, self.chunk_tokens, self.linear = head, chunk_tokens, linear
        self.original_forward = head.forward
        self.input_ids: torch.Tensor | None = None
        self.per_token: torch.Tensor | None = None
        self.z_coef = 0.0  # the z-loss's weight for the current call (head_targets)
        self.lse: torch.Tensor | None = None  # its per-token log-partition [B, L-1] when z_coef > 0
        self.chunk_fn = None  # chunk_terms compiled (compile_chunk_terms), else the eager in-place loop

    def forward(self, hidden: torch.Tensor, *args, **kwargs):
        if self.input_ids is None:  # not inside head_targets(): the ordinary head (generation, exports, lm-eval...)
            return self.original_forward(hidden, *args, **kwargs)
        ids = self.input_ids
        if hidden.dim() != 3 or hidden.shape[:2] != ids.shape:
            raise RuntimeError(f"chunked loss: lm_head received hidden states of shape {tuple(hidden.shape)} for "
                               f"input_ids of shape {tuple(ids.shape)}; set train.chunked_loss: false for this model")
        bsz, length, width = hidden.shape
        h = hidden[:, :-1].reshape(-1, width)  # every position that predicts a next token
        targets = ids[:, 1:].reshape(-1)
        if self.linear:
            loss, per_token, lse = linear_cross_entropy(h, self.head.weight, self.head.bias, targets, self.chunk_tokens,
                                                        self.z_coef, self.chunk_fn)
        else:
            loss, per_token, lse = checkpointed_cross_entropy(self.original_forward, h, targets, self.chunk_tokens,
                                                              self.z_coef)
        self.per_token = per_token.view(bsz, length - 1)
        self.lse = None if lse is None else lse.view(bsz, length - 1)
        return loss


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside DDP / DeepSpeed (``.module``), ``torch.compile`` (``._orig_mod``) and peft
    (``PeftModel.base_model.model``) wrappers."""
    from transformers import PreTrainedModel

    for _ in range(8):
        if isinstance(model, PreTrainedModel):
            return model
        for attr in ("module", "_orig_mod", "model"):  # DDP/DeepSpeed, compile, PeftModel and LoraModel
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module) and inner is not model:
                model = inner
                break
        else:
            break
    return model


_AFTER_HEAD = re.compile(r"^\s*logits\s*(=|\*=|/=|\+=|-=)", re.MULTILINE)


def _check_logits_untouched(lm: nn.Module, head_name: str) -> None:
    """The causal LM's forward must return the head's output as its logits, unchanged (no soft-capping, scaling)."""
    if getattr(lm.config, "final_logit_softcapping", None) is not None:
        raise Unsupported(f"{type(lm).__name__} soft-caps its logits (final_logit_softcapping)")
    try:
        src = inspect.getsource(type(lm).forward)
    except (OSError, TypeError):
        raise Unsupported(f"the source of {type(lm).__name__}.forward is not available to check how it uses its logits") from None
    call = re.search(rf"^\s*logits\s*=\s*self\.{re.escape(head_name)}\(", src, re.MULTILINE)
    if call is None:
        raise Unsupported(f"{type(lm).__name__}.forward does not compute `logits = self.{head_name}(...)`")
    rest = src[call.end():]
    end = re.search(r"^\s*(loss\s*=|if labels|return)", rest, re.MULTILINE)
    if _AFTER_HEAD.search(rest[:end.start() if end else len(rest)]):
        raise Unsupported(f"{type(lm).__name__}.forward changes its logits after {head_name} (scaling or soft-capping)")


def check_supported(model: nn.Module, sharded: bool = False) -> nn.Module:
    """``model``'s lm_head, when the chunked loss can replace its full logits; else :class:`Unsupported` saying why
    (also on a meta-device model: `cpt train --dry-run`). ``sharded``: FSDP or ZeRO-3."""
    lm = unwrap_causal_lm(model)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is None:
        raise Unsupported(f"{type(lm).__name__} has no output embeddings (lm_head)")
    if isinstance(getattr(head, _MARK, None), _ChunkedHead):
        return head
    head_name = next((n for n, m in lm.named_children() if m is head), None)
    if head_name is None:
        raise Unsupported(f"the output embeddings of {type(lm).__name__} are not a direct child module")
    _check_logits_untouched(lm, head_name)
    if type(head) is not nn.Linear and sharded:
        raise Unsupported(f"lm_head is a {type(head).__name__} (adapter), which the chunked loss recomputes in backward; "
                          "that needs the whole weight, which FSDP / ZeRO-3 do not keep")
    return head


def install(model: nn.Module, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, sharded: bool = False) -> _ChunkedHead:
    """Patch ``model``'s lm_head so that :func:`head_targets` makes it compute the chunked loss. Call it on the
    model before ``accelerator.prepare`` / ``torch.compile`` (or after: the wrappers are looked through).
    ``sharded``: FSDP or ZeRO-3, where only a plain linear head can be used. Raises :class:`Unsupported`."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    head = check_supported(model, sharded)
    if isinstance(getattr(head, _MARK, None), _ChunkedHead):
        state = getattr(head, _MARK)
        state.chunk_tokens = chunk_tokens
        return state
    linear = type(head) is nn.Linear
    state = _ChunkedHead(head, chunk_tokens, linear)
    head.forward = state.forward
    setattr(head, _MARK, state)
    return state


def compile_chunk_terms(model: nn.Module, **compile_kwargs) -> bool:
    """Have the chunked loss installed in ``model`` (a plain linear head) compute each chunk's softmax and gradient
    with :func:`chunk_terms` under ``torch.compile(**compile_kwargs)``; returns whether it does."""
    state = installed(model)
    if state is None or not state.linear:
        return False
    state.chunk_fn = torch.compile(chunk_terms, **compile_kwargs)
    return True


def uninstall(model: nn.Module) -> None:
    """Undo :func:`install` (no-op where nothing is installed)."""
    state = installed(model)
    if state is not None:
        del state.head.forward
        delattr(state.head, _MARK)


def installed(model: nn.Module) -> _ChunkedHead | None:
    """The chunked-loss state patched into ``model``'s head, if any (wrappers are looked through)."""
    for m in model.modules():
        state = getattr(m, _MARK, None)
        if isinstance(state, _ChunkedHead):
            return state
    return None


@contextlib.contextmanager
def head_targets(state: _ChunkedHead, input_ids: torch.Tensor, z_coef: float = 0.0):
    """While active, the patched head returns the mean next-token loss of ``input_ids`` (with ``z_coef`` x the
    z-loss, mean logsumexp^2) and leaves the per-token losses ``[B, L-1]`` in ``state.per_token`` (and the
    log-partitions in ``state.lse`` when ``z_coef`` > 0)."""
    state.input_ids, state.per_token, state.lse, state.z_coef = input_ids, None, None, z_coef
    try:
        yield state
    finally:
        state.input_ids, state.z_coef = None, 0.0
