"""The ablation and baseline strategies: hand-computed metrics, probe/fusion rules, and the
static-vs-dynamic agreements the paper's definitions imply."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ppframework.adapters import base as adapter_base
from ppframework.adapters import get_adapter
from ppframework.calibration import calibrate
from ppframework.config import MethodConfig
from ppframework.history import BlockHistory
from ppframework.hookspecs import hookimpl
from ppframework.pipeline import Pipeline
from ppframework.strategies.fusion import (
    FixedFusion,
    HistoryOnlyFusion,
    ProbeOnlyFusion,
    history_statistic,
)
from ppframework.strategies.masking import compensation_bias, structured_mask
from ppframework.strategies.probe import (
    FullBatchProbe,
    NoProbe,
    RandomProbe,
    full_batch_probe,
    probe_sizes,
    select_random_probe,
)
from ppframework.strategies.scoring import FlapParams, FlapScore, MagnitudeScore, WandaSpScore
from ppframework.testing.tiny import tiny_model
from ppframework.types import BlockContext, BlockGeometry, BlockKind, ChannelScores

MLP_GEO = BlockGeometry(BlockKind.MLP, units=4, unit_width=1)
ATTN_GEO = BlockGeometry(BlockKind.ATTENTION, units=2, unit_width=2, num_kv_heads=2)


def ctx(geometry: BlockGeometry = MLP_GEO, seq_len: int = 3, valid=None, seed: int = 0) -> BlockContext:
    return BlockContext(
        layer=0,
        kind=geometry.kind,
        batch_index=0,
        geometry=geometry,
        seq_len=seq_len,
        generator=torch.Generator().manual_seed(seed),
        position_valid=valid,
    )


# ------------------------------------------------------------------------------- metrics by hand

W = torch.tensor([[1.0, -2.0, 0.5, 0.0], [3.0, 1.0, -0.5, 2.0]])  # (hidden 2, C 4)


def test_wanda_sp_score_by_hand():
    scores = WandaSpScore().score_channels(ctx=ctx(), probe=None, probe_states=None, weight=W)
    assert scores.weight_term.tolist() == [4.0, 3.0, 1.0, 2.0]  # sum_i |W[i, c]|
    scores.activation = torch.tensor([4.0, 1.0, 9.0, 0.0])
    # S_c = sum_i |W| * sqrt(a_c) = [4*2, 3*1, 1*3, 2*0]
    assert scores.channel_scores().tolist() == [8.0, 3.0, 3.0, 0.0]
    assert scores.head_reduce == "sum" and scores.statistic == "sq_mean"


def test_flap_score_by_hand():
    scores = FlapScore().score_channels(ctx=ctx(), probe=None, probe_states=None, weight=W)
    assert scores.weight_term.tolist() == [10.0, 5.0, 0.5, 4.0]  # sum_i W[i, c]^2
    scores.activation = torch.tensor([1.0, 2.0, 4.0, 0.5])
    assert scores.channel_scores().tolist() == [10.0, 10.0, 2.0, 2.0]
    assert scores.statistic == "fluctuation" and not scores.bias_compensation  # FLAP's all-position variance
    per_position = FlapScore(FlapParams(fluctuation="per-position"))  # flap-uniform's statistic
    scored = per_position.score_channels(ctx=ctx(), probe=None, probe_states=None, weight=W)
    assert scored.statistic == "variance"
    assert FlapScore(FlapParams(bias_compensation=True)).score_channels(
        ctx=ctx(), probe=None, probe_states=None, weight=W
    ).bias_compensation


def test_magnitude_score_ignores_activations():
    scores = MagnitudeScore().score_channels(ctx=ctx(), probe=None, probe_states=None, weight=W)
    scores.activation = torch.tensor([100.0, 0.0, 0.0, 0.0])
    assert scores.channel_scores().tolist() == [4.0, 3.0, 1.0, 2.0]


def test_flap_fluctuation_is_per_position_variance_summed_over_positions():
    # two positions; E[X^2] and E[X] per position -> variance E[X^2] - E[X]^2
    sq_mean = torch.tensor([[5.0, 1.0, 4.0, 0.0], [2.0, 1.0, 1.0, 9.0]])
    mean = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 3.0]])
    history = BlockHistory(sq_mean=sq_mean, mean=mean)
    variance = history_statistic(history, 2, "variance")
    assert variance.tolist() == [[4.0, 0.0, 4.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
    flap = FlapScore(FlapParams(fluctuation="per-position"))
    scores = flap.score_channels(ctx=ctx(seq_len=2), probe=None, probe_states=None, weight=W)
    fused = HistoryOnlyFusion().fuse_history(ctx=ctx(seq_len=2), scores=scores, history=history)
    assert fused.activation.tolist() == [5.0, 1.0, 4.0, 0.0]


def test_flap_bias_compensation_by_hand():
    mean = torch.tensor([1.0, 2.0, -1.0, 0.5])
    kept = torch.tensor([0, 2])
    # pruned channels 1 and 3: W[:, [1, 3]] @ [2, 0.5] = [-4 + 0, 2 + 1]
    assert compensation_bias(W, mean, kept).tolist() == [-4.0, 3.0]


def test_flap_mask_carries_the_compensation_bias():
    sq_mean = torch.tensor([[5.0, 1.0, 4.0, 1.0]])
    mean = torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    history = BlockHistory(sq_mean=sq_mean, mean=mean)
    c = ctx(seq_len=1)
    scores = FlapScore(FlapParams(bias_compensation=True)).score_channels(
        ctx=c, probe=None, probe_states=None, weight=W
    )
    scores = HistoryOnlyFusion().fuse_history(ctx=c, scores=scores, history=history)
    mask = structured_mask(c, scores, 0.5)
    # variance = [4, -3->0, 3, 0.75]; S = var * [10, 5, 0.5, 4] = [40, 0, 1.5, 3] -> keep 0 and 3
    assert mask.kept_units.tolist() == [0, 3]
    assert mask.output_bias.tolist() == compensation_bias(W, mean[0], torch.tensor([0, 3])).tolist()


# ------------------------------------------------------------------------------------ probes


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 6),
    seq=st.integers(2, 12),
    seq_ratio=st.floats(0.05, 1.0),
    batch_ratio=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
    pad=st.integers(0, 5),
)
def test_random_probe_has_pp_sizes_is_seeded_and_avoids_padding(
    batch, seq, seq_ratio, batch_ratio, seed, pad
):
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[batch - 1, max(1, seq - pad) :] = 0
    probe = select_random_probe(mask, seq_ratio, batch_ratio, torch.Generator().manual_seed(seed))
    again = select_random_probe(mask, seq_ratio, batch_ratio, torch.Generator().manual_seed(seed))
    assert torch.equal(probe.token_index, again.token_index)
    assert torch.equal(probe.batch_index, again.batch_index)
    k_rows, k_tokens = probe_sizes(batch, seq, seq_ratio, batch_ratio)
    assert probe.token_index.numel() == min(k_tokens, int(mask.any(dim=0).sum()))
    rows_with_a_real_probed_token = int(mask.bool()[:, probe.token_index].any(dim=1).sum())
    assert probe.batch_index.numel() == min(k_rows, rows_with_a_real_probed_token)
    assert bool(probe.valid.any(dim=1).all())
    assert bool(mask.bool()[:, probe.token_index].any(dim=0).all())
    assert torch.equal(probe.valid, mask.bool()[probe.batch_index][:, probe.token_index])
    assert bool((probe.token_index.diff() > 0).all()) and bool((probe.batch_index.diff() > 0).all())


def test_random_probe_draws_from_the_run_generator():
    mask = torch.ones(8, 64, dtype=torch.long)
    strategy = RandomProbe()
    first = strategy.select_probe(ctx=ctx(seed=1), residual=None, normed=None, attention_mask=mask)
    other = strategy.select_probe(ctx=ctx(seed=2), residual=None, normed=None, attention_mask=mask)
    assert not torch.equal(first.token_index, other.token_index)


def test_full_probe_is_the_whole_batch_without_all_padding_positions():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    probe = full_batch_probe(mask)
    assert probe.batch_index.tolist() == [0, 1] and probe.token_index.tolist() == [0, 1, 2]
    assert probe.valid.tolist() == [[True, True, True], [True, True, False]]
    chosen = FullBatchProbe().select_probe(ctx=ctx(), residual=None, normed=None, attention_mask=mask)
    assert torch.equal(chosen.token_index, probe.token_index)


def test_no_probe_returns_none_and_declares_itself_static():
    assert NoProbe().select_probe(ctx=ctx(), residual=None, normed=None, attention_mask=None) is None
    assert NoProbe.dynamic is False


# ------------------------------------------------------------------------------------ fusion


def _scores_with_evidence() -> ChannelScores:
    return ChannelScores(
        weight_term=torch.ones(4),
        combine=lambda a, w: a * w,
        evidence=torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]),
        positions=torch.tensor([0, 2]),
        position_valid=torch.tensor([True, False]),
    )


HISTORY = BlockHistory(
    sq_mean=torch.tensor([[2.0, 2.0, 2.0, 2.0], [9.0, 9.0, 9.0, 9.0], [4.0, 0.0, 1.0, 3.0]])
)


def test_probe_only_fusion_sums_valid_probe_positions_and_ignores_history():
    fused = ProbeOnlyFusion().fuse_history(ctx=ctx(), scores=_scores_with_evidence(), history=HISTORY)
    assert fused.activation.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_history_only_fusion_ignores_the_probe():
    c = ctx(valid=torch.tensor([True, False, True]))
    fused = HistoryOnlyFusion().fuse_history(ctx=c, scores=_scores_with_evidence(), history=HISTORY)
    assert fused.activation.tolist() == [6.0, 2.0, 3.0, 5.0]


def test_fixed_fusion_blends_with_a_fixed_weight():
    strategy = FixedFusion(FixedFusion.Params(probe_weight=0.25))
    fused = strategy.fuse_history(ctx=ctx(), scores=_scores_with_evidence(), history=HISTORY)
    # only position 0 is valid: 0.75 * 2 + 0.25 * P
    assert fused.activation.tolist() == [1.75, 2.0, 2.25, 2.5]
    with pytest.raises(ValueError, match="needs both a probe"):
        strategy.fuse_history(ctx=ctx(), scores=_scores_with_evidence(), history=None)


def test_evidence_fusions_refuse_the_variance_statistic():
    scores = _scores_with_evidence()
    scores.statistic, scores.metric = "variance", "flap"
    with pytest.raises(ValueError, match="history-only"):
        ProbeOnlyFusion().fuse_history(ctx=ctx(), scores=scores, history=HISTORY)


# ------------------------------------------------------------------------------- running mean


def test_running_mean_is_the_exact_mean_over_calibration_and_batches():
    history = BlockHistory(sq_mean=torch.tensor([[1.0, 1.0], [2.0, 2.0]]), samples=4)
    history.running_mean_update(torch.tensor([[7.0, 3.0], [2.0, 8.0]]), torch.tensor([2, 1]), None)
    # position 0: (4 * 1 + 2 * 7) / 6 = 3, (4 + 2 * 3) / 6 = 5/3; position 1: (8 + 2) / 5, (8 + 8) / 5
    torch.testing.assert_close(history.sq_mean, torch.tensor([[3.0, 10 / 6], [2.0, 3.2]]))
    history.running_mean_update(torch.tensor([[0.0], [0.0]]), torch.tensor([6, 5]), torch.tensor([1]))
    torch.testing.assert_close(history.sq_mean, torch.tensor([[3.0, 10 / 12], [2.0, 1.6]]))
    assert history.counts[:, 0].tolist() == [6.0, 5.0]  # channel 0 was not kept: untouched


# ------------------------------------------------------------------------ static vs dynamic


class MaskRecorder:
    """Observer wrapper around apply_mask that keeps every decision."""

    def __init__(self):
        self.masks = {}

    @hookimpl(wrapper=True)
    def apply_mask(self, ctx, scores, ratio):
        mask = yield
        self.masks.setdefault((ctx.layer, ctx.kind), []).append(mask.kept_units.clone())
        return mask


def _method(preset: str, **pruning) -> MethodConfig:
    pruning = {"ratio": 0.5, "skip_layers": [0], "inflate_ratio": False, **pruning}
    return MethodConfig.model_validate({"preset": preset, "pruning": pruning})


@pytest.mark.parametrize("target", ["attention", "mlp"])
def test_full_probe_without_fusion_equals_static_scoring_on_the_batch_own_statistics(target):
    model = tiny_model("llama")
    ids = torch.randint(0, 200, (4, 16), generator=torch.Generator().manual_seed(5))
    # prune one layer only, so the block's input in the pipeline is the dense model's
    pruning = {"skip_layers": [0], "inflate_ratio": False, "targets": [target], "round_to": 1}
    dynamic = Pipeline(model, _method("full-batch", **pruning))
    dyn_rec = MaskRecorder()
    dynamic.plugin_manager.register(dyn_rec)
    with dynamic, torch.no_grad():
        model(input_ids=ids, use_cache=False)
    own_stats = calibrate(model, get_adapter(model), [ids], progress=False)
    static = Pipeline(model, _method("static-ppsp", **pruning), history=own_stats)
    stat_rec = MaskRecorder()
    static.plugin_manager.register(stat_rec)
    with static:
        pass
    assert static.is_static and not dynamic.is_static
    kind = BlockKind(target)
    assert torch.equal(dyn_rec.masks[(1, kind)][0], stat_rec.masks[(1, kind)][0])


def test_history_only_decides_batch_n_from_history_up_to_n_minus_1():
    model = tiny_model("llama-gqa")
    batches = [torch.randint(0, 200, (3, 12), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    calibration = calibrate(model, get_adapter(model), [batches[0]], progress=False)
    pruning = {"skip_layers": [], "round_to": 1}
    method = MethodConfig.model_validate(
        {"preset": "history-only", "pruning": {"ratio": 0.5, **pruning}, "history": {"momentum": 0.3}}
    )
    pipe = Pipeline(model, method, history=calibration.clone())
    recorder = MaskRecorder()
    pipe.plugin_manager.register(recorder)
    snapshots = []
    with pipe, torch.no_grad():
        for ids in batches:
            snapshots.append(pipe.history.clone())
            model(input_ids=ids, use_cache=False)
    assert all(h.updates == 3 for h in pipe.history.blocks.values())
    changed = False
    for n, snapshot in enumerate(snapshots):
        frozen = Pipeline(model, _method("static-ppsp", **pruning), history=snapshot)
        frozen_rec = MaskRecorder()
        frozen.plugin_manager.register(frozen_rec)
        with frozen:
            pass
        for key, masks in recorder.masks.items():
            assert torch.equal(masks[n], frozen_rec.masks[key][0]), (n, key)
            changed |= n > 0 and not torch.equal(masks[n], masks[0])
    assert changed, "the EMA never changed a decision; the test would not notice a stale history"


def test_static_method_decides_once_and_never_gathers_per_batch(monkeypatch):
    model = tiny_model("llama")
    calibration = calibrate(model, get_adapter(model), [torch.randint(0, 200, (2, 16))], progress=False)
    batches = [torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    reference = []
    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(adapter_base.BlockRunner, "pin_weights", lambda self: None)  # gather every batch
        with Pipeline(model, _method("static-ppsp"), history=calibration.clone()):
            for ids in batches:
                reference.append(model(input_ids=ids, use_cache=False).logits)
    calls = []
    original = adapter_base.gather_stacked  # how pinned weights are gathered without autograd

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(adapter_base, "gather_stacked", counting)
    pipe = Pipeline(model, _method("static-ppsp"), history=calibration.clone())
    recorder = MaskRecorder()
    pipe.plugin_manager.register(recorder)
    per_batch = []
    with pipe, torch.no_grad():
        for ids, expected in zip(batches, reference, strict=True):
            before = len(calls)
            torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, expected)
            per_batch.append(len(calls) - before)
    assert all(len(m) == 1 for m in recorder.masks.values())  # decided once, at attach
    assert per_batch[0] > 0 and per_batch[1:] == [0, 0]  # gathered on first use, then reused
    assert all(r._pinned for r in pipe._runners.values())  # kept across detach: re-attaching is free
    before = len(calls)
    with pipe, torch.no_grad():
        model(input_ids=batches[0], use_cache=False)
    assert len(calls) == before
    pipe.release()
    assert all(r._pinned is None for r in pipe._runners.values())


def test_pinned_weights_refuse_a_different_slice():
    runner = get_adapter(tiny_model("llama")).runner(0, BlockKind.MLP)
    runner.pin_weights()
    x = torch.randn(1, 2, runner.out_proj.in_features)
    runner.output(x[..., :4], torch.tensor([0, 1, 2, 3]))
    with pytest.raises(RuntimeError, match="different slice"):
        runner.output(x[..., :4], torch.tensor([0, 1, 2, 4]))


def test_magnitude_preset_needs_no_history_and_is_static():
    pipe = Pipeline(tiny_model("llama"), _method("magnitude"))
    assert pipe.is_static and not pipe.needs_history


@pytest.mark.parametrize("preset", ["wanda-sp", "flap", "static-ppsp", "magnitude"])
def test_static_baselines_run_and_prune(preset):
    model = tiny_model("llama-gqa")
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(4))
    calibration = calibrate(model, get_adapter(model), [ids], progress=False)
    method = _method(preset, skip_layers=[])
    history = calibration.clone() if method.needs_calibration else None
    pipe = Pipeline(model, method, history=history)
    with pipe, torch.no_grad():
        out = model(input_ids=ids, use_cache=False).logits
    assert torch.isfinite(out).all()
    assert pipe.realised_ratio() > 0.2
