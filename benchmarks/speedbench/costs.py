"""What a variant's kept shapes promise, counted rather than timed: the FLOPs a full pass reuses from
the probe, and the weight and key/value bytes one decode step reads (the ideals the measured times
are set against)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ppframework.adapters import get_adapter
from ppframework.pipeline import BlockEvent, Pipeline
from ppframework.types import BlockKind, BlockMask

#: the parts of :func:`decode_weight_bytes` that make up its ``total``.
BYTE_PARTS = ("projections", "lm_head", "embedding_rows", "other")


def reused_flops(pipe: Pipeline, skip_batches: int) -> int:
    """FLOPs the full pass did not redo because the probe's exact per-token values were reused."""
    adapter = pipe.adapter
    hidden = int(adapter.config.hidden_size)
    attention = adapter.geometry(BlockKind.ATTENTION)
    total = 0
    event: BlockEvent
    for event in pipe.record.events:
        if event.batch < skip_batches or event.probe_rows == 0:
            continue
        tokens = event.probe_rows * event.probe_tokens
        if event.kind is BlockKind.MLP:
            total += 2 * tokens * hidden * event.kept_units * (adapter.mlp_matrices - 1)
        else:
            width = (event.kept_units + 2 * event.kept_kv_heads) * attention.unit_width
            total += 2 * tokens * hidden * width
    return total


def projection_params(
    adapter: Any, kind: BlockKind, kept_units: int | None = None, kept_kv_heads: int | None = None
) -> int:
    """Weights of one block's projections (biases excluded) when ``kept_units`` query heads / channels
    and ``kept_kv_heads`` key/value heads are kept (None: all)."""
    hidden = int(adapter.config.hidden_size)
    geo = adapter.geometry(kind)
    units = geo.units if kept_units is None else kept_units
    if kind is BlockKind.ATTENTION:
        kv = geo.num_kv_heads if kept_kv_heads is None else kept_kv_heads
        return 2 * hidden * geo.unit_width * (units + kv)  # q + o per query head, k + v per kv head
    return adapter.mlp_matrices * hidden * units


def decode_weight_bytes(
    model: nn.Module, masks: dict[tuple[int, BlockKind], BlockMask], batch: int
) -> dict[str, int]:
    """Bytes of weights one decode step of ``batch`` rows reads under ``masks`` (empty: dense).

    ``projections``: every decoder layer's attention and MLP projection weights, of the kept units
    only where a mask applies (skipped layers and unmasked blocks in full); ``lm_head``: the output
    projection, read in full (the embedding matrix itself when tied); ``embedding_rows``: the ``batch``
    rows the embedding lookup reads; ``other``: every other parameter (norms, biases, ...) in full.
    """
    adapter = get_adapter(model)
    itemsize = next(model.parameters()).element_size()
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_params = 0 if head is None else sum(p.numel() for p in head.parameters())
    tied = head is not None and head.weight.data_ptr() == embedding.data_ptr()
    unique = sum(p.numel() for p in model.parameters())  # tied tensors counted once
    dense_projections = adapter.num_layers * sum(projection_params(adapter, kind) for kind in BlockKind)
    other = (
        unique - embedding.numel() - (head_params - (embedding.numel() if tied else 0)) - dense_projections
    )
    kept = 0
    for index in range(adapter.num_layers):
        for kind in BlockKind:
            mask = masks.get((index, kind))
            if mask is None:
                kept += projection_params(adapter, kind)
            else:
                kv = None if mask.kept_kv_heads is None else int(mask.kept_kv_heads.numel())
                kept += projection_params(adapter, kind, mask.n_kept, kv)
    parts = {
        "projections": kept * itemsize,
        "projections_dense": dense_projections * itemsize,
        "lm_head": head_params * itemsize,
        "embedding_rows": batch * int(embedding.shape[1]) * itemsize,
        "other": other * itemsize,
    }
    parts["total"] = parts["projections"] + parts["lm_head"] + parts["embedding_rows"] + parts["other"]
    return parts


def kv_cache_bytes(
    model: nn.Module, masks: dict[tuple[int, BlockKind], BlockMask], batch: int, prompt: int, steps: int
) -> int:
    """Mean bytes of cached keys and values the attention reads per decode step (``steps`` steps after a
    ``prompt``-token prefill; the key/value heads each layer caches). Informational, not in the ideal."""
    adapter = get_adapter(model)
    geo = adapter.geometry(BlockKind.ATTENTION)
    itemsize = next(model.parameters()).element_size()
    heads = 0
    for index in range(adapter.num_layers):
        mask = masks.get((index, BlockKind.ATTENTION))
        cached = mask.kept_kv_heads if mask is not None else None
        heads += geo.num_kv_heads if cached is None else int(cached.numel())
    context = prompt + (steps + 1) / 2  # mean keys per step (the step's own token included)
    return int(2 * heads * geo.unit_width * batch * context * itemsize)
