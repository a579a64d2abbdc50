"""What `cpt prepare` shows while and after it runs: a progress bar on a terminal, or a plain line every N seconds where
stderr is a file (a batch job's log); at the end, the summary of the job from its manifest (counts, skips by reason,
shards, held-out split, BOS/EOS, throughput)."""

from __future__ import annotations

import sys
import time
from typing import Any


def progress_bar(enabled: bool) -> Any:
    """A tqdm bar counting documents (None when not ``enabled``)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(unit=" docs", desc="cpt prepare", dynamic_ncols=True, mininterval=0.5)


class ProgressLines:
    """The progress bar's plain stand-in where stderr is a file (a batch job): one flushed line every ``every_s``
    seconds, ``cpt prepare: 120,000 documents, 98,765,432 tokens, 2.0 min``; before it, a `tail -f` of the log saw
    nothing until the summary at the end, however many hours the corpus took."""

    def __init__(self, every_s: float):
        self.every_s, self.docs, self.tokens, self.t0 = every_s, 0, "0", time.perf_counter()
        self.next = self.t0 + every_s

    def update(self, n: int) -> None:
        self.docs += n

    def set_postfix(self, tokens: str, refresh: bool = False) -> None:
        self.tokens = tokens
        if (now := time.perf_counter()) >= self.next:
            self.next = now + self.every_s
            print(f"cpt prepare: {self.docs:,} documents, {tokens} tokens, {(now - self.t0) / 60:.1f} min",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def format_summary(manifest: dict, out: str) -> str:
    """A human summary of a prepare run: counts, skips by reason, shards, held-out, throughput."""
    st = manifest.get("stats", {})
    lines = []
    if manifest.get("up_to_date"):
        lines.append(f"{out}: up to date (same inputs, tokenizer and options); nothing to do")
    lines += [
        f"prepared {out}",
        f"  tokenizer   {manifest['tokenizer']['name']} ({manifest['tokenizer']['hash']}), dtype {manifest['dtype']}",
        f"  records     {st.get('records_read', 0):,} read, {st.get('documents_kept', 0):,} documents kept",
        f"  train       {manifest['num_documents']:,} documents, {manifest['num_tokens']:,} tokens in {len(manifest['shards'])} shard(s)",
    ]
    if manifest.get("heldout"):
        h = manifest["heldout"]
        lines.append(f"  heldout     {h['num_documents']:,} documents, {h['num_tokens']:,} tokens in {out}/{h['path']}")
    tok = manifest["tokenizer"]
    bos = f"BOS (id {tok['bos_token_id']}) + " if tok.get("bos_token_id") is not None else ""
    lines.append(f"  documents   {bos}text + EOS (id {tok.get('eos_token_id')})")
    skipped = {k: v for k, v in st.get("skipped", {}).items() if v}
    lines.append("  skipped     " + (", ".join(f"{k} {v:,}" for k, v in skipped.items()) if skipped else "none"))
    if st.get("special_token_text"):
        lines.append(f"  special     {st['special_token_text']:,} documents hold the text of a special token (e.g. EOS), "
                     "encoded as that token; --special-tokens-as-text encodes it as text")
    if st.get("truncated"):
        lines.append(f"  truncated   {st['truncated']:,} documents longer than max_doc_tokens")
    secs = st.get("seconds")
    if secs and not manifest.get("up_to_date"):
        total = manifest["num_tokens"] + (manifest["heldout"]["num_tokens"] if manifest.get("heldout") else 0)
        lines.append(f"  time        {secs:.1f} s, {total / max(secs, 1e-9):,.0f} tokens/s")
    return "\n".join(lines)
