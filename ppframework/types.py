"""Dataclasses passed between the pipeline and the stage hooks.

Every hook of :mod:`ppframework.hookspecs` receives and returns these. Tensors live on the
block's device; index tensors are ``torch.long`` and sorted ascending.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch


class BlockKind(str, Enum):
    """The two prunable blocks of a decoder layer."""

    ATTENTION = "attention"
    MLP = "mlp"


@dataclass(frozen=True)
class BlockGeometry:
    """Sizes of one block, read from the model's config by the adapter.

    For attention, ``units`` are query heads and ``unit_width`` is the head dimension; for the
    MLP, ``units`` are intermediate channels and ``unit_width`` is 1. ``channels`` is the width
    of the output projection's input (``units * unit_width``).
    """

    kind: BlockKind
    units: int
    unit_width: int
    num_kv_heads: int = 0

    @property
    def channels(self) -> int:
        """Width of the output projection's input."""
        return self.units * self.unit_width

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.units // self.num_kv_heads if self.num_kv_heads else 1


#: A prunable block: (decoder layer index, block kind).
BlockKey = tuple[int, BlockKind]


@dataclass
class BlockContext:
    """What a strategy may know about the block and batch it is deciding for.

    Attributes:
        layer: decoder layer index.
        kind: attention or MLP block.
        batch_index: 0-based index of the batch since the pipeline was built (warm-up included).
        geometry: the block's sizes.
        seq_len: tokens per sequence in this batch.
        generator: the run's seeded random generator (CPU); use it for any randomness.
        round_to: kept MLP width is rounded up to a multiple of this (1 = off).
        gqa_policy: ``query-only`` (paper) or ``group`` (prune whole key/value groups).
        position_valid: (T,) True where at least one row of the batch is real text.
        collect_stats: whether ``infer`` must report full-batch statistics (history is updated).
        has_padding: whether any row of the batch has padding, known once per batch (None =
            unknown: look at the mask). Lets strategies skip per-block checks of the mask, which
            are host-device synchronisations on CUDA.
        mlp_matrices: weight matrices of the model's MLP block, output projection included (3 for
            the gated LLaMA MLP, 2 for OPT); for FLOPs arithmetic (e.g. a probe's FLOPs budget).
        probe_flops_scale: dense FLOPs of the whole decoder divided by the dense FLOPs of the blocks
            that run a probe, for this batch (>= 1; 1 when every block probes). A probe whose
            budget is a share of the *decoder's* FLOPs spends ``share * probe_flops_scale`` of its
            own block's dense FLOPs.
        rows_per_position: (T,) how many rows of the batch are real text at each position (None:
            unknown, e.g. in a static decision).
        output_gain: (hidden,) the per-row gain the block's output passes through after its output
            projection (Gemma 3's post-norm weights; the adapter's ``output_gain``), None for an
            identity (most families). Output-aware scores fold it into the weight term.
    """

    layer: int
    kind: BlockKind
    batch_index: int
    geometry: BlockGeometry
    seq_len: int
    generator: torch.Generator
    round_to: int = 1
    gqa_policy: str = "query-only"
    position_valid: torch.Tensor | None = None
    collect_stats: bool = False
    has_padding: bool | None = None
    mlp_matrices: int = 3
    probe_flops_scale: float = 1.0
    rows_per_position: torch.Tensor | None = None
    output_gain: torch.Tensor | None = None


@dataclass
class Probe:
    """A probe: the chosen sequences and positions of the batch.

    ``batch_index`` and ``token_index`` are sorted and unique. ``valid`` (k_B, k_T) is False
    where a chosen (row, position) pair is padding; those entries never count.
    """

    batch_index: torch.Tensor
    token_index: torch.Tensor
    valid: torch.Tensor


@dataclass
class ChannelScores:
    """Per-channel evidence for one block, flowing from scoring through fusion to masking.

    Attributes:
        weight_term: (C,) the metric's weight factor per output-projection input channel.
        combine: maps (activation importance or None, weight_term) to the final (C,) score.
        head_reduce: how channel scores become a head score: ``l2`` or ``sum``.
        evidence: (n_pos, C) probe evidence per probed position (mean over probe rows of the
            squared pre-output activation), or None for static methods.
        positions: (n_pos,) absolute positions of the evidence rows.
        position_valid: (n_pos,) False where no probe row was real text at that position.
        activation: (C,) fused activation importance ``a_c``, set by ``fuse_history``.
        metric: name of the scoring metric, for reports.
        statistic: which history statistic ``a_c`` is made of: ``sq_mean`` (sum over positions of
            the mean of ``X^2``; PPsp, Wanda-sp) or ``variance`` (sum over positions of the
            per-position variance of ``X``; FLAP's fluctuation).
        bias_compensation: ask for FLAP's bias compensation: the masking stage adds
            ``W[:, pruned] @ channel_mean[pruned]`` to the block output.
        channel_mean: (C,) mean input of each channel (from the history), set by ``fuse_history``
            when ``bias_compensation`` is on.
        out_weight: (hidden, C) the output projection's weight the scores were made for.
        centered: fusion subtracts the history's squared calibration mean ``m[t, c]^2`` from the
            ``sq_mean`` evidence of each position it sums, so ``a_c`` measures the spread around the
            mean (what bias compensation cannot restore).
        evidence_rows: (n_pos,) how many real probe rows each evidence row averages.
    """

    weight_term: torch.Tensor
    combine: Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]
    head_reduce: str = "l2"
    evidence: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    position_valid: torch.Tensor | None = None
    activation: torch.Tensor | None = None
    metric: str = ""
    statistic: str = "sq_mean"
    bias_compensation: bool = False
    channel_mean: torch.Tensor | None = None
    out_weight: torch.Tensor | None = None
    centered: bool = False
    evidence_rows: torch.Tensor | None = None

    def channel_scores(self) -> torch.Tensor:
        """The final per-channel score (higher = more important)."""
        return self.combine(self.activation, self.weight_term)


@dataclass
class BlockMask:
    """Which units of a block survive for this batch.

    ``kept_units`` are query heads (attention) or channels (MLP), sorted. ``kept_kv_heads`` is
    set only by the group-aware GQA policy (None = key/value heads stay dense).
    ``unit_scores`` are the per-unit scores the decision was made from (for reports).
    ``output_bias`` (hidden,), when set, is added to the block's output (FLAP's bias
    compensation for the pruned channels).
    """

    kept_units: torch.Tensor
    total_units: int
    kept_kv_heads: torch.Tensor | None = None
    unit_scores: torch.Tensor | None = None
    output_bias: torch.Tensor | None = None

    @property
    def n_kept(self) -> int:
        """Number of kept units."""
        return int(self.kept_units.numel())


@dataclass
class BlockInputs:
    """The full batch as one block sees it.

    ``normed`` is the block's input after its norm (B, T, D); ``residual`` is before it;
    ``attention_mask`` (B, T) is 1 for real tokens; ``attn_bias`` is its additive causal form
    (None when there is no padding); ``rotary`` is the model's (cos, sin) or None.

    Optional hints the pipeline fills in (strategies may ignore them): ``has_padding`` (None =
    unknown) and ``probe_reuse``, what the probe forward computed that the block runner may reuse,
    exactly, in the full pass (see :class:`~ppframework.adapters.base.ProbeReuse`).
    """

    normed: torch.Tensor
    residual: torch.Tensor
    attention_mask: torch.Tensor
    attn_bias: torch.Tensor | None = None
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    has_padding: bool | None = None
    probe_reuse: Any = None


@dataclass
class BlockOutput:
    """What ``infer`` returns: the block output and the statistics that update the history.

    ``sq_mean`` (T, n_kept_channels) is the mean over real rows of the squared input of the
    output projection per position; ``position_valid`` (T,) is False where every row is padding;
    ``kept_channels`` indexes the channels ``sq_mean`` describes (None = all).
    """

    output: torch.Tensor
    sq_mean: torch.Tensor | None = None
    position_valid: torch.Tensor | None = None
    kept_channels: torch.Tensor | None = None


@dataclass(frozen=True)
class AllocationContext:
    """What an ``allocate`` strategy may know about the model and the method's pruning settings.

    Attributes:
        num_layers: decoder layers of the model.
        pruned_layers: the layers the method prunes (sorted; skipped layers are not in it).
        targets: the block kinds the method prunes.
        geometries: each kind's :class:`BlockGeometry` (the same in every layer).
        hidden_size: model width D.
        mlp_matrices: weight matrices of the MLP block, output projection included (3 gated, 2 OPT).
        layer_ratio: the uniform per-layer ratio ``p'`` (the target ``p`` inflated for skipped
            layers when ``pruning.inflate_ratio`` is on, else ``p``).
        seq_len: tokens per sequence the decision is made for (the calibration's positions for a
            decision at attach, the batch's for a per-batch decision); FLOPs weights use it.
        round_to: kept MLP width is rounded up to a multiple of this by the masking stage.
        gqa_policy: ``query-only`` (a pruned query head removes its q row and o column; with
            multi-head attention also its k and v rows) or ``group``.
        kv_follow_query: whether pruning a query head also removes its key/value heads (multi-head
            attention under ``query-only``, and OPT).
        batch_index: -1 for the decision at attach; the batch's index for a per-batch decision.
    """

    num_layers: int
    pruned_layers: tuple[int, ...]
    targets: tuple[BlockKind, ...]
    geometries: dict[BlockKind, BlockGeometry]
    hidden_size: int
    mlp_matrices: int
    layer_ratio: float
    seq_len: int = 1
    round_to: int = 1
    gqa_policy: str = "query-only"
    kv_follow_query: bool = False
    batch_index: int = -1

    @property
    def blocks(self) -> list[BlockKey]:
        """Every pruned block ``(layer, kind)``, layer by layer."""
        return [(layer, kind) for layer in self.pruned_layers for kind in BlockKind if kind in self.targets]

    def unit_params(self, kind: BlockKind) -> int:
        """Weights one unit (query head or MLP channel) removes when pruned, key/value rows included
        when they follow the query head (biases excluded)."""
        geo = self.geometries[BlockKind(kind)]
        if BlockKind(kind) is BlockKind.ATTENTION:
            matrices = 4 if self.kv_follow_query else 2
            return matrices * self.hidden_size * geo.unit_width
        return self.mlp_matrices * self.hidden_size

    def unit_flops(self, kind: BlockKind) -> int:
        """FLOPs one unit costs per sequence of ``seq_len`` tokens (2 FLOPs per multiply-add): a
        query head's projections (k/v too when they follow it) plus its ``Q K^T`` and ``A V``
        (counted as the full square, as :mod:`ppframework.metrics.flops` does); an MLP channel's
        rows and column of every MLP matrix."""
        T = self.seq_len
        if BlockKind(kind) is BlockKind.ATTENTION:
            hd = self.geometries[BlockKind.ATTENTION].unit_width
            return T * self.unit_params(kind) * 2 + 2 * (2 * T * T * hd)
        return 2 * T * self.unit_params(kind)
