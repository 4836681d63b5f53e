"""Reusing a probe forward's exact per-token values in the block's full pass (the fused projections)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ProbeReuse:
    """What a block's probe forward computed that the full pass may reuse, exactly.

    The linear projections give a (row, token) the same values whether it is computed inside the
    probe or inside the full batch, since the input and the weights are the same; the full pass then
    computes only the tokens outside the probe and copies the probe's values of the kept channels for
    the others. ``values`` is runner-specific and holds matmul outputs only (the MLP's gate and up
    projections; attention's q, k, v projections before norms and rotary): element-wise functions
    after them run on the full batch's own layout, as without reuse (a vectorised activation computes
    a row's last elements on a scalar path, so copying activations would change last bits).
    ``row_list`` holds the probe rows on the host (building it synchronises on CUDA, so the pipeline
    reuses on CPU only unless told otherwise). ``source`` is the full batch's normed input the probe
    was cut from; a runner reuses only for that very tensor.
    """

    source: torch.Tensor
    rows: torch.Tensor
    row_list: list[int]
    tokens: torch.Tensor
    other_tokens: torch.Tensor
    values: Any

    @classmethod
    def build(cls, source: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, values: Any) -> ProbeReuse:
        """Record ``values`` computed on ``source[rows][:, tokens]``."""
        keep = torch.ones(source.shape[1], dtype=torch.bool, device=tokens.device)
        keep[tokens] = False
        return cls(source, rows, rows.tolist(), tokens, keep.nonzero().flatten(), values)

    def usable_for(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is the tensor the probe was cut from (and autograd is off: the full pass
        then writes into preallocated outputs), and every matmul the reuse splits the batch into has
        at least :data:`MIN_EXACT_ROWS` rows."""
        return self.source is x and not torch.is_grad_enabled() and self.pieces_are_large(x)

    def pieces_are_large(self, x: torch.Tensor) -> bool:
        """Whether the probe's product and each product of the full pass (whole rows outside the
        probe, the probe rows' other tokens) has at least :data:`MIN_EXACT_ROWS` rows."""
        batch, seq = x.shape[:2]
        sizes = [len(self.row_list) * int(self.tokens.numel())]
        sizes += [len(self.row_list) * int(self.other_tokens.numel())] if self.other_tokens.numel() else []
        sizes += [seq] if batch > len(self.row_list) else []
        return min(sizes) >= MIN_EXACT_ROWS


#: The BLAS computes a row of a matrix product the same way whatever the number of rows only from a
#: few rows on (measured with MKL on this project's CPU: products of up to 3 rows, and with 2 threads
#: also of 5-7 and 9-11, take other kernels and differ in the last bit), and only for outputs of more
#: than a few columns (2 and 8 differ, 16 does not). Reuse is skipped below these sizes, with margin.
MIN_EXACT_ROWS = 32
MIN_EXACT_COLUMNS = 32


def fill_outside_probe(
    x: torch.Tensor,
    out: torch.Tensor,
    compute: Callable[[torch.Tensor, torch.Tensor], None],
    reuse: ProbeReuse,
    probe_values: torch.Tensor,
) -> torch.Tensor:
    """Fill ``out`` (B, T, W) with a per-token function of ``x`` (B, T, D), reusing the probe.

    ``compute(x2d, out2d)`` writes the function of the (n, D) rows ``x2d`` into ``out2d`` (n, W).
    Whole rows outside the probe are computed in contiguous slices (no copies); the probe rows are
    computed on their non-probe tokens only, and ``probe_values`` (k_B, k_T, W) fill the probe's
    (row, token) entries.
    """
    batch, _, hidden = x.shape
    width = out.shape[-1]
    if width < MIN_EXACT_COLUMNS:  # too narrow for the BLAS to compute every column alike: recompute
        compute(x.reshape(-1, hidden), out.view(-1, width))
        return out
    start = 0
    for row in [*reuse.row_list, batch]:
        if row > start:
            compute(x[start:row].reshape(-1, hidden), out[start:row].view(-1, width))
        start = row + 1
    rows, others = reuse.rows, reuse.other_tokens
    if others.numel():
        xo = x.index_select(0, rows).index_select(1, others)
        zo = out.new_empty(xo.shape[0] * xo.shape[1], width)
        compute(xo.reshape(-1, hidden), zo)
        out.index_put_((rows[:, None], others[None, :]), zo.view(xo.shape[0], xo.shape[1], width))
    out.index_put_((rows[:, None], reuse.tokens[None, :]), probe_values)
    return out


def probe_rotary(
    rotary: tuple[torch.Tensor, torch.Tensor] | None, rows: torch.Tensor, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The rotary (cos, sin) of the probe's rows and tokens (at their true positions)."""
    if rotary is None:
        return None
    cos, sin = ((r if r.shape[0] == 1 else r.index_select(0, rows)).index_select(1, tokens) for r in rotary)
    return cos, sin


def linear_into(
    weight: torch.Tensor, bias: torch.Tensor | None
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """``compute(x2d, out2d)`` writing ``F.linear(x2d, weight, bias)`` into ``out2d`` (no temporary)."""

    def compute(x2d: torch.Tensor, out2d: torch.Tensor) -> None:
        if bias is None:
            torch.mm(x2d, weight.t(), out=out2d)
        else:
            torch.addmm(bias, x2d, weight.t(), out=out2d)

    return compute


def project_reusing(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    reuse: ProbeReuse | None,
    columns: tuple[torch.Tensor | None, ...],
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a fused sliced weight; when ``reuse`` was made from this very
    ``x``, the probe's tokens take the probe's values instead of being recomputed.

    ``reuse.values`` holds one full projection per part of the fused weight, in its order (q, k, v;
    gate, up); ``columns[i]`` are the kept columns of part ``i`` (None: all of them).
    """
    if reuse is None or not reuse.usable_for(x):
        return torch.nn.functional.linear(x, weight, bias)
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    values = zip(reuse.values, columns, strict=True)
    parts = [t if cols is None else t.index_select(-1, cols) for t, cols in values]
    fill_outside_probe(x, out, linear_into(weight, bias), reuse, torch.cat(parts, dim=-1))
    return out
