"""Probe selection (spec step 1, ``select_probe``): residual top-k tokens first, then sequences.

Checks ``probe_sizes``, ``select_residual_probe`` and the ``ResidualProbe`` hook against the
method spec (docs/probe-pruning.md) with brute-force float64 references.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ppframework.strategies.probe import ProbeParams, ResidualProbe, probe_sizes, select_residual_probe
from ppframework.types import BlockContext, BlockGeometry, BlockKind

TOL = 1e-4  # relative slack for float32 ranking vs the float64 reference (near-ties only)


# --------------------------------------------------------------------------- helpers


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def expected_sizes(batch: int, seq: int, seq_pct: int, batch_pct: int) -> tuple[int, int]:
    """Spec sizes with exact integer arithmetic (ratios are ``pct / 100``)."""
    k_t = min(max(ceil_div(seq_pct * seq, 100), 2), seq)
    k_b = min(max(ceil_div(batch_pct * batch, 100), 1), batch)
    return k_b, k_t


def right_padded_mask(gen: torch.Generator, batch: int, seq: int, pad: bool) -> torch.Tensor:
    """(B, T) long mask, 1 for the first ``len_b`` positions; every row keeps >= 1 real token."""
    if not pad:
        return torch.ones(batch, seq, dtype=torch.long)
    lengths = torch.randint(1, seq + 1, (batch,), generator=gen)
    return (torch.arange(seq)[None, :] < lengths[:, None]).long()


def make_residual(gen: torch.Generator, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Continuous random residual; padding entries are large garbage so any leak would show."""
    batch, seq = mask.shape
    residual = torch.randn(batch, seq, dim, generator=gen)
    garbage = 50.0 * torch.randn(batch, seq, dim, generator=gen)
    return torch.where(mask.bool()[..., None], residual, garbage)


def ref_norms(residual: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """r[b, t] = ||h[b, t, :]||_2 in float64, padding counted as 0."""
    return residual.double().norm(dim=-1) * mask.bool().double()


def ref_token_scores(residual: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ref_norms(residual, mask).norm(dim=0)


def ref_row_scores(residual: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return ref_norms(residual, mask)[:, tokens].norm(dim=1)


def assert_is_top(scores: torch.Tensor, chosen: torch.Tensor, eligible: torch.Tensor) -> None:
    """Every chosen index beats (up to float slack) every eligible index that was not chosen."""
    chosen_set = set(chosen.tolist())
    others = [i for i in range(scores.numel()) if bool(eligible[i]) and i not in chosen_set]
    if not chosen_set or not others:
        return
    lo = min(float(scores[i]) for i in chosen_set)
    hi = max(float(scores[i]) for i in others)
    assert lo >= hi - TOL * max(1.0, abs(hi)), (lo, hi, sorted(chosen_set))


def boundary_tie(scores: torch.Tensor, eligible: torch.Tensor, k: int) -> bool:
    """True when the k-th and (k+1)-th best eligible scores are (nearly) equal."""
    vals = scores[eligible].sort(descending=True).values
    if k >= vals.numel() or k == 0:
        return False
    return abs(float(vals[k - 1]) - float(vals[k])) <= TOL * max(1.0, abs(float(vals[k])))


def make_ctx(seq: int) -> BlockContext:
    return BlockContext(
        layer=3,
        kind=BlockKind.ATTENTION,
        batch_index=0,
        geometry=BlockGeometry(BlockKind.ATTENTION, units=4, unit_width=2, num_kv_heads=4),
        seq_len=seq,
        generator=torch.Generator().manual_seed(0),
    )


probe_case = st.fixed_dictionaries(
    {
        "batch": st.integers(1, 12),
        "seq": st.integers(1, 24),
        "dim": st.integers(1, 6),
        "seed": st.integers(0, 2**31 - 1),
        "seq_pct": st.integers(1, 100),
        "batch_pct": st.integers(1, 100),
        "pad": st.booleans(),
    }
)


def build(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(case["seed"])
    mask = right_padded_mask(gen, case["batch"], case["seq"], case["pad"])
    return make_residual(gen, mask, case["dim"]), mask


# --------------------------------------------------------------------------- probe_sizes


def test_probe_sizes_paper_default() -> None:
    # batch 20 x 1024, seq_ratio 0.5, batch_ratio 0.05 -> 1 sequence, 512 positions.
    assert probe_sizes(20, 1024, 0.5, 0.05) == (1, 512)


def test_probe_sizes_hand_examples() -> None:
    assert probe_sizes(10, 10, 0.3, 0.3) == (3, 3)
    assert probe_sizes(100, 100, 0.07, 0.07) == (7, 7)  # 0.07 * 100 == 7.000000000000001 in floats
    assert probe_sizes(7, 3, 0.5, 0.2) == (2, 2)  # ceil(1.5) = 2, ceil(1.4) = 2
    assert probe_sizes(4, 3, 0.1, 0.01) == (1, 2)  # k_T floor of 2, k_B floor of 1
    assert probe_sizes(1, 1, 0.5, 0.05) == (1, 1)  # k_T = 2 capped at T = 1


@settings(max_examples=50, deadline=None)
@given(
    batch=st.integers(1, 300),
    seq=st.integers(1, 3000),
    seq_pct=st.integers(1, 100),
    batch_pct=st.integers(1, 100),
)
def test_probe_sizes_match_spec(batch: int, seq: int, seq_pct: int, batch_pct: int) -> None:
    k_b, k_t = probe_sizes(batch, seq, seq_pct / 100, batch_pct / 100)
    assert (k_b, k_t) == expected_sizes(batch, seq, seq_pct, batch_pct)
    assert 1 <= k_b <= batch and 1 <= k_t <= seq


# --------------------------------------------------------------------------- select_residual_probe


@settings(max_examples=50, deadline=None)
@given(case=probe_case)
def test_probe_structure_sizes_and_validity(case: dict) -> None:
    residual, mask = build(case)
    batch, seq = mask.shape
    probe = select_residual_probe(residual, mask, case["seq_pct"] / 100, case["batch_pct"] / 100)
    rows, tokens = probe.batch_index, probe.token_index

    assert rows.dtype == torch.long and tokens.dtype == torch.long
    for idx, n in ((rows, batch), (tokens, seq)):
        values = idx.tolist()
        assert values == sorted(set(values)), "indices must be sorted and unique"
        assert all(0 <= v < n for v in values)

    position_ok = mask.bool().any(dim=0)
    row_ok = mask.bool().any(dim=1)
    k_b, k_t = expected_sizes(batch, seq, case["seq_pct"], case["batch_pct"])
    assert tokens.numel() == min(k_t, int(position_ok.sum()))
    assert rows.numel() == min(k_b, int(row_ok.sum()))
    assert bool(position_ok[tokens].all()), "an all-padding position was chosen"
    assert bool(row_ok[rows].all()), "an all-padding row was chosen"
    assert probe.valid.dtype == torch.bool
    assert torch.equal(probe.valid, mask.bool()[rows][:, tokens])


@settings(max_examples=50, deadline=None)
@given(case=probe_case)
def test_probe_tokens_then_rows_are_top_k_by_residual_norm(case: dict) -> None:
    residual, mask = build(case)
    probe = select_residual_probe(residual, mask, case["seq_pct"] / 100, case["batch_pct"] / 100)
    rows, tokens = probe.batch_index, probe.token_index
    position_ok = mask.bool().any(dim=0)

    token_scores = ref_token_scores(residual, mask)
    sink = tokens.numel() <= 10 and bool(position_ok[0])
    if sink:
        assert 0 in tokens.tolist(), "position 0 (attention sink) must be kept when k_T <= 10"
        eligible = position_ok.clone()
        eligible[0] = False
        assert_is_top(token_scores, tokens[tokens != 0], eligible)
    else:
        assert_is_top(token_scores, tokens, position_ok)

    # rows: ranked on the chosen positions only
    row_scores = ref_row_scores(residual, mask, tokens)
    assert_is_top(row_scores, rows, mask.bool().any(dim=1))


@settings(max_examples=50, deadline=None)
@given(
    batch=st.integers(1, 8),
    seq=st.integers(2, 40),
    seed=st.integers(0, 2**31 - 1),
    seq_pct=st.integers(1, 100),
    pad=st.booleans(),
)
def test_sink_kept_exactly_when_k_t_at_most_10(
    batch: int, seq: int, seed: int, seq_pct: int, pad: bool
) -> None:
    """Position 0 is made the weakest position: it is chosen iff k_T <= 10 (or every position is)."""
    gen = torch.Generator().manual_seed(seed)
    mask = right_padded_mask(gen, batch, seq, pad)
    residual = make_residual(gen, mask, 4)
    residual[:, 0] *= 1e-3
    probe = select_residual_probe(residual, mask, seq_pct / 100, 1.0)
    k_t = probe.token_index.numel()
    n_positions = int(mask.bool().any(dim=0).sum())
    has_zero = 0 in probe.token_index.tolist()
    if k_t <= 10 or k_t == n_positions:
        assert has_zero
    else:
        assert not has_zero


def test_sink_threshold_zero_disables_sink() -> None:
    mask = torch.ones(2, 6, dtype=torch.long)
    residual = torch.ones(2, 6, 1) * torch.arange(1.0, 7.0)[None, :, None]  # position 0 weakest
    with_sink = select_residual_probe(residual, mask, 0.5, 1.0, sink_threshold=10)
    no_sink = select_residual_probe(residual, mask, 0.5, 1.0, sink_threshold=0)
    assert with_sink.token_index.tolist() == [0, 4, 5]
    assert no_sink.token_index.tolist() == [3, 4, 5]


def test_rows_ranked_on_chosen_positions_only_hand_example() -> None:
    """Row 0 has the largest norm overall, but row 1 has the largest on the chosen positions."""
    r = torch.tensor(
        [
            [1.0, 1.0, 1.0, 9.5],  # full norm 9.66, on {0, 2}: 1.41
            [1.0, 1.0, 9.0, 0.0],  # full norm 9.11, on {0, 2}: 9.11
            [1.0, 1.0, 4.0, 0.0],
        ]
    )
    # token scores: s_0 = s_1 = sqrt(3), s_2 = sqrt(98) = 9.90 > s_3 = 9.5; k_T = 2 with the sink
    residual = r[..., None]
    mask = torch.ones(3, 4, dtype=torch.long)
    probe = select_residual_probe(residual, mask, 0.5, 1 / 3)
    assert probe.token_index.tolist() == [0, 2]
    assert probe.batch_index.tolist() == [1]
    assert probe.valid.tolist() == [[True, True]]


def test_padding_never_counted_hand_example() -> None:
    """Huge values at padding positions must neither attract tokens nor rows."""
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
    residual = torch.ones(3, 4, 1)
    residual[0, 2:] = 1e6  # padding of row 0
    residual[2, 1:] = 1e6  # padding of row 2
    residual[1, 2] = 3.0
    probe = select_residual_probe(residual, mask, 0.5, 1 / 3, sink_threshold=0)
    # scores: s_0 = sqrt(3), s_1 = sqrt(2), s_2 = 3, s_3 = all padding
    assert probe.token_index.tolist() == [0, 2]
    # rows on {0, 2}: row0 = 1, row1 = sqrt(10), row2 = 1
    assert probe.batch_index.tolist() == [1]
    assert probe.valid.tolist() == [[True, True]]


@settings(max_examples=50, deadline=None)
@given(
    batch=st.integers(2, 10),
    seq=st.integers(1, 16),
    seed=st.integers(0, 2**31 - 1),
    seq_pct=st.integers(1, 100),
    batch_pct=st.integers(1, 100),
)
def test_never_selects_empty_rows_or_positions_random_masks(
    batch: int, seq: int, seed: int, seq_pct: int, batch_pct: int
) -> None:
    """Arbitrary (not right-padded) masks, some rows and positions entirely padding."""
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(batch, seq, generator=gen) < 0.4).long()
    mask[torch.rand(batch, generator=gen) < 0.4] = 0  # some empty rows
    mask[torch.randint(0, batch, (1,), generator=gen), torch.randint(0, seq, (1,), generator=gen)] = 1
    residual = make_residual(gen, mask, 3)
    probe = select_residual_probe(residual, mask, seq_pct / 100, batch_pct / 100)

    position_ok = mask.bool().any(dim=0)
    row_ok = mask.bool().any(dim=1)
    k_b, k_t = expected_sizes(batch, seq, seq_pct, batch_pct)
    assert probe.token_index.numel() == min(k_t, int(position_ok.sum()))
    assert probe.batch_index.numel() == min(k_b, int(row_ok.sum()))
    assert bool(position_ok[probe.token_index].all())
    assert bool(row_ok[probe.batch_index].all())
    assert torch.equal(probe.valid, mask.bool()[probe.batch_index][:, probe.token_index])


@settings(max_examples=50, deadline=None)
@given(case=probe_case, perm_seed=st.integers(0, 2**31 - 1))
def test_probe_invariant_to_batch_row_permutation(case: dict, perm_seed: int) -> None:
    residual, mask = build(case)
    batch = mask.shape[0]
    perm = torch.randperm(batch, generator=torch.Generator().manual_seed(perm_seed))
    seq_ratio, batch_ratio = case["seq_pct"] / 100, case["batch_pct"] / 100

    base = select_residual_probe(residual, mask, seq_ratio, batch_ratio)
    permuted = select_residual_probe(residual[perm], mask[perm], seq_ratio, batch_ratio)

    token_scores = ref_token_scores(residual, mask)
    if not boundary_tie(token_scores, mask.bool().any(dim=0), base.token_index.numel()):
        assert torch.equal(permuted.token_index, base.token_index)
    rows_back = sorted(perm[permuted.batch_index].tolist())
    row_scores = ref_row_scores(residual, mask, base.token_index)
    if torch.equal(permuted.token_index, base.token_index) and not boundary_tie(
        row_scores, mask.bool().any(dim=1), base.batch_index.numel()
    ):
        assert rows_back == base.batch_index.tolist()
    else:  # tie at the cut: the chosen scores must still agree as a multiset
        a = row_scores[base.batch_index].sort().values
        b = row_scores[torch.tensor(rows_back, dtype=torch.long)].sort().values
        assert torch.allclose(a, b, rtol=TOL, atol=TOL)


# --------------------------------------------------------------------------- ResidualProbe hook


@settings(max_examples=50, deadline=None)
@given(case=probe_case, normed_seed=st.integers(0, 2**31 - 1))
def test_residual_probe_ranks_on_residual_not_normed(case: dict, normed_seed: int) -> None:
    residual, mask = build(case)
    seq_ratio, batch_ratio = case["seq_pct"] / 100, case["batch_pct"] / 100
    plugin = ResidualProbe(ProbeParams(seq_ratio=seq_ratio, batch_ratio=batch_ratio))
    ctx = make_ctx(mask.shape[1])
    gen = torch.Generator().manual_seed(normed_seed)
    normed_a = torch.randn(residual.shape, generator=gen) * 100
    normed_b = (
        torch.randn(residual.shape, generator=gen).abs() * torch.arange(residual.shape[1])[None, :, None]
    )

    ref = select_residual_probe(residual, mask, seq_ratio, batch_ratio)
    for normed in (normed_a, normed_b, residual.flip(0)):
        got = plugin.select_probe(ctx=ctx, residual=residual, normed=normed, attention_mask=mask)
        assert torch.equal(got.batch_index, ref.batch_index)
        assert torch.equal(got.token_index, ref.token_index)
        assert torch.equal(got.valid, ref.valid)


def test_residual_probe_ignores_normed_hand_example() -> None:
    """A normed tensor that would rank the opposite way changes nothing."""
    residual = torch.arange(1.0, 13.0).view(2, 6, 1)  # position 5 / row 1 largest
    normed = -residual + 100  # position 0 / row 0 largest
    mask = torch.ones(2, 6, dtype=torch.long)
    plugin = ResidualProbe(ProbeParams(seq_ratio=0.5, batch_ratio=0.5, sink_threshold=0))
    probe = plugin.select_probe(ctx=make_ctx(6), residual=residual, normed=normed, attention_mask=mask)
    assert probe.token_index.tolist() == [3, 4, 5]
    assert probe.batch_index.tolist() == [1]


def test_residual_probe_default_params_are_paper_defaults() -> None:
    params = ResidualProbe().params
    assert params.seq_ratio == pytest.approx(0.5)
    assert params.batch_ratio == pytest.approx(0.05)
    assert params.sink_threshold == 10
    # 20 x 1024 batch -> 1 row, 512 positions, position 0 not forced (k_T > 10)
    assert probe_sizes(20, 1024, params.seq_ratio, params.batch_ratio) == (1, math.ceil(0.5 * 1024))


# --------------------------------------------------------------------------- known deviation


def test_non_finite_padding_residual_is_not_counted() -> None:
    # r[b, t] = (b + 1) * (t + 1); row 0 is padding at position 3.
    residual = (torch.arange(1.0, 5.0)[None, :] * torch.tensor([[1.0], [2.0]]))[..., None]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    clean = select_residual_probe(residual, mask, 0.5, 0.5, sink_threshold=0)
    assert clean.token_index.tolist() == [2, 3] and clean.batch_index.tolist() == [1]
    residual[0, 3] = float("inf")  # e.g. an fp16 overflow in a padding slot; must not matter
    dirty = select_residual_probe(residual, mask, 0.5, 0.5, sink_threshold=0)
    assert dirty.token_index.tolist() == [2, 3]
    assert dirty.batch_index.tolist() == [1]  # the library picks row 0 (its score is nan)
