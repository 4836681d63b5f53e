"""Every row of a decode step on its own kept weights, in one batched pass (``sequence_decode: batched``).

Under ``decision: sequence`` each row of a ``generate`` batch has its own masks. When every row keeps
the same number of units in a block, the rows' sliced weights stack into one (B, kept, in) tensor per
projection, gathered once per ``generate`` call (:func:`stack_block`), and a decode step computes every
row's projections with batched matrix products (:func:`run_stacked`) instead of running the rows one
after another:

- attention: each row's kept query rows (``q``) and ``o_proj`` columns are stacked; the key/value
  projections are shared (the cache of ``decision: sequence`` holds every key/value head, so every row
  computes all of them with the same weights, one matmul for the batch). The kept query heads of each
  row are placed at their head index in a zero (B, H, T, d) tensor, attention runs over the key/value
  heads with the query heads of a group stacked as positions (no key/value copy per query head), and
  each row's kept heads are read back;
- MLP: each row's kept gate/up rows (one fused weight; OPT: ``fc1`` rows) and down (``fc2``) columns.

What it computes equals the row loop up to the order of floating-point operations in the matrix
products (different BLAS calls); ``tests/test_sequence_batched.py`` checks tokens and logits on tiny
models of every family. Runners it does not know (a family's own attention or MLP runner, tanh
soft-capping) are answered with None by :func:`stack_block`: the caller then runs the rows one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ppframework.adapters.attention_runner import AttentionRunner
from ppframework.adapters.base import BlockRunner
from ppframework.adapters.gather import unit_channels
from ppframework.adapters.kv_cache import KVSlot
from ppframework.adapters.mlp_runner import MLPRunner
from ppframework.adapters.opt import OPTMLPRunner
from ppframework.adapters.rotary import apply_rotary
from ppframework.types import BlockMask

Rotary = tuple[torch.Tensor, torch.Tensor]


@dataclass
class StackedBlock:
    """One block's per-row kept weights, stacked along a leading row dimension.

    ``kept`` (B, n) are each row's kept units (query heads or channels). ``first`` (B, rows, in) is the
    per-row input projection (attention: the kept query rows; MLP: the kept gate rows then up rows, or
    OPT's ``fc1`` rows), ``first_bias`` (B, rows) its bias. ``shared`` / ``shared_bias``: attention's
    key and value projections of every head (one weight for all rows). ``out`` (B, out, kept channels)
    is the output projection's kept columns, ``out_bias`` its (shared) bias, ``row_bias`` (B, 1, out)
    the masks' own output biases (None: none). ``gated``: a gated MLP (``act(gate) * up``).
    """

    kept: torch.Tensor
    first: torch.Tensor
    first_bias: torch.Tensor | None
    out: torch.Tensor
    out_bias: torch.Tensor | None
    row_bias: torch.Tensor | None = None
    shared: torch.Tensor | None = None
    shared_bias: torch.Tensor | None = None
    gated: bool = False

    @property
    def nbytes(self) -> int:
        """Bytes held by the stacked (per-row) tensors; shared weights are counted once."""
        tensors = (self.first, self.first_bias, self.out, self.row_bias, self.shared, self.shared_bias)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def stacked_bytes(runner: BlockRunner, kept: int, rows: int) -> int:
    """Bytes :func:`stack_block` allocates for ``rows`` rows keeping ``kept`` units of ``runner``'s block
    (weights only; biases and the shared key/value weights are small beside them)."""
    weight = runner.out_proj.weight
    hidden = int(weight.shape[0])
    channels = kept * runner.geometry.unit_width
    matrices = 3 if isinstance(runner, MLPRunner) else 2
    return rows * matrices * channels * hidden * weight.element_size()


def unsupported(runner: BlockRunner) -> str | None:
    """Why :func:`stack_block` cannot run ``runner``'s block batched (None: it can)."""
    if isinstance(runner, AttentionRunner):
        if runner.softcap is not None:
            return "attention with tanh soft-capping"
        if runner.geometry.units % runner.geometry.num_kv_heads:
            return "query heads that do not divide into key/value groups"
        return None
    if isinstance(runner, (MLPRunner, OPTMLPRunner)):
        return None
    return f"the block runner {type(runner).__name__}"


def _fresh_gather(runner: BlockRunner, fn: Any) -> Any:
    """Run a runner's gather ``fn`` into fresh tensors (not its pinned set, not the shared buffers)."""
    saved = runner.pinned
    runner.pinned = {}
    try:
        return fn()
    finally:
        runner.pinned = saved


def _stack(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if parts[0] is None else torch.stack(parts)  # type: ignore[arg-type]


def stack_block(runner: BlockRunner, masks: list[BlockMask]) -> StackedBlock | None:
    """Each row's kept weights of ``runner``'s block for the rows' ``masks``, stacked (None when the
    rows keep different numbers of units or :func:`unsupported` names a reason).

    Attention keeps every key/value head (``kept_kv_heads`` is ignored, as the decode steps of
    ``decision: sequence`` do: the cache holds every head)."""
    if unsupported(runner) is not None or len({m.n_kept for m in masks}) != 1:
        return None
    kept = torch.stack([m.kept_units for m in masks])
    out_w, out_b = [], None
    first_w: list[torch.Tensor] = []
    first_b: list[torch.Tensor | None] = []
    shared: tuple[torch.Tensor, torch.Tensor | None] | None = None
    width = runner.geometry.unit_width
    for mask in masks:
        channels = unit_channels(mask.kept_units, width)
        if isinstance(runner, AttentionRunner):
            weight, bias = _fresh_gather(runner, lambda c=channels: runner.sliced_qkv_weight(c, None))
            n_q = int(channels.numel())
            first_w.append(weight[:n_q])
            first_b.append(None if bias is None else bias[:n_q])
            if shared is None:
                shared = (weight[n_q:].clone(), None if bias is None else bias[n_q:].clone())
        elif isinstance(runner, MLPRunner):
            weight, bias = _fresh_gather(runner, lambda c=channels: runner.sliced_gate_up_weight(c))
            first_w.append(weight)
            first_b.append(bias)
        else:
            fc1 = runner.layer.fc1  # type: ignore[attr-defined]
            weight, bias = _fresh_gather(
                runner, lambda c=channels, f=fc1: runner.gather("mlp.fc1", (f,), (c,))
            )
            first_w.append(weight)
            first_b.append(bias)
        o_weight, out_b = _fresh_gather(
            runner, lambda c=channels: runner.gather("out", (runner.out_proj,), None, c)
        )
        out_w.append(o_weight)
    row_biases = [m.output_bias for m in masks]
    row_bias = None
    if any(b is not None for b in row_biases):
        zero = torch.zeros_like(out_w[0][:, 0])
        row_bias = torch.stack([zero if b is None else b.to(zero) for b in row_biases])[:, None, :]
    return StackedBlock(
        kept=kept,
        first=torch.stack(first_w),
        first_bias=_stack(first_b),
        out=torch.stack(out_w),
        out_bias=out_b,
        row_bias=row_bias,
        shared=None if shared is None else shared[0],
        shared_bias=None if shared is None else shared[1],
        gated=isinstance(runner, MLPRunner),
    )


def _bmm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Row ``b`` of ``x`` (B, T, in) times row ``b`` of ``weight`` (B, out, in), plus ``bias`` (B, out)."""
    y = torch.bmm(x, weight.transpose(1, 2))
    return y if bias is None else y.add_(bias[:, None, :])


def _output(z: torch.Tensor, stacked: StackedBlock) -> torch.Tensor:
    y = torch.bmm(z, stacked.out.transpose(1, 2))
    if stacked.out_bias is not None:
        y = y.add_(stacked.out_bias)
    return y if stacked.row_bias is None else y.add_(stacked.row_bias)


def run_stacked(
    runner: BlockRunner,
    stacked: StackedBlock,
    x: torch.Tensor,
    *,
    rotary: Rotary | None,
    slot: KVSlot | None,
) -> torch.Tensor:
    """The block's output (B, T, out) for a decode step's normed input ``x`` (B, T, in), every row on
    its own kept weights. ``slot`` is the attention block's slot in the model's cache (it must keep
    every key/value head, ``full_kv``); ``rotary`` the rows' (cos, sin)."""
    if not isinstance(runner, AttentionRunner):
        h = _bmm(x, stacked.first, stacked.first_bias)
        if stacked.gated:
            n = stacked.kept.shape[1]
            act = runner.act  # type: ignore[attr-defined]
            z = act(h[..., :n]) * h[..., n:]
        else:
            z = runner.layer.activation_fn(h)  # type: ignore[attr-defined]
        return _output(z, stacked)
    if slot is None or not slot.full_kv or slot.past == 0:
        raise RuntimeError(
            "a batched row decode step needs the cache slot of a decode step holding every head"
        )
    return _output(_attention(runner, stacked, x, rotary, slot), stacked)


def _attention(
    runner: AttentionRunner, stacked: StackedBlock, x: torch.Tensor, rotary: Rotary | None, slot: KVSlot
) -> torch.Tensor:
    """The kept heads' attention output (B, T, n * d) of every row (the input of ``o_proj``)."""
    batch, seq, _ = x.shape
    geo = runner.geometry
    d, heads, kv_heads = geo.unit_width, geo.units, geo.num_kv_heads
    n = stacked.kept.shape[1]
    q = _bmm(x, stacked.first, stacked.first_bias)
    scale = getattr(runner, "query_scale", None)  # OPT scales its queries after the projection
    if scale is not None:
        q = q * scale
    assert stacked.shared is not None
    kv = F.linear(x, stacked.shared, stacked.shared_bias)
    k, v = kv.split(kv.shape[-1] // 2, dim=-1)
    q = q.view(batch, seq, n, d).transpose(1, 2)
    k = k.view(batch, seq, kv_heads, d).transpose(1, 2)
    v = v.view(batch, seq, kv_heads, d).transpose(1, 2)
    if runner.q_norm is not None:
        q = runner.q_norm(q)
    if runner.k_norm is not None:
        k = runner.k_norm(k)
    if rotary is not None:
        q = apply_rotary(q, rotary[0], rotary[1])
        k = apply_rotary(k, rotary[0], rotary[1])
    k, v = slot.store(k, v)
    group = heads // kv_heads
    index = stacked.kept[:, :, None, None].expand(batch, n, seq, d)
    full = q.new_zeros(batch, heads, seq, d).scatter_(1, index, q)
    stacked_q = full.view(batch, kv_heads, group * seq, d)
    bias = slot.bias(seq, k.shape[2], q.dtype, runner.window)
    if bias is not None and group > 1:
        bias = bias.repeat(1, 1, group, 1)
    out = F.scaled_dot_product_attention(stacked_q, k, v, attn_mask=bias, scale=runner.scaling)
    out = out.view(batch, heads, seq, d).gather(1, index)
    return out.transpose(1, 2).reshape(batch, seq, n * d)
