"""`cpt train CONFIG --dry-run`: what a run will do, checked against its real data, before any GPU time.

It loads the tokenizer, builds the model on the meta device (no weights, no memory) for its size and FLOPs per
token (checking the attention implementation is installed and the tokenizer fits the embedding), and opens every
source the stages mix and every held-out set, which checks each manifest and that the shards were made with the
tokenizer training uses. It then walks the mixer through every step, which is exact and cheap. It reports:

- per stage: steps, tokens, the LR at its start, peak and end, and each source's tokens and share;
- per source: the tokens consumed and the epochs that means, with a warning past ``data.max_epochs_warning``;
- in all: training tokens and FLOPs, and the time at an assumed throughput when one is given.

After that (:func:`check_run_dir`) it checks what the start of the run refuses about ``run.output_dir``: a file in
its place or in its path, a folder that cannot be created, a fresh start (no ``--resume``) over an earlier run's
checkpoints or finished export, and a ``--resume`` whose config changes the trajectory or ends before the newest
checkpoint's step, or (with ``--allow-config-change`` too) does not fit its saved data position or trainable
parameters (a job must not wait in a queue to fail on these).

Nothing is written. Shard checksums are not verified here (that reads every byte); training verifies them.
"""

from __future__ import annotations

from typing import Any

from cpt.config import RunConfig, format_mixes


def check_run_dir(cfg: RunConfig, resume: bool = False, allow_config_change: bool = False,
                  built: dict[str, Any] | None = None) -> None:
    """What the start of the run (cpt/train.py ``_locked``, cpt/resume.py ``resolve_start``) refuses about
    ``run.output_dir``, checked without writing: raises the same one-line errors. A ``--resume`` is checked against the
    newest checkpoint, not verified here (training verifies it and falls back to an older one); with ``built``
    (:func:`describe_run`'s result) also what cannot change under its saved state even with ``--allow-config-change``:
    its data position (a source's data, ``data.seq_len``, ``run.seed``) and its trainable parameters."""
    import os
    from pathlib import Path

    from cpt.checkpoint import CheckpointError, list_checkpoints
    from cpt.resume import check_fresh_run_dir, check_resume_config, check_resume_is_a_branch, check_resume_within_plan

    run_dir = Path(cfg.run.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"run.output_dir {run_dir} is an existing file, not a directory: choose another --output-dir")
    if not run_dir.exists():
        there = next(p for p in run_dir.absolute().parents if p.exists())  # where the run's mkdir -p would start
        if not there.is_dir() or not os.access(there, os.W_OK | os.X_OK):
            raise CheckpointError(f"cannot create the run directory {run_dir}: {there} is "
                                  f"{'a file' if not there.is_dir() else 'not writable'}")
        return
    newest = list_checkpoints(run_dir)[-1:] if resume else []
    if not newest:
        return check_fresh_run_dir(run_dir, resume, branch=bool(cfg.train.anneal_steps))
    if cfg.train.anneal_steps:
        check_resume_is_a_branch(newest[0], cfg)
    if not allow_config_change:
        check_resume_config(newest[0], cfg)
    check_resume_within_plan(newest[0], cfg)
    if built is not None:
        _check_saved_state(newest[0], built)


def _check_saved_state(ckpt, built: dict[str, Any]) -> None:
    """The checkpoint's data position loaded into the dry run's data loader (the start's own check: a source's data,
    ``data.seq_len``, ``run.seed``), and its trainable parameters (trainable.json) against the model the run builds:
    the start refuses both, also with ``--allow-config-change``; the dry run passed them (exit 0) before."""
    import json

    from cpt.checkpoint import STATE_TENSORS, TRAINABLE, TRAINER_STATE, CheckpointError
    from cpt.state import StateError, restore

    doc = json.loads((ckpt / TRAINER_STATE).read_text()) if (ckpt / TRAINER_STATE).is_file() else {}
    if "data" in doc:
        tensors = {}
        if (ckpt / STATE_TENSORS).is_file():
            from safetensors import safe_open

            with safe_open(str(ckpt / STATE_TENSORS), "pt") as f:  # (the data's own only: an EMA's are large)
                tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith("data.")}
        try:
            restore({"data": built["_data"]}, doc, tensors)
        except StateError as e:
            raise CheckpointError(f"checkpoint {ckpt}: {e}") from None
    if (ckpt / TRAINABLE).is_file():
        saved = {n: s for group in json.loads((ckpt / TRAINABLE).read_text()) for n, s in group}
        now = built["_trainable"]
        if saved != now:
            diff = sorted(set(saved) ^ set(now))
            first = (f"{diff[0]} {'only in the checkpoint' if diff[0] in saved else 'only in this run'}" if diff else
                     next(f"{n}: {saved[n]} in the checkpoint, {now[n]} in this run" for n in saved if saved[n] != now[n]))
            raise CheckpointError(
                f"checkpoint {ckpt}: it trained other parameters than the model this run builds ({len(saved):,} vs "
                f"{len(now):,}; first: {first}): model.lora and model.freeze must be the checkpoint's, even with "
                "--allow-config-change (a new stage from it: train.init_from)")


def describe_run(cfg: RunConfig) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from cpt.data.loader import CPTDataLoader, load_heldout
    from cpt.model import check_attn_implementation, check_vocab_fits, load_tokenizer, model_config, model_shape
    from cpt import quantized_base
    from cpt.resume import anneal_branch_start, init_weights
    from cpt.schedules import plan_for_run
    from cpt.throughput import shape_flops_per_token

    check_attn_implementation(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    init, init_hf = init_weights(cfg)  # the model training builds: an HF init_from's, a checkpoint's run's (followed back)
    config = model_config(cfg.model, tokenizer, init_hf)  # the config build_model would use
    quantized_base.load_kwargs(cfg.model, init_hf or cfg.model.name_or_path, config)  # QLoRA: bitsandbytes, a source
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    check_vocab_fits(cfg.model, tokenizer, model.get_input_embeddings().weight.shape[0])
    if cfg.model.lora is not None:  # every LoRA module name names a module of this model
        from cpt.adapters import check_lora_modules

        check_lora_modules(model, cfg.model.lora)
    if cfg.train.fp8 is not None:  # torchao installed, some Linear layer qualifies (cpt/fp8.py)
        from cpt import fp8

        fp8.check_config(cfg)
        fp8.select(model)
    new_ids: list[int] = []
    if cfg.model.vocab is not None:  # training reads the data with the extended tokenizer (shards made with it), and
        from cpt.vocab import extend_vocabulary  # trains the new rows (under LoRA and model.freeze too)

        with torch.device("meta"):
            model, tokenizer, new_ids = extend_vocabulary(model, tokenizer, cfg.model.vocab)
    adapted = _with_adapters(model, cfg, new_ids)
    if cfg.train.chunked_loss is True:  # the model computes its logits as the chunked loss needs, as at the start
        from cpt.lm_loss import use_chunked_loss

        use_chunked_loss(adapted, True, cfg.train.loss_chunk_tokens, log_fn=lambda *a: None)
    from cpt.lm_loss import router_aux_coefficient

    router_aux_coefficient(adapted, cfg.train.router_aux_loss_coef)  # a coefficient for a dense model: refused here too
    shape = model_shape(adapted)
    L, B = cfg.data.seq_len, cfg.train.global_batch_size
    fpt = shape_flops_per_token(shape, L)

    data_cfg = cfg.data.model_copy(update={"verify_checksums": False})
    data = CPTDataLoader(data_cfg, cfg.stages, tokenizer, B, cfg.run.seed)
    for stream in data.streams:  # a streamed `hf` source gives text: its first records (a misspelt text_field)
        if hasattr(stream, "check_text"):
            stream.check_text()
    for h in cfg.data.heldout:  # each held-out set's tokenizer hash and length, as training checks them at start
        load_heldout(h, tokenizer, L, h.max_tokens or cfg.eval.tokens_per_set, verify=False, retry=cfg.data.remote)
    if cfg.eval.samples is not None:  # each prompt encodes to tokens and fits the context with its new tokens
        from cpt.samples import SampleGenerator

        SampleGenerator.for_run(cfg, tokenizer, None, config)
    if cfg.eval.lm_eval.tasks:  # every lm-eval task name is known (bundled, include_path or lm-eval's own)
        from eval_harness.benchmarks import BenchmarkTracker

        BenchmarkTracker.from_config(cfg)
    # an anneal branch trains from its trunk checkpoint's step on (refused here as at the start of training)
    first = anneal_branch_start(cfg, init) if cfg.train.anneal_steps else 0
    plan = plan_for_run(cfg, anneal_from=first if cfg.train.anneal_steps else None)
    names = data.source_names
    for step in range(first):  # the trunk's batches before the branch: the data position it starts from
        data.mixer.counts(step)
    stages = []
    for i, ((n, _), start) in enumerate(zip(plan.stages, plan.starts)):
        lo, hi = max(start, first), start + n  # the steps of this stage the run trains
        if lo >= hi:
            continue
        rows = [0] * len(names)
        for step in range(lo, hi):
            rows = [a + b for a, b in zip(rows, data.mixer.counts(step))]
        lrs = [plan.lr(s) for s in range(lo, hi)]
        stages.append({"index": i, "name": cfg.stages[i].name, "steps": hi - lo, "tokens": (hi - lo) * B * L,
                       "lr": {"start": lrs[0], "peak": max(lrs), "end": lrs[-1]},
                       "sources": {n: {"tokens": r * L, "share": r / ((hi - lo) * B)} for n, r in zip(names, rows) if r}})
    sources = {}
    for j, (name, stream) in enumerate(zip(names, data.streams)):
        used = data.mixer.rows[j]
        epochs = stream.epoch_of(used) if hasattr(stream, "epoch_of") else None  # `hf` sources: size unknown
        sources[name] = {"tokens": used * L, "epochs": epochs,
                         "available_tokens": getattr(stream, "num_sequences", 0) * L or None,
                         "too_many_epochs": epochs is not None and epochs > cfg.data.max_epochs_warning}
    total = (plan.total_steps - first) * B * L
    return {"anneal_branch": {"from": first, "steps": plan.total_steps - first} if cfg.train.anneal_steps else None,
            "model": {**shape, "vocab": len(tokenizer), "flops_per_token": fpt, "context": getattr(config, "max_position_embeddings", None)},
            "seq_len": L, "global_batch_size": B, "stages": stages, "sources": sources, "mixes": format_mixes(cfg.stages),
            "heldout": [h.name for h in cfg.data.heldout],
            "samples": None if cfg.eval.samples is None else {"prompts": len(cfg.eval.samples.prompts),
                                                              "max_new_tokens": cfg.eval.samples.max_new_tokens,
                                                              "temperature": cfg.eval.samples.temperature,
                                                              "top_p": cfg.eval.samples.top_p,
                                                              "ema": bool(cfg.eval.ema and cfg.train.ema_decay)},
            "total": {"steps": plan.total_steps - first, "tokens": total, "flops": total * fpt},
            "max_epochs_warning": cfg.data.max_epochs_warning,
            # (for check_run_dir: what a resume's checkpoint state must fit; not part of the printed plan)
            "_data": data, "_trainable": {n: list(p.shape) for n, p in adapted.named_parameters() if p.requires_grad}}


def _with_adapters(model, cfg: RunConfig, new_ids: list[int]):
    """The meta model with ``model.lora`` and ``model.freeze`` applied as training applies them (on the meta device,
    adapters included): its trainable parameters, which set the FLOPs per token (cpt.throughput.model_flops_per_token)."""
    import torch

    from cpt.adapters import apply_freeze, apply_lora

    with torch.device("meta"):
        if cfg.model.lora is not None:
            model = apply_lora(model, cfg.model.lora, new_token_ids=new_ids or None, log_fn=lambda *a: None)
        if cfg.model.freeze is not None:
            apply_freeze(model, cfg.model.freeze, new_token_ids=new_ids)
    return model


def format_run_plan(d: dict[str, Any], tokens_per_s: float | None = None) -> str:
    m = d["model"]
    trainable = f", {m['n_trainable'] / 1e6:.1f}M trainable" if m["n_trainable"] < m["n_params"] else ""
    if m.get("n_params_active", m["n_params"]) < m["n_params"]:  # a mixture of experts: top-k of its routed experts
        trainable += f", {m['n_params_active'] / 1e6:.1f}M active per token"
    lines = [f"model: {m['n_params'] / 1e6:.1f}M parameters ({m['n_params_non_embedding'] / 1e6:.1f}M non-embedding{trainable}), "
             f"{m['n_layers']} layers, hidden {m['hidden']}, vocab {m['vocab']:,}; {m['flops_per_token']:.3g} training FLOPs/token",
             f"batch: {d['global_batch_size']} x {d['seq_len']} = {d['global_batch_size'] * d['seq_len']:,} tokens per step"]
    if m["context"] and d["seq_len"] > m["context"]:
        lines.append(f"warning: seq_len {d['seq_len']} is longer than the model's context ({m['context']})")
    lines += d.get("mixes", [])
    if d.get("anneal_branch"):
        b = d["anneal_branch"]
        lines.append(f"anneal branch: steps {b['from']}..{b['from'] + b['steps']} from the trunk checkpoint's step {b['from']} "
                     "(source tokens and epochs below count from the start of the trunk)")
    for i, st in enumerate(d["stages"]):  # (index: the config's, also where a branch trains only the later stages)
        lr = st["lr"]
        mix = ", ".join(f"{n} {s['share']:.1%} ({s['tokens']:,} tok)" for n, s in st["sources"].items())
        lines.append(f"stage {st.get('index', i)} {st['name']}: {st['steps']:,} steps, {st['tokens']:,} tokens; "
                     f"lr {lr['start']:.3g} -> peak {lr['peak']:.3g} -> {lr['end']:.3g}; {mix}")
    for name, s in d["sources"].items():
        if s["epochs"] is None:
            lines.append(f"source {name}: {s['tokens']:,} tokens (streamed `hf` source: epochs unknown)")
            continue
        flag = f"   WARNING: past data.max_epochs_warning={d['max_epochs_warning']:g}" if s["too_many_epochs"] else ""
        lines.append(f"source {name}: {s['tokens']:,} of {s['available_tokens']:,} tokens = {s['epochs']:.2f} epochs{flag}")
    if d.get("heldout"):
        lines.append(f"held-out sets (tokenizer checked): {', '.join(d['heldout'])}")
    if d.get("samples"):
        how = (f", sampled at temperature {d['samples']['temperature']:g}, top_p {d['samples']['top_p']:g}"
               if d["samples"].get("temperature") else "")
        ema = ", also from the EMA weights" if d["samples"].get("ema") else ""
        lines.append(f"text samples at each evaluation: {d['samples']['prompts']} prompt(s), up to "
                     f"{d['samples']['max_new_tokens']} new tokens each{how}{ema} (prompts checked)")
    t = d["total"]
    lines.append(f"total: {t['steps']:,} steps, {t['tokens']:,} training tokens, {t['flops']:.3g} FLOPs")
    if tokens_per_s:
        lines.append(f"at {tokens_per_s:,.0f} tokens/s: {t['tokens'] / tokens_per_s / 3600:.2f} h of training "
                     "(plus evaluation, checkpoints and start-up)")
    return "\n".join(lines)
