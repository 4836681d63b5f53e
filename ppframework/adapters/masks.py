"""Additive attention masks: causal, key-padding and sliding-window biases for SDPA.

The lowest piece of the adapters: the attention kernels (:mod:`~ppframework.adapters.attention`),
the key/value cache view (:mod:`~ppframework.adapters.kv_cache`) and the attention runner all build
their masks here, so none of them needs another.
"""

from __future__ import annotations

import torch


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


def position_bias(
    query_at: torch.Tensor,
    key_at: torch.Tensor,
    key_real: torch.Tensor | None,
    window: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Additive bias (B or 1, 1, Tq, Tk) for queries at positions ``query_at`` (Tq,) over keys at
    ``key_at`` (Tk,): causal, within ``window`` when given (a key is seen when ``query - key < window``,
    as transformers' sliding-window masks) and only real keys (``key_real`` (B, Tk), None = all real).

    A query always sees a key at its own position, so that no row is fully masked (padding queries'
    outputs are never used).
    """
    distance = query_at[:, None] - key_at[None, :]
    allowed = distance >= 0
    if window is not None:
        allowed = allowed & (distance < int(window))
    allowed = allowed[None]
    if key_real is not None:
        allowed = allowed & key_real.bool()[:, None, :]
    allowed = allowed | (distance == 0)[None]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias[:, None]
