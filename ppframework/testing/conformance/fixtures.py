"""The pipeline's objects as the checks build them: block geometries, contexts, registered strategies.

Plugin authors use these from their own tests (re-exported by :mod:`ppframework.testing`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ppframework.hookspecs import STAGES
from ppframework.types import BlockContext, BlockGeometry, BlockKind

if TYPE_CHECKING:
    from ppframework.registry import StrategyInfo, StrategyRegistry


def default_geometry(kind: BlockKind | str) -> BlockGeometry:
    """A small geometry of ``kind``: 4 query heads of width 8 over 2 key/value heads, or 32 channels."""
    kind = BlockKind(kind)
    if kind is BlockKind.ATTENTION:
        return BlockGeometry(kind, units=4, unit_width=8, num_kv_heads=2)
    return BlockGeometry(kind, units=32, unit_width=1)


def make_context(
    kind: BlockKind | str,
    geometry: BlockGeometry | None = None,
    *,
    layer: int = 0,
    batch_index: int = 0,
    seq_len: int | None = None,
    seed: int = 0,
    position_valid: torch.Tensor | None = None,
    collect_stats: bool = False,
    round_to: int = 1,
    gqa_policy: str = "query-only",
) -> BlockContext:
    """Build a :class:`~ppframework.types.BlockContext` as the pipeline would, for tests.

    Args:
        kind: the block kind (a :class:`~ppframework.types.BlockKind` or its value).
        geometry: the block's sizes; :func:`default_geometry` of ``kind`` when None.
        layer: decoder layer index.
        batch_index: index of the batch since the pipeline was built.
        seq_len: tokens per sequence; taken from ``position_valid`` when None (8 without either).
        seed: seed of the context's fresh CPU ``torch.Generator`` (same seed, same randomness).
        position_valid: (T,) True where some row is real text; all True when None.
        collect_stats: whether ``infer`` must report full-batch statistics.
        round_to: kept MLP width is rounded up to a multiple of this.
        gqa_policy: ``query-only`` or ``group``.

    Raises:
        ValueError: ``geometry`` is of another kind, or ``position_valid`` does not have ``seq_len`` rows.
    """
    kind = BlockKind(kind)
    geometry = default_geometry(kind) if geometry is None else geometry
    if geometry.kind is not kind:
        raise ValueError(f"geometry is for a {geometry.kind.value} block, not {kind.value}")
    if position_valid is None:
        seq_len = 8 if seq_len is None else seq_len
        position_valid = torch.ones(seq_len, dtype=torch.bool)
    else:
        position_valid = torch.as_tensor(position_valid).bool()
        if seq_len is None:
            seq_len = int(position_valid.shape[0])
        if tuple(position_valid.shape) != (seq_len,):
            raise ValueError(f"position_valid has shape {tuple(position_valid.shape)}, expected ({seq_len},)")
    return BlockContext(
        layer=layer,
        kind=kind,
        batch_index=batch_index,
        geometry=geometry,
        seq_len=seq_len,
        generator=torch.Generator().manual_seed(seed),
        round_to=round_to,
        gqa_policy=gqa_policy,
        position_valid=position_valid,
        collect_stats=collect_stats,
    )


def registered_strategies(
    stage: str | None = None, registry: StrategyRegistry | None = None
) -> list[StrategyInfo]:
    """Registered strategies (of one ``stage``, or all), by stage then name; for parametrisation.

    ``registry`` defaults to :func:`ppframework.registry.default_registry` (built-ins and the
    entry-point plugins allowed by ``PPF_LOAD_PLUGINS``).
    """
    if stage is not None and stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    if registry is None:
        from ppframework.registry import default_registry

        registry = default_registry()
    return [info for info in registry.all() if stage is None or info.stage == stage]
