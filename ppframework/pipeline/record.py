"""What a pipeline records about the blocks it ran: the shapes per block and batch (for FLOPs
accounting) and the weights each batch removed (for the realised ratio)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ppframework.types import BlockKind


@dataclass(frozen=True)
class BlockEvent:
    """The shapes one pruned block actually used for one batch (for FLOPs accounting)."""

    batch: int
    layer: int
    kind: BlockKind
    batch_size: int
    seq_len: int
    kept_units: int
    kept_kv_heads: int
    probe_rows: int
    probe_tokens: int
    #: ``decision: sequence``: the row of the batch this block ran alone for (its own ``batch_size``
    #: 1 x ``seq_len`` forward); None when the block ran for the whole batch.
    row: int | None = None


@dataclass
class PruningRecord:
    """Kept-unit counts per batch, for the realised model-wide ratio, and per-block shapes."""

    removed_params: list[float] = field(default_factory=list)
    kept_units: dict[tuple[int, BlockKind], list[int]] = field(default_factory=dict)
    events: list[BlockEvent] = field(default_factory=list)
