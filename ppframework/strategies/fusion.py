"""``fuse_history`` strategies: combine probe evidence with the per-position history.

Every strategy here produces ``a_c`` from the statistic the scoring metric asked for
(``ChannelScores.statistic``): the mean of ``X^2`` (PPsp, Wanda-sp) or, from a calibration
history, the per-position variance of ``X`` (FLAP's fluctuation). When the metric asks for bias
compensation, the history's per-channel mean input is attached too.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ppframework.history import BlockHistory
from ppframework.hookspecs import hookimpl
from ppframework.types import BlockContext, ChannelScores


def importance_scaled_fusion(probe: torch.Tensor, history: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``F = (1 - rho) * Hist + rho * P`` with ``rho = P / (P + Hist + eps)``, per entry.

    Without autograd, computed in two buffers, operation by operation as the formula reads (the
    same values as the expression evaluated with temporaries); the inputs are not modified."""
    if torch.is_grad_enabled() and (probe.requires_grad or history.requires_grad):
        rho = probe / (probe + history + eps)
        return (1.0 - rho) * history + rho * probe
    rho = torch.add(probe, history).add_(eps)
    torch.div(probe, rho, out=rho)
    fused = torch.rsub(rho, 1.0).mul_(history)
    return fused.add_(rho.mul_(probe))


def fixed_ratio_fusion(probe: torch.Tensor, history: torch.Tensor, weight: float) -> torch.Tensor:
    """``F = (1 - q) * Hist + q * P`` with a fixed ``q``, per entry."""
    return torch.lerp(history, probe, weight)


def sum_valid_positions(values: torch.Tensor, position_valid: torch.Tensor | None) -> torch.Tensor:
    """Sum rows of (n_pos, C) ``values`` over the valid positions."""
    if position_valid is None:
        return values.sum(dim=0)
    return (values * position_valid[:, None].to(values.dtype)).sum(dim=0)


STATISTICS: tuple[str, ...] = ("sq_mean", "variance", "fluctuation")


def history_statistic(history: BlockHistory, seq_len: int, statistic: str) -> torch.Tensor:
    """Per-position history rows (seq_len, C) of ``sq_mean`` or of the variance ``E[X^2] - E[X]^2``.

    ``fluctuation`` is not a per-position statistic; see :func:`all_position_fluctuation`.
    """
    rows = history.sq_mean[:seq_len]
    if statistic == "sq_mean":
        return rows
    if statistic == "variance":
        if history.mean is None:
            raise ValueError("the variance statistic needs the calibration mean of X; this history has none")
        return (rows - history.mean[:seq_len].square()).clamp(min=0.0)
    if statistic == "fluctuation":
        raise ValueError("the fluctuation statistic spans all positions; use all_position_fluctuation")
    raise ValueError(f"unknown history statistic {statistic!r}; expected one of {', '.join(STATISTICS)}")


def all_position_fluctuation(
    history: BlockHistory, seq_len: int, position_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """FLAP's fluctuation (C,): the sample variance of each channel over every (sample, position)
    pair of the calibration, around the channel's single mean over all of them.

    Every position holds the same number of samples ``n`` (``history.samples``), so with the
    per-position means ``m1[t] = E_n[X]`` and ``m2[t] = E_n[X^2]`` the all-position moments are
    ``E[X] = mean_t m1[t]`` and ``E[X^2] = mean_t m2[t]`` over the ``P`` positions used (the first
    ``seq_len``, real ones only when ``position_valid`` is given), and the unbiased variance over the
    ``N = n * P`` values is ``(E[X^2] - E[X]^2) * N / (N - 1)`` (float64; clamped at 0). Without a
    sample count (``samples`` 0) the factor ``N / (N - 1)`` is left out.
    """
    if history.mean is None:
        raise ValueError("the fluctuation statistic needs the calibration mean of X; this history has none")
    m2 = history.sq_mean[:seq_len].to(torch.float64)
    m1 = history.mean[:seq_len].to(torch.float64)
    if position_valid is not None:
        weights = position_valid[: m2.shape[0]].to(torch.float64)
    else:
        weights = torch.ones(m2.shape[0], dtype=torch.float64, device=m2.device)
    positions = weights.sum().clamp(min=1.0)
    e1 = (m1 * weights[:, None]).sum(dim=0) / positions
    e2 = (m2 * weights[:, None]).sum(dim=0) / positions
    variance = (e2 - e1.square()).clamp(min=0.0)
    count = float(history.samples) * float(positions)
    if count > 1:
        variance = variance * (count / (count - 1.0))
    return variance.to(torch.float32)


def history_activation(ctx: BlockContext, history: BlockHistory, statistic: str = "sq_mean") -> torch.Tensor:
    """``a_c`` from history alone: the sum over this batch's real positions of the statistic (or,
    for ``fluctuation``, the all-position variance over them; for a per-channel calibration statistic
    such as ``taylor:first:element``, the statistic itself, which has no positions)."""
    if statistic in history.channel_stats:
        return history.channel_stats[statistic]
    if statistic.startswith("taylor:"):
        raise ValueError(
            f"the {statistic!r} statistic comes from the Taylor gradient pass, which this history lacks; "
            "build the pipeline with ppframework.build_pipeline (it runs the pass when a method scores "
            "with 'taylor') or use a calibration_history() of a run config with such a method"
        )
    if statistic.startswith("flap-ppcode:"):
        raise ValueError(
            f"the {statistic!r} statistic comes from the PP code's FLAP calibration pass, which this "
            "history lacks; build the pipeline with ppframework.build_pipeline (it runs the pass when a "
            "method scores with 'flap-ppcode') or use a calibration_history() of a run config with such a "
            "method"
        )
    if statistic == "fluctuation":
        return all_position_fluctuation(history, ctx.seq_len, ctx.position_valid)
    return sum_valid_positions(history_statistic(history, ctx.seq_len, statistic), ctx.position_valid)


def channel_mean(ctx: BlockContext, history: BlockHistory) -> torch.Tensor:
    """Mean input of each channel over this batch's real positions (for bias compensation)."""
    if history.mean is None:
        raise ValueError("bias compensation needs the calibration mean of X; this history has none")
    rows = history.mean[: ctx.seq_len]
    if ctx.position_valid is None:
        return rows.mean(dim=0)
    valid = ctx.position_valid[: rows.shape[0]].to(rows.dtype)
    return (rows * valid[:, None]).sum(dim=0) / valid.sum().clamp(min=1.0)


def _statistic(scores: ChannelScores) -> str:
    """The history statistic ``a_c`` is made of: centred ``sq_mean`` scores are the variance."""
    return "variance" if scores.centered and scores.statistic == "sq_mean" else scores.statistic


def _require_sq_mean(scores: ChannelScores, strategy: str) -> None:
    if scores.statistic != "sq_mean":
        raise ValueError(
            f"fusion {strategy!r} fuses probe evidence (mean of X^2) but metric {scores.metric!r} scores "
            f"the {scores.statistic!r} statistic; use fuse_history 'history-only' with select_probe 'none'"
        )


def centred_rows(
    rows: torch.Tensor, history: BlockHistory | None, positions: torch.Tensor | None
) -> torch.Tensor:
    """``rows[t, c] - m[t, c]^2`` (clamped at 0): mean-of-squares rows around the calibration mean
    ``m`` at ``positions`` (None: the first ``len(rows)`` positions)."""
    if history is None or history.mean is None:
        raise ValueError("centred scores need the calibration mean of X; set history.init 'calibration'")
    means = history.mean[: rows.shape[0]] if positions is None else history.mean.index_select(0, positions)
    return (rows - means.square()).clamp(min=0.0)


def _sum_probed(
    rows: torch.Tensor, scores: ChannelScores, history: BlockHistory | None, valid: torch.Tensor | None
) -> torch.Tensor:
    """(C,) ``a_c`` of the probed positions: the (fused) rows, centred when the scores ask, summed over
    the ``valid`` ones."""
    if scores.centered:
        rows = centred_rows(rows, history, scores.positions)
    return sum_valid_positions(rows, valid)


def unprobed_history(
    ctx: BlockContext, history: BlockHistory, positions: torch.Tensor, centred: bool
) -> torch.Tensor:
    """(C,) sum of the history statistic over this batch's real positions that the probe missed."""
    rows = history.sq_mean[: ctx.seq_len]
    if centred:
        rows = centred_rows(rows, history, None)
    missed = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
    missed[positions] = False
    if ctx.position_valid is not None:
        missed &= ctx.position_valid[: rows.shape[0]]
    return sum_valid_positions(rows, missed)


def _attach_compensation(ctx: BlockContext, scores: ChannelScores, history: BlockHistory | None) -> None:
    if not scores.bias_compensation or scores.channel_mean is not None:
        return  # off, or the scoring stage set the means (e.g. from the probe)
    if history is None:
        raise ValueError(
            f"metric {scores.metric!r} asks for bias compensation, which needs a calibration history"
        )
    named = history.channel_stats.get(f"{scores.statistic}:mean")  # a statistic's own means (flap-ppcode)
    scores.channel_mean = named if named is not None else channel_mean(ctx, history)


class _Parametrised:
    """A fusion strategy built from its ``Params`` model (defaults when none is given)."""

    Params: type[BaseModel]

    def __init__(self, params: BaseModel | None = None) -> None:
        self.params = params or self.Params()


def _from_history(ctx: BlockContext, scores: ChannelScores, history: BlockHistory | None) -> ChannelScores:
    """``a_c`` from the history alone, over the batch's real positions (left unset without a history)."""
    if history is not None:
        scores.activation = history_activation(ctx, history, _statistic(scores))
    return scores


class FusionParams(BaseModel):
    """Numerical guard of the importance-scaled fusion, and what the positions the probe missed add."""

    model_config = ConfigDict(extra="forbid")

    eps: float = Field(1e-6, gt=0.0)
    unprobed: Literal["skip", "history"] = Field(
        "skip",
        description="skip: a_c sums the fused probed positions only (PP); history: the history of the "
        "batch's other real positions is added, so a_c covers every position",
    )


class ImportanceScaledFusion(_Parametrised):
    """Importance-scaled fusion (PP) per probed position; probe-only without history,
    history-only without probe."""

    stage = "fuse_history"
    name = "importance-scaled"
    Params = FusionParams
    params: FusionParams

    @hookimpl
    def fuse_history(
        self, ctx: BlockContext, scores: ChannelScores, history: BlockHistory | None
    ) -> ChannelScores:
        _attach_compensation(ctx, scores, history)
        if scores.evidence is None:
            return _from_history(ctx, scores, history)
        _require_sq_mean(scores, self.name)
        evidence = scores.evidence
        if history is not None:
            past = history.sq_mean.index_select(0, scores.positions)
            evidence = importance_scaled_fusion(evidence, past, self.params.eps)
        scores.activation = _sum_probed(evidence, scores, history, scores.position_valid)
        if self.params.unprobed == "history" and history is not None:
            scores.activation = scores.activation + unprobed_history(
                ctx, history, scores.positions, scores.centered
            )
        return scores


class ProbeOnlyFusion:
    """No fusion (PP without history, full-batch probing): ``a_c = sum_t P[t, c]``."""

    stage = "fuse_history"
    name = "none"

    @hookimpl
    def fuse_history(
        self, ctx: BlockContext, scores: ChannelScores, history: BlockHistory | None
    ) -> ChannelScores:
        _attach_compensation(ctx, scores, history)
        if scores.evidence is None:
            return scores  # weight-only metrics need nothing; activation metrics fail when combining
        _require_sq_mean(scores, self.name)
        scores.activation = _sum_probed(scores.evidence, scores, history, scores.position_valid)
        return scores


class HistoryOnlyFusion:
    """History only (ablation and static methods): ``a_c = sum_t Hist[t, c]`` over the batch's real
    positions; the probe's evidence, if any, is ignored. Without history ``a_c`` stays unset."""

    stage = "fuse_history"
    name = "history-only"

    @hookimpl
    def fuse_history(
        self, ctx: BlockContext, scores: ChannelScores, history: BlockHistory | None
    ) -> ChannelScores:
        _attach_compensation(ctx, scores, history)
        return _from_history(ctx, scores, history)


class FixedFusionParams(BaseModel):
    """The fixed weight of the probe in the fixed-ratio fusion."""

    model_config = ConfigDict(extra="forbid")

    probe_weight: float = Field(
        0.5, ge=0.0, le=1.0, description="q in F = (1 - q) * Hist + q * P (paper's fixed-ratio ablation)"
    )


class FixedFusion(_Parametrised):
    """Fixed-ratio fusion (ablation): ``F = (1 - q) * Hist + q * P`` per probed position."""

    stage = "fuse_history"
    name = "fixed"
    Params = FixedFusionParams
    params: FixedFusionParams

    @hookimpl
    def fuse_history(
        self, ctx: BlockContext, scores: ChannelScores, history: BlockHistory | None
    ) -> ChannelScores:
        if scores.evidence is None or history is None:
            raise ValueError(
                "fixed-ratio fusion needs both a probe (select_probe other than 'none') and a history "
                "(history.init 'calibration')"
            )
        _require_sq_mean(scores, self.name)
        _attach_compensation(ctx, scores, history)
        past = history.sq_mean.index_select(0, scores.positions)
        fused = fixed_ratio_fusion(scores.evidence, past, self.params.probe_weight)
        scores.activation = _sum_probed(fused, scores, history, scores.position_valid)
        return scores


def completion_fusion(
    evidence: torch.Tensor,
    history_rows: torch.Tensor,
    evidence_rows: torch.Tensor,
    batch_rows: torch.Tensor,
    probe_row_weight: float = 1.0,
) -> torch.Tensor:
    """Per probed position, the batch's mean of ``X^2`` with the unprobed rows predicted by history:
    ``F[t] = (w n_t P[t] + (R_t - w n_t) Hist[t]) / R_t`` with ``n_t`` probe rows out of ``R_t`` real
    rows and ``w`` the batch rows each probe row stands for (``w n_t`` capped at ``R_t``)."""
    rows = batch_rows.to(evidence.dtype).clamp(min=1.0)
    share = (evidence_rows.to(evidence.dtype) * probe_row_weight / rows).clamp(max=1.0)[:, None]
    return history_rows + share * (evidence - history_rows)


class CompletionFusionParams(BaseModel):
    """How much each probe row counts in the completion fusion."""

    model_config = ConfigDict(extra="forbid")

    probe_row_weight: float = Field(
        1.0,
        gt=0.0,
        description="batch rows each probe row stands for (1: the probe rows are a sample of the batch and "
        "the history predicts the other rows, an unbiased estimate of the full-batch statistic)",
    )


class CompletionFusion(_Parametrised):
    """Batch completion (a Beyond-PP option, not PP's fusion): estimate the full batch's ``a_c``.

    Full-batch probing scores ``a_c = sum_t mean_b X[b, t, c]^2`` over every row and position. The
    probe observes ``n_t`` of the ``R_t`` real rows at its positions; the history predicts the rest.
    So ``a_c = sum_{t real} F[t, c]`` with ``F[t] = (n_t P[t] + (R_t - n_t) Hist[t]) / R_t`` at probed
    positions and ``F[t] = Hist[t]`` elsewhere: each source weighs what it stands for, where PP's
    importance scaling weighs by magnitude (``rho = P / (P + Hist)``) and ignores unprobed positions.
    Without a probe it is history-only; without history, probe-only.
    """

    stage = "fuse_history"
    name = "completion"
    Params = CompletionFusionParams
    params: CompletionFusionParams

    @hookimpl
    def fuse_history(
        self, ctx: BlockContext, scores: ChannelScores, history: BlockHistory | None
    ) -> ChannelScores:
        _attach_compensation(ctx, scores, history)
        if history is None:
            return ProbeOnlyFusion().fuse_history(ctx=ctx, scores=scores, history=None)
        if scores.evidence is None:
            return _from_history(ctx, scores, history)
        _require_sq_mean(scores, self.name)
        positions = scores.positions
        past = history.sq_mean.index_select(0, positions)
        counts = scores.evidence_rows
        if counts is None:
            counts = torch.ones(positions.shape[0], dtype=torch.float32, device=positions.device)
        if ctx.rows_per_position is not None:
            batch_rows = ctx.rows_per_position.index_select(0, positions)
        else:
            batch_rows = counts.new_full(counts.shape, float(max(int(counts.max()), 1)))
        fused = completion_fusion(scores.evidence, past, counts, batch_rows, self.params.probe_row_weight)
        # a probed position no probe row was real at is all history (share 0), but still counts
        real = None if ctx.position_valid is None else ctx.position_valid.index_select(0, positions)
        scores.activation = _sum_probed(fused, scores, history, real) + unprobed_history(
            ctx, history, positions, scores.centered
        )
        return scores
