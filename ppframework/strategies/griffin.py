"""GRIFFIN (Dong et al., 2024, arXiv 2404.01365) as a ``score_channels`` strategy.

GRIFFIN ("Prompt-prompted Adaptive Structured Pruning for Efficient LLM Generation") keeps, for
the whole generation, the feed-forward neurons that the prompt activates most, measured after
normalising each prompt token's activation vector. Its reference code is
``github.com/hdong920/GRIFFIN`` (read at commit ``48dc8ec``); line numbers below are of that commit.

What the code does (LLaMA, ``src/griffin/llama.py``, ``LlamaMLP.forward``, ``mode == 'gen'``):

* **Which tensor.** On the prompt (``x.shape[1] > 1``, L82) the MLP computes the intermediate
  states ``z = act(gate_proj(x)) * up_proj(x)`` (L83), the input of ``down_proj``, and runs the
  *full* MLP on them (``down_proj(z)``, L92): the prompt is never pruned.
* **Statistic.** ``neuron_stat = (z / z.norm(dim=-1).unsqueeze(-1)).norm(dim=1)`` (L88): each
  token's vector is divided by its L2 norm over the channel dimension (``dim=-1``, the
  intermediate size), then the L2 norm is taken over the sequence dimension (``dim=1``, every
  prompt token). So ``s_c = sqrt(sum_t (z[t, c] / ||z[t, :]||_2)^2)``, shape (B, D_ff). There is no
  epsilon: an all-zero token vector gives NaN. The model runs in fp16 (``model.half()``,
  ``src/eval_gen.py`` L130), so the statistic is computed in fp16.
* **k.** ``k = int(D_ff * k_factor)`` (L87), ``k_factor`` being the *density* (fraction kept),
  ``--density`` default 0.5 (``src/eval_gen.py`` L87), the same for every layer
  (``schedule_k``, ``src/eval_gen.py`` L121); no rounding of the width.
* **Selection.** ``select_neurons(neuron_stat, 'topk', k)`` (L89; ``src/griffin/utils.py``:
  ``torch.topk(neuron_stat, k, dim=-1)``) is per row of the batch, but ``prepare_reduced_weights``
  asserts batch size 1 (L50) and slices ``gate_proj``/``up_proj`` rows and ``down_proj`` columns
  to those experts (L52-L59). ``topk`` is the default ``--selection_method`` (``src/eval_gen.py``
  L88); ``topk_sample``, ``sample``, ``random`` and the static ``magnitude`` are other options.
* **Decode.** Every later step (``x.shape[1] == 1``, L94-L98) runs on the reduced weights: the
  experts chosen at the prompt serve the whole generation. Attention is never pruned; every
  decoder layer's MLP is (``get_llama_griffin``, L8-L30; no skipped layers).
* The ``mode == 'class'`` branch (L100-L116, used for classification tasks) takes the statistic
  over every prompt token but the last (``[:, :-1]``, L105) and masks only the last token's
  MLP; this module follows the generation mode.

How it maps onto ppframework's stages (the ``griffin`` preset): ``prefill: dense`` (the prompt
runs the unpruned layers) and ``select_probe: full`` make the probe every real prompt token, whose
dense pre-output activations arrive here as ``probe_states``; this strategy's evidence per
position is ``E[t, c] = sum_b (z[b, t, c] / ||z[b, t, :]||_2)^2`` over the probe's real rows;
``fuse_history: none`` sums it over positions, ``a_c = sum_t E[t, c]``; ``combine`` returns
``sqrt(a_c) * 1`` (the weight term is all ones), which at batch size 1 *is* GRIFFIN's ``s_c``;
``apply_mask: structured`` keeps the top ``D_ff - floor(ratio * D_ff)`` channels (rounded up to
``round_to``); ``decode: frozen`` serves every decode step from that mask; ``decision: sequence``
lets every row of a batch decide alone, as GRIFFIN's batch size 1 does.

Differences from the reference code:

* Evidence rows are *summed* over the probe's real rows, not averaged (the PPsp evidence
  convention of :class:`~ppframework.types.ChannelScores`): when several rows decide together
  (``decision: batch``) every real token counts once, i.e. GRIFFIN's statistic of all the batch's
  real tokens taken as one prompt. With one row (GRIFFIN's setting) sum and mean coincide.
* A real token whose activation vector is all zero contributes 0 instead of making the statistic
  NaN; padding never contributes. The statistic is computed in float32, not the model's dtype.
* The kept width is ``D_ff - floor(ratio * D_ff)``, GRIFFIN's ``int(D_ff * density)`` rounded
  up instead of down when ``ratio * D_ff`` is not an integer (one channel more), and rounded up to
  ``pruning.round_to`` (the preset sets 1, as GRIFFIN does not round).
* GRIFFIN is defined for the MLP. On an attention block this strategy computes the same
  statistic over the output projection's input channels (all heads' values concatenated,
  normalised per token) and heads are ranked by the L2 norm of their channels' scores; that is an
  extension, not GRIFFIN (the preset prunes the MLP only).
* The statistic is of the *normalised* activation, so it must not be fused with a history of raw
  activations (``importance-scaled``, ``fixed``, ``completion``): use ``fuse_history: none`` and
  ``history.init: none``.
"""

from __future__ import annotations

import torch

from ppframework.hookspecs import hookimpl
from ppframework.types import BlockContext, ChannelScores, Probe


def normalized_sq_evidence(states: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GRIFFIN's per-position evidence of a probe's pre-output activations (float32).

    ``E[t, c] = sum_b (states[b, t, c] / ||states[b, t, :]||_2)^2`` over the rows ``b`` where
    ``valid[b, t]``; a real token whose vector is all zero contributes 0.

    Args:
        states: (k_B, k_T, C) the input of the output projection at the probe's rows and positions.
        valid: (k_B, k_T) True where the (row, position) pair is real text.

    Returns:
        (E of shape (k_T, C), position_valid of shape (k_T,)); ``position_valid`` is False (and the
        row of E 0) where no probe row is real text.
    """
    squares = states.float().square()
    norms_sq = squares.sum(dim=-1, keepdim=True)
    keep = valid[:, :, None] & (norms_sq > 0)
    inverse = torch.where(keep, norms_sq, torch.ones_like(norms_sq)).reciprocal()
    normalized = torch.where(keep, squares * inverse, torch.zeros_like(squares))
    return normalized.sum(dim=0), valid.any(dim=0)


def griffin_statistic(activation: torch.Tensor | None, weight_term: torch.Tensor) -> torch.Tensor:
    """GRIFFIN's neuron statistic ``s_c = sqrt(a_c)`` (times the all-ones weight term).

    ``a_c`` is the sum over the prompt's tokens of the squared normalised activations, so ``s_c``
    is their L2 norm over tokens, as ``src/griffin/llama.py`` L88 computes it.
    """
    if activation is None:
        raise ValueError(
            "GRIFFIN scores the prompt's activations; the fusion stage produced none (use select_probe "
            "'full' with fuse_history 'none')"
        )
    return activation.clamp(min=0).sqrt() * weight_term


class GriffinScore:
    """GRIFFIN (Dong et al., 2024): the L2 norm over prompt tokens of per-token L2-normalised activations.

    Evidence per probed position is the sum over real probe rows of ``(z / ||z||_2)^2`` (``z``
    the output projection's input, normalised over channels per token); with ``fuse_history:
    none`` the final score is ``sqrt(sum_t E[t, c])``, GRIFFIN's statistic at batch size 1. The
    weight term is all ones (GRIFFIN uses no weights). See the module docstring for the reference
    code and what differs.
    """

    stage = "score_channels"
    name = "griffin"
    head_reduce = "l2"

    @hookimpl
    def score_channels(
        self, ctx: BlockContext, probe: Probe | None, probe_states: torch.Tensor | None, weight: torch.Tensor
    ) -> ChannelScores:
        """GRIFFIN's evidence from the probe (every real prompt token under the ``griffin`` preset)."""
        scores = ChannelScores(
            weight_term=torch.ones(weight.shape[1], dtype=torch.float32, device=weight.device),
            combine=griffin_statistic,
            head_reduce=self.head_reduce,
            metric=self.name,
            statistic="sq_mean",
            out_weight=weight,
        )
        if probe is None or probe_states is None:
            raise ValueError(
                "GRIFFIN scores the prompt's activations and needs a probe; use select_probe 'full' "
                "(with prefill 'dense', every real prompt token)"
            )
        scores.evidence, scores.position_valid = normalized_sq_evidence(probe_states, probe.valid)
        scores.positions = probe.token_index
        scores.evidence_rows = probe.valid.sum(dim=0)
        return scores
