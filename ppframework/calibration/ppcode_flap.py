"""FLAP's calibration statistics exactly as the Probe Pruning code computes them.

The PP code (``Qi-Le1/Probe_Pruning src/model/llama_pp.py: Linear.update_global_metric_score_distribution``,
``flap`` branch; the statistics live there, not in a ``layerwrapper.py``) keeps, per position ``t`` and
channel ``c`` of the output projection's input, a running baseline and a running fluctuation, updated
once per calibration batch ``X`` of ``B`` rows, with ``n`` the rows seen before it::

    old = baseline.clone()
    baseline *= n / (n + B);  baseline += mean_b(X) / (n + B)
    if n > 0:
        fluc *= (n - 1) / (n + B - 1)
        fluc += sum_b (X - mean_t(baseline)) * (X - mean_t(old)) / (n + B)

``mean_b(X)`` is already a mean over the batch, so dividing it by ``n + B`` again makes the baseline
the calibration mean divided by ``B`` (with equal batches): the fluctuation is taken around
``mean / B``, not around the mean, and the compensation bias (``W[:, pruned] @ mean_t(baseline)``,
``Linear.get_compensate_bias``) is ``1 / B`` of FLAP's. The first batch only sets the baseline.

Scoring sums ``fluc`` over positions (``HiddenRepresentationPruning.cal_*_calib_prune_metric``), so only
two (C,) vectors per block matter, and the recurrence can run on them: with ``P`` and ``Q`` the batch's
sums of ``X`` and ``X^2`` over rows and positions and ``mu = mean_t(baseline)``, the sum over positions
of the increment is ``(Q - (mu + mu_old) P + B T mu mu_old) / (n + B)``. :func:`ppcode_flap_statistics`
replays it batch by batch (float64), on the same calibration windows and batches as the dense
calibration, and returns per block the statistics :data:`FLUCTUATION` (the summed ``fluc``) and
:data:`BASELINE` (``mean_t(baseline)``), for the history's ``channel_stats``.
"""

from __future__ import annotations

import torch

from ppframework.adapters import ModelAdapter
from ppframework.calibration.dense import read_projection_inputs
from ppframework.strategies.flap_ppcode import BASELINE, FLUCTUATION
from ppframework.types import BlockKind


class PPCodeFlapState:
    """The PP code's running FLAP statistics of one block, summed / averaged over positions (float64)."""

    def __init__(self) -> None:
        self.n = 0
        self.mu: torch.Tensor | None = None
        self.fluc: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        """Fold one calibration batch ``x`` (B, T, C) in, as the PP code's update does."""
        x = x.detach().double()
        rows, positions = int(x.shape[0]), int(x.shape[1])
        n = self.n
        batch_mean = x.mean(dim=0).mean(dim=0)  # mean_t of mean_b(X)
        old = torch.zeros_like(batch_mean) if self.mu is None else self.mu
        mu = old * (n / (n + rows)) + batch_mean / (n + rows)
        if n > 0:
            sums = x.sum(dim=(0, 1))
            squares = x.square().sum(dim=(0, 1))
            increment = (squares - (mu + old) * sums + rows * positions * mu * old) / (n + rows)
            previous = torch.zeros_like(mu) if self.fluc is None else self.fluc
            self.fluc = previous * ((n - 1) / (n + rows - 1)) + increment
        self.mu = mu
        self.n = n + rows

    def statistics(self) -> dict[str, torch.Tensor]:
        """``{FLUCTUATION: (C,), BASELINE: (C,)}`` in float32 (a single batch leaves ``fluc`` at 0)."""
        if self.mu is None:
            raise RuntimeError("the PP code's FLAP statistics saw no calibration batch")
        fluc = torch.zeros_like(self.mu) if self.fluc is None else self.fluc
        return {FLUCTUATION: fluc.float(), BASELINE: self.mu.float()}


def ppcode_flap_statistics(
    model: torch.nn.Module,
    adapter: ModelAdapter,
    batches: list[torch.Tensor],
    layers: list[int] | None = None,
    progress: bool = True,
) -> dict[tuple[int, BlockKind], dict[str, torch.Tensor]]:
    """Run the dense model over the calibration ``batches`` (no padding, the PP code's calibration
    batch size is each batch's row count) and return, per block, the PP code's FLAP statistics."""
    states = read_projection_inputs(
        model,
        adapter,
        batches,
        PPCodeFlapState,
        PPCodeFlapState.update,
        layers=layers,
        desc="FLAP (PP code) statistics",
        progress=progress,
    )
    return {key: state.statistics() for key, state in states.items()}
