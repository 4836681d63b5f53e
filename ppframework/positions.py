"""Token positions of a batch, and the per-row shift that puts each token at the column of its position.

The per-position history, the probe's token ranking and the full-batch statistics are indexed by a
token's *position* (its ``position_ids`` entry), not by its column in the batch. With right padding
(or none) the two agree. With left padding (``generate`` on prompts of different lengths) row ``b``'s
token at column ``c`` has position ``c - s_b``, where ``s_b`` is the row's number of leading pads.
:class:`RowShift` rolls each row left by ``s_b`` so that columns are positions again (the padding
moves to the end of the row, where every stage already knows to ignore it), and rolls back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _take(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``out[b, ..., t, ...] = x[b, ..., index[b, t], ...]`` along ``dim`` (batch is dim 0).

    ``x`` may have a batch dimension of 1 (shared by every row, e.g. rotary tables); it is expanded.
    """
    batch, seq = index.shape
    if x.shape[0] != batch:
        x = x.expand(batch, *x.shape[1:])
    view = [1] * x.dim()
    view[0], view[dim] = batch, seq
    full = list(x.shape)
    full[dim] = seq
    return torch.gather(x, dim, index.view(view).expand(full))


@dataclass(frozen=True)
class RowShift:
    """Per-row roll between the model's column layout and the position-aligned layout.

    ``shifts`` (B,) is each row's ``s_b`` (position = column - s_b for every real token).
    ``to_positions`` moves column ``(p + s_b) mod T`` to column ``p``; ``to_columns`` undoes it.
    """

    shifts: torch.Tensor
    gather_index: torch.Tensor
    scatter_index: torch.Tensor

    @classmethod
    def from_shifts(cls, shifts: torch.Tensor, seq: int) -> RowShift:
        """The roll for per-row ``shifts`` (B,) over ``seq`` columns."""
        columns = torch.arange(seq, device=shifts.device)
        gather = (columns[None, :] + shifts[:, None]) % seq
        scatter = (columns[None, :] - shifts[:, None]) % seq
        return cls(shifts, gather, scatter)

    def to(self, device: torch.device) -> RowShift:
        """The same roll with its index tensors on ``device`` (self when they are there already)."""
        if self.shifts.device == device:
            return self
        return RowShift(self.shifts.to(device), self.gather_index.to(device), self.scatter_index.to(device))

    def to_positions(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """``x`` (batch first, ``dim`` the sequence) from column to position layout."""
        return _take(x, self.gather_index, dim)

    def to_columns(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """``x`` from position back to column layout."""
        return _take(x, self.scatter_index, dim)


def row_shifts(attention_mask: torch.Tensor, positions: torch.Tensor | None) -> RowShift | None:
    """The roll that aligns columns with ``positions`` (B or 1, T), or None when they already agree.

    ``positions`` None means every token's position is its column (nothing to do). Otherwise each
    row's real tokens must sit at ``position = column - s_b`` with one ``s_b >= 0`` per row: left or
    right padding, or none. Positions that do not start at 0, or rows whose real tokens have gaps
    in their positions, raise :class:`ValueError` naming ``position_ids``: the history has one entry
    per position of a sequence that starts at position 0.
    """
    if positions is None:
        return None
    batch, seq = attention_mask.shape
    real = attention_mask.bool()
    columns = torch.arange(seq, device=attention_mask.device)
    offset = columns[None, :] - positions.to(attention_mask.device).long()
    offset = offset.expand(batch, seq)
    big = 4 * seq + 1
    low = offset.masked_fill(~real, big).amin(dim=1)
    high = offset.masked_fill(~real, -big).amax(dim=1)
    has_real = real.any(dim=1)
    low = torch.where(has_real, low, torch.zeros_like(low))
    high = torch.where(has_real, high, torch.zeros_like(high))
    bad = (low != high) | (low < 0)
    any_bad, any_shift = torch.stack((bad.any(), (low > 0).any())).tolist()
    if any_bad:
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"position_ids: row {row} does not start at position 0 or its real tokens' positions are not "
            "consecutive; a forward that decides a new mask needs each row to hold one sequence from "
            "position 0, left- or right-padded (the history is indexed by position)"
        )
    if not any_shift:
        return None
    return RowShift.from_shifts(low, seq)
