"""The ``ppsp-l1`` metric: PPsp's per-weight score, summed over output rows instead of L2-normed."""

from __future__ import annotations

import torch
from ppframework.strategies.scoring import WeightMetricScore, activation_times_weight


def ppsp_l1_weight_term(weight: torch.Tensor) -> torch.Tensor:
    """``sum_i W[i, c]^2`` per input channel ``c`` of the output projection (fp32)."""
    return weight.float().square().sum(dim=0)


class PPspL1Score(WeightMetricScore):
    """PPsp with an L1 row norm: S_c = a_c * sum_i W[i, c]^2, heads by L2.

    PPsp scores each weight as ``W[i, c]^2 * a_c`` and aggregates a channel by the L2 norm over
    its output rows, ``a_c * sqrt(sum_i W[i, c]^4)``, which favours channels whose weight is
    concentrated in a few rows. Summing the same per-weight scores instead (an L1 norm of
    non-negative terms) gives ``a_c * ||W[:, c]||_2^2``, which is the expected squared change of
    the block output when channel ``c`` alone is removed, since ``a_c`` estimates the summed
    ``E[x_c^2]``; every output row then counts in proportion to its energy. The probe evidence,
    fusion and head aggregation stay those of PPsp, so the two differ only in this norm and can be
    compared as an ablation.
    """

    name = "ppsp-l1"
    head_reduce = "l2"
    weight_term = staticmethod(ppsp_l1_weight_term)
    combine = staticmethod(activation_times_weight)
