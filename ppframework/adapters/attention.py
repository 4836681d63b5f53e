"""Attention kernels shared by every adapter: causal SDPA with key padding, grouped-query forms
(without copying keys/values per query head) and biased (windowed, soft-capped) attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ppframework.adapters.masks import additive_attention_bias

__all__ = [
    "MIN_GROUPED_QUERY_POSITIONS",
    "SDPA_GROUPED_QUERIES",
    "HeadGroups",
    "KVRun",
    "additive_attention_bias",
    "biased_attention",
    "causal_attention",
    "causal_attention_by_runs",
    "grouped_attention",
    "kv_runs",
]


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


#: SDPA's grouped-query form (``enable_gqa``: query head ``h`` reads key/value head
#: ``h // (Hq / Hkv)``) exists from PyTorch 2.5.
SDPA_GROUPED_QUERIES = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)

KVRun = tuple[int, int, int, int]

#: Below this many query positions, CPU SDPA's results for a head can depend on how many heads the
#: call has (measured with 2 threads: head_dim 64 at 5-11 positions, head_dim 8 at odd counts up to
#: 31), so the grouped form is used only from here on, where it matched the copy bit for bit.
MIN_GROUPED_QUERY_POSITIONS = 32


def kv_runs(kv_index: list[int]) -> tuple[KVRun, ...] | None:
    """The query heads as runs SDPA's grouped-query form can take without copying keys and values.

    ``kv_index[i]`` is query head ``i``'s key/value head. A run ``(q_start, q_stop, kv_start,
    kv_stop)`` covers consecutive key/value heads that each serve the same number of consecutive
    query heads, so query head ``q_start + j`` reads key/value head ``kv_start + j // per_head``.
    None when the query heads are not ordered by key/value head (the caller then copies the
    keys/values per query head instead).
    """
    if any(b < a for a, b in zip(kv_index, kv_index[1:], strict=False)):
        return None
    groups: list[list[int]] = []  # [kv head, first query head, query heads]
    for head, kv in enumerate(kv_index):
        if groups and groups[-1][0] == kv:
            groups[-1][2] += 1
        else:
            groups.append([kv, head, 1])
    runs: list[list[int]] = []  # [q_start, q_stop, kv_start, kv_stop, per kv head]
    for kv, first, count in groups:
        last = runs[-1] if runs else None
        if last is not None and last[3] == kv and last[4] == count:
            last[1], last[3] = first + count, kv + 1
        else:
            runs.append([first, first + count, kv, kv + 1, count])
    return tuple((a, b, c, d) for a, b, c, d, _ in runs)


def causal_attention_by_runs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    runs: tuple[KVRun, ...],
    attention_mask: torch.Tensor | None,
    attn_bias: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """:func:`causal_attention` of (B, Hq, T, d) queries over (B, Hkv, T, d) keys/values shared by
    groups of query heads (:func:`kv_runs`), as (B, T, Hq * d), without copying a key/value head per
    query head: one SDPA call per run in its grouped-query form.

    Each query head's attention is computed from the same numbers as with the copied keys/values
    (the copy only feeds them under another head index); from :data:`MIN_GROUPED_QUERY_POSITIONS`
    positions on the output is also the same bit for bit (measured on CPU; the runner uses it only
    there).
    """
    batch, heads, seq, dim = q.shape
    if attn_bias is None and attention_mask is not None and not bool(attention_mask.all()):
        attn_bias = additive_attention_bias(attention_mask, q.dtype)  # once for every run
    mask = {"attn_mask": attn_bias} if attn_bias is not None else {"is_causal": seq > 1}

    def run(qs: int, qe: int, ks: int, ke: int) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q[:, qs:qe], k[:, ks:ke], v[:, ks:ke], scale=scale, enable_gqa=True, **mask
        )

    if len(runs) == 1:
        return run(*runs[0]).transpose(1, 2).reshape(batch, seq, heads * dim)
    out = q.new_empty(batch, seq, heads, dim)
    for qs, qe, ks, ke in runs:
        out[:, :, qs:qe] = run(qs, qe, ks, ke).transpose(1, 2)
    return out.view(batch, seq, heads * dim)


@dataclass(frozen=True)
class HeadGroups:
    """Where each query head goes when the queries are stacked per key/value head.

    ``group_of[i]`` is query head ``i``'s key/value head; ``slot_of[i]`` its rank among the query
    heads of that group; ``width`` the largest group (smaller groups are padded with zero queries).
    """

    kv_heads: int
    width: int
    group_of: torch.Tensor
    slot_of: torch.Tensor

    @classmethod
    def build(cls, kv_index: torch.Tensor, kv_heads: int) -> HeadGroups:
        """Groups for query heads whose key/value head (among ``kv_heads``) is ``kv_index``."""
        counts = torch.bincount(kv_index, minlength=kv_heads)
        order = torch.argsort(kv_index, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(kv_index.numel(), device=kv_index.device) - starts[kv_index[order]]
        slot = torch.empty_like(kv_index)
        slot[order] = rank
        return cls(kv_heads, int(counts.max()), kv_index, slot)


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    groups: HeadGroups,
    bias: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Attention of (B, Hq, T, d) queries over (B, Hkv, L, d) keys/values shared by groups of query
    heads, without copying the keys/values per query head (the queries are stacked per group instead).

    ``bias`` (B or 1, 1, T, L) is the additive mask of every query head (None: see every key). For
    decode steps, where copying a growing cache per query head would cost more than the step itself.
    """
    batch, _, seq, dim = q.shape
    width = groups.width
    stacked = q.new_zeros(batch, groups.kv_heads, width, seq, dim)
    stacked[:, groups.group_of, groups.slot_of] = q
    stacked = stacked.view(batch, groups.kv_heads, width * seq, dim)
    mask = None if bias is None else bias.repeat(1, 1, width, 1)
    out = F.scaled_dot_product_attention(stacked, k, v, attn_mask=mask, scale=scale)
    return out.view(batch, groups.kv_heads, width, seq, dim)[:, groups.group_of, groups.slot_of]


def biased_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of (B, H, Tq, d) queries over (B, H, Tk, d) keys/values with an additive ``bias``
    (None: every key is seen), optionally with tanh soft-capping of the scores (Gemma's
    ``attn_logit_softcapping``: ``cap * tanh(scores / cap)`` before the mask, as transformers' eager
    attention does; SDPA cannot, so that case runs eagerly)."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)
