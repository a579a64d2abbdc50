"""Benchmark: the chunked next-token loss (cpt/chunked_loss.py) against today's full-logits loss, forward + backward.

Only the loss: hidden states ``[B, L, H]`` (a leaf requiring grad) and an lm_head weight ``[V, H]`` (Llama 3 shape by
default: V 128,256, H 2048, L 2048). "today" is ``F.linear`` + ``cpt.lm_loss.next_token_losses`` (the fp32 upcast of
the full logits) + mean; "chunked" is ``cpt.chunked_loss.linear_cross_entropy`` over the same positions. Both
produce the loss, the per-row losses and the gradients wrt the hidden states and the weight.

Peak memory is measured above the memory held just before the call (inputs allocated, previous gradients freed):
  * CUDA: ``torch.cuda.max_memory_allocated`` (the caching allocator's exact figure);
  * CPU: the process's peak resident set size, with glibc told to mmap every block of 1 MB or more
    (``mallopt(M_MMAP_THRESHOLD)``) and ``malloc_trim`` before each call, so that tensors enter and leave the RSS when
    allocated and freed. On Linux the kernel's own high-water mark (``VmHWM`` in ``/proc/self/status``, reset by
    writing 5 to ``/proc/self/clear_refs`` before each call) gives the exact peak whatever the machine's load; where
    that reset is not allowed, the RSS (``/proc/self/statm``) sampled every 0.5 ms by a thread (which can miss a
    short peak when the cores are busy).
``peak_mem`` includes the gradients both paths must return (``grad_W`` alone is V x H x 4 bytes: 1.05 GB here);
``working_mem`` is the peak minus those gradients, the memory the loss itself needs on top of its results.

    python scripts/bench_loss.py [--device cpu|cuda] [--dtype fp32|bf16] [--batch 1,2] [--repeats 2]
        [--vocab 128256] [--hidden 2048] [--seq-len 2048] [--chunk-tokens 1024] [--torch-native]

``--torch-native`` adds a third path where torch has it (2.13 and later): PyTorch's own chunked
``F.linear_cross_entropy`` (``options=LinearCrossEntropyOptions()``, its automatic chunking), mean reduction. It
returns the loss only, not the per-token losses cpt's per-source metrics need (its ``reduction="none"`` recomputes
every chunk in backward), so it is a reference for time and memory, checked against today's loss and gradients.

``--dtype bf16`` runs every path under bf16 autocast with fp32 weights (as cpt trains). Rounds alternate the paths;
time and memory are the medians over rounds after one warm-up call of each. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cpt.chunked_loss import DEFAULT_CHUNK_TOKENS, linear_cross_entropy  # noqa: E402
from cpt.lm_loss import next_token_losses  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _glibc():
    """glibc's malloc, told to mmap every block of 1 MB or more (so that a freed tensor leaves the RSS at once,
    instead of glibc's adaptive threshold keeping blocks up to 32 MB in the heap) and to trim its heap on demand."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        return libc
    except (OSError, AttributeError):
        return None


LIBC = _glibc()


def _reset_high_water_mark() -> bool:
    """Linux: set the kernel's peak-RSS record (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _high_water_mark() is not None
    except OSError:
        return False


def _high_water_mark() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakRSS:
    """Highest RSS while the block runs, minus the RSS at its start: the kernel's high-water mark where it can be
    reset (exact), and always a sampling thread too."""

    def __enter__(self):
        if LIBC is not None:
            LIBC.malloc_trim(0)
        self.base = self.peak = _rss()
        self._hwm = _reset_high_water_mark()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss(), (_high_water_mark() or 0) if self._hwm else 0)
        self.bytes = self.peak - self.base


def today(h, w, ids):
    per_token = next_token_losses(F.linear(h, w), ids)
    loss, rows = per_token.mean(), per_token.detach().mean(dim=1)
    loss.backward()
    return loss.detach(), rows


def chunked(h, w, ids, chunk_tokens):
    bsz, length, width = h.shape
    loss, per_token, _ = linear_cross_entropy(h[:, :-1].reshape(-1, width), w, None, ids[:, 1:].reshape(-1), chunk_tokens)
    rows = per_token.view(bsz, length - 1).mean(dim=1)
    loss.backward()
    return loss.detach(), rows


def torch_native(h, w, ids):
    """PyTorch's chunked linear + cross-entropy (torch >= 2.13): the mean loss; per-row losses are not available."""
    width = h.size(-1)
    loss = F.linear_cross_entropy(h[:, :-1].reshape(-1, width), w, ids[:, 1:].reshape(-1),
                                  options=torch.nn.LinearCrossEntropyOptions())
    loss.backward()
    return loss.detach(), None


def measure(fn, h, w, ids, device, autocast_dtype):
    h.grad = w.grad = None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else torch.autocast(device.type, enabled=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        with ctx:
            loss, rows = fn(h, w, ids)
        sync()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            with ctx:
                loss, rows = fn(h, w, ids)
            seconds = time.perf_counter() - t0
        peak = mem.bytes
    grads = h.grad.numel() * h.grad.element_size() + w.grad.numel() * w.grad.element_size()
    return {"seconds": seconds, "peak": peak, "grads": grads, "loss": float(loss),
            "rows": None if rows is None else rows.float().cpu(),
            "gh": h.grad.float().cpu()[:, :64, :64].clone(), "gw": w.grad.float().cpu()[:4096, :64].clone()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--batch", default="1,2", help="micro-batch sizes, comma-separated")
    ap.add_argument("--vocab", type=int, default=128_256)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--torch-native", action="store_true", help="also PyTorch's own F.linear_cross_entropy (torch >= 2.13)")
    args = ap.parse_args(argv)
    if args.torch_native and not hasattr(F, "linear_cross_entropy"):
        ap.error(f"--torch-native needs torch >= 2.13 (F.linear_cross_entropy); this is torch {torch.__version__}")
    device = torch.device(args.device)
    autocast_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    torch.manual_seed(0)
    w = (torch.randn(args.vocab, args.hidden, device=device) * args.hidden ** -0.5).requires_grad_()
    cases = []
    for bsz in [int(b) for b in args.batch.split(",")]:
        h = torch.randn(bsz, args.seq_len, args.hidden, device=device).requires_grad_()
        ids = torch.randint(0, args.vocab, (bsz, args.seq_len), device=device)
        paths = {"today": today, "chunked": lambda h_, w_, i_: chunked(h_, w_, i_, args.chunk_tokens)}
        if args.torch_native:
            paths["torch_native"] = torch_native
        results = {name: [] for name in paths}
        for rnd in range(args.repeats + 1):  # round 0: warm-up, not counted
            for name, fn in paths.items():
                r = measure(fn, h, w, ids, device, autocast_dtype)
                if rnd:
                    results[name].append(r)
        t = results["today"][-1]
        tol = 2e-2 if autocast_dtype else 1e-4  # bf16: the two paths round the logits' products differently

        def same_as_today(c):
            return (abs(t["loss"] - c["loss"]) <= tol * abs(t["loss"])
                    and (c["rows"] is None or torch.allclose(t["rows"], c["rows"], rtol=tol))
                    and torch.allclose(t["gh"], c["gh"], rtol=tol * 10, atol=tol * t["gh"].abs().max().item())
                    and torch.allclose(t["gw"], c["gw"], rtol=tol * 10, atol=tol * t["gw"].abs().max().item()))
        med = lambda name, key: statistics.median(r[key] for r in results[name])  # noqa: E731
        case = {"micro_batch": bsz}
        for name in paths:
            case[f"{name}_s"] = round(med(name, "seconds"), 3)
            case[f"{name}_peak_mem_gb"] = round(med(name, "peak") / 1e9, 3)
            case[f"{name}_working_mem_gb"] = round((med(name, "peak") - results[name][0]["grads"]) / 1e9, 3)
        for name, prefix in (("chunked", ""), ("torch_native", "torch_native_")):
            if name not in paths:
                continue
            case[f"{prefix}peak_mem_ratio"] = round(med(name, "peak") / med("today", "peak"), 3)
            case[f"{prefix}working_mem_ratio"] = round((med(name, "peak") - t["grads"]) / max(med("today", "peak") - t["grads"], 1), 3)
            case[f"{prefix}time_ratio"] = round(med(name, "seconds") / med("today", "seconds"), 3)
            case[f"{prefix}same_loss_and_grads"] = bool(same_as_today(results[name][-1]))
        cases.append(case)
        del h, ids, results
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
           "torch": torch.__version__, "dtype": args.dtype, "vocab": args.vocab, "hidden": args.hidden,
           "seq_len": args.seq_len, "chunk_tokens": args.chunk_tokens, "repeats": args.repeats,
           "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
           "peak_memory_from": ("cuda allocator" if device.type == "cuda" else
                                "kernel high-water mark (VmHWM)" if _reset_high_water_mark() else "sampled RSS"),
           "cases": cases}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
