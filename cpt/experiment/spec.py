"""`cpt experiment`: the continual pre-training findings at small scale, in one command.

From a spec naming corpus A (the original distribution), corpus B (the new one), a model shape and
token budgets, :func:`run_experiment` runs (Ibrahim et al., 2024, "Simple and Scalable Strategies to
Continually Pre-train Large Language Models"; see docs/experiments.md)::

    base                          pre-training on A, warmup + cosine           base_tokens
    cpt-<schedule>-replay<pct>    from base's export, on B with <pct>% of A    cpt_tokens     for every
                                  replayed (exact per-batch shares)                            replay share x schedule
    cpt-...-<variant>             a CPT run with config overrides (spec.variants: MER, document masking, LoRA...)
    baseline-scratch              random init, on A and B mixed                base_tokens + cpt_tokens

Schedules of the CPT runs:

    rewarm_cosine   re-warm from 0 to max_lr, re-decay (cosine) to min_lr
    infinite        warmup to max_lr -> cooldown to constant_lr -> constant -> anneal to min_lr over
                    the last ``anneal_fraction`` of the run

Every run evaluates the held-out sets of A (tagged upstream: forgetting) and B (downstream:
adaptation) from step 0, densely right after the switch for CPT runs (the stability gap).

The experiment folder (``out``)::

    spec.yaml                 the resolved spec
    raw/                      built-in corpora written as jsonl.gz
    corpora/<name>.files.txt  the files each corpus was read from
    tokenizer/                byte-level BPE trained on a sample of both corpora (unless spec.tokenizer.path)
    data/<A>/, data/<B>/      token shards (+ heldout/) from `cpt prepare`
    runs/<run>/               one `cpt train` run directory per run
    results.md, results.csv   the table (see :data:`COLUMNS`)
    curves.png                upstream/downstream loss against cumulative tokens (CPT runs start at base_tokens),
                              and the CPT runs zoomed on their own token axis (the stability gap)
    report/                   `cpt report` over all runs (curves overlaid on each run's own token axis)

Finished runs (``export/config.json`` present and the metrics reaching the last step) are skipped; a
run with a valid checkpoint is resumed (``train(cfg, resume=True)``); a run directory with neither is
started again. A run directory whose saved config differs from the one the spec now asks for is an
error, never silently reused. So a killed grid is continued by running the same command again.
"""

from __future__ import annotations

import copy
import csv
import fnmatch
import glob as globlib
import gzip
import hashlib
import json
import os
import shutil
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from cpt.config import Strict

RESULTS_MD = "results.md"
RESULTS_CSV = "results.csv"
BUILTIN_JSONL = ("shakespeare", "python_stdlib")  # document generators, written to raw/<corpus>-<builtin>.jsonl.gz
BUILTIN_FOLDERS = ("site_packages", "torch_headers", "cuda_headers")  # folders of this machine, filtered by `globs`
SCHEDULES = ("rewarm_cosine", "infinite")


class ExperimentError(ValueError):
    """A spec or experiment folder that cannot be used; the message says what to change."""


# ================================================================ the spec


class CorpusInput(Strict):
    """One input of a corpus: a path (file, folder or glob pattern with ``**``) or a built-in corpus."""

    path: str | None = None
    builtin: Literal["shakespeare", "python_stdlib", "site_packages", "torch_headers", "cuda_headers"] | None = None

    @model_validator(mode="after")
    def _one(self) -> "CorpusInput":
        if (self.path is None) == (self.builtin is None):
            raise ValueError("give exactly one of path or builtin")
        return self


class CorpusSpec(Strict):
    """A corpus: inputs readable by `cpt prepare` (jsonl/.gz/parquet/plain text files, folders, globs)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    inputs: list[str | CorpusInput] = Field(min_length=1)
    # file-name patterns (fnmatch on the base name, like `cpt prepare --glob`) for files found in folders
    globs: list[str] = Field(default_factory=list)
    # path patterns (fnmatch on the full path) to leave out, e.g. "*/tests/*"
    exclude: list[str] = Field(default_factory=list)
    text_field: str = "text"
    # cap on the raw bytes read: a deterministic (seeded) sample of whole files, or of built-in documents
    max_mb: float | None = Field(None, gt=0)
    max_file_kb: float | None = Field(None, gt=0)  # skip larger files (generated code, data tables)
    allow_missing: bool = False  # skip inputs that do not exist on this machine (an error if nothing is left)
    heldout_docs: int = Field(50, gt=0)  # documents (files) split off as this corpus's held-out set

    def normalized_inputs(self) -> list[CorpusInput]:
        return [CorpusInput(path=i) if isinstance(i, str) else i for i in self.inputs]


class TokenizerTrain(Strict):
    vocab_size: int = Field(gt=256)
    sample_mb: float = Field(4.0, gt=0)  # raw text sampled from each corpus to train the BPE


class TokenizerSpec(Strict):
    """Train a byte-level BPE on both corpora (``train``) or use an existing tokenizer (``path``)."""

    train: TokenizerTrain | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _one(self) -> "TokenizerSpec":
        if (self.train is None) == (self.path is None):
            raise ValueError("give exactly one of tokenizer.train {vocab_size: ...} or tokenizer.path")
        return self


class LRSpec(Strict):
    max_lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-4, ge=0)
    warmup_fraction: float = Field(0.05, ge=0, lt=1)  # of the run's steps (at least 1 step when > 0)
    # infinite schedule only (CPT runs): warmup -> cooldown -> constant -> anneal
    constant_lr: float | None = Field(None, gt=0)  # default: max_lr / 2
    cooldown_fraction: float = Field(0.3, ge=0, lt=1)
    cooldown_shape: Literal["cosine", "linear", "inverse_sqrt"] = "cosine"
    anneal_fraction: float = Field(0.2, gt=0, le=1)
    anneal_shape: Literal["linear", "cosine", "exponential", "1-sqrt"] = "exponential"

    @model_validator(mode="after")
    def _order(self) -> "LRSpec":
        if self.min_lr > self.max_lr:
            raise ValueError(f"min_lr ({self.min_lr:g}) must not exceed max_lr ({self.max_lr:g})")
        if self.warmup_fraction + self.cooldown_fraction + self.anneal_fraction > 1:
            raise ValueError("warmup_fraction + cooldown_fraction + anneal_fraction must not exceed 1")
        return self

    @property
    def constant(self) -> float:
        return self.constant_lr if self.constant_lr is not None else self.max_lr / 2


class EvalSpec(Strict):
    evals_per_run: int = Field(10, gt=0)  # regular evaluations per run (every steps // evals_per_run steps)
    # CPT runs: evaluate every dense_every steps during the first dense_fraction of the run (stability gap)
    dense_fraction: float = Field(0.1, ge=0, le=1)
    dense_evals: int = Field(5, gt=0)
    tokens_per_set: int = Field(65536, gt=0)
    batch_size: int = Field(16, gt=0)
    # lm-eval tasks of every run, as eval.lm_eval.tasks (names or {name, tag: upstream|downstream, limit}):
    # scored at the same points as the held-out sets; tagged ones get benchmark columns in the results
    lm_eval_tasks: list[str | dict[str, Any]] = Field(default_factory=list)
    lm_eval_limit: int | None = Field(None, gt=0)


class WandbSpec(Strict):
    enabled: bool = False
    project: str = "cpt-experiments"
    mode: Literal["online", "offline", "disabled"] | None = None


class VariantSpec(Strict):
    """An extra CPT run next to the grid: one schedule and replay share, with `--set`-style overrides of its run
    config, e.g. MER ``["train.reptile.every=4", "train.reptile.epsilon=0.5"]`` or ``["data.document_masking=true"]``.
    It is named ``cpt-<schedule>-replay<pct>-<name>`` and compared in the same table."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    schedule: Literal["rewarm_cosine", "infinite"]
    replay: float = Field(ge=0, lt=1)
    overrides: list[str] = Field(min_length=1)


class ExperimentSpec(Strict):
    """The whole grid: corpora, tokenizer, model shape, budgets, replay shares x schedules, baseline."""

    name: str = Field("experiment", pattern=r"^[A-Za-z0-9_.-]+$")
    corpus_a: CorpusSpec  # the original distribution (upstream)
    corpus_b: CorpusSpec  # the new distribution (downstream)
    tokenizer: TokenizerSpec
    model: dict[str, Any]  # transformers config kwargs: {model_type: llama, hidden_size: ..., ...}
    seq_len: int = Field(gt=1)
    global_batch_size: int = Field(gt=0)
    micro_batch_size: int = Field(gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    base_tokens: int = Field(gt=0)  # rounded to whole steps of global_batch_size * seq_len tokens
    cpt_tokens: int = Field(gt=0)
    replay_shares: list[float] = Field(default_factory=lambda: [0.0, 0.05, 0.25], min_length=1)
    schedules: list[Literal["rewarm_cosine", "infinite"]] = Field(default_factory=lambda: list(SCHEDULES), min_length=1)
    variants: list[VariantSpec] = Field(default_factory=list)
    baseline: bool = True
    # the baseline's A:B mix: "budget" = base_tokens : cpt_tokens (the data base + CPT saw), "corpus" = the
    # corpora's token counts (A u B sampled uniformly)
    baseline_mix: Literal["budget", "corpus"] = "budget"
    base_lr: LRSpec = Field(default_factory=LRSpec)
    cpt_lr: LRSpec = Field(default_factory=LRSpec)
    baseline_lr: LRSpec | None = None  # default: base_lr
    optim: dict[str, Any] = Field(default_factory=lambda: {"weight_decay": 0.1, "grad_clip": 1.0})
    eval: EvalSpec = Field(default_factory=EvalSpec)
    checkpoints_per_run: int = Field(4, gt=0)  # resume checkpoints per run (a killed run resumes from the last)
    keep_checkpoints: int = Field(2, gt=0)
    max_epochs_warning: float = Field(8.0, gt=0)
    seed: int = 1234
    num_proc: int = Field(1, gt=0)  # tokenization processes for `cpt prepare`
    log_every: int = Field(10, gt=0)
    progress_bar: bool = True
    wandb: WandbSpec = Field(default_factory=WandbSpec)
    # `--set`-style overrides applied to every run config, e.g. ["model.compile=true"]
    run_overrides: list[str] = Field(default_factory=list)
    # torch CPU threads while the grid runs (None: torch's default). 1 is much faster for tiny models on a
    # busy machine: with 2 threads on 2 shared cores, OpenMP waits turned 37 ms steps into 590 ms ones
    torch_threads: int | None = Field(None, gt=0)
    # only for the plan printed by --dry-run: the training throughput you expect (tokens/s)
    assumed_tokens_per_s: float | None = Field(None, gt=0)

    @field_validator("replay_shares")
    @classmethod
    def _shares(cls, v: list[float]) -> list[float]:
        bad = [s for s in v if not 0 <= s < 1]
        if bad:
            raise ValueError(f"replay shares must be in [0, 1): {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate replay shares: {v}")
        return v

    @model_validator(mode="after")
    def _checks(self) -> "ExperimentSpec":
        errors = []
        if self.corpus_a.name == self.corpus_b.name:
            errors.append("corpus_a.name and corpus_b.name must differ")
        if self.global_batch_size % self.micro_batch_size:
            errors.append(f"global_batch_size ({self.global_batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})")
        if "model_type" not in self.model:
            errors.append("model: model_type is required (e.g. llama)")
        if len(set(self.schedules)) != len(self.schedules):
            errors.append(f"duplicate schedules: {self.schedules}")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            errors.append(f"duplicate variant names: {names}")
        for what in ("base_tokens", "cpt_tokens"):
            if getattr(self, what) < self.tokens_per_step:
                errors.append(f"{what} ({getattr(self, what)}) is less than one step ({self.tokens_per_step} tokens)")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    # -- derived numbers
    @property
    def corpora(self) -> list[CorpusSpec]:
        return [self.corpus_a, self.corpus_b]

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    @property
    def base_steps(self) -> int:
        return max(1, round(self.base_tokens / self.tokens_per_step))

    @property
    def cpt_steps(self) -> int:
        return max(1, round(self.cpt_tokens / self.tokens_per_step))


def load_spec(spec: str | os.PathLike | dict | ExperimentSpec, overrides: list[str] | None = None) -> ExperimentSpec:
    """An ExperimentSpec from a YAML file, a dict or a spec, with ``key=value`` overrides applied."""
    from cpt.config import ConfigError, apply_overrides, format_validation_error, read_yaml_mapping

    if isinstance(spec, ExperimentSpec):
        data = spec.model_dump(mode="json")
    elif isinstance(spec, dict):
        data = copy.deepcopy(spec)
    else:
        data = read_yaml_mapping(spec, "spec", "corpus_a, corpus_b, model, ...", ExperimentError)
    try:
        data = apply_overrides(data, overrides or [])
        return ExperimentSpec.model_validate(data)
    except ConfigError as e:
        raise ExperimentError(str(e)) from None
    except ValidationError as e:
        raise ExperimentError(format_validation_error(e).replace("invalid config", "invalid experiment spec", 1)) from None


# ================================================================ the runs


@dataclass
class RunPlan:
    name: str
    kind: Literal["base", "cpt", "baseline"]
    schedule: str  # "cosine" for base/baseline, else one of SCHEDULES
    replay: float | None
    steps: int
    config: dict[str, Any]  # the `cpt train` run config (a dict; validated by run_configs)

    @property
    def run_dir(self) -> Path:
        return Path(self.config["run"]["output_dir"])


def replay_label(share: float) -> str:
    pct = share * 100
    return f"{pct:.0f}" if abs(pct - round(pct)) < 1e-9 else f"{pct:g}"


def cpt_run_name(schedule: str, share: float) -> str:
    return f"cpt-{schedule}-replay{replay_label(share)}"


def _warmup_steps(frac: float, steps: int) -> int:
    return 0 if frac <= 0 else max(1, round(frac * steps))


def _cosine(lr: LRSpec, steps: int) -> dict[str, Any]:
    return {"type": "cosine", "max_lr": lr.max_lr, "min_lr": lr.min_lr,
            "warmup_steps": min(_warmup_steps(lr.warmup_fraction, steps), steps - 1), "warmup_from": 0.0}


def _infinite(lr: LRSpec, steps: int) -> dict[str, Any]:
    """Warmup -> cooldown to constant_lr -> constant -> anneal to min_lr over the last anneal_fraction."""
    anneal = max(1, round(lr.anneal_fraction * steps))
    warm = max(0, min(_warmup_steps(lr.warmup_fraction, steps), steps - anneal))
    cool = round(lr.cooldown_fraction * steps)
    cool = max(0, min(cool, steps - anneal - warm))
    const = min(lr.constant, lr.max_lr)
    if cool == 0:
        const = lr.max_lr  # no room for a cooldown: the constant phase stays at max_lr
    sched = {"type": "infinite", "max_lr": lr.max_lr, "min_lr": min(lr.min_lr, const), "warmup_steps": warm,
             "warmup_from": 0.0, "cooldown_steps": cool, "cooldown_shape": lr.cooldown_shape, "constant_lr": const,
             "anneal_steps": anneal, "anneal_shape": lr.anneal_shape}
    if lr.cooldown_shape == "inverse_sqrt":
        sched["timescale"] = max(1, warm)
    return sched


def plan_runs(spec: ExperimentSpec, out: Path, tokenizer_dir: Path, data_dir: Path,
              corpus_tokens: dict[str, int] | None = None) -> list[RunPlan]:
    """Every run of the grid as a `cpt train` config dict, in the order they run."""
    A, B = spec.corpus_a.name, spec.corpus_b.name
    runs_dir = out / "runs"
    src = {A: {"name": A, "path": str(data_dir / A)}, B: {"name": B, "path": str(data_dir / B)}}
    heldout = [
        {"name": A, "path": str(data_dir / A / "heldout"), "tag": "upstream"},
        {"name": B, "path": str(data_dir / B / "heldout"), "tag": "downstream"},
    ]
    arch = dict(spec.model)
    arch.setdefault("max_position_embeddings", spec.seq_len)

    def common(name: str, steps: int, dense: bool) -> dict[str, Any]:
        every = max(1, steps // spec.eval.evals_per_run)
        ev: dict[str, Any] = {"every": every, "at_start": True, "tokens_per_set": spec.eval.tokens_per_set,
                              "batch_size": spec.eval.batch_size}
        if dense and spec.eval.dense_fraction > 0:
            dense_steps = max(1, round(spec.eval.dense_fraction * steps))
            ev.update(dense_steps=dense_steps, dense_every=max(1, dense_steps // spec.eval.dense_evals))
        if spec.eval.lm_eval_tasks:
            ev["lm_eval"] = {"tasks": copy.deepcopy(spec.eval.lm_eval_tasks), "limit": spec.eval.lm_eval_limit, "every": every}
        wandb: dict[str, Any] = {"enabled": spec.wandb.enabled}
        if spec.wandb.enabled:
            wandb.update(project=spec.wandb.project, group=spec.name, mode=spec.wandb.mode, tags=[name])
        return {
            "run": {"name": f"{spec.name}-{name}", "output_dir": str(runs_dir / name), "seed": spec.seed},
            "model": {"tokenizer": str(tokenizer_dir), "arch": copy.deepcopy(arch)},
            "data": {"seq_len": spec.seq_len, "sources": [], "heldout": copy.deepcopy(heldout),
                     "max_epochs_warning": spec.max_epochs_warning},
            "stages": [],
            "optim": copy.deepcopy(spec.optim),
            "train": {"global_batch_size": spec.global_batch_size, "micro_batch_size": spec.micro_batch_size,
                      "precision": spec.precision, "log_every": min(spec.log_every, steps),
                      "progress_bar": spec.progress_bar},
            "eval": ev,
            "checkpoint": {"every": max(1, steps // spec.checkpoints_per_run), "keep": spec.keep_checkpoints,
                           "export_at_end": True},
            "logging": {"plot": False, "wandb": wandb},
        }

    plans: list[RunPlan] = []
    n_base, n_cpt = spec.base_steps, spec.cpt_steps

    cfg = common("base", n_base, dense=False)
    cfg["data"]["sources"] = [dict(src[A])]
    cfg["stages"] = [{"name": f"pretrain-{A}", "steps": n_base, "mix": {A: 1.0}, "schedule": _cosine(spec.base_lr, n_base)}]
    plans.append(RunPlan("base", "base", "cosine", None, n_base, cfg))

    base_export = str(runs_dir / "base" / "export")

    def cpt_run(name: str, schedule: str, share: float) -> RunPlan:
        cfg = common(name, n_cpt, dense=True)
        cfg["data"]["sources"] = [dict(src[B])] + ([{**src[A], "replay": True}] if share > 0 else [])
        mix = {B: 1.0 - share, **({A: share} if share > 0 else {})}
        sched = _cosine(spec.cpt_lr, n_cpt) if schedule == "rewarm_cosine" else _infinite(spec.cpt_lr, n_cpt)
        cfg["stages"] = [{"name": f"cpt-{B}", "steps": n_cpt, "mix": mix, "schedule": sched}]
        cfg["train"]["init_from"] = base_export
        return RunPlan(name, "cpt", schedule, share, n_cpt, cfg)

    for schedule in spec.schedules:
        for share in spec.replay_shares:
            plans.append(cpt_run(cpt_run_name(schedule, share), schedule, share))
    for v in spec.variants:
        from cpt.config import ConfigError, apply_overrides

        plan = cpt_run(f"{cpt_run_name(v.schedule, v.replay)}-{v.name}", v.schedule, v.replay)
        try:
            plan.config = apply_overrides(plan.config, v.overrides)
        except ConfigError as e:
            raise ExperimentError(f"variants: {v.name}: {e}") from None
        plans.append(plan)

    if spec.baseline:
        n = n_base + n_cpt
        if spec.baseline_mix == "budget" or not corpus_tokens:
            wa, wb = float(n_base), float(n_cpt)
        else:
            wa, wb = float(corpus_tokens[A]), float(corpus_tokens[B])
        cfg = common("baseline-scratch", n, dense=False)
        cfg["data"]["sources"] = [dict(src[A]), dict(src[B])]
        cfg["stages"] = [{"name": f"scratch-{A}+{B}", "steps": n, "mix": {A: wa / (wa + wb), B: wb / (wa + wb)},
                          "schedule": _cosine(spec.baseline_lr or spec.base_lr, n)}]
        plans.append(RunPlan("baseline-scratch", "baseline", "cosine", None, n, cfg))

    for p in plans:
        if spec.run_overrides:
            from cpt.config import apply_overrides

            p.config = apply_overrides(p.config, spec.run_overrides)
    return plans


def run_configs(plans: list[RunPlan]):
    """Validate every run config up front: one error naming every bad run."""
    from cpt.config import ConfigError, validate

    out, errors = {}, []
    for p in plans:
        try:
            out[p.name] = validate(p.config)
        except ConfigError as e:
            errors.append(f"run {p.name}: {e}")
    if errors:
        raise ExperimentError("\n".join(errors))
    return out


# ================================================================ corpora and tokenizer


def _builtin_folder(kind: str) -> Path:
    if kind == "site_packages":
        return Path(sysconfig.get_paths()["purelib"])
    if kind == "torch_headers":
        import importlib.util

        found = importlib.util.find_spec("torch")
        if found is None or not found.origin:
            return Path("<torch is not installed>")
        return Path(found.origin).parent / "include"
    if kind == "cuda_headers":
        home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
        return Path(home) / "include"
    raise ExperimentError(f"unknown builtin folder {kind!r}")


def _walk(folder: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for f in sorted(filenames):
            if not f.startswith("."):
                yield Path(dirpath) / f


def _hash_key(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


def _builtin_docs(kind: str, max_bytes: float | None) -> Iterator[dict]:
    from cpt.demo import python_stdlib_docs, shakespeare_docs

    return (shakespeare_docs if kind == "shakespeare" else python_stdlib_docs)(max_bytes)


def _write_jsonl_atomic(docs: Iterator[dict], path: Path) -> tuple[Path, int]:
    """Write documents to ``path`` (jsonl.gz) once; return it and its text bytes (kept in ``<path>.bytes``)."""
    sidecar = path.with_name(path.name + ".bytes")
    if path.is_file() and sidecar.is_file():
        return path, int(sidecar.read_text())  # written earlier: keep it (its mtime is part of prepare's key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
            n += len(d["text"].encode("utf-8"))
    sidecar.write_text(str(n))
    os.replace(tmp, path)
    return path, n


def resolve_corpus(c: CorpusSpec, raw_dir: Path | None, seed: int, echo: Callable = print) -> tuple[list[str], int]:
    """The files `cpt prepare` reads for corpus ``c`` (built-ins written to ``raw_dir``), and their bytes.

    ``raw_dir=None`` (a dry run) writes nothing: built-in document corpora are measured, not written.
    """
    files: list[Path] = []
    builtin_files: list[Path] = []
    missing = []
    max_bytes = c.max_mb * 1e6 if c.max_mb else None
    dry_bytes = 0  # text bytes of the built-in document corpora
    for inp in c.normalized_inputs():
        if inp.builtin in BUILTIN_JSONL:
            if raw_dir is None:
                dry_bytes += sum(len(d["text"]) for d in _builtin_docs(inp.builtin, max_bytes))
                builtin_files.append(Path(f"<builtin {inp.builtin}>"))
                continue
            suffix = f"-{c.max_mb:g}mb" if c.max_mb else ""
            path = raw_dir / f"{c.name}-{inp.builtin}{suffix}.jsonl.gz"
            written, n = _write_jsonl_atomic(_builtin_docs(inp.builtin, max_bytes), path)
            builtin_files.append(written)
            dry_bytes += n
            continue
        if inp.builtin is not None:
            roots = [_builtin_folder(inp.builtin)]
        elif any(ch in inp.path for ch in "*?["):
            roots = [Path(p) for p in sorted(globlib.glob(os.path.expanduser(inp.path), recursive=True))]
        else:
            roots = [Path(os.path.expanduser(inp.path))]
        label = inp.builtin or inp.path
        found_any = False
        for root in roots:
            if root.is_dir():
                for f in _walk(root):
                    found_any = True
                    if c.globs and not any(fnmatch.fnmatch(f.name, g) for g in c.globs):
                        continue
                    files.append(f)
            elif root.is_file():
                found_any = True
                files.append(root)
        if not found_any:
            missing.append(f"{label} ({roots[0] if roots else 'no match'})")
    if missing and not c.allow_missing:
        raise ExperimentError(f"corpus {c.name}: inputs not found: {missing} (set allow_missing: true to skip them)")
    for m in missing:
        echo(f"corpus {c.name}: skipping missing input {m}")

    # de-duplicate, exclude, size filter, then a seeded sample of whole files under max_mb
    seen, kept = set(), []
    for f in files:
        key = os.path.realpath(f)
        if key in seen or any(fnmatch.fnmatch(str(f), pat) for pat in c.exclude):
            continue
        seen.add(key)
        kept.append(f)
    sizes = {}
    for f in kept:
        try:
            size = f.stat().st_size
        except OSError:
            continue
        if size == 0 or (c.max_file_kb and size > c.max_file_kb * 1e3):
            continue
        sizes[f] = size
    chosen = sorted(sizes)
    if max_bytes is not None:
        budget = max_bytes - dry_bytes
        picked, total = [], 0
        for f in sorted(sizes, key=lambda p: _hash_key(seed, str(p))):
            if total >= budget:
                break
            picked.append(f)
            total += sizes[f]
        chosen = sorted(picked)
    out = [str(p) for p in builtin_files] + [str(p) for p in chosen]
    nbytes = dry_bytes + sum(sizes[p] for p in chosen)
    if not out:
        raise ExperimentError(f"corpus {c.name}: no input files found" + (f" matching {c.globs}" if c.globs else ""))
    return out, nbytes


def _sample_texts(files: list[str], text_field: str, max_bytes: float, seed: int) -> Iterator[str]:
    """Documents from a seeded sample of ``files`` (whole files), about ``max_bytes`` of text."""
    from cpt.data.prepare import _Counts, iter_documents

    total = 0
    for f in sorted(files, key=lambda p: _hash_key(seed, p)):
        for text in iter_documents([f], text_field, _Counts()):
            yield text
            total += len(text)
            if total >= max_bytes:
                return


def build_tokenizer(spec: ExperimentSpec, files: dict[str, list[str]], out_dir: Path, echo: Callable = print):
    """Train (once) a byte-level BPE on a sample of both corpora, or load spec.tokenizer.path."""
    from transformers import AutoTokenizer

    if spec.tokenizer.path is not None:
        return AutoTokenizer.from_pretrained(spec.tokenizer.path), Path(spec.tokenizer.path)
    t = spec.tokenizer.train
    key = json.dumps({"vocab_size": t.vocab_size, "sample_mb": t.sample_mb, "seed": spec.seed,
                      "corpora": {k: _hash_key(0, "\n".join(v)) for k, v in sorted(files.items())}}, sort_keys=True)
    key_file = out_dir / "experiment_tokenizer_key.json"
    if (out_dir / "tokenizer.json").is_file():
        if key_file.is_file() and key_file.read_text() == key:
            return AutoTokenizer.from_pretrained(str(out_dir)), out_dir
        raise ExperimentError(
            f"{out_dir} holds a tokenizer trained for a different spec (corpora, vocab_size or sample): "
            "use another --out, or delete the experiment folder to start over")
    from cpt.demo import train_tokenizer

    sample_dir = out_dir.parent / "tokenizer_sample"
    sample_files = []
    for name, fl in files.items():
        p = sample_dir / f"{name}.jsonl.gz"
        tmp = p.with_name(p.name + ".tmp")
        p.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as f:
            for text in _sample_texts(fl, _text_field(spec, name), t.sample_mb * 1e6, spec.seed):
                f.write(json.dumps({"text": text}) + "\n")
        os.replace(tmp, p)
        sample_files.append(p)
    echo(f"tokenizer: byte-level BPE, {t.vocab_size} tokens, trained on {t.sample_mb:g} MB of each corpus -> {out_dir}")
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    train_tokenizer(sample_files, t.vocab_size, staging)
    (staging / key_file.name).write_text(key)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(staging, out_dir)
    shutil.rmtree(sample_dir, ignore_errors=True)
    return AutoTokenizer.from_pretrained(str(out_dir)), out_dir


def _text_field(spec: ExperimentSpec, corpus: str) -> str:
    return next(c.text_field for c in spec.corpora if c.name == corpus)


# ================================================================ FLOPs


def model_shape_for(arch: dict[str, Any], vocab_size: int) -> dict[str, int]:
    """Parameter count, layers and hidden size of the spec's model, built on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from cpt.model import model_shape

    kw = dict(arch)
    model_type = kw.pop("model_type")
    kw["vocab_size"] = vocab_size
    config = AutoConfig.for_model(model_type, **kw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model_shape(model)


def flops_per_token(spec: ExperimentSpec, vocab_size: int) -> tuple[float, dict[str, int]]:
    from cpt.metrics import model_flops_per_token

    arch = dict(spec.model)
    arch.setdefault("max_position_embeddings", spec.seq_len)
    shape = model_shape_for(arch, vocab_size)
    return model_flops_per_token(shape["n_params"], shape["n_layers"], shape["hidden"], spec.seq_len), shape


# ================================================================ running


def run_finished(run_dir: Path, total_steps: int) -> bool:
    """``export/config.json`` exists and metrics.jsonl has a record at the last step."""
    from cpt.metrics import METRICS_FILE, read_metrics

    if not (run_dir / "export" / "config.json").is_file() or not (run_dir / METRICS_FILE).is_file():
        return False
    return any(r.get("step") == total_steps for r in read_metrics(run_dir))


_IGNORED_KEYS = ("train.progress_bar", "train.log_every", "logging.", "eval.batch_size")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def check_same_config(run_dir: Path, cfg) -> None:
    """Refuse to skip or resume a run directory made by a different config (a changed spec)."""
    from cpt.config import config_to_dict

    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    old = _flatten(yaml.safe_load(saved.read_text()) or {})
    new = _flatten(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg), sort_keys=False)))
    diff = sorted(k for k in set(old) | set(new)
                  if old.get(k) != new.get(k) and not any(k == i or k.startswith(i) for i in _IGNORED_KEYS))
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
        raise ExperimentError(
            f"{run_dir} was made by a different config ({shown}{' ...' if len(diff) > 6 else ''}): the spec changed "
            "since that run. Use another --out, or delete that run directory to run it again")


def run_one(plan: RunPlan, cfg, echo: Callable = print) -> str:
    """Train one run unless it is finished; resume it from its checkpoint when it was killed.
    Returns "skipped", "resumed", "trained" or "preempted"."""
    from cpt.checkpoint import latest_valid_checkpoint
    from cpt.train import train

    run_dir = plan.run_dir
    check_same_config(run_dir, cfg)
    if run_finished(run_dir, plan.steps):
        return "skipped"
    ckpt = latest_valid_checkpoint(run_dir) if (run_dir / "checkpoints").is_dir() else None
    if ckpt is not None:
        echo(f"--- {plan.name}: resuming from {ckpt}")
        result = train(cfg, resume=True, echo=echo)
        status = "resumed"
    else:
        if run_dir.exists():
            echo(f"--- {plan.name}: {run_dir} has no usable checkpoint: starting the run again")
            shutil.rmtree(run_dir)
        echo(f"--- {plan.name}: {plan.steps} steps")
        result = train(cfg, resume=False, echo=echo)
        status = "trained"
    stopped = result.stopped_early  # "preempted": SIGTERM/SIGUSR1, a checkpoint was saved
    del result
    _free_memory()
    if stopped:
        return "preempted"
    if not run_finished(run_dir, plan.steps):
        raise ExperimentError(f"run {plan.name} ended without reaching step {plan.steps} or without its export")
    return status


def _free_memory() -> None:
    """Drop the finished run's model and optimizer before the next run (one process runs the whole grid)."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _prepare_data(spec: ExperimentSpec, out: Path, echo: Callable):
    from cpt.data.prepare import prepare

    files, nbytes = {}, {}
    for c in spec.corpora:
        files[c.name], nbytes[c.name] = resolve_corpus(c, out / "raw", spec.seed, echo)
        listing = out / "corpora" / f"{c.name}.files.txt"
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text("\n".join(files[c.name]) + "\n")
        echo(f"corpus {c.name}: {len(files[c.name])} files, {nbytes[c.name] / 1e6:.1f} MB  (list: {listing})")
    tokenizer, tok_dir = build_tokenizer(spec, files, out / "tokenizer", echo)
    tokens = {}
    for c in spec.corpora:
        manifest = prepare(files[c.name], tokenizer, out / "data" / c.name, text_field=c.text_field,
                           heldout_docs=c.heldout_docs, seed=spec.seed, num_proc=spec.num_proc,
                           echo=lambda *a: None)
        tokens[c.name] = int(manifest["num_tokens"]) if "num_tokens" in manifest else _num_tokens(out / "data" / c.name)
        held = _num_tokens(out / "data" / c.name / "heldout")
        evaluated = "all of them" if held <= spec.eval.tokens_per_set else \
            f"each evaluation a seeded sample of whole documents, {spec.eval.tokens_per_set:,} tokens"
        echo(f"data {c.name}: {tokens[c.name]:,} training tokens, {held:,} held-out tokens ({evaluated})")
    return tokenizer, tok_dir, tokens


def _num_tokens(path: Path) -> int:
    from cpt.data.shards import TokenShards

    return TokenShards.open(str(path), verify=False).num_tokens


def run_experiment(spec_path_or_spec: str | os.PathLike | dict | ExperimentSpec, out_dir: str | os.PathLike | None = None,
                   echo: Callable = print, *, overrides: list[str] | None = None, max_runs: int | None = None,
                   dry_run: bool = False) -> Path:
    """Run (or continue) the grid and write ``<out>/results.md`` and ``results.csv``; return results.md.

    ``max_runs``: train at most this many runs in this call (skipped runs do not count), then write the
    table of what is finished and return; call again to continue. ``dry_run``: print the plan
    (corpora sizes, runs, steps, LR schedules, FLOPs, time at ``assumed_tokens_per_s``) and write nothing.
    """
    spec = load_spec(spec_path_or_spec, overrides)  # (a dataset sequence: cpt.experiment_sequence.run_sequence_experiment)
    out = Path(out_dir) if out_dir is not None else Path("runs") / "experiments" / spec.name
    if dry_run:
        return _dry_run(spec, out, echo)
    import torch

    threads = torch.get_num_threads()
    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    try:
        return _run(spec, out, echo, max_runs)
    finally:
        torch.set_num_threads(threads)


def _run(spec: ExperimentSpec, out: Path, echo: Callable, max_runs: int | None) -> Path:
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    from cpt.redaction import redact_spec

    (out / "spec.yaml").write_text(yaml.safe_dump(redact_spec(spec.model_dump(mode="json")), sort_keys=False))
    echo(f"experiment {spec.name} -> {out}")
    tokenizer, tok_dir, corpus_tokens = _prepare_data(spec, out, echo)
    plans = plan_runs(spec, out, tok_dir, out / "data", corpus_tokens)
    cfgs = run_configs(plans)

    counts = {"skipped": 0, "trained": 0, "resumed": 0}
    stopped = None
    for plan in plans:
        if max_runs is not None and counts["trained"] + counts["resumed"] >= max_runs and not run_finished(plan.run_dir, plan.steps):
            stopped = f"stopped after {max_runs} run(s) (max_runs): run the same command again to continue"
            break
        status = run_one(plan, cfgs[plan.name], echo)
        if status == "preempted":
            stopped = f"{plan.name} was preempted (checkpoint saved): run the same command again to resume"
            break
        counts[status] += 1
        if status == "skipped":
            echo(f"--- {plan.name}: finished earlier, skipped")

    fpt, shape = flops_per_token(spec, len(tokenizer))
    rows = collect_results(spec, plans, fpt)
    md = write_results(spec, rows, out, fpt, shape, corpus_tokens)
    finished = [p.run_dir for p in plans if run_finished(p.run_dir, p.steps)]
    if finished:
        from cpt.report import write_report

        write_report(finished, out / "report")
        plot_curves(spec, plans, out / "curves.png")
    minutes = (time.perf_counter() - t0) / 60
    echo(md.read_text())
    echo(f"runs: {counts['trained']} trained, {counts['resumed']} resumed, {counts['skipped']} skipped; {minutes:.1f} min")
    if stopped:
        echo(stopped)
    echo(f"table: {md} and {out / RESULTS_CSV}; curves: {out / 'curves.png'}; report: {out / 'report' / 'report.html'}")
    return md


def _dry_run(spec: ExperimentSpec, out: Path, echo: Callable) -> Path:
    from cpt.schedules import LRPlan, ScheduleConfig

    for c in spec.corpora:
        files, nbytes = resolve_corpus(c, None, spec.seed, echo)
        echo(f"corpus {c.name}: {len(files)} files, {nbytes / 1e6:.1f} MB")
    vocab = spec.tokenizer.train.vocab_size if spec.tokenizer.train else None
    if vocab is None:
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(spec.tokenizer.path))
    plans = plan_runs(spec, out, out / "tokenizer", out / "data")
    run_configs(plans)
    fpt, shape = flops_per_token(spec, vocab)
    echo(f"model: {shape['n_params'] / 1e6:.1f}M parameters ({shape['n_params_non_embedding'] / 1e6:.1f}M non-embedding), "
         f"{shape['n_layers']} layers, hidden {shape['hidden']}; {fpt:.3g} training FLOPs/token")
    total_tokens = 0
    for p in plans:
        st = p.config["stages"][0]
        lr = LRPlan([(st["steps"], ScheduleConfig(**st["schedule"]))])
        marks = sorted({0, p.steps // 4, p.steps // 2, 3 * p.steps // 4, p.steps - 1})
        tokens = p.steps * spec.tokens_per_step
        total_tokens += tokens
        echo(f"  {p.name:<28} {p.steps:>6} steps {tokens:>14,} tokens  mix {st['mix']}  "
             + " ".join(f"lr[{m}]={lr.lr(m):.2e}" for m in marks))
        variant = next((v for v in spec.variants if p.name == f"{cpt_run_name(v.schedule, v.replay)}-{v.name}"), None)
        if variant is not None:
            from cpt.redaction import redact_override

            echo(f"  {'':<28} variant overrides: {' '.join(redact_override(o) for o in variant.overrides)}")
    echo(f"total: {total_tokens:,} training tokens, {total_tokens * fpt:.3g} FLOPs")
    if spec.assumed_tokens_per_s:
        echo(f"at {spec.assumed_tokens_per_s:,.0f} tokens/s: {total_tokens / spec.assumed_tokens_per_s / 60:.1f} min of training "
             "(plus data preparation, evaluation and start-up)")
    return out / RESULTS_MD


# ================================================================ results


COLUMNS = [
    ("run", "run"), ("kind", "kind"), ("schedule", "schedule"), ("replay", "replay"), ("steps", "steps"),
    ("tokens", "tokens (run)"), ("tokens_incl_base", "tokens (incl. base)"),
    ("flops", "FLOPs (run)"), ("flops_incl_base", "FLOPs (incl. base)"), ("device_hours", "device-hours (run)"),
    ("upstream_final", "upstream loss"), ("downstream_final", "downstream loss"), ("mean_final", "mean"),
    ("forgetting_vs_base", "forgetting vs base"), ("worst_upstream", "worst upstream (CPT)"),
    ("worst_upstream_step", "worst at step"), ("adaptation_vs_base", "adaptation vs base"),
    ("upstream_step0", "upstream step 0"), ("downstream_step0", "downstream step 0"),
]


def _series(run_dir: Path, key: str) -> tuple[list[float], list[float], list[int]]:
    from cpt.report import load_run

    return load_run(run_dir).series(key)


def collect_results(spec: ExperimentSpec, plans: list[RunPlan], fpt: float) -> list[dict[str, Any]]:
    """One row per finished run (see :data:`COLUMNS`); losses in nats per token on the held-out sets.

    forgetting vs base = final upstream loss - the base model's upstream loss (for CPT runs: their own
    step-0 evaluation, i.e. the base export; for the baseline: the base run's final evaluation);
    adaptation vs base = the base model's downstream loss - final downstream loss;
    worst upstream (CPT) = the highest upstream loss a CPT run logged (step 0 included: the stability gap).
    FLOPs = tokens x (6 N + 12 layers x hidden x seq_len) (llm-foundry; evaluation not counted);
    "incl. base" adds the base run's tokens/FLOPs to the CPT runs (the baseline and base need none);
    device-hours = the run's measured wall time x devices (`compute/device_hours`, evaluation included).
    """
    A, B = spec.corpus_a.name, spec.corpus_b.name
    rows: list[dict[str, Any]] = []
    base_tokens = spec.base_steps * spec.tokens_per_step
    base_up = base_down = None
    for p in plans:
        if not run_finished(p.run_dir, p.steps):
            continue
        _, up, up_steps = _series(p.run_dir, f"eval/{A}/loss")
        _, down, _ = _series(p.run_dir, f"eval/{B}/loss")
        toks, _, _ = _series(p.run_dir, "train/tokens")
        _, hours, _ = _series(p.run_dir, "compute/device_hours")
        tokens = int(toks[-1]) if toks else p.steps * spec.tokens_per_step
        row: dict[str, Any] = {
            "run": p.name, "kind": p.kind, "schedule": p.schedule,
            "replay": p.replay if p.replay is not None else "", "steps": p.steps,
            "tokens": tokens, "tokens_incl_base": tokens + (base_tokens if p.kind == "cpt" else 0),
            "flops": tokens * fpt, "flops_incl_base": (tokens + (base_tokens if p.kind == "cpt" else 0)) * fpt,
            "device_hours": hours[-1] if hours else None,
            "upstream_final": up[-1] if up else None, "downstream_final": down[-1] if down else None,
            "upstream_step0": up[0] if up else None, "downstream_step0": down[0] if down else None,
        }
        row["mean_final"] = (row["upstream_final"] + row["downstream_final"]) / 2 if up and down else None
        if p.kind == "base":
            base_up, base_down = row["upstream_final"], row["downstream_final"]
            ref_up, ref_down = None, None
        elif p.kind == "cpt":
            ref_up, ref_down = row["upstream_step0"], row["downstream_step0"]
        else:
            ref_up, ref_down = base_up, base_down
        row["forgetting_vs_base"] = row["upstream_final"] - ref_up if ref_up is not None and up else None
        row["adaptation_vs_base"] = ref_down - row["downstream_final"] if ref_down is not None and down else None
        if p.kind == "cpt" and up:
            i = max(range(len(up)), key=lambda j: up[j])
            row["worst_upstream"], row["worst_upstream_step"] = up[i], up_steps[i]
        else:
            row["worst_upstream"], row["worst_upstream_step"] = None, None
        row.update(benchmark_cells(p.run_dir, p.kind))
        rows.append(row)
    return rows


def benchmark_cells(run_dir: Path, kind: str) -> dict[str, Any]:
    """Tagged lm-eval metrics of a run (see cpt.report.benchmark_summary): ``<task>/<metric> final`` and, for CPT
    runs (whose step 0 is the base model), ``... change`` (forgetting or adaptation vs step 0, positive = worse /
    better), its ``stderr``, ``worst`` and ``noise`` (the change is within two standard errors)."""
    from cpt.report import benchmark_summary, load_run

    cells: dict[str, Any] = {}
    for b in benchmark_summary(load_run(run_dir)):
        name = f"{b['task']}/{b['metric']}"
        cells[f"{name} final"] = b["final"]
        if kind == "cpt":
            cells[f"{name} {'forgetting' if b['tag'] == 'upstream' else 'adaptation'}"] = b["change"]
            cells[f"{name} stderr"] = b["change_stderr"]
            cells[f"{name} worst"] = b["worst"]
            cells[f"{name} noise"] = b["noise"]
    return cells


def result_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """:data:`COLUMNS` and the benchmark columns of the rows, in first-seen order."""
    known = {k for k, _ in COLUMNS}
    extra = list(dict.fromkeys(k for r in rows for k in r if k not in known))
    return COLUMNS + [(k, k) for k in extra]


def _fmt(key: str, v: Any) -> str:
    if v is None or v == "":
        return "–"
    if key in ("flops", "flops_incl_base"):
        return f"{v:.3e}"
    if key == "device_hours":
        return f"{v:.3g}"
    if key in ("tokens", "tokens_incl_base", "steps", "worst_upstream_step"):
        return f"{int(v):,}"
    if key == "replay":
        return f"{v * 100:g}%"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if key.endswith((" forgetting", " adaptation")):
        return f"{v:+.4f}"
    if key in ("forgetting_vs_base", "adaptation_vs_base"):
        return f"{v:+.4f}"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def write_results(spec: ExperimentSpec, rows: list[dict[str, Any]], out: Path, fpt: float, shape: dict[str, int],
                  corpus_tokens: dict[str, int]) -> Path:
    A, B = spec.corpus_a.name, spec.corpus_b.name
    with open(out / (RESULTS_CSV + ".tmp"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([k for k, _ in result_columns(rows)])
        for r in rows:
            w.writerow(["" if r.get(k) is None else r.get(k) for k, _ in result_columns(rows)])
    os.replace(out / (RESULTS_CSV + ".tmp"), out / RESULTS_CSV)

    lines = [
        f"# Experiment `{spec.name}`: replay x schedule grid against re-training from scratch",
        "",
        f"Corpus A (upstream, original) = `{A}` ({corpus_tokens.get(A, 0):,} training tokens), corpus B (downstream, new) = "
        f"`{B}` ({corpus_tokens.get(B, 0):,} training tokens). Model: {shape['n_params'] / 1e6:.2f}M parameters, "
        f"{shape['n_layers']} layers, hidden {shape['hidden']}, seq_len {spec.seq_len}, "
        f"{spec.tokens_per_step:,} tokens per step, precision {spec.precision}.",
        "",
        "Losses: mean next-token cross-entropy (nats) on the held-out sets of A (upstream) and B (downstream), at the end of "
        "each run; mean = (upstream + downstream) / 2. Forgetting vs base = final upstream - base model's upstream loss "
        "(for CPT runs: their step-0 evaluation of the base export); adaptation vs base = base model's downstream loss - final "
        "downstream loss. Worst upstream (CPT) = highest upstream loss logged during a CPT run (the stability gap) and its step. "
        f"FLOPs = tokens x {fpt:.4g} FLOPs/token (6N + 12 x layers x hidden x seq_len, llm-foundry convention; evaluation not "
        "counted); \"incl. base\" adds the base run's tokens and FLOPs to each CPT run, so it compares with the baseline's.",
        "",
        "| " + " | ".join(h for _, h in result_columns(rows)) + " |",
        "|" + "|".join("---" if k in ("run", "kind", "schedule") else "---:" for k, _ in result_columns(rows)) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(k, r.get(k)) for k, _ in result_columns(rows)) + " |")
    if any(k.endswith(" final") for r in rows for k in r):
        lines += ["", "Benchmarks (tagged lm-eval tasks): final score; for CPT runs the change against their step 0 (the base "
                  "model), signed so that positive forgetting/adaptation means worse/better, its standard error "
                  "(sqrt(se_0^2 + se^2)), the worst score seen, and noise = yes when the change is within two standard errors."]
    lines += ["", *summary_lines(rows)]
    path = out / RESULTS_MD
    path.write_text("\n".join(lines) + "\n")
    return path


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Plain statements read off the table (no claims beyond the numbers)."""
    by = {r["run"]: r for r in rows}
    cpt = [r for r in rows if r["kind"] == "cpt" and r.get("mean_final") is not None]
    base = by.get("base")
    scratch = by.get("baseline-scratch")
    out = []
    if cpt:
        best = min(cpt, key=lambda r: r["mean_final"])
        out.append(f"- Lowest mean loss among CPT runs: `{best['run']}` ({best['mean_final']:.4f}).")
        if scratch and scratch.get("mean_final") is not None:
            d = best["mean_final"] - scratch["mean_final"]
            out.append(f"- Re-training baseline mean loss {scratch['mean_final']:.4f}: the best CPT run is "
                       f"{'lower' if d < 0 else 'higher'} by {abs(d):.4f} nats, using {best['tokens']:,} new tokens "
                       f"({best['flops'] / scratch['flops']:.0%} of the baseline's FLOPs) on top of the existing base model.")
        grid = [r for r in cpt if r["run"] == cpt_run_name(r["schedule"], r["replay"])]  # variants aside
        for sched in sorted({r["schedule"] for r in grid}):
            rs = sorted((r for r in grid if r["schedule"] == sched), key=lambda r: r["replay"])
            if len(rs) > 1:
                out.append(f"- {sched}: forgetting by replay share " + ", ".join(
                    f"{r['replay'] * 100:g}% {r['forgetting_vs_base']:+.4f}" for r in rs)
                    + "; downstream loss " + ", ".join(f"{r['replay'] * 100:g}% {r['downstream_final']:.4f}" for r in rs) + ".")
        shares = sorted({r["replay"] for r in cpt})
        pairs = []
        for s in shares:
            rc = by.get(cpt_run_name("rewarm_cosine", s))
            inf = by.get(cpt_run_name("infinite", s))
            if rc and inf:
                pairs.append(f"{s * 100:g}% {inf['mean_final'] - rc['mean_final']:+.4f}")
        if pairs:
            out.append("- Mean loss, infinite minus re-warmed cosine, per replay share: " + ", ".join(pairs) + ".")
        for v in (r for r in cpt if r not in grid):
            twin = by.get(cpt_run_name(v["schedule"], v["replay"]))
            if twin and twin.get("mean_final") is not None:
                out.append(f"- Variant `{v['run']}` against `{twin['run']}`: forgetting {v['forgetting_vs_base']:+.4f} vs "
                           f"{twin['forgetting_vs_base']:+.4f}, downstream loss {v['downstream_final']:.4f} vs "
                           f"{twin['downstream_final']:.4f}, mean {v['mean_final']:.4f} vs {twin['mean_final']:.4f}.")
    if base:
        out.append(f"- Base model: upstream {base['upstream_final']:.4f}, downstream {base['downstream_final']:.4f}.")
    return out


def plot_curves(spec: ExperimentSpec, plans: list[RunPlan], path: Path) -> Path | None:
    """Upstream and downstream held-out loss. Top row: against cumulative tokens (CPT curves start where base
    ends). Bottom row: the CPT runs alone on their own token axis, zoomed to their losses, so the stability gap
    right after the switch is visible (on the shared axis the CPT runs occupy the last part only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    A, B = spec.corpus_a.name, spec.corpus_b.name
    base_tokens = spec.base_steps * spec.tokens_per_step
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    shares = sorted({p.replay for p in plans if p.replay is not None})
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    drawn = 0
    for col, (name, tag) in enumerate(((A, "upstream"), (B, "downstream"))):
        ax, zoom = axes[0][col], axes[1][col]
        all_vals: list[float] = []
        cpt_vals: list[float] = []
        for p in plans:
            if not run_finished(p.run_dir, p.steps):
                continue
            toks, vals, _ = _series(p.run_dir, f"eval/{name}/loss")
            if not vals:
                continue
            offset = base_tokens if p.kind == "cpt" else 0
            all_vals += vals
            if p.kind == "cpt":
                cpt_vals += vals
            if p.kind == "base":
                style = dict(color="black", linestyle="-", linewidth=2)
            elif p.kind == "baseline":
                style = dict(color="grey", linestyle="--", linewidth=2)
            else:
                style = dict(color=colours[shares.index(p.replay) % len(colours)],
                             linestyle="-" if p.schedule == "rewarm_cosine" else ":", linewidth=1.5)
            marker = dict(marker="o" if len(vals) < 40 else None, markersize=2)
            ax.plot([t + offset for t in toks], vals, label=p.name, **marker, **style)
            if p.kind == "cpt":
                zoom.plot(toks, vals, label=p.name, **marker, **style)
            drawn += 1
        if cpt_vals:  # random-init losses at step 0 would flatten the interesting part
            lo, hi = min(all_vals), max(cpt_vals)
            ax.set_ylim(lo - 0.05 * (hi - lo + 1e-6), hi + 0.6 * (hi - lo + 1e-6))
            lo, hi = min(cpt_vals), max(cpt_vals)
            zoom.set_ylim(lo - 0.05 * (hi - lo + 1e-6), hi + 0.1 * (hi - lo + 1e-6))
        ax.axvline(base_tokens, color="black", linestyle=":", alpha=0.5, linewidth=1)
        ax.set_title(f"{tag}: held-out {name}")
        ax.set_xlabel("cumulative tokens (CPT runs start after the base run's tokens)")
        zoom.set_title(f"{tag}: held-out {name}, CPT runs only (zoomed: the stability gap)")
        zoom.set_xlabel("tokens of the CPT run")
        for a in (ax, zoom):
            a.set_ylabel("loss (nats/token)")
            a.grid(alpha=0.3)
    if not drawn:
        plt.close(fig)
        return None
    axes[0][1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{spec.name}: solid = re-warm/re-decay cosine, dotted = infinite + anneal; colour = replay share")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
