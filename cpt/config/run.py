"""The whole run config (``RunConfig``: every section and the checks across sections), loading and validating it,
the copy written anywhere (secrets redacted) and the trajectory fields a ``--resume`` must not change."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from cpt.config.base import (ConfigError, PathText, Seed, Strict, apply_overrides, expand_env,
                             format_validation_error, read_yaml_mapping)
from cpt.config.data import DataConfig
from cpt.config.eval import EvalConfig
from cpt.config.model import ModelConfig
from cpt.config.outputs import CheckpointConfig, LoggingConfig
from cpt.config.stages import StageConfig, validate_stage_schedules
from cpt.config.train import OptimConfig, TrainConfig
from cpt.redaction import redact


class RunSection(Strict):
    name: str = "run"
    output_dir: PathText = "runs/run"
    seed: Seed = 1234
    # take over output_dir's run.lock even if its holder may be alive (a shared filesystem where the
    # holder's PID cannot be checked from this host); `cpt train --force-lock`
    force_lock: bool = False


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
        named = [st.name for st in self.stages if "name" in st.model_fields_set]  # (unnamed stages are all "stage")
        if dup := sorted({n for n in named if named.count(n) > 1}):
            errors.append(f"stages: duplicate names {dup} (the logs and --set stages.<name>.<field> tell stages by name)")
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
        if self.eval.samples is not None and not self.data.heldout:
            errors.append("eval.samples: text samples are written at each held-out evaluation; add a data.heldout set")
        if self.eval.ema and self.train.ema_decay is None:
            errors.append("eval.ema: evaluating the EMA needs train.ema_decay")
        if self.train.anneal_steps is not None and self.train.init_from is None:
            errors.append("train.anneal_steps needs train.init_from (the checkpoint to branch from)")
        if self.train.init_optimizer and self.train.init_from is None:  # (accepted, and did nothing)
            errors.append("train.init_optimizer needs train.init_from (the cpt checkpoint whose optimizer state to take)")
        if self.train.fp8 is not None and self.model.lora is not None:
            errors.append(f"train.fp8: {self.train.fp8} trains a full model's Linear layers in float8; not with "
                          "model.lora (LoRA/QLoRA): set train.fp8: null or drop model.lora")
        if self.train.fp8_all_gather and self.train.fp8 != "tensorwise":
            errors.append(f"train.fp8_all_gather needs train.fp8: tensorwise (torchao all-gathers float8 weights with "
                          f"per-tensor scales only), not {self.train.fp8}")
        if self.train.fp8 is not None and self.train.precision != "bf16":
            errors.append(f"train.fp8 needs train.precision: bf16 (torchao's float8 matmuls run under bf16 autocast), "
                          f"not {self.train.precision}")
        remote = [s.path for s in [*self.data.sources, *self.data.heldout] if "://" in str(s.path)]
        if remote and self.data.remote.worst_wait_s() >= self.train.distributed_timeout_s:
            errors.append(f"data.remote: a read's retries can wait {self.data.remote.worst_wait_s():g} s in all, not less "
                          f"than train.distributed_timeout_s ({self.train.distributed_timeout_s} s): on several processes "
                          "the other ranks would time out waiting for the retrying one; raise train.distributed_timeout_s "
                          "or lower data.remote.read_retries / retry_max_wait_s")
        errors += validate_stage_schedules(self.stages, anneal_steps=self.train.anneal_steps)
        if errors:
            raise ValueError("\n".join(errors))  # (one problem line each)
        return self

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)


def validate(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model=RunConfig)) from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> RunConfig:
    """Load a YAML config (or start from ``base``), apply overrides, expand ``${VAR}`` (:func:`expand_env`), validate."""
    data: dict[str, Any] = copy.deepcopy(base) if base else {}
    if path is not None:
        data.update(read_yaml_mapping(path))
    data = apply_overrides(data, overrides or [])
    return validate(expand_env(data))


# What a --resume must not change: the fields that change the training trajectory. Everything else may change on
# resume: the world size and train.micro_batch_size (gradient accumulation), kernels and memory
# (model.attn_implementation/compile/liger_kernel/gradient_checkpointing, model.lora.base_in_compute_dtype,
# optim.fused), the locations of the model, tokenizer and data (path, data_files: the checkpoint holds the weights; the
# data fingerprint, a `type: hf` source's files and the tokenizer hash check the content), held-out sets, logging,
# evaluation and checkpoint cadence, stage names, run.name and output_dir.
TRAJECTORY_FIELDS = ("run.seed", "model", "data.seq_len", "data.sources", "data.document_masking", "stages", "optim",
                     "train.global_batch_size", "train.precision", "train.fp8", "train.anneal_steps", "train.anneal_shape",
                     "train.ema_decay", "train.reptile", "train.skip_spikes",
                     "train.router_aux_loss_coef", "train.z_loss")
NOT_TRAJECTORY = {"attn_implementation", "compile", "compile_cache", "liger_kernel", "gradient_checkpointing", "gradient_checkpointing_every",
                  "base_in_compute_dtype", "fused", "name", "name_or_path", "tokenizer", "revision", "path",
                  "data_files", "add_tokens_file", "learn_from", "trust_remote_code"}


def _leaves(obj: Any, prefix: str) -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        return {k: v for key, val in obj.items() for k, v in _leaves(val, f"{prefix}.{key}").items()}
    if isinstance(obj, list) and obj and any(isinstance(x, (dict, list)) for x in obj):
        return {k: v for i, val in enumerate(obj) for k, v in _leaves(val, f"{prefix}.{i}").items()}
    return {prefix: obj}


def trajectory_changes(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """``field: saved -> now`` for every trajectory field (TRAJECTORY_FIELDS) in which ``cfg`` differs from
    ``saved`` (a checkpoint's config.yaml, as written: secrets redacted, so they compare as equal). A field added to
    cpt since the checkpoint was written takes its default there, as it does in the run: not a change."""
    now = config_to_dict(cfg)
    saved = _with_defaults(saved)

    def pick(d: dict[str, Any]) -> dict[str, Any]:
        out = {}
        d = {**d, "data": {**(d.get("data") or {}), "sources": _by_name((d.get("data") or {}).get("sources"))}}
        for field in TRAJECTORY_FIELDS:
            node: Any = d
            for part in field.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            out.update(_leaves(node, field))
        return {k: v for k, v in out.items() if k.rsplit(".", 1)[-1] not in NOT_TRAJECTORY}

    a, b = pick(saved), pick(now)
    missing = "(not set)"
    a, b = _switched_sections(a, b), _switched_sections(b, a)
    out = [f"{k}: {a.get(k, missing)!r} -> {b.get(k, missing)!r}" for k in sorted(set(a) | set(b), key=_field_order)
           if a.get(k, missing) != b.get(k, missing) and not _whole_stage(k, saved, now) and not _whole_source(k, a, b)]
    order = [[x.get("name") for x in (d.get("data") or {}).get("sources") or [] if isinstance(x, dict)] for d in (saved, now)]
    both = [[n for n in names if n in order[0] and n in order[1]] for names in order]
    if both[0] != both[1]:  # (the mixer breaks rounding ties, and interleaves rows, in this order)
        out.append(f"data.sources: order {both[0]} -> {both[1]}")
    for name in sorted({k.split(".")[2] for k in set(a) ^ set(b) if _whole_source(k, a, b)}):
        added = f"data.sources.{name}.type" in b
        src = _by_name((now if added else saved)["data"]["sources"])[name]
        out.append(f"data.sources.{name}: {'added' if added else 'removed'} ({src.get('path')})")
    for i in range(min(len(saved.get("stages") or []), len(now["stages"])), max(len(saved.get("stages") or []), len(now["stages"]))):
        added = i < len(now["stages"])
        stage = (now["stages"] if added else saved["stages"])[i]
        out.append(f"stages.{i}: {'added' if added else 'removed'} (stage {stage.get('name')!r}, {stage.get('steps')} steps)")
    return out


def _switched_sections(mine: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """``mine``'s leaves, with those of a section the other config leaves unset (``train.skip_spikes: null``) folded into
    one value, so that switching a section on or off is one ``field: None -> {...}`` line, not one line per field."""
    out = dict(mine)
    for key in [k for k, v in other.items() if v is None]:
        inner = {k[len(key) + 1:]: v for k, v in mine.items() if k.startswith(key + ".")}
        if inner and key not in mine:
            out = {k: v for k, v in out.items() if not k.startswith(key + ".")}
            out[key] = inner
    return out


def _with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """``saved`` as this version writes it: validated, so fields it does not name (added to cpt since) hold their
    defaults; as written when it no longer validates (a field since removed or renamed)."""
    try:
        return config_to_dict(validate(copy.deepcopy(saved)))
    except (ConfigError, ValidationError, TypeError, ValueError):
        return saved


def _by_name(sources: Any) -> Any:
    """``data.sources`` keyed by name (a source is the same source wherever it stands in the list)."""
    if not isinstance(sources, list) or not all(isinstance(x, dict) and "name" in x for x in sources):
        return sources
    return {str(x["name"]): {k: v for k, v in x.items() if k != "name"} for x in sources}


def _whole_source(key: str, a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether ``key`` is a field of a data source only one of the two configs has (reported as one line)."""
    parts = key.split(".")
    if parts[:2] != ["data", "sources"] or len(parts) < 4:
        return False
    probe = f"data.sources.{parts[2]}.type"
    return (probe in a) != (probe in b)


def _whole_stage(key: str, saved: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether ``key`` is a field of a stage that only one of the two configs has (reported as one line)."""
    parts = key.split(".")
    if parts[0] != "stages" or len(parts) < 2 or not parts[1].isdigit():
        return False
    return int(parts[1]) >= min(len(saved.get("stages") or []), len(now["stages"]))


def _field_order(key: str) -> list:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split(".")]


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as written anywhere (config.yaml, checkpoints, W&B): secrets redacted at any depth,
    free-form dicts (model.arch, model.config_overrides) included (see cpt/redaction.py). ``run.force_lock`` is written
    false: it acts once, at the start that was given it (``--force-lock``), not at every later start from this file."""
    data = redact(cfg.model_dump(mode="json"))
    data["run"]["force_lock"] = False
    return data


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
