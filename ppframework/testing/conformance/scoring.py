"""The ``score_channels`` check: the shape and meaning of a block's channel scores."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ppframework.testing.conformance.examples import _run_stage, _strategies
from ppframework.testing.conformance.fixtures import default_geometry, make_context
from ppframework.testing.conformance.inputs import _SEED, PADDINGS, _draw_geometry, _padding_mask, _subset
from ppframework.testing.conformance.subject import _Subject
from ppframework.testing.conformance.values import _fields, _fmt, _same, _snapshot
from ppframework.types import BlockContext, BlockGeometry, BlockKind, ChannelScores, Probe
from ppframework.validation import check_scores


def _check_scores_common(subject: _Subject, scores: Any, channels: int) -> None:
    subject.require(
        isinstance(scores, ChannelScores), "returns ChannelScores", lambda: f"got {type(scores).__name__}"
    )
    term = subject.require_shape(scores.weight_term, (channels,), "weight_term has shape (C,)", "weight_term")
    subject.require_finite(term, "weight_term is finite and >= 0", "weight_term", nonnegative=True)
    subject.require(callable(scores.combine), "combine is callable", lambda: f"combine = {scores.combine!r}")
    subject.require(
        scores.head_reduce in ("l2", "sum", "sum-fp16"),
        "head_reduce is 'l2', 'sum' or 'sum-fp16'",
        lambda: f"head_reduce = {scores.head_reduce!r}",
    )
    subject.require(
        scores.statistic in ("sq_mean", "variance", "fluctuation") or ":" in scores.statistic,
        "statistic is 'sq_mean', 'variance', 'fluctuation' or a named calibration statistic "
        "('<pass>:<name>', the history's channel_stats)",
        lambda: f"statistic = {scores.statistic!r}",
    )


def _check_combine(subject: _Subject, scores: ChannelScores, channels: int, gen: torch.Generator) -> None:
    """``combine`` works on a non-negative activation (and on None, or raises ValueError)."""
    activation = torch.randn(channels, generator=gen).square()
    try:
        final = dataclasses.replace(scores, activation=activation).channel_scores()
    except Exception as exc:
        raise subject.error(
            "channel_scores() works once activation is set", f"raised {type(exc).__name__}: {exc}"
        ) from exc
    subject.require_shape(final, (channels,), "channel_scores() has shape (C,)", "channel_scores()")
    subject.require_finite(final, "channel_scores() is finite", "channel_scores()")
    try:
        bare = dataclasses.replace(scores, activation=None).channel_scores()
    except ValueError:
        return
    except Exception as exc:
        raise subject.error(
            "channel_scores() without activation returns scores or raises ValueError",
            f"raised {type(exc).__name__}: {exc}",
        ) from exc
    what = "channel_scores() (no activation)"
    subject.require_shape(bare, (channels,), "channel_scores() has shape (C,)", what)
    subject.require_finite(bare, "channel_scores() is finite", what)


def _draw_score_case(data: Any) -> dict[str, Any]:
    st = _strategies()
    return {
        "geometry": _draw_geometry(data),
        "hidden": data.draw(st.integers(1, 12), label="hidden"),
        "batch": data.draw(st.integers(1, 5), label="batch"),
        "seq": data.draw(st.integers(1, 12), label="seq_len"),
        "padding": data.draw(st.sampled_from(PADDINGS), label="padding"),
        "dtype": data.draw(st.sampled_from((torch.float32, torch.bfloat16)), label="dtype"),
        "with_probe": data.draw(st.booleans(), label="with_probe"),
        "seed": data.draw(st.integers(0, _SEED), label="seed"),
    }


_SCORE_CORNERS: tuple[dict[str, Any], ...] = tuple(
    {
        "geometry": geometry,
        "hidden": 16,
        "batch": 4,
        "seq": 10,
        "padding": padding,
        "dtype": dtype,
        "with_probe": with_probe,
        "seed": 0,
    }
    for geometry in (default_geometry(BlockKind.ATTENTION), default_geometry(BlockKind.MLP))
    for with_probe, padding, dtype in (
        (True, "right-short", torch.float32),
        (True, "left", torch.bfloat16),
        (False, "none", torch.float32),
    )
)


def _score_case(
    subject: _Subject,
    keep_alive: list[torch.Tensor],
    *,
    geometry: BlockGeometry,
    hidden: int,
    batch: int,
    seq: int,
    padding: str,
    dtype: torch.dtype,
    with_probe: bool,
    seed: int,
) -> None:
    channels = geometry.channels
    gen = torch.Generator().manual_seed(seed)
    mask = _padding_mask(gen, batch, seq, padding)
    real = mask.bool()
    weight = (0.2 * torch.randn(hidden, channels, generator=gen)).to(dtype)
    keep_alive.append(weight)
    probe: Probe | None = None
    states: torch.Tensor | None = None
    if with_probe:
        rows = _subset(gen, torch.arange(batch))
        tokens = _subset(gen, real.any(dim=0).nonzero().flatten())
        probe = Probe(batch_index=rows, token_index=tokens, valid=real[rows][:, tokens])
        states = torch.randn(rows.numel(), tokens.numel(), channels, generator=gen).to(dtype)
    inputs = {"probe": probe, "probe_states": states, "weight": weight}

    def current() -> dict[str, Any]:
        return {**_fields(probe, "probe"), "probe_states": states, "weight": weight}

    before = _snapshot(current())

    def ctx() -> BlockContext:
        return make_context(geometry.kind, geometry, seed=seed, position_valid=real.any(dim=0))

    try:
        scores = subject.call(ctx=ctx(), allow=(ValueError,) if probe is None else (), **inputs)
    except ValueError:
        subject.require_unchanged(before, current(), "inputs are not modified")
        return
    subject.require_unchanged(before, current(), "inputs are not modified")
    _check_scores_common(subject, scores, channels)
    if scores.out_weight is not None:
        subject.require_shape(
            scores.out_weight, (hidden, channels), "out_weight is None or (hidden, C)", "out_weight"
        )
    if scores.evidence is not None:
        n_pos = int(scores.evidence.shape[0]) if scores.evidence.dim() == 2 else -1
        if probe is not None:
            subject.require(
                n_pos == probe.token_index.numel(),
                "evidence has one row per probed position",
                lambda: f"evidence {_fmt(scores.evidence)} for {probe.token_index.numel()} positions",
            )
        evidence = subject.require_shape(
            scores.evidence, (n_pos, channels), "evidence has shape (n_pos, C)", "evidence"
        )
        subject.require_finite(evidence, "evidence is finite and >= 0", "evidence", nonnegative=True)
        positions = subject.require_shape(
            scores.positions, (n_pos,), "positions has shape (n_pos,)", "positions"
        )
        position_valid = subject.require_shape(
            scores.position_valid, (n_pos,), "position_valid has shape (n_pos,)", "position_valid"
        )
        if probe is not None:
            subject.require(
                _same(positions.long(), probe.token_index),
                "positions == probe.token_index",
                lambda: f"positions={_fmt(positions)}, token_index={_fmt(probe.token_index)}",
            )
            subject.require(
                _same(position_valid.bool(), probe.valid.any(dim=0)),
                "position_valid is False exactly where no probe row is real",
                lambda: f"position_valid={_fmt(position_valid)}, probe.valid={_fmt(probe.valid)}",
            )
    subject.require_accepted(check_scores, scores, ctx(), probe)
    _check_combine(subject, scores, channels, gen)
    again = subject.call(ctx=ctx(), **inputs)
    subject.require_repeated(
        again,
        scores,
        ChannelScores,
        ("weight_term", "evidence"),
        "deterministic: scoring the same inputs again gives the same scores",
        lambda: f"weight_term {_fmt(scores.weight_term)}, then {_fmt(getattr(again, 'weight_term', None))}",
    )


def check_score_channels(strategy: Any, *, max_examples: int = 20) -> None:
    """Check a ``score_channels`` strategy against the hook contract.

    Inputs: a hand-made probe (random rows and real positions of a padded batch), probe states
    (k_B, k_T, C) and an output weight (hidden, C) in float32 or bfloat16, or no probe at all.
    Asserts: ChannelScores with ``weight_term`` (C,) finite >= 0, a callable ``combine``,
    ``head_reduce`` l2/sum/sum-fp16 and ``statistic`` sq_mean/variance/fluctuation or a named
    calibration statistic (``<pass>:<name>``); ``out_weight`` None or (hidden, C);
    evidence, when set, (n_pos, C) finite >= 0 with ``positions`` (n_pos,) and ``position_valid``
    (n_pos,), and with a probe n_pos = k_T, ``positions == probe.token_index`` and
    ``position_valid == probe.valid.any(0)``; ``channel_scores()`` with a non-negative activation is
    (C,) finite (without activation: (C,) finite or ValueError); the inputs are not modified;
    scoring the same inputs again gives the same scores. Without a probe the strategy may raise
    ValueError (it needs one); nowhere else. Weights stay alive during the check, as a model's
    do in the pipeline (so caches keyed on the weight's storage stay valid).
    """
    keep_alive: list[torch.Tensor] = []
    try:
        _run_stage(
            strategy,
            "score_channels",
            _score_case,
            _draw_score_case,
            max_examples,
            _SCORE_CORNERS,
            keep_alive,
        )
    finally:
        keep_alive.clear()
