"""Structured selection (spec step 5): kept counts, top-scoring units, GQA policies, ratio inflation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ppframework.pipeline import inflated_ratio
from ppframework.strategies.masking import (
    StructuredMask,
    head_scores,
    pruned_count,
    rounded_keep,
    structured_mask,
)
from ppframework.strategies.scoring import activation_times_weight, weight_only
from ppframework.types import BlockContext, BlockGeometry, BlockKind, ChannelScores

# --------------------------------------------------------------------------- helpers


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def expected_mlp_keep(d: int, pct: int, round_to: int) -> int:
    """min(D, ceil((D - floor(p * D)) / r) * r) with p = pct / 100, in exact integers."""
    keep = d - (pct * d) // 100
    return min(d, ceil_div(keep, round_to) * round_to)


def make_ctx(geo: BlockGeometry, round_to: int = 1, gqa_policy: str = "query-only") -> BlockContext:
    return BlockContext(
        layer=4,
        kind=geo.kind,
        batch_index=2,
        geometry=geo,
        seq_len=8,
        generator=torch.Generator().manual_seed(0),
        round_to=round_to,
        gqa_policy=gqa_policy,
    )


def make_scores(gen: torch.Generator, channels: int, head_reduce: str = "l2") -> ChannelScores:
    """PPsp-style scores: a_c * w_c with distinct positive random factors."""
    activation = torch.rand(channels, generator=gen) + 0.01
    weight_term = torch.rand(channels, generator=gen) + 0.01
    return ChannelScores(
        weight_term=weight_term,
        combine=activation_times_weight,
        head_reduce=head_reduce,
        activation=activation,
    )


def top_indices(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.argsort(scores.double(), descending=True)[:k].tolist())


def ref_head_scores(channel: torch.Tensor, head_dim: int, reduce: str) -> torch.Tensor:
    heads = channel.numel() // head_dim
    out = []
    for h in range(heads):
        chunk = [float(x) for x in channel[h * head_dim : (h + 1) * head_dim]]
        out.append(sum(x * x for x in chunk) ** 0.5 if reduce == "l2" else sum(chunk))
    return torch.tensor(out, dtype=torch.float64)


# --------------------------------------------------------------------------- counts


def test_pruned_count_float_robust() -> None:
    assert pruned_count(10, 0.3) == 3
    assert pruned_count(100, 0.29) == 29  # 0.29 * 100 == 28.999999999999996 in floats
    assert pruned_count(100, 0.57) == 57  # 56.99999999999999
    assert pruned_count(32, 0.44) == 14
    assert pruned_count(11008, 0.22) == 2421
    assert pruned_count(7, 0.0) == 0
    assert pruned_count(7, 1.0) == 7


@settings(max_examples=50, deadline=None)
@given(total=st.integers(0, 20000), pct=st.integers(0, 100))
def test_pruned_count_is_floor(total: int, pct: int) -> None:
    assert pruned_count(total, pct / 100) == (pct * total) // 100


def test_rounded_keep_hand_examples() -> None:
    assert rounded_keep(11008, 0.44, 64) == 6208  # 11008 - 4843 = 6165 -> 97 * 64
    assert rounded_keep(11008, 0.44, 1) == 6165
    assert rounded_keep(100, 0.3, 8) == 72  # 70 -> 72
    assert rounded_keep(100, 0.0, 64) == 100  # rounding never exceeds D
    assert rounded_keep(10, 0.95, 8) == 8


@settings(max_examples=50, deadline=None)
@given(d=st.integers(1, 5000), pct=st.integers(0, 99), round_to=st.sampled_from([1, 2, 8, 64, 128]))
def test_rounded_keep_matches_spec(d: int, pct: int, round_to: int) -> None:
    assert rounded_keep(d, pct / 100, round_to) == expected_mlp_keep(d, pct, round_to)


def test_inflated_ratio_examples() -> None:
    assert inflated_ratio(0.4, 30, 3) == pytest.approx(0.44)
    assert inflated_ratio(0.2, 32, 3) == pytest.approx(0.22)
    assert inflated_ratio(0.4, 32, 3) == pytest.approx(0.44)
    assert inflated_ratio(0.4, 32, 0) == 0.4
    assert inflated_ratio(0.4, 32, 3, inflate=False) == 0.4
    assert inflated_ratio(0.0, 4, 4) == 0.0  # every layer skipped at ratio 0: no division by zero


@settings(max_examples=50, deadline=None)
@given(pct=st.integers(0, 60), layers=st.integers(4, 100), data=st.data())
def test_inflated_ratio_formula(pct: int, layers: int, data: st.DataObject) -> None:
    skipped = data.draw(st.integers(0, layers - 1))
    p = pct / 100
    got = inflated_ratio(p, layers, skipped)
    want = p if skipped == 0 else round(layers / (layers - skipped) * p, 2)
    assert got == want
    assert got >= p - 1e-12
    assert inflated_ratio(p, layers, skipped, inflate=False) == p


# --------------------------------------------------------------------------- MLP


@settings(max_examples=50, deadline=None)
@given(
    d=st.integers(1, 300),
    pct=st.integers(0, 95),
    round_to=st.sampled_from([1, 2, 8, 64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_mlp_keeps_rounded_top_channels(d: int, pct: int, round_to: int, seed: int) -> None:
    geo = BlockGeometry(BlockKind.MLP, units=d, unit_width=1)
    scores = make_scores(torch.Generator().manual_seed(seed), d)
    mask = structured_mask(make_ctx(geo, round_to=round_to), scores, pct / 100)
    keep = expected_mlp_keep(d, pct, round_to)
    assert mask.n_kept == keep
    assert mask.total_units == d
    assert mask.kept_kv_heads is None
    assert mask.kept_units.dtype == torch.long
    assert mask.kept_units.tolist() == top_indices(scores.channel_scores(), keep)
    assert torch.allclose(mask.unit_scores, scores.activation * scores.weight_term)


def test_mlp_hand_example_via_hook() -> None:
    geo = BlockGeometry(BlockKind.MLP, units=6, unit_width=1)
    scores = ChannelScores(
        weight_term=torch.tensor([1.0, 2.0, 1.0, 1.0, 4.0, 1.0]),
        combine=activation_times_weight,
        activation=torch.tensor([5.0, 1.0, 0.5, 3.0, 1.0, 0.1]),
    )
    # scores: [5, 2, 0.5, 3, 4, 0.1]; p = 0.5 drops floor(3) -> keep the top 3 = {0, 3, 4}
    mask = StructuredMask().apply_mask(ctx=make_ctx(geo), scores=scores, ratio=0.5)
    assert mask.kept_units.tolist() == [0, 3, 4]
    # round_to = 4: keep ceil(3 / 4) * 4 = 4 -> {0, 1, 3, 4}
    mask4 = StructuredMask().apply_mask(ctx=make_ctx(geo, round_to=4), scores=scores, ratio=0.5)
    assert mask4.kept_units.tolist() == [0, 1, 3, 4]


# --------------------------------------------------------------------------- attention


def test_head_scores_hand() -> None:
    channel = torch.tensor([3.0, 4.0, 1.0, 1.0])
    assert head_scores(channel, 2, "l2").tolist() == pytest.approx([5.0, 2**0.5])
    assert head_scores(channel, 2, "sum").tolist() == pytest.approx([7.0, 2.0])
    with pytest.raises(ValueError):
        head_scores(channel, 2, "max")


@settings(max_examples=50, deadline=None)
@given(
    heads=st.integers(1, 16),
    head_dim=st.integers(1, 8),
    pct=st.integers(0, 95),
    reduce=st.sampled_from(["l2", "sum"]),
    policy=st.sampled_from(["query-only", "group"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_mha_keeps_top_heads(
    heads: int, head_dim: int, pct: int, reduce: str, policy: str, seed: int
) -> None:
    geo = BlockGeometry(BlockKind.ATTENTION, units=heads, unit_width=head_dim, num_kv_heads=heads)
    scores = make_scores(torch.Generator().manual_seed(seed), heads * head_dim, reduce)
    mask = structured_mask(make_ctx(geo, gqa_policy=policy), scores, pct / 100)
    keep = heads - (pct * heads) // 100
    want_scores = ref_head_scores(scores.channel_scores(), head_dim, reduce)
    assert torch.allclose(mask.unit_scores.double(), want_scores, rtol=1e-5)
    assert mask.n_kept == keep
    assert mask.total_units == heads
    assert mask.kept_units.tolist() == top_indices(want_scores, keep)
    assert mask.kept_kv_heads is not None
    assert torch.equal(mask.kept_kv_heads, mask.kept_units)


def test_mha_hand_example_head_l2() -> None:
    geo = BlockGeometry(BlockKind.ATTENTION, units=3, unit_width=2, num_kv_heads=3)
    # channel scores: head0 (3, 4) -> 5 ; head1 (6, 0) -> 6 ; head2 (1, 1) -> 1.41. Sum would give 7, 6, 2.
    scores = ChannelScores(
        weight_term=torch.tensor([3.0, 4.0, 6.0, 0.0, 1.0, 1.0]), combine=weight_only, head_reduce="l2"
    )
    mask = structured_mask(make_ctx(geo), scores, 0.34)  # floor(1.02) = 1 head pruned
    assert mask.kept_units.tolist() == [0, 1]
    assert mask.unit_scores.tolist() == pytest.approx([5.0, 6.0, 2**0.5])
    mask = structured_mask(make_ctx(geo), scores, 0.67)  # floor(2.01) = 2 heads pruned
    assert mask.kept_units.tolist() == [1]  # L2 ranks head 1 first (sum would rank head 0)
    scores.head_reduce = "sum"
    assert structured_mask(make_ctx(geo), scores, 0.67).kept_units.tolist() == [0]


gqa_case = st.fixed_dictionaries(
    {
        "kv": st.integers(1, 6),
        "group": st.integers(2, 4),
        "head_dim": st.integers(1, 4),
        "pct": st.integers(0, 95),
        "reduce": st.sampled_from(["l2", "sum"]),
        "seed": st.integers(0, 2**31 - 1),
    }
)


@settings(max_examples=50, deadline=None)
@given(case=gqa_case)
def test_gqa_query_only_keeps_kv_dense(case: dict) -> None:
    heads = case["kv"] * case["group"]
    geo = BlockGeometry(
        BlockKind.ATTENTION, units=heads, unit_width=case["head_dim"], num_kv_heads=case["kv"]
    )
    scores = make_scores(
        torch.Generator().manual_seed(case["seed"]), heads * case["head_dim"], case["reduce"]
    )
    mask = structured_mask(make_ctx(geo, gqa_policy="query-only"), scores, case["pct"] / 100)
    keep = heads - (case["pct"] * heads) // 100
    want_scores = ref_head_scores(scores.channel_scores(), case["head_dim"], case["reduce"])
    assert mask.kept_kv_heads is None
    assert mask.n_kept == keep
    assert mask.kept_units.tolist() == top_indices(want_scores, keep)


@settings(max_examples=50, deadline=None)
@given(case=gqa_case)
def test_gqa_group_policy_keeps_whole_groups(case: dict) -> None:
    kv, group = case["kv"], case["group"]
    heads = kv * group
    geo = BlockGeometry(BlockKind.ATTENTION, units=heads, unit_width=case["head_dim"], num_kv_heads=kv)
    scores = make_scores(
        torch.Generator().manual_seed(case["seed"]), heads * case["head_dim"], case["reduce"]
    )
    mask = structured_mask(make_ctx(geo, gqa_policy="group"), scores, case["pct"] / 100)

    kept_groups = kv - (case["pct"] * kv) // 100
    assert mask.kept_kv_heads is not None
    kv_list = mask.kept_kv_heads.tolist()
    assert len(kv_list) == kept_groups and kv_list == sorted(set(kv_list))
    assert mask.n_kept == kept_groups * group
    assert mask.kept_units.tolist() == [g * group + j for g in kv_list for j in range(group)]
    assert mask.total_units == heads
    # groups are ranked by their heads' scores, reduced the same way as channels -> heads
    heads_ref = ref_head_scores(scores.channel_scores(), case["head_dim"], case["reduce"])
    group_ref = ref_head_scores(heads_ref.float(), group, case["reduce"])
    assert kv_list == top_indices(group_ref, kept_groups)


def test_gqa_group_hand_example() -> None:
    # 4 query heads, 2 kv heads (groups {0,1}, {2,3}), head_dim 1: head scores = channel scores.
    geo = BlockGeometry(BlockKind.ATTENTION, units=4, unit_width=1, num_kv_heads=2)
    scores = ChannelScores(weight_term=torch.tensor([1.0, 9.0, 5.0, 4.0]), combine=weight_only)
    grouped = structured_mask(make_ctx(geo, gqa_policy="group"), scores, 0.5)
    assert grouped.kept_kv_heads.tolist() == [0]  # L2: sqrt(82) > sqrt(41)
    assert grouped.kept_units.tolist() == [0, 1]
    query_only = structured_mask(make_ctx(geo, gqa_policy="query-only"), scores, 0.5)
    assert query_only.kept_units.tolist() == [1, 2]
    assert query_only.kept_kv_heads is None


@pytest.mark.parametrize("policy", ["query-only", "group"])
def test_default_num_kv_heads_means_mha(policy: str) -> None:
    scores = ChannelScores(weight_term=torch.arange(8.0), combine=weight_only)
    explicit = BlockGeometry(BlockKind.ATTENTION, units=4, unit_width=2, num_kv_heads=4)
    default = BlockGeometry(BlockKind.ATTENTION, units=4, unit_width=2)
    assert default.group_size == 1
    want = structured_mask(make_ctx(explicit, gqa_policy=policy), scores, 0.5)
    got = structured_mask(make_ctx(default, gqa_policy=policy), scores, 0.5)
    assert got.kept_units.tolist() == want.kept_units.tolist() == [2, 3]
    assert got.kept_kv_heads is not None and got.kept_kv_heads.tolist() == [2, 3]
