"""The ``fuse_history`` check: fusing channel scores with a block's history."""

from __future__ import annotations

from typing import Any

import torch

from ppframework.history import BlockHistory
from ppframework.testing.conformance.examples import _run_stage, _strategies
from ppframework.testing.conformance.fixtures import default_geometry, make_context
from ppframework.testing.conformance.inputs import (
    _SEED,
    PADDINGS,
    _activation_times_weight,
    _draw_geometry,
    _nonnegative,
    _padding_mask,
    _subset,
)
from ppframework.testing.conformance.subject import _Subject
from ppframework.testing.conformance.values import _snapshot
from ppframework.types import BlockGeometry, BlockKind, ChannelScores
from ppframework.validation import check_fused


def _draw_fuse_case(data: Any) -> dict[str, Any]:
    st = _strategies()
    return {
        "geometry": _draw_geometry(data),
        "batch": data.draw(st.integers(1, 4), label="batch"),
        "seq": data.draw(st.integers(1, 12), label="seq_len"),
        "extra": data.draw(st.integers(0, 4), label="history_extra_positions"),
        "padding": data.draw(st.sampled_from(PADDINGS), label="padding"),
        "with_evidence": data.draw(st.booleans(), label="with_evidence"),
        "history_kind": data.draw(st.sampled_from(("none", "sq_mean", "sq_mean+mean")), label="history"),
        "statistic": data.draw(st.sampled_from(("sq_mean", "variance", "fluctuation")), label="statistic"),
        "compensation": data.draw(st.booleans(), label="bias_compensation"),
        "values": data.draw(st.sampled_from(("random", "ties", "zeros")), label="values"),
        "seed": data.draw(st.integers(0, _SEED), label="seed"),
    }


#: Every combination of evidence, history, statistic and bias compensation, once each.
_FUSE_CORNERS: tuple[dict[str, Any], ...] = tuple(
    {
        "geometry": default_geometry(BlockKind.ATTENTION),
        "batch": 3,
        "seq": 6,
        "extra": 2,
        "padding": "right-short",
        "with_evidence": evidence,
        "history_kind": history,
        "statistic": statistic,
        "compensation": compensation,
        "values": "random",
        "seed": 0,
    }
    for evidence in (True, False)
    for history in ("sq_mean", "sq_mean+mean", "none")
    for statistic in ("sq_mean", "variance", "fluctuation")
    for compensation in (False, True)
)


def _fuse_case(
    subject: _Subject,
    outcomes: dict[str, set[str]],
    *,
    geometry: BlockGeometry,
    batch: int,
    seq: int,
    extra: int,
    padding: str,
    with_evidence: bool,
    history_kind: str,
    statistic: str,
    compensation: bool,
    values: str,
    seed: int,
) -> None:
    """One fuse_history example; records ``ok`` or the ValueError under its combination."""
    channels = geometry.channels
    gen = torch.Generator().manual_seed(seed)
    real = _padding_mask(gen, batch, seq, padding).bool()
    position_valid = real.any(dim=0)
    scores = ChannelScores(
        weight_term=_nonnegative(gen, (channels,), values),
        combine=_activation_times_weight,
        metric="conformance",
        statistic=statistic,
        bias_compensation=compensation,
        out_weight=torch.randn(4, channels, generator=gen),
    )
    if with_evidence:
        tokens = _subset(gen, position_valid.nonzero().flatten())
        tokens_valid = torch.rand(tokens.numel(), generator=gen) < 0.8
        scores.evidence = _nonnegative(gen, (tokens.numel(), channels), values) * tokens_valid[:, None]
        scores.positions = tokens
        scores.position_valid = tokens_valid
    history: BlockHistory | None = None
    if history_kind != "none":
        mean = torch.randn(seq + extra, channels, generator=gen)
        spread = _nonnegative(gen, (seq + extra, channels), values)
        with_mean = history_kind == "sq_mean+mean"
        history = BlockHistory(
            sq_mean=mean.square() + spread if with_mean else spread,
            mean=mean if with_mean else None,
            updates=int(torch.randint(0, 5, (1,), generator=gen)),
            samples=int(torch.randint(0, 9, (1,), generator=gen)),
        )
    combo = (
        f"evidence={'yes' if with_evidence else 'no'}, history={history_kind}, "
        f"statistic={statistic}, bias_compensation={compensation}"
    )

    def history_state() -> dict[str, Any]:
        if history is None:
            return {}
        return {
            "history.sq_mean": history.sq_mean,
            "history.mean": history.mean,
            "history.updates": history.updates,
        }

    before = _snapshot(history_state())
    ctx = make_context(geometry.kind, geometry, seed=seed, position_valid=position_valid)
    try:
        fused = subject.call(ctx=ctx, scores=scores, history=history, allow=(ValueError,))
    except ValueError as exc:
        outcomes.setdefault(combo, set()).add(f"ValueError: {exc}")
        subject.require_unchanged(before, history_state(), "the history is not modified")
        return
    outcomes.setdefault(combo, set()).add("ok")
    subject.require_unchanged(before, history_state(), "the history is not modified")
    subject.require(
        isinstance(fused, ChannelScores), "returns ChannelScores", lambda: f"got {type(fused).__name__}"
    )
    subject.require_shape(fused.weight_term, (channels,), "weight_term keeps shape (C,)", "weight_term")
    if fused.activation is not None:
        activation = subject.require_shape(
            fused.activation, (channels,), "activation is None or (C,)", "activation"
        )
        subject.require_finite(activation, "activation is finite and >= 0", "activation", nonnegative=True)
    if compensation:
        subject.require(
            fused.channel_mean is not None,
            "channel_mean is set when bias compensation is asked",
            f"combination {combo}",
        )
    if fused.channel_mean is not None:
        channel_mean = subject.require_shape(
            fused.channel_mean, (channels,), "channel_mean has shape (C,)", "channel_mean"
        )
        subject.require_finite(channel_mean, "channel_mean is finite", "channel_mean")
    subject.require_accepted(check_fused, fused, ctx, defer=False)


def check_fuse_history(strategy: Any, *, max_examples: int = 20) -> None:
    """Check a ``fuse_history`` strategy against the hook contract.

    Inputs: PPsp-like ChannelScores (weight term, with or without probe evidence, statistic
    sq_mean or variance, with or without bias compensation) and a BlockHistory (``sq_mean``
    (Tmax, C) >= 0 with or without ``mean``) or None; random examples, then every combination once.
    Asserts: the history is not modified (tensors and ``updates``); the result is ChannelScores
    with ``weight_term`` (C,) and ``activation`` None or (C,) finite >= 0; ``channel_mean``,
    required when bias compensation is asked, (C,) finite. ValueError is accepted for
    combinations a strategy does not support, but at least one combination must succeed.
    """
    outcomes: dict[str, set[str]] = {}
    subject = _run_stage(
        strategy, "fuse_history", _fuse_case, _draw_fuse_case, max_examples, _FUSE_CORNERS, outcomes
    )
    subject.require(
        any("ok" in results for results in outcomes.values()),
        "fuses at least one supported combination of evidence and history",
        lambda: "; ".join(f"[{combo}] {sorted(results)[0]}" for combo, results in sorted(outcomes.items())),
    )
