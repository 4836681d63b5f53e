"""PPsp with per-token normalised probe evidence (``ppsp`` with ``params: {token_norm: true}``).

The reference is written from the definition: each real probe token's activation vector is divided
by its L2 norm over the channels, squared, averaged over the probe's real rows; the score is the sum
of that over positions times PPsp's weight term ``sqrt(sum_i W[i, c]^4)``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ppframework.config import MethodConfig
from ppframework.strategies.fusion import ProbeOnlyFusion
from ppframework.strategies.griffin import GriffinScore
from ppframework.strategies.scoring import PPspParams, PPspScore, token_normalized_probe_evidence
from ppframework.testing import check_strategy, make_context
from ppframework.types import BlockGeometry, BlockKind, Probe

TOKEN_NORM_PPSP = {"name": "ppsp", "params": {"token_norm": True}}


def mlp_context(channels: int, seq: int, position_valid: torch.Tensor | None = None):
    geometry = BlockGeometry(BlockKind.MLP, units=channels, unit_width=1)
    return make_context(BlockKind.MLP, geometry, seq_len=seq, position_valid=position_valid)


def final_scores(scorer, states: torch.Tensor, valid: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    rows, seq, channels = states.shape
    probe = Probe(batch_index=torch.arange(rows), token_index=torch.arange(seq), valid=valid)
    ctx = mlp_context(channels, seq, valid.any(dim=0))
    scores = scorer.score_channels(ctx=ctx, probe=probe, probe_states=states, weight=weight)
    return ProbeOnlyFusion().fuse_history(ctx=ctx, scores=scores, history=None).channel_scores()


def reference_scores(states: torch.Tensor, valid: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """By hand, float64: sum over positions of the mean over real rows of (z / ||z||)^2, times the
    PPsp weight term."""
    z = states.double()
    normalized = (z / z.norm(dim=-1, keepdim=True)).square() * valid[:, :, None]
    per_position = normalized.sum(dim=0) / valid.sum(dim=0).clamp(min=1)[:, None]
    return per_position.sum(dim=0) * weight.double().pow(4).sum(dim=0).sqrt()


def test_a_two_token_probe_by_hand():
    states = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])  # token norms 5 and 1
    valid = torch.ones(1, 2, dtype=torch.bool)
    evidence, position_valid = token_normalized_probe_evidence(states, valid)
    torch.testing.assert_close(evidence, torch.tensor([[0.36, 0.64], [1.0, 0.0]]))
    assert position_valid.tolist() == [True, True]
    weight = torch.tensor([[1.0, 2.0], [1.0, 0.0]])  # weight term sqrt(1 + 1) and sqrt(16)
    scores = final_scores(PPspScore(PPspParams(token_norm=True)), states, valid, weight)
    torch.testing.assert_close(scores, torch.tensor([1.36 * 2**0.5, 0.64 * 4.0]))


def test_padding_and_all_zero_tokens_contribute_nothing():
    states = torch.randn(2, 3, 5)
    states[1, 2] = 0.0
    valid = torch.tensor([[True, True, False], [False, True, True]])
    evidence, position_valid = token_normalized_probe_evidence(states, valid)
    assert torch.isfinite(evidence).all() and position_valid.tolist() == [True, True, True]
    torch.testing.assert_close(evidence[2], torch.zeros(5))  # the one real token there is all zero
    row0 = states[0, 0] / states[0, 0].norm()
    torch.testing.assert_close(evidence[0], row0.square())


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 3),
    seq=st.integers(1, 8),
    channels=st.integers(2, 32),
    seed=st.integers(0, 2**31 - 1),
)
def test_scores_equal_the_reference(rows, seq, channels, seed):
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(rows, seq, channels, generator=gen) * torch.rand(rows, seq, 1, generator=gen) * 10
    valid = torch.rand(rows, seq, generator=gen) < 0.7
    valid[0, 0] = True
    weight = torch.randn(6, channels, generator=gen)
    scores = final_scores(PPspScore(PPspParams(token_norm=True)), states, valid, weight)
    torch.testing.assert_close(scores.double(), reference_scores(states, valid, weight), rtol=1e-5, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    seq=st.integers(1, 8),
    channels=st.integers(2, 32),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_scaling_one_token_changes_nothing_only_with_token_norm(seq, channels, scale, seed, data):
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(1, seq, channels, generator=gen)
    valid = torch.ones(1, seq, dtype=torch.bool)
    weight = torch.randn(4, channels, generator=gen)
    scaled = states.clone()
    scaled[0, data.draw(st.integers(0, seq - 1), label="token")] *= scale
    normed = PPspScore(PPspParams(token_norm=True))
    before = final_scores(normed, states, valid, weight)
    torch.testing.assert_close(final_scores(normed, scaled, valid, weight), before, rtol=1e-4, atol=1e-6)
    assume(seq > 1 and abs(scale - 1.0) > 0.1)
    plain = PPspScore()
    plain_before = final_scores(plain, states, valid, weight)
    assert not torch.allclose(final_scores(plain, scaled, valid, weight), plain_before)


def test_with_unit_weights_the_ranking_is_griffins():
    gen = torch.Generator().manual_seed(3)
    states = torch.randn(1, 9, 40, generator=gen) * torch.rand(1, 9, 1, generator=gen) * 7
    valid = torch.ones(1, 9, dtype=torch.bool)
    weight = torch.ones(5, 40)
    normed = final_scores(PPspScore(PPspParams(token_norm=True)), states, valid, weight)
    griffin = final_scores(GriffinScore(), states, valid, weight)
    # PPsp's a_c is the square of GRIFFIN's statistic; with equal weight terms the order is the same
    assert torch.equal(normed.argsort(descending=True), griffin.argsort(descending=True))


def test_token_norm_passes_the_conformance_suite():
    check_strategy(PPspScore(PPspParams(token_norm=True)), max_examples=30)


@pytest.mark.parametrize("fusion", ["importance-scaled", "fixed", "completion"])
def test_token_norm_with_a_history_fusion_is_refused_naming_the_field(fusion):
    raw = {
        "preset": "pp-prompt",
        "strategies": {"fuse_history": fusion, "score_channels": TOKEN_NORM_PPSP},
    }
    expected = r"strategies\.score_channels\.params\.token_norm.*fuse_history 'none'"
    with pytest.raises(ValueError, match=expected):
        MethodConfig.model_validate(raw)


def test_token_norm_without_history_validates():
    method = MethodConfig.model_validate(
        {
            "preset": "pp-prompt",
            "history": {"init": "none"},
            "strategies": {"fuse_history": "none", "score_channels": TOKEN_NORM_PPSP},
        }
    )
    assert method.strategies.score_channels.params == {"token_norm": True}


def test_token_norm_with_centered_scores_is_refused():
    with pytest.raises(ValueError, match="centered.*token_norm"):
        PPspParams(token_norm=True, centered=True, bias_compensation=True)
