"""The spec of `cpt experiment`: what to run, as strict pydantic models (a misspelt field is an error naming it).

Two kinds of spec, told apart by their corpora (:func:`is_sequence_spec`):

    ExperimentSpec   corpus_a, corpus_b: the pair grid (base, CPT per replay share x schedule, variants, baseline;
                     cpt/experiment/grid.py)
    SequenceSpec     corpora: [A, B, C, ...]: a dataset sequence and its forgetting matrix (cpt/experiment/sequence.py)

Both use the corpus, tokenizer, LR, evaluation and W&B sections defined here and inherit the fields they share from
:class:`SpecCommon`. :func:`load_spec` reads either from a YAML file, a dict or a spec, with ``--set``-style overrides
applied.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from cpt.config import Strict

SCHEDULES = ("rewarm_cosine", "infinite")  # the CPT schedules of the pair grid
STRATEGIES = ("rewarm_cosine", "infinite")  # the strategies of a dataset sequence


class ExperimentError(ValueError):
    """A spec or experiment folder that cannot be used; the message says what to change."""


# ================================================================ the sections


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

    @field_validator("lm_eval_tasks")
    @classmethod
    def _tasks_as_a_run_takes_them(cls, v: list) -> list:
        """Each item as ``eval.lm_eval.tasks`` takes it (a misspelt key was reported once per run, under the run
        config's path); the names are checked by :func:`check_lm_eval_tasks`."""
        from cpt.config.eval import LmEvalConfig

        try:
            LmEvalConfig(tasks=v)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"][1:])
            raise ValueError(f"{where + ': ' if where else ''}{first['msg']}") from None
        return v


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


# ================================================================ the two specs


class SpecCommon(Strict):
    """The fields both kinds of spec have, with the same type, default and meaning. A field whose default or meaning
    differs (name, baseline, base_lr, cpt_lr, seed) is declared in its own spec.

    Pydantic puts these fields before a spec's own, so each spec lists all its fields in ``FIELD_ORDER``, the order a
    spec file reads in: :meth:`dump` (spec.yaml) and the error lines of :func:`load_spec` follow it."""

    FIELD_ORDER: ClassVar[tuple[str, ...]] = ()

    tokenizer: TokenizerSpec
    model: dict[str, Any]  # transformers config kwargs: {model_type: llama, hidden_size: ..., ...}
    seq_len: int = Field(gt=1)
    global_batch_size: int = Field(gt=0)
    micro_batch_size: int = Field(gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    # the base pre-training (on corpus_a; in a sequence, stage 0 on corpus 0); rounded to whole steps of
    # global_batch_size * seq_len tokens
    base_tokens: int = Field(gt=0)
    optim: dict[str, Any] = Field(default_factory=lambda: {"weight_decay": 0.1, "grad_clip": 1.0})
    eval: EvalSpec = Field(default_factory=EvalSpec)
    max_epochs_warning: float = Field(8.0, gt=0)
    num_proc: int = Field(1, gt=0)  # tokenization processes for `cpt prepare`
    log_every: int = Field(10, gt=0)
    progress_bar: bool = True
    wandb: WandbSpec = Field(default_factory=WandbSpec)
    # `--set`-style overrides applied to every run config, e.g. ["model.compile=true"]
    run_overrides: list[str] = Field(default_factory=list)
    # torch CPU threads while the runs train (None: torch's default). 1 is much faster for tiny models on a
    # busy machine: with 2 threads on 2 shared cores, OpenMP waits turned 37 ms steps into 590 ms ones
    torch_threads: int | None = Field(None, gt=0)
    # only for the plan printed by --dry-run: the training throughput you expect (tokens/s)
    assumed_tokens_per_s: float | None = Field(None, gt=0)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if sorted(cls.FIELD_ORDER) != sorted(cls.model_fields):
            raise TypeError(f"{cls.__name__}.FIELD_ORDER must list each of its fields once: "
                            f"{sorted(set(cls.model_fields) ^ set(cls.FIELD_ORDER))}")

    def dump(self) -> dict[str, Any]:
        """The spec as plain (JSON) data, its fields in ``FIELD_ORDER``: what spec.yaml holds."""
        data = self.model_dump(mode="json")
        return {k: data[k] for k in self.FIELD_ORDER}

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len


def _shape_errors(spec: SpecCommon) -> list[str]:
    """The checks both specs make on the batch and the model."""
    errors = []
    if spec.global_batch_size % spec.micro_batch_size:
        errors.append(f"global_batch_size ({spec.global_batch_size}) must be a multiple of micro_batch_size ({spec.micro_batch_size})")
    if "model_type" not in spec.model:
        errors.append("model: model_type is required (e.g. llama)")
    return errors


def _budget_errors(spec: SpecCommon, fields: tuple[str, ...]) -> list[str]:
    """Every token budget in ``fields`` is at least one step."""
    return [f"{what} ({getattr(spec, what)}) is less than one step ({spec.tokens_per_step} tokens)"
            for what in fields if getattr(spec, what) < spec.tokens_per_step]


class ExperimentSpec(SpecCommon):
    """The whole grid: corpora, tokenizer, model shape, budgets, replay shares x schedules, baseline."""

    FIELD_ORDER = (
        "name", "corpus_a", "corpus_b", "tokenizer", "model", "seq_len", "global_batch_size", "micro_batch_size",
        "precision", "base_tokens", "cpt_tokens", "replay_shares", "schedules", "variants", "baseline", "baseline_mix",
        "base_lr", "cpt_lr", "baseline_lr", "optim", "eval", "checkpoints_per_run", "keep_checkpoints",
        "max_epochs_warning", "seed", "num_proc", "log_every", "progress_bar", "wandb", "run_overrides",
        "torch_threads", "assumed_tokens_per_s")

    name: str = Field("experiment", pattern=r"^[A-Za-z0-9_.-]+$")
    corpus_a: CorpusSpec  # the original distribution (upstream)
    corpus_b: CorpusSpec  # the new distribution (downstream)
    cpt_tokens: int = Field(gt=0)
    replay_shares: list[float] = Field(default_factory=lambda: [0.0, 0.05, 0.25], min_length=1)
    schedules: list[Literal["rewarm_cosine", "infinite"]] = Field(default_factory=lambda: list(SCHEDULES), min_length=1)
    variants: list[VariantSpec] = Field(default_factory=list)
    baseline: bool = True
    # the baseline's A:B mix: "budget" = base_tokens : cpt_tokens (the data base + CPT saw), "corpus" = the
    # corpora's token counts (A u B sampled uniformly)
    baseline_mix: Literal["budget", "corpus"] = "budget"
    base_lr: LRSpec = Field(default_factory=LRSpec)  # the base run
    cpt_lr: LRSpec = Field(default_factory=LRSpec)  # every CPT run, both schedules
    baseline_lr: LRSpec | None = None  # default: base_lr
    checkpoints_per_run: int = Field(4, gt=0)  # resume checkpoints per run (a killed run resumes from the last)
    keep_checkpoints: int = Field(2, gt=0)
    seed: int = 1234  # data preparation and every run

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
        errors += _shape_errors(self)
        if len(set(self.schedules)) != len(self.schedules):
            errors.append(f"duplicate schedules: {self.schedules}")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            errors.append(f"duplicate variant names: {names}")
        errors += _budget_errors(self, ("base_tokens", "cpt_tokens"))
        if errors:
            raise ValueError("; ".join(errors))
        return self

    # -- derived numbers
    @property
    def corpora(self) -> list[CorpusSpec]:
        return [self.corpus_a, self.corpus_b]

    @property
    def base_steps(self) -> int:
        return max(1, round(self.base_tokens / self.tokens_per_step))

    @property
    def cpt_steps(self) -> int:
        return max(1, round(self.cpt_tokens / self.tokens_per_step))


class SequenceSpec(SpecCommon):
    """Corpora in order, model shape, budgets, strategies, replay, seeds (see cpt/experiment/sequence.py)."""

    FIELD_ORDER = (
        "name", "corpora", "tokenizer", "model", "seq_len", "global_batch_size", "micro_batch_size", "precision",
        "base_tokens", "stage_tokens", "strategies", "replay", "replay_split", "seeds", "baseline", "base_lr", "cpt_lr",
        "optim", "eval", "max_epochs_warning", "seed", "num_proc", "log_every", "progress_bar", "wandb",
        "run_overrides", "torch_threads", "assumed_tokens_per_s")

    name: str = Field("sequence", pattern=r"^[A-Za-z0-9_.-]+$")
    corpora: list[CorpusSpec] = Field(min_length=2)
    stage_tokens: int = Field(gt=0)  # every later stage
    strategies: list[Literal["rewarm_cosine", "infinite"]] = Field(default_factory=lambda: list(STRATEGIES), min_length=1)
    replay: float = Field(0.0, ge=0, lt=1)  # share of every batch of stage k >= 1 drawn from corpora 0..k-1
    replay_split: Literal["equal", "tokens"] = "equal"  # across the earlier corpora: equally, or by their training tokens
    seeds: list[int] = Field(default_factory=lambda: [1234], min_length=1)  # every run once per seed
    # from scratch on the union of corpora 0..k: true = at every boundary k >= 1, "last" = only after the last stage
    baseline: bool | Literal["last"] = False
    base_lr: LRSpec = Field(default_factory=LRSpec)  # rewarm_cosine's stage 0 and the baseline
    cpt_lr: LRSpec = Field(default_factory=LRSpec)  # rewarm_cosine's later stages; the whole infinite trunk
    seed: int = 1234  # data preparation: corpus samples, held-out split, tokenizer sample

    @model_validator(mode="after")
    def _checks(self) -> "SequenceSpec":
        errors = []
        names = [c.name for c in self.corpora]
        if len(set(names)) != len(names):
            errors.append(f"corpora: duplicate names {names}")
        if len(set(self.seeds)) != len(self.seeds):
            errors.append(f"seeds: duplicates {self.seeds}")
        if len(set(self.strategies)) != len(self.strategies):
            errors.append(f"strategies: duplicates {self.strategies}")
        if self.eval.lm_eval_tasks or self.eval.lm_eval_limit is not None:
            # the sequence's runs and its forgetting matrix have no benchmark columns: refused, not silently dropped
            errors.append("eval.lm_eval_tasks / eval.lm_eval_limit: a dataset sequence does not run lm-eval tasks "
                          "(only the pair grid does)")
        errors += _shape_errors(self)
        errors += _budget_errors(self, ("base_tokens", "stage_tokens"))
        if errors:
            raise ValueError("; ".join(errors))
        return self

    # -- derived numbers
    @property
    def stage_steps(self) -> list[int]:
        first = max(1, round(self.base_tokens / self.tokens_per_step))
        later = max(1, round(self.stage_tokens / self.tokens_per_step))
        return [first] + [later] * (len(self.corpora) - 1)

    @property
    def boundaries(self) -> list[int]:
        """The trunk step at the end of every stage (row k of the forgetting matrix is evaluated there)."""
        out, total = [], 0
        for n in self.stage_steps:
            total += n
            out.append(total)
        return out

    @property
    def anneal_steps(self) -> int:
        return max(1, round(self.cpt_lr.anneal_fraction * self.stage_steps[-1]))


def is_sequence_spec(spec: Any) -> bool:
    """A spec with ``corpora`` (a list) is a dataset sequence; one with corpus_a/corpus_b is the pair grid."""
    if isinstance(spec, SequenceSpec):
        return True
    if isinstance(spec, dict):
        return "corpora" in spec
    if isinstance(spec, (str, os.PathLike)) and Path(spec).is_file():
        try:
            data = yaml.safe_load(Path(spec).read_text())
        except yaml.YAMLError:
            return False
        return isinstance(data, dict) and "corpora" in data
    return False


def load_spec(spec: str | os.PathLike | dict | ExperimentSpec | SequenceSpec,
              overrides: list[str] | None = None) -> ExperimentSpec | SequenceSpec:
    """The spec from a YAML file, a dict or a spec, with ``key=value`` overrides applied: a :class:`SequenceSpec`
    when it lists ``corpora``, else the pair grid's :class:`ExperimentSpec`."""
    from cpt.config import ConfigError, apply_overrides, expand_env, format_validation_error, read_yaml_mapping

    if isinstance(spec, (ExperimentSpec, SequenceSpec)):
        data = spec.model_dump(mode="json")
    elif isinstance(spec, dict):
        data = copy.deepcopy(spec)
    else:
        data = read_yaml_mapping(spec, "spec", "corpus_a, corpus_b, model, ...", ExperimentError)
    model, what = (SequenceSpec, "sequence spec") if is_sequence_spec(data) else (ExperimentSpec, "experiment spec")
    try:
        return model.model_validate(expand_env(apply_overrides(data, overrides or [])))  # ${VAR}: as in run configs
    except ConfigError as e:
        raise ExperimentError(str(e)) from None
    except ValidationError as e:
        message = format_validation_error(e, model.FIELD_ORDER, model)
        raise ExperimentError(message.replace("invalid config", f"invalid {what}", 1)) from None
