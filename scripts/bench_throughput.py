"""Training throughput: cpt's training loop against the transformers Trainer (a benchmark, not a test).

One invocation benchmarks, per model shape, (a) the Hugging Face ``Trainer`` and (b) cpt's real
training path (``cpt.train.train`` on token shards in cpt's own format) with the same model, the same
sequence length, micro batch and global batch, the same AdamW hyper-parameters and gradient clipping,
and prints tokens/s, MFU, peak memory and the ratio cpt/Trainer. Results go to docs/benchmarks.md
("## Training throughput: cpt vs transformers Trainer").

    # one GPU (defaults: llama-1b and smollm2-360m, seq 2048, bf16, cpt with torch.compile)
    python scripts/bench_throughput.py --json bench.json
    # CPU smoke run (default on a machine without CUDA: the tiny shape in fp32)
    .venv/bin/python scripts/bench_throughput.py --shapes tiny --steps 4 --warmup 2

Method
  * Each (shape, framework) runs in a fresh child process (this script with ``--worker``): its own CUDA
    context, so peak memory (``torch.cuda.max_memory_allocated``; the peak RSS on CPU) and torch.compile
    caches don't leak from one measurement into the next.
  * Models: random init (seed 0) of a Llama-architecture config, fp32 master weights; bf16 is autocast
    (Trainer ``bf16=True``; cpt ``train.precision=bf16`` through accelerate), attention ``sdpa``.
  * Data: uniform random token ids, fixed-length sequences, ``labels = input_ids``. The Trainer reads an
    in-memory tensor dataset; cpt reads shards written with its own shard writer through its data loader.
  * Timing: ``--warmup`` optimizer steps are run first and excluded (torch.compile, allocator warm-up);
    the next ``--steps`` steps are timed with a device synchronisation at both ends. Trainer: a
    TrainerCallback at ``on_step_end`` (before the Trainer's own logging). cpt: ``train.log_every`` is set
    to divide both ends, and the wall time between the two log records is used (each log record is
    written after the loss ``.item()``, a synchronisation). cpt's own sliding-window ``perf/tokens_per_s``
    and ``perf/mfu`` of the last record are reported next to it as a cross-check. ``cpt_first_step_s``: from
    ``train()``'s start to the first log record (step ``cpt_first_logged_step``: 1 when warmup and steps are coprime,
    as in gpu_session.sh; model build, data, torch.compile and the steps): the start-up cost that ``model.compile``
    (true or regional) adds, every start and every resume.
  * MFU, for both frameworks: tokens/s x ``cpt.throughput.model_flops_per_token`` (6N + attention, llm-foundry
    convention) over the device's dense bf16 peak (``cpt.throughput.peak_flops_for``, or ``--peak-flops``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .` (e.g. the GPU machine)
    sys.path.insert(0, str(REPO))

FRAMEWORKS = ("trainer", "cpt")

# Llama-architecture shapes. head_dim = hidden / heads = 64 for all three.
SHAPES: dict[str, dict] = {
    "llama-1b": {  # Llama-3.2-1B-like (no rope scaling: irrelevant for throughput)
        "arch": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                     rms_norm_eps=1e-5),
        "seq_len": 2048, "micro_batch": 4, "global_batch": 32,
    },
    "smollm2-360m": {  # SmolLM2-360M-like
        "arch": dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                     intermediate_size=2560, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                     rms_norm_eps=1e-5),
        "seq_len": 2048, "micro_batch": 8, "global_batch": 32,
    },
    "tiny": {  # CPU smoke shape
        "arch": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=256, vocab_size=512, tie_word_embeddings=True, rope_theta=10000.0,
                     rms_norm_eps=1e-5),
        "seq_len": 128, "micro_batch": 4, "global_batch": 8,
    },
}

# hyper-parameters shared by both frameworks (cpt's defaults)
LR, WEIGHT_DECAY, BETAS, EPS, GRAD_CLIP, SEED = 3e-4, 0.1, (0.9, 0.95), 1e-8, 1.0, 0

WORKER_ENV = {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
}


# ------------------------------------------------------------------------------------------ settings


def resolve_settings(args: argparse.Namespace, shape: str, cuda: bool) -> dict:
    """The settings of one shape's measurement: the shape's defaults overridden by the flags."""
    s = SHAPES[shape]
    seq_len = args.seq_len or s["seq_len"]
    mbs = args.micro_batch or s["micro_batch"]
    gbs = args.global_batch or s["global_batch"]
    if gbs % mbs:
        raise SystemExit(f"--global-batch ({gbs}) must be a multiple of --micro-batch ({mbs})")
    precision = args.precision or ("bf16" if cuda else "fp32")
    return {
        "shape": shape, "arch": {"model_type": "llama", **s["arch"], "max_position_embeddings": max(seq_len, 2048)},
        "seq_len": seq_len, "micro_batch": mbs, "global_batch": gbs, "grad_accum": gbs // mbs,
        "warmup": args.warmup, "steps": args.steps, "precision": precision,
        "attn_implementation": args.attn, "gradient_checkpointing": args.gradient_checkpointing,
        "cpt_compile": cuda if args.cpt_compile is None else args.cpt_compile,
        "cpt_liger": args.cpt_liger, "trainer_compile": args.trainer_compile,
        "cpt_chunked_loss": {"auto": "auto", "true": True, "false": False}[args.cpt_chunked_loss],
        "cpt_overrides": list(args.cpt_set),
        "cpt_profile": str(Path(args.cpt_profile).resolve()) if args.cpt_profile else None,
        "peak_flops": args.peak_flops, "threads": (1 if not cuda else 0) if args.threads is None else args.threads,
        "lr": LR, "weight_decay": WEIGHT_DECAY, "betas": list(BETAS), "eps": EPS,
        "grad_clip": GRAD_CLIP, "seed": SEED,
    }


# ------------------------------------------------------------------------------------------ data


def write_tokenizer(folder: Path, vocab_size: int):
    """A word-level tokenizer with exactly ``vocab_size`` ids (id 0 = EOS), saved with save_pretrained.

    cpt needs a tokenizer for a model built from ``model.arch`` (EOS for packing, the vocabulary hash
    that ties shards to the run); random token ids make its merges irrelevant."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if (folder / "tokenizer.json").exists():
        return
    vocab = {"<eos>": 0, **{f"t{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>", unk_token="<eos>",
                                   model_max_length=1 << 20)
    fast.save_pretrained(folder)


def write_random_shards(folder: Path, tokenizer, num_tokens: int, seed: int) -> None:
    """A prepared source of uniform random token ids, written with cpt's own shard writer and manifest."""
    import numpy as np

    from cpt.data.shard_writer import ShardWriter, shard_manifest
    from cpt.data.shards import (MANIFEST, dtype_for_vocab, tokenizer_fingerprint, vocab_size,
                                 write_json_atomic)

    if (folder / MANIFEST).exists():
        return
    V = vocab_size(tokenizer)
    dtype = dtype_for_vocab(V)
    rng = np.random.default_rng(seed)
    w = ShardWriter(str(folder), dtype, 1 << 26)
    flat = rng.integers(0, V, size=num_tokens, dtype=np.int64).astype(dtype)
    lengths = np.full(num_tokens // 4096, 4096, dtype=np.int64)  # "documents" of 4096 tokens
    if num_tokens % 4096:
        lengths = np.append(lengths, num_tokens % 4096)
    w.add(flat, lengths)
    w.finish()
    write_json_atomic(str(folder / MANIFEST), shard_manifest(w, tokenizer, tokenizer_fingerprint(tokenizer), "train", None))


def prepare_shape_data(workdir: Path, settings: dict) -> dict:
    from transformers import AutoTokenizer

    V = settings["arch"]["vocab_size"]
    tok_dir = workdir / f"tokenizer-{V}"
    write_tokenizer(tok_dir, V)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    total_steps = settings["warmup"] + settings["steps"]
    # enough sequences for one epoch of every step (the packed stream drops the last partial sequence)
    num_tokens = (total_steps + 2) * settings["global_batch"] * settings["seq_len"] + settings["seq_len"]
    shards = workdir / f"shards-{settings['shape']}-{settings['seq_len']}-{num_tokens}"
    write_random_shards(shards, tok, num_tokens, SEED)
    return {"tokenizer": str(tok_dir), "shards": str(shards)}


# ------------------------------------------------------------------------------------------ workers


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _common_result(settings: dict, model, tokens_per_s: float) -> dict:
    import torch

    from cpt.model import model_shape
    from cpt.throughput import mfu, model_flops_per_token, peak_flops_for, peak_memory_gb

    shape = model_shape(model)
    fpt = model_flops_per_token(shape["n_params"], shape["n_layers"], shape["hidden"], settings["seq_len"])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = settings["peak_flops"] or peak_flops_for(device)
    return {
        "tokens_per_s": tokens_per_s, "mfu": mfu(tokens_per_s, fpt, peak), "peak_mem_gb": peak_memory_gb(),
        "n_params": shape["n_params"], "flops_per_token": fpt, "peak_flops": peak, "device": device,
    }


def run_trainer(settings: dict, data_root: Path, workdir: Path) -> dict:  # noqa: ARG001
    import torch
    from torch.utils.data import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from cpt.model import config_from_arch

    cuda = torch.cuda.is_available()
    L, B, mbs = settings["seq_len"], settings["global_batch"], settings["micro_batch"]
    warmup, steps = settings["warmup"], settings["steps"]
    t_setup = time.perf_counter()
    torch.manual_seed(settings["seed"])
    arch = settings["arch"]
    model = AutoModelForCausalLM.from_config(config_from_arch(arch), dtype=torch.float32,
                                             attn_implementation=settings["attn_implementation"])

    n_rows = (warmup + steps + 1) * B
    g = torch.Generator().manual_seed(settings["seed"] + 1)
    rows = torch.randint(0, arch["vocab_size"], (n_rows, L), generator=g)

    class RandomTokens(Dataset):
        def __len__(self):
            return n_rows

        def __getitem__(self, i):
            return {"input_ids": rows[i], "labels": rows[i]}

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t: dict[int, float] = {}
            self.losses: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, warmup + steps):
                _sync()
                self.t[state.global_step] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    targs = TrainingArguments(
        output_dir=str(workdir / "trainer-out"), per_device_train_batch_size=mbs,
        gradient_accumulation_steps=settings["grad_accum"], max_steps=warmup + steps,
        learning_rate=settings["lr"], weight_decay=settings["weight_decay"], adam_beta1=settings["betas"][0],
        adam_beta2=settings["betas"][1], adam_epsilon=settings["eps"], max_grad_norm=settings["grad_clip"],
        lr_scheduler_type="constant", warmup_steps=0,
        bf16=settings["precision"] == "bf16", fp16=settings["precision"] == "fp16",
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        logging_strategy="steps", logging_steps=warmup + steps,  # one log, after the timed window
        save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=not cuda, seed=settings["seed"],
        dataloader_num_workers=0, gradient_checkpointing=settings["gradient_checkpointing"],
        torch_compile=settings["trainer_compile"],
    )
    timer = StepTimer()
    trainer = Trainer(model=model, args=targs, train_dataset=RandomTokens(), callbacks=[timer])
    setup_s = time.perf_counter() - t_setup
    t0 = time.perf_counter()
    trainer.train()
    total_s = time.perf_counter() - t0
    seconds = timer.t[warmup + steps] - timer.t[warmup]
    out = _common_result(settings, model, steps * B * L / seconds)
    out.update({"framework": "trainer", "measured_seconds": seconds, "step_time_s": seconds / steps,
                "final_loss": timer.losses[-1] if timer.losses else None, "setup_s": setup_s, "train_s": total_s})
    return out


def cpt_config(settings: dict, data: dict, run_dir: Path) -> dict:
    warmup, steps = settings["warmup"], settings["steps"]
    # --cpt-profile: one more step after the timed window, under torch.profiler (the timed steps are not profiled)
    profile = {"start_step": warmup + steps + 1, "steps": 1} if settings.get("cpt_profile") else None
    return {
        "run": {"name": f"bench-{settings['shape']}", "output_dir": str(run_dir), "seed": settings["seed"]},
        "model": {
            "arch": dict(settings["arch"]), "tokenizer": data["tokenizer"],
            "attn_implementation": settings["attn_implementation"], "compile": settings["cpt_compile"],
            "compile_cache": None,  # (torch's own, as when the earlier sessions' figures were taken)
            "liger_kernel": settings["cpt_liger"], "gradient_checkpointing": settings["gradient_checkpointing"],
        },
        "data": {"seq_len": settings["seq_len"], "sources": [{"name": "random", "path": data["shards"]}],
                 "verify_checksums": False},
        "stages": [{"name": "bench", "steps": warmup + steps + (1 if profile else 0), "mix": {"random": 1.0},
                    "schedule": {"type": "constant", "max_lr": settings["lr"]}}],
        "optim": {"weight_decay": settings["weight_decay"], "betas": settings["betas"], "eps": settings["eps"],
                  "grad_clip": settings["grad_clip"]},
        "train": {"global_batch_size": settings["global_batch"], "micro_batch_size": settings["micro_batch"],
                  "precision": settings["precision"], "log_every": math.gcd(warmup, steps) if warmup else steps,
                  "chunked_loss": settings.get("cpt_chunked_loss", "auto"),
                  "progress_bar": False, "peak_flops": settings["peak_flops"], "profile": profile},
        "eval": {"at_start": False},
        "checkpoint": {"every": None, "export_at_end": False},
        "logging": {"plot": False, "wandb": {"enabled": False}},
    }


def run_cpt(settings: dict, data_root: Path, workdir: Path) -> dict:
    from cpt.config import load_config
    from cpt.metrics import read_metrics
    from cpt.train import train

    warmup, steps = settings["warmup"], settings["steps"]
    L, B = settings["seq_len"], settings["global_batch"]
    run_dir = workdir / "cpt-run"
    data = prepare_shape_data(data_root, settings)
    cfg = load_config(base=cpt_config(settings, data, run_dir), overrides=settings.get("cpt_overrides") or [])
    t0, started = time.perf_counter(), time.time()
    train(cfg, echo=lambda *a, **k: print(*a, **k, file=sys.stderr))
    total_s = time.perf_counter() - t0
    records = {r["step"]: r for r in read_metrics(run_dir) if "perf/tokens_per_s" in r}
    first = records[min(records)]  # the first log record (step 1 when log_every is 1), written after its loss is read
    end = records[warmup + steps]
    if warmup:
        seconds = end["time"] - records[warmup]["time"]
    else:  # no warm-up: from the first step's start is not logged; use cpt's own window
        seconds = steps * B * L / end["perf/tokens_per_s"]

    # the model's shape for FLOPs (the same numbers the loop used)
    import torch
    from transformers import AutoModelForCausalLM

    from cpt.model import config_from_arch

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config_from_arch(settings["arch"]))
    out = _common_result(settings, model, steps * B * L / seconds)
    out.update({
        "framework": "cpt", "measured_seconds": seconds, "step_time_s": seconds / steps,
        "final_loss": end.get("train/loss"), "train_s": total_s,
        "cpt_first_step_s": first["time"] - started, "cpt_first_logged_step": first["step"],
        "cpt_logged_tokens_per_s": end.get("perf/tokens_per_s"), "cpt_logged_mfu": end.get("perf/mfu"),
        "cpt_logged_peak_mem_gb": end.get("perf/peak_mem_gb"),
    })
    if settings.get("cpt_profile"):
        out["cpt_profile"] = copy_profile(run_dir, Path(settings["cpt_profile"]), settings["shape"])
    return out


def copy_profile(run_dir: Path, dest: Path, shape: str) -> list[str]:
    """The profiled step's files (rank 0: the ops table and the gzipped trace) copied to ``dest`` as <shape>-cpt.*."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for src in sorted((run_dir / "profile").glob("steps_*/rank0.*")):
        target = dest / f"{shape}-cpt.{src.name.split('.', 1)[1]}"
        shutil.copyfile(src, target)
        copied.append(str(target))
    return copied


def worker_main(args: argparse.Namespace) -> int:
    spec = json.loads(Path(args.worker_spec).read_text())
    settings, workdir = spec["settings"], Path(spec["workdir"])
    if settings["threads"]:
        import torch

        torch.set_num_threads(settings["threads"])
    fn = run_trainer if args.worker == "trainer" else run_cpt
    from cpt.config import ConfigError

    try:
        result = fn(settings, Path(spec["data_root"]), workdir)
    except ConfigError as e:  # (a bad --cpt-set: one line, not the worker's traceback)
        print(f"bench_throughput.py: cpt's run config (--cpt-set): {e}", file=sys.stderr)
        return 2
    result.update({"shape": settings["shape"], "framework": args.worker, "versions": versions()})
    Path(spec["result"]).write_text(json.dumps(result, indent=2))
    return 0


# ------------------------------------------------------------------------------------------ driver


def versions() -> dict:
    """Versions of the packages that matter here (from the installed metadata: nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "accelerate", "triton", "liger-kernel", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    if "torch" in sys.modules:
        out["cuda"] = sys.modules["torch"].version.cuda
    return out


def device_description() -> str:
    import torch

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs)"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_worker(framework: str, settings: dict, data_root: Path, shape_dir: Path, verbose: bool) -> dict:
    wdir = shape_dir / framework
    wdir.mkdir(parents=True, exist_ok=True)
    spec = {"settings": settings, "data_root": str(data_root), "workdir": str(wdir), "result": str(wdir / "result.json")}
    (wdir / "spec.json").write_text(json.dumps(spec, indent=2))
    log = wdir / "log.txt"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", framework, "--worker-spec", str(wdir / "spec.json")]
    env = {**os.environ, **WORKER_ENV}
    if settings["threads"]:
        env["OMP_NUM_THREADS"] = str(settings["threads"])
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=None if verbose else f, stderr=subprocess.STDOUT if not verbose else None)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not (wdir / "result.json").exists():
        tail = "" if verbose else "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        print(f"[{settings['shape']}/{framework}] FAILED (exit {proc.returncode}); log {log}\n{tail}", file=sys.stderr)
        return {"shape": settings["shape"], "framework": framework, "error": f"exit {proc.returncode}", "log": str(log)}
    result = json.loads((wdir / "result.json").read_text())
    result["process_wall_s"] = wall
    return result


def format_table(results: list[dict], ratios: dict) -> str:
    head = f"{'shape':<14} {'framework':<9} {'tokens/s':>12} {'MFU':>7} {'peak mem (GB)':>14} {'cpt/Trainer':>12}"
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['shape']:<14} {r['framework']:<9} {'FAILED: ' + r['error']:>12}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        ratio = f"{ratios[r['shape']]:.2f}x" if r["framework"] == "cpt" and r["shape"] in ratios else ""
        lines.append(f"{r['shape']:<14} {r['framework']:<9} {r['tokens_per_s']:>12,.0f} {mfu:>7} {r['peak_mem_gb']:>14.2f} {ratio:>12}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=None, help=f"comma-separated, from {sorted(SHAPES)} (default: llama-1b,smollm2-360m on CUDA, tiny on CPU)")
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="comma-separated subset of trainer,cpt (default: both)")
    p.add_argument("--seq-len", type=int, default=None, help="default: the shape's (2048; tiny 128)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per forward pass (default: llama-1b 4, smollm2-360m 8, tiny 4)")
    p.add_argument("--global-batch", type=int, default=None, help="sequences per optimizer step (default: 32; tiny 8)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default: 10 on CUDA, 4 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed optimizer steps first (default: 5 on CUDA, 2 on CPU)")
    p.add_argument("--precision", choices=["bf16", "fp32", "fp16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2", "flash_attention_3"])
    p.add_argument("--gradient-checkpointing", action="store_true", help="for both frameworks")
    p.add_argument("--cpt-compile", dest="cpt_compile", action="store_true", default=None, help="model.compile for cpt (default on CUDA)")
    p.add_argument("--no-cpt-compile", dest="cpt_compile", action="store_false")
    p.add_argument("--cpt-liger", action="store_true", help="model.liger_kernel for cpt: Liger's layer kernels, the loss stays cpt's (needs liger-kernel and CUDA)")
    p.add_argument("--cpt-chunked-loss", choices=["auto", "true", "false"], default="auto",
                   help="train.chunked_loss for cpt (default auto: lm_head + loss over chunks of positions, no full logits)")
    p.add_argument("--cpt-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of cpt's run config (repeatable), e.g. --cpt-set train.loss_chunk_tokens=4096")
    p.add_argument("--cpt-profile", metavar="DIR", default=None,
                   help="after the timed steps, one more cpt step under torch.profiler (train.profile); its ops table "
                        "and trace are copied to DIR")
    p.add_argument("--trainer-compile", action="store_true", help="TrainingArguments.torch_compile for the Trainer (default off)")
    p.add_argument("--peak-flops", type=float, default=None, help="device peak bf16 FLOP/s for MFU (default: from the device name)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads in the workers (default: 1 on CPU, where the tiny shape is faster single-threaded; "
                        "untouched on CUDA; 0: torch's default)")
    p.add_argument("--workdir", default=None, help="where data, runs and logs go (default: a temporary folder, removed)")
    p.add_argument("--json", default=None, metavar="OUT", help="write settings, versions and results as JSON")
    p.add_argument("--verbose", action="store_true", help="stream the workers' output instead of logging it to files")
    p.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    p.add_argument("--worker-spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    import torch

    cuda = torch.cuda.is_available()
    shapes = [s.strip() for s in (args.shapes or ("llama-1b,smollm2-360m" if cuda else "tiny")).split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"--shapes: unknown {unknown}; choose from {sorted(SHAPES)}")
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    if not frameworks or any(f not in FRAMEWORKS for f in frameworks):
        raise SystemExit(f"--frameworks: choose from {FRAMEWORKS}")
    args.steps = args.steps if args.steps is not None else (10 if cuda else 4)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    if args.steps < 1 or args.warmup < 1:
        raise SystemExit("--steps and --warmup must be at least 1")

    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="cpt-bench-")
        workdir = Path(tmp.name)
    run_id = time.strftime("%Y%m%d-%H%M%S")
    device = device_description()
    print(f"device: {device}\nversions: {versions()}", flush=True)

    results, all_settings = [], {}
    try:
        for shape in shapes:
            settings = resolve_settings(args, shape, cuda)
            all_settings[shape] = settings
            shape_dir = workdir / f"{run_id}-{shape}"
            for fw in frameworks:
                print(f"[{shape}] {fw}: {settings['warmup']} warm-up + {settings['steps']} timed steps of "
                      f"{settings['global_batch']} x {settings['seq_len']} tokens (micro batch {settings['micro_batch']}, "
                      f"{settings['precision']}) ...", flush=True)
                r = run_worker(fw, settings, workdir, shape_dir, args.verbose)
                if "error" not in r:
                    print(f"[{shape}] {fw}: {r['tokens_per_s']:,.0f} tokens/s, step {r['step_time_s']:.3f} s, "
                          f"peak {r['peak_mem_gb']:.2f} GB, loss {r.get('final_loss')}", flush=True)
                results.append(r)
    finally:
        if tmp is not None:
            tmp.cleanup()

    ratios = {}
    for shape in shapes:
        by = {r["framework"]: r for r in results if r["shape"] == shape and "error" not in r}
        if "trainer" in by and "cpt" in by:
            ratios[shape] = by["cpt"]["tokens_per_s"] / by["trainer"]["tokens_per_s"]
    print()
    print(format_table(results, ratios))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "device": device, "versions": versions(), "settings": all_settings,
            "results": results, "ratio_cpt_over_trainer": ratios,
        }, indent=2))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
