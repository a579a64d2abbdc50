"""What a token-shard manifest (``manifest.json``, written by ``cpt prepare``) must hold for the readers to use it.

A manifest edited by hand, or damaged, is one clear error naming the first bad field (``cpt train``, ``cpt verify``),
not a KeyError or TypeError deep inside a reader (cpt/data/shards.py).
"""

from __future__ import annotations

from typing import Any


class ShardError(ValueError):
    """A prepared source that cannot be used: missing, corrupt, or made with another tokenizer (imported from
    cpt.data.shards everywhere; defined here so that cpt.data.remote, which shards imports, can raise it)."""


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def manifest_problem(manifest: dict) -> str | None:
    """The first field of a manifest that readers cannot use (missing, wrong type, a shard file name with a
    folder in it), or None: an edited manifest is one clear error, not a KeyError deep inside a reader."""
    tok = manifest.get("tokenizer")
    if not isinstance(tok, dict) or not isinstance(tok.get("hash"), str):
        return "no tokenizer.hash"
    if manifest.get("dtype") not in ("uint16", "uint32"):
        return f"dtype {manifest.get('dtype')!r} is not uint16 or uint32"
    for key in ("num_tokens", "num_documents"):
        if not is_count(manifest.get(key)):
            return f"{key} {manifest.get(key)!r} is not a count"
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return "no shards list"
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict):
            return f"shards[{i}] is not an object"
        for key in ("tokens_file", "docs_file"):
            name = entry.get(key)
            if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
                return f"shards[{i}].{key} {name!r} is not a file name"
        for key in ("num_tokens", "num_documents"):
            if not is_count(entry.get(key)):
                return f"shards[{i}].{key} {entry.get(key)!r} is not a count"
        for key in ("tokens_checksum", "docs_checksum"):
            if not isinstance(entry.get(key), str):
                return f"shards[{i}].{key} is missing"
    for key in ("num_tokens", "num_documents"):  # (a total edited alone was read as it stood)
        total = sum(entry[key] for entry in shards)
        if manifest[key] != total:
            return f"{key} {manifest[key]} is not the sum of the shards' ({total})"
    return None
