"""PPsp with row-balanced pooled evidence (``ppsp`` with ``params: {row_balance: true}``).

The reference is written from the definition: every probe row with a real token weighs the same in a
channel's evidence summed over positions (its mean square over its own real tokens); a position's
evidence is ``sum_b w_b * valid[b, t] * z[b, t, c]^2 / sum_b w_b`` with ``w_b = 1 / L_b``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ppframework.strategies.scoring import (
    PPspParams,
    PPspScore,
    probe_evidence,
    row_balanced_probe_evidence,
)
from ppframework.testing import check_strategy, make_context
from ppframework.types import BlockGeometry, BlockKind, Probe


def _states_and_valid(rows: int, seq: int, channels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(rows, seq, channels, generator=gen) * torch.rand(rows, 1, 1, generator=gen) * 5
    lengths = torch.randint(1, seq + 1, (rows,), generator=gen)
    valid = torch.arange(seq)[None, :] >= (seq - lengths)[:, None]  # left padding
    return states, valid


def test_two_rows_by_hand():
    """A row of 1 token (value 3) and a row of 2 tokens (values 1, 1), one channel, left padding:
    each row's mean square (9 and 1) counts once, so the evidence sums to (9 + 1) / (1 + 1/2)."""
    states = torch.tensor([[[0.0], [3.0]], [[1.0], [1.0]]])
    valid = torch.tensor([[False, True], [True, True]])
    evidence, position_valid = row_balanced_probe_evidence(states, valid)
    torch.testing.assert_close(evidence, torch.tensor([[0.5 / 1.5], [(9.0 + 0.5) / 1.5]]))
    assert position_valid.tolist() == [True, True]
    plain, _ = probe_evidence(states, valid)
    torch.testing.assert_close(plain, torch.tensor([[1.0], [5.0]]))  # every real token the same


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 4), seq=st.integers(1, 9), channels=st.integers(1, 16), seed=st.integers(0, 2**31 - 1)
)
def test_each_row_weighs_its_mean_square(rows, seq, channels, seed):
    """Summed over positions, the evidence is the mean over rows of each row's own mean square, times
    the rows over the sum of ``1 / L_b`` (the same factor for every channel, so rankings are row means)."""
    states, valid = _states_and_valid(rows, seq, channels, seed)
    evidence, position_valid = row_balanced_probe_evidence(states, valid)
    z = states.double().square() * valid[:, :, None]
    lengths = valid.sum(dim=1).double()
    row_means = z.sum(dim=1) / lengths[:, None]
    expected = row_means.sum(dim=0) / (1.0 / lengths).sum()
    torch.testing.assert_close(evidence.double().sum(dim=0), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(position_valid, valid.any(dim=0))


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 4), seq=st.integers(1, 9), channels=st.integers(1, 16), seed=st.integers(0, 2**31 - 1)
)
def test_rows_of_one_length_or_a_single_row_change_nothing(rows, seq, channels, seed):
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(rows, seq, channels, generator=gen)
    valid = torch.ones(rows, seq, dtype=torch.bool)
    torch.testing.assert_close(
        row_balanced_probe_evidence(states, valid)[0], probe_evidence(states, valid)[0]
    )
    one, one_valid = _states_and_valid(1, seq, channels, seed)
    torch.testing.assert_close(
        row_balanced_probe_evidence(one, one_valid)[0], probe_evidence(one, one_valid)[0]
    )


@settings(max_examples=40, deadline=None)
@given(seq=st.integers(2, 9), channels=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_a_long_row_does_not_outweigh_a_short_one_in_either_order(seq, channels, seed):
    """Row order does not matter, and a long row's weight does not grow with its length: the evidence of
    (short, long) equals that of (long, short), and each row's share of the total is its mean square."""
    states, _ = _states_and_valid(2, seq, channels, seed)
    valid = torch.ones(2, seq, dtype=torch.bool)
    valid[0, :-1] = False  # row 0: one real token; row 1: seq tokens
    forward, _ = row_balanced_probe_evidence(states, valid)
    backward, _ = row_balanced_probe_evidence(states.flip(0), valid.flip(0))
    torch.testing.assert_close(forward, backward, rtol=1e-5, atol=1e-6)
    short_share = states[0, -1].double().square()
    long_share = states[1].double().square().mean(dim=0)
    torch.testing.assert_close(
        forward.double().sum(dim=0), (short_share + long_share) / (1.0 + 1.0 / seq), rtol=1e-5, atol=1e-6
    )


def test_the_scorer_uses_it_only_when_asked():
    states, valid = _states_and_valid(3, 6, 4, seed=5)
    geometry = BlockGeometry(BlockKind.MLP, units=4, unit_width=1)
    ctx = make_context(BlockKind.MLP, geometry, seq_len=6, position_valid=valid.any(dim=0))
    probe = Probe(batch_index=torch.arange(3), token_index=torch.arange(6), valid=valid)
    weight = torch.randn(5, 4)
    balanced = PPspScore(PPspParams(row_balance=True)).score_channels(
        ctx=ctx, probe=probe, probe_states=states, weight=weight
    )
    plain = PPspScore().score_channels(ctx=ctx, probe=probe, probe_states=states, weight=weight)
    torch.testing.assert_close(balanced.evidence, row_balanced_probe_evidence(states, valid)[0])
    torch.testing.assert_close(plain.evidence, probe_evidence(states, valid)[0])
    assert not torch.allclose(balanced.evidence, plain.evidence)


def test_row_balance_passes_the_conformance_suite():
    check_strategy(PPspScore(PPspParams(row_balance=True)), max_examples=30)


def test_row_balance_with_token_norm_is_refused():
    with pytest.raises(ValueError, match="row_balance and token_norm"):
        PPspParams(row_balance=True, token_norm=True)
