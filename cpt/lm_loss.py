"""The causal-LM forward over packed rows, shared by training and evaluation: its keyword arguments (document
positions when ``data.document_masking`` is on, never a KV cache) and the next-token loss per row."""

from __future__ import annotations

import torch

from cpt.data.masking import document_position_ids


def model_inputs(input_ids: torch.Tensor, eos_id: int | None) -> dict[str, torch.Tensor | bool]:
    """Keyword arguments for a causal-LM forward over packed rows (training or evaluation).

    ``use_cache=False`` always: no forward here needs a KV cache, and transformers only looks for packed
    ``position_ids`` when there is none (with the default cache the documents would silently see each other).
    ``position_ids`` restart after every EOS when ``eos_id`` is set (document masking on).
    """
    out: dict[str, torch.Tensor | bool] = {"input_ids": input_ids, "use_cache": False}
    if eos_id is not None:
        out["position_ids"] = document_position_ids(input_ids, eos_id)
    return out


def next_token_losses(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every predicted token, ``[B, L-1]``, in fp32 (as transformers' own loss upcasts)."""
    shifted = logits[:, :-1, :].float()
    per_token = torch.nn.functional.cross_entropy(shifted.reshape(-1, shifted.size(-1)), input_ids[:, 1:].reshape(-1),
                                                  reduction="none")
    return per_token.view(input_ids.size(0), -1)


def causal_lm_loss(model, input_ids: torch.Tensor, eos_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token loss of packed rows: (the mean over every predicted token, for backward; each row's mean,
    detached, for per-source logging)."""
    per_token = next_token_losses(model(**model_inputs(input_ids, eos_id)).logits, input_ids)
    return per_token.mean(), per_token.detach().mean(dim=1)
