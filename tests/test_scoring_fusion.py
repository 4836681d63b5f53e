"""Scoring (spec step 3, PPsp of step 5) and importance-scaled fusion (spec step 4)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ppframework.history import BlockHistory
from ppframework.strategies.fusion import FusionParams, ImportanceScaledFusion, importance_scaled_fusion
from ppframework.strategies.scoring import (
    PPspScore,
    activation_times_weight,
    ppsp_weight_term,
    probe_evidence,
)
from ppframework.types import BlockContext, BlockGeometry, BlockKind, ChannelScores, Probe

EPS = 1e-6


# --------------------------------------------------------------------------- helpers


def make_ctx(seq_len: int, position_valid: torch.Tensor | None = None) -> BlockContext:
    return BlockContext(
        layer=5,
        kind=BlockKind.MLP,
        batch_index=1,
        geometry=BlockGeometry(BlockKind.MLP, units=8, unit_width=1),
        seq_len=seq_len,
        generator=torch.Generator().manual_seed(0),
        position_valid=position_valid,
    )


def brute_evidence(states: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """P[t, c] = mean over valid rows b of states[b, t, c]^2 (float64 loops); 0 where none valid."""
    k_b, k_t, c = states.shape
    out = torch.zeros(k_t, c, dtype=torch.float64)
    ok = torch.zeros(k_t, dtype=torch.bool)
    for t in range(k_t):
        rows = [b for b in range(k_b) if bool(valid[b, t])]
        if rows:
            ok[t] = True
            out[t] = torch.stack([states[b, t].double() ** 2 for b in rows]).mean(dim=0)
    return out, ok


def brute_fusion(p: float, h: float, eps: float = EPS) -> float:
    rho = p / (p + h + eps)
    return (1 - rho) * h + rho * p


evidence_case = st.fixed_dictionaries(
    {
        "k_b": st.integers(1, 6),
        "k_t": st.integers(1, 10),
        "c": st.integers(1, 12),
        "seed": st.integers(0, 2**31 - 1),
        "p_valid": st.sampled_from([0.0, 0.3, 0.7, 1.0]),
    }
)


def build_states(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(case["seed"])
    states = torch.randn(case["k_b"], case["k_t"], case["c"], generator=gen)
    valid = torch.rand(case["k_b"], case["k_t"], generator=gen) < case["p_valid"]
    return states, valid


# --------------------------------------------------------------------------- probe evidence


@settings(max_examples=50, deadline=None)
@given(case=evidence_case)
def test_probe_evidence_is_masked_mean_of_squares(case: dict) -> None:
    states, valid = build_states(case)
    got, got_ok = probe_evidence(states, valid)
    want, want_ok = brute_evidence(states, valid)
    assert got.dtype == torch.float32
    assert got.shape == (case["k_t"], case["c"])
    assert torch.equal(got_ok, want_ok)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)
    assert bool((got[~got_ok] == 0).all())


@settings(max_examples=50, deadline=None)
@given(case=evidence_case, garbage_seed=st.integers(0, 2**31 - 1))
def test_probe_evidence_ignores_invalid_entries(case: dict, garbage_seed: int) -> None:
    states, valid = build_states(case)
    gen = torch.Generator().manual_seed(garbage_seed)
    garbage = 1e3 * torch.randn(states.shape, generator=gen)
    dirty = torch.where(valid[..., None], states, garbage)
    clean = torch.where(valid[..., None], states, torch.zeros(()))
    a, a_ok = probe_evidence(dirty, valid)
    b, b_ok = probe_evidence(clean, valid)
    assert torch.equal(a_ok, b_ok)
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def test_probe_evidence_half_precision_input_is_fp32() -> None:
    states = torch.full((2, 1, 2), 300.0, dtype=torch.float16)  # 300^2 overflows fp16
    got, ok = probe_evidence(states, torch.ones(2, 1, dtype=torch.bool))
    assert got.dtype == torch.float32
    assert got.tolist() == [[90000.0, 90000.0]]
    assert ok.tolist() == [True]


# --------------------------------------------------------------------------- PPsp


def test_ppsp_weight_term_hand_2x3() -> None:
    # W is (out=2, in=3): rows are output rows i, columns input channels c.
    w = torch.tensor([[1.0, -2.0, 0.0], [3.0, 1.0, 2.0]])
    # c0: sqrt(1 + 81) ; c1: sqrt(16 + 1) ; c2: sqrt(0 + 16) = 4
    want = torch.tensor([math.sqrt(82.0), math.sqrt(17.0), 4.0])
    got = ppsp_weight_term(w)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-6)
    # it is the L2 norm over rows of W^2 (per weight W^2 * a, channel = L2 over rows)
    assert torch.allclose(got, (w**2).norm(dim=0), rtol=1e-6)


def ppsp_hand_inputs() -> tuple[Probe, torch.Tensor, torch.Tensor]:
    weight = torch.tensor([[1.0, -2.0, 0.0], [3.0, 1.0, 2.0]])
    states = torch.tensor(
        [
            [[1.0, 2.0, 0.0], [2.0, 0.0, 1.0]],
            [[3.0, 0.0, 1.0], [0.0, 0.0, 4.0]],
        ]
    )
    valid = torch.tensor([[True, True], [True, False]])  # row 1 is padding at the 2nd position
    probe = Probe(batch_index=torch.tensor([0, 3]), token_index=torch.tensor([0, 7]), valid=valid)
    return probe, states, weight


def test_ppsp_score_hand_example() -> None:
    probe, states, weight = ppsp_hand_inputs()
    ctx = make_ctx(8)
    scores = PPspScore().score_channels(ctx=ctx, probe=probe, probe_states=states, weight=weight)
    # P[t=0] = mean([1,4,0], [9,0,1]) = [5, 2, 0.5]; P[t=7] = [4, 0, 1] (row 1 is padding)
    assert torch.allclose(scores.evidence, torch.tensor([[5.0, 2.0, 0.5], [4.0, 0.0, 1.0]]))
    assert scores.position_valid.tolist() == [True, True]
    assert scores.positions.tolist() == [0, 7]
    assert scores.head_reduce == "l2"
    fused = ImportanceScaledFusion().fuse_history(ctx=ctx, scores=scores, history=None)
    # a = [9, 2, 1.5]; S = a * [sqrt 82, sqrt 17, 4]
    assert torch.allclose(fused.activation, torch.tensor([9.0, 2.0, 1.5]))
    want = torch.tensor([9.0 * math.sqrt(82.0), 2.0 * math.sqrt(17.0), 6.0])
    assert torch.allclose(fused.channel_scores(), want, rtol=1e-6)


def test_ppsp_needs_activation() -> None:
    with pytest.raises(ValueError):
        activation_times_weight(None, torch.ones(3))


@settings(max_examples=50, deadline=None)
@given(
    case=evidence_case,
    out_rows=st.integers(1, 6),
    perm_seed=st.integers(0, 2**31 - 1),
)
def test_ppsp_scores_invariant_to_probe_row_permutation(case: dict, out_rows: int, perm_seed: int) -> None:
    states, valid = build_states(case)
    gen = torch.Generator().manual_seed(perm_seed)
    weight = torch.randn(out_rows, case["c"], generator=gen)
    perm = torch.randperm(case["k_b"], generator=gen)
    tokens = torch.arange(case["k_t"]) * 2
    probe = Probe(batch_index=torch.arange(case["k_b"]), token_index=tokens, valid=valid)
    probe_p = Probe(batch_index=torch.arange(case["k_b"]), token_index=tokens, valid=valid[perm])
    ctx = make_ctx(2 * case["k_t"])

    def final(p: Probe, s: torch.Tensor) -> ChannelScores:
        sc = PPspScore().score_channels(ctx=ctx, probe=p, probe_states=s, weight=weight)
        return ImportanceScaledFusion().fuse_history(ctx=ctx, scores=sc, history=None)

    a = final(probe, states)
    b = final(probe_p, states[perm])
    assert torch.equal(a.position_valid, b.position_valid)
    assert torch.allclose(a.evidence, b.evidence, rtol=1e-5, atol=1e-6)
    assert torch.allclose(a.channel_scores(), b.channel_scores(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- importance-scaled fusion


fusion_case = st.fixed_dictionaries(
    {
        "n": st.integers(1, 8),
        "c": st.integers(1, 16),
        "seed": st.integers(0, 2**31 - 1),
        "scale_p": st.sampled_from([1e-8, 1e-3, 1.0, 1e3]),
        "scale_h": st.sampled_from([1e-8, 1e-3, 1.0, 1e3]),
    }
)


def build_fusion(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative (P, Hist) in float64 with log-normal spread and some exact zeros."""
    gen = torch.Generator().manual_seed(case["seed"])
    shape = (case["n"], case["c"])
    p = case["scale_p"] * torch.exp(2 * torch.randn(shape, generator=gen, dtype=torch.float64))
    h = case["scale_h"] * torch.exp(2 * torch.randn(shape, generator=gen, dtype=torch.float64))
    p[torch.rand(shape, generator=gen) < 0.2] = 0.0
    h[torch.rand(shape, generator=gen) < 0.2] = 0.0
    return p, h


@settings(max_examples=50, deadline=None)
@given(case=fusion_case)
def test_fusion_is_convex_combination(case: dict) -> None:
    p, h = build_fusion(case)
    f = importance_scaled_fusion(p, h)
    lo, hi = torch.minimum(p, h), torch.maximum(p, h)
    slack = 1e-12 * hi + 1e-15
    assert bool((f >= lo - slack).all()) and bool((f <= hi + slack).all())
    # and it is the spec formula, entry by entry
    want = torch.tensor(
        [
            [brute_fusion(float(a), float(b)) for a, b in zip(pr, hr, strict=True)]
            for pr, hr in zip(p, h, strict=True)
        ],
        dtype=torch.float64,
    )
    assert torch.allclose(f, want, rtol=1e-12, atol=0.0)


@settings(max_examples=50, deadline=None)
@given(case=fusion_case)
def test_fusion_limits(case: dict) -> None:
    p, h = build_fusion(case)
    # where the history is 0: F = P^2 / (P + eps), i.e. within eps of P (and 1e-6 relative once P >= 1)
    f = importance_scaled_fusion(p, torch.zeros_like(h))
    assert bool(((f - p).abs() <= EPS + 1e-14 * p).all())
    big = p >= 1.0
    assert bool(((f - p).abs()[big] <= 1e-6 * p[big] * (1 + 1e-9)).all())
    # where the probe is 0: F = Hist exactly
    g = importance_scaled_fusion(torch.zeros_like(p), h)
    assert torch.equal(g, h)
    # mixed tensor: the zero entries behave the same way
    m = importance_scaled_fusion(p, h)
    assert torch.equal(m[p == 0], h[p == 0])
    assert bool(((m - p).abs() <= EPS + 1e-14 * p)[h == 0].all())


def test_fusion_hand_example() -> None:
    p = torch.tensor([3.0, 1.0, 0.0, 2.0], dtype=torch.float64)
    h = torch.tensor([1.0, 1.0, 5.0, 0.0], dtype=torch.float64)
    f = importance_scaled_fusion(p, h)
    # rho = 3/4 -> F = 1/4 * 1 + 3/4 * 3 = 2.5 ; rho = 1/2 -> 1 ; rho = 0 -> 5 ; rho = 1 -> 2
    assert f.tolist() == pytest.approx([2.5, 1.0, 5.0, 2.0], abs=1e-5)
    assert f[0].item() == pytest.approx((1 + 1e-6 + 9) / (4 + 1e-6), rel=1e-12)
    assert f.tolist() == pytest.approx(
        [brute_fusion(a, b) for a, b in zip(p.tolist(), h.tolist(), strict=True)], rel=1e-12
    )


def test_fusion_eps_parameter() -> None:
    p, h = torch.tensor([1.0]), torch.tensor([0.0])
    assert importance_scaled_fusion(p, h, eps=1.0).item() == pytest.approx(0.5)
    plugin = ImportanceScaledFusion(FusionParams(eps=1.0))
    scores = ChannelScores(
        weight_term=torch.ones(1),
        combine=activation_times_weight,
        evidence=p[None, :],
        positions=torch.tensor([0]),
        position_valid=torch.tensor([True]),
    )
    history = BlockHistory(sq_mean=torch.zeros(4, 1))
    out = plugin.fuse_history(ctx=make_ctx(4), scores=scores, history=history)
    assert out.activation.tolist() == pytest.approx([0.5])


# --------------------------------------------------------------------------- fuse_history hook


@settings(max_examples=50, deadline=None)
@given(case=evidence_case)
def test_fuse_history_without_history_sums_valid_positions(case: dict) -> None:
    states, valid = build_states(case)
    evidence, ok = probe_evidence(states, valid)
    scores = ChannelScores(
        weight_term=torch.ones(case["c"]),
        combine=activation_times_weight,
        evidence=evidence,
        positions=torch.arange(case["k_t"]),
        position_valid=ok,
    )
    out = ImportanceScaledFusion().fuse_history(ctx=make_ctx(case["k_t"]), scores=scores, history=None)
    want = torch.zeros(case["c"], dtype=torch.float64)
    for t in range(case["k_t"]):
        if bool(ok[t]):
            want += evidence[t].double()
    assert torch.allclose(out.activation.double(), want, rtol=1e-6, atol=1e-6)


def test_fuse_history_indexes_history_by_absolute_position() -> None:
    max_len, c = 16, 3
    # every history row is distinct: Hist[t, c] = 10 * (t + 1) + c
    sq_mean = 10.0 * (torch.arange(max_len, dtype=torch.float32)[:, None] + 1) + torch.arange(c)[None, :]
    history = BlockHistory(sq_mean=sq_mean.clone())
    positions = torch.tensor([1, 5, 9, 12])
    evidence = torch.tensor([[4.0, 0.0, 1.0], [30.0, 2.0, 7.0], [0.5, 90.0, 0.0], [1e3, 1e3, 1e3]])
    position_valid = torch.tensor([True, True, True, False])
    scores = ChannelScores(
        weight_term=torch.ones(c),
        combine=activation_times_weight,
        evidence=evidence.clone(),
        positions=positions,
        position_valid=position_valid,
    )
    out = ImportanceScaledFusion().fuse_history(ctx=make_ctx(13), scores=scores, history=history)
    want = [0.0] * c
    for i, t in enumerate(positions.tolist()):
        if position_valid[i]:
            for ch in range(c):
                want[ch] += brute_fusion(float(evidence[i, ch]), float(sq_mean[t, ch]))
    assert out.activation.tolist() == pytest.approx(want, rel=1e-6)
    # the relative-position reading (rows 0..3) would give something else
    wrong = [
        sum(brute_fusion(float(evidence[i, ch]), float(sq_mean[i, ch])) for i in range(3)) for ch in range(c)
    ]
    assert out.activation.tolist() != pytest.approx(wrong, rel=1e-3)
    # the history itself is not modified by fusion
    assert torch.equal(history.sq_mean, sq_mean)


@settings(max_examples=50, deadline=None)
@given(
    max_len=st.integers(1, 20),
    c=st.integers(1, 10),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_fuse_history_with_history_matches_formula(
    max_len: int, c: int, seed: int, data: st.DataObject
) -> None:
    gen = torch.Generator().manual_seed(seed)
    k_t = data.draw(st.integers(1, max_len))
    positions = torch.randperm(max_len, generator=gen)[:k_t].sort().values
    sq_mean = torch.rand(max_len, c, generator=gen, dtype=torch.float64) * 10
    evidence = torch.rand(k_t, c, generator=gen, dtype=torch.float64) * 10
    position_valid = torch.rand(k_t, generator=gen) < 0.7
    scores = ChannelScores(
        weight_term=torch.ones(c, dtype=torch.float64),
        combine=activation_times_weight,
        evidence=evidence,
        positions=positions,
        position_valid=position_valid,
    )
    out = ImportanceScaledFusion().fuse_history(
        ctx=make_ctx(max_len), scores=scores, history=BlockHistory(sq_mean=sq_mean)
    )
    want = torch.zeros(c, dtype=torch.float64)
    for i, t in enumerate(positions.tolist()):
        if bool(position_valid[i]):
            want += importance_scaled_fusion(evidence[i], sq_mean[t])
    assert torch.allclose(out.activation, want, rtol=1e-10, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(
    max_len=st.integers(1, 20),
    c=st.integers(1, 10),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_fuse_history_static_sums_history_over_batch_positions(
    max_len: int, c: int, seed: int, data: st.DataObject
) -> None:
    gen = torch.Generator().manual_seed(seed)
    seq_len = data.draw(st.integers(1, max_len))
    sq_mean = torch.rand(max_len, c, generator=gen, dtype=torch.float64) * 10
    position_valid = torch.rand(seq_len, generator=gen) < 0.6
    scores = ChannelScores(weight_term=torch.ones(c), combine=activation_times_weight, evidence=None)
    out = ImportanceScaledFusion().fuse_history(
        ctx=make_ctx(seq_len, position_valid), scores=scores, history=BlockHistory(sq_mean=sq_mean)
    )
    want = torch.zeros(c, dtype=torch.float64)
    for t in range(seq_len):
        if bool(position_valid[t]):
            want += sq_mean[t]
    assert torch.allclose(out.activation, want, rtol=1e-12, atol=1e-12)

    # without position_valid every one of the first seq_len rows counts
    scores2 = ChannelScores(weight_term=torch.ones(c), combine=activation_times_weight, evidence=None)
    out2 = ImportanceScaledFusion().fuse_history(
        ctx=make_ctx(seq_len), scores=scores2, history=BlockHistory(sq_mean=sq_mean)
    )
    assert torch.allclose(out2.activation, sq_mean[:seq_len].sum(dim=0), rtol=1e-12, atol=1e-12)


def test_fuse_history_no_evidence_no_history_leaves_activation_unset() -> None:
    scores = ChannelScores(weight_term=torch.ones(2), combine=activation_times_weight)
    out = ImportanceScaledFusion().fuse_history(ctx=make_ctx(4), scores=scores, history=None)
    assert out.activation is None


def test_probe_evidence_ignores_non_finite_invalid_entries() -> None:
    states = torch.tensor([[[1.0, 2.0]], [[float("nan"), float("inf")]]])
    valid = torch.tensor([[True], [False]])
    got, ok = probe_evidence(states, valid)
    assert ok.tolist() == [True]
    assert got.tolist() == [[1.0, 4.0]]
