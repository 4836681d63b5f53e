"""The library API: load a config, load a model, calibrate, build a pipeline."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ppframework import data as data_mod
from ppframework.adapters import get_adapter, supported_model_types
from ppframework.calibration import cached_calibration, calibrate, expected_shapes
from ppframework.config import (
    MethodConfig,
    RunConfig,
    apply_overrides,
    parse_run_config,
    read_config_file,
)
from ppframework.errors import ConfigError
from ppframework.history import HistoryStore
from ppframework.models import model_fingerprint, read_model_config
from ppframework.pipeline import Pipeline
from ppframework.registry import StrategyRegistry, default_registry

logger = logging.getLogger(__name__)


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


def needs_calibration(cfg: RunConfig) -> bool:
    """Whether any method of ``cfg`` prunes and keeps a calibration history."""
    return any(m.needs_calibration for m in cfg.methods)


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


def calibration_batches(cfg: RunConfig, tokenizer: Any) -> list[torch.Tensor]:
    """The calibration windows of ``cfg.calibration`` in batches."""
    cal = cfg.calibration
    docs = data_mod.load_documents(cal.dataset, cal.split, cfg.data.data_dir)
    windows = data_mod.calibration_windows(docs, tokenizer, cal.n_samples, cfg.calibration_seq_len, cal.seed)
    if cfg.data.window_bos:
        windows = data_mod.start_with_bos(windows, tokenizer)
    return list(torch.split(windows, cal.batch_size))


def calibration_description(model: nn.Module, tokenizer: Any, cfg: RunConfig) -> dict[str, Any]:
    """Everything the calibration history depends on (the cache key)."""
    cal = cfg.calibration
    source = data_mod.dataset_source(cal.dataset, cal.split, cfg.data.data_dir)
    extra = {"window_bos": True} if cfg.data.window_bos else {}  # old cache keys stay valid
    return extra | {
        "model": model_fingerprint(model),
        "tokenizer": f"{type(tokenizer).__name__}:{len(tokenizer)}",
        "dataset": source,
        "split": cal.split,
        "n_samples": cal.n_samples,
        "seq_len": cfg.calibration_seq_len,
        "seed": cal.seed,
        "dtype": str(next(model.parameters()).dtype),
    }


def calibration_history(
    model: nn.Module, tokenizer: Any, cfg: RunConfig, progress: bool = True
) -> tuple[HistoryStore, dict[str, Any]]:
    """The dense calibration history for ``cfg`` (from the on-disk cache when possible)."""
    description = calibration_description(model, tokenizer, cfg)
    cache_dir = Path(cfg.calibration.cache_dir) if cfg.calibration.cache_dir else None

    def compute() -> HistoryStore:
        batches = calibration_batches(cfg, tokenizer)
        return calibrate(model, get_adapter(model), batches, progress=progress)

    expected = expected_shapes(get_adapter(model), cfg.calibration_seq_len)
    store, path, hit = cached_calibration(description, compute, cache_dir, cfg.calibration.cache, expected)
    info = {**description, "cache_file": str(path) if path else None, "from_cache": hit}
    return store, info


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
        pipe.history, _ = calibration_history(model, tokenizer, cfg, progress)
    return pipe
