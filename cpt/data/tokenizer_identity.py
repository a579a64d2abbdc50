"""Tokenizer identity as the shard format records it: a tokenizer's vocabulary hash (``tokenizer_fingerprint``: shards
made with one tokenizer train with any other of the same hash), its name, the number of ids it can produce and the
token dtype that fits them (uint16 up to 65,536 ids, else uint32)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np


def backend_tokenizer(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` behind a transformers fast tokenizer (or the object itself)."""
    return getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None) or tokenizer


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the tokenizer's vocabulary (token -> id, added tokens included): ``sha256:<hex16>``.

    Two tokenizers with the same fingerprint map every token string to the same id, so token
    shards made with one can be trained with the other.
    """
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else backend_tokenizer(tokenizer).get_vocab()
    items = sorted(vocab.items(), key=lambda kv: (kv[1], kv[0]))
    digest = hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()
    return f"sha256:{digest[:16]}"


def tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def run_tokenizer_name(tokenizer: Any) -> str:
    """tokenizer_name, saying so when model.vocab extended the tokenizer (its ``cpt_vocab`` record): a run's refusal
    of shards then names why its vocabulary hash is not the base tokenizer's."""
    record = (getattr(tokenizer, "init_kwargs", None) or {}).get("cpt_vocab")
    return f"{tokenizer_name(tokenizer)} extended by model.vocab" if record else tokenizer_name(tokenizer)


def vocab_size(tokenizer: Any) -> int:
    """One more than the largest id the tokenizer can produce (base vocabulary plus added tokens): its length, or more
    when its ids have gaps (an id of 70,000 in a 4-token vocabulary does not fit uint16 shards)."""
    try:
        n = len(tokenizer)
    except TypeError:
        n = int(backend_tokenizer(tokenizer).get_vocab_size(with_added_tokens=True))
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else backend_tokenizer(tokenizer).get_vocab()
    return max(n, max(vocab.values(), default=-1) + 1)


def dtype_for_vocab(n: int) -> np.dtype:
    """uint16 when every id fits (vocabulary <= 65,536), else uint32."""
    return np.dtype("<u2") if n <= 1 << 16 else np.dtype("<u4")
