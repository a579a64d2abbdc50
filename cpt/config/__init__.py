"""The typed run configuration: one pydantic model per run, loaded from YAML, overridable from the CLI.

The bottom layer of cpt: every config model lives in this package, one module per group of sections, and no
module of it imports torch or any other cpt module but the leaf ``cpt.redaction`` (tested in
tests/test_architecture.py), so reading a config (``cpt schedule``, ``cpt train --dry-run``) stays cheap and every
other module can import it. The components import their config from here: ``from cpt.config import X`` for every
name below.

    base.py     Strict (unknown keys are errors), ConfigError, YAML files, ``--set`` overrides, ``${VAR}``, error formatting
    stages.py   ``stages``: StageConfig, ScheduleConfig and the checks of a stage plan
    data.py     ``data``: SourceConfig, HeldoutConfig, RemoteConfig, DataConfig
    model.py    ``model``: ModelConfig, VocabConfig, LoraConfig, FreezeConfig (and the layer-range syntax)
    train.py    ``optim`` and ``train``: OptimConfig, TrainConfig, ReptileConfig, SpikeConfig, ProfileConfig
    eval.py     ``eval``: EvalConfig, LmEvalConfig, LmEvalTask
    outputs.py  ``checkpoint`` and ``logging``: CheckpointConfig, LoggingConfig, WandbConfig
    run.py      RunConfig (the checks across sections), validate/load/save, the trajectory fields of a resume

A bad config fails before any work with one message naming every bad field.
"""

from cpt.config.base import (ConfigError, Strict, apply_overrides, expand_env, format_validation_error,
                             read_yaml_mapping)
from cpt.config.data import DataConfig, HeldoutConfig, RemoteConfig, SourceConfig
from cpt.config.eval import EvalConfig, LmEvalConfig, LmEvalTask, SamplesConfig
from cpt.config.model import (NAMED_LAYER_SETS, FreezeConfig, LoraConfig, ModelConfig, VocabConfig,
                              parse_layer_ranges)
from cpt.config.outputs import CheckpointConfig, LoggingConfig, WandbConfig
from cpt.config.run import (NOT_TRAJECTORY, TRAJECTORY_FIELDS, RunConfig, RunSection, config_to_dict, load_config,
                            save_config, trajectory_changes, validate)
from cpt.config.stages import (DECAY_SHAPES, DEFAULT_DECAY_FRACTION, CooldownShape, DecayShape, ScheduleConfig,
                               ScheduleType, StageConfig, _has_constant_phase, format_mixes, stage_schedule_problems,
                               validate_stage_schedules)
from cpt.config.train import OptimConfig, ProfileConfig, ReptileConfig, SpikeConfig, TrainConfig
from cpt.redaction import redact

__all__ = [
    "CheckpointConfig", "ConfigError", "CooldownShape", "DECAY_SHAPES", "DEFAULT_DECAY_FRACTION", "DataConfig",
    "DecayShape", "EvalConfig", "FreezeConfig", "HeldoutConfig", "LmEvalConfig", "LmEvalTask", "LoggingConfig",
    "LoraConfig", "ModelConfig", "NAMED_LAYER_SETS", "NOT_TRAJECTORY", "OptimConfig", "ProfileConfig", "RemoteConfig",
    "ReptileConfig", "RunConfig",
    "RunSection", "SamplesConfig", "ScheduleConfig", "ScheduleType", "SourceConfig", "SpikeConfig", "StageConfig", "Strict",
    "TRAJECTORY_FIELDS", "TrainConfig", "VocabConfig", "WandbConfig", "apply_overrides", "config_to_dict", "expand_env",
    "format_mixes", "format_validation_error", "load_config", "parse_layer_ranges", "read_yaml_mapping", "redact",
    "save_config", "stage_schedule_problems", "trajectory_changes", "validate", "validate_stage_schedules",
]
