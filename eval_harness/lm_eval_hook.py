"""lm-eval over the live model during training, and over saved checkpoints.

``run_lm_eval_detailed(model, tokenizer, tasks, ...)`` wraps the model being trained in lm-eval's ``HFLM`` and
returns flat metrics ``{"lm_eval/<task>/<metric>": value}`` with lm-eval's results. The local tasks in ``eval_harness/tasks``
(tag ``cpt_local``) run offline from any working directory; other task names go through lm-eval's
default task registry (hub datasets: they need the network).

Several processes: lm-eval with a pre-built model assumes one process, so the hook chooses one of
two strategies, neither of which can leave a rank waiting in a collective the others never reach:

* ``data_parallel`` (DDP, DeepSpeed ZeRO-1/2, multi-CPU: every rank holds the full weights). lm-eval's
  own data-parallel path is switched on for the live model (``rank``/``world_size``/``accelerator`` of
  the ``HFLM``): each rank scores a disjoint share of the requests with the *unwrapped* module, whose
  forward runs no collective, and lm-eval's gathers (request counts, per-sample metrics) are
  called symmetrically by every rank. Results are computed on rank 0 and broadcast to all ranks.
* ``replicated`` (FSDP, DeepSpeed ZeRO-3: weights are sharded, so every forward pass is a collective).
  Every rank runs the *whole* evaluation on the wrapped model in lock-step: the requests, their
  order and their batches are a pure function of the task data and the seeds, so every rank makes
  exactly the same sequence of forward passes and the parameter all-gathers always match.
  Generation tasks get ``synced_gpus=True`` so ``generate`` keeps all ranks stepping together even
  if their outputs were to differ. It costs world-size times the compute of a data-parallel
  evaluation, but it needs no export and no extra memory, and no rank idles in a barrier while
  another evaluates (a rank-0-only evaluation would risk the collective timeout on long task lists).

Standard errors (``bootstrap_iters`` > 0): lm-eval's own (closed form for accuracies), and for the
metrics it leaves without one (ratio metrics such as ``bits_per_byte``) a seeded bootstrap over the
per-document values, see :func:`add_missing_stderrs`. ``samples`` picks the documents (the seeded
subsets of :mod:`eval_harness.benchmarks`, which also keeps the step-0 scores and the deltas).

For a saved checkpoint (an HF export, or a LoRA adapter with its base), see
:func:`load_for_eval` (then :func:`run_lm_eval_detailed`), as ``cpt eval`` does.

lm-eval seeds Python, NumPy and torch; the hook restores the previous RNG states afterwards so
that an evaluation in the middle of training does not change the rest of the run, and it restores
the model's train/eval mode.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eval_harness.task_registry import make_task_manager

log = logging.getLogger("cpt.lm_eval")

# ---------------------------------------------------------------- results


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def flatten_results(results: dict[str, Any]) -> dict[str, float]:
    """``{"results": {task: {"acc,none": x, ...}}}`` -> ``{"lm_eval/<task>/acc": x, ...}``.

    The ``none`` filter is dropped from the name; another filter is kept as ``<metric>@<filter>``.
    Standard errors become ``<metric>_stderr`` (when lm-eval computed them). Non-numbers are skipped.
    """
    flat: dict[str, float] = {}
    for section in ("results", "groups"):
        for task, metrics in (results.get(section) or {}).items():
            for key, value in metrics.items():
                if not _is_number(value) or key in ("samples", "sample_len"):
                    continue
                metric, _, filt = key.partition(",")
                name = metric if filt in ("", "none") else f"{metric}@{filt}"
                flat[f"lm_eval/{task}/{name}"] = float(value)
    return flat


# ---------------------------------------------------------------- distributed strategy


def choose_strategy(accelerator) -> str:
    """``single``, ``data_parallel`` (full weights on every rank) or ``replicated`` (sharded weights)."""
    if accelerator is None or accelerator.num_processes <= 1:
        return "single"
    from cpt.distributed import Backend, backend, shards_weights

    if backend(accelerator) in (Backend.DDP, Backend.DEEPSPEED) and not shards_weights(accelerator):
        return "data_parallel"  # full weights on every rank: DDP on GPUs/CPUs/other devices, ZeRO-1/2
    return "replicated"  # FSDP, ZeRO-3, anything else (tensor/pipeline parallel...): lock-step is the safe choice  # anything else (tensor/pipeline parallel...): lock-step is the safe choice


def _module_for(model, strategy: str, accelerator):
    if strategy == "single":
        return accelerator.unwrap_model(model) if accelerator is not None else model
    if strategy == "data_parallel":
        return accelerator.unwrap_model(model)  # DDP / DeepSpeed engine removed: no collectives in forward
    # replicated: keep the sharding wrapper (its forward gathers the parameters) but not a DeepSpeed
    # engine, whose ZeRO-3 hooks live on the inner module anyway
    try:
        from deepspeed import DeepSpeedEngine

        if isinstance(model, DeepSpeedEngine):
            return model.module
    except ImportError:
        pass
    return model


@contextlib.contextmanager
def _kept_ties(model):
    """HFLM ties the weights of the model it is given (``model.tie_weights()``): nothing to do for the live model,
    whose ties are as training keeps them, and an AttributeError naming ``model.embed_tokens.weight`` for a LoRA model
    whose tied embedding peft wraps (model.vocab's new rows: trainable_token_indices). Skipped while HFLM is built."""
    model.tie_weights = lambda *a, **k: None  # (an instance attribute: the model's own method is untouched)
    try:
        yield
    finally:
        del model.tie_weights


@contextlib.contextmanager
def preserved_rng_and_mode(model):
    """Restore Python/NumPy/torch (CPU and CUDA) RNG states and the model's training mode on exit."""
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    was_training = model.training
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        model.train(was_training)


# ---------------------------------------------------------------- entry points


def run_lm_eval_detailed(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | float | None = None,
    batch_size: int = 8,
    include_path: str | Path | list | None = None,
    accelerator=None,
    max_length: int | None = None,
    bootstrap_iters: int = 0,
    num_fewshot: int | None = None,
    samples: dict[str, list[int]] | None = None,
    seed: int = 0,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Run lm-eval ``tasks`` on the live ``model``: ``{"lm_eval/<task>/<metric>": value}`` and lm-eval's results
    dict (``results``, ``configs``, ``versions``, ``n-samples``, ``higher_is_better``; JSON-serialisable).

    Call it on every rank (see the module docstring for the multi-process strategies); every rank gets the same
    two. ``limit`` caps the examples per task; ``include_path`` adds task YAML folders to the bundled
    ``eval_harness/tasks``; ``max_length`` is lm-eval's context length (default: the model config's, as lm-eval's
    own ``hf`` model; a run's in-loop evaluations pass ``data.seq_len``); the results record it as ``max_length``.

    ``samples``: ``{task: [document indices]}`` to evaluate (lm-eval's own option; not together with
    ``limit``). ``bootstrap_iters`` > 0 asks for standard errors: lm-eval computes them in closed form
    for mean metrics (accuracy) and by bootstrap for a few others (f1, bleu...); for the metrics it
    leaves without one (``bits_per_byte``, ``word_perplexity``... whose aggregation is a ratio) a
    bootstrap of ``bootstrap_iters`` resamples (seeded with ``seed``) over the per-document values is
    computed here. Bootstraps run in this process (lm-eval's ``DISABLE_MULTIPROC``), never in a
    pool forked from the training process.
    """
    import lm_eval

    if not tasks:
        raise ValueError("no lm-eval tasks given")
    strategy = choose_strategy(accelerator)
    module = _module_for(model, strategy, accelerator)
    task_manager = make_task_manager(list(tasks), include_path)
    gen_kwargs = {"synced_gpus": True} if strategy == "replicated" else None

    from cpt.base_dtype import autocast_for

    # (a LoRA base stored in bf16: autocast also for generate, which calls the inner model's forward; cpt/base_dtype.py)
    with preserved_rng_and_mode(module), torch.no_grad(), _no_bootstrap_pool(), _no_provenance(), autocast_for(module):
        with _kept_ties(module):
            lm = _hflm_class()(pretrained=module, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        if strategy == "data_parallel":
            # lm-eval's own data-parallel evaluation (what it does under `accelerate launch` with a
            # model name), enabled for the live model
            lm.accelerator = accelerator
            lm._rank = accelerator.process_index
            lm._world_size = accelerator.num_processes
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            limit=limit,
            samples=samples,
            num_fewshot=num_fewshot,
            task_manager=task_manager,
            bootstrap_iters=bootstrap_iters,
            log_samples=bootstrap_iters > 0,  # per-document values for the stderrs lm-eval leaves out
            gen_kwargs=gen_kwargs,
        )
        if results is not None and bootstrap_iters > 0:
            add_missing_stderrs(results, bootstrap_iters, seed)
        if results is not None:
            results["max_length"] = lm.max_length  # the context it scored with (reproduce: model_args max_length=...)
    if strategy != "single":
        # rank 0 holds the results (lm-eval returns None elsewhere, and on LOCAL_RANK != 0)
        from accelerate.utils import broadcast_object_list

        payload = [_clean(results) if accelerator.is_main_process else None]
        broadcast_object_list(payload, from_process=0)
        results = payload[0]
    else:
        results = _clean(results)
    if results is None:
        raise RuntimeError("lm-eval returned no results")
    return flatten_results(results), results


@functools.cache
def _hflm_class():
    """lm-eval's ``HFLM`` whose request bars ("Running loglikelihood requests", ...) are drawn only when stderr is a
    terminal: in a batch job's log a tqdm bar is carriage-return redraws, three per evaluation. (Bars lm-eval draws
    with tqdm's defaults follow ``TQDM_DISABLE``, which ``cpt`` sets for such logs: cpt/cli.py.)"""
    import sys

    from lm_eval.models.huggingface import HFLM

    def quiet(disable_tqdm: bool) -> bool:
        return disable_tqdm or not getattr(sys.stderr, "isatty", lambda: False)()

    class BatchLogHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=quiet(disable_tqdm))

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=quiet(disable_tqdm))

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            # (loglikelihood_rolling calls it with disable_tqdm=False per batch of windows)
            return super()._loglikelihood_tokens(requests, disable_tqdm=quiet(disable_tqdm), override_bs=override_bs)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=quiet(disable_tqdm))

    return BatchLogHFLM


@contextlib.contextmanager
def _no_provenance():
    """lm-eval ends every evaluation by recording provenance cpt does not keep (:func:`_clean` drops it): the working
    directory's commit, through ``git describe`` with git's stderr on ours (outside a repository, a cluster job's
    folder, each evaluation printed "fatal: not a git repository ..." into the batch log; lm-eval has no option for
    it), and torch's environment report (``pip list`` and more: 3 s here, each evaluation). Both are skipped while
    cpt evaluates; lm-eval's module is restored after."""
    import lm_eval.evaluator as evaluator

    saved = evaluator.get_git_commit_hash, evaluator.add_env_info
    evaluator.get_git_commit_hash, evaluator.add_env_info = (lambda: None), (lambda storage: None)
    try:
        yield
    finally:
        evaluator.get_git_commit_hash, evaluator.add_env_info = saved


@contextlib.contextmanager
def _no_bootstrap_pool():
    old = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = old


def _aggregation(results: dict[str, Any], task: str, metric: str):
    """lm-eval's aggregation function of ``metric`` in ``task`` (the task config's, else the metric's default)."""
    from lm_eval.api import registry

    for m in (results.get("configs", {}).get(task, {}).get("metric_list") or []):
        if isinstance(m, dict) and m.get("metric") == metric and m.get("aggregation"):
            agg = m["aggregation"]
            return agg if callable(agg) else registry.get_aggregation(agg)
    try:
        return registry.get_metric_aggregation(metric)
    except (KeyError, ValueError):
        return None


def bootstrap_stderr(aggregate, items: list, iters: int, seed: int) -> float | None:
    """Standard deviation of ``aggregate`` over ``iters`` resamples (with replacement) of ``items``."""
    if len(items) < 2 or iters < 2:
        return None
    rng = np.random.default_rng(seed)
    values = [float(aggregate([items[j] for j in rng.integers(0, len(items), len(items))])) for _ in range(iters)]
    values = [v for v in values if math.isfinite(v)]
    return float(np.std(values, ddof=1)) if len(values) >= 2 else None


def add_missing_stderrs(results: dict[str, Any], iters: int, seed: int = 0) -> None:
    """Fill ``<metric>_stderr,<filter>`` where lm-eval wrote "N/A", from the logged per-document values."""
    for task, docs in (results.get("samples") or {}).items():
        metrics = results.get("results", {}).get(task)
        if metrics is None:
            continue
        docs = sorted(docs, key=lambda d: d.get("doc_id", 0))  # the same resamples however ranks split the documents
        for key in list(metrics):
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr") or not _is_number(metrics[key]):
                continue
            skey = f"{metric}_stderr,{filt}"
            if _is_number(metrics.get(skey)):
                continue
            items = [d[metric] for d in docs if d.get("filter", filt) == filt and metric in d]
            if len(items) < 2:
                continue
            aggregate = _aggregation(results, task, metric)
            if aggregate is None:
                continue
            try:
                se = bootstrap_stderr(aggregate, items, iters, seed)
            except (TypeError, ValueError, ZeroDivisionError, OverflowError):
                se = None
            if se is not None:
                metrics[skey] = se


def _clean(results: dict[str, Any] | None) -> dict[str, Any] | None:
    """Keep the JSON-friendly parts of lm-eval's output."""
    if results is None:
        return None
    keep = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples",
            "max_length")
    out = {k: results[k] for k in keep if k in results}
    return _jsonable(out)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item"):
        try:
            return _jsonable(obj.item())
        except (ValueError, RuntimeError):
            pass
    return str(obj)


def load_for_eval(checkpoint: str | Path, base: str | None = None, device: str | None = None,
                  dtype: str | torch.dtype | None = None):
    """Load ``(model, tokenizer)`` from an HF export directory, or from a LoRA adapter directory
    (``adapter_config.json``) on top of ``base`` (default: the adapter's ``base_model_name_or_path``).
    The tokenizer is taken from the checkpoint (or adapter) directory when it has one, else from the base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt.model import load_adapter_model, load_or_explain, read_adapter_config, require_safetensors

    path = Path(checkpoint)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
    has_tokenizer = any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    if (path / "adapter_config.json").exists():
        base_name = base or read_adapter_config(path).get("base_model_name_or_path")
        # (as cpt merge loads it: the base's embedding resized to cpt_adapter.json's num_embeddings, a vocabulary
        # extension's padded size; to len(tokenizer) the adapter's new rows did not fit: an IndexError in peft; its
        # config_overrides applied; no base named: its one-line ModelLoadError, not a ValueError traceback)
        model, tokenizer = load_adapter_model(path, base=base_name, dtype=torch_dtype)
    elif (path / "config.json").exists():
        model = load_or_explain("model", str(path), AutoModelForCausalLM.from_pretrained, str(path),
                                use_safetensors=require_safetensors(path), trust_remote_code=False, **kwargs)  # (a broken config.json: one line)
        tok_src = str(path) if has_tokenizer else (base or str(path))
        tokenizer = load_or_explain("tokenizer", tok_src, AutoTokenizer.from_pretrained, tok_src, trust_remote_code=False)
    else:
        raise FileNotFoundError(f"{path}: neither an HF model directory (config.json) nor a LoRA adapter (adapter_config.json)")
    if device:
        model.to(device)
    model.eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
