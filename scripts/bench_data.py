"""Benchmark of the data path (not a test); results go to docs/benchmarks.md ("## Data path").

1. stream + mixer: tokens/s that CPTDataLoader delivers in one process pinned to one core
   (two synthetic prepared sources, 95% / 5% replay, seq_len 2048, global batch 64).
2. `cpt prepare` throughput against raw `tokenizers` batch encoding of the same texts with the
   same tokenizer on the same cores (real text: the CPython standard library, one document per file).

    .venv/bin/python scripts/bench_data.py [--quick] [--workdir /tmp/cpt-bench]
    .venv/bin/python scripts/bench_data.py --text-mb 0.2 --stream-tokens 300000 --steps 5 --repeats 1   # seconds
    .venv/bin/python scripts/bench_data.py --part stream --compare-src OLD_CHECKOUT [--rounds 5]

``--text-mb``, ``--stream-tokens``, ``--steps``: the sizes (default 20 MB, 200M tokens, 600 batches; with ``--quick``
3 MB, 20M, 100); tiny sizes only check that the script runs (tests/test_bench_data.py), their numbers mean little.

``--compare-src``: the stream + mixer benchmark of this checkout against another checkout's ``cpt`` package (e.g.
``git archive <rev> | tar -x -C /tmp/old``), in alternating child processes (new, old, new, old, ...) so that load
from other processes hits both alike; prints each round and the medians, in tokens per wall-second and per
CPU-second of the benchmark process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np


def synthetic_source(folder: Path, num_tokens: int, tok, seed: int) -> None:
    """A prepared source of random tokens (documents of random length), written with the real shard writer."""
    from cpt.data.shard_writer import ShardWriter, shard_manifest
    from cpt.data.shards import (MANIFEST, dtype_for_vocab, tokenizer_fingerprint, vocab_size,
                                 write_json_atomic)

    if (folder / MANIFEST).exists():
        return
    rng = np.random.default_rng(seed)
    dtype = dtype_for_vocab(vocab_size(tok))
    w = ShardWriter(str(folder), dtype, 50_000_000)
    done = 0
    while done < num_tokens:
        n = min(4_000_000, num_tokens - done)
        flat = rng.integers(0, vocab_size(tok), size=n, dtype=np.int64).astype(dtype)
        lengths = rng.integers(50, 4000, size=n // 500)
        lengths = lengths[np.cumsum(lengths) <= n]
        lengths = np.append(lengths, n - lengths.sum())
        w.add(flat, lengths[lengths > 0])
        done += n
    w.finish()
    write_json_atomic(str(folder / MANIFEST), shard_manifest(w, tok, tokenizer_fingerprint(tok), "train", None))


def bench_stream(work: Path, tok, tokens_new: int, steps: int) -> dict:
    from cpt.config import DataConfig, StageConfig
    from cpt.data.loader import CPTDataLoader

    synthetic_source(work / "new", tokens_new, tok, 1)
    synthetic_source(work / "old", tokens_new // 10, tok, 2)
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    import torch

    torch.set_num_threads(1)
    dc = DataConfig(seq_len=2048, sources=[{"name": "new", "path": str(work / "new")},
                                           {"name": "old", "path": str(work / "old"), "replay": True}])
    stages = [StageConfig(steps=10**6, mix={"new": 0.95, "old": 0.05})]
    ld = CPTDataLoader(dc, stages, tok, 64, seed=0)
    for s in range(20):  # warm the page cache a little, build the permutations
        ld.batch(s)
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for s in range(20, 20 + steps):
        n += ld.batch(s)["input_ids"].numel()
        ld.metrics()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    # tokens per CPU-second: what the core delivers when the process has it to itself (wall time includes the
    # time other processes held the core on a shared machine)
    return {"tokens": n, "seconds": dt, "tokens_per_s": n / dt, "batches_per_s": steps / dt,
            "cpu_seconds": cpu, "tokens_per_cpu_s": n / cpu}


def stdlib_texts(limit_bytes: int) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for p in sorted(root.rglob("*.py")):
        if "site-packages" in p.parts or "test" in p.parts or "tests" in p.parts:
            continue
        try:
            t = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(t)
        total += len(t.encode())
        if total >= limit_bytes:
            break
    return texts


def train_tokenizer(texts: list[str], folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (folder / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(folder)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts[:2000], trainers.BpeTrainer(vocab_size=16384, special_tokens=["<|endoftext|>"],
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def bench_prepare(work: Path, tok, texts: list[str], repeats: int) -> dict:
    from cpt.data.prepare import prepare

    backend = tok.backend_tokenizer
    src = work / "stdlib.jsonl"
    with open(src, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    mb = sum(len(t.encode()) for t in texts) / 1e6
    res: dict = {"documents": len(texts), "megabytes": round(mb, 1), "cores": len(os.sched_getaffinity(0))}

    n_tokens = sum(len(e.ids) for e in backend.encode_batch_fast(texts, add_special_tokens=False))
    res["tokens"] = n_tokens
    variants = {
        "raw_encode_batch_fast": lambda: backend.encode_batch_fast(texts, add_special_tokens=False),
        "raw_encode_batch": lambda: backend.encode_batch(texts, add_special_tokens=False),
        "prepare_np1": lambda: prepare([str(src)], tok, work / "prepared_np1", num_proc=1, force=True),
        "prepare_np2": lambda: prepare([str(src)], tok, work / "prepared_np2", num_proc=2, force=True),
    }
    # interleaved repeats (the machine may be shared): best time of each, and the ratio within each round
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(_timed(fn))
    for name, ts in times.items():
        res[f"{name}_tokens_per_s"] = n_tokens / min(ts)
    ratios = [r / p for r, p in zip(times["raw_encode_batch_fast"], times["prepare_np1"])]
    res["prepare_np1_vs_raw_fast_best"] = min(times["raw_encode_batch_fast"]) / min(times["prepare_np1"])
    res["prepare_np1_vs_raw_fast_median_round"] = float(np.median(ratios))
    res["prepare_np2_vs_raw_fast_best"] = min(times["raw_encode_batch_fast"]) / min(times["prepare_np2"])
    return res


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare_stream(args) -> int:
    """Stream + mixer throughput of this checkout and of ``--compare-src``, in alternating child processes."""
    here = str(Path(__file__).resolve().parents[1])
    srcs = {"new": here, "old": str(Path(args.compare_src).resolve())}
    rounds: list[dict[str, float]] = []
    for _ in range(args.rounds):
        r = {}
        for name, src in srcs.items():
            env = dict(os.environ, PYTHONPATH=src)
            out = subprocess.run(_stream_child(args), capture_output=True, text=True, check=True, env=env)
            res = json.loads(out.stdout.strip().splitlines()[-1])["stream"]
            r[name], r[f"{name}_per_cpu_s"] = res["tokens_per_s"], res["tokens_per_cpu_s"]
        r["new_over_old"] = r["new"] / r["old"]
        r["new_over_old_cpu"] = r["new_per_cpu_s"] / r["old_per_cpu_s"]
        r["load_avg"] = os.getloadavg()[0]
        print(json.dumps(r), flush=True)
        rounds.append(r)
    keys = ("new", "old", "new_over_old", "new_per_cpu_s", "old_per_cpu_s", "new_over_old_cpu", "load_avg")
    med = {k: float(np.median([r[k] for r in rounds])) for k in keys}
    print(json.dumps({"stream_compare": {"rounds": rounds, "median": med, "old_src": srcs["old"]}}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/cpt-bench")
    ap.add_argument("--quick", action="store_true", help="smaller corpora (a smoke run)")
    ap.add_argument("--part", choices=["all", "stream", "prepare"], default="all")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds of the prepare benchmark")
    ap.add_argument("--compare-src", help="another checkout: stream benchmark of both, alternating (with --part stream)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds with --compare-src")
    ap.add_argument("--text-mb", type=float, help="raw text of the prepare benchmark (default 20, --quick 3)")
    ap.add_argument("--stream-tokens", type=int, help="tokens of the stream's main source (default 200M, --quick 20M)")
    ap.add_argument("--steps", type=int, help="timed batches of the stream benchmark (default 600, --quick 100)")
    args = ap.parse_args()
    args.text_mb = args.text_mb or (3 if args.quick else 20)
    args.stream_tokens = args.stream_tokens or (20_000_000 if args.quick else 200_000_000)
    args.steps = args.steps or (100 if args.quick else 600)
    if args.compare_src:
        return compare_stream(args)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    texts = stdlib_texts(int(args.text_mb * 1e6))
    tok = train_tokenizer(texts, work / "tokenizer")
    results = {"cpu": _cpu_name(), "cores": os.cpu_count()}
    if args.part in ("all", "prepare"):
        results["prepare"] = bench_prepare(work, tok, texts, repeats=1 if args.quick else args.repeats)
        print("prepare:", json.dumps(results["prepare"]), file=sys.stderr, flush=True)  # (stdout: the one JSON line)
    if args.part in ("all", "stream"):
        # in a child process so that pinning to one core does not affect the prepare benchmark
        if args.part == "all":
            out = subprocess.run(_stream_child(args), capture_output=True, text=True, check=True)
            results["stream"] = json.loads(out.stdout.strip().splitlines()[-1])["stream"]
        else:
            results["stream"] = bench_stream(work, tok, args.stream_tokens, args.steps)
    print(json.dumps(results))
    return 0


def _stream_child(args) -> list[str]:
    """The command line of the stream benchmark in a child process, with this run's sizes."""
    return [sys.executable, __file__, "--part", "stream", "--workdir", str(args.workdir), "--text-mb", str(args.text_mb),
            "--stream-tokens", str(args.stream_tokens), "--steps", str(args.steps)]


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
