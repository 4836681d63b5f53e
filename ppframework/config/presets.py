"""The method presets (``pp``, ``pp-prompt``, ``griffin``, ``flap``, ``wanda-sp``, ``static-ppsp``, ...).

Each preset is a raw method dict (what a ``methods:`` entry would hold) that
:class:`~ppframework.config.MethodConfig` merges the user's settings onto. Most presets are PP with
some stages and the history replaced; :func:`_preset` fills in what they all share.
"""

from __future__ import annotations

import copy
from typing import Any


def pp_strategies() -> dict[str, Any]:
    """PP's strategy of each stage (the paper's defaults), a fresh dict on every call."""
    return {
        "allocate": {"name": "uniform"},
        "select_probe": {"name": "residual", "params": {"seq_ratio": 0.5, "batch_ratio": 0.05}},
        "score_channels": {"name": "ppsp"},
        "fuse_history": {"name": "importance-scaled"},
        "apply_mask": {"name": "structured"},
        "infer": {"name": "sliced"},
    }


def _strategies(**changes: Any) -> dict[str, Any]:
    """PP's strategies with some stages replaced (``select_probe="none"`` or a dict)."""
    strategies = pp_strategies()
    for stage, value in changes.items():
        strategies[stage] = {"name": value} if isinstance(value, str) else value
    return strategies


def _static(**changes: Any) -> dict[str, Any]:
    """A static method's strategies: no probe, scores from the history alone, other stages replaced."""
    return _strategies(select_probe="none", fuse_history="history-only", **changes)


PER_BLOCK_DEFAULTS: dict[str, dict[str, Any]] = {
    "attention": {"name": "wanda", "params": {"head_reduce": "l2", "output_gain": True}},
    "mlp": {"name": "ppsp", "params": {"output_gain": True}},
}
"""``per-block``'s default scorer of each block kind: Wanda's metric (L2 heads) for attention and PPsp for
the MLP, both with the block's output gain folded in (what the per-block diagnostic points to)."""

_BLOCKWISE = {"name": "per-block", "params": PER_BLOCK_DEFAULTS}

_COMPENSATED_WANDA_HEADS = {
    "name": "per-block",
    "params": {
        "attention": {"name": "wanda", "params": {"output_gain": True, "bias_compensation": True}},
        "mlp": {"name": "ppsp"},
    },
}
"""``pp-wanda-heads``' scorers: Wanda's metric for attention heads (heads by sum, output gain folded in)
with FLAP's bias compensation from the calibration means, and the paper's PPsp for the MLP."""

_COMPENSATED_PPSP_HEADS = {
    "name": "per-block",
    "params": {
        "attention": {"name": "ppsp", "params": {"output_gain": True, "bias_compensation": True}},
        "mlp": {"name": "ppsp"},
    },
}
"""``pp-comp-heads``' scorers: PPsp for attention heads with the block's output gain folded into its weight
term and FLAP's bias compensation from the calibration means, and the paper's PPsp for the MLP."""

_CALIBRATION_EMA = {"init": "calibration", "update": "ema", "momentum": 0.99}
_CALIBRATION_ONLY = {"init": "calibration", "update": "frozen"}
_NO_HISTORY = {"init": "none", "update": "frozen"}


def _preset(
    description: str,
    strategies: dict[str, Any],
    history: dict[str, Any],
    *,
    pruning: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One preset: PP's target ratio 0.4 unless ``pruning`` says otherwise, decode steps ``frozen``,
    then ``extra`` fields (``decision``, ``prefill``) in the order given."""
    return {
        "description": description,
        "pruning": {"ratio": 0.4} if pruning is None else pruning,
        "strategies": strategies,
        "history": history,
        "decode": "frozen",
        **extra,
    }


def _per_prompt(description: str, **strategy_changes: Any) -> dict[str, Any]:
    """A ``pp-prompt``-schedule preset: every prompt decides alone (``decision: sequence``) from its own
    dense prefill (``prefill: dense``, the ``full`` probe), fused with the calibration + EMA history;
    ``strategy_changes`` replace further stages (e.g. ``score_channels``)."""
    return _preset(
        description,
        _strategies(select_probe="full", **strategy_changes),
        _CALIBRATION_EMA,
        decision="sequence",
        prefill="dense",
    )


PRESETS: dict[str, dict[str, Any]] = {
    "pp": _preset(
        "Probe Pruning, paper defaults: residual probe (50% tokens, 5% sequences), "
        "calibration + EMA 0.99 history, importance-scaled fusion, PPsp, skip layers 0-2.",
        pp_strategies(),
        _CALIBRATION_EMA,
    ),
    "full-batch": _preset(
        "Full-batch probing (paper's oracle): the whole batch is the probe, no history, "
        "a_c = sum_t P[t, c], PPsp. Costs a second pass over the batch.",
        _strategies(select_probe="full", fuse_history="none"),
        _NO_HISTORY,
    ),
    "pp-prompt": _per_prompt(
        "Probe Pruning for generation (ours, not the paper's): every prompt decides alone "
        "(decision: sequence) from its own dense prefill (prefill: dense: the prompt's logits and key/value "
        "cache are the dense model's, and every real token of the prompt is the probe), fused with the "
        "calibration + EMA 0.99 history (importance-scaled), PPsp, skip layers 0-2; decode steps run on "
        "the masks decided. Prunes decode steps only: perplexity windows run dense.",
    ),
    "pp-prompt-batch": _preset(
        "pp-prompt deciding once per batch (ours, not the paper's): the batch's prompts run dense (prefill: "
        "dense) and every real token of every prompt is the probe of one decision for the whole batch "
        "(decision: batch), fused with the calibration + EMA 0.99 history (importance-scaled), PPsp, skip "
        "layers 0-2; decode steps run one set of kept weights, the static methods' path. At batch 1 it is "
        "pp-prompt. Prunes decode steps only: perplexity windows run dense.",
        _strategies(select_probe="full"),
        _CALIBRATION_EMA,
        prefill="dense",
    ),
    "no-history": _preset(
        "PP without history (ablation): residual probe, a_c = sum_t P[t, c], PPsp.",
        _strategies(fuse_history="none"),
        _NO_HISTORY,
    ),
    "history-only": _preset(
        "History only (ablation): no probe; a_c from calibration + EMA 0.99 history, the "
        "decision for batch n uses history up to batch n-1; PPsp.",
        _static(),
        _CALIBRATION_EMA,
    ),
    "random-probe": _preset(
        "Random probe (ablation): uniform random positions then sequences at PP's sizes; otherwise PP.",
        _strategies(select_probe={"name": "random", "params": {"seq_ratio": 0.5, "batch_ratio": 0.05}}),
        _CALIBRATION_EMA,
    ),
    "fixed-fusion": _preset(
        "Fixed-ratio fusion (ablation): F = (1-q) Hist + q P with q = 0.5 instead of "
        "importance scaling; otherwise PP.",
        _strategies(fuse_history={"name": "fixed", "params": {"probe_weight": 0.5}}),
        _CALIBRATION_EMA,
    ),
    "pp-gain": _preset(
        "PP with output-aware PPsp (ours, not the paper's): the block's output gain (Gemma 3's post-norm "
        "weights; an identity elsewhere, where it is pp) folded into the weight term, "
        "a_c * sqrt(sum_i (g_i W[i,c])^4); otherwise PP.",
        _strategies(score_channels={"name": "ppsp", "params": {"output_gain": True}}),
        _CALIBRATION_EMA,
    ),
    "pp-wanda": _preset(
        "Dynamic Wanda (ours, not the paper's): PP's probe, history and importance-scaled fusion with "
        "Wanda-sp's metric, S_c = sqrt(a_c) * sum_i |g_i W[i,c]| (g the block's output gain: Gemma 3's "
        "post-norm weights, an identity elsewhere), heads by sum.",
        _strategies(score_channels={"name": "wanda", "params": {"output_gain": True}}),
        _CALIBRATION_EMA,
    ),
    "pp-blockwise": _preset(
        "PP with a metric per block kind (ours, not the paper's): Wanda's metric "
        "sqrt(a_c) * sum_i |g_i W[i,c]| with L2 heads for attention, PPsp a_c * sqrt(sum_i (g_i W[i,c])^4) "
        "for the MLP (g the block's output gain: Gemma 3's post-norm weights, an identity elsewhere); "
        "otherwise PP (probe, history, fusion).",
        _strategies(score_channels=copy.deepcopy(_BLOCKWISE)),
        _CALIBRATION_EMA,
    ),
    "pp-wanda-heads": _preset(
        "PP with compensated Wanda heads (ours, not the paper's): attention heads chosen by Wanda's metric "
        "sqrt(a_c) * sum_i |g_i W[i,c]| (heads by sum; g the block's output gain: Gemma 3's post-norm "
        "weights, an identity elsewhere), the pruned heads' calibration-mean output added back as a bias "
        "(FLAP's compensation); MLP channels by the paper's PPsp; otherwise PP (probe, history, fusion).",
        _strategies(score_channels=copy.deepcopy(_COMPENSATED_WANDA_HEADS)),
        _CALIBRATION_EMA,
    ),
    "pp-comp-heads": _preset(
        "PP with compensated, output-aware PPsp heads (ours, not the paper's): attention heads by PPsp with "
        "the block's output gain folded into the weight term (Gemma 3's post-norm weights; an identity "
        "elsewhere), the pruned heads' calibration-mean output added back as a bias (FLAP's compensation); "
        "MLP channels by the paper's PPsp; otherwise PP (probe, history, fusion).",
        _strategies(score_channels=copy.deepcopy(_COMPENSATED_PPSP_HEADS)),
        _CALIBRATION_EMA,
    ),
    "pp-seq": _preset(
        "PP deciding per sequence (ours, not the paper's): every sequence of a batch decides alone "
        "(decision: sequence) from its own residual probe (50% of its tokens) fused with the calibration + "
        "EMA 0.99 history, as if the sequences came one at a time; PPsp, skip layers 0-2. At batch 1 it is "
        "pp; at batch B every row runs its pruned layers alone and pays its own probe.",
        pp_strategies(),
        _CALIBRATION_EMA,
        decision="sequence",
    ),
    "pp-wanda-heads-seq": _preset(
        "pp-wanda-heads deciding per sequence (ours, not the paper's): every sequence decides alone "
        "(decision: sequence) from its own residual probe and the history; attention heads by Wanda's "
        "metric (heads by sum, output gain folded in) with FLAP's bias compensation, MLP channels by PPsp.",
        _strategies(score_channels=copy.deepcopy(_COMPENSATED_WANDA_HEADS)),
        _CALIBRATION_EMA,
        decision="sequence",
    ),
    "pp-comp-heads-seq": _preset(
        "pp-comp-heads deciding per sequence (ours, not the paper's): every sequence decides alone "
        "(decision: sequence) from its own residual probe (50% of its tokens) and the history; attention "
        "heads by PPsp with the output gain folded in and FLAP's bias compensation, MLP channels by PPsp. "
        "Issue 29's single preset for SmolLM2 and Gemma 3 (docs/results.md); its probes cost about a "
        "quarter of the decoder's FLOPs.",
        _strategies(score_channels=copy.deepcopy(_COMPENSATED_PPSP_HEADS)),
        _CALIBRATION_EMA,
        decision="sequence",
    ),
    "pp-prompt-blockwise": _per_prompt(
        "pp-prompt with pp-blockwise's metrics (ours, not the paper's): every prompt decides alone from its "
        "own dense prefill, fused with the calibration + EMA 0.99 history; Wanda's metric with L2 heads for "
        "attention, PPsp for the MLP, output gains folded in; decode steps run on the masks decided.",
        score_channels=copy.deepcopy(_BLOCKWISE),
    ),
    "pp-prompt-wanda-heads": _per_prompt(
        "pp-prompt with pp-wanda-heads' metrics (ours, not the paper's): every prompt decides alone from its "
        "own dense prefill, fused with the calibration + EMA 0.99 history; attention heads by Wanda's metric "
        "(heads by sum, output gain folded in) with FLAP's bias compensation, MLP channels by PPsp; decode "
        "steps run on the masks decided.",
        score_channels=copy.deepcopy(_COMPENSATED_WANDA_HEADS),
    ),
    "static-ppsp": _preset(
        "Static PPsp: no probe, calibration history only (frozen), PPsp; decided once, "
        "sliced weights cached.",
        _static(),
        _CALIBRATION_ONLY,
    ),
    "wanda-sp": _preset(
        "Wanda-sp (static baseline): S_c = sum_i |W[i,c]| sqrt(a_c) from calibration, heads "
        "by sum; decided once, sliced weights cached.",
        _static(score_channels="wanda-sp"),
        _CALIBRATION_ONLY,
    ),
    "flap": _preset(
        "FLAP (static baseline) as the PP paper runs it: S_c = fluct_c * sum_i W[i,c]^2 with "
        "fluct_c the calibration variance of the channel over all positions, heads by sum, bias "
        "compensation, adaptive structure (scores standardised per block, one FLOPs-weighted global "
        "selection); decided once, sliced weights cached.",
        _static(
            allocate="adaptive",
            score_channels={"name": "flap", "params": {"bias_compensation": True}},
        ),
        _CALIBRATION_ONLY,
    ),
    "flap-uniform": _preset(
        "FLAP metric at a uniform per-layer ratio (ablation of FLAP's structure search): "
        "S_c = fluct_c * sum_i W[i,c]^2 with fluct_c the per-position variance summed over positions, "
        "heads by sum, bias compensation; decided once, sliced weights cached.",
        _static(
            score_channels={
                "name": "flap",
                "params": {"bias_compensation": True, "fluctuation": "per-position"},
            },
        ),
        _CALIBRATION_ONLY,
    ),
    "flap-ppcode": _preset(
        "FLAP as the Probe Pruning code computes it (the PP paper's FLAP numbers): S_c = fluc_c * "
        "sum_i W[i,c]^2 with the PP code's running statistics at the calibration batch size B (baseline "
        "= calibration mean / B, fluctuation around it), head sums clamped at the fp16 maximum 65504, bias "
        "compensation from that baseline, adaptive structure; decided once, sliced weights cached.",
        _static(
            allocate="adaptive",
            score_channels={"name": "flap-ppcode", "params": {"bias_compensation": True}},
        ),
        _CALIBRATION_ONLY,
    ),
    "magnitude": _preset(
        "Magnitude (static baseline): S_c = sum_i |W[i,c]|, weights only, heads by sum; "
        "decided once, sliced weights cached.",
        _static(score_channels="magnitude"),
        _NO_HISTORY,
    ),
    "taylor": _preset(
        "LLM-Pruner-style Taylor importance (static baseline, no LoRA recovery): one gradient pass of the "
        "LM loss over the calibration windows; a unit's score is the sum over its coupled weights (q rows + "
        "o columns of a head, gate/up rows + down column of a channel) of |w * dL/dw|; heads by sum; "
        "variants in strategies.score_channels.params (order first/second/mix, reduce element/vector); "
        "decided once, sliced weights cached.",
        _static(score_channels="taylor"),
        _CALIBRATION_ONLY,
    ),
    "shortgpt": _preset(
        "ShortGPT whole-layer removal (static baseline): the floor(ratio * L) decoder layers with the lowest "
        "block influence 1 - cos(input, output) over the calibration windows are removed (every layer may "
        "go; ratio = share of prunable weights removed); removed layers keep no key/value cache entry.",
        _static(allocate="block-influence"),
        _CALIBRATION_ONLY,
        pruning={"ratio": 0.4, "skip_layers": [], "inflate_ratio": False, "round_to": 1},
    ),
    "griffin": _preset(
        "GRIFFIN (Dong et al., 2024; baseline): the prompt runs dense; each MLP keeps, for "
        "every decode step, the channels with the largest L2 norm over the prompt's tokens of the per-token "
        "L2-normalised activations; every row decides alone, every layer pruned. Attention is not pruned: "
        "ratio is the fraction of MLP channels removed, so the model-wide realised ratio is smaller.",
        _strategies(select_probe="full", score_channels="griffin", fuse_history="none"),
        _NO_HISTORY,
        pruning={
            "ratio": 0.5,
            "targets": ["mlp"],
            "skip_layers": [],
            "inflate_ratio": False,
            "round_to": 1,
        },
        prefill="dense",
        decision="sequence",
    ),
    "dense": _preset(
        "No pruning (ratio 0): the pipeline does not touch the model.",
        pp_strategies(),
        _NO_HISTORY,
        pruning={"ratio": 0.0},
    ),
}
"""Every preset by name: a raw method dict with its ``description``."""
