"""Phi-3 decoder layers: LLaMA-like, with fused ``qkv_proj`` and ``gate_up_proj`` projections.

Slicing cuts the fused weights by part: a kept query head keeps its rows of the q part, a kept
key/value head its rows of both the k and the v parts; a kept MLP channel keeps its row of the gate
half and of the up half. The sliced rows are gathered in the q, k, v (gate, up) order the
shared runners expect, so everything downstream (GQA policies, probe reuse, KV cache) is shared.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ppframework.adapters.attention_runner import QKV, AttentionRunner
from ppframework.adapters.llama import LlamaLikeAdapter
from ppframework.adapters.mlp_runner import MLPRunner
from ppframework.types import BlockGeometry


class Phi3AttentionRunner(AttentionRunner):
    """Attention with one fused ``qkv_proj`` (rows: all q, then all k, then all v)."""

    def __init__(
        self, attn: nn.Module, geometry: BlockGeometry, layer_idx: int = 0, config: Any = None
    ) -> None:
        super().__init__(attn, geometry, layer_idx, config)
        self._rows_memo: tuple[Any, Any, torch.Tensor] | None = None

    @property
    def kv_width(self) -> int:
        """Rows of the k part (= rows of the v part) of the fused projection."""
        return self.geometry.num_kv_heads * self.geometry.unit_width

    def dense_qkv(self, x: torch.Tensor) -> QKV:
        qkv = self.linear(x, self.attn.qkv_proj)
        n_q, n_kv = self.query_width, self.kv_width
        q, k, v = qkv.split((n_q, n_kv, n_kv), dim=-1)
        return q, k, v

    def fused_rows(self, q_rows: torch.Tensor | None, kv_rows: torch.Tensor | None) -> torch.Tensor:
        """Rows of ``qkv_proj`` for q rows ``q_rows`` and k/v rows ``kv_rows`` (None: all of that part),
        remembered for the last pair of index tensors."""
        memo = self._rows_memo
        if memo is not None and memo[0] is q_rows and memo[1] is kv_rows:
            return memo[2]
        device = self.attn.qkv_proj.weight.device
        n_q, n_kv = self.query_width, self.kv_width
        q = torch.arange(n_q, device=device) if q_rows is None else q_rows.to(device)
        kv = torch.arange(n_kv, device=device) if kv_rows is None else kv_rows.to(device)
        rows = torch.cat((q, kv + n_q, kv + n_q + n_kv))
        self._rows_memo = (q_rows, kv_rows, rows)
        return rows

    def sliced_qkv_weight(
        self, q_rows: torch.Tensor | None, kv_rows: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = self.fused_rows(q_rows, kv_rows)
        return self.gather("attn.qkv", (self.attn.qkv_proj,), (rows,))


class Phi3MLPRunner(MLPRunner):
    """Gated MLP ``down(up * act(gate))`` with one fused ``gate_up_proj`` (rows: gate half, up half)."""

    def __init__(self, mlp: nn.Module, geometry: BlockGeometry) -> None:
        super().__init__(mlp, geometry)
        self._rows_memo: tuple[torch.Tensor, int, torch.Tensor] | None = None

    def dense_gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = self.linear(x, self.mlp.gate_up_proj).chunk(2, dim=-1)
        return gate, up

    def fused_rows(self, kept_units: torch.Tensor) -> torch.Tensor:
        """Rows of ``gate_up_proj`` for channels ``kept_units``: gate-half rows, then up-half rows."""
        memo = self._rows_memo
        version = -1 if kept_units.is_inference() else kept_units._version
        if memo is not None and memo[0] is kept_units and memo[1] == version:
            return memo[2]
        rows = torch.cat((kept_units, kept_units + self.geometry.units))
        self._rows_memo = (kept_units, version, rows)
        return rows

    def sliced_gate_up_weight(self, kept_units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.gather("mlp.gate_up", (self.mlp.gate_up_proj,), (self.fused_rows(kept_units),))


class Phi3Adapter(LlamaLikeAdapter):
    """Phi-3 (and Phi-4-mini, same ``phi3`` model type; partial rotary is handled by the runner)."""

    family = "phi3"
    model_types = ("phi3",)
    attention_runner = Phi3AttentionRunner
    mlp_runner = Phi3MLPRunner
