"""GRIFFIN (``score_channels: griffin``, preset ``griffin``) against its definition.

The reference is written here from GRIFFIN's formula (``hdong920/GRIFFIN src/griffin/llama.py``,
``LlamaMLP.forward``): ``s = (z / z.norm(dim=-1, keepdim=True)).norm(dim=1)`` over the prompt's
tokens, ``k = int(D_ff * density)``, ``topk``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ppframework import cli
from ppframework.config import PRESETS, MethodConfig
from ppframework.registry import StrategyRegistry
from ppframework.strategies.fusion import ProbeOnlyFusion
from ppframework.strategies.griffin import GriffinScore, griffin_statistic, normalized_sq_evidence
from ppframework.strategies.masking import StructuredMask
from ppframework.testing import check_strategy, make_context
from ppframework.types import BlockGeometry, BlockKind, Probe


def reference_statistic(tokens: torch.Tensor) -> torch.Tensor:
    """GRIFFIN's neuron statistic of one prompt's activations ``tokens`` (T, D_ff), float64."""
    z = tokens.double()
    return (z / z.norm(dim=-1, keepdim=True)).norm(dim=0)


def reference_kept(tokens: torch.Tensor, density: float) -> torch.Tensor:
    """GRIFFIN's kept neurons (sorted): ``topk(stat, int(D_ff * density))``."""
    stat = reference_statistic(tokens)
    return torch.topk(stat, int(stat.numel() * density)).indices.sort().values


def mlp_context(channels: int, seq: int, position_valid: torch.Tensor | None = None):
    geometry = BlockGeometry(BlockKind.MLP, units=channels, unit_width=1)
    return make_context(BlockKind.MLP, geometry, seq_len=seq, position_valid=position_valid)


def run_stages(states: torch.Tensor, valid: torch.Tensor, ratio: float = 0.5):
    """score_channels 'griffin' -> fuse_history 'none' -> apply_mask 'structured' on a probe of the
    whole (padded) batch; returns (final channel scores, kept channels)."""
    rows, seq, channels = states.shape
    probe = Probe(batch_index=torch.arange(rows), token_index=torch.arange(seq), valid=valid)
    ctx = mlp_context(channels, seq, valid.any(dim=0))
    weight = torch.randn(7, channels)
    scores = GriffinScore().score_channels(ctx=ctx, probe=probe, probe_states=states, weight=weight)
    fused = ProbeOnlyFusion().fuse_history(ctx=ctx, scores=scores, history=None)
    mask = StructuredMask().apply_mask(ctx=ctx, scores=fused, ratio=ratio)
    return fused.channel_scores(), mask.kept_units


# ----------------------------------------------------------------------------- the statistic


def test_one_prompt_gives_griffins_statistic_and_kept_set():
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(1, 13, 64, generator=gen) * torch.rand(1, 13, 1, generator=gen) * 5
    valid = torch.ones(1, 13, dtype=torch.bool)
    final, kept = run_stages(states, valid)
    torch.testing.assert_close(final.double(), reference_statistic(states[0]), rtol=1e-5, atol=1e-6)
    assert torch.equal(kept, reference_kept(states[0], 0.5))


def test_padding_rows_and_tokens_are_ignored():
    gen = torch.Generator().manual_seed(1)
    states = torch.randn(3, 9, 40, generator=gen)
    valid = torch.ones(3, 9, dtype=torch.bool)
    valid[0, :3] = False  # left padding
    valid[1, 6:] = False  # right padding
    valid[2] = False  # an all-padding row
    states[~valid] = 1e4 * torch.randn(int((~valid).sum()), 40, generator=gen)  # garbage at padding
    final, kept = run_stages(states, valid)
    real_tokens = states[valid]  # every real token of the batch, as one prompt
    torch.testing.assert_close(final.double(), reference_statistic(real_tokens), rtol=1e-5, atol=1e-6)
    assert torch.equal(kept, reference_kept(real_tokens, 0.5))
    # one row with padding alone: exactly GRIFFIN on that row's real tokens
    final_row, kept_row = run_stages(states[1:2], valid[1:2])
    torch.testing.assert_close(final_row.double(), reference_statistic(states[1, :6]), rtol=1e-5, atol=1e-6)
    assert torch.equal(kept_row, reference_kept(states[1, :6], 0.5))


def test_evidence_per_position_and_validity():
    states = torch.tensor([[[3.0, 4.0], [1.0, 0.0]], [[0.0, 2.0], [5.0, 5.0]]])  # (2 rows, 2 pos, 2 ch)
    valid = torch.tensor([[True, False], [True, False]])
    evidence, position_valid = normalized_sq_evidence(states, valid)
    torch.testing.assert_close(evidence, torch.tensor([[0.36, 0.64 + 1.0], [0.0, 0.0]]))
    assert position_valid.tolist() == [True, False]


def test_an_all_zero_token_contributes_nothing_instead_of_nan():
    states = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]]])
    evidence, _ = normalized_sq_evidence(states, torch.ones(1, 2, dtype=torch.bool))
    assert torch.isfinite(evidence).all()
    torch.testing.assert_close(evidence, torch.tensor([[0.0, 0.0, 0.0], [1 / 9, 4 / 9, 4 / 9]]))


def test_bfloat16_states_are_scored_in_float32():
    gen = torch.Generator().manual_seed(2)
    states = torch.randn(1, 5, 16, generator=gen).to(torch.bfloat16)
    evidence, _ = normalized_sq_evidence(states, torch.ones(1, 5, dtype=torch.bool))
    assert evidence.dtype == torch.float32
    expected = (states.float() / states.float().norm(dim=-1, keepdim=True)).square()[0]
    torch.testing.assert_close(evidence, expected)


def test_no_probe_or_no_activation_is_a_clear_error():
    ctx = mlp_context(8, 4)
    with pytest.raises(ValueError, match="needs a probe"):
        GriffinScore().score_channels(ctx=ctx, probe=None, probe_states=None, weight=torch.randn(3, 8))
    with pytest.raises(ValueError, match="fuse_history 'none'"):
        griffin_statistic(None, torch.ones(8))


def test_attention_blocks_rank_heads_by_the_l2_of_their_channel_statistics():
    geometry = BlockGeometry(BlockKind.ATTENTION, units=4, unit_width=3, num_kv_heads=2)
    ctx = make_context(BlockKind.ATTENTION, geometry, seq_len=6)
    gen = torch.Generator().manual_seed(3)
    states = torch.randn(1, 6, 12, generator=gen)
    probe = Probe(torch.arange(1), torch.arange(6), torch.ones(1, 6, dtype=torch.bool))
    weight = torch.randn(5, 12)
    scores = GriffinScore().score_channels(ctx=ctx, probe=probe, probe_states=states, weight=weight)
    fused = ProbeOnlyFusion().fuse_history(ctx=ctx, scores=scores, history=None)
    mask = StructuredMask().apply_mask(ctx=ctx, scores=fused, ratio=0.5)
    heads = reference_statistic(states[0]).view(4, 3).norm(dim=1)
    assert mask.kept_units.tolist() == sorted(torch.topk(heads, 2).indices.tolist())


# ----------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 3),
    seq=st.integers(1, 10),
    channels=st.integers(2, 48),
    pct=st.integers(0, 95),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_kept_set_is_the_top_k_of_the_statistic(rows, seq, channels, pct, seed, data):
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(rows, seq, channels, generator=gen)
    valid = torch.rand(rows, seq, generator=gen) < 0.7
    row, pos = data.draw(st.integers(0, rows - 1)), data.draw(st.integers(0, seq - 1))
    valid[row, pos] = True  # at least one real token
    ratio = pct / 100
    final, kept = run_stages(states, valid, ratio)
    stat = reference_statistic(states[valid])
    keep = channels - int(ratio * channels + 1e-9)
    ordered = stat.sort(descending=True).values
    assume(keep == channels or float(ordered[keep - 1] - ordered[keep]) > 1e-5)  # no near-tie at the cut
    assert set(kept.tolist()) == set(torch.topk(stat, keep).indices.tolist())
    torch.testing.assert_close(final.double(), stat, rtol=1e-5, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    seq=st.integers(1, 10),
    channels=st.integers(2, 48),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_scaling_one_tokens_activations_changes_nothing(seq, channels, scale, seed, data):
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(1, seq, channels, generator=gen)
    valid = torch.ones(1, seq, dtype=torch.bool)
    token = data.draw(st.integers(0, seq - 1), label="token")
    scaled = states.clone()
    scaled[0, token] *= scale
    before, kept_before = run_stages(states, valid)
    after, kept_after = run_stages(scaled, valid)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    ordered = before.sort(descending=True).values
    keep = kept_before.numel()
    assume(keep == channels or float(ordered[keep - 1] - ordered[keep]) > 1e-4)
    assert torch.equal(kept_after, kept_before)


# ----------------------------------------------------------------------------- registration and preset


def test_griffin_passes_the_conformance_suite():
    check_strategy(GriffinScore(), max_examples=40)


def test_griffin_is_a_registered_builtin():
    registry = StrategyRegistry()
    registry.load_builtins()
    assert "griffin" in registry.names("score_channels")
    check_strategy(registry.get("score_channels", "griffin").build(), max_examples=5)


def test_the_griffin_preset(capsys):
    method = MethodConfig.model_validate({"preset": "griffin"})
    assert method.pruning.ratio == 0.5 and method.pruning.targets == ["mlp"]
    assert method.pruning.skip_layers == [] and method.pruning.inflate_ratio is False
    assert method.pruning.round_to == 1
    stages = {name: stage.name for name, stage in method.strategies}
    assert stages == {
        "allocate": "uniform",
        "select_probe": "full",
        "score_channels": "griffin",
        "fuse_history": "none",
        "apply_mask": "structured",
        "infer": "sliced",
    }
    assert method.history.init == "none"
    assert (method.prefill, method.decision, method.decode) == ("dense", "sequence", "frozen")
    assert "attention is not pruned" in PRESETS["griffin"]["description"].lower()
    assert list(PRESETS)[-2:] == ["griffin", "dense"]
    assert cli.main(["presets"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert "griffin" in listed
