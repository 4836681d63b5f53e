"""The ``allocate`` check: per-block pruning ratios for a plan of pruned layers."""

from __future__ import annotations

from typing import Any

import torch

from ppframework.testing.conformance.examples import _run_stage, _strategies
from ppframework.testing.conformance.inputs import (
    _HEAD_COUNTS,
    _SEED,
    _activation_times_weight,
    _divisors,
    _nonnegative,
)
from ppframework.testing.conformance.subject import _Subject
from ppframework.testing.conformance.values import _snapshot
from ppframework.types import AllocationContext, BlockGeometry, BlockKind, ChannelScores
from ppframework.validation import check_allocation


def _draw_allocate_case(data: Any) -> dict[str, Any]:
    st = _strategies()
    heads = data.draw(st.sampled_from(_HEAD_COUNTS), label="heads")
    num_layers = data.draw(st.integers(1, 6), label="num_layers")
    pruned = data.draw(
        st.lists(st.integers(0, num_layers - 1), min_size=1, max_size=num_layers, unique=True),
        label="pruned_layers",
    )
    return {
        "num_layers": num_layers,
        "pruned": tuple(sorted(pruned)),
        "targets": data.draw(
            st.sampled_from(((BlockKind.ATTENTION, BlockKind.MLP), (BlockKind.ATTENTION,), (BlockKind.MLP,))),
            label="targets",
        ),
        "heads": heads,
        "kv_heads": data.draw(st.sampled_from(_divisors(heads)), label="num_kv_heads"),
        "head_dim": data.draw(st.integers(1, 8), label="head_dim"),
        "mlp_units": data.draw(st.integers(1, 48), label="mlp_units"),
        "layer_ratio": data.draw(st.sampled_from((0.0, 0.1, 0.25, 0.5, 0.9)), label="layer_ratio"),
        "seq_len": data.draw(st.integers(1, 64), label="seq_len"),
        "values": data.draw(st.sampled_from(("random", "ties", "zeros")), label="values"),
        "seed": data.draw(st.integers(0, _SEED), label="seed"),
    }


_ALLOCATE_CORNERS: tuple[dict[str, Any], ...] = tuple(
    {
        "num_layers": 4,
        "pruned": (1, 2, 3),
        "targets": (BlockKind.ATTENTION, BlockKind.MLP),
        "heads": 4,
        "kv_heads": kv,
        "head_dim": 8,
        "mlp_units": 32,
        "layer_ratio": ratio,
        "seq_len": 16,
        "values": values,
        "seed": 0,
    }
    for kv in (2, 4)
    for ratio in (0.0, 0.4, 0.9)
    for values in ("random", "zeros")
)


def _allocate_case(
    subject: _Subject,
    *,
    num_layers: int,
    pruned: tuple[int, ...],
    targets: tuple[BlockKind, ...],
    heads: int,
    kv_heads: int,
    head_dim: int,
    mlp_units: int,
    layer_ratio: float,
    seq_len: int,
    values: str,
    seed: int,
) -> None:
    """One allocate example: a plan, the blocks' scores when the strategy asks for them."""
    gen = torch.Generator().manual_seed(seed)
    geometries = {
        BlockKind.ATTENTION: BlockGeometry(BlockKind.ATTENTION, heads, head_dim, kv_heads),
        BlockKind.MLP: BlockGeometry(BlockKind.MLP, mlp_units, 1),
    }
    plan = AllocationContext(
        num_layers=num_layers,
        pruned_layers=pruned,
        targets=targets,
        geometries=geometries,
        hidden_size=16,
        mlp_matrices=3,
        layer_ratio=layer_ratio,
        seq_len=seq_len,
        kv_follow_query=kv_heads == heads,
    )
    scores: dict[tuple[int, BlockKind], ChannelScores] | None = None
    if getattr(subject.strategy, "needs_scores", False):
        scores = {}
        for layer, kind in plan.blocks:
            channels = geometries[kind].channels
            scores[(layer, kind)] = ChannelScores(
                weight_term=_nonnegative(gen, (channels,), values),
                combine=_activation_times_weight,
                activation=_nonnegative(gen, (channels,), values),
                metric="conformance",
                head_reduce="sum",
            )
    state = {} if scores is None else {f"{key}.activation": s.activation for key, s in scores.items()}
    before = _snapshot(state)
    ratios = subject.call(plan=plan, scores=scores, target=layer_ratio)
    subject.require_unchanged(before, state, "the scores are not modified")
    subject.require_accepted(check_allocation, ratios, plan)
    again = subject.call(plan=plan, scores=scores, target=layer_ratio)
    subject.require(
        again == ratios,
        "deterministic: the same plan and scores give the same ratios",
        f"{ratios} then {again}",
    )
    if layer_ratio == 0:
        subject.require(
            all(value == 0 for value in ratios.values()),
            "a per-layer ratio of 0 prunes nothing",
            lambda: f"ratios = {ratios}",
        )


def check_allocate(strategy: Any, *, max_examples: int = 20) -> None:
    """Check an ``allocate`` strategy against the hook contract.

    Inputs: random :class:`~ppframework.types.AllocationContext` plans (1-6 layers, any non-empty
    set of pruned layers, attention and/or MLP targets, grouped or multi-head attention, per-layer
    ratios 0 to 0.9) and, when the strategy's class sets ``needs_scores``, fused ChannelScores of
    every pruned block (random, tied or all-zero values); otherwise ``scores`` is None. Asserts:
    the pipeline's :func:`~ppframework.validation.check_allocation` accepts the answer (exactly the
    plan's blocks, each a finite ratio in [0, 1)); the scores are not modified; the answer is
    deterministic; a per-layer ratio of 0 gives every block 0.
    """
    _run_stage(strategy, "allocate", _allocate_case, _draw_allocate_case, max_examples, _ALLOCATE_CORNERS)
