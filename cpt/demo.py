"""The offline demo: a real continual pre-training run on real text, on 2 CPU cores, in minutes.

1. corpora    A = Shakespeare's plays (bundled, public domain): the "old" pre-training distribution.
              B = the Python standard library source of this interpreter: the "new" domain.
2. tokenizer  a byte-level BPE trained on both corpora with `tokenizers`, saved as a transformers tokenizer.
3. prepare    both corpora -> token shards + manifest, with held-out documents split off (`cpt prepare`).
4. base       a small Llama-shaped model pre-trained on A (cosine schedule)  -> runs/demo/base/export
5. CPT        the base model continually pre-trained on B with 25% replay of A, LR re-warmed and re-decayed;
              upstream (A) and downstream (B) held-out losses from step 0 -> runs/demo/cpt
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sysconfig
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

DEMO_DATA = Path(__file__).parent / "demo_data"
EOS = "<|endoftext|>"

# Size presets: "default" is the README demo (<10 min on 2 cores); "tiny" is the test-suite smoke run.
SCALES: dict[str, dict[str, Any]] = {
    "default": dict(python_mb=4.0, shakespeare_mb=None, vocab=2048, hidden=192, layers=4, heads=4, seq_len=256,
                    batch=16, micro=16, base_steps=160, cpt_steps=140, eval_every=20, eval_tokens=16384,
                    heldout_docs=40, max_lr=3e-3, cpt_lr=1.5e-3),
    "tiny": dict(python_mb=0.4, shakespeare_mb=0.4, vocab=1024, hidden=64, layers=2, heads=4, seq_len=64,
                 batch=8, micro=4, base_steps=30, cpt_steps=20, eval_every=10, eval_tokens=4096,
                 heldout_docs=8, max_lr=3e-3, cpt_lr=2e-3),
}


# ------------------------------------------------------------------------------------------ corpora


def shakespeare_docs(max_bytes: float | None = None) -> Iterator[dict]:
    """One document per scene of the bundled Shakespeare corpus."""
    total = 0
    with gzip.open(DEMO_DATA / "shakespeare.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            yield {"text": doc["text"]}
            total += len(doc["text"])
            if max_bytes and total >= max_bytes:
                return


def python_stdlib_docs(max_bytes: float | None = None) -> Iterator[dict]:
    """One document per module of this interpreter's standard library (no tests, no site-packages), in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "ensurepip"}
    total = 0
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        yield {"text": text}
        total += len(text)
        if max_bytes and total >= max_bytes:
            return


def write_jsonl(docs: Iterator[dict], path: str | Path) -> Path:
    """Documents as gzipped JSON lines ({"text": ...} per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    return path


def byte_level_bpe(texts: Iterable[str], vocab_size: int, eos: str = EOS):
    """A byte-level BPE trained on `texts` with `tokenizers`, as a transformers tokenizer (eos = bos = pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=eos, unk_token=None,
                                   model_max_length=1 << 20)


def train_tokenizer(files: list[Path], vocab_size: int, out_dir: Path):
    """The demo tokenizer: a byte-level BPE trained on the demo corpora, saved as a transformers tokenizer."""

    def texts():
        for f in files:
            with gzip.open(f, "rt", encoding="utf-8") as fh:
                for line in fh:
                    yield json.loads(line)["text"]

    fast = byte_level_bpe(texts(), vocab_size)
    fast.save_pretrained(out_dir)
    fast.name_or_path = str(out_dir)  # the manifests name it so (else 'TokenizersBackend', in a later run's refusal)
    return fast


# ------------------------------------------------------------------------------------------ configs


def demo_data(root: Path, scale: str = "tiny", echo=None) -> Path:
    """The demo's corpora (``root/raw``), tokenizer (``root/tokenizer``) and token shards with their held-out splits
    (``root/data/{shakespeare,python}``) at ``scale``: steps 1-3 of :func:`run_demo`, saying each through ``echo``
    (quiet without: what tests and scripts/soak_faults.py train on)."""
    from cpt.data.prepare import prepare

    s, say = SCALES[scale], echo or (lambda *a, **k: None)
    say(f"[1/5] corpora: Shakespeare (old) and the Python standard library (new) -> {root / 'raw'}")
    shk = write_jsonl(shakespeare_docs(s["shakespeare_mb"] and s["shakespeare_mb"] * 1e6), root / "raw" / "shakespeare.jsonl.gz")
    py = write_jsonl(python_stdlib_docs(s["python_mb"] * 1e6), root / "raw" / "python.jsonl.gz")
    say(f"[2/5] tokenizer: byte-level BPE, {s['vocab']} tokens -> {root / 'tokenizer'}")
    tok = train_tokenizer([shk, py], s["vocab"], root / "tokenizer")
    say("[3/5] prepare: token shards + manifests, held-out documents split off")
    for name, path in (("shakespeare", shk), ("python", py)):
        prepare([str(path)], tok, root / "data" / name, heldout_docs=s["heldout_docs"], echo=say)
    return root


def base_config(root: Path, s: dict[str, Any]) -> dict[str, Any]:
    """Stage 0: pre-train a small model on corpus A (Shakespeare)."""
    return {
        "run": {"name": "demo-base", "output_dir": str(root / "base"), "seed": 1234},
        "model": {
            "tokenizer": str(root / "tokenizer"),
            "arch": {"model_type": "llama", "hidden_size": s["hidden"], "num_hidden_layers": s["layers"],
                     "num_attention_heads": s["heads"], "num_key_value_heads": s["heads"],
                     "intermediate_size": s["hidden"] * 8 // 3 // 32 * 32, "max_position_embeddings": s["seq_len"],
                     "tie_word_embeddings": True},
        },
        "data": {
            "seq_len": s["seq_len"],
            "sources": [{"name": "shakespeare", "path": str(root / "data" / "shakespeare")}],
            "heldout": [{"name": "shakespeare", "path": str(root / "data" / "shakespeare" / "heldout"), "tag": "upstream"}],
            "max_epochs_warning": 8,
        },
        "stages": [{"name": "pretrain", "steps": s["base_steps"], "mix": {"shakespeare": 1.0},
                    "schedule": {"type": "cosine", "max_lr": s["max_lr"], "min_lr": s["max_lr"] / 10,
                                 "warmup_steps": max(1, s["base_steps"] // 10)}}],
        "optim": {"weight_decay": 0.1, "grad_clip": 1.0},
        "train": {"global_batch_size": s["batch"], "micro_batch_size": s["micro"], "precision": "fp32", "log_every": 5},
        "eval": {"every": s["base_steps"], "tokens_per_set": s["eval_tokens"], "batch_size": 16},
        "checkpoint": {"export_at_end": True},
        "logging": {"plot": False},
    }


def cpt_config(root: Path, s: dict[str, Any], replay: float = 0.25) -> dict[str, Any]:
    """Stage 1: continual pre-training on corpus B (Python) with replay of A, LR re-warmed and re-decayed."""
    cfg = base_config(root, s)
    cfg["run"] = {"name": "demo-cpt", "output_dir": str(root / "cpt"), "seed": 1234}
    cfg["data"]["sources"] = [
        {"name": "python", "path": str(root / "data" / "python")},
        {"name": "shakespeare", "path": str(root / "data" / "shakespeare"), "replay": True},
    ]
    cfg["data"]["heldout"] = [
        {"name": "shakespeare", "path": str(root / "data" / "shakespeare" / "heldout"), "tag": "upstream"},
        {"name": "python", "path": str(root / "data" / "python" / "heldout"), "tag": "downstream"},
    ]
    cfg["stages"] = [{
        "name": "cpt-python", "steps": s["cpt_steps"], "mix": {"python": 1.0 - replay, "shakespeare": replay},
        # re-warm from 0 to a new max, then re-decay (Ibrahim et al., 2024)
        "schedule": {"type": "cosine", "max_lr": s["cpt_lr"], "min_lr": s["cpt_lr"] / 10,
                     "warmup_steps": max(1, s["cpt_steps"] // 10), "warmup_from": 0.0},
    }]
    cfg["train"]["init_from"] = str(root / "base" / "export")
    cfg["eval"].update({"every": s["eval_every"], "dense_steps": s["eval_every"], "dense_every": max(1, s["eval_every"] // 5)})
    cfg["logging"] = {"plot": True, "wandb": {"enabled": True, "mode": "offline", "project": "cpt-demo"}}
    return cfg


# ------------------------------------------------------------------------------------------ the demo


def _replace_previous_run(run_dir: Path, root: Path, echo) -> None:
    """Remove an earlier demo run's folder (a re-run of the demo starts both runs over), saying so; only inside the
    demo's own root (an output_dir set elsewhere with --set is left to cpt train's refusal)."""
    if run_dir.is_dir() and any(run_dir.iterdir()) and run_dir.resolve().is_relative_to(root.resolve()):
        echo(f"      (replacing the previous demo run in {run_dir})")
        shutil.rmtree(run_dir)


def run_demo(root: str | Path = "runs/demo", scale: str = "default", overrides: list[str] | None = None, echo=print) -> dict[str, Any]:
    from cpt.config import load_config
    from cpt.train import train

    s = SCALES[scale]
    root = Path(root)
    os.environ.setdefault("WANDB_SILENT", "true")  # the demo prints its own summary
    t_start = time.perf_counter()
    demo_data(root, scale, echo)

    echo("[4/5] base model: pre-training on Shakespeare")
    base_cfg, cpt_cfg = (load_config(base=c(root, s), overrides=overrides) for c in (base_config, cpt_config))
    for run_cfg in (base_cfg, cpt_cfg):  # cpt train refuses to start over in a finished run's folder: the demo
        _replace_previous_run(Path(run_cfg.run.output_dir), root, echo)  # owns these two, and a re-run replaces them
    base = train(base_cfg, echo=echo)
    if base.stopped_early:
        echo(f"base pre-training stopped early ({base.stopped_early}); the demo stops here")
        return {"base": base, "cpt": None, "minutes": (time.perf_counter() - t_start) / 60}

    echo("[5/5] continual pre-training on Python with 25% Shakespeare replay, LR re-warmed and re-decayed")
    cpt = train(cpt_cfg, echo=echo)

    minutes = (time.perf_counter() - t_start) / 60
    echo(f"\ndemo finished in {minutes:.1f} min. Outputs:")
    echo(f"  metrics (JSONL)   {cpt.run_dir / 'metrics.jsonl'}")
    echo(f"  W&B offline run   {cpt.run_dir / 'wandb'}   (wandb sync to upload)")
    echo(f"  HF checkpoint     {cpt.export_dir}   (AutoModelForCausalLM.from_pretrained)")
    echo(f"  plots + report    {cpt.run_dir / 'report'}")
    echo(f"  base model        {base.export_dir}")
    return {"base": base, "cpt": cpt, "minutes": minutes}
