"""The model-adapter interface: where a family keeps its blocks and how to run them sliced.

An adapter never copies Hugging Face modeling code; it reads the model's config and calls the
model's own ``nn.Linear``/norm modules, slicing their weights on the fly so that the original
parameters stay shared and untouched.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ppframework.types import BlockGeometry, BlockKind


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


def additive_attention_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Causal + key-padding additive bias (B, 1, T, T), or None when there is no padding.

    Fully masked rows (a padding query with no real key before it) get a zero bias on the
    diagonal so that softmax never sees only ``-inf`` (their outputs are never used).
    """
    if bool(attention_mask.all()):
        return None
    _, seq = attention_mask.shape
    device = attention_mask.device
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    allowed = causal[None, :, :] & attention_mask.bool()[:, None, :]
    allowed = allowed | torch.eye(seq, dtype=torch.bool, device=device)[None]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias[:, None, :, :]


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention_mask: torch.Tensor,
    attn_bias: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Causal SDPA over (B, H, T, d) tensors; the fast causal path when there is no padding.

    ``attn_bias`` is the precomputed additive form of ``attention_mask`` (built here if None and
    the mask has padding).
    """
    if attn_bias is None and bool(attention_mask.all()):
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale)
    if attn_bias is None:
        attn_bias = additive_attention_bias(attention_mask, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=scale)


def _same_index(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or torch.equal(a, b)


class BlockRunner(ABC):
    """Runs one block of one decoder layer, optionally on a subset of its units.

    ``pre_output`` computes the input of the output projection (the activations the scores are
    made from); ``output`` applies the output projection on the matching channels.
    """

    geometry: BlockGeometry
    _pinned: (
        dict[int, tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor | None]] | None
    ) = None

    def pin_weights(self) -> None:
        """Keep every sliced weight gathered from now on and reuse it (for static masks).

        While pinned, each projection must always be sliced with the same indices; a different
        slice raises instead of silently reusing a stale weight. Pinning again keeps what is cached.
        """
        if self._pinned is None:
            self._pinned = {}

    def unpin_weights(self) -> None:
        """Drop the pinned sliced weights (gather per call again)."""
        self._pinned = None

    def linear(
        self,
        x: torch.Tensor,
        linear: nn.Linear,
        rows: torch.Tensor | None = None,
        cols: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``linear(x)`` on the given rows/columns; reuses pinned sliced weights when pinned."""
        if self._pinned is None or (rows is None and cols is None):
            return sliced_linear(x, linear, rows, cols)
        cached = self._pinned.get(id(linear))
        if cached is None:
            weight, bias = gather_weight(linear, rows, cols)
            cached = (rows, cols, weight, bias)
            self._pinned[id(linear)] = cached
        elif not (_same_index(cached[0], rows) and _same_index(cached[1], cols)):
            raise RuntimeError("pinned block weights were requested with a different slice; unpin first")
        return F.linear(x, cached[2], cached[3])

    @property
    @abstractmethod
    def out_proj(self) -> nn.Linear:
        """The block's output projection module (o_proj, down_proj, out_proj or fc2)."""

    @abstractmethod
    def pre_output(
        self,
        x: torch.Tensor,
        *,
        attention_mask: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        kept_units: torch.Tensor | None = None,
        kept_kv_heads: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Input of the output projection (B, T, kept channels) for normed input ``x``.

        ``attention_mask`` (B, T) marks real tokens; ``attn_bias`` is its precomputed additive
        form (None = plain causal); ``rotary`` is (cos, sin) at the rows' true positions.
        ``kept_units`` None means all units.
        """

    def output(self, z: torch.Tensor, kept_channels: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the output projection to ``z`` whose channels are ``kept_channels``."""
        return self.linear(z, self.out_proj, cols=kept_channels)

    def channels_of(self, kept_units: torch.Tensor | None) -> torch.Tensor | None:
        """Channel indices of the output projection's input covered by ``kept_units``."""
        if kept_units is None:
            return None
        return unit_channels(kept_units, self.geometry.unit_width)


class ModelAdapter(ABC):
    """Knows, for one model family, where the decoder blocks are and how the residual flows."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    mlp_matrices: ClassVar[int] = 3

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    @property
    @abstractmethod
    def layers(self) -> nn.ModuleList:
        """The decoder layers in order."""

    @property
    def num_layers(self) -> int:
        """Number of decoder layers."""
        return len(self.layers)

    @abstractmethod
    def geometry(self, kind: BlockKind) -> BlockGeometry:
        """Sizes of the given block (the same for every layer)."""

    @abstractmethod
    def runner(self, layer_index: int, kind: BlockKind) -> BlockRunner:
        """A runner for one block of one layer."""

    @abstractmethod
    def block_input(self, layer: nn.Module, kind: BlockKind, hidden: torch.Tensor) -> torch.Tensor:
        """The block's normed input given the residual stream ``hidden``."""

    @abstractmethod
    def block_residual(
        self, layer: nn.Module, kind: BlockKind, hidden: torch.Tensor, block_out: torch.Tensor
    ) -> torch.Tensor:
        """The residual stream after the block."""

    def rotary(self, layer_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rotary (cos, sin) the model passed to its layers, or None for absolute positions."""
        return None

    def check_supported(self, seq_len: int) -> None:
        """Raise :class:`~ppframework.errors.ConfigError` for settings the adapter cannot run."""
        return None
