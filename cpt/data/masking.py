"""Intra-document attention masking for packed sequences (``data.document_masking``).

Packing joins documents with EOS and cuts the stream into fixed-length rows, so by default a token attends to
the end of the previous document in its row. With document masking every token attends only to earlier tokens
of its own document and its rotary positions restart at each document: a packed document is computed exactly as
if it stood alone at the start of a row.

The mechanism is the one transformers uses for packed ("flattened") batches: ``position_ids`` that restart at 0
after every EOS, no ``attention_mask`` and no KV cache (``use_cache=False``). transformers then builds a block-diagonal causal mask (SDPA, eager,
flex attention; tested with SDPA and eager) or takes the variable-length path of flash-attention (not run
without a GPU), which skips the masked blocks. No
tokens are dropped and the loss is still over every position (the token after an EOS is predicted from the
finished document's EOS, as without masking).
"""

from __future__ import annotations

import torch


def document_position_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """``position_ids`` [B, L] that count from 0 at the start of every row and again after every EOS.

    The EOS closing a document belongs to it (it is the last position of its block); the next token starts
    a new block. A row with no EOS gets ``0 .. L-1``, which transformers treats as an ordinary causal row.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    B, L = input_ids.shape
    idx = torch.arange(L, device=input_ids.device).expand(B, L)
    starts = torch.zeros((B, L), dtype=torch.bool, device=input_ids.device)
    starts[:, 1:] = input_ids[:, :-1] == eos_id
    last_start = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    return idx - last_start
