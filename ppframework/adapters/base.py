"""The model-adapter interface: where a family keeps its blocks and how to run them sliced.

An adapter never copies Hugging Face modeling code; it reads the model's config and calls the
model's own ``nn.Linear``/norm modules, slicing their weights on the fly so that the original
parameters stay shared and untouched.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ppframework.adapters.attention import causal_attention
from ppframework.adapters.gather import (
    Allocator,
    GatherBuffers,
    concat_parts,
    gather_stacked,
    gather_weight,
    new_tensor,
    sliced_linear,
    unit_channels,
)
from ppframework.adapters.kv_cache import KVSlot
from ppframework.adapters.masks import additive_attention_bias
from ppframework.adapters.probe_reuse import ProbeReuse, fill_outside_probe, probe_rotary
from ppframework.types import BlockGeometry, BlockKind

__all__ = [
    "BlockCall",
    "BlockRunner",
    "GatherBuffers",
    "KVSlot",
    "ModelAdapter",
    "ProbeReuse",
    "additive_attention_bias",
    "causal_attention",
    "fill_outside_probe",
    "gather_weight",
    "probe_rotary",
    "sliced_linear",
    "unit_channels",
]


def _version(tensor: torch.Tensor) -> int:
    """The tensor's in-place version counter (-1 for inference tensors, which keep none)."""
    return -1 if tensor.is_inference() else tensor._version


def _same_index(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or torch.equal(a, b)


Rotary = tuple[torch.Tensor, torch.Tensor]


@dataclass(slots=True)
class BlockCall:
    """The arguments of one :meth:`BlockRunner.pre_output` call, as the runner's hooks receive them.

    ``attention_mask`` (B, T) marks real tokens (None: every token is real); ``attn_bias`` is its
    precomputed additive form (None = plain causal); ``rotary`` is (cos, sin) at the rows' true
    positions. ``kept_units`` None means all units; ``kept_kv_heads`` the kept key/value heads of an
    attention block (None: all). ``reuse`` is the probe's :class:`ProbeReuse`, if any.
    """

    attention_mask: torch.Tensor | None
    attn_bias: torch.Tensor | None = None
    rotary: Rotary | None = None
    kept_units: torch.Tensor | None = None
    kept_kv_heads: torch.Tensor | None = None
    reuse: ProbeReuse | None = None


class BlockRunner(ABC):
    """Runs one block of one decoder layer, optionally on a subset of its units.

    ``pre_output`` computes the input of the output projection (the activations the scores are
    made from); ``output`` applies the output projection on the matching channels. A runner
    implements :meth:`run` (the pre-output of one :class:`BlockCall`) and may override :meth:`probe`;
    the shared skeletons are :class:`~ppframework.adapters.attention_runner.AttentionRunner` and
    :class:`~ppframework.adapters.mlp_runner.MLPRunner`.

    Sliced weights come from :meth:`gather`: pinned (static masks: gathered once and kept), into
    the pipeline's shared :class:`GatherBuffers` (``buffers``, set by the pipeline), or into new
    tensors. ``profiler``, when set (by the pipeline), times the gathers as the ``gather`` stage.

    ``kv_slot`` is set by the pipeline, for attention blocks, only while the block's full batch runs
    in a forward that uses the model's key/value cache (see :class:`KVSlot`): the runner stores the
    keys and values it computes there and attends to what the cache returns. ``layer_idx`` is the
    block's index into that cache.
    """

    geometry: BlockGeometry
    buffers: GatherBuffers | None = None
    profiler: Any = None
    kv_slot: KVSlot | None = None
    layer_idx: int = 0
    #: Whether :meth:`pin_weights` may recycle storage when asked to (False: fresh tensors for every set
    #: of pins, as before recycling existed; set per pipeline with ``Pipeline.recycle_pins``).
    recycle_pins: bool = True
    _pinned: dict[Any, tuple[Any, torch.Tensor | None, torch.Tensor, torch.Tensor | None]] | None = None
    _pins_recycle: bool = False
    _pin_storage: GatherBuffers | None = None
    _channels_memo: tuple[torch.Tensor, int, torch.Tensor] | None = None

    def pin_weights(self, recycle: bool = False) -> None:
        """Keep every sliced weight gathered from now on and reuse it (for static masks).

        While pinned, each projection must always be sliced with the same indices; a different
        slice raises instead of silently reusing a stale weight. Pinning again keeps what is cached.

        With ``recycle`` (the pipeline's one set of pins per ``generate`` call) the weights are gathered
        into storage this runner keeps after :meth:`unpin_weights`, and the next recycled pins
        overwrite it: gathering into memory already mapped saves the page faults of fresh megabytes on
        every call. The caller promises that nothing uses a recycled pin after unpinning it;
        :meth:`release_pin_storage` frees the storage.
        """
        if self._pinned is None:
            self._pinned = {}
            self._pins_recycle = recycle and self.recycle_pins

    def unpin_weights(self) -> None:
        """Drop the pinned sliced weights (gather per call again); recycled pins leave their storage
        to the next recycled pins."""
        self._pinned = None
        self._pins_recycle = False

    def release_pin_storage(self) -> None:
        """Free the storage kept for recycled pins (see :meth:`pin_weights`); pins still in use keep
        theirs until they are dropped."""
        self._pin_storage = None

    @property
    def pin_storage_bytes(self) -> int:
        """Bytes kept for recycled pins."""
        return 0 if self._pin_storage is None else self._pin_storage.nbytes

    @property
    def pinned(self) -> dict[Any, Any] | None:
        """The pinned sliced weights (None: not pinned). Setting it swaps in another set, e.g. one row's
        own under ``decision: sequence``; the pipeline keeps each set with the decision it belongs to."""
        return self._pinned

    @pinned.setter
    def pinned(self, pins: dict[Any, Any] | None) -> None:
        self._pinned = pins
        self._pins_recycle = False  # a swapped-in set owns its tensors

    @property
    def is_pinned(self) -> bool:
        """Whether sliced weights are pinned (gathered once and kept)."""
        return self._pinned is not None

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
            return concat_parts(parts)
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
            if torch.is_grad_enabled():  # out= gathers cannot record autograd
                parts = [gather_weight(lin, r, cols) for lin, r in zip(linears, rows, strict=True)]
                weight, bias = concat_parts(parts)
            else:  # straight into one tensor the pins own: no per-part copies, no concatenation
                weight, bias = gather_stacked(self._pin_allocator(), role, linears, rows, cols)
            self._pinned[role] = (rows, cols, weight, bias)
            return weight, bias
        same = all(_same_index(a, b) for a, b in zip(cached[0], rows, strict=True))
        if not (same and _same_index(cached[1], cols)):
            raise RuntimeError("pinned block weights were requested with a different slice; unpin first")
        return cached[2], cached[3]

    def _pin_allocator(self) -> Allocator:
        """New tensors, or this runner's kept storage for recycled pins."""
        if not self._pins_recycle:
            return new_tensor
        if self._pin_storage is None:
            self._pin_storage = GatherBuffers()
        return self._pin_storage.get

    @staticmethod
    def _gather_into(
        buffers: GatherBuffers,
        role: str,
        linears: tuple[nn.Linear, ...],
        rows: tuple[torch.Tensor | None, ...],
        cols: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return gather_stacked(buffers.get, role, linears, rows, cols)

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

    def pre_output(
        self,
        x: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None,
        attn_bias: torch.Tensor | None = None,
        rotary: Rotary | None = None,
        kept_units: torch.Tensor | None = None,
        kept_kv_heads: torch.Tensor | None = None,
        reuse: ProbeReuse | None = None,
    ) -> torch.Tensor:
        """Input of the output projection (B, T, kept channels) for normed input ``x``.

        The arguments are described on :class:`BlockCall`. ``reuse``, when it was made from this very
        ``x`` (:meth:`ProbeReuse.usable_for`), lets the runner take the probe's per-token values
        instead of recomputing them (runners without that ability ignore it).
        """
        return self.run(x, BlockCall(attention_mask, attn_bias, rotary, kept_units, kept_kv_heads, reuse))

    @abstractmethod
    def run(self, x: torch.Tensor, call: BlockCall) -> torch.Tensor:
        """:meth:`pre_output` of ``x`` for ``call`` (the one method a runner must implement)."""

    def probe_forward(
        self,
        x: torch.Tensor,
        rows: torch.Tensor,
        tokens: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None,
        rotary: Rotary | None = None,
        keep_for_reuse: bool = False,
    ) -> tuple[torch.Tensor, ProbeReuse | None]:
        """The probe's pre-output activations (k_B, k_T, C) with full weights, on ``x[rows][:, tokens]``.

        ``attention_mask`` is the probe's own (k_B, k_T) mask (None: no padding); ``rotary`` the
        full batch's. With ``keep_for_reuse`` a runner that can reuse its probe in the full pass also
        returns a :class:`ProbeReuse` (one whose :meth:`probe` gives no values never does).
        """
        states, values = self.probe(x, rows, tokens, BlockCall(attention_mask, rotary=rotary))
        if keep_for_reuse and values is not None:
            return states, ProbeReuse.build(x, rows, tokens, values)
        return states, None

    def probe(
        self, x: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, call: BlockCall
    ) -> tuple[torch.Tensor, Any]:
        """The probe's pre-output on ``x[rows][:, tokens]`` and the values a full pass may reuse
        (None: none). ``call`` holds the probe's mask and the full batch's rotary.

        This default runs :meth:`pre_output` on the probe's rows and tokens and reuses nothing.
        """
        probe_x = x.index_select(0, rows).index_select(1, tokens)
        probe_rot = probe_rotary(call.rotary, rows, tokens)
        return self.pre_output(probe_x, attention_mask=call.attention_mask, rotary=probe_rot), None

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

    def output_gain(self, layer_index: int, kind: BlockKind) -> torch.Tensor | None:
        """(hidden,) per-row gain the block's output passes through after its output projection (a
        post-norm's weight, e.g. Gemma 3's post-attention / post-feedforward norms), up to one scalar
        per block; None when the output goes straight to the residual (an identity gain)."""
        return None

    def default_positions(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Token positions (B, T) the model uses when a forward without a cache gets no ``position_ids``
        (None: each token's position is its column)."""
        return None

    def rotary(self, layer_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rotary (cos, sin) the model passed to its layers, or None for absolute positions."""
        return None

    def check_supported(self, seq_len: int) -> None:
        """Raise :class:`~ppframework.errors.ConfigError` for settings the adapter cannot run."""
        return None

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of the model by part, each tensor counted once (tied embeddings included once).

        ``decoder``: every decoder layer (norms and biases included); ``embeddings``: embedding
        tables (tokens, learned positions) and an untied output head; ``other``: the rest (final norm,
        projections outside the layers); ``model``: all of them. A realised ratio over the whole
        model is ``removed parameters / model`` (e.g. Gemma 3 270M: about 170M of its 268M are
        embeddings, which structured pruning of the decoder never touches).
        """
        seen: set[int] = set()

        def count(params: Any) -> int:
            total = 0
            for param in params:
                if id(param) not in seen:
                    seen.add(id(param))
                    total += param.numel()
            return total

        decoder = count(self.layers.parameters())
        embedding_params = [m.weight for m in self.model.modules() if isinstance(m, nn.Embedding)]
        output = getattr(self.model, "get_output_embeddings", lambda: None)()
        if output is not None and getattr(output, "weight", None) is not None:
            embedding_params.append(output.weight)
        embeddings = count(embedding_params)
        other = count(self.model.parameters())
        return {
            "decoder": decoder,
            "embeddings": embeddings,
            "other": other,
            "model": decoder + embeddings + other,
        }
