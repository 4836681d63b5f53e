"""What one forward of the model is, as the pipeline's layers see it: the batch the backbone's pre-hook
describes (masks, positions, the decode state it continues) and one pruned layer's call within it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ppframework.adapters.base import additive_attention_bias
from ppframework.adapters.kv_cache import KVSlot
from ppframework.decoding import DecodeState
from ppframework.positions import RowShift


@dataclass
class _Batch:
    """What the backbone's forward pre-hook learns about the current forward.

    A decision forward (nothing cached before) carries its mask in position layout (``shift`` rolls
    left-padded rows so that columns are positions). A decode step continues a cache this pipeline
    filled: ``past`` tokens are cached, ``key_mask`` covers them and the new ones.
    """

    attention_mask: torch.Tensor
    position_valid: torch.Tensor | None
    has_padding: bool
    rows_per_position: torch.Tensor | None
    shift: RowShift | None = None
    probe_flops_scale: float = 1.0
    decode: DecodeState | None = None
    past: int = 0
    key_mask: torch.Tensor | None = None
    row_lengths: list[int] | None = None
    _bias: dict[torch.dtype, torch.Tensor | None] = field(default_factory=dict)
    _key_bias: dict[Any, torch.Tensor | None] = field(default_factory=dict)
    _rotary: tuple[Any, tuple[torch.Tensor, torch.Tensor] | None] | None = None
    _placed: dict[torch.device, _Batch] = field(default_factory=dict)

    @property
    def decoding(self) -> bool:
        """Whether this forward is a decode step (it continues a cache)."""
        return self.decode is not None

    def on(self, device: torch.device) -> _Batch:
        """This forward's batch with its tensors on ``device`` (a layer's device in a device-mapped
        model): self when they are there already, else a copy made once per device and forward."""
        if self.attention_mask.device == device:
            return self
        placed = self._placed.get(device)
        if placed is None:

            def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
                return None if tensor is None else tensor.to(device)

            placed = replace(
                self,
                attention_mask=self.attention_mask.to(device),
                position_valid=move(self.position_valid),
                rows_per_position=move(self.rows_per_position),
                shift=None if self.shift is None else self.shift.to(device),
                key_mask=move(self.key_mask),
                _bias={},
                _key_bias={},
                _rotary=None,
                _placed={},
            )
            self._placed[device] = placed
        return placed

    def attn_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The additive attention bias of a padded decision forward (None otherwise), once per dtype."""
        if not self.has_padding or self.decoding:
            return None
        if dtype not in self._bias:
            self._bias[dtype] = additive_attention_bias(self.attention_mask, dtype)
        return self._bias[dtype]

    def aligned_rotary(
        self, rotary: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The model's rotary tables in this forward's layout (rolled once, shared by the layers)."""
        if rotary is None or self.shift is None:
            return rotary
        if self._rotary is None or self._rotary[0] is not rotary[0]:
            cos, sin = rotary
            self._rotary = (rotary[0], (self.shift.to_positions(cos), self.shift.to_positions(sin)))
        return self._rotary[1]

    def kv_slot(self, cache: Any, layer_idx: int, full_kv: bool) -> KVSlot:
        """A slot of the model's cache for one attention block of this forward."""
        return KVSlot(
            cache,
            layer_idx,
            self.past,
            key_mask=self.key_mask,
            shift=self.shift,
            full_kv=full_kv,
            bias_cache=self._key_bias,
        )


@dataclass(frozen=True)
class LayerCall:
    """One pruned layer's part of a forward: the layer, the forward's batch (on the layer's device, or
    one row's alone), the rotary tables in position layout and the model's cache (None without one)."""

    index: int
    layer: nn.Module
    batch: _Batch
    rotary: tuple[torch.Tensor, torch.Tensor] | None
    cache: Any
