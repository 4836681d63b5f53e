"""The ``variance`` probe: rank positions and sequences by how spread-out their features are."""

from __future__ import annotations

import math

import torch
from ppframework.hookspecs import hookimpl
from ppframework.strategies.probe import probe_sizes
from ppframework.types import BlockContext, Probe
from pydantic import BaseModel, ConfigDict, Field


class VarianceProbeParams(BaseModel):
    """Probe sizes, as for PP's residual probe: fractions of the positions and of the sequences."""

    model_config = ConfigDict(extra="forbid")

    seq_ratio: float = Field(0.5, gt=0.0, le=1.0, description="fraction of positions probed")
    batch_ratio: float = Field(0.05, gt=0.0, le=1.0, description="fraction of sequences probed")


def token_variance(normed: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) variance over the hidden features of each token (fp32); 0 on padding.

    ``var[b, t] = mean_d (x[b, t, d] - mean_d x[b, t, :])^2`` (the population variance).
    """
    var = normed.float().var(dim=-1, unbiased=False)
    return var.masked_fill(~attention_mask.bool(), 0.0)


def _top_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(scores, k, sorted=False).indices.sort().values


def select_variance_probe(
    normed: torch.Tensor, attention_mask: torch.Tensor, seq_ratio: float, batch_ratio: float
) -> Probe:
    """Variance probe: top positions by summed per-token variance, then top rows on them.

    Position score ``s_t = sum_b var[b, t]`` over the real rows; row score
    ``s_b = sum_{t in S_T} var[b, t]``. ``(k_B, k_T)`` follow
    :func:`ppframework.strategies.probe.probe_sizes`, capped by the number of positions (rows)
    holding any real text, so all-padding positions and rows are never chosen.
    """
    batch, seq, _ = normed.shape
    real = attention_mask.bool()
    var = token_variance(normed, real)
    position_ok = real.any(dim=0)
    row_ok = real.any(dim=1)
    k_rows, k_tokens = probe_sizes(batch, seq, seq_ratio, batch_ratio)
    k_tokens = min(k_tokens, int(position_ok.sum()))
    k_rows = min(k_rows, int(row_ok.sum()))
    tokens = _top_sorted(var.sum(dim=0).masked_fill(~position_ok, -math.inf), k_tokens)
    rows = _top_sorted(var[:, tokens].sum(dim=1).masked_fill(~row_ok, -math.inf), k_rows)
    return Probe(batch_index=rows, token_index=tokens, valid=real[rows][:, tokens])


class VarianceProbe:
    """Variance probe: tokens, then sequences, ranked by feature variance of the normed input."""

    stage = "select_probe"
    name = "variance"
    Params = VarianceProbeParams

    def __init__(self, params: VarianceProbeParams | None = None) -> None:
        self.params = params or VarianceProbeParams()

    @hookimpl
    def select_probe(
        self, ctx: BlockContext, residual: torch.Tensor, normed: torch.Tensor, attention_mask: torch.Tensor
    ) -> Probe:
        """Choose the probe from ``normed`` (``residual`` is not used)."""
        return select_variance_probe(normed, attention_mask, self.params.seq_ratio, self.params.batch_ratio)
