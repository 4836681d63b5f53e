"""Causal scaled-dot-product attention with optional key padding, shared by every adapter."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    attention_mask: torch.Tensor | None,
    attn_bias: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Causal SDPA over (B, H, T, d) tensors; the fast causal path when there is no padding.

    ``attn_bias`` is the precomputed additive form of ``attention_mask`` (built here if None and
    the mask has padding). ``attention_mask`` None means every token is real: nothing is checked,
    so there is no host-device synchronisation (the pipeline knows this once per batch).
    """
    if attn_bias is None and (attention_mask is None or bool(attention_mask.all())):
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale)
    if attn_bias is None:
        attn_bias = additive_attention_bias(attention_mask, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=scale)
