"""``score_channels`` strategies: probe evidence per position and the metric's weight term."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ppframework.hookspecs import hookimpl
from ppframework.strategies.griffin import normalized_sq_evidence
from ppframework.strategies.output_aware import fold_gain
from ppframework.strategies.weight_cache import WeightTermCache
from ppframework.types import BlockContext, BlockKind, ChannelScores, Probe


def probe_evidence(
    states: torch.Tensor, valid: torch.Tensor, all_real: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``P[t, c]`` = mean over real probe rows of ``states[b, t, c]^2`` (fp32).

    Returns (P of shape (k_T, C), position_valid of shape (k_T,)). Positions where no probe row
    is real text get 0 and ``position_valid`` False. ``all_real`` (the batch has no padding, known
    once per batch) skips masking entries that are all real anyway; the values are the same.
    """
    if all_real:
        rows, positions = valid.shape
        counts = torch.full((positions,), float(rows), dtype=torch.float32, device=states.device)
        sums = states.float().square().sum(dim=0)
        return sums.div_(counts[:, None]), torch.ones(positions, dtype=torch.bool, device=states.device)
    counts = valid.to(torch.float32).sum(dim=0)
    sums = states.float().square().masked_fill(~valid[:, :, None], 0.0).sum(dim=0)
    return sums / counts.clamp(min=1.0)[:, None], counts > 0


def row_balanced_probe_evidence(
    states: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``P[t, c]`` = ``sum_b w_b * valid[b, t] * states[b, t, c]^2 / sum_b w_b``, ``w_b = 1 / L_b`` (fp32).

    ``L_b`` is probe row ``b``'s number of real tokens. Summed over the positions, every row with a real
    token then weighs the same, its own mean square over its tokens (:func:`probe_evidence` weighs every
    real token the same, so a long row outweighs a short one). A position's evidence shrinks with the
    weighted share of the rows real there. Rows of one length: :func:`probe_evidence` exactly in value;
    one row: the same. Same shapes and conventions as :func:`probe_evidence`."""
    lengths = valid.sum(dim=1).to(torch.float32)
    weights = torch.where(lengths > 0, 1.0 / lengths.clamp(min=1.0), torch.zeros_like(lengths))
    entry_weights = valid.to(torch.float32) * weights[:, None]
    sums = (states.float().square() * entry_weights[:, :, None]).sum(dim=0)
    return sums / weights.sum().clamp(min=torch.finfo(torch.float32).tiny), valid.any(dim=0)


def token_normalized_probe_evidence(
    states: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``P[t, c]`` = mean over real probe rows of ``(states[b, t, c] / ||states[b, t, :]||_2)^2`` (fp32).

    Every real token's activation vector is divided by its L2 norm over the channels before
    squaring (GRIFFIN's normalisation), so each token weighs the same whatever its scale; a real
    token whose vector is all zero contributes 0. Same shapes and conventions as
    :func:`probe_evidence`."""
    sums, position_valid = normalized_sq_evidence(states, valid)
    counts = valid.to(torch.float32).sum(dim=0)
    return sums / counts.clamp(min=1.0)[:, None], position_valid


def probe_mean(states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(C,) mean of ``states[b, t, c]`` over the real probe entries (fp32; 0 when none is real)."""
    kept = states.float().masked_fill(~valid[:, :, None], 0.0).sum(dim=(0, 1))
    return kept / valid.sum().clamp(min=1).to(torch.float32)


def ppsp_weight_term(weight: torch.Tensor) -> torch.Tensor:
    """``sqrt(sum_i W[i, c]^4)`` per input channel ``c`` of the output projection (fp32)."""
    return weight.float().pow(4).sum(dim=0).sqrt()


def magnitude_weight_term(weight: torch.Tensor) -> torch.Tensor:
    """``sum_i |W[i, c]|`` per input channel ``c`` (fp32)."""
    return weight.float().abs().sum(dim=0)


def squared_weight_term(weight: torch.Tensor) -> torch.Tensor:
    """``sum_i W[i, c]^2`` per input channel ``c`` (fp32; FLAP's weight factor)."""
    return weight.float().square().sum(dim=0)


def activation_times_weight(activation: torch.Tensor | None, weight_term: torch.Tensor) -> torch.Tensor:
    """PPsp: ``S_c = a_c * sqrt(sum_i W[i, c]^4)``."""
    if activation is None:
        raise ValueError("PPsp needs an activation importance; the fusion stage produced none")
    return activation * weight_term


def sqrt_activation_times_weight(activation: torch.Tensor | None, weight_term: torch.Tensor) -> torch.Tensor:
    """Wanda-sp: ``S_c = sum_i |W[i, c]| * sqrt(a_c)`` (``sqrt(a_c)`` is the input's L2 norm)."""
    if activation is None:
        raise ValueError("Wanda-sp needs an activation importance; the fusion stage produced none")
    return activation.clamp(min=0).sqrt() * weight_term


def fluctuation_times_weight(activation: torch.Tensor | None, weight_term: torch.Tensor) -> torch.Tensor:
    """FLAP: ``S_c = fluct_c * sum_i W[i, c]^2`` (``fluct_c`` arrives as the activation)."""
    if activation is None:
        raise ValueError("FLAP needs the calibration fluctuation; the fusion stage produced none")
    return activation * weight_term


def weight_only(activation: torch.Tensor | None, weight_term: torch.Tensor) -> torch.Tensor:
    """Weight-only metrics ignore activations."""
    return weight_term


class WeightMetricScore:
    """Base for metrics of the form ``combine(a_c, weight_term(W))``.

    Subclasses set ``name``, ``weight_term`` (a function of the output weight), ``combine``,
    ``head_reduce`` and ``statistic`` (which history statistic the activation is made of);
    probe evidence is attached whenever there is a probe. With ``output_gain`` the weight term is
    taken of ``diag(g) W``, ``g`` the block's output gain (``ctx.output_gain``; the plain term where
    the adapter reports none), :mod:`ppframework.strategies.output_aware`. With ``bias_compensation``
    the fusion stage attaches the calibration means of the channels, or, with ``compensation_mean``
    ``probe``, the probe's means are attached here. With ``token_norm`` the probe evidence is of
    per-token L2-normalised activations (:func:`token_normalized_probe_evidence`); with ``row_balance``
    every probe row weighs the same in it (:func:`row_balanced_probe_evidence`).
    """

    stage = "score_channels"
    name = ""
    head_reduce = "l2"
    statistic = "sq_mean"
    bias_compensation = False
    compensation_mean = "calibration"
    output_gain = False
    token_norm = False
    row_balance = False

    def __init__(self) -> None:
        self._terms = WeightTermCache()

    @staticmethod
    def weight_term(weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def combine(activation: torch.Tensor | None, weight_term: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @hookimpl
    def score_channels(
        self, ctx: BlockContext, probe: Probe | None, probe_states: torch.Tensor | None, weight: torch.Tensor
    ) -> ChannelScores:
        gain = ctx.output_gain if self.output_gain else None
        term = self.weight_term if gain is None else (lambda w: self.weight_term(fold_gain(w, gain)))
        scores = ChannelScores(
            weight_term=self._terms.get(weight, term),
            combine=self.combine,
            head_reduce=self.head_reduce,
            metric=self.name,
            statistic=self.statistic,
            bias_compensation=self.bias_compensation,
            out_weight=weight,
        )
        if probe is not None and probe_states is not None:
            all_real = ctx.has_padding is False
            if self.token_norm:
                evidence = token_normalized_probe_evidence(probe_states, probe.valid)
            elif self.row_balance:
                evidence = row_balanced_probe_evidence(probe_states, probe.valid)
            else:
                evidence = probe_evidence(probe_states, probe.valid, all_real)
            scores.evidence, scores.position_valid = evidence
            scores.positions = probe.token_index
            if all_real:
                rows, positions = probe.valid.shape
                scores.evidence_rows = torch.full(
                    (positions,), rows, dtype=torch.long, device=probe.valid.device
                )
            else:
                scores.evidence_rows = probe.valid.sum(dim=0)
            if self.bias_compensation and self.compensation_mean == "probe":
                scores.channel_mean = probe_mean(probe_states, probe.valid)
        return scores


class CompensationParams(BaseModel):
    """FLAP's bias compensation as an option of a dynamic metric (off by default)."""

    model_config = ConfigDict(extra="forbid")

    bias_compensation: bool = Field(
        False,
        description="add the pruned channels' calibration mean contribution W[:, pruned] @ mean[pruned] "
        "back to the block output, as FLAP does statically (needs history.init 'calibration')",
    )
    compensation_mean: Literal["calibration", "probe"] = Field(
        "calibration",
        description="where bias compensation's channel means come from: the calibration history (FLAP) or "
        "this batch's probe (the mean of each channel over the probe's real tokens, so the text being "
        "pruned for, not the calibration text, sets them; without a probe the calibration's)",
    )


class PPspParams(CompensationParams):
    """PPsp options beyond the paper (every default is the paper's PPsp)."""

    row_reduce: Literal["l2", "l1"] = Field(
        "l2",
        description="how a channel's per-weight scores a_c * W[i, c]^2 combine over output rows: l2 "
        "(the paper: a_c * sqrt(sum_i W^4)) or l1 (a_c * sum_i W^2, the expected squared change of the "
        "output when the channel alone is removed)",
    )
    head_reduce: Literal["l2", "sum"] = Field(
        "l2",
        description="how a head's channel scores make its score: l2 (the paper) or sum (with row_reduce "
        "l1, the head's expected squared output change, cross-channel terms aside)",
    )
    output_gain: bool = Field(
        False,
        description="fold the block's output gain (Gemma 3's post-norm weights; identity elsewhere) into "
        "the weight term: a_c * sqrt(sum_i (g_i W[i, c])^4) (with row_reduce l1: sum_i (g_i W[i, c])^2)",
    )
    centered: bool = Field(
        False,
        description="score the activation around its calibration mean, a_c = sum_t (F[t, c] - m[t, c]^2) "
        "(the part bias compensation cannot restore); needs bias_compensation",
    )

    token_norm: bool = Field(
        False,
        description="divide each probe token's activation vector by its L2 norm over the channels before "
        "squaring (GRIFFIN's normalisation: every token weighs the same, whatever its scale); the evidence "
        "is then not in the calibration history's units, so it needs fuse_history 'none'",
    )

    row_balance: bool = Field(
        False,
        description="when one decision pools several probe rows (decision: batch over prompts of different "
        "lengths), every row weighs the same in a channel's evidence (its mean square over its own real "
        "tokens) instead of every real token: a long prompt no longer outweighs a short one, and a position "
        "few rows reach carries less evidence, so the history weighs more there. Rows of one length and "
        "single rows: unchanged",
    )

    @model_validator(mode="after")
    def _centered_needs_compensation(self) -> PPspParams:
        if self.centered and not self.bias_compensation:
            raise ValueError(
                "centered scores only the part of a channel that bias compensation cannot restore; set "
                "bias_compensation: true as well, or centered: false"
            )
        if self.centered and self.token_norm:
            raise ValueError(
                "centered subtracts the calibration mean of X, which is not in the units of token_norm's "
                "normalised evidence; set centered: false or token_norm: false"
            )
        if self.row_balance and self.token_norm:
            raise ValueError(
                "row_balance and token_norm are two ways of weighing the probe's tokens and are not "
                "combined; set one of them to false"
            )
        return self


class PPspScore(WeightMetricScore):
    """PPsp (PP): probe evidence per position; score a_c * sqrt(sum_i W^4), heads by L2.

    Options (:class:`PPspParams`, off by default, so the default is the paper's PPsp): an L1 row
    reduction (``a_c * sum_i W^2``), FLAP-style bias compensation from the calibration mean,
    centred activations that score only what compensation cannot restore, the block's output
    gain folded into the weight term (:mod:`ppframework.strategies.output_aware`), probe
    evidence of per-token normalised activations (``token_norm``, GRIFFIN's normalisation), and
    pooled evidence in which every probe row weighs the same (``row_balance``).
    """

    name = "ppsp"
    head_reduce = "l2"
    Params = PPspParams
    weight_term = staticmethod(ppsp_weight_term)
    combine = staticmethod(activation_times_weight)

    def __init__(self, params: PPspParams | None = None) -> None:
        super().__init__()
        self.params = params or PPspParams()
        if self.params.row_reduce == "l1":
            self.weight_term = squared_weight_term  # type: ignore[method-assign]  # rows summed (L1)
        self.head_reduce = self.params.head_reduce
        self.bias_compensation = self.params.bias_compensation
        self.compensation_mean = self.params.compensation_mean
        self.output_gain = self.params.output_gain
        self.token_norm = self.params.token_norm
        self.row_balance = self.params.row_balance

    @hookimpl
    def score_channels(
        self, ctx: BlockContext, probe: Probe | None, probe_states: torch.Tensor | None, weight: torch.Tensor
    ) -> ChannelScores:
        scores = super().score_channels(ctx=ctx, probe=probe, probe_states=probe_states, weight=weight)
        scores.centered = self.params.centered
        return scores


class MagnitudeScore(WeightMetricScore):
    """Weight magnitude: S_c = sum_i |W[i, c]|, no activations; heads by sum (static)."""

    name = "magnitude"
    head_reduce = "sum"
    weight_term = staticmethod(magnitude_weight_term)
    combine = staticmethod(weight_only)


class WandaSpScore(WeightMetricScore):
    """Wanda-sp (static baseline): S_c = sum_i |W[i, c]| * sqrt(a_c); heads by sum."""

    name = "wanda-sp"
    head_reduce = "sum"
    weight_term = staticmethod(magnitude_weight_term)
    combine = staticmethod(sqrt_activation_times_weight)


class FlapParams(BaseModel):
    """FLAP options."""

    model_config = ConfigDict(extra="forbid")

    bias_compensation: bool = Field(
        False, description="add W[:, pruned] @ mean_input[pruned] to the block output (FLAP's compensation)"
    )
    fluctuation: Literal["all-positions", "per-position"] = Field(
        "all-positions",
        description="all-positions: the sample variance of the channel over every calibration token "
        "around its single mean (FLAP's fluc_inp); per-position: the variance at each position around "
        "that position's mean, summed over positions (this project's earlier definition)",
    )
    square_attention: bool = Field(
        False,
        description="square the attention channel scores before heads are formed (FLAP's own code does; "
        "the PP paper's FLAP does not)",
    )


def squared_fluctuation_times_weight(
    activation: torch.Tensor | None, weight_term: torch.Tensor
) -> torch.Tensor:
    """FLAP's attention score in its own code: ``(fluct_c * sum_i W[i, c]^2)^2``."""
    return fluctuation_times_weight(activation, weight_term).square()


class FlapScore(WeightMetricScore):
    """FLAP (static baseline): fluctuation x squared weight norm, S_c = fluct_c * sum_i W[i, c]^2.

    ``fluct_c`` is, by default, the calibration's sample variance of the channel's input over every
    position of every sample (``statistic = "fluctuation"``, FLAP's ``fluc_inp``); with
    ``fluctuation: per-position`` it is the per-position variance summed over positions
    (``statistic = "variance"``). Heads by sum (with ``square_attention`` of the squared channel
    scores, as FLAP's code). With ``bias_compensation`` the pruned channels' mean contribution is
    added back as a bias.
    """

    name = "flap"
    head_reduce = "sum"
    statistic = "fluctuation"
    Params = FlapParams
    weight_term = staticmethod(squared_weight_term)
    combine = staticmethod(fluctuation_times_weight)

    def __init__(self, params: FlapParams | None = None) -> None:
        super().__init__()
        self.params = params or FlapParams()
        self.bias_compensation = self.params.bias_compensation
        self.statistic = "fluctuation" if self.params.fluctuation == "all-positions" else "variance"

    @hookimpl
    def score_channels(
        self, ctx: BlockContext, probe: Probe | None, probe_states: torch.Tensor | None, weight: torch.Tensor
    ) -> ChannelScores:
        scores = super().score_channels(ctx=ctx, probe=probe, probe_states=probe_states, weight=weight)
        if self.params.square_attention and ctx.kind is BlockKind.ATTENTION:
            scores.combine = squared_fluctuation_times_weight
        return scores
