"""The Beyond-PP options: PPsp's L1 row reduction, dynamic bias compensation, centred scores, and
fusion over the positions the probe missed. Each is off in ``pp``; each is checked alone."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ppframework.adapters import get_adapter
from ppframework.calibration import calibrate
from ppframework.config import MethodConfig
from ppframework.history import BlockHistory
from ppframework.pipeline import Pipeline
from ppframework.strategies.fusion import (
    CompletionFusion,
    FusionParams,
    ImportanceScaledFusion,
    centred_rows,
    completion_fusion,
    importance_scaled_fusion,
)
from ppframework.strategies.masking import compensation_bias
from ppframework.strategies.scoring import PPspParams, PPspScore, ppsp_weight_term
from ppframework.testing.tiny import tiny_model
from ppframework.types import BlockContext, BlockGeometry, BlockKind, ChannelScores, Probe


def _ctx(seq_len: int, position_valid: torch.Tensor | None = None) -> BlockContext:
    return BlockContext(
        layer=3,
        kind=BlockKind.MLP,
        batch_index=1,
        geometry=BlockGeometry(BlockKind.MLP, units=6, unit_width=1),
        seq_len=seq_len,
        generator=torch.Generator().manual_seed(0),
        position_valid=position_valid,
    )


def _method(**ppsp: object) -> MethodConfig:
    return MethodConfig.model_validate(
        {
            "preset": "pp",
            "pruning": {"ratio": 0.5, "skip_layers": [], "round_to": 1},
            "strategies": {"score_channels": {"name": "ppsp", "params": ppsp}},
        }
    )


# --------------------------------------------------------------------------- PPsp options


def test_ppsp_defaults_are_the_papers() -> None:
    weight = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    probe = Probe(
        batch_index=torch.tensor([0]), token_index=torch.tensor([0, 1]), valid=torch.ones(1, 2).bool()
    )
    states = torch.randn(1, 2, 6, generator=torch.Generator().manual_seed(1))
    scores = PPspScore().score_channels(ctx=_ctx(2), probe=probe, probe_states=states, weight=weight)
    assert torch.equal(scores.weight_term, ppsp_weight_term(weight))
    assert not scores.bias_compensation and not scores.centered


def test_ppsp_l1_row_reduction_is_the_squared_column_norm() -> None:
    weight = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    scores = PPspScore(PPspParams(row_reduce="l1")).score_channels(
        ctx=_ctx(2), probe=None, probe_states=None, weight=weight
    )
    assert scores.weight_term.tolist() == pytest.approx([10.0, 4.25])


def test_centered_without_compensation_is_refused() -> None:
    with pytest.raises(ValidationError, match="bias_compensation: true"):
        PPspParams(centered=True)


def test_compensation_without_calibration_history_names_the_field() -> None:
    with pytest.raises(ValidationError, match=r"params.bias_compensation.*history.init 'calibration'"):
        MethodConfig.model_validate(
            {
                "preset": "no-history",
                "strategies": {"score_channels": {"name": "ppsp", "params": {"bias_compensation": True}}},
            }
        )


# --------------------------------------------------------------------------- fusion options


def test_centred_rows_subtract_the_squared_mean_at_absolute_positions() -> None:
    history = BlockHistory(sq_mean=torch.zeros(4, 2), mean=torch.tensor([[1.0, 0], [2, 1], [0, 3], [1, 1]]))
    rows = torch.tensor([[5.0, 5.0], [1.0, 20.0]])
    out = centred_rows(rows, history, torch.tensor([1, 2]))
    assert out.tolist() == [[1.0, 4.0], [1.0, 11.0]]
    assert centred_rows(torch.zeros(2, 2), history, None).min() == 0.0  # clamped, never negative


@settings(max_examples=40, deadline=None)
@given(
    seq_len=st.integers(2, 16),
    channels=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_unprobed_history_adds_exactly_the_missed_real_positions(
    seq_len: int, channels: int, seed: int, data: st.DataObject
) -> None:
    gen = torch.Generator().manual_seed(seed)
    k_t = data.draw(st.integers(1, seq_len))
    positions = torch.randperm(seq_len, generator=gen)[:k_t].sort().values
    sq_mean = torch.rand(seq_len + 3, channels, generator=gen, dtype=torch.float64) * 5
    evidence = torch.rand(k_t, channels, generator=gen, dtype=torch.float64) * 5
    real = torch.rand(seq_len, generator=gen) < 0.8
    probe_valid = real[positions]

    def fused(unprobed: str) -> torch.Tensor:
        scores = ChannelScores(
            weight_term=torch.ones(channels, dtype=torch.float64),
            combine=lambda a, w: a * w,
            evidence=evidence.clone(),
            positions=positions,
            position_valid=probe_valid,
        )
        fusion = ImportanceScaledFusion(FusionParams(unprobed=unprobed))
        out = fusion.fuse_history(
            ctx=_ctx(seq_len, real), scores=scores, history=BlockHistory(sq_mean=sq_mean)
        )
        return out.activation

    want = torch.zeros(channels, dtype=torch.float64)
    for t in range(seq_len):
        if not bool(real[t]):
            continue
        hit = (positions == t).nonzero()
        if hit.numel():
            want += importance_scaled_fusion(evidence[int(hit[0])], sq_mean[t])
        else:
            want += sq_mean[t]
    assert torch.allclose(fused("history"), want, rtol=1e-10, atol=1e-12)
    assert torch.all(fused("history") >= fused("skip") - 1e-12)
    if k_t == seq_len:
        assert torch.equal(fused("history"), fused("skip"))


def test_centred_history_only_scores_the_variance() -> None:
    sq_mean = torch.tensor([[5.0, 2.0], [4.0, 9.0], [1.0, 1.0]])
    mean = torch.tensor([[2.0, 1.0], [1.0, 3.0], [0.0, 0.0]])
    scores = ChannelScores(weight_term=torch.ones(2), combine=lambda a, w: a * w, centered=True)
    out = ImportanceScaledFusion().fuse_history(
        ctx=_ctx(2), scores=scores, history=BlockHistory(sq_mean=sq_mean, mean=mean)
    )
    assert out.activation.tolist() == pytest.approx([1.0 + 3.0, 1.0 + 0.0])


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_model("llama")
    ids = torch.randint(0, 200, (4, 16), generator=torch.Generator().manual_seed(7))
    return model, ids, calibrate(model, get_adapter(model), [ids], progress=False)


def _run(model, ids, method, history, infer="sliced"):
    method = method.model_copy(deep=True)
    method.strategies.infer.name = infer
    with Pipeline(model, method, history=history.clone()) as pipe, torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    return logits, pipe


def test_dynamic_compensation_sliced_equals_masked_and_changes_the_output(calibrated) -> None:
    model, ids, history = calibrated
    compensated = _method(bias_compensation=True)
    sliced, pipe = _run(model, ids, compensated, history)
    masked, _ = _run(model, ids, compensated, history, infer="masked")
    torch.testing.assert_close(sliced, masked, rtol=1e-4, atol=1e-4)
    plain, plain_pipe = _run(model, ids, _method(), history)
    # compensation does not change the scores: the first block decides alike (later blocks see the
    # compensated outputs, so their decisions may move)
    first = (0, BlockKind.ATTENTION)
    assert torch.equal(plain_pipe.last_masks[first].kept_units, pipe.last_masks[first].kept_units)
    assert plain_pipe.last_masks[first].output_bias is None
    assert all(mask.output_bias is not None for mask in pipe.last_masks.values())
    assert not torch.allclose(sliced, plain)


def test_compensation_bias_is_the_pruned_columns_times_their_means() -> None:
    weight = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mean = torch.tensor([0.5, -1.0, 2.0])
    bias = compensation_bias(weight, mean, torch.tensor([1]))
    assert bias.tolist() == pytest.approx([1.0 * 0.5 + 3.0 * 2.0, 4.0 * 0.5 + 6.0 * 2.0])


def test_ratio_zero_with_every_option_leaves_the_model_untouched(calibrated) -> None:
    model, ids, history = calibrated
    method = MethodConfig.model_validate(
        {
            "preset": "pp",
            "pruning": {"ratio": 0.0},
            "strategies": {
                "score_channels": {
                    "name": "ppsp",
                    "params": {"bias_compensation": True, "centered": True, "row_reduce": "l1"},
                },
                "fuse_history": {"name": "importance-scaled", "params": {"unprobed": "history"}},
            },
        }
    )
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits
    pruned, pipe = _run(model, ids, method, history)
    assert pipe.is_dense
    assert torch.equal(pruned, reference)


# --------------------------------------------------------------------------- completion fusion


@settings(max_examples=40, deadline=None)
@given(
    seq_len=st.integers(2, 12),
    channels=st.integers(1, 5),
    batch=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_completion_fusion_predicts_the_unprobed_rows_with_history(
    seq_len: int, channels: int, batch: int, seed: int, data: st.DataObject
) -> None:
    """a_c = sum over real positions of (n_t P + (R_t - n_t) Hist) / R_t, Hist where unprobed."""
    gen = torch.Generator().manual_seed(seed)
    k_t = data.draw(st.integers(1, seq_len))
    k_b = data.draw(st.integers(1, batch))
    positions = torch.randperm(seq_len, generator=gen)[:k_t].sort().values
    rows_per_position = torch.randint(0, batch + 1, (seq_len,), generator=gen)
    real = rows_per_position > 0
    valid = torch.rand(k_b, k_t, generator=gen) < 0.8
    valid &= torch.arange(k_b)[:, None] < rows_per_position[positions][None, :]  # never more than R_t
    states = torch.randn(k_b, k_t, channels, generator=gen, dtype=torch.float64)
    sq_mean = torch.rand(seq_len + 2, channels, generator=gen, dtype=torch.float64) * 3
    probe = Probe(batch_index=torch.arange(k_b), token_index=positions, valid=valid)
    ctx = _ctx(seq_len, real)
    ctx.rows_per_position = rows_per_position
    scores = PPspScore().score_channels(
        ctx=ctx, probe=probe, probe_states=states, weight=torch.ones(2, channels)
    )
    out = CompletionFusion().fuse_history(ctx=ctx, scores=scores, history=BlockHistory(sq_mean=sq_mean))
    want = torch.zeros(channels, dtype=torch.float64)
    for t in range(seq_len):
        if not bool(real[t]):
            continue
        hit = (positions == t).nonzero()
        n = int(valid[:, int(hit[0])].sum()) if hit.numel() else 0
        if n == 0:
            want += sq_mean[t]
            continue
        i = int(hit[0])
        observed = sum(states[b, i] ** 2 for b in range(k_b) if bool(valid[b, i]))
        want += (observed + (int(rows_per_position[t]) - n) * sq_mean[t]) / int(rows_per_position[t])
    assert torch.allclose(out.activation.double(), want, rtol=1e-5, atol=1e-6)


def test_completion_with_the_whole_batch_as_probe_is_full_batch_scoring() -> None:
    gen = torch.Generator().manual_seed(3)
    states = torch.randn(4, 6, 3, generator=gen)
    probe = Probe(
        batch_index=torch.arange(4), token_index=torch.arange(6), valid=torch.ones(4, 6, dtype=torch.bool)
    )
    ctx = _ctx(6, torch.ones(6, dtype=torch.bool))
    ctx.rows_per_position = torch.full((6,), 4)
    history = BlockHistory(sq_mean=torch.rand(8, 3, generator=gen) * 100)  # never used: every row observed
    scores = PPspScore().score_channels(ctx=ctx, probe=probe, probe_states=states, weight=torch.ones(2, 3))
    out = CompletionFusion().fuse_history(ctx=ctx, scores=scores, history=history)
    torch.testing.assert_close(out.activation, states.square().mean(dim=0).sum(dim=0))


def test_completion_probe_row_weight_moves_towards_the_probe() -> None:
    evidence, past = torch.tensor([[4.0]]), torch.tensor([[0.0]])
    one, rows = torch.tensor([1]), torch.tensor([8])
    assert completion_fusion(evidence, past, one, rows).item() == pytest.approx(0.5)
    assert completion_fusion(evidence, past, one, rows, probe_row_weight=4.0).item() == pytest.approx(2.0)
    assert completion_fusion(evidence, past, one, rows, probe_row_weight=100.0).item() == pytest.approx(4.0)


def test_compensation_means_from_the_probe_average_its_real_entries() -> None:
    states = torch.tensor([[[1.0, 10.0], [3.0, 20.0]], [[5.0, 30.0], [100.0, 100.0]]])
    valid = torch.tensor([[True, True], [True, False]])
    probe = Probe(batch_index=torch.tensor([0, 1]), token_index=torch.tensor([0, 1]), valid=valid)
    params = PPspParams(bias_compensation=True, compensation_mean="probe")
    scores = PPspScore(params).score_channels(
        ctx=_ctx(2), probe=probe, probe_states=states, weight=torch.ones(3, 2)
    )
    assert scores.channel_mean.tolist() == pytest.approx([3.0, 20.0])
    # the fusion keeps the probe's means rather than the calibration's
    history = BlockHistory(sq_mean=torch.ones(2, 2), mean=torch.full((2, 2), -7.0))
    fused = ImportanceScaledFusion().fuse_history(ctx=_ctx(2), scores=scores, history=history)
    assert fused.channel_mean.tolist() == pytest.approx([3.0, 20.0])


def test_probe_compensation_needs_no_calibration_history() -> None:
    method = MethodConfig.model_validate(
        {
            "preset": "no-history",
            "strategies": {
                "score_channels": {
                    "name": "ppsp",
                    "params": {"bias_compensation": True, "compensation_mean": "probe"},
                }
            },
        }
    )
    assert method.strategies.score_channels.params["compensation_mean"] == "probe"
