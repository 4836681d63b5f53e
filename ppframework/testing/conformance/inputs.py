"""Random inputs shared by the stage checks: padding layouts, geometries, index subsets, scores."""

from __future__ import annotations

from typing import Any

import torch

from ppframework.testing.conformance.examples import _strategies
from ppframework.types import BlockGeometry, BlockKind

#: Padding layouts of the checks' attention masks (every row keeps >= 1 real token). ``*-short``:
#: every row is shorter than the batch, so the last (right) or first (left) position is padding
#: in every row.
PADDINGS: tuple[str, ...] = ("none", "right", "left", "right-short", "left-short")

_SEED = 2**31 - 1
_HEAD_COUNTS = (1, 2, 3, 4, 6, 8)


def _padding_mask(gen: torch.Generator, batch: int, seq: int, padding: str) -> torch.Tensor:
    """(B, T) long mask laid out as one of :data:`PADDINGS`; every row keeps >= 1 real token."""
    if padding == "none":
        return torch.ones(batch, seq, dtype=torch.long)
    longest = max(seq - 1, 1) if padding.endswith("-short") else seq
    lengths = torch.randint(1, longest + 1, (batch,), generator=gen)
    positions = torch.arange(seq)[None, :]
    if padding.startswith("right"):
        return (positions < lengths[:, None]).long()
    if padding.startswith("left"):
        return (positions >= seq - lengths[:, None]).long()
    raise ValueError(f"unknown padding {padding!r}")


def _subset(gen: torch.Generator, candidates: torch.Tensor) -> torch.Tensor:
    """A random non-empty subset of 1-D ``candidates``, sorted."""
    n = int(candidates.numel())
    k = int(torch.randint(1, n + 1, (1,), generator=gen))
    return candidates[torch.randperm(n, generator=gen)[:k]].sort().values


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _draw_geometry(data: Any) -> BlockGeometry:
    st = _strategies()
    kind = data.draw(st.sampled_from(tuple(BlockKind)), label="kind")
    if kind is BlockKind.ATTENTION:
        heads = data.draw(st.sampled_from(_HEAD_COUNTS), label="heads")
        kv_heads = data.draw(st.sampled_from(_divisors(heads)), label="num_kv_heads")
        width = data.draw(st.integers(1, 8), label="head_dim")
        return BlockGeometry(kind, units=heads, unit_width=width, num_kv_heads=kv_heads)
    return BlockGeometry(kind, units=data.draw(st.integers(1, 48), label="mlp_units"), unit_width=1)


def _nonnegative(gen: torch.Generator, shape: tuple[int, ...], values: str) -> torch.Tensor:
    """Non-negative scores: ``random`` (continuous), ``ties`` (small integers) or ``zeros``."""
    if values == "zeros":
        return torch.zeros(shape)
    if values == "ties":
        return torch.randint(0, 3, shape, generator=gen).float()
    return torch.randn(shape, generator=gen).square()


def _activation_times_weight(activation: torch.Tensor | None, weight_term: torch.Tensor) -> torch.Tensor:
    """PPsp-like combine of the synthetic scores: ``a_c * w_c`` (``w_c`` alone without activation)."""
    return weight_term if activation is None else activation * weight_term
