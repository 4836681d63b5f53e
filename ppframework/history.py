"""Per-position activation history of every pruned block, and its updates."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ppframework.types import BlockKind


@dataclass
class BlockHistory:
    """History of one block: ``sq_mean[t, c]`` (and the plain mean) per absolute position ``t``.

    ``sq_mean`` is the running estimate of the mean over samples of ``X[t, c]^2`` where ``X`` is
    the input of the block's output projection; ``mean`` is the calibration mean of ``X``.
    ``samples`` is how many sequences the calibration averaged (the running mean's prior weight);
    ``counts`` (lazily created) holds the samples behind each entry under the running-mean update.
    ``channel_stats`` holds per-channel (C,) calibration statistics beyond the means, by name (e.g.
    the Taylor importances ``taylor:first:element``, :mod:`ppframework.calibration.taylor`); no update
    writes them, so clones share them.
    """

    sq_mean: torch.Tensor
    mean: torch.Tensor | None = None
    updates: int = 0
    samples: int = 0
    counts: torch.Tensor | None = None
    channel_stats: dict[str, torch.Tensor] = field(default_factory=dict)

    def ema_update(
        self,
        stats: torch.Tensor,
        position_valid: torch.Tensor | None,
        channels: torch.Tensor | None,
        momentum: float,
    ) -> None:
        """``Hist[t, c] <- m * Hist[t, c] + (1 - m) * stats[t, c]`` on kept ``channels`` and
        real positions only; other entries are neither updated nor decayed.

        ``position_valid`` None means every position is real (a batch without padding)."""
        seq = stats.shape[0]
        rows = self.sq_mean[:seq]
        index = None if channels is None else _column_index(channels, seq)
        current = rows if index is None else torch.gather(rows, 1, index)
        blended = torch.lerp(stats.to(current.dtype), current, momentum)
        if position_valid is not None:
            blended = torch.where(position_valid[:, None], blended, current)
        if index is None:
            rows.copy_(blended)
        else:
            rows.scatter_(1, index, blended)
        self.updates += 1

    def running_mean_update(
        self,
        stats: torch.Tensor,
        rows_per_position: torch.Tensor,
        channels: torch.Tensor | None,
    ) -> None:
        """Exact running mean over every sequence seen so far (calibration included).

        ``Hist[t, c] <- Hist[t, c] + n_b / (n + n_b) * (stats[t, c] - Hist[t, c])`` where ``n`` is
        the number of samples behind the entry (starting at the calibration's ``samples``) and
        ``n_b`` the real rows of this batch at position ``t``. Only kept ``channels`` change.
        """
        seq = stats.shape[0]
        if self.counts is None:
            prior = float(max(self.samples, 1))
            self.counts = torch.full(
                self.sq_mean.shape, prior, dtype=torch.float32, device=self.sq_mean.device
            )
        rows = self.sq_mean[:seq]
        counts = self.counts[:seq]
        index = None if channels is None else _column_index(channels, seq)
        current = rows if index is None else torch.gather(rows, 1, index)
        seen = counts if index is None else torch.gather(counts, 1, index)
        added = rows_per_position.to(torch.float32)[:, None]
        blended = current + (stats.to(current.dtype) - current) * (added / (seen + added).clamp(min=1.0))
        new_counts = seen + added
        if index is None:
            rows.copy_(blended)
            counts.copy_(new_counts)
        else:
            rows.scatter_(1, index, blended)
            counts.scatter_(1, index, new_counts)
        self.updates += 1


def _column_index(channels: torch.Tensor, rows: int) -> torch.Tensor:
    """``channels`` (unique) as a (rows, n) ``gather``/``scatter_`` index along dim 1 (a broadcast
    view, no copy): the same entries as ``index_select``/``index_copy_`` on the columns, in fewer
    passes over memory on CPU."""
    return channels.expand(rows, channels.numel())


class HistoryStore:
    """Histories keyed by ``(layer, kind)``, and the per-layer calibration statistics.

    ``layer_influence`` (L,), when calibrated, is ShortGPT's block influence of every decoder layer
    (:mod:`ppframework.calibration.influence`); clones share it.
    """

    def __init__(
        self,
        blocks: dict[tuple[int, BlockKind], BlockHistory] | None = None,
        layer_influence: torch.Tensor | None = None,
    ) -> None:
        self.blocks: dict[tuple[int, BlockKind], BlockHistory] = blocks or {}
        self.layer_influence = layer_influence

    def get(self, layer: int, kind: BlockKind) -> BlockHistory | None:
        """The history of one block, or None if there is none."""
        return self.blocks.get((layer, kind))

    def extend(self, positions: int) -> None:
        """Grow every block's history to ``positions`` positions (``history.beyond: extend``).

        A new position starts from the mean over the calibrated positions 1 onwards of ``sq_mean``
        and ``mean`` (position 0, the first token, has outsized activations; a one-position history
        repeats its only row), with the calibration's sample count as its running-mean weight; it is
        then updated like any other position. Blocks already that long are left alone.
        """

        def grown(rows: torch.Tensor) -> torch.Tensor:
            extra = positions - rows.shape[0]
            source = rows[1:] if rows.shape[0] > 1 else rows
            fill = source.float().mean(dim=0).to(rows.dtype)
            return torch.cat([rows, fill.expand(extra, -1)], dim=0)

        for hist in self.blocks.values():
            length = hist.sq_mean.shape[0]
            if length >= positions:
                continue
            hist.sq_mean = grown(hist.sq_mean)
            if hist.mean is not None and hist.mean.shape[0] == length:
                hist.mean = grown(hist.mean)
            if hist.counts is not None:
                prior = torch.full(
                    (positions - length, hist.counts.shape[1]),
                    float(max(hist.samples, 1)),
                    dtype=hist.counts.dtype,
                    device=hist.counts.device,
                )
                hist.counts = torch.cat([hist.counts, prior], dim=0)

    @property
    def max_positions(self) -> int:
        """Positions the history covers (0 when empty)."""
        return min((h.sq_mean.shape[0] for h in self.blocks.values()), default=0)

    def to(self, device: torch.device) -> HistoryStore:
        """Move every tensor to ``device`` (in place) and return self."""
        return self.place(lambda layer: device)

    def place(self, device_of: Callable[[int], torch.device]) -> HistoryStore:
        """Move each block's tensors to ``device_of(layer)`` (in place; e.g. the device its layer runs
        on in a device-mapped model) and return self. Tensors already there are not copied."""
        for (layer, _), hist in self.blocks.items():
            device = device_of(layer)
            hist.sq_mean = hist.sq_mean.to(device)
            if hist.mean is not None:
                hist.mean = hist.mean.to(device)
            if hist.counts is not None:
                hist.counts = hist.counts.to(device)
            hist.channel_stats = {name: t.to(device) for name, t in hist.channel_stats.items()}
        return self

    def clone(self) -> HistoryStore:
        """A copy several methods can start from: the updated tensors (``sq_mean``, ``counts``) are
        cloned; the calibration ``mean``, which no update writes, is shared."""
        return HistoryStore(
            {
                key: BlockHistory(
                    h.sq_mean.clone(),
                    h.mean,
                    h.updates,
                    h.samples,
                    None if h.counts is None else h.counts.clone(),
                    h.channel_stats,
                )
                for key, h in self.blocks.items()
            },
            self.layer_influence,
        )
