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
) -> Probe:
    """Residual-importance probe: top positions by ``||r[:, t]||``, then top rows on them.

    ``r[b, t] = ||residual[b, t, :]||_2`` with padding counted as 0. All-padding positions and
    all-padding rows are never chosen; when ``k_T <= sink_threshold`` position 0 is kept.
    """
    batch, seq, _ = residual.shape
    real = attention_mask.bool()
    norms = residual.float().norm(dim=-1).masked_fill(~real, 0.0)
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
        return select_residual_probe(residual, attention_mask, p.seq_ratio, p.batch_ratio, p.sink_threshold)
