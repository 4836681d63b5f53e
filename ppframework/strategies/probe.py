"""``select_probe`` strategies: which rows and positions of the batch to probe."""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ppframework.hookspecs import hookimpl
from ppframework.metrics.flops import attention_flops, mlp_flops, probe_flops
from ppframework.types import BlockContext, BlockGeometry, BlockKind, Probe


class ProbeParams(BaseModel):
    """Probe sizes: fractions of the positions and of the sequences, or a FLOPs budget."""

    model_config = ConfigDict(extra="forbid")

    seq_ratio: float | None = Field(0.5, gt=0.0, le=1.0, description="fraction of positions probed")
    batch_ratio: float | None = Field(0.05, gt=0.0, le=1.0, description="fraction of sequences probed")
    sink_threshold: int = Field(10, ge=0, description="keep position 0 when k_T <= this")
    flops_share: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="size the probe so that the probes cost this share of the dense decoder's FLOPs for "
        "the batch (one row first, then tokens, then more rows); excludes seq_ratio and batch_ratio",
    )

    @model_validator(mode="after")
    def _one_size_rule(self) -> ProbeParams:
        explicit = sorted(
            name
            for name in ("seq_ratio", "batch_ratio")
            if name in self.model_fields_set and getattr(self, name) is not None
        )
        if self.flops_share is not None and explicit:
            raise ValueError(
                "flops_share sizes the probe by its FLOPs, so it cannot be combined with "
                f"{' and '.join(explicit)}; give either flops_share or seq_ratio/batch_ratio (to override "
                "a preset that sets them, set them to null)"
            )
        if self.flops_share is None:  # null ratios fall back to the paper defaults
            if self.seq_ratio is None:
                self.seq_ratio = 0.5
            if self.batch_ratio is None:
                self.batch_ratio = 0.05
        return self


def probe_sizes(batch: int, seq: int, seq_ratio: float, batch_ratio: float) -> tuple[int, int]:
    """(k_B, k_T) = (ceil(batch_ratio * B), max(ceil(seq_ratio * T), 2)), capped at (B, T)."""
    k_tokens = min(max(math.ceil(seq_ratio * seq - 1e-9), 2), seq)
    k_rows = min(max(math.ceil(batch_ratio * batch - 1e-9), 1), batch)
    return k_rows, k_tokens


def budget_probe_sizes(
    kind: BlockKind,
    geometry: BlockGeometry,
    batch: int,
    seq: int,
    hidden: int,
    flops_share: float,
    mlp_matrices: int = 3,
    scale: float = 1.0,
) -> tuple[int, int]:
    """``(k_B, k_T)`` of a probe whose forward costs at most ``flops_share * scale`` of the block's
    dense FLOPs on the (``batch``, ``seq``) batch (:mod:`ppframework.metrics.flops` conventions).

    The rule: one row first, and as many tokens as the budget allows (at least 2); once one row
    holds every position, as many whole rows as the budget allows. The probe is never smaller than
    1 row x ``min(2, seq)`` tokens, even when that exceeds the budget. ``scale`` turns a share of
    the decoder's FLOPs into a share of this block's (``BlockContext.probe_flops_scale``).
    """
    kind = BlockKind(kind)
    if kind is BlockKind.ATTENTION:
        heads, kv, hd = geometry.units, geometry.num_kv_heads or geometry.units, geometry.unit_width
        dense = attention_flops(batch, seq, hidden, heads, kv, hd)

        def cost(rows: int, tokens: int) -> int:
            return probe_flops(kind, rows, tokens, hidden, q_heads=heads, kv_heads=kv, head_dim=hd)
    else:
        dense = mlp_flops(batch, seq, hidden, geometry.units, mlp_matrices)

        def cost(rows: int, tokens: int) -> int:
            return probe_flops(kind, rows, tokens, hidden, channels=geometry.units, mlp_matrices=mlp_matrices)

    budget = flops_share * scale * dense
    low, high = min(2, seq), seq  # the most tokens of one row within the budget (cost grows with tokens)
    if cost(1, high) <= budget:
        low = high
    while low < high:
        mid = (low + high + 1) // 2
        if cost(1, mid) <= budget:
            low = mid
        else:
            high = mid - 1
    if low < seq:
        return 1, low
    rows = 1
    while rows < batch and cost(rows + 1, seq) <= budget:
        rows += 1
    return rows, seq


def _top_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(scores, k, sorted=False).indices.sort().values


def select_residual_probe(
    residual: torch.Tensor,
    attention_mask: torch.Tensor,
    seq_ratio: float,
    batch_ratio: float,
    sink_threshold: int = 10,
    has_padding: bool | None = None,
    sizes: tuple[int, int] | None = None,
) -> Probe:
    """Residual-importance probe: top positions by ``||r[:, t]||``, then top rows on them.

    ``r[b, t] = ||residual[b, t, :]||_2`` with padding counted as 0. All-padding positions and
    all-padding rows are never chosen; when ``k_T <= sink_threshold`` position 0 is kept.
    ``has_padding`` False (known once per batch) takes a path that never reads the mask and so
    never synchronises with the device; it chooses exactly what the general path would.
    ``sizes`` ``(k_B, k_T)``, when given, replaces the ratios' :func:`probe_sizes`.
    """
    batch, seq, _ = residual.shape
    norms = torch.linalg.vector_norm(residual, dim=-1, dtype=torch.float32)  # fp32, no upcast copy
    if sizes is None:
        sizes = probe_sizes(batch, seq, seq_ratio, batch_ratio)
    if has_padding is False:
        k_rows, k_tokens = sizes
        token_scores = norms.norm(dim=0)
        if k_tokens <= sink_threshold:
            token_scores[0] = math.inf
        tokens = _top_sorted(token_scores, k_tokens)
        rows = _top_sorted(norms.index_select(1, tokens).norm(dim=1), k_rows)
        valid = torch.ones(k_rows, k_tokens, dtype=torch.bool, device=residual.device)
        return Probe(batch_index=rows, token_index=tokens, valid=valid)
    real = attention_mask.bool()
    norms = norms.masked_fill(~real, 0.0)
    position_ok = real.any(dim=0)
    row_ok = real.any(dim=1)
    k_rows, k_tokens = sizes
    k_tokens = min(k_tokens, int(position_ok.sum()))
    k_rows = min(k_rows, int(row_ok.sum()))
    token_scores = norms.norm(dim=0).masked_fill(~position_ok, -math.inf)
    if k_tokens <= sink_threshold and bool(position_ok[0]):
        token_scores[0] = math.inf
    tokens = _top_sorted(token_scores, k_tokens)
    row_scores = norms[:, tokens].norm(dim=1).masked_fill(~row_ok, -math.inf)
    rows = _top_sorted(row_scores, k_rows)
    return Probe(batch_index=rows, token_index=tokens, valid=real[rows][:, tokens])


class ResidualProbe:
    """Residual-importance probe (PP): tokens first, then sequences, ranked before the norm.

    Sized by ``seq_ratio``/``batch_ratio`` or by a FLOPs budget (``flops_share``, see
    :func:`budget_probe_sizes`).
    """

    stage = "select_probe"
    name = "residual"
    Params = ProbeParams

    def __init__(self, params: ProbeParams | None = None) -> None:
        self.params = params or ProbeParams()
        self._budget_sizes: dict[tuple[object, ...], tuple[int, int]] = {}

    def sizes(self, ctx: BlockContext, batch: int, seq: int, hidden: int) -> tuple[int, int] | None:
        """The budget's ``(k_B, k_T)`` for this block and batch shape (None: sized by the ratios)."""
        share = self.params.flops_share
        if share is None:
            return None
        key = (ctx.kind, ctx.geometry, batch, seq, hidden, ctx.mlp_matrices, ctx.probe_flops_scale)
        if key not in self._budget_sizes:
            self._budget_sizes[key] = budget_probe_sizes(
                ctx.kind, ctx.geometry, batch, seq, hidden, share, ctx.mlp_matrices, ctx.probe_flops_scale
            )
        return self._budget_sizes[key]

    @hookimpl
    def select_probe(
        self, ctx: BlockContext, residual: torch.Tensor, normed: torch.Tensor, attention_mask: torch.Tensor
    ) -> Probe:
        p = self.params
        batch, seq, hidden = residual.shape
        return select_residual_probe(
            residual,
            attention_mask,
            p.seq_ratio,
            p.batch_ratio,
            p.sink_threshold,
            has_padding=ctx.has_padding,
            sizes=self.sizes(ctx, batch, seq, hidden),
        )


def _random_sorted(candidates: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` of the ``candidates`` indices drawn uniformly without replacement, sorted."""
    order = torch.randperm(int(candidates.numel()), generator=generator)[:k]
    return candidates.cpu()[order].sort().values


def select_random_probe(
    attention_mask: torch.Tensor,
    seq_ratio: float,
    batch_ratio: float,
    generator: torch.Generator,
) -> Probe:
    """Uniformly random probe at PP's sizes: positions among real ones, then rows among rows that
    are real on at least one chosen position (seeded by ``generator``)."""
    batch, seq = attention_mask.shape
    real = attention_mask.bool()
    k_rows, k_tokens = probe_sizes(batch, seq, seq_ratio, batch_ratio)
    positions = real.any(dim=0).nonzero().flatten()
    tokens = _random_sorted(positions, min(k_tokens, int(positions.numel())), generator)
    tokens = tokens.to(attention_mask.device)
    rows_ok = real[:, tokens].any(dim=1).nonzero().flatten()
    rows = _random_sorted(rows_ok, min(k_rows, int(rows_ok.numel())), generator).to(attention_mask.device)
    return Probe(batch_index=rows, token_index=tokens, valid=real[rows][:, tokens])


def full_batch_probe(attention_mask: torch.Tensor) -> Probe:
    """The whole batch as the probe: every row, every position that is real in some row."""
    real = attention_mask.bool()
    rows = real.any(dim=1).nonzero().flatten()
    tokens = real.any(dim=0).nonzero().flatten()
    return Probe(batch_index=rows, token_index=tokens, valid=real[rows][:, tokens])


class RandomProbeParams(BaseModel):
    """Probe sizes of the random probe (the same rule and defaults as PP's)."""

    model_config = ConfigDict(extra="forbid")

    seq_ratio: float = Field(0.5, gt=0.0, le=1.0, description="fraction of positions probed")
    batch_ratio: float = Field(0.05, gt=0.0, le=1.0, description="fraction of sequences probed")


class RandomProbe:
    """Random probe (ablation): uniform positions, then rows, at PP's sizes, from the run's seed."""

    stage = "select_probe"
    name = "random"
    Params = RandomProbeParams

    def __init__(self, params: RandomProbeParams | None = None) -> None:
        self.params = params or RandomProbeParams()

    @hookimpl
    def select_probe(
        self, ctx: BlockContext, residual: torch.Tensor, normed: torch.Tensor, attention_mask: torch.Tensor
    ) -> Probe:
        p = self.params
        return select_random_probe(attention_mask, p.seq_ratio, p.batch_ratio, ctx.generator)


class FullBatchProbe:
    """Full-batch probing (the paper's oracle): the whole batch is the probe.

    ``reads_block_input = False``: it looks only at the attention mask, so a dense prefill need not
    compute the residual stream and normed input it is passed (they come zero-width there).
    """

    stage = "select_probe"
    name = "full"
    reads_block_input = False

    @hookimpl
    def select_probe(
        self, ctx: BlockContext, residual: torch.Tensor, normed: torch.Tensor, attention_mask: torch.Tensor
    ) -> Probe:
        return full_batch_probe(attention_mask)


class NoProbe:
    """No probe: decide from the history alone (static methods, history-only ablation).

    ``dynamic = False`` tells the pipeline that this probe never looks at the batch, so a method
    whose history is also frozen decides once and caches its sliced weights; ``reads_block_input =
    False`` as for ``full``.
    """

    stage = "select_probe"
    name = "none"
    dynamic = False
    reads_block_input = False

    @hookimpl
    def select_probe(
        self, ctx: BlockContext, residual: torch.Tensor, normed: torch.Tensor, attention_mask: torch.Tensor
    ) -> None:
        return None
