"""Dense calibration: the exact per-position mean of ``X^2`` (and ``X``) at every output
projection's input, cached on disk as safetensors plus a JSON header (never pickle)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ppframework.adapters import ModelAdapter
from ppframework.history import BlockHistory, HistoryStore
from ppframework.types import BlockKind

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """``$PPF_CACHE_DIR`` or ``~/.cache/ppframework``."""
    return Path(os.environ.get("PPF_CACHE_DIR") or Path.home() / ".cache" / "ppframework")


def cache_key(description: dict[str, Any]) -> str:
    """Stable short hash of everything the calibration depends on."""
    text = json.dumps({"format": CACHE_FORMAT_VERSION, **description}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class _Accumulator:
    """Sums of X and X^2 per position for one output projection (fp32)."""

    def __init__(self) -> None:
        self.sq_sum: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.count = 0
        self.batch_size = 1

    def __call__(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        # Some families (OPT) flatten (batch, seq) before the MLP; restore the position axis.
        x = args[0].detach().float().reshape(self.batch_size, -1, args[0].shape[-1])
        if self.sq_sum is None:
            self.sq_sum = x.square().sum(dim=0)
            self.sum = x.sum(dim=0)
        else:
            self.sq_sum += x.square().sum(dim=0)
            self.sum += x.sum(dim=0)
        self.count += x.shape[0]


def calibrate(
    model: torch.nn.Module,
    adapter: ModelAdapter,
    batches: list[torch.Tensor],
    layers: list[int] | None = None,
    progress: bool = True,
) -> HistoryStore:
    """Run the dense model over ``batches`` (no padding) and return the exact means per position.

    The forwards run under ``torch.inference_mode``; the returned means are ordinary tensors, so
    the history can be updated in place outside inference mode too.
    """
    layers = list(range(adapter.num_layers)) if layers is None else layers
    accumulators: dict[tuple[int, BlockKind], _Accumulator] = {}
    handles = []
    for i in layers:
        for kind in BlockKind:
            acc = _Accumulator()
            accumulators[(i, kind)] = acc
            handles.append(adapter.runner(i, kind).out_proj.register_forward_pre_hook(acc))
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc="calibration", unit="batch", disable=not progress):
                for acc in accumulators.values():
                    acc.batch_size = batch.shape[0]
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    blocks = {}
    for key, acc in accumulators.items():
        if acc.sq_sum is None:
            raise RuntimeError(f"calibration saw no input at layer {key[0]} {key[1].value}")
        blocks[key] = BlockHistory(
            sq_mean=acc.sq_sum / acc.count, mean=acc.sum / acc.count, samples=acc.count
        )
    return HistoryStore(blocks)


def save_history(store: HistoryStore, path: Path, header: dict[str, Any]) -> None:
    """Write ``path`` (.safetensors) and ``path`` with .json, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for (layer, kind), hist in store.blocks.items():
        tensors[f"{layer}.{kind.value}.sq_mean"] = hist.sq_mean.detach().cpu().contiguous()
        if hist.mean is not None:
            tensors[f"{layer}.{kind.value}.mean"] = hist.mean.detach().cpu().contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"header": json.dumps(header, default=str)})
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(header, indent=2, default=str))


def load_history(path: Path) -> HistoryStore:
    """Read a history written by :func:`save_history`."""
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads((handle.metadata() or {}).get("header", "{}"))
    samples = int(header.get("n_samples", 0))
    blocks: dict[tuple[int, BlockKind], BlockHistory] = {}
    for name, tensor in tensors.items():
        layer, kind, field = name.split(".")
        key = (int(layer), BlockKind(kind))
        hist = blocks.setdefault(key, BlockHistory(sq_mean=torch.empty(0), samples=samples))
        if field == "sq_mean":
            hist.sq_mean = tensor
        else:
            hist.mean = tensor
    return HistoryStore(blocks)


def cached_calibration(
    description: dict[str, Any],
    compute: Callable[[], HistoryStore],
    cache_dir: Path | None,
    use_cache: bool = True,
) -> tuple[HistoryStore, Path | None, bool]:
    """Load the calibration keyed by ``description`` from disk, or compute and store it.

    Returns (store, cache file or None, whether it was loaded from the cache).
    """
    if not use_cache:
        return compute(), None, False
    directory = (cache_dir or default_cache_dir()) / "calibration"
    path = directory / f"calib-{cache_key(description)}.safetensors"
    if path.is_file():
        logger.info("calibration loaded from cache %s", path)
        return load_history(path), path, True
    store = compute()
    save_history(store, path, description)
    logger.info("calibration cached at %s", path)
    return store, path, False
