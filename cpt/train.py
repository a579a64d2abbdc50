"""The training loop: :func:`train` reads top to bottom (nanoGPT-style), :func:`train_step` does one optimizer step.

    setup:    accelerator -> where the run starts (fresh, --resume, train.init_from, anneal branch) -> tokenizer/model
              (+ vocab, freezing, LoRA) -> data (mixer) and held-out sets -> optimizer -> accelerate.prepare
              -> the state registry, restored from the start checkpoint -> LR plan -> logging -> [eval at step 0]
    the loop: stage switch? -> set LR -> train_step (micro-batches, backward, clip, apply or skip the update)
              -> Reptile meta-update -> EMA -> log -> eval (dense after stage switches) -> lm-eval
              -> checkpoint/export -> preemption?
    teardown: final checkpoint, HF export, lm-eval, summary table, plots

Everything the loop composes lives in its own module (docs/architecture.md). Every resumable component is in one
registry, ``components = {"train": TrainState, "data": ..., "evaluator": ..., ...}`` (cpt/state.py), which the
checkpoint manager saves and restores as a whole.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.utils import set_seed

from cpt import consolidate, fp8, lm_loss, optim, run_end
from cpt.adapters import refuse_unshardable, trainable_metrics
from cpt.base_dtype import cast_frozen_base
from cpt.checkpoint import TRAINER_STATE, CheckpointManager, on_failure_in_loop, wait_for_writers
from cpt.compile_cache import use_compile_cache
from cpt.compiling import compile_model
from cpt.config import RunConfig, config_to_dict, format_mixes, save_config
from cpt.console import RunOutput
from cpt.data.loader import CPTDataLoader
from cpt.data.prefetch import Prefetcher
from cpt.distributed import Backend, PreemptionFlag, accelerator_for, backend, unprotected_batch_job
from cpt.ema import EMA
from cpt.evaluate import HeldoutEvaluator, heldout_loss, heldout_sets
from cpt.export import export_hf
from cpt.fileio import fault_point
from cpt.lm_loss import LogWindow, SourceLoss, use_chunked_loss
from cpt.metrics import MetricsLogger
from cpt.model import build_model, check_attn_implementation, load_tokenizer, model_shape, prepare_model
from cpt.profiling import StepProfiler
from cpt.reptile import Reptile
from cpt.resume import SWITCHED_ON_IN_A_BRANCH, Start, anneal_branch_start, switched_on_in_branch, world_change
from cpt.runlock import RunLock, RunLockError
from cpt.samples import SampleGenerator
from cpt.schedules import plan_for_run
from cpt.spikes import SpikeGuard
from cpt.stage_base import start_for_run
from cpt.state import TrainState
from cpt.throughput import (ComputeAccount, Throughput, TrainClock, device_name, peak_flops_for,
                            peak_memory_gb, shape_flops_per_token)
from cpt.update_guard import Outcome, UpdateGuard
from cpt.vocab import scale_new_rows_updates


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


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's mean next-token loss of the step (0-d, on the device)
    grad_norm: torch.Tensor  # the global gradient norm before clipping (0-d, on the device)
    outcome: Outcome  # whether the update was applied (a 0-d bool tensor on the device-skip path: update_guard.py)
    router_aux: torch.Tensor | None = None  # a mixture of experts' mean load-balancing loss of the step (on the device)
    z_loss: torch.Tensor | None = None  # the mean z term of the step (train.z_loss; on the device)


# ------------------------------------------------------------------------------------------ the loop


def train(cfg: RunConfig, *, resume: bool | None = None, allow_config_change: bool = False, echo=print,
          last_run: bool = False) -> TrainResult:
    """Train under the run directory's lock (held by the main process; see cpt/runlock.py). A run that fails before
    writing anything leaves no run directory behind. On every exit path, errors included, the preemption signal
    handlers are restored, the prefetch thread, the metrics logger and the accelerator are closed (``cpt experiment``
    calls train() many times in one process). In the `cpt` program, after a stop on a signal or with ``last_run``
    (`cpt train`: the process ends with the run) SIGTERM and SIGUSR1 are ignored instead: nothing is left to save."""
    run_dir = Path(cfg.run.output_dir)
    with _locked(run_dir, cfg.run.force_lock) as lock, contextlib.ExitStack() as cleanup:
        # --- setup: the processes, where the run starts, model and data, optimizer, the start weights
        acc = cleanup.enter_context(accelerator_for(cfg))  # ends training (process group, trackers) on every exit path
        account = ComputeAccount(acc.num_processes)  # FLOPs, wall and device hours, carried across resumes
        say = echo if acc.is_main_process else (lambda *a, **k: None)
        set_seed(cfg.run.seed)
        # where the run starts (fresh, --resume, a new stage, an anneal branch; a LoRA stage on a full model: its base)
        start = start_for_run(cfg, cfg.checkpoint.resume if resume is None else resume, allow_config_change, acc, say)
        _preflight(cfg, start, acc, say)  # one clear error before anything loads
        for line in format_mixes(cfg.stages):
            say(line)
        B, L = cfg.train.global_batch_size, cfg.data.seq_len
        model, tokenizer, new_token_ids = _model_for_run(cfg, start.init_hf, say, start.resume or start.init)
        flops_per_token, param_counts = _flops_per_token(model, L), trainable_metrics(model)  # (before any sharding)
        loss_weights = lm_loss.loss_weights(model, cfg.train, say)  # terms added to the loss: MoE router balance, z-loss
        data = CPTDataLoader(cfg.data, cfg.stages, tokenizer, B, cfg.run.seed, rank=acc.process_index, world_size=acc.num_processes)
        heldout = heldout_sets(cfg, tokenizer, acc, say)
        eos_id = tokenizer.eos_token_id if cfg.data.document_masking else None  # documents attend only to themselves
        evaluator = HeldoutEvaluator(heldout, cfg.eval, acc, eos_id, SampleGenerator.for_run(cfg, tokenizer, acc, model.config))
        bench = _benchmarks(cfg, acc, say)  # lm-eval tasks (eval.lm_eval), step-0 scores and forgetting; None without tasks
        model, optimizer = fp8.prepare(acc, *_with_optimizer(cfg, model, new_token_ids, acc, say))  # (acc.prepare)
        ckpts = CheckpointManager(run_dir, cfg.checkpoint.keep, acc, cfg.checkpoint.async_save, cfg.checkpoint.max_failed_saves,
                                  portable=consolidate, lock=lock)  # (consolidate: resume on another backend or world size)
        if start.init is not None and not start.branch:  # a new stage: weights (+ optimizer), not the data position
            _init_weights(cfg, ckpts, start.init, optimizer, data, say)

        # --- the state registry: everything a resume restores (cpt/state.py), loaded from the start checkpoint if any
        spikes = SpikeGuard.for_run(cfg, acc)  # loss-spike guard (train.skip_spikes)
        # applies or skips each update (non-finite loss/gradient, spikes); decides on the device where it can
        guard = UpdateGuard(acc, optimizer, cfg.train.max_nonfinite_in_a_row, spikes, say)
        ema = EMA(acc.unwrap_model(model), cfg.train.ema_decay) if cfg.train.ema_decay else None  # from the start weights
        reptile = Reptile.for_run(cfg, acc, model, say)  # anchored at the start weights
        feed = cleanup.enter_context(Prefetcher(data, enabled=cfg.data.prefetch))  # reads batch step+1 while step runs
        state = TrainState()
        window = LogWindow(acc, data.source_names)  # train/loss, train/loss/<source> since the last log line
        components = {name: c for name, c in (  # (log_window second: its save is a collective)
            ("train", state), ("log_window", window), ("data", feed), ("evaluator", evaluator), ("compute", account),
            ("update_guard", guard), ("spikes", spikes), ("lm_eval", bench), ("ema", ema), ("reptile", reptile)) if c is not None}
        if start.state_from is not None:
            _restore(ckpts, start, components, model, say, B)
        plan, total_steps = _lr_plan(cfg, start, state, say)
        fp8.after_update(model)  # the float8 all-gather's scales of the start weights (FSDP2, train.fp8: tensorwise)

        # --- logging, throughput accounting, preemption (its handlers stay until the run has fully ended: a late
        # signal must not kill a rank during the final checkpoint wait and barriers, leaving the others waiting)
        logger = cleanup.enter_context(_metrics_logger(cfg, acc, resumed_at=start.metrics_resumed_at(state.step)))
        peak = cfg.train.peak_flops or peak_flops_for(device_name(acc.device))
        # train/loss over the log window; train/loss/<source> from the per-row losses
        meter, losses, by_source = Throughput(num_devices=acc.num_processes), window.loss, window.by_source
        stop = cleanup.enter_context(PreemptionFlag.for_run(cfg, acc, last_run))
        profiler = cleanup.enter_context(StepProfiler.for_run(cfg, acc, say))  # torch.profiler (train.profile)
        logger.log({"train/tokens": state.tokens, **param_counts}, step=state.step)
        out = RunOutput(logger, say)  # metrics.jsonl (W&B) and the console
        if state.step == 0 and cfg.eval.at_start and heldout:  # the base model's losses anchor forgetting and adaptation
            out.eval(0, 0, {"stage": 0, "train/lr": plan.lr(0), **_heldout_eval(cfg, evaluator, ema, acc, model, 0)})
        if bench is not None and bench.needs_start_evaluation():  # the base model's benchmark scores
            out.eval(state.step, state.tokens, bench.evaluate(model, tokenizer, state.step))

        run_end.redo_interrupted_export(cfg, start, state.step, total_steps, model, tokenizer, acc)  # a kill during it

        # --- the loop
        out.start_bar(cfg.train.progress_bar and acc.is_main_process, state.step, total_steps, cfg.run.name)
        model.train()
        export_dir, stopped, config_yaml = None, None, yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
        clock = TrainClock(meter)  # training time between host syncs (evaluation and checkpoints excluded)
        while state.step < total_steps:
            step, stage = state.step, plan.stage_index(state.step)
            profiler.at(step)
            if step > 0 and step in plan.starts:  # a stage switch: the shares change inside the data loader
                _stage_switch(cfg, stage, optimizer, spikes, say)
            lr = plan.lr(step)
            optim.set_lr(optimizer, lr)
            result = train_step(acc, model, feed.batch(step), guard, step, cfg.train.micro_batch_size, cfg.optim.grad_clip,
                                eos_id, by_source, loss_weights)
            state.step, state.tokens = step + 1, state.tokens + B * L
            _after_update(acc, model, reptile, state.step)  # Reptile's meta-update; the float8 all-gather's scales
            if ema is not None:  # (after Reptile: it averages the weights training goes on from)
                ema.update(acc.unwrap_model(model), applied=result.outcome.applied)
            clock.add(B * L)
            window.add(result)  # train/loss (and the router and z terms) average the log window's finite steps

            # log: the host reads the step's numbers here (and only here, on the device-skip path)
            if state.step % cfg.train.log_every == 0 or state.step == total_steps:
                mean_loss = losses.mean(acc)
                clock.lap()
                guard.sync(state.step)
                record = {"train/tokens": state.tokens, "train/loss": mean_loss, "train/lr": lr,
                          "train/grad_norm": float(result.grad_norm), "stage": stage, **_counters(guard, spikes),
                          **meter.metrics(flops_per_token, peak), **account.metrics(state.tokens, flops_per_token),
                          **feed.metrics(), **(by_source.metrics(acc) if by_source else {}),
                          **window.term_metrics()}
                out.step(record, state.step, total_steps, meter.tokens_per_s)
            out.advance()
            if guard.too_many_in_a_row():  # stop, with the last good weights saved
                _stop_on_nonfinite(guard, feed, ckpts, state.step, components, config_yaml)

            # evaluate (every N steps, densely after each stage switch: the stability gap), checkpoint, export
            evaluate_now = heldout and (evaluator.should_evaluate(state.step, plan.starts) or state.step == total_steps)
            lm_eval_now = bench is not None and bench.should_evaluate(state.step, plan.starts) and state.step < total_steps
            preempted = stop.requested(acc, state.step)
            save_now = (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0) or preempted
            export_now = run_end.periodic_export_dir(cfg, state.step, total_steps)  # exports/step_N, or None
            if evaluate_now or lm_eval_now or save_now or export_now:
                clock.lap(sync_device=True)  # the training steps queued so far count as training time, what follows not
                if evaluate_now:
                    out.eval(state.step, state.tokens, _heldout_eval(cfg, evaluator, ema, acc, model, state.step))
                if lm_eval_now:
                    out.eval(state.step, state.tokens, bench.evaluate(model, tokenizer, state.step))
                if save_now:  # (a failure: retried at the next interval, at the run's end, or not at all on a stop)
                    ckpts.save(state.step, components, config_yaml, on_failure_in_loop(preempted, state.step == total_steps))
                if export_now:
                    path = export_hf(model, tokenizer, export_now, acc, cfg.checkpoint)
                    logger.log_artifact(path, f"{cfg.run.name}-step{state.step}")  # when logging.wandb.log_exports_as_artifacts
                clock.restart()
            if preempted:
                stopped = "preempted"
                break

        # --- teardown: final checkpoint, HF export, lm-eval, summary, plots
        feed.close()
        profiler.close(state.step)
        out.close_bar()
        if stopped is None:
            if cfg.checkpoint.every:  # (a failed final save is a CheckpointError: no later try is left)
                ckpts.save(state.step, components, config_yaml, "raise")
            if cfg.checkpoint.export_at_end:
                export_dir = run_end.export_final(cfg, model, tokenizer, ema, acc, logger)
            if bench is not None and cfg.eval.lm_eval.at_end:
                _final_benchmarks(acc, run_dir, start, state, bench, model, tokenizer, out)
        ckpts.finish(state.step, stop if stopped else None, say)  # the last write on disk before the run reports its end
        summary, compute = evaluator.summary(), account.metrics(state.tokens, flops_per_token)
        logger.log({"train/tokens": state.tokens, **compute}, step=state.step)
        logger.close()  # (the report reads metrics.jsonl)
        run_end.end_of_run(cfg, acc, run_dir, stopped, state, total_steps, summary, bench, compute, say, export_dir)
        return TrainResult(run_dir, state.step, state.tokens, export_dir, summary, stopped,
                           benchmarks=bench.summary() if bench else [])


def train_step(acc, model, batch: dict[str, torch.Tensor], guard: UpdateGuard, step: int, micro_batch_size: int,
               grad_clip: float | None, eos_id: int | None = None, by_source: SourceLoss | None = None,
               weights: lm_loss.LossWeights = lm_loss.LossWeights()) -> StepResult:
    """One optimizer step on this rank's rows of the global batch: forward/backward over its micro-batches
    (gradients accumulated), the gradient norm (clipped to ``grad_clip``), then the update, applied or skipped by
    ``guard`` (non-finite loss or gradient on any rank, a spike). No host sync in here on the device-skip path.
    ``weights``: the terms added to the backpropagated loss (a mixture of experts' load-balancing loss, the z-loss);
    the step's logged loss stays the next-token loss."""
    rows = batch["input_ids"].to(acc.device, non_blocking=True)
    sources = batch["source"].to(acc.device, non_blocking=True)
    accum = acc.gradient_accumulation_steps
    step_loss = torch.zeros((), device=acc.device)
    step_aux = torch.zeros((), device=acc.device) if weights.router_aux > 0 else None
    step_z = torch.zeros((), device=acc.device) if weights.z > 0 else None
    for micro, micro_sources in zip(rows.split(micro_batch_size), sources.split(micro_batch_size)):
        with acc.accumulate(model):
            loss, row_losses, aux, z_term = lm_loss.causal_lm_loss(model, micro, eos_id, weights)
            if by_source is not None:
                by_source.add(micro_sources, row_losses)
            if step_aux is not None:
                step_aux += aux / accum
            if step_z is not None:
                step_z += z_term / accum
            next_token_loss = loss.detach() if weights == lm_loss.LossWeights() else row_losses.mean()  # (rows of equal length)
            if backend(acc) is Backend.DEEPSPEED and not torch.isfinite(loss):  # no host sync otherwise
                loss = optim.zero_grad_loss(model)  # DeepSpeed steps inside backward: feed it zero gradients
            acc.backward(loss)
            step_loss += next_token_loss / accum
    grad_norm = optim.clip_grad_norm(acc, model, grad_clip)  # a device tensor
    outcome = guard.step(step_loss, grad_norm, step)  # see cpt/update_guard.py
    guard.optimizer.zero_grad(set_to_none=True)
    if by_source is not None:
        by_source.end_step(keep=outcome.finite)  # a spike's loss is logged, a non-finite one is not
    return StepResult(step_loss, grad_norm, outcome, step_aux, step_z)


# ------------------------------------------------------------------------------------------ helpers


def _counters(guard: UpdateGuard, spikes: SpikeGuard | None) -> dict:
    """A log record's counters: updates skipped (non-finite, spikes) so far, peak device memory."""
    return {**guard.metrics(), "train/spikes_skipped": spikes.skipped if spikes else 0,
            "perf/peak_mem_gb": peak_memory_gb()}


def _restore(ckpts: CheckpointManager, start: Start, components: dict, model, say, global_batch: int) -> None:
    """Load the registered components from the start checkpoint: a resume's, or the trunk's for an anneal branch
    (which logs its own steps: the trunk's open log window is not carried over; an EMA, Reptile or spike guard the
    trunk ran without starts at the branch point: resume.switched_on_in_branch)."""
    own_window, fresh = start.resume is not None, switched_on_in_branch(start, components)
    ckpts.load(start.state_from, {n: c for n, c in components.items() if (own_window or n != "log_window") and n not in fresh})
    if start.resume is not None:  # this step's checkpoint is on disk: not written again (a resume at the run's last step,
        ckpts.last_saved = components["train"].step  # after a kill in its final export, replaced it with a copy)
    for name in fresh:
        components[name].restart(ckpts.acc.unwrap_model(model))
        say(f"anneal branch: {SWITCHED_ON_IN_A_BRANCH[name]} starts at the branch point (the trunk ran without it)")
    state = components["train"]
    say(f"{'resumed' if start.resume else 'branching from'} {start.state_from} at step {state.step} ({state.tokens:,} tokens)"
        + world_change(start.state_from, ckpts.acc, global_batch))


def _stop_on_nonfinite(guard: UpdateGuard, feed: Prefetcher, ckpts: CheckpointManager, step: int, components: dict,
                       config_yaml: str) -> None:
    """Too many non-finite steps in a row: save (skipped updates never touched the weights) and stop."""
    feed.close()
    ckpts.save(step, components, config_yaml, "stop")
    ckpts.wait()
    raise TrainingError(f"{guard.in_a_row} non-finite steps in a row at step {step}: stopping. The last good "
                        f"weights are in {ckpts.root} (skipped updates never touched them). Lower "
                        "the LR or check the data.")


@contextlib.contextmanager
def _locked(run_dir: Path, force_lock: bool):
    """The run directory, locked by the main process for the run (yields the lock it holds, None on the other ranks);
    removed again if the lock was all it got."""
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"run.output_dir {run_dir} is an existing file, not a directory: choose another --output-dir")
    created = not run_dir.exists()
    lock = RunLock(run_dir, force=force_lock)
    if int(os.environ.get("RANK", "0")) == 0:
        try:
            lock.acquire()
        except RunLockError as e:
            raise TrainingError(str(e)) from None
    try:
        yield lock if lock.held else None
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


def _preflight(cfg: RunConfig, start: Start, acc, say) -> None:
    """Checks that need neither the model nor the data, run before anything is loaded or written."""
    check_attn_implementation(cfg.model)
    fp8.preflight(cfg, acc, say)  # train.fp8: torchao, the device (a CUDA capability of 8.9+)
    if cfg.train.anneal_steps and start.resume is None:  # a cpt checkpoint in a constant or stable phase
        anneal_branch_start(cfg, start.init)
    if (warning := unprotected_batch_job(cfg)) is not None:  # SLURM without checkpoint.every
        say(warning)


def _model_for_run(cfg: RunConfig, init_hf: str | None, say, ckpt: Path | None = None):
    """(model, tokenizer, new token ids): built or loaded, then vocabulary extension, freezing, LoRA (``ckpt``: the
    checkpoint the weights will be loaded from, whose stored PiSSA/OLoRA factors rebuild the residual base)."""
    fault_point("start:model")  # (tests: a stop signal while the run starts)
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(cfg.model, tokenizer, weights_from=init_hf)
    model, tokenizer, new_token_ids = prepare_model(cfg.model, model, tokenizer, log_fn=say, weights_from=init_hf,
                                                    checkpoint=ckpt)
    context = getattr(model.config, "max_position_embeddings", None)
    if context and cfg.data.seq_len > context:
        say(f"warning: data.seq_len {cfg.data.seq_len} is longer than the model's context (max_position_embeddings "
            f"{context}); for long-context CPT raise it and the RoPE base with model.config_overrides")
    return model, tokenizer, new_token_ids


def _flops_per_token(model, seq_len: int) -> float:
    return shape_flops_per_token(model_shape(model), seq_len)


def _with_optimizer(cfg: RunConfig, model, new_token_ids, acc, say):
    """(model, AdamW) before accelerate.prepare: float8 layers (train.fp8), parameter groups, new rows' LR, chunked loss, compile."""
    optimizer = optim.build_optimizer(fp8.convert_for_run(model, cfg, acc, say), cfg.optim, acc.device.type)
    if new_token_ids and cfg.model.vocab is not None and cfg.model.vocab.new_rows_lr_multiplier:
        scale_new_rows_updates(model, optimizer, new_token_ids, cfg.model.vocab.new_rows_lr_multiplier, acc)
    use_chunked_loss(model, cfg.train.chunked_loss, cfg.train.loss_chunk_tokens, acc, say)  # no full logits, where supported
    cast_frozen_base(model, cfg, acc, say)  # LoRA: the frozen base's Linear weights in bf16/fp16 (cpt/base_dtype.py)
    refuse_unshardable(model, acc)  # (LoRA's tied new rows under FSDP)
    if cfg.model.compile:  # compiled code kept in the run directory for its later starts (model.compile_cache)
        use_compile_cache(cfg.model.compile_cache, cfg.run.output_dir, say)
    return compile_model(model, cfg.model.compile, say), optimizer  # model.compile: whole model or its repeated blocks


def _init_weights(cfg: RunConfig, ckpts: CheckpointManager, ckpt: Path, optimizer, data: CPTDataLoader, say) -> None:
    """A new stage from a cpt checkpoint (train.init_from): its weights, and its optimizer state with train.init_optimizer.
    Data positions start over: a source the checkpoint's run had read is named (its first sequences come again)."""
    ckpts.load(ckpt, optimizer_state=cfg.train.init_optimizer)
    if not cfg.train.init_optimizer:
        reset_optimizer_state(optimizer)
    say(f"initialised weights{' and optimizer' if cfg.train.init_optimizer else ''} from {ckpt}")
    saved = json.loads((ckpt / TRAINER_STATE).read_text()).get("data") if (ckpt / TRAINER_STATE).is_file() else None
    for note in data.start_over_notes(saved) if isinstance(saved, dict) and data.rank == 0 else ():
        logging.getLogger("cpt.data").warning("train.init_from: %s", note)


def _final_benchmarks(acc, run_dir: Path, start: Start, state: TrainState, bench, model, tokenizer, out) -> None:
    """The final lm-eval scores (``eval.lm_eval.at_end``), logged. A resume at the run's last step whose killed start
    had logged them already (the kill came after them: in the final export's teardown, or a signal the finished run no
    longer answered) does not log them again (a second record of the step in metrics.jsonl): the tracker takes the
    logged scores as its final ones (the run's benchmark table), or, for a metric it has no direction of (never scored
    before in this run), scores them again without logging them."""
    logged = _logged_final_scores(acc, run_dir, start, state.step)
    if logged is None:
        out.eval(state.step, state.tokens, bench.evaluate(model, tokenizer, state.step))
    elif not bench.replay(state.step, logged):
        bench.evaluate(model, tokenizer, state.step)  # (the same scores as logged: evaluation is deterministic)


def _logged_final_scores(acc, run_dir: Path, start: Start, step: int) -> dict | None:
    """The lm-eval values metrics.jsonl holds at ``step`` when this start resumed there (None otherwise). Collective:
    the main process reads, every rank gets its answer."""
    from cpt.checkpoint import saved_step
    from cpt.distributed import from_main_process
    from cpt.metrics import records_at

    if start.resume is None or saved_step(start.resume) != step:
        return None
    path = run_dir / "metrics.jsonl"
    logged: dict = {}
    if acc.is_main_process and path.is_file():  # (the log's last step: read from its end, not the whole file)
        for r in records_at(path, step):
            logged.update({k: v for k, v in r.items() if k.startswith("lm_eval/")})
    return from_main_process(acc, logged) or None


def _metrics_logger(cfg: RunConfig, acc, resumed_at: int | None) -> MetricsLogger:
    """The run's config.yaml and metrics logger; a resumed run drops what a killed one logged past its checkpoint
    (``resumed_at`` -1: --resume with no checkpoint yet, a requeue starting over: all of it, same W&B run)."""
    run_dir = Path(cfg.run.output_dir)
    if acc.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
    logger = MetricsLogger(run_dir, cfg, acc, resume=resumed_at is not None)
    if resumed_at is not None:
        logger.truncate_after(resumed_at)
    return logger


def _lr_plan(cfg: RunConfig, start: Start, state: TrainState, say):
    """(the LR plan, the step the run ends at). An anneal branch starts at the trunk checkpoint's step (a resumed
    branch continues its own anneal)."""
    if not cfg.train.anneal_steps:
        plan = plan_for_run(cfg)
        return plan, plan.total_steps
    if start.resume is None or state.anneal_from is None:
        state.anneal_from = state.step
    plan = plan_for_run(cfg, state.anneal_from)
    anneal = plan.phase_at(state.anneal_from)  # (v0: the trunk's constant LR; the first update is one increment below)
    say(f"anneal branch: steps {state.anneal_from}..{state.anneal_from + cfg.train.anneal_steps} from the constant lr "
        f"{anneal.v0:.3g} to min_lr {anneal.v1:.3g} ({anneal.shape})")
    return plan, state.anneal_from + cfg.train.anneal_steps


def _stage_switch(cfg: RunConfig, stage: int, optimizer, spikes: SpikeGuard | None, say) -> None:
    """At the start of a later stage: optionally a fresh optimizer state; the spike guard forgets its history."""
    if cfg.stages[stage].reset_optimizer and not cfg.train.anneal_steps:
        reset_optimizer_state(optimizer)
        say(f"stage {stage} ({cfg.stages[stage].name}): optimizer state reset")
    if spikes is not None:
        spikes.reset()  # a new stage is expected to move the loss


def reset_optimizer_state(optimizer) -> None:
    """Forget AdamW moments (a stage may start with a fresh optimizer)."""
    if not optim.reset_state(optimizer):
        raise TrainingError("resetting the optimizer state is not supported with this optimizer; start a new run from the HF export instead")


def _after_update(acc, model, reptile, step: int) -> None:
    """After each optimizer step: Reptile's meta-update every k steps (weights <- anchor + eps x (weights - anchor)),
    then, under FSDP2 with the float8 all-gather (train.fp8: tensorwise), the scales of the weights the next
    all-gathers cast to float8, in one all-reduce (cpt/fp8.py; nothing otherwise)."""
    if reptile is not None:
        reptile.step(acc.unwrap_model(model), step)
    fp8.after_update(model)


def _heldout_eval(cfg: RunConfig, evaluator: HeldoutEvaluator, ema, acc, model, step: int) -> dict[str, Any]:
    """The held-out sets' losses (forgetting, adaptation), and those of the EMA weights with eval.ema (without
    touching the evaluator's step-0/worst bookkeeping, which is about the live weights); with eval.samples, the live
    weights' text samples under ``samples`` (RunOutput.eval writes them), then, with eval.ema, the EMA weights'."""
    metrics: dict[str, Any] = dict(evaluator.evaluate(model, step))
    if evaluator.samples is not None:
        metrics["samples"] = evaluator.samples.generate(model, step)
    if ema is not None and cfg.eval.ema:
        with fp8.swapped_scales(model, ema.swapped(acc.unwrap_model(model))):  # (and their fp8 all-gather scales)
            metrics.update({f"ema/eval/{h.name}/loss": heldout_loss(model, h.tokens, cfg.eval.batch_size, acc, evaluator.eos_id)
                            for h in evaluator.sets})
            if evaluator.samples is not None:
                metrics["samples"] += evaluator.samples.generate(model, step, weights="ema")
    return metrics


def _benchmarks(cfg: RunConfig, acc, say):
    if not cfg.eval.lm_eval.tasks:
        return None
    from eval_harness.benchmarks import BenchmarkTracker  # (lm-eval: the eval extra)

    return BenchmarkTracker.from_config(cfg, acc, echo=say)  # (echo: a line as each evaluation starts)
