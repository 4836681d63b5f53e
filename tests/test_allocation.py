"""The ``allocate`` stage and faithful FLAP: fluctuation, standardisation, the global selection.

Hand-computed tensors for every formula (FLAP's all-position fluctuation, WIFV with and without
squared attention scores, the per-block standardisation, both threshold rules, unit costs, a whole
adaptive allocation), the tiny-model properties the issue asks for (the model-wide target met
within one unit, different ratios in different layers), ``flap-uniform`` against an independent
reimplementation of the earlier ``flap``, and the stage's contract (config errors naming the field,
output checks, per-batch opt-in, conformance, tables, FLOPs, generation).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ppframework.adapters import get_adapter
from ppframework.api import load_config
from ppframework.calibration import calibrate
from ppframework.config import MethodConfig
from ppframework.errors import ConfigError
from ppframework.history import BlockHistory
from ppframework.hookspecs import hookimpl
from ppframework.pipeline import Pipeline
from ppframework.registry import StrategyRegistry
from ppframework.runner import MethodResult, pipeline_flops
from ppframework.runner.report import _layer_ratio_cell
from ppframework.strategies.allocation import (
    AdaptiveAllocation,
    AdaptiveParams,
    UniformAllocation,
    adaptive_ratios,
    global_threshold,
    standardise,
    standardised_unit_scores,
)
from ppframework.strategies.fusion import HistoryOnlyFusion, all_position_fluctuation, history_statistic
from ppframework.strategies.masking import compensation_bias, pruned_count, rounded_keep
from ppframework.strategies.scoring import FlapParams, FlapScore, squared_weight_term
from ppframework.testing import check_allocate, check_strategy, make_context
from ppframework.testing.tiny import tiny_model
from ppframework.types import AllocationContext, BlockGeometry, BlockKind, ChannelScores
from ppframework.validation import StrategyOutputError, check_allocation

ATT, MLP = BlockKind.ATTENTION, BlockKind.MLP


# ------------------------------------------------------------------------------- fluctuation


def _history_of(samples: torch.Tensor) -> BlockHistory:
    """Per-position means of ``X`` and ``X^2`` over the sample axis, as the calibration stores them."""
    return BlockHistory(
        sq_mean=samples.square().mean(dim=0), mean=samples.mean(dim=0), samples=samples.shape[0]
    )


def test_fluctuation_is_the_variance_over_all_positions_by_hand():
    # X[n, t, c]: 2 samples x 2 positions x 3 channels
    x = torch.tensor(
        [
            [[1.0, 0.0, 0.0], [3.0, 1.0, 10.0]],
            [[1.0, 4.0, 0.0], [-1.0, 3.0, 10.0]],
        ]
    )
    history = _history_of(x)
    # channel 0: 1, 3, 1, -1 -> mean 1, squared deviations 0 + 4 + 0 + 4 = 8 -> 8 / (4 - 1)
    # channel 1: 0, 1, 4, 3 -> mean 2, 4 + 1 + 4 + 1 = 10 -> 10 / 3
    # channel 2: 0, 10, 0, 10 -> mean 5, 4 * 25 = 100 -> 100 / 3 (but no spread *within* a position)
    expected = [8 / 3, 10 / 3, 100 / 3]
    assert all_position_fluctuation(history, 2).tolist() == pytest.approx(expected, rel=1e-6)
    # the per-position statistic (flap-uniform) ranks channel 2 last: [0 + 4, 4 + 1, 0 + 0]
    assert history_statistic(history, 2, "variance").sum(dim=0).tolist() == pytest.approx([4.0, 5.0, 0.0])
    # through the strategies: FLAP's default statistic is the all-position one
    scores = FlapScore().score_channels(
        ctx=make_context(MLP, BlockGeometry(MLP, 3, 1), seq_len=2),
        probe=None,
        probe_states=None,
        weight=torch.ones(2, 3),
    )
    fused = HistoryOnlyFusion().fuse_history(
        ctx=make_context(MLP, BlockGeometry(MLP, 3, 1), seq_len=2), scores=scores, history=history
    )
    assert scores.statistic == "fluctuation"
    assert fused.activation.tolist() == pytest.approx(expected, rel=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 6),
    t=st.integers(1, 7),
    c=st.integers(1, 5),
    offset=st.floats(-3.0, 3.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_fluctuation_equals_torch_var_over_every_token(n, t, c, offset, seed):
    x = torch.randn(n, t, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + offset
    history = _history_of(x)
    got = all_position_fluctuation(history, t).double()
    values = x.reshape(-1, c)
    expected = (
        values.var(dim=0, unbiased=True) if values.shape[0] > 1 else torch.zeros(c, dtype=torch.float64)
    )
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_fluctuation_uses_only_the_real_positions_it_is_given():
    x = torch.tensor([[[1.0], [5.0], [100.0]], [[3.0], [7.0], [-100.0]]])  # position 2 is "padding"
    history = _history_of(x)
    valid = torch.tensor([True, True, False])
    # values 1, 5, 3, 7 -> mean 4, deviations 9 + 1 + 1 + 9 = 20 -> 20 / 3
    assert all_position_fluctuation(history, 3, valid).tolist() == pytest.approx([20 / 3])
    assert all_position_fluctuation(history, 2).tolist() == pytest.approx([20 / 3])


def test_fluctuation_needs_the_calibration_mean():
    with pytest.raises(ValueError, match="calibration mean"):
        all_position_fluctuation(BlockHistory(sq_mean=torch.ones(2, 3)), 2)
    with pytest.raises(ValueError, match="spans all positions"):
        history_statistic(BlockHistory(sq_mean=torch.ones(2, 3), mean=torch.ones(2, 3)), 2, "fluctuation")


def _flap_running_fluctuation(windows: torch.Tensor) -> torch.Tensor:
    """FLAP's ``BiasGPT.add_batch`` recursion over one window at a time, restated (see docs/method.md):
    the running mean is updated first and both factors use it (``old_baseline_inp`` aliases it), the
    first window only sets the mean, the sum is divided by the window count."""
    mean = torch.zeros(windows.shape[-1], dtype=torch.float64)
    fluc = torch.zeros_like(mean)
    for k, window in enumerate(windows.double()):  # window: (T, C)
        mean = mean * k / (k + 1) + window.mean(dim=0) / (k + 1)
        if k > 0:
            fluc = fluc * (k - 1) / k + ((window - mean) ** 2).sum(dim=0) / (k + 1)
    return fluc


def test_fluctuation_matches_flaps_running_estimate_up_to_a_constant():
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.5, 1.0, 2.0, 3.0, 5.0])
    windows = torch.randn(400, 8, 5, generator=gen) * scales + torch.tensor([0.0, 1.0, -2.0, 0.5, 3.0])
    ours = all_position_fluctuation(_history_of(windows), 8).double()
    flap = _flap_running_fluctuation(windows)
    ratio = flap / ours  # ~ T (tokens per window), the same for every channel
    assert torch.allclose(ratio, torch.full_like(ratio, 8.0), rtol=0.05)
    assert torch.equal(torch.argsort(ours), torch.argsort(flap))


# ------------------------------------------------------------------------------- WIFV


W = torch.tensor([[1.0, -2.0, 0.5, 0.0], [3.0, 1.0, -0.5, 2.0]])  # (hidden 2, C 4)


def test_wifv_by_hand_and_the_squared_attention_option():
    assert squared_weight_term(W).tolist() == [10.0, 5.0, 0.5, 4.0]
    activation = torch.tensor([1.0, 2.0, 4.0, 0.5])
    attention = make_context(ATT, BlockGeometry(ATT, units=2, unit_width=2, num_kv_heads=2))
    mlp = make_context(MLP, BlockGeometry(MLP, units=4, unit_width=1))
    plain = FlapScore().score_channels(ctx=attention, probe=None, probe_states=None, weight=W)
    plain.activation = activation
    assert plain.channel_scores().tolist() == [10.0, 10.0, 2.0, 2.0]  # fluct_c * sum_i W[i, c]^2
    squared = FlapScore(FlapParams(square_attention=True))
    att = squared.score_channels(ctx=attention, probe=None, probe_states=None, weight=W)
    att.activation = activation
    assert att.channel_scores().tolist() == [100.0, 100.0, 4.0, 4.0]  # FLAP's own code: squared
    ffn = squared.score_channels(ctx=mlp, probe=None, probe_states=None, weight=W)
    ffn.activation = activation
    assert ffn.channel_scores().tolist() == [10.0, 10.0, 2.0, 2.0]  # MLP channels are never squared


# ------------------------------------------------------------------------------- standardisation


def test_standardise_by_hand():
    assert standardise(torch.tensor([1.0, 2.0, 3.0])).tolist() == pytest.approx([-1.0, 0.0, 1.0])
    assert standardise(torch.tensor([4.0, 4.0, 4.0])).tolist() == [0.0, 0.0, 0.0]  # no spread
    assert standardise(torch.tensor([7.0])).tolist() == [0.0]


def test_attention_heads_take_the_mean_of_their_standardised_channels():
    scores = ChannelScores(weight_term=torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), combine=lambda a, w: w)
    # mean 3.5, unbiased std sqrt(17.5 / 5); heads (1, 2), (3, 4), (5, 6)
    std = math.sqrt(17.5 / 5)
    heads = standardised_unit_scores(scores, ATT, unit_width=2)
    assert heads.tolist() == pytest.approx([-2.0 / std, 0.0, 2.0 / std])
    assert standardised_unit_scores(scores, MLP, unit_width=1).tolist() == pytest.approx(
        [(v - 3.5) / std for v in range(1, 7)]
    )


# ------------------------------------------------------------------------------- global selection


def test_threshold_rules_by_hand():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    costs = torch.ones(5)
    # pp: cumulative cost 1..5 ascending, first index past 2.5 is 2 (value 3): prune 1, 2, 3
    assert global_threshold(values, costs, 0.5, "pp") == 3.0
    # flap: cumulative kept cost 1..5 descending, closest to 2.5 is index 1 (value 4): keep only 5
    assert global_threshold(values, costs, 0.5, "flap") == 4.0
    # costs weigh the units: value 1 costs 3, so its cost alone passes 2.9 of 7
    weighted = torch.tensor([3.0, 1.0, 1.0, 1.0, 1.0])
    assert global_threshold(values, weighted, 2.9 / 7, "pp") == 1.0
    assert global_threshold(values, costs, 0.0, "pp") == -math.inf  # nothing pruned at ratio 0
    with pytest.raises(ValueError, match="threshold rule"):
        global_threshold(values, costs, 0.5, "median")


def _plan(**changes) -> AllocationContext:
    fields = {
        "num_layers": 2,
        "pruned_layers": (0, 1),
        "targets": (ATT, MLP),
        "geometries": {ATT: BlockGeometry(ATT, 2, 2, 2), MLP: BlockGeometry(MLP, 4, 1)},
        "hidden_size": 4,
        "mlp_matrices": 3,
        "layer_ratio": 0.25,
        "seq_len": 3,
        "kv_follow_query": True,
    }
    fields.update(changes)
    return AllocationContext(**fields)


def test_unit_costs_by_hand():
    plan = _plan()
    assert plan.unit_params(ATT) == 4 * 4 * 2  # q, k, v, o rows of a head of width 2, D = 4
    assert plan.unit_params(MLP) == 3 * 4  # gate, up, down
    assert plan.unit_flops(ATT) == 2 * 3 * 32 + 4 * 3 * 3 * 2  # projections + Q K^T and A V (T = 3)
    assert plan.unit_flops(MLP) == 2 * 3 * 12
    gqa = _plan(kv_follow_query=False)
    assert gqa.unit_params(ATT) == 2 * 4 * 2  # q row and o column only
    assert plan.blocks == [(0, ATT), (0, MLP), (1, ATT), (1, MLP)]
    assert _plan(targets=(MLP,), pruned_layers=(1,)).blocks == [(1, MLP)]


def _scores(values: list[float]) -> ChannelScores:
    return ChannelScores(weight_term=torch.tensor(values), combine=lambda a, w: w, head_reduce="sum")


def test_adaptive_allocation_by_hand():
    scores = {
        (0, ATT): _scores([1.0, 1.0, 5.0, 5.0]),  # heads -> [-0.866, 0.866]
        (0, MLP): _scores([1.0, 2.0, 3.0, 4.0]),  # -> [-1.162, -0.387, 0.387, 1.162]
        (1, ATT): _scores([2.0, 2.0, 2.0, 2.0]),  # no spread -> heads [0, 0]
        (1, MLP): _scores([10.0, 10.0, 10.0, 40.0]),  # mean 17.5, std 15 -> [-0.5, -0.5, -0.5, 1.5]
    }
    # params: a head costs 32, a channel 12; total 4 * 32 + 8 * 12 = 224, budget 0.25 * 224 = 56.
    # ascending: -1.162 (12, cum 12), -0.866 (32, 44), -0.5 (12, 56), -0.5 (68) ... -> the first
    # cumulative cost past 56 is at a -0.5, so every unit <= -0.5 is pruned (cost 80: the ties)
    ratios = adaptive_ratios(_plan(), scores, cost="params", rule="pp")
    assert ratios == {(0, ATT): 0.5, (0, MLP): 0.25, (1, ATT): 0.0, (1, MLP): 0.75}
    # FLOPs weights (T = 3): a head costs 264, a channel 72 -> budget 0.25 * (4*264 + 8*72) = 408;
    # ascending cumulative: 72, 336, 408, 480 -> first past 408 is the second -0.5: same units
    assert adaptive_ratios(_plan(), scores, cost="flops", rule="pp") == ratios
    strategy = AdaptiveAllocation(AdaptiveParams(cost="params"))
    assert strategy.allocate(plan=_plan(), scores=scores, target=0.25) == ratios


def test_adaptive_keeps_one_unit_per_block_and_needs_every_block():
    scores = {
        (0, ATT): _scores([0.0, 0.0, 0.0, 0.0]),
        (0, MLP): _scores([0.0, 0.0, 0.0, 0.0]),
        (1, ATT): _scores([1.0, 1.0, 1.0, 1.0]),
        (1, MLP): _scores([1.0, 1.0, 1.0, 1.0]),
    }
    ratios = adaptive_ratios(_plan(layer_ratio=0.9), scores, cost="params")
    assert all(ratio < 1 for ratio in ratios.values())
    assert ratios[(0, ATT)] == 0.5 and ratios[(0, MLP)] == 0.75  # all tied at 0: one unit stays
    with pytest.raises(ValueError, match="missing"):
        adaptive_ratios(_plan(), {(0, ATT): scores[(0, ATT)]})
    with pytest.raises(ValueError, match="static methods"):
        AdaptiveAllocation().allocate(plan=_plan(), scores=None, target=0.25)


def test_uniform_gives_every_block_the_layer_ratio():
    plan = _plan(layer_ratio=0.44)
    assert UniformAllocation().allocate(plan=plan, scores=None, target=0.4) == dict.fromkeys(
        plan.blocks, 0.44
    )


@pytest.mark.parametrize("strategy", [UniformAllocation(), AdaptiveAllocation()], ids=["uniform", "adaptive"])
def test_allocators_conform(strategy):
    check_strategy(strategy, max_examples=15)


class _Broken:
    """Leaves the last block out."""

    stage = "allocate"
    name = "broken"

    @hookimpl
    def allocate(self, plan, scores, target):
        return dict.fromkeys(plan.blocks[:-1], 0.1)


class _Full:
    """Prunes everything (ratio 1)."""

    stage = "allocate"
    name = "full"

    @hookimpl
    def allocate(self, plan, scores, target):
        return dict.fromkeys(plan.blocks, 1.0)


@pytest.mark.parametrize(("strategy", "rule"), [(_Broken(), "pipeline's output checks"), (_Full(), "output")])
def test_conformance_rejects_broken_allocators(strategy, rule):
    with pytest.raises(AssertionError, match=rule):
        check_allocate(strategy, max_examples=3)


def test_allocation_output_check_names_the_problem():
    plan = _plan()
    with pytest.raises(StrategyOutputError, match="no ratio for the blocks"):
        check_allocation({}, "x", plan)
    with pytest.raises(StrategyOutputError, match=r"outside \[0, 1\)"):
        check_allocation(dict.fromkeys(plan.blocks, 1.0), "x", plan)
    with pytest.raises(StrategyOutputError, match="a ratio of type bool"):
        check_allocation(dict.fromkeys(plan.blocks, True), "x", plan)
    with pytest.raises(StrategyOutputError, match="not pruned"):
        check_allocation({**dict.fromkeys(plan.blocks, 0.1), (5, MLP): 0.1}, "x", plan)
    check_allocation(dict.fromkeys(plan.blocks, 0.0), "x", plan)


# ------------------------------------------------------------------------------- tiny models


def _calibrated(family: str = "llama"):
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 200, (4, 16), generator=gen) for _ in range(3)]
    return model, batches, calibrate(model, get_adapter(model), batches, progress=False)


def _attached(model, method: MethodConfig, history, ids) -> Pipeline:
    pipe = Pipeline(model, method, history=history.clone())
    with pipe, torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    assert torch.isfinite(logits).all()
    return pipe


@pytest.mark.parametrize("family", ["llama", "llama-gqa", "opt"])
@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_adaptive_flap_meets_the_model_wide_target_within_one_unit(family, ratio):
    model, batches, history = _calibrated(family)
    method = MethodConfig.model_validate(
        {
            "preset": "flap",
            "pruning": {"ratio": ratio, "skip_layers": [], "round_to": 1},
            "strategies": {"allocate": {"name": "adaptive", "params": {"cost": "params"}}},
        }
    )
    pipe = _attached(model, method, history, batches[0])
    plan = pipe.allocation_context()
    units = {kind: plan.geometries[kind].units for kind in BlockKind}
    removed = sum((units[k] - m.n_kept) * plan.unit_params(k) for (_, k), m in pipe._static_masks.items())
    prunable = sum(units[k] * plan.unit_params(k) for (_, k) in pipe._static_masks)
    biggest = max(plan.unit_params(kind) for kind in plan.targets)
    # the pp rule overshoots the budget by less than one unit (ties aside)
    assert ratio * prunable <= removed <= ratio * prunable + 2 * biggest
    if family != "llama-gqa":  # without grouped k/v every weight is prunable: the realised ratio
        realised = pipe.realised_ratio()
        assert realised == pytest.approx(removed / pipe.total_prunable_params())
        assert ratio - 1e-9 <= realised <= ratio + 2 * biggest / pipe.total_prunable_params()
    assert len(set(pipe.block_ratios.values())) > 1  # different blocks keep different shares
    layer_shares = {
        layer: sum(pipe.block_ratios[(layer, kind)] for kind in BlockKind) for layer in pipe.pruned_layers
    }
    assert len(set(layer_shares.values())) > 1  # and different layers too


def test_flap_preset_allocates_flops_over_the_non_skipped_layers():
    model, batches, history = _calibrated("llama")
    method = MethodConfig.model_validate({"preset": "flap", "pruning": {"ratio": 0.3, "skip_layers": [0]}})
    pipe = _attached(model, method, history, batches[0])
    assert pipe.layer_ratio == 0.4  # round(4 / 3 * 0.3, 2)
    assert set(pipe.block_ratios) == {(layer, kind) for layer in (1, 2, 3) for kind in BlockKind}
    plan = pipe.allocation_context(seq_len=history.max_positions)
    geos = plan.geometries
    pruned = sum(ratio * geos[k].units * plan.unit_flops(k) for (_, k), ratio in pipe.block_ratios.items())
    total = sum(geos[k].units * plan.unit_flops(k) for (_, k) in pipe.block_ratios)
    biggest = max(plan.unit_flops(k) for k in BlockKind)
    assert 0.4 * total <= pruned <= 0.4 * total + 2 * biggest
    # the skipped layer stays dense; what ran is what the FLOPs report counts
    flops = pipeline_flops(pipe)
    counter = pipe._flops
    expected = sum(counter.dense_block_flops(kind, 4, 16) for kind in BlockKind)  # layer 0, dense
    for (_, kind), mask in pipe._static_masks.items():  # each pruned block at its kept size
        kv = pipe.adapter.geometry(kind).num_kv_heads if mask.kept_kv_heads is None else mask.kept_kv_heads
        expected += counter.block_shape(kind, 4, 16, mask.n_kept, kv).flops()
    assert flops.pruned == expected


def _old_flap_masks(model, history, layer_ratio: float, round_to: int) -> dict:
    """The earlier ``flap`` (now ``flap-uniform``), restated independently: per-position variance
    summed over positions, S = fluct * sum_i W^2, heads by sum, floor(p' H) heads / rounded MLP width
    kept by top-k, bias W[:, pruned] @ mean over positions."""
    adapter = get_adapter(model)
    masks = {}
    for (layer, kind), block in history.blocks.items():
        if layer == 0:
            continue
        runner = adapter.runner(layer, kind)
        weight = runner.out_proj.weight.float()
        fluct = (block.sq_mean - block.mean**2).clamp(min=0).sum(dim=0)
        channel = fluct * weight.square().sum(dim=0)
        geo = runner.geometry
        if kind is BlockKind.ATTENTION:
            unit = channel.view(geo.units, geo.unit_width).sum(dim=1)
            keep = geo.units - pruned_count(geo.units, layer_ratio)
        else:
            unit = channel
            keep = rounded_keep(geo.units, layer_ratio, round_to)
        kept = torch.topk(unit, keep).indices.sort().values
        channels = (kept[:, None] * geo.unit_width + torch.arange(geo.unit_width)).reshape(-1)
        bias = compensation_bias(runner.out_proj.weight, block.mean.mean(dim=0), channels)
        masks[(layer, kind)] = (kept, bias)
    return masks


@pytest.mark.parametrize("family", ["llama", "llama-gqa", "opt"])
@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_flap_uniform_is_the_earlier_flap(family, ratio):
    model, batches, history = _calibrated(family)
    method = MethodConfig.model_validate(
        {"preset": "flap-uniform", "pruning": {"ratio": ratio, "skip_layers": [0]}}
    )
    pipe = _attached(model, method, history, batches[0])
    expected = _old_flap_masks(model, history, pipe.layer_ratio, method.pruning.round_to)
    assert set(pipe._static_masks) == set(expected)
    for key, (kept, bias) in expected.items():
        mask = pipe._static_masks[key]
        assert torch.equal(mask.kept_units, kept), key
        assert torch.allclose(mask.output_bias, bias, rtol=1e-6, atol=1e-6), key
    assert set(pipe.block_ratios.values()) == {pipe.layer_ratio}


def test_flap_generates_with_frozen_masks():
    model, batches, history = _calibrated("llama")
    method = MethodConfig.model_validate({"preset": "flap", "pruning": {"ratio": 0.4, "skip_layers": [0]}})
    pipe = Pipeline(model, method, history=history.clone())
    prompt = batches[0][:2, :6]
    with pipe, torch.no_grad():
        out = model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False
        )
        full = model(input_ids=out, use_cache=False).logits
    assert out.shape == (2, 10)
    # greedy decoding with the cache chose what the pruned model's full forward ranks first
    assert torch.equal(full[:, 5:-1].argmax(dim=-1), out[:, 6:])


# ------------------------------------------------------------------------------- the stage's contract


def test_presets_allocate_uniformly_except_flap():
    from ppframework.config import PRESETS

    for name in PRESETS:
        method = MethodConfig.model_validate({"preset": name})
        adaptive = name in ("flap", "flap-ppcode")
        expected = "block-influence" if name == "shortgpt" else "adaptive" if adaptive else "uniform"
        assert method.strategies.allocate.name == expected, name  # shortgpt removes whole layers


def test_pp_asks_uniform_once_and_keeps_the_layer_ratio():
    model, batches, history = _calibrated("llama")
    method = MethodConfig.model_validate({"preset": "pp", "pruning": {"ratio": 0.3, "skip_layers": [0]}})
    pipe = _attached(model, method, history, batches[0])
    assert pipe.block_ratios == dict.fromkeys(
        ((i, k) for i in (1, 2, 3) for k in BlockKind), pipe.layer_ratio
    )


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"strategies": {"allocate": "nonesuch"}}, "methods[0].strategies.allocate.name"),
        (
            {
                "preset": "wanda-sp",
                "strategies": {"allocate": {"name": "adaptive", "params": {"cost": "time"}}},
            },
            "methods[0].strategies.allocate.params.cost",
        ),
        (
            {"strategies": {"allocate": {"name": "uniform", "params": {"x": 1}}}},
            "methods[0].strategies.allocate",
        ),
        ({"strategies": {"allocate": "adaptive"}}, "strategies.allocate: 'adaptive' ranks every block"),
    ],
)
def test_bad_allocation_configs_name_the_field(changes, field):
    with pytest.raises(ConfigError) as info:
        load_config({"methods": [{"preset": "pp"} | changes]})
    assert field in str(info.value)


def test_adaptive_is_accepted_for_static_methods():
    cfg = load_config({"methods": [{"preset": "wanda-sp", "strategies": {"allocate": "adaptive"}}]})
    assert cfg.methods[0].strategies.allocate.name == "adaptive"


class _Plugin:
    """Registers a per-batch allocator and a scores-hungry one, for the pipeline tests."""

    @hookimpl
    def ppf_register_strategies(self, register):
        register(_Alternating)
        register(_Hungry)


class _Alternating:
    """Per batch: 25% on even batches, 50% on odd ones."""

    stage = "allocate"
    name = "alternating"
    per_batch = True
    seen: list[tuple[int, int]] = []

    @hookimpl
    def allocate(self, plan, scores, target):
        type(self).seen.append((plan.batch_index, plan.seq_len))
        ratio = 0.5 if plan.batch_index % 2 else 0.25
        return dict.fromkeys(plan.blocks, ratio)


class _Hungry(AdaptiveAllocation):
    """A third-party allocator that needs scores."""

    name = "hungry"


def _registry() -> StrategyRegistry:
    registry = StrategyRegistry()
    registry.load_builtins()
    report = registry.register_plugin(_Plugin(), "test-plugin")
    assert report.error is None, report.error
    return registry


def test_a_per_batch_allocator_is_asked_before_every_batch():
    model, batches, _ = _calibrated("llama")
    method = MethodConfig.model_validate(
        {
            "preset": "no-history",
            "pruning": {"ratio": 0.3, "skip_layers": [0], "round_to": 1},
            "strategies": {"allocate": "alternating"},
        }
    )
    _Alternating.seen = []
    pipe = Pipeline(model, method, registry=_registry())
    with pipe, torch.no_grad():
        for ids in batches[:2]:
            model(input_ids=ids[:, :12], use_cache=False)
    assert _Alternating.seen == [(-1, 1), (0, 12), (1, 12)]
    mlp = pipe.adapter.geometry(BlockKind.MLP).units
    assert pipe.record.kept_units[(1, BlockKind.MLP)] == [
        mlp - pruned_count(mlp, 0.25),
        mlp - pruned_count(mlp, 0.5),
    ]


def test_a_scores_hungry_allocator_refuses_a_dynamic_method():
    model = tiny_model("llama")
    method = MethodConfig.model_validate(
        {"preset": "no-history", "pruning": {"skip_layers": [0]}, "strategies": {"allocate": "hungry"}}
    )
    with pytest.raises(ConfigError, match="strategies.allocate: 'hungry' needs every block's scores"):
        Pipeline(model, method, registry=_registry())


def test_a_broken_allocation_fails_at_attach_naming_the_stage():
    model = tiny_model("llama")
    registry = _registry()
    registry.register_plugin(_BrokenPlugin(), "broken-plugin")
    method = MethodConfig.model_validate(
        {"preset": "no-history", "pruning": {"skip_layers": [0]}, "strategies": {"allocate": "broken"}}
    )
    pipe = Pipeline(model, method, registry=registry)
    with pytest.raises(StrategyOutputError, match="allocate strategy 'broken' returned no ratio"):
        pipe.attach()
    assert "forward" not in pipe.adapter.layers[1].__dict__  # the model was left untouched


class _BrokenPlugin:
    @hookimpl
    def ppf_register_strategies(self, register):
        register(type(_Broken.__name__, (_Broken,), {}))


def test_the_table_shows_the_range_of_block_ratios():
    row = MethodResult("flap 40%", 0.4, 0.44, 0.4, 30.0, 1.0, 1.0, min_block_ratio=0.12, max_block_ratio=0.71)
    assert _layer_ratio_cell(row) == "0.12-0.71"
    uniform = MethodResult(
        "pp 40%", 0.4, 0.44, 0.4, 30.0, 1.0, 1.0, min_block_ratio=0.44, max_block_ratio=0.44
    )
    assert _layer_ratio_cell(uniform) == "0.44"


@settings(max_examples=40, deadline=None)
@given(
    layers=st.integers(1, 4),
    heads=st.sampled_from((2, 4)),
    units=st.integers(2, 24),
    ratio=st.floats(0.05, 0.8),
    rule=st.sampled_from(("pp", "flap")),
    cost=st.sampled_from(("params", "flops")),
    seed=st.integers(0, 2**31 - 1),
)
def test_adaptive_prunes_the_budget_within_one_unit(layers, heads, units, ratio, rule, cost, seed):
    gen = torch.Generator().manual_seed(seed)
    plan = _plan(
        num_layers=layers,
        pruned_layers=tuple(range(layers)),
        geometries={ATT: BlockGeometry(ATT, heads, 2, heads), MLP: BlockGeometry(MLP, units, 1)},
        layer_ratio=ratio,
        seq_len=5,
    )
    scores = {
        key: _scores(torch.rand(plan.geometries[key[1]].channels, generator=gen).tolist())
        for key in plan.blocks
    }
    ratios = adaptive_ratios(plan, scores, cost=cost, rule=rule)
    unit = {k: plan.unit_params(k) if cost == "params" else plan.unit_flops(k) for k in BlockKind}
    count = {k: plan.geometries[k].units for k in BlockKind}
    pruned = sum(round(r * count[k]) * unit[k] for (_, k), r in ratios.items())
    total = sum(count[k] * unit[k] for (_, k) in ratios)
    biggest = max(unit.values())
    clamped = any(round(r * count[k]) == count[k] - 1 for (_, k), r in ratios.items())
    if rule == "pp" and not clamped:  # the first unit past the budget is pruned too
        assert ratio * total <= pruned < ratio * total + biggest
    elif not clamped:
        assert abs((total - pruned) - (1 - ratio) * total) <= 2 * biggest
    # within a block, a higher score is never pruned while a lower one is kept (heads: by mean)
    for key, r in ratios.items():
        z = standardised_unit_scores(scores[key], key[1], plan.geometries[key[1]].unit_width)
        n = round(r * count[key[1]])
        assert n == 0 or n == count[key[1]] - 1 or bool(z.sort().values[n - 1] < z.sort().values[n])


# ------------------------------------------------------------------- adaptive-calibration (dynamic)


def _pp_adaptive_calibration(ratio: float = 0.4, **changes) -> MethodConfig:
    return MethodConfig.model_validate(
        {
            "preset": "pp",
            "pruning": {"ratio": ratio, "skip_layers": [0], "round_to": 1},
            "strategies": {"allocate": "adaptive-calibration"},
            **changes,
        }
    )


@pytest.mark.parametrize("family", ["llama", "llama-gqa"])
def test_adaptive_calibration_gives_pp_the_static_structure_of_its_calibration_history(family):
    """pp with allocate 'adaptive-calibration' keeps, per block, the budget FLAP's global selection
    gives the same history's PPsp scores (static-ppsp with allocate 'adaptive'), while the probe still
    picks which units: the kept units change from batch to batch within a fixed count."""
    model, batches, history = _calibrated(family)
    static = MethodConfig.model_validate(
        {
            "preset": "static-ppsp",
            "pruning": {"ratio": 0.4, "skip_layers": [0], "round_to": 1},
            "strategies": {"allocate": "adaptive"},
        }
    )
    want = _attached(model, static, history, batches[0]).block_ratios
    pipe = Pipeline(model, _pp_adaptive_calibration(), history=history.clone())
    kept: dict = {}
    for ids in batches:
        with pipe, torch.no_grad():  # attached again for every batch
            model(input_ids=ids, use_cache=False)
        for key, mask in pipe.last_masks.items():
            kept.setdefault(key, []).append(mask.kept_units.clone())
        first = next(iter(pipe.history.blocks.values()))
        first.sq_mean.mul_(100.0)  # a history far from the calibration's must not move the structure
    assert pipe.block_ratios == want and len(set(want.values())) > 1
    assert all(len({t.numel() for t in masks}) == 1 for masks in kept.values())  # fixed budgets
    assert any(not torch.equal(masks[0], masks[-1]) for masks in kept.values())  # dynamic choice
    uniform = Pipeline(model, _pp_adaptive_calibration(strategies={}), history=history.clone())
    assert uniform.strategies["allocate"].name == "uniform"


def test_adaptive_calibration_needs_a_calibration_history():
    with pytest.raises(ConfigError, match="'adaptive-calibration' decides the structure from the"):
        load_config(
            {
                "methods": [
                    {
                        "preset": "pp",
                        "history": {"init": "none"},
                        "strategies": {"allocate": "adaptive-calibration", "fuse_history": "none"},
                    }
                ]
            }
        )
