"""The typed run configuration: one pydantic model per run, loaded from YAML, overridable from the CLI.

The bottom layer of cpt: every config model lives here (the run's sections and each component's own section:
schedules, data sources, vocabulary extension, LoRA and freezing), and this module imports neither torch nor any
other cpt module but the leaf ``cpt.redaction`` (tested in tests/test_architecture.py), so reading a config
(``cpt schedule``, ``cpt train --dry-run``) stays cheap and every other module can import it. The components
import their config from here. This module also handles YAML, ``--set`` overrides and error reporting: a bad
config fails before any work with one message naming every bad field.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cpt.redaction import redact


class Strict(BaseModel):
    """The base class of every config section: unknown keys are errors, so a typo in a YAML config never passes
    silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------- LR schedules (cpt/schedules.py)

ScheduleType = Literal["constant", "cosine", "linear", "wsd", "inverse_sqrt", "infinite"]
DecayShape = Literal["linear", "cosine", "1-sqrt", "exponential"]
CooldownShape = Literal["cosine", "inverse_sqrt"]
DECAY_SHAPES: tuple[str, ...] = ("linear", "cosine", "1-sqrt", "exponential")

DEFAULT_DECAY_FRACTION = 0.2

# Fields that only some schedule types use; setting one on another type is an error (a typo guard).
_TYPE_FIELDS: dict[str, tuple[str, ...]] = {
    "decay_fraction": ("wsd",),
    "decay_steps": ("wsd",),
    "decay_shape": ("wsd",),
    "timescale": ("inverse_sqrt", "infinite"),
    "cooldown_steps": ("infinite",),
    "cooldown_shape": ("infinite",),
    "constant_lr": ("infinite",),
    "anneal_steps": ("infinite",),
    "anneal_shape": ("infinite",),
    "continue_trunk": ("infinite",),
}
# The trunk of an infinite schedule: a stage with continue_trunk must repeat these unchanged.
_TRUNK_FIELDS = ("max_lr", "warmup_steps", "warmup_from", "cooldown_steps", "cooldown_shape", "constant_lr", "timescale")


class ScheduleConfig(Strict):
    """The LR schedule of one stage (see cpt/schedules.py for the exact formulas)."""

    type: ScheduleType = "cosine"
    max_lr: float = Field(3e-4, gt=0)  # peak LR, reached on the last warmup step
    # the decay target (cosine, linear, wsd), inverse_sqrt's asymptote, the anneal target (infinite,
    # and of anneal branches from a constant/stable phase)
    min_lr: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    # where the warmup starts: a number, or "previous" = the previous stage's final LR (re-warm)
    warmup_from: Annotated[float, Field(ge=0)] | Literal["previous"] = 0.0
    # wsd: the decay takes the last decay_steps steps, or decay_fraction of the stage (default 0.2)
    decay_fraction: float | None = Field(None, gt=0, le=1)
    decay_steps: int | None = Field(None, gt=0)
    decay_shape: DecayShape = "1-sqrt"
    # inverse_sqrt (and infinite's inverse_sqrt cooldown): steps; default warmup_steps
    timescale: float | None = Field(None, gt=0)
    # infinite
    cooldown_steps: int = Field(0, ge=0)
    cooldown_shape: CooldownShape = "cosine"
    constant_lr: float | None = Field(None, gt=0)
    anneal_steps: int | None = Field(None, gt=0)  # None: no anneal (the constant phase lasts to the stage end)
    anneal_shape: DecayShape = "exponential"
    continue_trunk: bool = False  # continue the previous infinite stage's trunk: no re-warm, no new cooldown

    @model_validator(mode="after")
    def _consistent(self) -> "ScheduleConfig":
        errors = []
        for name, types in _TYPE_FIELDS.items():
            if self.type not in types and getattr(self, name) != type(self).model_fields[name].default:
                errors.append(f"{name}: only used by type {' or '.join(types)} (this schedule's type is {self.type})")
        if self.min_lr > self.max_lr:
            errors.append(f"min_lr ({self.min_lr:g}) must not exceed max_lr ({self.max_lr:g})")
        if isinstance(self.warmup_from, float) and self.warmup_from > self.max_lr:
            errors.append(f"warmup_from ({self.warmup_from:g}) must not exceed max_lr ({self.max_lr:g})")
        if self.type == "wsd":
            if self.decay_steps is not None and self.decay_fraction is not None:
                errors.append("decay_steps: set decay_steps or decay_fraction, not both")
            if self.decay_shape == "exponential" and self.min_lr <= 0:
                errors.append("min_lr: must be > 0 when decay_shape is exponential (a geometric decay never reaches 0)")
        if self.needs_timescale and self.timescale is None and self.warmup_steps == 0:
            errors.append("timescale: required when warmup_steps is 0 (it defaults to warmup_steps)")
        if self.type == "infinite":
            if self.constant_lr is None:
                errors.append("constant_lr: required for type infinite (the LR of the constant phase)")
            else:
                if self.constant_lr > self.max_lr:
                    errors.append(f"constant_lr ({self.constant_lr:g}) must not exceed max_lr ({self.max_lr:g})")
                if self.min_lr > self.constant_lr:
                    errors.append(f"min_lr ({self.min_lr:g}) must not exceed constant_lr ({self.constant_lr:g})")
                if self.cooldown_steps == 0 and self.constant_lr < self.max_lr:
                    errors.append("cooldown_steps: must be > 0 when constant_lr < max_lr (or set constant_lr = max_lr)")
            if self.anneal_steps is not None and self.anneal_shape == "exponential" and self.min_lr <= 0:
                errors.append("min_lr: must be > 0 when anneal_shape is exponential (a geometric anneal never reaches 0)")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    @property
    def needs_timescale(self) -> bool:
        return self.type == "inverse_sqrt" or (self.type == "infinite" and self.cooldown_shape == "inverse_sqrt")

    @property
    def effective_timescale(self) -> float:
        return self.timescale if self.timescale is not None else float(max(self.warmup_steps, 1))

    def decay_length(self, steps: int) -> int:
        """wsd: the number of decay steps in a stage of ``steps`` steps (at least 1)."""
        if self.decay_steps is not None:
            return self.decay_steps
        fraction = self.decay_fraction if self.decay_fraction is not None else DEFAULT_DECAY_FRACTION
        return max(1, round(fraction * steps))

    def problems(self, steps: int, where: str = "schedule", trunk_offset: int = 0) -> list[str]:
        """What is wrong with this schedule for a stage of ``steps`` steps (messages name ``where.<field>``).

        ``trunk_offset`` is the clock position the stage starts at (non-zero only for ``continue_trunk``).
        """
        if steps <= 0:
            return [f"{where}: the stage must have a positive number of steps (got {steps})"]
        out = []
        W = self.warmup_steps
        if self.continue_trunk:
            W = max(0, W - trunk_offset)  # the part of the trunk's warmup still to come in this stage
        if self.type in ("cosine", "linear") and W >= steps:
            out.append(f"{where}.warmup_steps: {W} leaves no decay step in a stage of {steps} steps (must be < {steps})")
        elif W > steps:
            out.append(f"{where}.warmup_steps: {W} is longer than the stage ({steps} steps)")
        if self.type == "wsd":
            D = self.decay_length(steps)
            field = "decay_steps" if self.decay_steps is not None else "decay_fraction"
            if D > steps:
                out.append(f"{where}.decay_steps: {D} is longer than the stage ({steps} steps)")
            elif W + D > steps:
                out.append(f"{where}.{field}: warmup ({W}) + decay ({D}) is longer than the stage ({steps} steps)")
        if self.type == "infinite" and self.anneal_steps is not None:
            A = self.anneal_steps
            trunk_end = self.warmup_steps + self.cooldown_steps  # clock position where the constant phase starts
            if A > steps:
                out.append(f"{where}.anneal_steps: {A} is longer than the stage ({steps} steps)")
            elif trunk_offset + steps - A < trunk_end:
                out.append(
                    f"{where}.anneal_steps: the anneal ({A} steps) would start before the constant phase: warmup "
                    f"({self.warmup_steps}) + cooldown ({self.cooldown_steps}) must end by step {trunk_offset + steps - A} "
                    f"of the trunk"
                )
        return out


# ---------------------------------------------------------------- stage plan checks


def stage_schedule_problems(stages: Sequence[tuple[int, ScheduleConfig]], where: str = "stages") -> list[str]:
    """Every problem of a stage plan that needs the stage lengths or the neighbouring stages."""
    errors = []
    offset = 0
    for i, (steps, cfg) in enumerate(stages):
        here = f"{where}.{i}.schedule"
        if i == 0 and cfg.warmup_from == "previous":
            errors.append(f"{here}.warmup_from: 'previous' needs a previous stage (use a number for the first stage)")
        if cfg.continue_trunk:
            if i == 0:
                errors.append(f"{here}.continue_trunk: the first stage has no trunk to continue")
                offset = 0
            else:
                prev_steps, prev = stages[i - 1]
                if prev.type != "infinite":
                    errors.append(f"{here}.continue_trunk: the previous stage ({where}.{i - 1}) is {prev.type}, not infinite")
                elif prev.anneal_steps is not None:
                    errors.append(
                        f"{here}.continue_trunk: the previous stage ({where}.{i - 1}) ends with an anneal "
                        f"(anneal_steps set); a trunk can only be continued from its constant phase"
                    )
                else:
                    for name in _TRUNK_FIELDS:
                        mine, theirs = getattr(cfg, name), getattr(prev, name)
                        if mine != theirs:
                            errors.append(
                                f"{here}.{name}: must equal {where}.{i - 1}.schedule.{name} ({theirs!r}) when continue_trunk "
                                f"is true (got {mine!r})"
                            )
                offset += prev_steps
        else:
            offset = 0
        errors += cfg.problems(steps, here, trunk_offset=offset)
    return errors


def validate_stage_schedules(stages: Iterable[Any], anneal_steps: int | None = None) -> list[str]:
    """Errors (``stages.<i>.schedule.<field>: ...``) of the stages' schedules; empty when the plan is valid.

    ``stages``: objects with ``.steps`` and ``.schedule`` (``cpt.config.StageConfig``). With
    ``anneal_steps`` (``train.anneal_steps``), also checks that some stage has a constant or stable
    phase an anneal branch could start from.
    """
    pairs = [(s.steps, s.schedule) for s in stages]
    errors = stage_schedule_problems(pairs)
    if not errors and anneal_steps is not None:
        if not _has_constant_phase(pairs):
            types = ", ".join(cfg.type for _, cfg in pairs)
            errors.append(
                f"train.anneal_steps: no stage has a constant or stable phase to branch from (schedule types: {types}); "
                f"use constant, wsd or infinite"
            )
    return errors


def _has_constant_phase(stages: Sequence[tuple[int, ScheduleConfig]]) -> bool:
    """Whether a valid plan has a step in a constant (or wsd stable) phase, as ``cpt.schedules.LRPlan`` lays the
    phases out on each stage's clock (tests/test_schedules.py checks the two agree)."""
    offset = 0
    for i, (steps, cfg) in enumerate(stages):
        offset = offset + stages[i - 1][0] if cfg.continue_trunk else 0
        lo, hi = offset, offset + steps  # the stage's window on its clock
        if cfg.type == "constant":
            begin, end = cfg.warmup_steps, hi
        elif cfg.type == "wsd":
            begin, end = cfg.warmup_steps, hi - cfg.decay_length(steps)
        elif cfg.type == "infinite":
            begin, end = cfg.warmup_steps + cfg.cooldown_steps, hi - (cfg.anneal_steps or 0)
        else:
            continue
        if max(begin, lo) < min(end, hi):
            return True
    return False


# ---------------------------------------------------------------- data sources (cpt/data)


class SourceConfig(Strict):
    """A training source: a prepared shard directory (local or remote), or a `datasets` spec tokenized on the fly."""

    name: str
    # type "shards": a directory with manifest.json written by `cpt prepare` (local path or fsspec URL)
    # type "hf": a `datasets.load_dataset` path (hub id, local folder, or a builder name like "json")
    path: str
    type: Literal["shards", "hf"] = "shards"
    replay: bool = False  # old pre-training data fed back to limit forgetting
    # options for type "hf"
    hf_name: str | None = None
    data_files: str | list[str] | None = None
    split: str = "train"
    text_field: str = "text"
    streaming: bool = True
    # type "hf": a seeded `datasets` shuffle buffer of this many examples (0: dataset order; exact resume)
    shuffle_buffer: int = Field(0, ge=0)


class HeldoutConfig(Strict):
    """A named held-out set, tagged upstream (old distribution: forgetting) or downstream (new: adaptation)."""

    name: str
    path: str  # a prepared shard directory (e.g. the `heldout` split written by `cpt prepare`)
    tag: Literal["upstream", "downstream"]
    max_tokens: int | None = Field(None, gt=0)  # overrides eval.tokens_per_set for this set


# ---------------------------------------------------------------- vocabulary extension (cpt/vocab.py)


class VocabConfig(Strict):
    # a text file with one new token per line, or learn `learn_tokens` new tokens from `learn_from`
    add_tokens_file: str | None = None
    # a text file, a .jsonl file (field `text_field`), or a directory of such files (read recursively)
    learn_from: str | None = None
    learn_tokens: int = Field(0, ge=0)
    learn_max_chars: int = Field(20_000_000, gt=0)  # read at most this much of `learn_from`
    text_field: str = "text"
    init: Literal["mean_of_subtokens", "mean"] = "mean_of_subtokens"
    # pad the embedding matrix to a multiple of this (tensor-core friendly shapes); None: exact size
    pad_to_multiple_of: int | None = Field(None, gt=0)
    # the new rows learn this many times faster (or slower) than the rest: see cpt.vocab.NewRowsLR
    new_rows_lr_multiplier: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _something_to_add(self) -> "VocabConfig":
        if self.add_tokens_file is None and self.learn_from is None:
            raise ValueError("set add_tokens_file and/or learn_from (with learn_tokens > 0)")
        if self.learn_from is not None and self.learn_tokens == 0:
            raise ValueError("learn_from is set but learn_tokens is 0")
        if self.learn_tokens > 0 and self.learn_from is None:
            raise ValueError("learn_tokens > 0 needs learn_from (the new corpus)")
        return self


# ---------------------------------------------------------------- LoRA and freezing (cpt/adapters.py)

NAMED_LAYER_SETS = ("bottom_half", "top_half", "every_other")


class LoraConfig(Strict):
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # "all-linear" (peft's shortcut: every Linear layer except the output head) or a list of module names
    target_modules: str | list[str] = "all-linear"
    # modules trained in full next to the adapter, e.g. [embed_tokens, lm_head]; saved inside the adapter
    modules_to_save: list[str] = Field(default_factory=list)
    # also train every normalisation layer in full (RMSNorm/LayerNorm; a few thousand parameters per layer)
    train_norms: bool = False
    # rank-stabilised LoRA scaling (alpha / sqrt(r) instead of alpha / r); helps at high rank (MoRA's concern)
    use_rslora: bool = False

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("target_modules must name at least one module (or be 'all-linear')")
        return v


class FreezeConfig(Strict):
    # freeze decoder layers: "0-6" (indices 0..5, end exclusive), "0-4,10,12-14", "bottom_half",
    # "top_half", "every_other" (even indices); negative indices count from the top ("-4--1")
    layers: str | None = None
    # freeze parameters whose name matches any of these regexes (re.search), e.g. ["embed_tokens", "lm_head"]
    patterns: list[str] = Field(default_factory=list)
    # if set: freeze everything whose name matches none of these regexes (applied first)
    train_only: list[str] = Field(default_factory=list)

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: str | None) -> str | None:
        if v is not None and v not in NAMED_LAYER_SETS:
            parse_layer_ranges(v, None)  # syntax check only
        return v

    @field_validator("patterns", "train_only")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"{p!r} is not a valid regex: {e}") from None
        return v


def parse_layer_ranges(spec: str, n: int | None) -> list[int]:
    """'0-6' -> 0..5; '0-4,10' -> 0..3,10; negative numbers count from the end when n is known."""
    out: list[int] = []
    for part in (x.strip() for x in spec.split(",")):
        m = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part)
        if not m:
            raise ValueError(f"bad layer spec {part!r} in {spec!r}: use 'a-b' (end exclusive), an index, "
                             f"or one of {', '.join(NAMED_LAYER_SETS)}")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else None
        if n is not None:
            a = a + n if a < 0 else a
            if b is not None:
                b = b + n if b < 0 else b
        if b is None:
            b = a + 1
        if n is not None and not (0 <= a < b <= n):
            raise ValueError(f"layer spec {part!r} is out of range for a model with {n} layers")
        if n is None and b <= a and a >= 0 and b >= 0:
            raise ValueError(f"layer spec {part!r}: empty range (the end is exclusive)")
        out.extend(range(a, b))
    return sorted(set(out))


# ---------------------------------------------------------------- the run config


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
