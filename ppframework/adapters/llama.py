"""LLaMA-like decoder layers: LLaMA 2/3, Mistral, Qwen2, SmolLM (grouped-query attention included)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ppframework.adapters.attention import HeadGroups, grouped_attention
from ppframework.adapters.base import (
    BlockRunner,
    ModelAdapter,
    ProbeReuse,
    attend,
    fill_outside_probe,
    probe_rotary,
    unit_channels,
)
from ppframework.errors import ConfigError
from ppframework.types import BlockGeometry, BlockKind


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last dimension: (a, b) -> (-b, a)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` (B, H, T, d) with ``cos``/``sin`` (B or 1, T, d)."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def linear_into(
    weight: torch.Tensor, bias: torch.Tensor | None
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """``compute(x2d, out2d)`` writing ``F.linear(x2d, weight, bias)`` into ``out2d`` (no temporary)."""

    def compute(x2d: torch.Tensor, out2d: torch.Tensor) -> None:
        if bias is None:
            torch.mm(x2d, weight.t(), out=out2d)
        else:
            torch.addmm(bias, x2d, weight.t(), out=out2d)

    return compute


class LlamaAttentionRunner(BlockRunner):
    """Attention of a LLaMA-like layer on kept query heads (and optionally kept key/value groups).

    Sliced path: the kept rows of q, k and v are gathered into one weight (one matmul); with a
    :class:`ProbeReuse` the probe's q/k/v projections (exact per token) fill the probe's tokens.
    """

    def __init__(self, attn: nn.Module, geometry: BlockGeometry, layer_idx: int = 0) -> None:
        self.attn = attn
        self.geometry = geometry
        self.layer_idx = int(getattr(attn, "layer_idx", layer_idx))
        self.scaling = float(getattr(attn, "scaling", geometry.unit_width**-0.5))
        self._kv_memo: tuple[Any, Any, torch.Tensor | None, torch.Tensor | None] | None = None
        self._groups_memo: tuple[torch.Tensor, HeadGroups] | None = None
        self._dense_kv_index: torch.Tensor | None = None

    @property
    def out_proj(self) -> nn.Linear:
        return self.attn.o_proj

    def pre_output(
        self,
        x: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None,
        attn_bias: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        kept_units: torch.Tensor | None = None,
        kept_kv_heads: torch.Tensor | None = None,
        reuse: ProbeReuse | None = None,
    ) -> torch.Tensor:
        attn = self.attn
        if kept_units is None and kept_kv_heads is None:
            q = self.linear(x, attn.q_proj)
            k = self.linear(x, attn.k_proj)
            v = self.linear(x, attn.v_proj)
            return self._attend(q, k, v, attention_mask, attn_bias, rotary, None, None)
        q_rows = self.channels_of(kept_units)
        kv_rows, _ = self._kv_maps(kept_units, kept_kv_heads, x.device)
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        weight, bias = self.gather("attn.qkv", projections, (q_rows, kv_rows, kv_rows))
        if reuse is not None and reuse.usable_for(x):
            qkv = x.new_empty(*x.shape[:-1], weight.shape[0])
            probe_q, probe_k, probe_v = reuse.values
            parts = [
                t if rows is None else t.index_select(-1, rows)
                for t, rows in ((probe_q, q_rows), (probe_k, kv_rows), (probe_v, kv_rows))
            ]
            fill_outside_probe(x, qkv, linear_into(weight, bias), reuse, torch.cat(parts, dim=-1))
        else:
            qkv = torch.nn.functional.linear(x, weight, bias)
        n_q = attn.q_proj.weight.shape[0] if q_rows is None else int(q_rows.numel())
        n_kv = (qkv.shape[-1] - n_q) // 2
        q, k, v = qkv.split((n_q, n_kv, n_kv), dim=-1)
        return self._attend(q, k, v, attention_mask, attn_bias, rotary, kept_units, kept_kv_heads)

    def probe_forward(
        self,
        x: torch.Tensor,
        rows: torch.Tensor,
        tokens: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        keep_for_reuse: bool = False,
    ) -> tuple[torch.Tensor, ProbeReuse | None]:
        """The probe's attention output; with ``keep_for_reuse`` also its q/k/v projections."""
        probe_x = x.index_select(0, rows).index_select(1, tokens)
        attn = self.attn
        q = self.linear(probe_x, attn.q_proj)
        k = self.linear(probe_x, attn.k_proj)
        v = self.linear(probe_x, attn.v_proj)
        rot = probe_rotary(rotary, rows, tokens)
        states = self._attend(q, k, v, attention_mask, None, rot, None, None, cache=False)
        return states, (ProbeReuse.build(x, rows, tokens, (q, k, v)) if keep_for_reuse else None)

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_bias: torch.Tensor | None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        kept_units: torch.Tensor | None,
        kept_kv_heads: torch.Tensor | None,
        cache: bool = True,
    ) -> torch.Tensor:
        """Attention output (B, T, heads * d) from (B, T, width) projections (before rotary).

        With the pipeline's :class:`KVSlot` set (and ``cache``), the rotated keys and values are stored
        in the model's cache and the queries attend to what it holds."""
        batch, seq, _ = q.shape
        d = self.geometry.unit_width
        q = q.view(batch, seq, -1, d).transpose(1, 2)
        k = k.view(batch, seq, -1, d).transpose(1, 2)
        v = v.view(batch, seq, -1, d).transpose(1, 2)
        if rotary is not None:
            cos, sin = rotary
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
        slot = self.kv_slot if cache else None
        if slot is not None:
            k, v = slot.store(k, v)
        n_heads = q.shape[1]
        if n_heads != k.shape[1] or kept_units is not None:
            _, kv_index = self._kv_maps(kept_units, kept_kv_heads, q.device)
            if kv_index is not None and slot is not None and slot.past > 0:
                groups = self._head_groups(kv_index, k.shape[1])
                bias = slot.bias(seq, k.shape[2], q.dtype)
                out = grouped_attention(q, k, v, groups, bias, self.scaling)
                return out.transpose(1, 2).reshape(batch, seq, n_heads * d)
            if kv_index is not None:
                k = k.index_select(1, kv_index)
                v = v.index_select(1, kv_index)
        out = attend(q, k, v, attention_mask, attn_bias, self.scaling, slot)
        return out.transpose(1, 2).reshape(batch, seq, n_heads * d)

    def _head_groups(self, kv_index: torch.Tensor, kv_heads: int) -> HeadGroups:
        """The query stacking of :func:`grouped_attention` for ``kv_index``, remembered per tensor."""
        memo = self._groups_memo
        if memo is None or memo[0] is not kv_index or memo[1].kv_heads != kv_heads:
            memo = self._groups_memo = (kv_index, HeadGroups.build(kv_index, kv_heads))
        return memo[1]

    def _kv_maps(
        self, kept_units: torch.Tensor | None, kept_kv_heads: torch.Tensor | None, device: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(k/v projection rows to compute or None for all, key/value head of each kept query head
        among the computed ones or None when that is the identity), remembered per mask."""
        geo = self.geometry
        if kept_units is None and kept_kv_heads is None:  # full weights (probe, dense): per device
            dense = self._dense_kv_index
            if dense is None or dense.device != device:
                dense = self._dense_kv_index = self._kv_index(None, None, device)
            return None, dense
        memo = self._kv_memo
        if memo is not None and memo[0] is kept_units and memo[1] is kept_kv_heads:
            return memo[2], memo[3]
        kv_rows = unit_channels(kept_kv_heads, geo.unit_width) if kept_kv_heads is not None else None
        if kept_units is not None and kept_kv_heads is kept_units and geo.group_size == 1:
            kv_index = None  # each kept head keeps its own key/value head, in the same order
        else:
            kv_index = self._kv_index(kept_units, kept_kv_heads, device)
        self._kv_memo = (kept_units, kept_kv_heads, kv_rows, kv_index)
        return kv_rows, kv_index

    def _kv_index(
        self, kept_units: torch.Tensor | None, kept_kv_heads: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor:
        """For each kept query head, the index of its key/value head among the computed ones."""
        geo = self.geometry
        heads = kept_units if kept_units is not None else torch.arange(geo.units, device=device)
        kv_of_head = torch.div(heads, geo.group_size, rounding_mode="floor")
        if kept_kv_heads is None:
            return kv_of_head
        position = torch.full((geo.num_kv_heads,), -1, dtype=torch.long, device=device)
        position[kept_kv_heads] = torch.arange(kept_kv_heads.numel(), device=device)
        return position[kv_of_head]


class LlamaMLPRunner(BlockRunner):
    """Gated MLP ``down(act(gate(x)) * up(x))`` on kept intermediate channels.

    Sliced path: the kept rows of gate and up are gathered into one weight (one matmul); with a
    :class:`ProbeReuse` the probe's activations of the kept channels (exact per token) fill the
    probe's tokens instead of being recomputed.
    """

    def __init__(self, mlp: nn.Module, geometry: BlockGeometry) -> None:
        self.mlp = mlp
        self.geometry = geometry

    @property
    def out_proj(self) -> nn.Linear:
        return self.mlp.down_proj

    def pre_output(
        self,
        x: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None,
        attn_bias: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        kept_units: torch.Tensor | None = None,
        kept_kv_heads: torch.Tensor | None = None,
        reuse: ProbeReuse | None = None,
    ) -> torch.Tensor:
        mlp = self.mlp
        act = mlp.act_fn
        if kept_units is None:
            return act(self.linear(x, mlp.gate_proj)) * self.linear(x, mlp.up_proj)
        weight, bias = self.gather("mlp.gate_up", (mlp.gate_proj, mlp.up_proj), (kept_units, kept_units))
        n = int(kept_units.numel())
        if reuse is not None and reuse.usable_for(x):

            def compute(x2d: torch.Tensor, out2d: torch.Tensor) -> None:
                h = torch.nn.functional.linear(x2d, weight, bias)
                torch.mul(act(h[:, :n]), h[:, n:], out=out2d)

            out = x.new_empty(*x.shape[:-1], n)
            return fill_outside_probe(x, out, compute, reuse, reuse.values.index_select(-1, kept_units))
        h = torch.nn.functional.linear(x, weight, bias)
        return act(h[..., :n]) * h[..., n:]

    def probe_forward(
        self,
        x: torch.Tensor,
        rows: torch.Tensor,
        tokens: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        keep_for_reuse: bool = False,
    ) -> tuple[torch.Tensor, ProbeReuse | None]:
        """The probe's activations; with ``keep_for_reuse`` also kept for the full pass."""
        states, _ = super().probe_forward(x, rows, tokens, attention_mask=attention_mask, rotary=rotary)
        return states, (ProbeReuse.build(x, rows, tokens, states) if keep_for_reuse else None)


class LlamaLikeAdapter(ModelAdapter):
    """Pre-norm decoder layers with RMSNorm, rotary attention (GQA aware) and a gated MLP."""

    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "smollm", "smollm2")

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def geometry(self, kind: BlockKind) -> BlockGeometry:
        cfg = self.config
        if kind is BlockKind.ATTENTION:
            heads = int(cfg.num_attention_heads)
            kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
            head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
            return BlockGeometry(kind, units=heads, unit_width=head_dim, num_kv_heads=kv)
        return BlockGeometry(kind, units=int(cfg.intermediate_size), unit_width=1)

    def runner(self, layer_index: int, kind: BlockKind) -> BlockRunner:
        layer = self.layers[layer_index]
        if kind is BlockKind.ATTENTION:
            return LlamaAttentionRunner(layer.self_attn, self.geometry(kind), layer_index)
        return LlamaMLPRunner(layer.mlp, self.geometry(kind))

    def block_input(self, layer: nn.Module, kind: BlockKind, hidden: torch.Tensor) -> torch.Tensor:
        norm = layer.input_layernorm if kind is BlockKind.ATTENTION else layer.post_attention_layernorm
        return norm(hidden)

    def block_residual(
        self, layer: nn.Module, kind: BlockKind, hidden: torch.Tensor, block_out: torch.Tensor
    ) -> torch.Tensor:
        return hidden + block_out

    def rotary(self, layer_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        rotary = layer_kwargs.get("position_embeddings")
        if rotary is None:
            raise ConfigError(
                "model: the LLaMA-like layers were called without `position_embeddings`; this "
                "transformers version is not supported (use transformers >= 5)."
            )
        return rotary

    def check_supported(self, seq_len: int) -> None:
        cfg = self.config
        window = getattr(cfg, "sliding_window", None)
        if window and getattr(cfg, "use_sliding_window", True) and seq_len > int(window):
            raise ConfigError(
                f"data.seq_len: {seq_len} exceeds the model's sliding window ({window}); sliding-window "
                "attention is not implemented by the pruned path. Use data.seq_len <= the window."
            )
        layer = self.layers[0]
        for name in ("q_norm", "k_norm"):
            if hasattr(layer.self_attn, name):
                raise ConfigError(
                    f"model.name: attention with `{name}` (Qwen3/OLMo style) is not supported yet; "
                    "supported families: LLaMA 2/3, Mistral, Qwen2, SmolLM, OPT."
                )
