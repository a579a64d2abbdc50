"""Benchmark: the start-up cost of ``model.compile`` — the whole model (``true``) against each decoder layer
(``regional``, cpt/compiling.py), with eager as the reference — on a deep, narrow Llama built from a config.

Each mode runs in its own fresh Python process with its own empty inductor cache (``TORCHINDUCTOR_CACHE_DIR`` in a
temporary folder), so no mode profits from another's compiled code or from an earlier run: ``first_step_s`` is the
cold time from compiling to the end of the first optimizer step (forward, backward, AdamW: dynamo tracing,
AOTAutograd and inductor's code generation for forward and backward, then the step itself), ``step_s`` the median of
the following steps (compiled code only), ``graphs`` the number of graphs dynamo compiled (regional: one, traced from
the first layer and reused by the others). It measures compile time, not throughput: on CPU and at this size a step
says little about GPU speed (scripts/bench_throughput.py and scripts/gpu_session.sh measure that on a GPU).

    python scripts/bench_compile.py [--layers 16] [--hidden 64] [--seq-len 64] [--batch 2] [--steps 3]
        [--device cpu|cuda] [--threads 1] [--backend inductor] [--modes eager,whole,regional] [--warm]

Prints one JSON line: the settings, each mode's numbers, and ``first_step_ratio_whole_to_regional``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = {"eager": False, "whole": True, "regional": "regional"}


def measure(args: argparse.Namespace) -> dict:
    """One mode, in this process: build, compile, time the first step and the following ones."""
    import torch
    from torch._dynamo.utils import counters
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpt.compiling import compile_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=args.seq_len)
    model = LlamaForCausalLM(cfg).to(args.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), device=args.device)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # (a host sync: the step has finished)

    t0 = time.perf_counter()
    model = compile_model(model, MODES[args.mode], **({"backend": args.backend} if MODES[args.mode] else {}))
    first_loss = step()
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"first_step_s": round(first, 3), "step_s": round(statistics.median(times), 5),
            "graphs": counters["stats"]["unique_graphs"], "first_loss": round(first_loss, 5),
            "fxgraph_cache_hits": int(counters["inductor"]["fxgraph_cache_hit"])}


def run_mode(args: argparse.Namespace, mode: str) -> dict:
    """``measure`` for ``mode`` in a fresh process with an empty inductor cache; with ``--warm`` then again in another
    fresh process over the cache the first one filled (a restart with ``model.compile_cache``): ``warm``."""
    with tempfile.TemporaryDirectory(prefix="bench-compile-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton"),
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        argv = [sys.executable, __file__, "--_one", mode, *sys.argv[1:]]
        runs = []
        for _ in range(2 if args.warm else 1):
            proc = subprocess.run(argv, env=env, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"mode {mode} failed:\n{proc.stderr[-3000:]}")
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {**runs[0], **({"warm": runs[1]} if args.warm else {})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="steps timed after the first (their median is step_s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the steps (default: 1 on CPU, where tiny ops contend for shared cores; "
                        "0: torch's default)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: no code generation)")
    p.add_argument("--modes", default="eager,whole,regional")
    p.add_argument("--warm", action="store_true",
                   help="also time each mode in a second fresh process over the cache the first filled (a restart "
                        "with model.compile_cache): its numbers under 'warm'")
    p.add_argument("--_one", dest="mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    if args.mode:  # a child process: one mode
        print(json.dumps(measure(args)))
        return
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    import torch

    report = {"layers": args.layers, "hidden": args.hidden, "vocab": args.vocab, "seq_len": args.seq_len,
              "batch": args.batch, "device": args.device, "backend": args.backend, "torch": torch.__version__,
              "threads": args.threads or torch.get_num_threads(), "modes": {m: run_mode(args, m) for m in modes}}
    if {"whole", "regional"} <= set(modes):
        whole, regional = report["modes"]["whole"], report["modes"]["regional"]
        report["first_step_ratio_whole_to_regional"] = round(whole["first_step_s"] / regional["first_step_s"], 2)
    for m in modes if args.warm else []:
        if m != "eager":
            report[f"first_step_ratio_cold_to_warm_{m}"] = round(report["modes"][m]["first_step_s"] /
                                                                  report["modes"][m]["warm"]["first_step_s"], 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
