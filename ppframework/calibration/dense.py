"""Dense calibration: the exact per-position mean of ``X^2`` (and ``X``) at every output projection's
input, over the dense model's forwards on calibration windows, and the shapes such a calibration has."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from ppframework.adapters import ModelAdapter
from ppframework.devices import input_device
from ppframework.history import BlockHistory, HistoryStore
from ppframework.types import BlockKind

R = TypeVar("R")


class _Accumulator:
    """Sums of X and X^2 per position for one output projection (fp32)."""

    def __init__(self) -> None:
        self.sq_sum: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Fold in one batch's (batch, seq, channels) projection input."""
        x = x.detach().float()
        if self.sq_sum is None:
            self.sq_sum = x.square().sum(dim=0)
            self.sum = x.sum(dim=0)
        else:
            self.sq_sum += x.square().sum(dim=0)
            self.sum += x.sum(dim=0)
        self.count += x.shape[0]


def read_projection_inputs(
    model: torch.nn.Module,
    adapter: ModelAdapter,
    batches: list[torch.Tensor],
    new: Callable[[], R],
    read: Callable[[R, torch.Tensor], None],
    *,
    layers: list[int] | None = None,
    desc: str = "calibration",
    progress: bool = True,
) -> dict[tuple[int, BlockKind], R]:
    """Run the dense model over ``batches`` (no padding, under ``torch.inference_mode``) with one
    reader per block (``new()``) on the input of the block's output projection: each forward calls
    ``read(reader, x)`` with that input as (batch, seq, channels). Returns the readers by block."""
    layers = list(range(adapter.num_layers)) if layers is None else layers
    readers = {(i, kind): new() for i in layers for kind in BlockKind}
    rows = [1]  # the running batch's row count

    def hook_for(reader: R) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            # Some families (OPT) flatten (batch, seq) before the MLP; restore the position axis.
            read(reader, args[0].reshape(rows[0], -1, args[0].shape[-1]))

        return hook

    handles = [
        adapter.runner(i, kind).out_proj.register_forward_pre_hook(hook_for(reader))
        for (i, kind), reader in readers.items()
    ]
    device = input_device(model)  # the embedding's device (device maps: accelerate moves the rest)
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
                rows[0] = batch.shape[0]
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return readers


def calibrate(
    model: torch.nn.Module,
    adapter: ModelAdapter,
    batches: list[torch.Tensor],
    layers: list[int] | None = None,
    progress: bool = True,
) -> HistoryStore:
    """Run the dense model over ``batches`` (no padding) and return the exact means per position.

    The forwards run under ``torch.inference_mode``; the returned means are ordinary tensors, so
    the history can be updated in place outside inference mode too. In a device-mapped model each
    block's means are left on the device its layer runs on.
    """
    accumulators = read_projection_inputs(
        model, adapter, batches, _Accumulator, _Accumulator.add, layers=layers, progress=progress
    )
    blocks = {}
    for key, acc in accumulators.items():
        if acc.sq_sum is None:
            raise RuntimeError(f"calibration saw no input at layer {key[0]} {key[1].value}")
        blocks[key] = BlockHistory(
            sq_mean=acc.sq_sum / acc.count, mean=acc.sum / acc.count, samples=acc.count
        )
    return HistoryStore(blocks)


def expected_shapes(adapter: ModelAdapter, positions: int, layers: list[int] | None = None) -> dict[str, Any]:
    """The shapes a calibration of ``adapter``'s model over ``positions`` positions has: layers, block
    kinds, positions and the channels of each kind's output projection input."""
    layers = list(range(adapter.num_layers)) if layers is None else sorted(layers)
    channels = {kind.value: int(adapter.runner(layers[0], kind).out_proj.in_features) for kind in BlockKind}
    return {
        "layers": layers,
        "kinds": sorted(kind.value for kind in BlockKind),
        "positions": int(positions),
        "channels": channels,
    }
