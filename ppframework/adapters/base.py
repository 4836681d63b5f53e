"""The model-adapter interface: where a family keeps its blocks and how to run them sliced.

An adapter never copies Hugging Face modeling code; it reads the model's config and calls the
model's own ``nn.Linear``/norm modules, slicing their weights on the fly so that the original
parameters stay shared and untouched.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ppframework.types import BlockGeometry, BlockKind


def gather_weight(
    linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight (and bias) of ``linear`` restricted to output ``rows`` and/or input ``cols``.

    The weight is gathered into a new tensor (``index_select``); the module is not modified.
    The bias follows the rows; with ``cols`` the full bias is kept (it is added once).
    """
    weight = linear.weight
    bias = linear.bias
    if rows is not None:
        weight = weight.index_select(0, rows)
        bias = bias.index_select(0, rows) if bias is not None else None
    if cols is not None:
        weight = weight.index_select(1, cols)
    return weight, bias


def sliced_linear(
    x: torch.Tensor, linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> torch.Tensor:
    """``linear(x)`` restricted to output ``rows`` and/or input ``cols`` of its weight (see
    :func:`gather_weight`)."""
    weight, bias = gather_weight(linear, rows, cols)
    return F.linear(x, weight, bias)


def unit_channels(units: torch.Tensor, unit_width: int) -> torch.Tensor:
    """Expand unit indices (heads) into the channel indices they cover."""
    if unit_width == 1:
        return units
    offsets = torch.arange(unit_width, device=units.device)
    return (units[:, None] * unit_width + offsets[None, :]).reshape(-1)


def additive_attention_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Causal + key-padding additive bias (B, 1, T, T), or None when there is no padding.

    Fully masked rows (a padding query with no real key before it) get a zero bias on the
    diagonal so that softmax never sees only ``-inf`` (their outputs are never used).
    """
    if bool(attention_mask.all()):
        return None
    _, seq = attention_mask.shape
    device = attention_mask.device
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    allowed = causal[None, :, :] & attention_mask.bool()[:, None, :]
    allowed = allowed | torch.eye(seq, dtype=torch.bool, device=device)[None]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias[:, None, :, :]


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention_mask: torch.Tensor | None,
    attn_bias: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Causal SDPA over (B, H, T, d) tensors; the fast causal path when there is no padding.

    ``attn_bias`` is the precomputed additive form of ``attention_mask`` (built here if None and
    the mask has padding). ``attention_mask`` None means every token is real: nothing is checked,
    so there is no host-device synchronisation (the pipeline knows this once per batch).
    """
    if attn_bias is None and (attention_mask is None or bool(attention_mask.all())):
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale)
    if attn_bias is None:
        attn_bias = additive_attention_bias(attention_mask, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=scale)


def _version(tensor: torch.Tensor) -> int:
    """The tensor's in-place version counter (-1 for inference tensors, which keep none)."""
    return -1 if tensor.is_inference() else tensor._version


def _same_index(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or torch.equal(a, b)


def _concat_parts(
    parts: list[tuple[torch.Tensor, torch.Tensor | None]],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack gathered (weight, bias) parts along the output dimension (missing biases are zero)."""
    if len(parts) == 1:
        return parts[0]
    weight = torch.cat([w for w, _ in parts])
    if all(b is None for _, b in parts):
        return weight, None
    bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in parts])
    return weight, bias


class GatherBuffers:
    """Reusable storage for the per-batch weight gathers of one pipeline's block runners.

    Blocks run one after another, so one buffer per role (``"mlp.gate_up"``, ``"out"``, ...) serves
    every layer: each gather overwrites it right before the matmul that reads it (on CUDA the
    stream orders the two). Gathering into warm memory avoids allocating, and on CPU page-faulting,
    megabytes per block and batch. Runners use the buffers only while autograd is off (a saved
    weight must not be overwritten); storage grows to the largest request and is then reused.
    """

    def __init__(self) -> None:
        self._storage: dict[tuple[Any, ...], torch.Tensor] = {}

    def get(self, role: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A tensor of ``shape`` with ``like``'s dtype and device (contents undefined)."""
        key = (role, like.dtype, like.device, torch.is_inference_mode_enabled())
        numel = math.prod(shape)
        flat = self._storage.get(key)
        if flat is None or flat.numel() < numel:
            flat = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._storage[key] = flat
        return flat[:numel].view(shape)

    @property
    def nbytes(self) -> int:
        """Bytes currently held."""
        return sum(t.numel() * t.element_size() for t in self._storage.values())

    def clear(self) -> None:
        """Free every buffer."""
        self._storage.clear()


@dataclass
class ProbeReuse:
    """What a block's probe forward computed that the full pass may reuse, exactly.

    Per-token computations (the linear projections, the gated MLP) give a (row, token) the same
    values whether it is computed inside the probe or inside the full batch, since the input and the
    weights are the same; the full pass then computes only the tokens outside the probe and copies
    the probe's values of the kept channels for the others. ``values`` is runner-specific (the MLP's
    pre-output activations; attention's q, k, v projections before rotary). ``row_list`` holds the
    probe rows on the host (building it synchronises on CUDA, so the pipeline reuses on CPU only
    unless told otherwise). ``source`` is the full batch's normed input the probe was cut from; a
    runner reuses only for that very tensor.
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
        then writes into preallocated outputs)."""
        return self.source is x and not torch.is_grad_enabled()


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


class BlockRunner(ABC):
    """Runs one block of one decoder layer, optionally on a subset of its units.

    ``pre_output`` computes the input of the output projection (the activations the scores are
    made from); ``output`` applies the output projection on the matching channels.

    Sliced weights come from :meth:`gather`: pinned (static masks: gathered once and kept), into
    the pipeline's shared :class:`GatherBuffers` (``buffers``, set by the pipeline), or into new
    tensors. ``profiler``, when set (by the pipeline), times the gathers as the ``gather`` stage.
    """

    geometry: BlockGeometry
    buffers: GatherBuffers | None = None
    profiler: Any = None
    _pinned: dict[Any, tuple[Any, torch.Tensor | None, torch.Tensor, torch.Tensor | None]] | None = None
    _channels_memo: tuple[torch.Tensor, int, torch.Tensor] | None = None

    def pin_weights(self) -> None:
        """Keep every sliced weight gathered from now on and reuse it (for static masks).

        While pinned, each projection must always be sliced with the same indices; a different
        slice raises instead of silently reusing a stale weight. Pinning again keeps what is cached.
        """
        if self._pinned is None:
            self._pinned = {}

    def unpin_weights(self) -> None:
        """Drop the pinned sliced weights (gather per call again)."""
        self._pinned = None

    def gather(
        self,
        role: str,
        linears: tuple[nn.Linear, ...],
        rows: tuple[torch.Tensor | None, ...] | None = None,
        cols: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weights (and biases) of ``linears`` restricted to their ``rows`` and/or to input ``cols``,
        stacked along the output dimension (one matmul then computes them all).

        ``role`` names the gather within the block (the pinned cache and the shared buffers are keyed
        by it). ``rows[i]`` None keeps every row of ``linears[i]``. A bias follows its rows (zeros for
        a linear without one when another has one); with ``cols`` the full bias is kept.
        """
        row_sel = tuple(rows) if rows is not None else (None,) * len(linears)
        if self._pinned is not None:
            return self._pinned_gather(role, linears, row_sel, cols)
        buffers = self.buffers
        if buffers is None or torch.is_grad_enabled():
            parts = [gather_weight(lin, r, cols) for lin, r in zip(linears, row_sel, strict=True)]
            return _concat_parts(parts)
        if self.profiler is None:
            return self._gather_into(buffers, role, linears, row_sel, cols)
        with self.profiler.stage("gather"):
            return self._gather_into(buffers, role, linears, row_sel, cols)

    def _pinned_gather(
        self,
        role: str,
        linears: tuple[nn.Linear, ...],
        rows: tuple[torch.Tensor | None, ...],
        cols: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert self._pinned is not None
        cached = self._pinned.get(role)
        if cached is None:
            parts = [gather_weight(lin, r, cols) for lin, r in zip(linears, rows, strict=True)]
            weight, bias = _concat_parts(parts)
            self._pinned[role] = (rows, cols, weight, bias)
            return weight, bias
        same = all(_same_index(a, b) for a, b in zip(cached[0], rows, strict=True))
        if not (same and _same_index(cached[1], cols)):
            raise RuntimeError("pinned block weights were requested with a different slice; unpin first")
        return cached[2], cached[3]

    @staticmethod
    def _gather_into(
        buffers: GatherBuffers,
        role: str,
        linears: tuple[nn.Linear, ...],
        rows: tuple[torch.Tensor | None, ...],
        cols: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        first = linears[0].weight
        widths = [
            lin.weight.shape[0] if r is None else int(r.numel()) for lin, r in zip(linears, rows, strict=True)
        ]
        n_in = first.shape[1] if cols is None else int(cols.numel())
        weight = buffers.get(role, (sum(widths), n_in), first)
        biases = [lin.bias for lin in linears]
        bias: torch.Tensor | None = None
        if len(linears) == 1 and rows[0] is None:
            bias = biases[0]  # columns only: the full bias, shared, not copied
        elif any(b is not None for b in biases):
            bias = buffers.get(role + ".bias", (sum(widths),), first)
        start = 0
        for lin, r, width, b in zip(linears, rows, widths, biases, strict=True):
            dst = weight.narrow(0, start, width)
            src = lin.weight
            if r is not None and cols is not None:
                torch.index_select(src.index_select(0, r), 1, cols, out=dst)
            elif r is not None:
                torch.index_select(src, 0, r, out=dst)
            elif cols is not None:
                torch.index_select(src, 1, cols, out=dst)
            else:
                dst.copy_(src)
            if bias is not None and bias is not b:
                bdst = bias.narrow(0, start, width)
                if b is None:
                    bdst.zero_()
                elif r is not None:
                    torch.index_select(b, 0, r, out=bdst)
                else:
                    bdst.copy_(b)
            start += width
        return weight, bias

    def linear(
        self,
        x: torch.Tensor,
        linear: nn.Linear,
        rows: torch.Tensor | None = None,
        cols: torch.Tensor | None = None,
        *,
        role: str | None = None,
    ) -> torch.Tensor:
        """``linear(x)`` on the given rows/columns (see :meth:`gather`; ``role`` defaults to one
        private to ``linear``)."""
        if rows is None and cols is None:
            return F.linear(x, linear.weight, linear.bias)
        weight, bias = self.gather(role or f"linear-{id(linear)}", (linear,), (rows,), cols)
        return F.linear(x, weight, bias)

    @property
    @abstractmethod
    def out_proj(self) -> nn.Linear:
        """The block's output projection module (o_proj, down_proj, out_proj or fc2)."""

    @abstractmethod
    def pre_output(
        self,
        x: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None,
        attn_bias: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        kept_units: torch.Tensor | None = None,
        kept_kv_heads: torch.Tensor | None = None,
        reuse: ProbeReuse | None = None,
    ) -> torch.Tensor:
        """Input of the output projection (B, T, kept channels) for normed input ``x``.

        ``attention_mask`` (B, T) marks real tokens (None: every token is real); ``attn_bias`` is
        its precomputed additive form (None = plain causal); ``rotary`` is (cos, sin) at the rows'
        true positions. ``kept_units`` None means all units. ``reuse``, when it was made from this
        very ``x`` (:meth:`ProbeReuse.usable_for`), lets the runner take the probe's per-token
        values instead of recomputing them (runners without that ability ignore it).
        """

    def probe_forward(
        self,
        x: torch.Tensor,
        rows: torch.Tensor,
        tokens: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        keep_for_reuse: bool = False,
    ) -> tuple[torch.Tensor, ProbeReuse | None]:
        """The probe's pre-output activations (k_B, k_T, C) with full weights, on ``x[rows][:, tokens]``.

        ``attention_mask`` is the probe's own (k_B, k_T) mask (None: no padding); ``rotary`` the
        full batch's. With ``keep_for_reuse`` a runner that can reuse its probe in the full pass also
        returns a :class:`ProbeReuse` (this base implementation never does).
        """
        probe_x = x.index_select(0, rows).index_select(1, tokens)
        probe_rot = probe_rotary(rotary, rows, tokens)
        states = self.pre_output(probe_x, attention_mask=attention_mask, rotary=probe_rot)
        return states, None

    def output(self, z: torch.Tensor, kept_channels: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the output projection to ``z`` whose channels are ``kept_channels``."""
        return self.linear(z, self.out_proj, cols=kept_channels, role="out")

    def channels_of(self, kept_units: torch.Tensor | None) -> torch.Tensor | None:
        """Channel indices of the output projection's input covered by ``kept_units``.

        Remembered for the last ``kept_units`` tensor (the pre-output and the output projection
        of one block ask for the same one), so it is expanded once per block.
        """
        if kept_units is None or self.geometry.unit_width == 1:
            return kept_units
        memo = self._channels_memo
        version = _version(kept_units)
        if memo is not None and memo[0] is kept_units and memo[1] == version:
            return memo[2]
        channels = unit_channels(kept_units, self.geometry.unit_width)
        self._channels_memo = (kept_units, version, channels)
        return channels


class ModelAdapter(ABC):
    """Knows, for one model family, where the decoder blocks are and how the residual flows."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    mlp_matrices: ClassVar[int] = 3

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    @property
    @abstractmethod
    def layers(self) -> nn.ModuleList:
        """The decoder layers in order."""

    @property
    def num_layers(self) -> int:
        """Number of decoder layers."""
        return len(self.layers)

    @abstractmethod
    def geometry(self, kind: BlockKind) -> BlockGeometry:
        """Sizes of the given block (the same for every layer)."""

    @abstractmethod
    def runner(self, layer_index: int, kind: BlockKind) -> BlockRunner:
        """A runner for one block of one layer."""

    @abstractmethod
    def block_input(self, layer: nn.Module, kind: BlockKind, hidden: torch.Tensor) -> torch.Tensor:
        """The block's normed input given the residual stream ``hidden``."""

    @abstractmethod
    def block_residual(
        self, layer: nn.Module, kind: BlockKind, hidden: torch.Tensor, block_out: torch.Tensor
    ) -> torch.Tensor:
        """The residual stream after the block."""

    def rotary(self, layer_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rotary (cos, sin) the model passed to its layers, or None for absolute positions."""
        return None

    def check_supported(self, seq_len: int) -> None:
        """Raise :class:`~ppframework.errors.ConfigError` for settings the adapter cannot run."""
        return None
