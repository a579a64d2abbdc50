"""How long a checkpoint save blocks the training loop: synchronous vs non-blocking (background) saves.

    python scripts/bench_checkpoint.py [--out DIR] [--repeats 2] [--tiny]

A SmolLM2-135M-shaped Llama (random init, fp32) with an AdamW state after one step, on CPU, saved by
cpt's CheckpointManager: synchronously (``checkpoint.async_save: false``), non-blocking (the time until
``save()`` returns, and until the background write is on disk; the first save also allocates the host
staging buffers that later saves reuse), and the old path for reference
(``accelerator.save_state`` + re-reading every file to checksum it). Prints one JSON line; the best of
``--repeats`` for each (at least 2, so that a non-blocking save with warm buffers is measured). ``--tiny`` runs a small shape (used by the test suite).

``--fsdp``: the same model under FSDP2 (SHARDED_STATE_DICT) on the processes of an ``accelerate launch``: a
synchronous save (accelerate's ``save_state`` layout, written by DCP) against a non-blocking one (DCP's async_save:
cpt/sharded_save.py), each time the slowest rank's. On CPU (gloo), through the tests' FSDP-on-CPU shim::

    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --num_processes 2 --use_fsdp --fsdp_version 2 \
        --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP --fsdp_state_dict_type SHARDED_STATE_DICT \
        scripts/bench_checkpoint.py --fsdp [--tiny]

``--deepspeed``: the same model under DeepSpeed ZeRO (the stage and offload of the launch): a synchronous save
(``accelerator.save_state``) against a non-blocking one (cpt/zero_save.py), each time the slowest rank's; the last two
checkpoints' DeepSpeed files are compared (``same_tensors``). On CPU (gloo)::

    OMP_NUM_THREADS=1 accelerate launch --num_processes 2 --use_deepspeed --zero_stage 3 \
        scripts/bench_checkpoint.py --deepspeed [--tiny]      (ZeRO-2 + offload: --zero_stage 2 --offload_optimizer_device cpu)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)
TINY = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)


def build(shape: dict):
    import torch
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # one step fills the AdamW moments (exp_avg, exp_avg_sq)
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    opt.zero_grad(set_to_none=True)
    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(model, opt)
    return acc, model


def old_save(acc, folder: Path) -> None:
    """What cpt did before: accelerate writes, then every file is read back to checksum it."""
    from cpt.checkpoint import write_checksums
    from cpt.fileio import file_digest

    acc.save_state(str(folder), safe_serialization=True)
    write_checksums(folder, {str(p.relative_to(folder)): file_digest(p) for p in folder.rglob("*") if p.is_file()})


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", help="where to write the checkpoints (default: a temporary directory)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 on the processes of an accelerate launch (see above)")
    ap.add_argument("--deepspeed", action="store_true", help="DeepSpeed ZeRO on the processes of an accelerate launch")
    args = ap.parse_args(argv)
    if args.fsdp or args.deepspeed:
        return sharded_main(args)
    import torch

    from cpt.checkpoint import CheckpointManager, list_checkpoints
    from cpt.state import TrainState

    acc, model = build(TINY if args.tiny else SMOLLM2_135M)
    n_params = sum(p.numel() for p in model.parameters())
    root = Path(args.out or tempfile.mkdtemp(prefix="bench_ckpt_"))
    best = {"sync_s": float("inf"), "async_blocking_s": float("inf"), "async_total_s": float("inf"), "old_sync_s": float("inf")}
    first_blocking = None
    background = CheckpointManager(root / "async", keep=1, accelerator=acc, async_save=True)  # staging buffers reused
    size = 0
    for r in range(args.repeats):
        t0 = time.perf_counter()
        CheckpointManager(root / f"sync{r}", keep=1, accelerator=acc, async_save=False).save(r + 1, {"train": TrainState(step=r + 1)}, "bench: true\n")
        best["sync_s"] = min(best["sync_s"], time.perf_counter() - t0)
        size = sum(p.stat().st_size for p in list_checkpoints(root / f"sync{r}")[-1].iterdir())
        shutil.rmtree(root / f"sync{r}")
        t0 = time.perf_counter()
        background.save(r + 1, {"train": TrainState(step=r + 1)}, "bench: true\n")
        t1 = time.perf_counter()
        background.wait()
        t2 = time.perf_counter()
        first_blocking = t1 - t0 if first_blocking is None else first_blocking
        best["async_blocking_s"] = min(best["async_blocking_s"], t1 - t0)
        best["async_total_s"] = min(best["async_total_s"], t2 - t0)
        t0 = time.perf_counter()
        old_save(acc, root / f"old{r}")
        best["old_sync_s"] = min(best["old_sync_s"], time.perf_counter() - t0)
        shutil.rmtree(root / f"old{r}")
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)
    out = {
        "bench": "checkpoint", "shape": "tiny" if args.tiny else "smollm2-135m", "params": n_params,
        "checkpoint_mb": round(size / 2**20, 1), **{k: round(v, 3) for k, v in best.items()},
        "async_first_blocking_s": round(first_blocking, 3),  # the first save also allocates its staging buffers
        "blocking_ratio": round(best["async_blocking_s"] / best["sync_s"], 3),
        "blocking_ratio_vs_old": round(best["async_blocking_s"] / best["old_sync_s"], 3),
        "repeats": args.repeats, "device": "cpu", "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "python": platform.python_version(),
    }
    print(json.dumps(out))
    return out


def _deepspeed_accelerator():
    """An Accelerator under the launch's DeepSpeed plugin, its batch geometry filled in as cpt's loop does (gloo on CPU)."""
    from datetime import timedelta

    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from cpt.accelerator import configure_deepspeed

    kwargs = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo", timeout=timedelta(minutes=30))]
    acc = Accelerator(kwargs_handlers=kwargs)
    ds = getattr(acc.state, "deepspeed_plugin", None)
    if ds is None:
        raise SystemExit("--deepspeed: run under `accelerate launch --use_deepspeed --zero_stage 2|3 ...` (see the docstring)")
    configure_deepspeed(ds.deepspeed_config, micro_batch=1, grad_accum=1, global_batch=acc.num_processes, grad_clip=None)
    return acc


def _same_files(a: Path, b: Path) -> bool:
    """Whether two checkpoints' DeepSpeed and RNG files hold the same tensors (and the same other values)."""
    import torch

    def same(x, y) -> bool:
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
        if isinstance(x, dict):
            return isinstance(y, dict) and list(x) == list(y) and all(same(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return type(x) is type(y) and len(x) == len(y) and all(map(same, x, y))
        return type(x) is type(y) if type(x).__module__.startswith(("deepspeed", "numpy")) else x == y

    names = sorted(str(p.relative_to(a)) for p in a.rglob("*.pt"))
    return bool(names) and all(same(torch.load(a / n, weights_only=False), torch.load(b / n, weights_only=False)) for n in names)


def sharded_main(args) -> dict:
    """Blocking time of a synchronous and of a non-blocking FSDP2 or DeepSpeed save (the slowest rank's), best of
    ``--repeats``."""
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpt.checkpoint import CheckpointManager, list_checkpoints
    from cpt.distributed import Backend, backend
    from cpt.state import TrainState

    if args.deepspeed:
        acc = _deepspeed_accelerator()
    else:
        if not torch.cuda.is_available():
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from fsdp_on_cpu import force_fsdp_on_cpu

            force_fsdp_on_cpu()
        acc = Accelerator()
        if backend(acc) is not Backend.FSDP or not acc.is_fsdp2:
            raise SystemExit("--fsdp: run under `accelerate launch --use_fsdp --fsdp_version 2 ...` (see the docstring)")
    shape = TINY if args.tiny else SMOLLM2_135M
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape))
    n_params = sum(p.numel() for p in model.parameters())
    model, opt = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    ids = torch.randint(0, shape["vocab_size"], (1, 16), device=acc.device)
    acc.backward(model(input_ids=ids, labels=ids).loss)  # one step fills the AdamW moments
    opt.step()
    opt.zero_grad(set_to_none=True)
    root = Path(args.out or (tempfile.mkdtemp(prefix="bench_ckpt_") if acc.is_main_process else ""))
    root = Path(acc.gather_for_metrics([str(root)], use_gather_object=True)[0])  # the main process's folder

    def slowest(seconds: float) -> float:
        t = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    best = {"sync_s": float("inf"), "async_blocking_s": float("inf"), "async_total_s": float("inf")}
    blocking = []
    background = CheckpointManager(root / "async", keep=1, accelerator=acc, async_save=True)
    assert background.shards is not None, "the saves are not taking the non-blocking path"
    size = 0
    for r in range(args.repeats):
        acc.wait_for_everyone()
        t0 = time.perf_counter()
        CheckpointManager(root / f"sync{r}", keep=1, accelerator=acc, async_save=False).save(r + 1, {"train": TrainState(step=r + 1)}, "bench: true\n")
        best["sync_s"] = min(best["sync_s"], slowest(time.perf_counter() - t0))
        if acc.is_main_process:
            size = sum(p.stat().st_size for p in list_checkpoints(root / f"sync{r}")[-1].rglob("*") if p.is_file())
            if r < args.repeats - 1:  # (the last one is compared with the last non-blocking save below)
                shutil.rmtree(root / f"sync{r}")
        acc.wait_for_everyone()
        t0 = time.perf_counter()
        background.save(r + 1, {"train": TrainState(step=r + 1)}, "bench: true\n")
        t1 = time.perf_counter()
        background.wait()
        t2 = time.perf_counter()
        blocking.append(slowest(t1 - t0))
        best["async_blocking_s"] = min(best["async_blocking_s"], blocking[-1])
        best["async_total_s"] = min(best["async_total_s"], slowest(t2 - t0))
    acc.wait_for_everyone()
    same = None
    if args.deepspeed and acc.is_main_process:
        same = _same_files(list_checkpoints(root / "async")[-1], list_checkpoints(root / f"sync{args.repeats - 1}")[-1])
    if acc.is_main_process and not args.out:
        shutil.rmtree(root, ignore_errors=True)
    extra = {}
    if args.deepspeed:
        zero = acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        extra = {"zero_stage": int(zero.get("stage", 0)), "same_tensors": same,
                 "offload": str(zero.get("offload_optimizer", {}).get("device", "none")) not in ("none", "None")}
    out = {
        "bench": "checkpoint-deepspeed" if args.deepspeed else "checkpoint-fsdp2", **extra, "shape": "tiny" if args.tiny else "smollm2-135m", "params": n_params,
        "processes": acc.num_processes, "checkpoint_mb": round(size / 2**20, 1), **{k: round(v, 3) for k, v in best.items()},
        "async_first_blocking_s": round(blocking[0], 3),  # the first one also allocates the host buffers
        "blocking_ratio": round(best["async_blocking_s"] / best["sync_s"], 3), "repeats": args.repeats,
        "device": "cuda" if torch.cuda.is_available() else "cpu", "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    if acc.is_main_process:
        print(json.dumps(out))
    acc.wait_for_everyone()  # then every rank tears its groups down (the DCP gloo groups too) before exiting: left to
    torch.distributed.destroy_process_group()  # the interpreter's exit, a rank aborted ("terminate called without an
    return out  # active exception", SIGABRT) under load after printing its figures


if __name__ == "__main__":
    main()
