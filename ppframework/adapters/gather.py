"""Weight gathers: slicing a Linear's rows/columns, fused multi-projection gathers, reusable buffers."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def gather_weight(
    linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight (and bias) of ``linear`` restricted to output ``rows`` and/or input ``cols``.

    The weight is gathered into a new tensor (``index_select``); the module is not modified.
    The bias follows the rows; with ``cols`` the full bias is kept (it is added once).
    """
    weight = linear.weight
    bias = linear.bias
    if rows is not None:
        weight = weight.index_select(0, rows)
        bias = bias.index_select(0, rows) if bias is not None else None
    if cols is not None:
        weight = weight.index_select(1, cols)
    return weight, bias


def sliced_linear(
    x: torch.Tensor, linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> torch.Tensor:
    """``linear(x)`` restricted to output ``rows`` and/or input ``cols`` of its weight (see
    :func:`gather_weight`)."""
    weight, bias = gather_weight(linear, rows, cols)
    return F.linear(x, weight, bias)


def unit_channels(units: torch.Tensor, unit_width: int) -> torch.Tensor:
    """Expand unit indices (heads) into the channel indices they cover."""
    if unit_width == 1:
        return units
    offsets = torch.arange(unit_width, device=units.device)
    return (units[:, None] * unit_width + offsets[None, :]).reshape(-1)


def concat_parts(
    parts: list[tuple[torch.Tensor, torch.Tensor | None]],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack gathered (weight, bias) parts along the output dimension (missing biases are zero)."""
    if len(parts) == 1:
        return parts[0]
    weight = torch.cat([w for w, _ in parts])
    if all(b is None for _, b in parts):
        return weight, None
    bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in parts])
    return weight, bias


class GatherBuffers:
    """Reusable storage for the per-batch weight gathers of one pipeline's block runners.

    Blocks run one after another, so one buffer per role (``"mlp.gate_up"``, ``"out"``, ...) serves
    every layer: each gather overwrites it right before the matmul that reads it (on CUDA the
    stream orders the two). Gathering into warm memory avoids allocating, and on CPU page-faulting,
    megabytes per block and batch. Runners use the buffers only while autograd is off (a saved
    weight must not be overwritten); storage grows to the largest request and is then reused.
    """

    def __init__(self) -> None:
        self._storage: dict[tuple[Any, ...], torch.Tensor] = {}

    def get(self, role: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A tensor of ``shape`` with ``like``'s dtype and device (contents undefined)."""
        key = (role, like.dtype, like.device, torch.is_inference_mode_enabled())
        numel = math.prod(shape)
        flat = self._storage.get(key)
        if flat is None or flat.numel() < numel:
            flat = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._storage[key] = flat
        return flat[:numel].view(shape)

    @property
    def nbytes(self) -> int:
        """Bytes currently held."""
        return sum(t.numel() * t.element_size() for t in self._storage.values())

    def clear(self) -> None:
        """Free every buffer."""
        self._storage.clear()
