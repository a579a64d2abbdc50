"""Text samples at each held-out evaluation (``eval.samples``): a few fixed prompts continued greedily by the model
being trained, so that what the numbers mean can be read (a new language's first coherent sentences, a domain's
vocabulary appearing, the old skills' text degrading).

Greedy decoding by default (the same weights give the same text, so a resumed run writes what the uninterrupted one
would have); with ``temperature`` > 0, sampling (temperature, then the ``top_p`` nucleus; no top-k), from a generator
seeded by (``seed``, the step, the prompt's index) on a fork of the random state, so a resumed run writes the same
text and training's random state is untouched. Each prompt on its own (no padding), at most ``max_new_tokens`` new
tokens, stopped at EOS. Every process
runs the generation: under FSDP2 and DeepSpeed ZeRO-3 each forward pass gathers the sharded weights collectively, so
``synced_gpus`` keeps the processes stepping together until the last one is done; the main process writes the rows.

Where they go: ``samples.jsonl`` in the run directory (one JSON object per prompt and evaluation: step, prompt,
completion, new token count; a resume drops the rows past its checkpoint, as metrics.jsonl), a W&B table ``samples``
(all rows so far, logged again at each evaluation: W&B tables are immutable) and one line per prompt in the run's log.
With ``eval.ema`` the EMA weights (``train.ema_decay``: what ``export-ema/`` holds) continue the prompts too, in rows
marked ``"weights": "ema"``.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from cpt.config import ConfigError
from cpt.distributed import shards_weights

SAMPLES_FILE = "samples.jsonl"


class SampleGenerator:
    """The run's prompts, encoded once, and their continuations at a given step (greedy or seeded samples)."""

    def __init__(self, prompts: list[str], max_new_tokens: int, tokenizer: Any, acc: Any, context: int | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0):
        """``context``: the model's positions (``max_position_embeddings``); a prompt plus ``max_new_tokens`` must fit
        in it (past it a model's position embeddings run out, or its RoPE extrapolates: an error or garbage text at
        every evaluation). Checked here, before training, and by ``cpt train --dry-run``. ``temperature`` 0: greedy."""
        self.prompts, self.max_new_tokens, self.tokenizer, self.acc = list(prompts), int(max_new_tokens), tokenizer, acc
        self.temperature, self.top_p, self.seed = float(temperature), float(top_p), int(seed)
        self.ids = [torch.tensor([tokenizer(p)["input_ids"]], dtype=torch.long) for p in self.prompts]
        for i, (p, ids) in enumerate(zip(self.prompts, self.ids)):
            if ids.numel() == 0:
                raise ConfigError(f"eval.samples.prompts[{i}]: {p[:60]!r} encodes to no tokens")
            if context and ids.numel() + self.max_new_tokens > context:
                raise ConfigError(f"eval.samples.prompts[{i}]: {p[:60]!r} is {ids.numel()} tokens; with "
                                  f"eval.samples.max_new_tokens={self.max_new_tokens} that is past the model's context "
                                  f"({context} positions): shorten the prompt or lower max_new_tokens")

    @classmethod
    def for_run(cls, cfg: Any, tokenizer: Any, acc: Any, model_config: Any = None) -> "SampleGenerator | None":
        """The run's generator (None without ``eval.samples``); ``model_config``: the model's, for its context."""
        s = cfg.eval.samples
        context = getattr(model_config, "max_position_embeddings", None)
        if s is None:
            return None
        seed = cfg.run.seed if s.seed is None else s.seed
        return cls(s.prompts, s.max_new_tokens, tokenizer, acc, context, s.temperature, s.top_p, seed)

    @contextlib.contextmanager
    def _decoding(self, device: torch.device, step: int, index: int):
        """generate's decoding arguments, while they apply: greedy; or sampling on a fork of the random state seeded
        by (seed, step, prompt index), the same on every process."""
        if not self.temperature:
            yield {"do_sample": False}
            return
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed((self.seed * 1_000_003 + step * 1_009 + index) % 2**63)
            yield {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}

    def generate(self, model: Any, step: int, weights: str | None = None) -> list[dict[str, Any]]:
        """One row per prompt (the same on every process; call it on every process); ``weights`` ("ema": the model
        holds the EMA weights) is added to each row."""
        net = self.acc.unwrap_model(model) if self.acc is not None else model
        device = self.acc.device if self.acc is not None else next(net.parameters()).device
        synced = self.acc is not None and self.acc.num_processes > 1 and shards_weights(self.acc)
        eos = self.tokenizer.eos_token_id
        was_training = net.training
        net.eval()
        rows = []
        try:
            with torch.no_grad():
                for i, (prompt, ids) in enumerate(zip(self.prompts, self.ids)):
                    with self._decoding(torch.device(device), step, i) as decoding:
                        out = net.generate(input_ids=ids.to(device), attention_mask=torch.ones_like(ids, device=device),
                                           max_new_tokens=self.max_new_tokens, eos_token_id=eos,
                                           pad_token_id=eos if eos is not None else 0, synced_gpus=synced, **decoding)
                    new = out[0, ids.size(1):].tolist()
                    if eos is not None and eos in new:
                        new = new[: new.index(eos)]
                    text = self.tokenizer.decode(new, skip_special_tokens=True)
                    rows.append({"step": step, "prompt": prompt, "completion": text, "new_tokens": len(new),
                                 **({"weights": weights} if weights else {})})
        finally:
            net.train(was_training)
        return rows


def append_samples(run_dir: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    with open(Path(run_dir) / SAMPLES_FILE, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_samples(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a run's samples.jsonl (a torn last line, from a kill mid-write, left out)."""
    path = Path(run_dir) / SAMPLES_FILE
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def truncate_samples(run_dir: str | os.PathLike, step: int) -> None:
    """A resume from ``step``: drop the rows written after it (the resumed run writes them again)."""
    path = Path(run_dir) / SAMPLES_FILE
    if not path.is_file():
        return
    keep = [r for r in read_samples(run_dir) if int(r.get("step", 0)) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep), encoding="utf-8")
    os.replace(tmp, path)
