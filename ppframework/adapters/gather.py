"""Weight gathers: slicing a Linear's rows/columns, fused multi-projection gathers, reusable buffers."""

from __future__ import annotations

import math
from collections.abc import Callable
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


Allocator = Callable[[str, tuple[int, ...], torch.Tensor], torch.Tensor]
"""``(role, shape, like) -> tensor`` of ``shape`` with ``like``'s dtype and device, contents undefined."""


def new_tensor(role: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A new uninitialised tensor of ``shape`` (an :data:`Allocator` for gathers that keep their result)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def gather_stacked(
    allocate: Allocator,
    role: str,
    linears: tuple[nn.Linear, ...],
    rows: tuple[torch.Tensor | None, ...],
    cols: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights (and biases) of ``linears`` restricted to their ``rows`` and to input ``cols``,
    gathered straight into one tensor stacked along the output dimension (``allocate`` provides it, and
    ``role + ".bias"`` the bias): the values of :func:`gather_weight` per part then
    :func:`concat_parts`, without their intermediate copies. Autograd off only (``out=`` gathers).

    A single linear gathered by columns only keeps its own bias (shared, not copied)."""
    first = linears[0].weight
    widths = [
        lin.weight.shape[0] if r is None else int(r.numel()) for lin, r in zip(linears, rows, strict=True)
    ]
    n_in = first.shape[1] if cols is None else int(cols.numel())
    weight = allocate(role, (sum(widths), n_in), first)
    biases = [lin.bias for lin in linears]
    bias: torch.Tensor | None = None
    if len(linears) == 1 and rows[0] is None:
        bias = biases[0]  # columns only: the full bias, shared, not copied
    elif any(b is not None for b in biases):
        bias = allocate(role + ".bias", (sum(widths),), first)
    start = 0
    for lin, r, width, b in zip(linears, rows, widths, biases, strict=True):
        dst = weight.narrow(0, start, width)
        src = lin.weight
        if r is not None and cols is not None:
            torch.index_select(src.index_select(0, r), 1, cols, out=dst)
        elif r is not None:
            torch.index_select(src, 0, r, out=dst)
        elif cols is not None:  # a column gather: gather with a broadcast index is the faster form
            torch.gather(src, 1, cols.expand(src.shape[0], cols.numel()), out=dst)
        else:
            dst.copy_(src)
        if bias is not None and bias is not b:
            bdst = bias.narrow(0, start, width)
            if b is None:
                bdst.zero_()
            elif r is not None:
                torch.index_select(b, 0, r, out=bdst)
            else:
                bdst.copy_(b)
        start += width
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
