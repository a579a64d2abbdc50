"""The training loop: one function, read top to bottom.

    config -> accelerator -> tokenizer/model (+ vocab, freezing, LoRA) -> data (mixer) -> held-out sets
    -> LR plan -> optimizer -> accelerate.prepare -> resume/init -> [eval at step 0] ->
    for each step: stage switch? -> set LR -> micro-batches (accumulate) -> clip -> step (skip if non-finite or a spike)
                   -> EMA -> Reptile meta-update -> log -> eval (dense after stage switches) -> lm-eval -> checkpoint/export -> preemption?
    -> final export, lm-eval, summary table, plots

Everything the loop composes lives in its own module (see docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from cpt.checkpoint import (TRAINER_STATE, CheckpointManager, find_resume_checkpoint, list_checkpoints, resolve_checkpoint,
                            wait_for_writers)
from cpt.config import RunConfig, config_to_dict, format_mixes, save_config, trajectory_changes
from cpt.distributed import Backend, any_rank, backend


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
    benchmarks: list[dict] = field(default_factory=list)  # BenchmarkTracker.summary(): tagged lm-eval tasks


# ------------------------------------------------------------------------------------------ the loop


def train(cfg: RunConfig, *, resume: bool | None = None, allow_config_change: bool = False, echo=print) -> TrainResult:
    """Train under the run directory's lock (held by the main process; see cpt/runlock.py). A run that fails
    before writing anything leaves no run directory behind (the lock's own folder is removed again)."""
    from cpt.runlock import RunLock, RunLockError

    run_dir = Path(cfg.run.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"run.output_dir {run_dir} is an existing file, not a directory: choose another --output-dir")
    created = not run_dir.exists()
    lock = RunLock(run_dir, force=cfg.run.force_lock)
    if int(os.environ.get("RANK", "0")) == 0:
        try:
            lock.acquire()
        except RunLockError as e:
            raise TrainingError(str(e)) from None
    try:
        with contextlib.ExitStack() as cleanup:  # closed on every exit path: e.g. the batch prefetch thread
            return _train(cfg, resume=resume, allow_config_change=allow_config_change, echo=echo, cleanup=cleanup)
    finally:
        wait_for_writers()  # a background checkpoint write still running when an error ends the run
        lock.release()
        if created and lock_only(run_dir):
            run_dir.rmdir()


def lock_only(run_dir: Path) -> bool:
    """True when the run directory exists and is empty (the lock, released, was all this run wrote)."""
    try:
        return run_dir.is_dir() and not any(run_dir.iterdir())
    except OSError:
        return False


def _train(cfg: RunConfig, *, resume: bool | None, allow_config_change: bool, echo,
           cleanup: contextlib.ExitStack) -> TrainResult:
    from accelerate.utils import set_seed

    from cpt.adapters import trainable_metrics
    from cpt.console import eval_line, preempted_line, step_line
    from cpt.data.loader import CPTDataLoader, sample_heldout
    from cpt.evaluate import HeldoutEvaluator, HeldoutSet, format_summary_table
    from cpt import lm_loss
    from cpt.lm_loss import model_inputs, use_chunked_loss
    from cpt.metrics import (ComputeAccount, MetricsLogger, SourceLoss, Throughput, TrainClock, format_compute,
                             model_flops_per_token, peak_flops_for, peak_memory_gb)
    from cpt.model import build_model, export_hf, load_tokenizer, model_shape, prepare_model
    from cpt.data.prefetch import Prefetcher
    from cpt.optim import build_optimizer, set_lr
    from cpt.schedules import plan_for_run
    from cpt.update_guard import UpdateGuard

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
    resume_ckpt = find_resume_checkpoint(run_dir, acc, say) if resume else None  # or from scratch, saying so
    init_ckpt, init_hf = _resolve_init(cfg.train.init_from) if resume_ckpt is None else (None, None)
    _preflight(cfg, run_dir, resume_ckpt, init_ckpt, allow_config_change)  # one clear error before anything loads
    if resume_ckpt is None and acc.is_main_process:
        _check_fresh_run_dir(run_dir, resume)  # (find_resume_checkpoint said when --resume finds nothing to resume)
    acc.wait_for_everyone()
    for line in format_mixes(cfg.stages):
        say(line)

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
    heldout = []
    for h in cfg.data.heldout:
        sample = sample_heldout(h, tokenizer, L, h.max_tokens or cfg.eval.tokens_per_set, seed=cfg.eval.sample_seed,
                                verify=acc.is_main_process and cfg.data.verify_checksums, check_sizes=acc.is_main_process)
        heldout.append(HeldoutSet(h.name, h.tag, sample.tokens, sample.docs, sample.total_docs, sample.total_tokens))
        say(f"held-out set {h.name} ({h.tag}): evaluating {sample.describe()}")
    eos_id = tokenizer.eos_token_id if cfg.data.document_masking else None  # documents attend only to themselves
    evaluator = HeldoutEvaluator(heldout, cfg.eval, acc, eos_id)
    bench = _benchmarks(cfg, acc)  # lm-eval tasks (eval.lm_eval), step-0 scores and forgetting; None without tasks

    # --- LR plan and optimizer
    plan = plan_for_run(cfg)
    optimizer = build_optimizer(model, cfg.optim, acc.device.type)
    if new_token_ids and cfg.model.vocab is not None and cfg.model.vocab.new_rows_lr_multiplier:
        from cpt.vocab import scale_new_rows_updates

        scale_new_rows_updates(model, optimizer, new_token_ids, cfg.model.vocab.new_rows_lr_multiplier)
    if not cfg.model.liger_kernel:  # loss over chunks of positions, no full logits, where supported
        use_chunked_loss(model, cfg.train.chunked_loss, cfg.train.loss_chunk_tokens, acc, say)
    if cfg.model.compile:
        model = torch.compile(model)
    model, optimizer = acc.prepare(model, optimizer)

    # --- resume / init
    from cpt import consolidate  # resume from another backend or number of processes

    ckpts = CheckpointManager(run_dir, cfg.checkpoint.keep, acc, cfg.checkpoint.async_save, cfg.checkpoint.max_failed_saves,
                              portable=consolidate)
    step, tokens = 0, 0
    reptile = None  # Reptile meta-updates (train.reptile), set up below once the start weights are in place
    spikes = _build_spike_guard(cfg, acc)  # loss-spike guard (train.skip_spikes)
    # applies or skips each update (non-finite loss/gradient, spikes); decides on the device where it can
    guard = UpdateGuard(acc, optimizer, cfg.train.max_nonfinite_in_a_row, spikes, say)
    feed = None  # the prefetching reader of `data`, started once the data position is known

    def save_checkpoint():
        guard.sync(step)
        state = {"step": step, "tokens": tokens, "nonfinite_total": guard.nonfinite_total,
                 "data": feed.state_dict() if feed is not None else data.state_dict(),
                 "data_fingerprint": data.fingerprint(), "evaluator": evaluator.state_dict(), "compute": account.state_dict(),
                 "lm_eval": bench.state_dict() if bench else None,
                 "spikes": spikes.state_dict() if spikes else None, "anneal_from": anneal_from}
        tensors = {**(ema.state_dict() if ema else {}), **(reptile.state_dict() if reptile else {})}
        ckpts.save(step, state, _yaml(cfg), tensors or None)

    start_ckpt = resume_ckpt or (init_ckpt if cfg.train.anneal_steps else None)
    extra, anneal_from = {}, None  # anneal_from: the trunk step an anneal branch started at
    if start_ckpt is not None:
        state, extra = ckpts.load(start_ckpt)
        if state.get("data_fingerprint") != data.fingerprint():
            raise TrainingError(
                f"the data of {start_ckpt} (fingerprint {state.get('data_fingerprint')}) differs from this config's "
                f"data ({data.fingerprint()}): resuming would not continue the same stream. Use train.init_from to start a new stage."
            )
        step, tokens = state["step"], state["tokens"]
        guard.load_state_dict({"nonfinite_total": state.get("nonfinite_total", 0)})
        anneal_from = state.get("anneal_from") if resume_ckpt else None  # a resumed branch continues its anneal
        data.load_state_dict(state["data"])
        evaluator.load_state_dict(state["evaluator"])
        if bench is not None:
            bench.load_state_dict(state.get("lm_eval") or {})
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
        anneal_from = step if anneal_from is None else anneal_from
        plan = plan_for_run(cfg, anneal_from)
        say(f"anneal branch: steps {anneal_from}..{anneal_from + cfg.train.anneal_steps} from lr {plan.lr(anneal_from):.3g} "
            "to the schedule's min_lr")
    total_steps = anneal_from + cfg.train.anneal_steps if cfg.train.anneal_steps else plan.total_steps

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
    stop = PreemptionFlag(_preemption_check_every(cfg, acc))
    stop.install()
    # restored only when the whole run has ended: a late preemption signal (SLURM may deliver more than one) must not
    # kill a rank during the final checkpoint wait, exports and barriers, which would leave the other ranks waiting
    cleanup.callback(stop.uninstall)

    logger.log({"train/tokens": tokens, **param_counts}, step=step)

    # --- step-0 evaluation: the base model's losses anchor forgetting and adaptation
    if step == 0 and cfg.eval.at_start and heldout:
        metrics = {**evaluator.evaluate(model, 0), **_ema_eval(cfg, ema, acc, model, heldout, eos_id)}
        logger.log({"train/tokens": 0, "stage": 0, "train/lr": plan.lr(0), **metrics}, step=0)
        _show(None, say, eval_line(0, metrics))
    if bench is not None and bench.needs_start_evaluation():  # the base model's benchmark scores
        metrics = bench.evaluate(model, tokenizer, step)
        logger.log({"train/tokens": tokens, **metrics}, step=step)
        _show(None, say, eval_line(step, metrics))

    bar = _progress_bar(cfg, acc, step, total_steps)
    model.train()
    export_dir, stopped = None, None
    loss_sum, loss_count = torch.zeros((), device=acc.device), torch.zeros((), device=acc.device)
    feed = cleanup.enter_context(Prefetcher(data, step, enabled=cfg.data.prefetch))  # batch step+1 is read while step runs
    clock = TrainClock(meter)  # training time between host syncs (evaluation and checkpoints excluded)
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

        # forward/backward over this rank's micro-batches of the global batch (no host sync in here)
        batch = feed.batch(step)
        rows = batch["input_ids"].to(acc.device, non_blocking=True)
        sources = batch["source"].to(acc.device, non_blocking=True)
        step_loss = torch.zeros((), device=acc.device)
        for micro, micro_sources in zip(rows.split(mbs), sources.split(mbs)):
            with acc.accumulate(model):
                if by_source is None:  # fused loss (Liger): the model computes it from the labels
                    loss = model(**model_inputs(micro, eos_id), labels=micro).loss
                else:
                    loss, row_losses = lm_loss.causal_lm_loss(model, micro, eos_id)
                    by_source.add(micro_sources, row_losses)
                if backend(acc) is Backend.DEEPSPEED and not torch.isfinite(loss):  # no host sync otherwise
                    loss = _zero_grad_loss(model)  # DeepSpeed steps inside backward: feed it zero gradients
                acc.backward(loss)
                step_loss += loss.detach() / accum
        grad_norm = _clip(acc, model, cfg.optim.grad_clip)  # a device tensor
        # the update, unless the loss or gradient is non-finite on any rank (or a spike): see cpt/update_guard.py
        outcome = guard.step(step_loss, grad_norm, step)
        if ema is not None:
            ema.update(acc.unwrap_model(model), applied=outcome.applied)
        optimizer.zero_grad(set_to_none=True)
        if by_source is not None:
            by_source.end_step(keep=outcome.finite)  # a spike's loss is logged, a non-finite one is not
        step += 1
        if reptile is not None:
            reptile.step(acc.unwrap_model(model), step)  # every k steps: weights <- anchor + eps x (weights - anchor)
        tokens += B * L
        clock.add(B * L)
        if outcome.finite is True:  # (host path) train/loss averages the finite steps
            loss_sum += step_loss
            loss_count += 1
        elif outcome.finite is not False:  # (device path) a 0-d bool tensor
            loss_sum += torch.where(outcome.finite, step_loss, 0.0)
            loss_count += outcome.finite

        # log: the host reads the step's numbers here (and only here, on the device-skip path)
        if step % cfg.train.log_every == 0 or step == total_steps:
            mean_loss = (acc.reduce(loss_sum, reduction="mean") / loss_count.clamp(min=1)).item()
            clock.lap()
            guard.sync(step)
            tps = meter.tokens_per_s
            record = {
                "train/tokens": tokens, "train/loss": mean_loss, "train/lr": lr, "train/grad_norm": float(grad_norm),
                "stage": stage, "train/nonfinite_skipped": guard.nonfinite_total,
                "train/spikes_skipped": spikes.skipped if spikes else 0,
                "perf/peak_mem_gb": peak_memory_gb(),
                **meter.metrics(flops_per_token, peak), **account.metrics(tokens, flops_per_token), **feed.metrics(),
                **(by_source.metrics(acc) if by_source else {}),
            }
            logger.log(record, step=step)
            if bar is None:  # batch jobs: a plain line (a bar is only drawn on a terminal)
                say(step_line(step, total_steps, record))
            loss_sum.zero_()
            loss_count.zero_()
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
        if bar is not None:
            bar.update(1)

        if guard.too_many_in_a_row():
            feed.close()
            save_checkpoint()
            ckpts.wait()
            raise TrainingError(
                f"{guard.in_a_row} non-finite steps in a row at step {step}: stopping. The last good weights are in "
                f"{run_dir / 'checkpoints'} (skipped updates never touched them). Lower the LR or check the data."
            )

        # evaluate: every N steps, densely after each stage switch (the stability gap), and at the end
        evaluate_now = heldout and (evaluator.should_evaluate(step, plan.starts) or step == total_steps)
        lm_eval_now = bench is not None and bench.should_evaluate(step, plan.starts) and step < total_steps
        preempted = stop.requested(acc, step)
        save_now = (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or preempted
        export_now = cfg.checkpoint.export_every and step % cfg.checkpoint.export_every == 0 and step < total_steps
        if evaluate_now or lm_eval_now or save_now or export_now:
            clock.lap(sync_device=True)  # the training steps queued so far count as training time, what follows not
        if evaluate_now:
            metrics = {**evaluator.evaluate(model, step), **_ema_eval(cfg, ema, acc, model, heldout, eos_id)}
            logger.log({"train/tokens": tokens, **metrics}, step=step)
            _show(bar, say, eval_line(step, metrics))
        if lm_eval_now:
            metrics = bench.evaluate(model, tokenizer, step)
            logger.log({"train/tokens": tokens, **metrics}, step=step)
            _show(bar, say, eval_line(step, metrics))

        # checkpoint and export
        if save_now:
            save_checkpoint()
        if export_now:
            path = export_hf(model, tokenizer, run_dir / "exports" / f"step_{step:08d}", acc)
            logger.log_artifact(path, f"{cfg.run.name}-step{step}")  # when logging.wandb.log_exports_as_artifacts
        if evaluate_now or lm_eval_now or save_now or export_now:
            clock.restart()
        if preempted:
            stopped = "preempted"
            say(f"preemption signal received: checkpoint saved at step {step}; exiting cleanly")
            break

    feed.close()
    if bar is not None:
        bar.close()

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
        if bench is not None and cfg.eval.lm_eval.at_end:
            metrics = bench.evaluate(model, tokenizer, step)
            logger.log({"train/tokens": tokens, **metrics}, step=step)
            _show(None, say, eval_line(step, metrics))
    ckpts.wait()  # the last (background) checkpoint write is on disk before the run reports its end
    summary = evaluator.summary()
    compute = account.metrics(tokens, flops_per_token)
    logger.log({"train/tokens": tokens, **compute}, step=step)
    logger.close()
    if acc.is_main_process:
        if stopped:
            say(preempted_line(step, total_steps, run_dir))
        if summary:
            say(format_summary_table(summary))
        if bench is not None and bench.summary():
            from eval_harness.benchmarks import format_benchmark_table

            say("benchmarks (lm-eval; ± standard error):\n" + format_benchmark_table(bench.summary()))
        say(format_compute(compute, acc.num_processes))
        if cfg.logging.plot:
            from cpt.report import write_report

            report = write_report([run_dir], run_dir / "report")
            say(f"report: {report}")
        say(f"run directory: {run_dir}")
    acc.wait_for_everyone()
    acc.end_training()
    return TrainResult(run_dir, step, tokens, export_dir, summary, stopped, benchmarks=bench.summary() if bench else [])


# ------------------------------------------------------------------------------------------ helpers


def build_accelerator(cfg: RunConfig, grad_accum: int):
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs

    from cpt.accelerator import ACCELERATE, configure_deepspeed, precision_conflict

    kwargs = []
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        kwargs.append(InitProcessGroupKwargs(backend="gloo"))  # CPU multi-process (tests, laptops)
    acc = Accelerator(
        mixed_precision=ACCELERATE[cfg.train.precision],
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=grad_accum, sync_with_dataloader=False),
        kwargs_handlers=kwargs,
    )
    if acc.num_processes > 1 and backend(acc) is Backend.SINGLE:
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


def _clip(acc, model, max_norm: float | None) -> torch.Tensor:
    """The global gradient norm before clipping, as a 0-d tensor on the device (clipped to ``max_norm`` if set)."""
    if max_norm is None:
        total = torch.zeros((), device=acc.device)
        for p in model.parameters():
            if p.grad is not None:
                total += p.grad.detach().float().pow(2).sum()
        if acc.num_processes > 1 and backend(acc) is Backend.FSDP:
            total = acc.reduce(total, reduction="sum")
        return total.sqrt()
    norm = acc.clip_grad_norm_(model.parameters(), max_norm)
    if norm is None:
        return torch.full((), float("nan"), device=acc.device)
    if hasattr(norm, "full_tensor"):  # FSDP2: a replicated DTensor; the plain tensor for the all-rank checks
        norm = norm.full_tensor()
    return torch.as_tensor(norm, device=acc.device, dtype=torch.float32).reshape(())


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
    from cpt.model import require_safetensors  # an HF directory must hold safetensors weights: one clear line

    p = Path(init_from)
    if (p / "config.json").is_file():
        require_safetensors(p, "train.init_from")
        return None, str(p)
    if (p / TRAINER_STATE).is_file() or (p / "checkpoints").is_dir():
        return resolve_checkpoint(p), None
    if (p / "export" / "config.json").is_file():
        require_safetensors(p / "export", "train.init_from")
        return None, str(p / "export")
    raise TrainingError(f"train.init_from: {init_from} is neither an HF model directory nor a cpt checkpoint or run directory")


def _check_fresh_run_dir(run_dir: Path, resume: bool = False) -> None:
    """A fresh start must not mix with an earlier run's checkpoints. Partial saves (.tmp-*) do not count: `--resume`
    with nothing complete to resume from (a first start, or a job killed during its first save) starts fresh."""
    if list_checkpoints(run_dir):
        if resume:
            raise TrainingError(f"{run_dir / 'checkpoints'} holds checkpoints but none is usable (see the warnings above): "
                                "move them away to start over, or choose another run.output_dir")
        raise TrainingError(
            f"{run_dir} already holds checkpoints: pass --resume to continue that run, or choose another run.output_dir"
        )


def _preflight(cfg: RunConfig, run_dir: Path, resume_ckpt: Path | None, init_ckpt: Path | None,
               allow_config_change: bool) -> None:
    """Checks that need neither the model nor the data, run before anything is loaded or written."""
    from cpt.model import check_attn_implementation
    from cpt.schedules import plan_for_run

    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"run.output_dir {run_dir} is an existing file, not a directory: choose another --output-dir")
    check_attn_implementation(cfg.model)
    if resume_ckpt is not None and not allow_config_change and (resume_ckpt / "config.yaml").is_file():
        changed = trajectory_changes(yaml.safe_load((resume_ckpt / "config.yaml").read_text()) or {}, cfg)
        if changed:
            more = f"; and {len(changed) - 12} more" if len(changed) > 12 else ""
            raise TrainingError(
                f"--resume: this config differs from the one {resume_ckpt} was trained with in fields that change the "
                f"training trajectory: {'; '.join(changed[:12])}{more}. Restore them, start a new stage with train.init_from, or "
                "pass --allow-config-change to resume anyway"
            )
    if cfg.train.anneal_steps and resume_ckpt is None:
        step = json.loads((init_ckpt / TRAINER_STATE).read_text())["step"] if init_ckpt is not None else 0
        try:
            plan_for_run(cfg, anneal_from=step)
        except ValueError as e:
            raise TrainingError(f"--anneal from {cfg.train.init_from} (step {step}): {e}") from None


def _device_name(acc) -> str:
    if acc.device.type == "cuda":
        return torch.cuda.get_device_name(acc.device)
    return acc.device.type


def _build_spike_guard(cfg: RunConfig, acc):
    if cfg.train.skip_spikes is None:
        return None
    from cpt.spikes import SpikeGuard

    if backend(acc) is Backend.DEEPSPEED:
        raise TrainingError("train.skip_spikes is not supported under DeepSpeed: its engine applies the update inside the "
                            "last backward pass, before the step's loss is known; use DDP or FSDP")
    return SpikeGuard(**cfg.train.skip_spikes.model_dump())


def _build_reptile(cfg: RunConfig, acc, model, extra: dict):
    from cpt.reptile import Reptile

    if backend(acc) is Backend.DEEPSPEED:
        raise TrainingError("train.reptile is not supported under DeepSpeed: its fp32 master partitions would overwrite "
                            "the meta-update; use DDP (or one device)")
    if backend(acc) is Backend.FSDP:
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


def _benchmarks(cfg: RunConfig, acc):
    if not cfg.eval.lm_eval.tasks:
        return None
    from eval_harness.benchmarks import BenchmarkTracker

    return BenchmarkTracker.from_config(cfg, acc)


def _show(bar, say, line: str | None) -> None:
    """Print a line (above the progress bar when there is one)."""
    if line:
        (bar.write if bar is not None else say)(line)


def _progress_bar(cfg, acc, step, total):
    from cpt.console import use_progress_bar

    if not (use_progress_bar(cfg.train.progress_bar) and acc.is_main_process):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=step, desc=cfg.run.name, unit="step", dynamic_ncols=True)


def _preemption_check_every(cfg: RunConfig, acc) -> int:
    """Steps between the all-rank preemption checks: every step on one process or on CPU (no device to wait
    for), else ``train.preemption_check_every`` (each check is a collective plus a host read)."""
    if acc.num_processes == 1 or acc.device.type == "cpu":
        return 1
    return cfg.train.preemption_check_every


class PreemptionFlag:
    """SIGTERM / SIGUSR1 (cluster preemption) ask for a checkpoint and a clean exit at the end of a step.

    With several processes all ranks must stop at the same step, so the flag is combined over ranks, every
    ``check_every`` steps (a collective and a host read); one process reads its own flag every step for free."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, check_every: int = 1):
        self.flag = False
        self.check_every = max(1, int(check_every))
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

    def requested(self, acc, step: int = 0) -> bool:
        """True on every rank if any rank received a signal (so all ranks save together); with several
        processes only at steps that are multiples of ``check_every`` (the same steps on every rank)."""
        if acc.num_processes == 1:
            return self.flag
        if step % self.check_every:
            return False
        return any_rank(acc, self.flag)
