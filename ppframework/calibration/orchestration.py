"""The calibration a run config asks for: its calibration windows, everything the result depends on
(the cache key), and the history itself, loaded from the cache or computed and stored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ppframework import data as data_mod
from ppframework.adapters import ModelAdapter, get_adapter
from ppframework.calibration.cache import cached_calibration
from ppframework.calibration.dense import calibrate, expected_shapes
from ppframework.calibration.extras import add_statistics
from ppframework.config import RunConfig
from ppframework.history import HistoryStore
from ppframework.models import model_fingerprint
from ppframework.registry import default_registry


def needs_calibration(cfg: RunConfig) -> bool:
    """Whether any method of ``cfg`` prunes and keeps a calibration history."""
    return any(m.needs_calibration for m in cfg.methods)


def extra_statistics(cfg: RunConfig) -> set[str]:
    """The calibration statistics beyond the dense means that ``cfg``'s calibrated methods ask for
    (each strategy's ``calibration_statistics``, e.g. ``taylor``, ``block-influence``)."""
    registry = default_registry()
    names: set[str] = set()
    for i, method in enumerate(cfg.methods):
        if method.needs_calibration:
            for strategy in registry.build_method(method, f"methods[{i}]").values():
                names.update(getattr(strategy, "calibration_statistics", ()))
    return names


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
    model: nn.Module,
    tokenizer: Any,
    cfg: RunConfig,
    progress: bool = True,
    *,
    adapter: ModelAdapter | None = None,
) -> tuple[HistoryStore, dict[str, Any]]:
    """The dense calibration history for ``cfg`` (from the on-disk cache when possible).

    ``adapter`` is ``model``'s adapter when the caller has looked it up already (a pipeline's).
    """
    description = calibration_description(model, tokenizer, cfg)
    cache_dir = Path(cfg.calibration.cache_dir) if cfg.calibration.cache_dir else None
    adapter = adapter if adapter is not None else get_adapter(model)

    def compute() -> HistoryStore:
        batches = calibration_batches(cfg, tokenizer)
        return calibrate(model, adapter, batches, progress=progress)

    expected = expected_shapes(adapter, cfg.calibration_seq_len)
    store, path, hit = cached_calibration(description, compute, cache_dir, cfg.calibration.cache, expected)
    extras = extra_statistics(cfg)
    if extras:  # each in its own cache file, computed only when asked for
        add_statistics(
            store,
            extras,
            model,
            adapter,
            lambda: calibration_batches(cfg, tokenizer),
            description,
            cache_dir,
            cfg.calibration.cache,
            progress,
        )
    info = {**description, "cache_file": str(path) if path else None, "from_cache": hit}
    return store, info
