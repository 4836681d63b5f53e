"""Calibration statistics beyond the dense means, computed only for methods that ask for them
(a strategy's ``calibration_statistics``), each cached in its own safetensors + JSON file next to the
history's (so adding one never invalidates an existing history cache):

- ``taylor``: every block's Taylor importances (:mod:`.taylor`), into ``BlockHistory.channel_stats``;
- ``block-influence``: ShortGPT's per-layer block influence (:mod:`.influence`), into
  ``HistoryStore.layer_influence``;
- ``flap-ppcode``: FLAP's fluctuation and baseline as the PP code computes them at the calibration's
  batch size (:mod:`.ppcode_flap`), into ``BlockHistory.channel_stats``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ppframework.adapters import ModelAdapter
from ppframework.calibration.cache import (
    cache_key,
    default_cache_dir,
    tensors_checksum,
    write_safetensors_atomically,
)
from ppframework.calibration.influence import block_influence
from ppframework.calibration.ppcode_flap import ppcode_flap_statistics
from ppframework.calibration.taylor import taylor_statistics
from ppframework.history import HistoryStore
from ppframework.types import BlockKind

logger = logging.getLogger(__package__)

#: Every extra statistic a strategy may ask for, by name.
EXTRA_STATISTICS: tuple[str, ...] = ("taylor", "block-influence", "flap-ppcode")


def _save(tensors: dict[str, torch.Tensor], path: Path, header: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    full = {**header, "checksum": tensors_checksum(tensors)}
    write_safetensors_atomically(tensors, path, full)
    path.with_suffix(".json").write_text(json.dumps(full, indent=2, default=str))


def _load(path: Path) -> dict[str, torch.Tensor] | None:
    """The tensors of ``path`` when its checksum matches and every value is finite, else None."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            header = json.loads((handle.metadata() or {}).get("header", "{}"))
    except Exception as exc:  # damaged, truncated or foreign file
        logger.warning("calibration statistics %s unreadable (%s); recomputing", path, exc)
        return None
    if header.get("checksum") != tensors_checksum(tensors) or not all(
        bool(torch.isfinite(t).all()) for t in tensors.values()
    ):
        logger.warning(
            "calibration statistics %s fail their checksum or hold non-finite values; recomputing", path
        )
        return None
    return tensors


def cached_statistics(
    name: str,
    description: dict[str, Any],
    compute: Callable[[], dict[str, torch.Tensor]],
    cache_dir: Path | None,
    use_cache: bool = True,
) -> dict[str, torch.Tensor]:
    """The tensors of statistic ``name`` for ``description`` from the cache, or computed and stored."""
    if not use_cache:
        return compute()
    path = (
        (cache_dir or default_cache_dir())
        / "calibration"
        / f"stats-{name}-{cache_key(description)}.safetensors"
    )
    if path.is_file():
        tensors = _load(path)
        if tensors is not None:
            logger.info("%s statistics loaded from cache %s", name, path)
            return tensors
    tensors = compute()
    try:
        _save(tensors, path, {**description, "statistic": name})
    except OSError as exc:
        logger.warning(
            "calibration statistics %s cannot be written (%s); continuing without caching", path, exc
        )
    return tensors


def add_statistics(
    store: HistoryStore,
    names: Iterable[str],
    model: torch.nn.Module,
    adapter: ModelAdapter,
    batches: Callable[[], list[torch.Tensor]],
    description: dict[str, Any],
    cache_dir: Path | None,
    use_cache: bool = True,
    progress: bool = True,
) -> HistoryStore:
    """Attach the extra statistics ``names`` to ``store`` (in place; returns it). ``batches`` gives
    the calibration batches, asked at most once and only when something must be computed."""
    loaded: list[torch.Tensor] = []

    def windows() -> list[torch.Tensor]:
        if not loaded:
            loaded.extend(batches())
        return loaded

    for name in sorted(set(names)):
        if name == "taylor":

            def taylor() -> dict[str, torch.Tensor]:
                stats = taylor_statistics(model, adapter, windows(), progress=progress)
                return {f"{i}.{k.value}.{v}": t for (i, k), vs in stats.items() for v, t in vs.items()}

            # F (the mean squared per-batch gradient) depends on the batching: the batch sizes join the key
            keyed = {**description, "batch_sizes": [int(b.shape[0]) for b in windows()]}
            for key, tensor in cached_statistics(name, keyed, taylor, cache_dir, use_cache).items():
                layer, kind, variant = key.split(".", 2)
                hist = store.get(int(layer), BlockKind(kind))
                if hist is not None:
                    hist.channel_stats[variant] = tensor.to(hist.sq_mean.device)
        elif name == "block-influence":

            def influence() -> dict[str, torch.Tensor]:
                return {"layer_influence": block_influence(model, adapter, windows(), progress)}

            store.layer_influence = cached_statistics(name, description, influence, cache_dir, use_cache)[
                "layer_influence"
            ]
        elif name == "flap-ppcode":

            def ppcode() -> dict[str, torch.Tensor]:
                stats = ppcode_flap_statistics(model, adapter, windows(), progress=progress)
                return {f"{i}.{k.value}.{v}": t for (i, k), vs in stats.items() for v, t in vs.items()}

            # the statistics depend on how the windows are batched: the batch sizes join the key
            keyed = {**description, "batch_sizes": [int(b.shape[0]) for b in windows()]}
            for key, tensor in cached_statistics(name, keyed, ppcode, cache_dir, use_cache).items():
                layer, kind, variant = key.split(".", 2)
                hist = store.get(int(layer), BlockKind(kind))
                if hist is not None:
                    hist.channel_stats[variant] = tensor.to(hist.sq_mean.device)
        else:
            raise ValueError(
                f"unknown calibration statistic {name!r}; expected one of {', '.join(EXTRA_STATISTICS)}"
            )
    return store
