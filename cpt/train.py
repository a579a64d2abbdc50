"""The training loop: one function, read top to bottom.

    config -> accelerator -> tokenizer/model (+ vocab, freezing, LoRA) -> data (mixer) -> held-out sets
    -> LR plan -> optimizer -> accelerate.prepare -> resume/init -> [eval at step 0] ->
    for each step: stage switch? -> set LR -> micro-batches (accumulate) -> clip -> step (skip if non-finite or a spike)
                   -> EMA -> Reptile meta-update -> log -> eval (dense after stage switches) -> lm-eval -> checkpoint/export -> preemption?
    -> final export, lm-eval, summary table, plots

Everything the loop composes lives in its own module (see docs/architecture.md).
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from cpt.checkpoint import TRAINER_STATE, CheckpointManager, latest_valid_checkpoint, resolve_checkpoint
from cpt.config import RunConfig, config_to_dict, save_config


class TrainingError(RuntimeError):
    pass


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    export_dir: Path | None
    summary: list[dict] = field(default_factory=list)
    stopped_early: str | None = None  # "preempted" | None


# ------------------------------------------------------------------------------------------ the loop


def train(cfg: RunConfig, *, resume: bool | None = None, echo=print) -> TrainResult:
    from accelerate.utils import set_seed

    from cpt.adapters import trainable_metrics
    from cpt.data.loader import CPTDataLoader, load_heldout
    from cpt.evaluate import HeldoutEvaluator, HeldoutSet, format_summary_table
    from cpt.lm_loss import causal_lm_loss, model_inputs
    from cpt.metrics import (ComputeAccount, MetricsLogger, SourceLoss, Throughput, format_compute, model_flops_per_token,
                             peak_flops_for, peak_memory_gb)
    from cpt.model import build_model, export_hf, load_tokenizer, model_shape, prepare_model
    from cpt.optim import build_optimizer, set_lr
    from cpt.schedules import LRPlan

    run_dir = Path(cfg.run.output_dir)
    B, L, mbs = cfg.train.global_batch_size, cfg.data.seq_len, cfg.train.micro_batch_size
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if B % (world * mbs):
        raise TrainingError(f"train.global_batch_size ({B}) must be divisible by world size ({world}) x train.micro_batch_size ({mbs})")
    accum = B // (world * mbs)
    acc = build_accelerator(cfg, accum)
    account = ComputeAccount(acc.num_processes)  # FLOPs, wall and device hours, carried across resumes
    say = echo if acc.is_main_process else (lambda *a, **k: None)
    set_seed(cfg.run.seed)

    # --- where this run starts from: fresh, resumed, a new stage from a checkpoint, or an anneal branch
    resume = cfg.checkpoint.resume if resume is None else resume
    resume_ckpt = latest_valid_checkpoint(run_dir) if resume else None
    init_ckpt, init_hf = _resolve_init(cfg.train.init_from) if resume_ckpt is None else (None, None)
    if resume_ckpt is None and acc.is_main_process:
        _check_fresh_run_dir(run_dir)
    acc.wait_for_everyone()

    # --- model and tokenizer
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(cfg.model, tokenizer, weights_from=init_hf)
    model, tokenizer, new_token_ids = prepare_model(cfg.model, model, tokenizer, log_fn=say)
    shape = model_shape(model)
    context = getattr(model.config, "max_position_embeddings", None)
    if context and L > context:
        say(f"warning: data.seq_len {L} is longer than the model's context (max_position_embeddings {context}); "
            "for long-context CPT raise it and the RoPE base with model.config_overrides")
    param_counts = trainable_metrics(model)  # params/trainable, params/total, params/trainable_fraction
    ema = None
    if cfg.train.ema_decay:
        from cpt.averaging import EMA

        ema = EMA(model, cfg.train.ema_decay)

    # --- data: the exact-proportion mixer over packed streams, and the held-out sets
    data = CPTDataLoader(cfg.data, cfg.stages, tokenizer, B, cfg.run.seed, rank=acc.process_index, world_size=acc.num_processes)
    heldout = [
        HeldoutSet(h.name, h.tag, load_heldout(h, tokenizer, L, h.max_tokens or cfg.eval.tokens_per_set))
        for h in cfg.data.heldout
    ]
    eos_id = tokenizer.eos_token_id if cfg.data.document_masking else None  # documents attend only to themselves
    evaluator = HeldoutEvaluator(heldout, cfg.eval, acc, eos_id)

    # --- LR plan and optimizer
    plan = LRPlan([(s.steps, s.schedule) for s in cfg.stages])
    optimizer = build_optimizer(model, cfg.optim, acc.device.type)
    if new_token_ids and cfg.model.vocab is not None and cfg.model.vocab.new_rows_lr_multiplier:
        from cpt.vocab import scale_new_rows_updates

        scale_new_rows_updates(model, optimizer, new_token_ids, cfg.model.vocab.new_rows_lr_multiplier)
    if cfg.model.compile:
        model = torch.compile(model)
    model, optimizer = acc.prepare(model, optimizer)

    # --- resume / init
    ckpts = CheckpointManager(run_dir, cfg.checkpoint.keep, acc)
    step, tokens, nonfinite_total = 0, 0, 0
    reptile = None  # Reptile meta-updates (train.reptile), set up below once the start weights are in place
    spikes = _build_spike_guard(cfg, acc)  # loss-spike guard (train.skip_spikes)

    def save_checkpoint():
        state = {"step": step, "tokens": tokens, "nonfinite_total": nonfinite_total, "data": data.state_dict(),
                 "data_fingerprint": data.fingerprint(), "evaluator": evaluator.state_dict(), "compute": account.state_dict(),
                 "spikes": spikes.state_dict() if spikes else None}
        tensors = {**(ema.state_dict() if ema else {}), **(reptile.state_dict() if reptile else {})}
        ckpts.save(step, state, _yaml(cfg), tensors or None)

    start_ckpt = resume_ckpt or (init_ckpt if cfg.train.anneal_steps else None)
    extra = {}
    if start_ckpt is not None:
        state, extra = ckpts.load(start_ckpt)
        if state.get("data_fingerprint") != data.fingerprint():
            raise TrainingError(
                f"the data of {start_ckpt} (fingerprint {state.get('data_fingerprint')}) differs from this config's "
                f"data ({data.fingerprint()}): resuming would not continue the same stream. Use train.init_from to start a new stage."
            )
        step, tokens, nonfinite_total = state["step"], state["tokens"], state.get("nonfinite_total", 0)
        data.load_state_dict(state["data"])
        evaluator.load_state_dict(state["evaluator"])
        account.load_state_dict(state.get("compute", {}))
        if spikes is not None:
            spikes.load_state_dict(state.get("spikes") or {})
        if ema is not None and extra:
            ema.load_state_dict(extra)  # (its own keys; Reptile's are under "reptile.")
        say(f"{'resumed' if resume_ckpt else 'branching from'} {start_ckpt} at step {step} ({tokens:,} tokens)")
    elif init_ckpt is not None:  # a new stage from an earlier run's checkpoint: weights (+ optimizer), not data position
        ckpts.load(init_ckpt)
        if not cfg.train.init_optimizer:
            reset_optimizer_state(optimizer)
        say(f"initialised weights{' and optimizer' if cfg.train.init_optimizer else ''} from {init_ckpt}")
    if cfg.train.reptile:
        reptile = _build_reptile(cfg, acc, model, extra)
        say(f"reptile: every {cfg.train.reptile.every} steps, weights <- anchor + {cfg.train.reptile.epsilon:g} x (weights - anchor)")
    if cfg.train.anneal_steps:
        plan = plan.anneal_branch(step, cfg.train.anneal_steps, cfg.train.anneal_shape)
        say(f"anneal branch: steps {step}..{step + cfg.train.anneal_steps} from lr {plan.lr(step):.3g} to the schedule's min_lr")
    total_steps = step + cfg.train.anneal_steps if cfg.train.anneal_steps else plan.total_steps

    # --- logging, throughput accounting, preemption
    if acc.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
    logger = MetricsLogger(run_dir, cfg, acc, resume=resume_ckpt is not None)
    if resume_ckpt is not None:
        logger.truncate_after(step)  # a killed run may have logged steps past its last checkpoint
    flops_per_token = model_flops_per_token(shape["n_params"], shape["n_layers"], shape["hidden"], L)
    peak = cfg.train.peak_flops or peak_flops_for(_device_name(acc))
    meter = Throughput(num_devices=acc.num_processes)
    # train/loss/<source> from per-row losses; Liger's fused loss never materialises the logits it would need
    by_source = None if cfg.model.liger_kernel else SourceLoss(data.source_names, acc.device)
    stop = PreemptionFlag()
    stop.install()

    logger.log({"train/tokens": tokens, **param_counts}, step=step)

    # --- step-0 evaluation: the base model's losses anchor forgetting and adaptation
    if step == 0 and cfg.eval.at_start and heldout:
        metrics = {**evaluator.evaluate(model, 0), **_ema_eval(cfg, ema, acc, model, heldout, eos_id)}
        logger.log({"train/tokens": 0, "stage": 0, "train/lr": plan.lr(0), **metrics}, step=0)

    bar = _progress_bar(cfg, acc, step, total_steps)
    model.train()
    nonfinite_in_a_row, export_dir, stopped = 0, None, None
    loss_sum, loss_count = torch.zeros((), device=acc.device), 0
    while step < total_steps:
        # stage switch: shares change inside the data loader; optionally reset the optimizer state
        stage = plan.stage_index(step)
        if step > 0 and step in plan.starts and cfg.stages[stage].reset_optimizer and not cfg.train.anneal_steps:
            reset_optimizer_state(optimizer)
            say(f"stage {stage} ({cfg.stages[stage].name}): optimizer state reset")
        if spikes is not None and step > 0 and step in plan.starts:
            spikes.reset()  # a new stage is expected to move the loss
        lr = plan.lr(step)
        set_lr(optimizer, lr)

        # forward/backward over this rank's micro-batches of the global batch
        t0 = time.perf_counter()
        batch = data.batch(step)
        rows = batch["input_ids"].to(acc.device, non_blocking=True)
        sources = batch["source"].to(acc.device, non_blocking=True)
        step_loss = torch.zeros((), device=acc.device)
        for micro, micro_sources in zip(rows.split(mbs), sources.split(mbs)):
            with acc.accumulate(model):
                if by_source is None:  # fused loss (Liger): the model computes it from the labels
                    loss = model(**model_inputs(micro, eos_id), labels=micro).loss
                else:
                    loss, row_losses = causal_lm_loss(model, micro, eos_id)
                    by_source.add(micro_sources, row_losses)
                if acc.distributed_type.value == "DEEPSPEED" and not torch.isfinite(loss):  # no host sync otherwise
                    loss = _zero_grad_loss(model)  # DeepSpeed steps inside backward: feed it zero gradients
                acc.backward(loss)
                step_loss += loss.detach() / accum
        grad_norm = _clip(acc, model, cfg.optim.grad_clip)
        finite = math.isfinite(grad_norm) and _all_finite(acc, step_loss)
        spike = finite and spikes is not None and spikes.is_spike(acc.reduce(step_loss, reduction="mean").item(), grad_norm)
        if finite and not spike:
            optimizer.step()
            if ema is not None:
                ema.update(acc.unwrap_model(model))
            nonfinite_in_a_row = 0
        elif spike:
            say(f"step {step}: loss or gradient-norm spike (grad norm {grad_norm:.3g}), update skipped")
        else:
            nonfinite_in_a_row += 1
            nonfinite_total += 1
            say(f"step {step}: non-finite loss or gradient, update skipped ({nonfinite_in_a_row} in a row)")
        optimizer.zero_grad(set_to_none=True)
        if by_source is not None:
            by_source.end_step(keep=finite)
        step += 1
        if reptile is not None:
            reptile.step(acc.unwrap_model(model), step)  # every k steps: weights <- anchor + eps x (weights - anchor)
        tokens += B * L
        meter.update(B * L, time.perf_counter() - t0)
        if finite:
            loss_sum += step_loss
            loss_count += 1

        # log
        if step % cfg.train.log_every == 0 or step == total_steps:
            mean_loss = acc.reduce(loss_sum, reduction="mean").item() / max(loss_count, 1)
            tps = meter.tokens_per_s
            record = {
                "train/tokens": tokens, "train/loss": mean_loss, "train/lr": lr, "train/grad_norm": grad_norm,
                "stage": stage, "train/nonfinite_skipped": nonfinite_total, "train/spikes_skipped": spikes.skipped if spikes else 0,
                "perf/peak_mem_gb": peak_memory_gb(),
                **meter.metrics(flops_per_token, peak), **account.metrics(tokens, flops_per_token), **data.metrics(),
                **(by_source.metrics(acc) if by_source else {}),
            }
            logger.log(record, step=step)
            loss_sum.zero_()
            loss_count = 0
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
        if bar is not None:
            bar.update(1)

        if nonfinite_in_a_row >= cfg.train.max_nonfinite_in_a_row:
            save_checkpoint()
            raise TrainingError(
                f"{nonfinite_in_a_row} non-finite steps in a row at step {step}: stopping. The last good weights are in "
                f"{run_dir / 'checkpoints'} (skipped updates never touched them). Lower the LR or check the data."
            )

        # evaluate: every N steps, densely after each stage switch (the stability gap), and at the end
        if heldout and (evaluator.should_evaluate(step, plan.starts) or step == total_steps):
            logger.log({"train/tokens": tokens, **evaluator.evaluate(model, step), **_ema_eval(cfg, ema, acc, model, heldout, eos_id)}, step=step)
        if cfg.eval.lm_eval.tasks and cfg.eval.lm_eval.every and step % cfg.eval.lm_eval.every == 0 and step < total_steps:
            logger.log({"train/tokens": tokens, **_lm_eval(cfg, acc, model, tokenizer)}, step=step)

        # checkpoint and export
        preempted = stop.requested(acc)
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or preempted:
            save_checkpoint()
        if cfg.checkpoint.export_every and step % cfg.checkpoint.export_every == 0 and step < total_steps:
            path = export_hf(model, tokenizer, run_dir / "exports" / f"step_{step:08d}", acc)
            logger.log_artifact(path, f"{cfg.run.name}-step{step}")  # when logging.wandb.log_exports_as_artifacts
        if preempted:
            stopped = "preempted"
            say(f"preemption signal received: checkpoint saved at step {step}; exiting cleanly")
            break

    if bar is not None:
        bar.close()
    stop.uninstall()

    # --- the end: final checkpoint, HF export, lm-eval, summary, plots
    if stopped is None:
        if cfg.checkpoint.every:
            save_checkpoint()
        if cfg.checkpoint.export_at_end:
            export_dir = export_hf(model, tokenizer, run_dir / "export", acc)
            if ema is not None:
                with ema.swapped(acc.unwrap_model(model)):
                    export_hf(model, tokenizer, run_dir / "export-ema", acc)
            logger.log_artifact(export_dir, f"{cfg.run.name}-final")
        if cfg.eval.lm_eval.tasks and cfg.eval.lm_eval.at_end:
            logger.log({"train/tokens": tokens, **_lm_eval(cfg, acc, model, tokenizer)}, step=step)
    summary = evaluator.summary()
    compute = account.metrics(tokens, flops_per_token)
    logger.log({"train/tokens": tokens, **compute}, step=step)
    logger.close()
    if acc.is_main_process:
        if summary:
            say(format_summary_table(summary))
        say(format_compute(compute, acc.num_processes))
        if cfg.logging.plot:
            from cpt.report import write_report

            report = write_report([run_dir], run_dir / "report")
            say(f"report: {report}")
        say(f"run directory: {run_dir}")
    acc.wait_for_everyone()
    acc.end_training()
    return TrainResult(run_dir, step, tokens, export_dir, summary, stopped)


# ------------------------------------------------------------------------------------------ helpers


def build_accelerator(cfg: RunConfig, grad_accum: int):
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs

    from cpt.accelerator import ACCELERATE, configure_deepspeed, precision_conflict

    kwargs = []
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        kwargs.append(InitProcessGroupKwargs(backend="gloo"))  # CPU multi-process (tests, laptops)
    acc = Accelerator(
        mixed_precision=ACCELERATE[cfg.train.precision],
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=grad_accum, sync_with_dataloader=False),
        kwargs_handlers=kwargs,
    )
    if acc.num_processes > 1 and acc.distributed_type.value == "NO":
        # e.g. `accelerate launch --use_fsdp` or --multi_gpu without GPUs: N processes that never synchronise
        raise TrainingError(
            f"{acc.num_processes} processes were launched but accelerate set up no distributed backend "
            "(distributed_type NO): they would train unsynchronised copies. On CPU, launch DDP with ACCELERATE_USE_CPU=1 "
            "or use DeepSpeed; FSDP needs GPUs."
        )
    problem = precision_conflict(cfg.train.precision, acc)  # train.precision is the one source of precision
    if problem:
        raise TrainingError(problem)
    ds = getattr(acc.state, "deepspeed_plugin", None)
    if ds is not None:  # no prepared dataloader: tell DeepSpeed the batch geometry and clipping ourselves
        configure_deepspeed(ds.deepspeed_config, micro_batch=cfg.train.micro_batch_size, grad_accum=grad_accum,
                            global_batch=cfg.train.global_batch_size, grad_clip=cfg.optim.grad_clip)
    return acc


def _clip(acc, model, max_norm: float | None) -> float:
    if max_norm is None:
        total = torch.zeros((), device=acc.device)
        for p in model.parameters():
            if p.grad is not None:
                total += p.grad.detach().float().pow(2).sum()
        if acc.num_processes > 1 and acc.distributed_type.value in ("FSDP",):
            total = acc.reduce(total, reduction="sum")
        return float(total.sqrt())
    norm = acc.clip_grad_norm_(model.parameters(), max_norm)
    return float(norm) if norm is not None else float("nan")


def _all_finite(acc, value: torch.Tensor) -> bool:
    flag = torch.tensor([0.0 if torch.isfinite(value) else 1.0], device=acc.device)
    if acc.num_processes > 1:
        flag = acc.reduce(flag, reduction="sum")
    return float(flag.item()) == 0.0


def _zero_grad_loss(model) -> torch.Tensor:
    return sum((p * 0.0).sum() for p in model.parameters() if p.requires_grad)


def reset_optimizer_state(optimizer) -> None:
    """Forget AdamW moments (a stage may start with a fresh optimizer)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not hasattr(inner, "state") or inner.__class__.__module__.startswith("deepspeed"):
        raise TrainingError("resetting the optimizer state is not supported with DeepSpeed; start a new run from the HF export instead")
    inner.state.clear()


def _yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def _resolve_init(init_from: str | None) -> tuple[Path | None, str | None]:
    """(cpt checkpoint, HF export dir) for train.init_from; exactly one is set when init_from is."""
    if init_from is None:
        return None, None
    p = Path(init_from)
    if (p / "config.json").is_file():
        return None, str(p)
    if (p / TRAINER_STATE).is_file() or (p / "checkpoints").is_dir():
        return resolve_checkpoint(p), None
    if (p / "export" / "config.json").is_file():
        return None, str(p / "export")
    raise TrainingError(f"train.init_from: {init_from} is neither an HF model directory nor a cpt checkpoint or run directory")


def _check_fresh_run_dir(run_dir: Path) -> None:
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        raise TrainingError(
            f"{run_dir} already holds checkpoints: pass --resume to continue that run, or choose another run.output_dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)


def _device_name(acc) -> str:
    if acc.device.type == "cuda":
        return torch.cuda.get_device_name(acc.device)
    return acc.device.type


def _build_spike_guard(cfg: RunConfig, acc):
    if cfg.train.skip_spikes is None:
        return None
    from cpt.spikes import SpikeGuard

    if acc.distributed_type.value == "DEEPSPEED":
        raise TrainingError("train.skip_spikes is not supported under DeepSpeed: its engine applies the update inside the "
                            "last backward pass, before the step's loss is known; use DDP or FSDP")
    return SpikeGuard(**cfg.train.skip_spikes.model_dump())


def _build_reptile(cfg: RunConfig, acc, model, extra: dict):
    from cpt.reptile import Reptile

    if acc.distributed_type.value == "DEEPSPEED":
        raise TrainingError("train.reptile is not supported under DeepSpeed: its fp32 master partitions would overwrite "
                            "the meta-update; use DDP (or one device)")
    if acc.distributed_type.value == "FSDP":
        raise TrainingError("train.reptile is not supported under FSDP (sharded weights); use DDP (or one device)")
    r = Reptile(acc.unwrap_model(model), cfg.train.reptile.every, cfg.train.reptile.epsilon)
    if any(k.startswith("reptile.") for k in extra):  # resumed: the anchor of the interrupted run
        r.load_state_dict(extra)
    return r  # otherwise the anchor is the start weights


def _ema_eval(cfg: RunConfig, ema, acc, model, heldout, eos_id: int | None) -> dict[str, float]:
    """Held-out losses of the EMA weights (eval.ema), without touching the evaluator's step-0/worst bookkeeping."""
    if ema is None or not cfg.eval.ema:
        return {}
    from cpt.evaluate import heldout_loss

    with ema.swapped(acc.unwrap_model(model)):
        return {f"ema/eval/{h.name}/loss": heldout_loss(model, h.tokens, cfg.eval.batch_size, acc, eos_id) for h in heldout}


def _lm_eval(cfg: RunConfig, acc, model, tokenizer) -> dict[str, float]:
    from eval_harness.lm_eval_hook import run_lm_eval

    lm = cfg.eval.lm_eval
    return run_lm_eval(model, tokenizer, lm.tasks, limit=lm.limit, batch_size=lm.batch_size,
                       include_path=lm.include_path, accelerator=acc, max_length=cfg.data.seq_len)


def _progress_bar(cfg, acc, step, total):
    if not (cfg.train.progress_bar and acc.is_main_process):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=step, desc=cfg.run.name, unit="step", dynamic_ncols=True)


class PreemptionFlag:
    """SIGTERM / SIGUSR1 (cluster preemption) ask for a checkpoint and a clean exit at the end of the step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.flag = False
        self.previous: dict[int, Any] = {}

    def _handler(self, signum, frame):  # noqa: ARG002
        self.flag = True

    def install(self) -> None:
        for sig in self.SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass

    def uninstall(self) -> None:
        for sig, prev in self.previous.items():
            signal.signal(sig, prev)
        self.previous.clear()

    def requested(self, acc) -> bool:
        """True on every rank if any rank received a signal (so all ranks save together)."""
        if acc.num_processes == 1:
            return self.flag
        flag = torch.tensor([1.0 if self.flag else 0.0], device=acc.device)
        return float(acc.reduce(flag, reduction="sum").item()) > 0
