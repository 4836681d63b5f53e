"""pluggy hook specifications: the six pruning stages and strategy registration.

``allocate`` decides, once per attach (and per batch for strategies that opt in), how much each
pruned block keeps. Then, for every pruned (layer, block) and every batch, the pipeline calls, in
order, ``select_probe`` -> (probe forward, done by the model adapter) -> ``score_channels`` ->
``fuse_history`` -> ``apply_mask`` -> ``infer``. Each stage is ``firstresult``: the one strategy
a pipeline selected for that stage answers. A strategy is a class with a ``stage`` and ``name``
attribute, an optional pydantic ``Params`` model, and one ``@hookimpl`` method for its stage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from ppframework.adapters.base import BlockRunner
    from ppframework.history import BlockHistory
    from ppframework.types import (
        AllocationContext,
        BlockContext,
        BlockInputs,
        BlockKey,
        BlockMask,
        BlockOutput,
        ChannelScores,
        Probe,
    )

PROJECT_NAME = "ppframework"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

STAGES: tuple[str, ...] = (
    "allocate",
    "select_probe",
    "score_channels",
    "fuse_history",
    "apply_mask",
    "infer",
)


@hookspec
def ppf_register_strategies(register: Callable[..., Any]) -> None:
    """Register strategies by calling ``register(StrategyClass)`` once per class.

    Built-in strategies use this same hook. ``StrategyClass`` must define ``stage`` (one of
    :data:`STAGES`), ``name`` (unique within the stage) and may define ``Params``, a pydantic
    model validating the strategy's parameters from the config. The host validates the class
    and reports duplicates.
    """


@hookspec(firstresult=True)
def allocate(
    plan: AllocationContext, scores: dict[BlockKey, ChannelScores] | None, target: float
) -> dict[BlockKey, float]:
    """Decide the pruning ratio of every pruned block (the method's per-layer and per-block structure).

    Called once when the pipeline attaches (``plan.batch_index`` -1). A strategy whose class sets
    ``needs_scores = True`` gets every pruned block's fused :class:`~ppframework.types.ChannelScores`
    (so only static methods, which decide every block at attach, can use it); otherwise ``scores``
    is None. A strategy whose class sets ``per_batch = True`` is asked again at the start of every
    batch of a dynamic method (``plan.batch_index`` >= 0, ``plan.seq_len`` the batch's), with
    ``scores`` None.

    Args:
        plan: the model's layers, geometries and the method's pruning settings.
        scores: fused channel scores of every pruned block, or None (see above).
        target: the model-wide target ratio ``p`` (``pruning.ratio``).

    Returns:
        ``{(layer, kind): ratio}`` for every block of ``plan.blocks``, each ratio in ``[0, 1)``;
        ``apply_mask`` receives it as its ``ratio``.
    """


@hookspec(firstresult=True)
def select_probe(
    ctx: BlockContext, residual: torch.Tensor, normed: torch.Tensor, attention_mask: torch.Tensor
) -> Probe | None:
    """Choose the probe for this block and batch.

    Args:
        ctx: the block and batch being decided.
        residual: (B, T, D) the block's residual-stream input before its norm (rank on this).
        normed: (B, T, D) the same after the norm (the probe's values come from this).
        attention_mask: (B, T), 1 for real tokens, 0 for padding.

    Returns:
        A :class:`~ppframework.types.Probe` with sorted, unique indices that never select an
        all-padding position, or None for no probe (a static method deciding from history).
    """


@hookspec(firstresult=True)
def score_channels(
    ctx: BlockContext, probe: Probe | None, probe_states: torch.Tensor | None, weight: torch.Tensor
) -> ChannelScores:
    """Turn the probe's pre-output activations and the output weight into channel evidence.

    Args:
        ctx: the block and batch being decided.
        probe: the probe chosen by ``select_probe`` (None for static methods).
        probe_states: (k_B, k_T, C) input of the output projection computed on the probe with
            full weights, or None without a probe. Read-only: it may be the block's own
            activations, which the pipeline reads again afterwards (history statistics).
        weight: (hidden, C) the output projection's weight.

    Returns:
        :class:`~ppframework.types.ChannelScores` with per-position evidence (if any), the
        metric's weight term and how to combine them.
    """


@hookspec(firstresult=True)
def fuse_history(ctx: BlockContext, scores: ChannelScores, history: BlockHistory | None) -> ChannelScores:
    """Fuse the probe's evidence with the history into the activation importance ``a_c``.

    Args:
        ctx: the block and batch being decided.
        scores: output of ``score_channels``.
        history: this block's history (per absolute position), or None when the method keeps
            none. Must not be modified here; the pipeline updates it after ``infer``.

    Returns:
        The scores with ``activation`` (C,) set (or left None for weight-only metrics).
    """


@hookspec(firstresult=True)
def apply_mask(ctx: BlockContext, scores: ChannelScores, ratio: float) -> BlockMask:
    """Select the units to keep.

    Args:
        ctx: the block and batch being decided (geometry, rounding and GQA policy).
        scores: fused channel scores.
        ratio: this block's pruning ratio, as ``allocate`` decided it (``uniform``: the per-layer
            ratio p', already inflated for skipped layers).

    Returns:
        A :class:`~ppframework.types.BlockMask` with sorted kept units.
    """


@hookspec(firstresult=True)
def infer(ctx: BlockContext, block: BlockRunner, inputs: BlockInputs, mask: BlockMask) -> BlockOutput:
    """Run the full batch through the block on its kept units.

    Args:
        ctx: the block and batch being run.
        block: the adapter's runner for this block (computes the block on given kept units).
        inputs: the full batch (normed input, residual, attention mask, rotary).
        mask: the kept units.

    Returns:
        :class:`~ppframework.types.BlockOutput`: the block output (B, T, D) and the full-batch
        statistics of the output projection's input that update the history.
    """
