"""LLaMA-like decoder layers: LLaMA 2/3, Mistral, Qwen2, SmolLM (grouped-query attention included)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ppframework.adapters.base import (
    BlockRunner,
    ModelAdapter,
    causal_attention,
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


class LlamaAttentionRunner(BlockRunner):
    """Attention of a LLaMA-like layer on kept query heads (and optionally kept key/value groups)."""

    def __init__(self, attn: nn.Module, geometry: BlockGeometry) -> None:
        self.attn = attn
        self.geometry = geometry
        self.scaling = float(getattr(attn, "scaling", geometry.unit_width**-0.5))

    @property
    def out_proj(self) -> nn.Linear:
        return self.attn.o_proj

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
        geo = self.geometry
        batch, seq, _ = x.shape
        d = geo.unit_width
        q_rows = self.channels_of(kept_units)
        kv_rows = unit_channels(kept_kv_heads, d) if kept_kv_heads is not None else None
        q = self.linear(x, self.attn.q_proj, rows=q_rows).view(batch, seq, -1, d).transpose(1, 2)
        k = self.linear(x, self.attn.k_proj, rows=kv_rows).view(batch, seq, -1, d).transpose(1, 2)
        v = self.linear(x, self.attn.v_proj, rows=kv_rows).view(batch, seq, -1, d).transpose(1, 2)
        if rotary is not None:
            cos, sin = rotary
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
        n_heads = q.shape[1]
        if n_heads != k.shape[1] or kept_units is not None:
            kv_index = self._kv_index(kept_units, kept_kv_heads, x.device)
            k = k.index_select(1, kv_index)
            v = v.index_select(1, kv_index)
        out = causal_attention(q, k, v, attention_mask, attn_bias, self.scaling)
        return out.transpose(1, 2).reshape(batch, seq, n_heads * d)

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
    """Gated MLP ``down(act(gate(x)) * up(x))`` on kept intermediate channels."""

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
        attention_mask: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        kept_units: torch.Tensor | None = None,
        kept_kv_heads: torch.Tensor | None = None,
    ) -> torch.Tensor:
        gate = self.linear(x, self.mlp.gate_proj, rows=kept_units)
        up = self.linear(x, self.mlp.up_proj, rows=kept_units)
        return self.mlp.act_fn(gate) * up


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
            return LlamaAttentionRunner(layer.self_attn, self.geometry(kind))
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
