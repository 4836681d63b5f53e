"""Rotary position embeddings applied to a runner's (B, H, T, d) queries and keys (full or partial)."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last dimension: (a, b) -> (-b, a)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` (B, H, T, d) with ``cos``/``sin`` (B or 1, T, r).

    With ``r < d`` (partial rotary) only the first ``r`` features rotate; the rest pass through.
    """
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        head, tail = x[..., :rot], x[..., rot:]
        return torch.cat((_rotated(head, cos, sin), tail), dim=-1)
    return _rotated(x, cos, sin)


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` without building ``rotate_half(x)``: the first half is
    ``x1 * cos - x2 * sin`` (IEEE negation is exact, so ``a + (-b) * c == a - b * c``), the second
    ``x2 * cos + x1 * sin``; the same values in fewer passes over memory."""
    width = x.shape[-1]
    if width % 2:
        return x * cos + rotate_half(x) * sin
    half = width // 2
    out = x * cos
    out[..., :half].sub_(x[..., half:] * sin[..., :half])
    out[..., half:].add_(x[..., :half] * sin[..., half:])
    return out
