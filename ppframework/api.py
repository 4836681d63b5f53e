"""The library API: load a config, load a model, calibrate, build a pipeline."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from ppframework import data as data_mod
from ppframework.adapters import supported_model_types
from ppframework.calibration.orchestration import (
    calibration_batches,
    calibration_description,
    calibration_history,
    needs_calibration,
)
from ppframework.config import (
    MethodConfig,
    RunConfig,
    apply_overrides,
    parse_run_config,
    read_config_file,
)
from ppframework.errors import ConfigError
from ppframework.history import HistoryStore
from ppframework.models import read_model_config
from ppframework.pipeline import Pipeline
from ppframework.registry import StrategyRegistry, default_registry

logger = logging.getLogger(__name__)

__all__ = [
    "build_pipeline",
    "calibration_batches",
    "calibration_description",
    "calibration_history",
    "check_model_family",
    "load_config",
    "load_eval_text",
    "needs_calibration",
]


def load_config(
    source: str | Path | dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    registry: StrategyRegistry | None = None,
) -> RunConfig:
    """Load and fully validate a run config from a YAML/JSON file or a dict.

    Strategy names and parameters are checked against the registry here, so every bad input
    fails before a model is loaded.
    """
    raw = source if isinstance(source, dict) else read_config_file(source) if source is not None else {}
    cfg = parse_run_config(apply_overrides(raw, overrides or []))
    registry = registry or default_registry()
    for i, method in enumerate(cfg.methods):
        registry.build_method(method, f"methods[{i}]")
    return cfg


def check_model_family(name: str) -> None:
    """For a local HF directory, fail before loading weights if no adapter supports its family."""
    config_file = Path(name) / "config.json"
    if not config_file.is_file():
        return
    model_type = read_model_config(config_file).get("model_type")
    if model_type not in supported_model_types():
        raise ConfigError(
            f"model.name: model family {model_type!r} is not supported; supported model types: "
            f"{', '.join(supported_model_types())}."
        )


def load_eval_text(cfg: RunConfig) -> str:
    """Read the evaluation text and check the calibration source, before any model is loaded."""
    data_mod.resolve_data_dir(cfg.data.data_dir)
    text = data_mod.load_corpus_text(cfg.data.name, cfg.data.split, cfg.data.data_dir)
    if needs_calibration(cfg):
        try:
            data_mod.load_documents(cfg.calibration.dataset, cfg.calibration.split, cfg.data.data_dir)
        except ConfigError as exc:
            raise ConfigError(
                f"calibration.dataset: {cfg.calibration.dataset!r} cannot be read: {exc}"
            ) from None
    check_model_family(cfg.model.name)
    return text


def build_pipeline(
    model: nn.Module,
    cfg: RunConfig | MethodConfig,
    *,
    method_index: int = 0,
    tokenizer: Any = None,
    history: HistoryStore | None = None,
    registry: StrategyRegistry | None = None,
    progress: bool = True,
) -> Pipeline:
    """Build a :class:`Pipeline` for one method; calibrates (or loads the cache) when needed.

    ``cfg`` is a whole :class:`RunConfig` (its ``methods[method_index]`` is used, and its
    calibration settings) or a single :class:`MethodConfig` (then pass ``history`` yourself if
    the method keeps one).
    """
    if isinstance(cfg, RunConfig):
        method, seed, prefix = cfg.methods[method_index], cfg.seed, f"methods[{method_index}]"
    else:
        method, seed, prefix = cfg, 0, "method"
    pipe = Pipeline(model, method, history=history, registry=registry, seed=seed, field_prefix=prefix)
    if pipe.needs_history and pipe.history is None:
        if not isinstance(cfg, RunConfig) or tokenizer is None:
            raise ConfigError(
                f"{prefix}.history.init: 'calibration' needs calibration data; pass a RunConfig and the "
                "tokenizer, or history=..., or set history.init to 'none'"
            )
        pipe.history, _ = calibration_history(model, tokenizer, cfg, progress, adapter=pipe.adapter)
    return pipe
