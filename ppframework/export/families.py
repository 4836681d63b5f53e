"""What each family's Hugging Face modules and config look like to an export.

For every family: the rows and columns of each projection a pruned block keeps (given the kept
query-head channels, the key/value slot channels and the kept MLP channels), the config fields that
hold the widths, whether the config can state a head size independent of the hidden size, and which
config switch gives the output projections a bias (FLAP's compensation needs one).

Families whose config cannot express a pruned model use the per-layer format: OPT derives its head
size from ``hidden_size / num_attention_heads``; Mistral, Qwen2 and Phi-3 have no switch for an
``o_proj`` bias, Qwen3, Gemma 3, Mistral, Qwen2 and Phi-3 none for a ``down_proj`` bias.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: Rows (None: all) and columns (None: all) kept of one projection, by its name inside the layer.
Slices = dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]


@dataclass(frozen=True)
class ExportFamily:
    """One family's module names and config fields (see the module docstring)."""

    name: str
    attention: str = "self_attn"
    mlp: str = "mlp"
    fused_qkv: str | None = None
    fused_gate_up: str | None = None
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    gate: str | None = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    mlp_width_key: str = "intermediate_size"
    head_dim_in_config: bool = True
    attention_bias_key: str | None = None
    mlp_bias_key: str | None = None
    #: The attention module reads its widths from ``self.config`` at run time (Phi-3).
    attention_reads_config: bool = False

    def attention_slices(self, q_rows: torch.Tensor, kv_rows: torch.Tensor, n_q: int, n_kv: int) -> Slices:
        """Kept rows/columns of the attention projections (``n_q``/``n_kv``: full q and k widths)."""
        prefix = f"{self.attention}."
        if self.fused_qkv is not None:
            rows = torch.cat((q_rows, kv_rows + n_q, kv_rows + n_q + n_kv))
            return {prefix + self.fused_qkv: (rows, None), prefix + self.o: (None, q_rows)}
        return {
            prefix + self.q: (q_rows, None),
            prefix + self.k: (kv_rows, None),
            prefix + self.v: (kv_rows, None),
            prefix + self.o: (None, q_rows),
        }

    def mlp_slices(self, kept: torch.Tensor, width: int) -> Slices:
        """Kept rows/columns of the MLP projections (``width``: the full intermediate width)."""
        prefix = f"{self.mlp}." if self.mlp else ""
        if self.fused_gate_up is not None:
            rows = torch.cat((kept, kept + width))
            return {prefix + self.fused_gate_up: (rows, None), prefix + self.down: (None, kept)}
        slices: Slices = {prefix + self.up: (kept, None), prefix + self.down: (None, kept)}
        if self.gate is not None:
            slices[prefix + self.gate] = (kept, None)
        return slices

    def output_projection(self, attention: bool) -> str:
        """The name (inside the layer) of a block's output projection."""
        if attention:
            return f"{self.attention}.{self.o}"
        return f"{self.mlp}.{self.down}" if self.mlp else self.down

    def set_attention_widths(self, attn: nn.Module, heads: int, kv_heads: int, config: Any) -> None:
        """Tell a Hugging Face attention module its (per-layer) head counts."""
        if hasattr(attn, "num_heads"):
            attn.num_heads = heads
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = kv_heads
        if hasattr(attn, "num_key_value_groups"):
            attn.num_key_value_groups = heads // kv_heads
        if self.attention_reads_config:
            own = copy.copy(config)
            own.num_attention_heads, own.num_key_value_heads = heads, kv_heads
            attn.config = own

    def set_mlp_width(self, mlp: nn.Module, width: int) -> None:
        """Tell a Hugging Face MLP module its (per-layer) width, where it keeps one."""
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = width


_LLAMA = ExportFamily("llama", attention_bias_key="attention_bias", mlp_bias_key="mlp_bias")

#: Export knowledge by ``config.model_type``.
FAMILIES: dict[str, ExportFamily] = {
    "llama": _LLAMA,
    "smollm": _LLAMA,
    "smollm2": _LLAMA,
    "mistral": ExportFamily("mistral"),
    "qwen2": ExportFamily("qwen2"),
    "qwen3": ExportFamily("qwen3", attention_bias_key="attention_bias"),
    "gemma3_text": ExportFamily("gemma3_text", attention_bias_key="attention_bias"),
    "phi3": ExportFamily(
        "phi3", fused_qkv="qkv_proj", fused_gate_up="gate_up_proj", attention_reads_config=True
    ),
    "opt": ExportFamily(
        "opt",
        o="out_proj",
        mlp="",
        gate=None,
        up="fc1",
        down="fc2",
        mlp_width_key="ffn_dim",
        head_dim_in_config=False,
    ),
}


def export_family(model_type: str) -> ExportFamily:
    """The export knowledge of a model type; ``ValueError`` for one without it."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"model type {model_type!r} has no export support; supported: {', '.join(sorted(FAMILIES))}"
        ) from None
