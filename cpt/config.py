"""The typed run configuration: one pydantic model per run, loaded from YAML, overridable from the CLI.

Each component owns the config of its own concern (schedules, data sources, adapters, ...);
this module composes them into :class:`RunConfig` and handles YAML, ``--set`` overrides and
error reporting. A bad config fails before any work with one message naming every bad field.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from cpt.adapters import FreezeConfig, LoraConfig
from cpt.configbase import Strict
from cpt.data.sources import HeldoutConfig, SourceConfig
from cpt.redaction import redact
from cpt.schedules import ScheduleConfig, validate_stage_schedules
from cpt.vocab import VocabConfig


class ConfigError(ValueError):
    """A run config that cannot be used. The message names every bad field."""


class RunSection(Strict):
    name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 1234
    # take over output_dir's run.lock even if its holder may be alive (a shared filesystem where the
    # holder's PID cannot be checked from this host); `cpt train --force-lock`
    force_lock: bool = False


class ModelConfig(Strict):
    # A hub id, a local `save_pretrained` directory, or None to build from `arch` (random init).
    name_or_path: str | None = None
    # transformers config kwargs for a model built from scratch, e.g. {model_type: llama, hidden_size: 256, ...}
    arch: dict[str, Any] | None = None
    # Tokenizer: a hub id or local directory; defaults to name_or_path.
    tokenizer: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    # set on the model's config before the weights load, e.g. long-context CPT:
    # {max_position_embeddings: 32768, rope_parameters: {rope_type: default, rope_theta: 1000000}}
    config_overrides: dict[str, Any] = Field(default_factory=dict)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = "sdpa"
    gradient_checkpointing: bool = False
    compile: bool = False
    liger_kernel: bool = False  # Liger fused kernels (fused linear cross-entropy...) when installed
    lora: LoraConfig | None = None
    freeze: FreezeConfig | None = None
    vocab: VocabConfig | None = None

    @model_validator(mode="after")
    def _source_given(self) -> "ModelConfig":
        if self.name_or_path is None and self.arch is None:
            raise ValueError("set model.name_or_path (pretrained model) or model.arch (build from scratch)")
        if self.name_or_path is None and self.tokenizer is None:
            raise ValueError("model.tokenizer is required when the model is built from model.arch")
        return self


class DataConfig(Strict):
    seq_len: int = Field(2048, gt=0)
    sources: list[SourceConfig] = Field(min_length=1)
    heldout: list[HeldoutConfig] = Field(default_factory=list)
    # warn when a source is seen more than this many epochs (repeated data hurts; see docs)
    max_epochs_warning: float = Field(4.0, gt=0)
    # false (default): a start reads the manifests and checks file sizes (rank 0), no shard bytes, whatever the
    # corpus size; true: rank 0 also checks every file's checksum at every start (reads the whole corpus).
    # `cpt prepare` verifies what it writes; `cpt verify DIR` re-checks on demand (e.g. after an upload).
    verify_checksums: bool = False
    prefetch: bool = True  # read the next global batch in a background thread while a step runs (pinned on CUDA)
    # intra-document attention: packed documents do not attend across EOS and their positions restart
    # (training and held-out evaluation; see cpt/data/masking.py)
    document_masking: bool = False

    @model_validator(mode="after")
    def _unique_names(self) -> "DataConfig":
        for kind, items in (("sources", self.sources), ("heldout", self.heldout)):
            names = [s.name for s in items]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"data.{kind}: duplicate names {dup}")
        return self


class StageConfig(Strict):
    """One stage of a continual pre-training plan: its length, data mix and LR schedule."""

    name: str = "stage"
    steps: int = Field(gt=0)
    # source name -> share of every global batch; shares are normalised to sum to 1
    mix: dict[str, float]
    # optional: a replay share that follows a linear ramp within the stage {source: [start, end]}
    mix_ramp: dict[str, tuple[float, float]] = Field(default_factory=dict)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    reset_optimizer: bool = False

    @field_validator("mix")
    @classmethod
    def _shares(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("mix must name at least one source")
        bad = {k: s for k, s in v.items() if s < 0}
        if bad:
            raise ValueError(f"negative shares {bad}")
        if sum(v.values()) <= 0:
            raise ValueError("shares must not all be zero")
        return v

    @property
    def shares(self) -> dict[str, float]:
        """The mix normalised to sum to 1 (what the mixer uses)."""
        total = sum(self.mix.values())
        return {k: v / total for k, v in self.mix.items()}


def format_mixes(stages: list[StageConfig]) -> list[str]:
    """One line per stage with its normalised shares, noting when the given weights did not sum to 1."""
    lines = []
    for i, st in enumerate(stages):
        total = sum(st.mix.values())
        note = "" if abs(total - 1) < 1e-9 else f" (the weights given sum to {total:g}: normalised)"
        shares = ", ".join(f"{k} {v:.1%}" for k, v in st.shares.items())
        lines.append(f"stage {i} {st.name} mix: {shares}{note}")
    return lines


class OptimConfig(Strict):
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = Field(1.0, gt=0)
    fused: bool | None = None  # None: fused AdamW when on CUDA
    decay_embeddings: bool = True  # apply weight decay to embedding matrices
    # module-name regex -> LR multiplier, e.g. {"embed_tokens": 0.1, "lm_head": 0.5}
    lr_multipliers: dict[str, float] = Field(default_factory=dict)
    # LR multiplier for layers with index < K: {"below": K, "multiplier": m}
    lower_layers: dict[str, float] | None = None


class ReptileConfig(Strict):
    """Reptile meta-updates (the gradient alignment of MER, see cpt/reptile.py): every `every` optimizer steps,
    weights <- anchor + epsilon * (weights - anchor)."""

    every: int = Field(gt=0)
    epsilon: float = Field(gt=0, le=1)


class SpikeConfig(Strict):
    """Skip the update of a loss/grad-norm spike (see cpt/spikes.py): above mean + sigma * std of the last
    `window` steps (once `min_history` are known; default window // 2); the window restarts at stage switches."""

    sigma: float = Field(6.0, gt=0)
    window: int = Field(128, ge=2)
    min_history: int | None = Field(None, ge=2)
    max_in_a_row: int = Field(8, gt=0)


class TrainConfig(Strict):
    global_batch_size: int = Field(64, gt=0)  # sequences per optimizer step, over all ranks
    micro_batch_size: int = Field(8, gt=0)  # sequences per forward pass per rank
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    log_every: int = Field(10, gt=0)
    max_nonfinite_in_a_row: int = Field(5, gt=0)
    # start weights (and optionally optimizer) from this checkpoint/run dir, not its data position
    init_from: str | None = None
    init_optimizer: bool = False
    # anneal branch: from `init_from`, anneal for this many steps (see `cpt train --anneal`)
    anneal_steps: int | None = Field(None, gt=0)
    anneal_shape: Literal["linear", "cosine", "exponential", "1-sqrt"] = "linear"
    ema_decay: float | None = Field(None, gt=0, lt=1)
    reptile: ReptileConfig | None = None
    skip_spikes: SpikeConfig | None = None
    # a tqdm bar when stdout is a terminal; otherwise (batch jobs) and when false: a plain line every log_every steps
    progress_bar: bool = True
    # next-token loss over chunks of positions, never the full [B, L, vocab] logits (cpt/chunked_loss.py):
    # "auto" where the model supports it (else the full-logits loss, with a logged reason), true (or an error), false
    chunked_loss: bool | Literal["auto"] = "auto"
    loss_chunk_tokens: int = Field(1024, gt=0)  # positions per chunk: memory ~ chunk x vocab x 4 bytes
    peak_flops: float | None = None  # per-device peak bf16 FLOP/s for MFU; None: guessed from the device name
    # with several processes on GPUs: steps between the all-rank checks for a preemption signal (each costs a host sync)
    preemption_check_every: int = Field(10, gt=0)
    # TF32 tensor cores for fp32 matmuls on CUDA (what fp32 ops remain under bf16 autocast; all of them in fp32 runs)
    tf32: bool = True


class LmEvalTask(Strict):
    """An lm-eval task (or group/tag) to run in the loop; tagged tasks get forgetting/adaptation deltas."""

    name: str = Field(min_length=1)
    tag: Literal["upstream", "downstream"] | None = None
    limit: int | None = Field(None, gt=0)  # documents (a seeded subset); default: eval.lm_eval.limit


class LmEvalConfig(Strict):
    # task names (untagged) or {name, tag: upstream|downstream, limit}; see eval_harness/benchmarks.py
    tasks: list[LmEvalTask] = Field(default_factory=list)
    every: int | None = Field(None, gt=0)  # steps; None: at the start (eval.at_start) and the end only
    at_end: bool = True
    dense: bool = False  # also at the held-out dense points after each stage switch (eval.dense_steps/dense_every)
    limit: int | None = Field(None, gt=0)  # documents per task: a seeded subset, the same at every evaluation
    seed: int | None = None  # of the subsets; default: run.seed
    bootstrap_iters: int = Field(100, ge=2)  # stderrs: closed form for accuracies, a bootstrap for ratio metrics
    include_path: str | None = None  # folder of task YAMLs; default: eval_harness/tasks
    batch_size: int = Field(8, gt=0)

    @field_validator("tasks", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        return [{"name": t} if isinstance(t, str) else t for t in v] if isinstance(v, list) else v

    @field_validator("tasks")
    @classmethod
    def _unique(cls, v: list[LmEvalTask]) -> list[LmEvalTask]:
        names = [t.name for t in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate tasks {dup}")
        return v


class EvalConfig(Strict):
    every: int = Field(100, gt=0)
    at_start: bool = True
    # evaluate every `dense_every` steps during the first `dense_steps` steps of each stage (stability gap)
    dense_steps: int = Field(0, ge=0)
    dense_every: int = Field(10, gt=0)
    # per held-out set: a seeded sample of whole documents up to this many tokens (the whole set if it fits),
    # the same sample at every evaluation (cpt/data/loader.py sample_heldout)
    tokens_per_set: int = Field(262144, gt=0)
    sample_seed: int = 0
    batch_size: int = Field(8, gt=0)
    # also evaluate the EMA weights (train.ema_decay) on the held-out sets: ema/eval/<name>/loss
    ema: bool = False
    lm_eval: LmEvalConfig = Field(default_factory=LmEvalConfig)


class CheckpointConfig(Strict):
    every: int | None = Field(None, gt=0)  # resume checkpoints every N steps
    keep: int = Field(2, gt=0)
    export_every: int | None = Field(None, gt=0)  # HF exports every N steps (always at the end)
    export_at_end: bool = True
    resume: bool = False  # take the latest valid checkpoint in output_dir
    async_save: bool = True  # write in a background thread (one process and DDP; FSDP/DeepSpeed save synchronously)
    max_failed_saves: int = Field(3, gt=0)  # stop the run after this many failed saves in a row


class WandbConfig(Strict):
    enabled: bool = False
    project: str = "cpt"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = Field(default_factory=list)
    mode: Literal["online", "offline", "disabled"] | None = None  # None: wandb's default / WANDB_MODE
    log_exports_as_artifacts: bool = False


class LoggingConfig(Strict):
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    plot: bool = True  # write plots (PNG) at the end of the run


class RunConfig(Strict):
    run: RunSection = Field(default_factory=RunSection)
    model: ModelConfig
    data: DataConfig
    stages: list[StageConfig] = Field(min_length=1)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        names = {s.name for s in self.data.sources}
        errors = []
        for i, st in enumerate(self.stages):
            unknown = sorted(set(st.mix) - names)
            if unknown:
                errors.append(f"stages.{i}.mix: unknown sources {unknown} (data.sources has {sorted(names)})")
            unknown = sorted(set(st.mix_ramp) - set(st.mix))
            if unknown:
                errors.append(f"stages.{i}.mix_ramp: sources {unknown} are not in the stage's mix")
        if self.train.global_batch_size % self.train.micro_batch_size:
            errors.append(
                f"train.global_batch_size ({self.train.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({self.train.micro_batch_size})"
            )
        if self.eval.ema and self.train.ema_decay is None:
            errors.append("eval.ema: evaluating the EMA needs train.ema_decay")
        if self.train.anneal_steps is not None and self.train.init_from is None:
            errors.append("train.anneal_steps needs train.init_from (the checkpoint to branch from)")
        errors += validate_stage_schedules(self.stages, anneal_steps=self.train.anneal_steps)
        if errors:
            raise ValueError("; ".join(errors))
        return self

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)


# ---------------------------------------------------------------- loading, overrides, errors

def _parse_value(text: str) -> Any:
    """Parse an override value as YAML (so 3e-4, true, [a, b], {x: 1} all work)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; list items are addressed by index (``stages.0.steps=10``)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.global_batch_size=32")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = data
        for j, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                idx = _index(part, node, key)
                node = node[idx]
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {key!r}: {'.'.join(parts[: j + 1])} is not a section")
        last = parts[-1]
        if isinstance(node, list):
            node[_index(last, node, key)] = _parse_value(value)
        else:
            node[last] = _parse_value(value)
    return data


def _index(part: str, node: list, key: str) -> int:
    try:
        idx = int(part)
        node[idx]
        return idx
    except (ValueError, IndexError):
        raise ConfigError(f"override {key!r}: {part!r} is not a valid index into a list of {len(node)}") from None


def format_validation_error(err: ValidationError) -> str:
    lines = [f"invalid config ({err.error_count()} problem{'s' if err.error_count() != 1 else ''}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling)"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


def validate(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def read_yaml_mapping(path: str | os.PathLike, what: str = "config", sections: str = "run, model, data, ...",
                      error: type[Exception] = ConfigError) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; `error` names the file and what is wrong with it."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} file not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{p}: not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise error(f"{p}: the top level must be a mapping ({sections})")
    return loaded


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> RunConfig:
    """Load a YAML config (or start from ``base``), apply overrides, validate."""
    data: dict[str, Any] = copy.deepcopy(base) if base else {}
    if path is not None:
        data.update(read_yaml_mapping(path))
    data = apply_overrides(data, overrides or [])
    return validate(data)


# What a --resume must not change: the fields that change the training trajectory. Everything else may change on
# resume: the world size and train.micro_batch_size (gradient accumulation), kernels and memory
# (model.attn_implementation/compile/liger_kernel/gradient_checkpointing, optim.fused), the locations of the
# model, tokenizer and data (the checkpoint holds the weights; the data fingerprint and tokenizer hash check the
# content), held-out sets, logging, evaluation and checkpoint cadence, stage names, run.name and output_dir.
TRAJECTORY_FIELDS = ("run.seed", "model", "data.seq_len", "data.sources", "data.document_masking", "stages", "optim",
                     "train.global_batch_size", "train.precision", "train.anneal_steps", "train.anneal_shape",
                     "train.ema_decay", "train.reptile", "train.skip_spikes")
NOT_TRAJECTORY = {"attn_implementation", "compile", "liger_kernel", "gradient_checkpointing", "fused", "name",
                  "name_or_path", "tokenizer", "revision", "path", "add_tokens_file", "learn_from", "trust_remote_code"}


def _leaves(obj: Any, prefix: str) -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        return {k: v for key, val in obj.items() for k, v in _leaves(val, f"{prefix}.{key}").items()}
    if isinstance(obj, list) and obj and any(isinstance(x, (dict, list)) for x in obj):
        return {k: v for i, val in enumerate(obj) for k, v in _leaves(val, f"{prefix}.{i}").items()}
    return {prefix: obj}


def trajectory_changes(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """``field: saved -> now`` for every trajectory field (TRAJECTORY_FIELDS) in which ``cfg`` differs from
    ``saved`` (a checkpoint's config.yaml, as written: secrets redacted, so they compare as equal)."""
    now = config_to_dict(cfg)

    def pick(d: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for field in TRAJECTORY_FIELDS:
            node: Any = d
            for part in field.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            out.update(_leaves(node, field))
        return {k: v for k, v in out.items() if k.rsplit(".", 1)[-1] not in NOT_TRAJECTORY}

    a, b = pick(saved), pick(now)
    missing = "(not set)"
    return [f"{k}: {a.get(k, missing)!r} -> {b.get(k, missing)!r}" for k in sorted(set(a) | set(b), key=_field_order)
            if a.get(k, missing) != b.get(k, missing)]


def _field_order(key: str) -> list:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split(".")]


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as written anywhere (config.yaml, checkpoints, W&B): secrets redacted at any depth,
    free-form dicts (model.arch, model.config_overrides) included (see cpt/redaction.py)."""
    return redact(cfg.model_dump(mode="json"))


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
