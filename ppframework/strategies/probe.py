"""``select_probe`` strategies: which rows and positions of the batch to probe."""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field

from ppframework.hookspecs import hookimpl
from ppframework.types import BlockContext, Probe


class ProbeParams(BaseModel):
    """Probe sizes: fractions of the positions and of the sequences."""

    model_config = ConfigDict(extra="forbid")

    seq_ratio: float = Field(0.5, gt=0.0, le=1.0, description="fraction of positions probed")
    batch_ratio: float = Field(0.05, gt=0.0, le=1.0, description="fraction of sequences probed")
    sink_threshold: int = Field(10, ge=0, description="keep position 0 when k_T <= this")


def probe_sizes(batch: int, seq: int, seq_ratio: float, batch_ratio: float) -> tuple[int, int]:
    """(k_B, k_T) = (ceil(batch_ratio * B), max(ceil(seq_ratio * T), 2)), capped at (B, T)."""
    k_tokens = min(max(math.ceil(seq_ratio * seq - 1e-9), 2), seq)
    k_rows = min(max(math.ceil(batch_ratio * batch - 1e-9), 1), batch)
    return k_rows, k_tokens


def _top_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(scores, k, sorted=False).indices.sort().values


def select_residual_probe(
    residual: torch.Tensor,
    attention_mask: torch.Tensor,
    seq_ratio: float,
    batch_ratio: float,
    sink_threshold: int = 10,
    has_padding: bool | None = None,
) -> Probe:
    """Residual-importance probe: top positions by ``||r[:, t]||``, then top rows on them.

    ``r[b, t] = ||residual[b, t, :]||_2`` with padding counted as 0. All-padding positions and
    all-padding rows are never chosen; when ``k_T <= sink_threshold`` position 0 is kept.
    ``has_padding`` False (known once per batch) takes a path that never reads the mask and so
    never synchronises with the device; it chooses exactly what the general path would.
    """
    batch, seq, _ = residual.shape
    norms = torch.linalg.vector_norm(residual, dim=-1, dtype=torch.float32)  # fp32, no upcast copy
    if has_padding is False:
        k_rows, k_tokens = probe_sizes(batch, seq, seq_ratio, batch_ratio)
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
    k_rows, k_tokens = probe_sizes(batch, seq, seq_ratio, batch_ratio)
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
    """Residual-importance probe (PP): tokens first, then sequences, ranked before the norm."""

    stage = "select_probe"
    name = "residual"
    Params = ProbeParams

    def __init__(self, params: ProbeParams | None = None) -> None:
        self.params = params or ProbeParams()

    @hookimpl
    def select_probe(
        self, ctx: BlockContext, residual: torch.Tensor, normed: torch.Tensor, attention_mask: torch.Tensor
    ) -> Probe:
        p = self.params
        return select_residual_probe(
            residual,
            attention_mask,
            p.seq_ratio,
            p.batch_ratio,
            p.sink_threshold,
            has_padding=ctx.has_padding,
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
    """Full-batch probing (the paper's oracle): the whole batch is the probe."""

    stage = "select_probe"
    name = "full"

    @hookimpl
    def select_probe(
        self, ctx: BlockContext, residual: torch.Tensor, normed: torch.Tensor, attention_mask: torch.Tensor
    ) -> Probe:
        return full_batch_probe(attention_mask)


class NoProbe:
    """No probe: decide from the history alone (static methods, history-only ablation).

    ``dynamic = False`` tells the pipeline that this probe never looks at the batch, so a method
    whose history is also frozen decides once and caches its sliced weights.
    """

    stage = "select_probe"
    name = "none"
    dynamic = False

    @hookimpl
    def select_probe(
        self, ctx: BlockContext, residual: torch.Tensor, normed: torch.Tensor, attention_mask: torch.Tensor
    ) -> None:
        return None
