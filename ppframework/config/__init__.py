"""Typed run configuration (pydantic v2), presets, YAML/JSON loading and ``--set`` overrides.

Every model forbids unknown fields. Problems surface as :class:`~ppframework.errors.ConfigError`
naming the field (``methods[0].pruning.ratio``) before any model or data is touched.

The package, lowest layer first: ``base`` (:class:`StrictModel`), ``messages`` (readable
validation errors), ``presets`` (the method presets as raw dicts), ``merge`` (method override
merging), ``model`` / ``data`` (the model, data and calibration sections), ``method_parts`` and
``method`` (one pruning method), ``frontier`` / ``evaluation`` (what ``ppf eval`` measures),
``run`` (:class:`RunConfig`), ``overrides`` (``--set``) and ``loading`` (files and raw dicts into
configs). Every name is re-exported here; import from ``ppframework.config``.
"""

from ppframework.config.base import StrictModel
from ppframework.config.data import CalibrationConfig, DataConfig
from ppframework.config.evaluation import (
    GENERATION_TASK_NAMES,
    ZEROSHOT_TASKS,
    EvaluationConfig,
    FidelityConfig,
    GenerationConfig,
    GenerationTaskConfig,
    LmEvalConfig,
    RuntimeConfig,
    ZeroShotConfig,
)
from ppframework.config.frontier import FRONTIER_METHODS, FrontierConfig
from ppframework.config.loading import parse_run_config, preset, read_config_file
from ppframework.config.merge import merge_method
from ppframework.config.messages import format_location, validation_message
from ppframework.config.method import (
    ACTIVATION_METRICS,
    BUILTIN_FUSIONS,
    BUILTIN_PROBES,
    HISTORY_FUSIONS,
    PROBE_FUSIONS,
    MethodConfig,
    method_inconsistency,
    method_label,
)
from ppframework.config.method_parts import (
    STAGE_KEYS,
    HistoryConfig,
    PruningConfig,
    StageConfig,
    StrategiesConfig,
)
from ppframework.config.model import DEVICE_MAP_STRATEGIES, ModelConfig
from ppframework.config.overrides import apply_overrides, parse_override
from ppframework.config.presets import PRESETS
from ppframework.config.run import RunConfig

_parse_override = parse_override  # the name ppframework.ablation imports

__all__ = [
    "ACTIVATION_METRICS",
    "BUILTIN_FUSIONS",
    "BUILTIN_PROBES",
    "DEVICE_MAP_STRATEGIES",
    "FRONTIER_METHODS",
    "GENERATION_TASK_NAMES",
    "HISTORY_FUSIONS",
    "PRESETS",
    "PROBE_FUSIONS",
    "STAGE_KEYS",
    "ZEROSHOT_TASKS",
    "CalibrationConfig",
    "DataConfig",
    "EvaluationConfig",
    "FidelityConfig",
    "FrontierConfig",
    "GenerationConfig",
    "GenerationTaskConfig",
    "HistoryConfig",
    "LmEvalConfig",
    "MethodConfig",
    "ModelConfig",
    "PruningConfig",
    "RunConfig",
    "RuntimeConfig",
    "StageConfig",
    "StrategiesConfig",
    "StrictModel",
    "ZeroShotConfig",
    "apply_overrides",
    "format_location",
    "merge_method",
    "method_inconsistency",
    "method_label",
    "parse_override",
    "parse_run_config",
    "preset",
    "read_config_file",
    "validation_message",
]
