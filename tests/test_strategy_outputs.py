"""The pipeline checks every strategy's output at the hook boundary, and attaches safely.

Every row of :data:`BAD_OUTPUTS` is a strategy that answers its stage with a broken value (the
built-in strategy's answer, then damaged): the pipeline must stop with a
:class:`~ppframework.validation.StrategyOutputError` naming the stage and the strategy, instead of an
``AttributeError`` or an indexing error deep inside torch, or a run that finishes with nonsense (a
mask with repeated units used to report a realised ratio of -0.6). Also here: the checks change no
result, a nested ``with pipe:`` keeps pruning on, and a history built for another model is refused
at attach with a message saying what differs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from ppframework.adapters import get_adapter
from ppframework.calibration import calibrate
from ppframework.config import MethodConfig
from ppframework.errors import ConfigError
from ppframework.hookspecs import hookimpl
from ppframework.pipeline import Pipeline
from ppframework.registry import StrategyRegistry
from ppframework.strategies.fusion import ImportanceScaledFusion
from ppframework.strategies.inference import SlicedInference
from ppframework.strategies.masking import StructuredMask
from ppframework.strategies.probe import ResidualProbe
from ppframework.strategies.scoring import PPspScore
from ppframework.testing import make_context
from ppframework.testing.tiny import tiny_model
from ppframework.types import BlockContext, BlockKind, BlockMask, BlockOutput, ChannelScores, Probe
from ppframework.validation import (
    StrategyOutputError,
    check_fused,
    check_mask,
    check_output,
    check_probe,
    check_scores,
)

STRATEGY = "bad-output"
FAMILY = "llama-gqa"  # 4 query heads over 2 key/value heads, 128 MLP channels, 4 layers
BATCH, SEQ = 2, 16

Factory = Callable[[Any, BlockContext], Any]


def _attention(bad: Factory) -> Factory:
    """Damage attention blocks only (MLP blocks get the good answer)."""
    return lambda good, ctx: bad(good, ctx) if ctx.kind is BlockKind.ATTENTION else good


def _mlp(bad: Factory) -> Factory:
    """Damage MLP blocks only."""
    return lambda good, ctx: bad(good, ctx) if ctx.kind is BlockKind.MLP else good


def _probe(good: Probe, **changes: Any) -> Probe:
    return dataclasses.replace(good, **changes)


def _mask(good: BlockMask, **changes: Any) -> BlockMask:
    return dataclasses.replace(good, **changes)


def _nan_at_0(activation: torch.Tensor) -> torch.Tensor:
    activation = activation.clone()
    activation[0] = float("nan")
    return activation


def _inf_at_0(values: torch.Tensor) -> torch.Tensor:
    values = values.clone()
    values[0] = float("inf")
    return values


def _nan_output(out: Any) -> Any:
    output = out.output.clone()
    output[0, 3, 5] = float("nan")
    return dataclasses.replace(out, output=output)


def _extra_column(probe: Probe) -> torch.Tensor:
    return torch.cat([probe.valid, probe.valid[:, :1]], dim=1)


# (id, stage, bad output factory (good answer, ctx) -> bad answer, expected message fragment)
BAD_OUTPUTS: list[tuple[str, str, Factory, str]] = [
    # select_probe
    (
        "probe-tuple",
        "select_probe",
        lambda p, c: (p.batch_index, p.token_index, p.valid),
        "a tuple; expected",
    ),
    (
        "probe-tensor",
        "select_probe",
        lambda p, c: p.token_index,
        "a Tensor; expected a ppframework.types.Probe",
    ),
    (
        "probe-unsorted",
        "select_probe",
        lambda p, c: _probe(p, token_index=p.token_index.flip(0), valid=p.valid.flip(1)),
        "token_index not sorted ascending",
    ),
    (
        "probe-token-out-of-range",
        "select_probe",
        lambda p, c: _probe(
            p, token_index=torch.cat([p.token_index, torch.tensor([SEQ])]), valid=_extra_column(p)
        ),
        f"token_index with out-of-range values [{SEQ}]",
    ),
    (
        "probe-row-out-of-range",
        "select_probe",
        lambda p, c: _probe(p, batch_index=torch.tensor([BATCH]), valid=p.valid[:1]),
        f"batch_index with out-of-range values [{BATCH}]",
    ),
    (
        "probe-float-index",
        "select_probe",
        lambda p, c: _probe(p, token_index=p.token_index.float()),
        "token_index of dtype torch.float32",
    ),
    (
        "probe-empty",
        "select_probe",
        lambda p, c: _probe(p, token_index=p.token_index[:0]),
        "an empty token_index",
    ),
    ("probe-valid-shape", "select_probe", lambda p, c: _probe(p, valid=p.valid[:, :1]), "valid with shape"),
    (
        "probe-valid-dtype",
        "select_probe",
        lambda p, c: _probe(p, valid=p.valid.long()),
        "valid of dtype torch.int64",
    ),
    # score_channels
    (
        "scores-tensor",
        "score_channels",
        lambda s, c: s.weight_term,
        "a Tensor; expected a ppframework.types.Channel",
    ),
    (
        "scores-weight-term-shape",
        "score_channels",
        lambda s, c: dataclasses.replace(s, weight_term=s.weight_term[:-1]),
        "weight_term with shape",
    ),
    (
        "scores-evidence-shape",
        "score_channels",
        lambda s, c: dataclasses.replace(s, evidence=s.evidence[:, :-1]),
        "evidence with shape",
    ),
    (
        "scores-positions-out-of-range",
        "score_channels",
        lambda s, c: dataclasses.replace(s, positions=s.positions + SEQ),
        "positions with out-of-range values",
    ),
    (
        "scores-positions-repeated",
        "score_channels",
        lambda s, c: dataclasses.replace(s, positions=torch.zeros_like(s.positions)),
        "positions with repeated values [0, 0",
    ),
    (
        "scores-weight-term-nan",
        "score_channels",
        lambda s, c: dataclasses.replace(s, weight_term=_nan_at_0(s.weight_term)),
        "weight_term with non-finite values at channels [0]",
    ),
    (
        "scores-weight-term-inf",
        "score_channels",
        lambda s, c: dataclasses.replace(s, weight_term=_inf_at_0(s.weight_term)),
        "weight_term with non-finite values at channels [0]",
    ),
    # fuse_history
    (
        "fuse-tensor",
        "fuse_history",
        lambda s, c: s.activation,
        "a Tensor; expected a ppframework.types.ChannelScores",
    ),
    ("fuse-none", "fuse_history", lambda s, c: None, "returned None; expected"),
    (
        "fuse-activation-shape",
        "fuse_history",
        lambda s, c: dataclasses.replace(s, activation=s.activation[:-1]),
        "activation with shape",
    ),
    (
        "fuse-activation-nan",
        "fuse_history",
        lambda s, c: dataclasses.replace(s, activation=_nan_at_0(s.activation)),
        "non-finite values at channels [0]",
    ),
    # apply_mask
    (
        "mask-repeated",
        "apply_mask",
        _attention(lambda m, c: _mask(m, kept_units=torch.tensor([3, 3]), kept_kv_heads=torch.tensor([1]))),
        "kept_units with repeated values [3, 3]; kept_units must be a non-empty 1-D torch.long tensor of "
        "sorted, unique query heads in [0, 4)",
    ),
    (
        "mask-out-of-range",
        "apply_mask",
        _mlp(lambda m, c: _mask(m, kept_units=torch.cat([m.kept_units, torch.tensor([128])]))),
        "kept_units with out-of-range values [128]",
    ),
    (
        "mask-negative",
        "apply_mask",
        _mlp(lambda m, c: _mask(m, kept_units=torch.tensor([-1, 0, 1]))),
        "kept_units with out-of-range values [-1]",
    ),
    (
        "mask-float",
        "apply_mask",
        lambda m, c: _mask(m, kept_units=m.kept_units.float()),
        "kept_units of dtype torch.float32",
    ),
    (
        "mask-2d",
        "apply_mask",
        lambda m, c: _mask(m, kept_units=m.kept_units[None]),
        "kept_units with shape (1, ",
    ),
    ("mask-empty", "apply_mask", lambda m, c: _mask(m, kept_units=m.kept_units[:0]), "an empty kept_units"),
    ("mask-none", "apply_mask", lambda m, c: None, "returned None; expected a ppframework.types.BlockMask"),
    ("mask-none-units", "apply_mask", lambda m, c: _mask(m, kept_units=None), "kept_units of type NoneType"),
    (
        "mask-list",
        "apply_mask",
        lambda m, c: _mask(m, kept_units=m.kept_units.tolist()),
        "kept_units of type list",
    ),
    (
        "mask-unsorted",
        "apply_mask",
        _mlp(lambda m, c: _mask(m, kept_units=m.kept_units.flip(0))),
        "kept_units not sorted ascending",
    ),
    ("mask-total-units", "apply_mask", lambda m, c: _mask(m, total_units=m.total_units + 1), "total_units="),
    (
        "mask-kv-out-of-range",
        "apply_mask",
        _attention(lambda m, c: _mask(m, kept_units=torch.arange(4), kept_kv_heads=torch.tensor([0, 1, 2]))),
        "kept_kv_heads with out-of-range values [2]",
    ),
    (
        "mask-kv-missing-group",
        "apply_mask",
        _attention(lambda m, c: _mask(m, kept_units=torch.arange(4), kept_kv_heads=torch.tensor([0]))),
        "missing key/value heads [1]",
    ),
    (
        "mask-kv-on-mlp",
        "apply_mask",
        _mlp(lambda m, c: _mask(m, kept_kv_heads=torch.tensor([0]))),
        "kept_kv_heads for an MLP block",
    ),
    (
        "mask-output-bias-shape",
        "apply_mask",
        lambda m, c: _mask(m, output_bias=torch.zeros(1)),
        "output_bias with shape (1,)",
    ),
    # infer
    ("infer-tensor", "infer", lambda o, c: o.output, "a Tensor; expected a ppframework.types.BlockOutput"),
    (
        "infer-output-shape",
        "infer",
        lambda o, c: dataclasses.replace(o, output=o.output[..., :-1]),
        "output with shape (2, 16, 63)",
    ),
    (
        "infer-sq-mean-shape",
        "infer",
        lambda o, c: dataclasses.replace(o, sq_mean=o.sq_mean[:, :-1]),
        "sq_mean with shape",
    ),
    ("infer-sq-mean-missing", "infer", lambda o, c: dataclasses.replace(o, sq_mean=None), "no sq_mean"),
    # a NaN from infer is infer's, not the next block's fuse_history's
    ("infer-output-nan", "infer", lambda o, c: _nan_output(o), "an output with non-finite values"),
    (
        "infer-sq-mean-inf",
        "infer",
        lambda o, c: dataclasses.replace(o, sq_mean=_inf_at_0(o.sq_mean)),
        "a sq_mean with non-finite values",
    ),
]


# -------------------------------------------------------------------------------- bad strategies


def bad_strategy(stage: str, damage: Factory) -> type:
    """A strategy named ``bad-output`` answering ``stage`` with ``damage(built-in answer, ctx)``."""
    if stage == "select_probe":

        class BadProbe(ResidualProbe):
            name = STRATEGY

            @hookimpl
            def select_probe(self, ctx, residual, normed, attention_mask):
                good = super().select_probe(
                    ctx=ctx, residual=residual, normed=normed, attention_mask=attention_mask
                )
                return damage(good, ctx)

        return BadProbe
    if stage == "score_channels":

        class BadScore(PPspScore):
            name = STRATEGY

            @hookimpl
            def score_channels(self, ctx, probe, probe_states, weight):
                good = super().score_channels(ctx=ctx, probe=probe, probe_states=probe_states, weight=weight)
                return damage(good, ctx)

        return BadScore
    if stage == "fuse_history":

        class BadFusion(ImportanceScaledFusion):
            name = STRATEGY

            @hookimpl
            def fuse_history(self, ctx, scores, history):
                return damage(super().fuse_history(ctx=ctx, scores=scores, history=history), ctx)

        return BadFusion
    if stage == "apply_mask":

        class BadMask(StructuredMask):
            name = STRATEGY

            @hookimpl
            def apply_mask(self, ctx, scores, ratio):
                return damage(super().apply_mask(ctx=ctx, scores=scores, ratio=ratio), ctx)

        return BadMask

    class BadInfer(SlicedInference):
        name = STRATEGY

        @hookimpl
        def infer(self, ctx, block, inputs, mask):
            return damage(super().infer(ctx=ctx, block=block, inputs=inputs, mask=mask), ctx)

    return BadInfer


class _Plugin:
    """A plugin object registering the given strategy classes."""

    def __init__(self, *classes: type) -> None:
        self.classes = classes

    @hookimpl
    def ppf_register_strategies(self, register):
        for cls in self.classes:
            register(cls)


def registry_with(*classes: type) -> StrategyRegistry:
    """Built-ins plus ``classes``."""
    registry = StrategyRegistry()
    registry.load_builtins()
    report = registry.register_plugin(_Plugin(*classes), "test-strategy-outputs")
    assert report.error is None, report.error
    return registry


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model(FAMILY)


@pytest.fixture(scope="module")
def calibration(model):
    ids = torch.randint(0, 200, (2, SEQ), generator=torch.Generator().manual_seed(1))
    return calibrate(model, get_adapter(model), [ids], progress=False)


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, 200, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))


def pp_method(**strategies: str) -> MethodConfig:
    """PP at 40% (layer 0 skipped) with a calibration history and EMA updates (stats collected)."""
    return MethodConfig.model_validate(
        {"preset": "pp", "pruning": {"ratio": 0.4, "skip_layers": [0]}, "strategies": strategies}
    )


# -------------------------------------------------------------------------------- the table


@pytest.mark.parametrize(
    ("case", "stage", "damage", "fragment"), BAD_OUTPUTS, ids=[row[0] for row in BAD_OUTPUTS]
)
def test_bad_strategy_output_is_reported_with_stage_and_strategy(
    model, calibration, input_ids, case, stage, damage, fragment
):
    registry = registry_with(bad_strategy(stage, damage))
    pipe = Pipeline(model, pp_method(**{stage: STRATEGY}), history=calibration.clone(), registry=registry)
    with pytest.raises(StrategyOutputError) as raised, pipe, torch.no_grad():
        model(input_ids=input_ids, use_cache=False)
    error = raised.value
    message = str(error)
    assert message.startswith(f"{stage} strategy {STRATEGY!r} returned "), message
    assert fragment in message, message
    assert (error.stage, error.strategy) == (stage, STRATEGY)
    assert "layer 1" in message  # the first pruned layer: caught at the first block
    assert not any("forward" in layer.__dict__ for layer in get_adapter(model).layers)  # detached


def test_item_4_repeated_units_no_longer_report_a_negative_ratio(model, calibration, input_ids):
    doubled = bad_strategy("apply_mask", lambda m, c: _mask(m, kept_units=m.kept_units.repeat_interleave(2)))
    pipe = Pipeline(
        model, pp_method(apply_mask=STRATEGY), history=calibration.clone(), registry=registry_with(doubled)
    )
    with pytest.raises(StrategyOutputError, match="repeated values"), pipe, torch.no_grad():
        model(input_ids=input_ids, use_cache=False)
    assert pipe.realised_ratio() >= 0.0


def test_static_method_mask_is_checked_when_it_decides(model, calibration, input_ids):
    registry = registry_with(bad_strategy("apply_mask", lambda m, c: _mask(m, kept_units=m.kept_units[:0])))
    method = MethodConfig.model_validate(
        {
            "preset": "static-ppsp",
            "pruning": {"ratio": 0.4, "skip_layers": [0]},
            "strategies": {"apply_mask": STRATEGY},
        }
    )
    pipe = Pipeline(model, method, history=calibration.clone(), registry=registry)
    assert pipe.is_static
    with pytest.raises(
        StrategyOutputError, match="apply_mask strategy 'bad-output' returned an empty kept_units"
    ):
        pipe.attach()
    pipe.detach()


def test_static_method_infer_output_is_checked(model, calibration, input_ids):
    registry = registry_with(bad_strategy("infer", lambda o, c: o.output))
    method = MethodConfig.model_validate(
        {
            "preset": "static-ppsp",
            "pruning": {"ratio": 0.4, "skip_layers": [0]},
            "strategies": {"infer": STRATEGY},
        }
    )
    pipe = Pipeline(model, method, history=calibration.clone(), registry=registry)
    with pytest.raises(StrategyOutputError, match="infer strategy 'bad-output' returned a Tensor"), pipe:
        model(input_ids=input_ids, use_cache=False)


@pytest.mark.parametrize("preset", ["pp", "static-ppsp", "flap"])
def test_checks_change_no_result(model, calibration, input_ids, preset):
    method = MethodConfig.model_validate({"preset": preset, "pruning": {"ratio": 0.4, "skip_layers": [0]}})
    padded = torch.ones(BATCH, SEQ, dtype=torch.long)
    padded[1, -5:] = 0
    results = []
    for validate in (True, False):
        pipe = Pipeline(model, method, history=calibration.clone())
        pipe.validate_outputs = validate
        with pipe, torch.no_grad():
            first = model(input_ids=input_ids, use_cache=False).logits
            second = model(input_ids=input_ids, attention_mask=padded, use_cache=False).logits
        results.append((first, second, pipe.record.kept_units, pipe.history.get(1, BlockKind.MLP).sq_mean))
    (a1, a2, kept_a, hist_a), (b1, b2, kept_b, hist_b) = results
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert kept_a == kept_b and torch.equal(hist_a, hist_b)


def test_validate_outputs_switch_turns_the_checks_off(model, calibration, input_ids):
    registry = registry_with(bad_strategy("infer", lambda o, c: dataclasses.replace(o, sq_mean=None)))
    pipe = Pipeline(model, pp_method(infer=STRATEGY), history=calibration.clone(), registry=registry)
    assert Pipeline.validate_outputs is True
    pipe.validate_outputs = False
    with pipe, torch.no_grad():
        model(input_ids=input_ids, use_cache=False)  # unchecked: the history is simply not updated


# -------------------------------------------------------------------------------- the functions


def test_fuse_check_is_deferred_to_the_mask_check_and_names_fuse_history():
    ctx = make_context("mlp")
    channels = ctx.geometry.channels
    scores = ChannelScores(weight_term=torch.ones(channels), combine=lambda a, w: w)
    scores.activation = torch.full((channels,), float("inf"))
    pending = check_fused(scores, "my-fusion", ctx, defer=True)
    assert pending is not None and not bool(pending.ok)
    mask = BlockMask(kept_units=torch.arange(channels), total_units=channels)
    with pytest.raises(StrategyOutputError, match="fuse_history strategy 'my-fusion' returned an activation"):
        check_mask(mask, "my-mask", ctx, pending=pending)
    with pytest.raises(StrategyOutputError, match="non-finite"):
        check_fused(scores, "my-fusion", ctx, defer=False)
    scores.activation = torch.ones(channels)
    assert check_fused(scores, "my-fusion", ctx, defer=False) is None
    check_mask(mask, "my-mask", ctx, pending=check_fused(scores, "my-fusion", ctx, defer=True))


def test_error_message_matches_the_issue_example():
    ctx = make_context("mlp", dataclasses.replace(make_context("mlp").geometry, units=9))
    mask = BlockMask(kept_units=torch.tensor([1, 3, 3]), total_units=9)
    with pytest.raises(StrategyOutputError) as raised:
        check_mask(mask, "my-mask", ctx)
    assert str(raised.value) == (
        "apply_mask strategy 'my-mask' returned kept_units with repeated values [3, 3]; "
        "kept_units must be a non-empty 1-D torch.long tensor of sorted, unique channels in [0, 9) "
        "(at least 1 kept, at most all); at layer 0, mlp block"
    )
    assert isinstance(raised.value, RuntimeError)


def test_valid_outputs_pass():
    ctx = make_context("attention")  # 4 heads over 2 key/value heads
    probe = Probe(torch.tensor([0, 2]), torch.tensor([1, 5]), torch.ones(2, 2, dtype=torch.bool))
    check_probe(probe, "p", ctx, batch=3, seq=8)
    check_probe(None, "p", ctx, batch=3, seq=8)
    mask = BlockMask(torch.tensor([0, 3]), 4, kept_kv_heads=torch.tensor([0, 1]), output_bias=torch.zeros(5))
    check_mask(mask, "m", ctx, hidden=5)


# -------------------------------------------------------------------------------- attach safety


def test_nested_with_keeps_pruning_on_until_the_outermost_exit(model, calibration, input_ids):
    pipe = Pipeline(model, pp_method(), history=calibration.clone())
    layers = get_adapter(model).layers
    with pipe, torch.no_grad():
        with pipe:
            model(input_ids=input_ids, use_cache=False)
        model(input_ids=input_ids, use_cache=False)  # still pruned after the inner block
        assert len(pipe.record.removed_params) == 2 and pipe.record.removed_params[1] > 0
        assert "forward" in layers[1].__dict__
    assert not any("forward" in layer.__dict__ for layer in layers)
    with pipe:  # usable again afterwards
        assert "forward" in layers[1].__dict__
    assert "forward" not in layers[1].__dict__


def test_history_of_another_width_is_refused_at_attach(model, input_ids):
    other = tiny_model(FAMILY, intermediate_size=96)
    history = calibrate(other, get_adapter(other), [input_ids], progress=False)
    pipe = Pipeline(model, pp_method(), history=history)
    with pytest.raises(ConfigError) as raised:
        pipe.attach()
    message = str(raised.value)
    assert message.startswith("history: it does not match this model")
    assert "(layer 0, mlp): sq_mean has shape (16, 96), the model's mlp blocks have 128 channels" in message
    assert "attention" not in message.split("\n", 1)[1]  # the attention blocks do match
    assert not any("forward" in layer.__dict__ for layer in get_adapter(model).layers)


def test_history_of_another_depth_is_refused_at_attach(model, input_ids):
    deeper = tiny_model(FAMILY, num_hidden_layers=6)
    history = calibrate(deeper, get_adapter(deeper), [input_ids], progress=False)
    with pytest.raises(
        ConfigError, match=r"\(layer 4, attention\): layer index out of range for a 4-layer model"
    ):
        Pipeline(model, pp_method(), history=history).attach()
    shallower = tiny_model(FAMILY, num_hidden_layers=2)
    history = calibrate(shallower, get_adapter(shallower), [input_ids], progress=False)
    with pytest.raises(ConfigError, match=r"no history for the pruned blocks \[\(layer 2, attention\)"):
        Pipeline(model, pp_method(), history=history).attach()


def test_matching_history_is_accepted(model, calibration):
    Pipeline(model, pp_method(), history=calibration.clone()).attach().detach()


# -------------------------------------------------------------------------------- allocate answers


def _allocation(convert: Callable[[float], Any]) -> type:
    """A uniform allocation named ``bad-output`` whose ratios are ``convert(layer ratio)``."""
    from ppframework.strategies.allocation import UniformAllocation

    class ConvertedAllocation(UniformAllocation):
        name = STRATEGY

        @hookimpl
        def allocate(self, plan, scores, target):
            return dict.fromkeys(plan.blocks, convert(plan.layer_ratio))

    return ConvertedAllocation


@pytest.mark.parametrize(
    "convert",
    [np.float32, np.float64, lambda r: torch.tensor(r), lambda r: torch.tensor(r, dtype=torch.float64)],
    ids=["numpy-float32", "numpy-float64", "0-d-tensor", "0-d-tensor-float64"],
)
def test_allocate_may_answer_numpy_and_0d_tensor_floats(model, calibration, input_ids, convert):
    registry = registry_with(_allocation(convert))
    pipe = Pipeline(model, pp_method(allocate=STRATEGY), history=calibration.clone(), registry=registry)
    with pipe, torch.no_grad():
        model(input_ids=input_ids, use_cache=False)
    assert all(type(r) is float for r in pipe.block_ratios.values())
    assert all(abs(r - pipe.layer_ratio) < 1e-6 for r in pipe.block_ratios.values())


@pytest.mark.parametrize(
    ("convert", "fragment"),
    [
        (str, "a ratio of type str"),
        (lambda r: torch.tensor([r]), "a ratio of type Tensor with shape (1,)"),
        (lambda r: np.array([r]), "a ratio of type ndarray with shape (1,)"),
        (lambda r: True, "a ratio of type bool"),
        (lambda r: np.float32(1.5), "ratios outside [0, 1)"),
    ],
    ids=["str", "1-element-tensor", "1-element-array", "bool", "numpy-out-of-range"],
)
def test_allocate_of_another_type_is_told_the_expected_type(model, calibration, convert, fragment):
    registry = registry_with(_allocation(convert))
    with pytest.raises(StrategyOutputError) as raised:
        Pipeline(model, pp_method(allocate=STRATEGY), history=calibration.clone(), registry=registry).attach()
    message = str(raised.value)
    assert message.startswith(f"allocate strategy {STRATEGY!r} returned "), message
    assert fragment in message, message
    assert "a Python float or int, a numpy floating/integer scalar or a 0-d tensor" in message, message


def test_score_and_infer_checks_are_deferred_to_the_mask_check_and_name_their_stage():
    ctx = make_context("mlp")
    channels = ctx.geometry.channels
    mask = BlockMask(kept_units=torch.arange(channels), total_units=channels)
    scores = ChannelScores(weight_term=_nan_at_0(torch.ones(channels)), combine=lambda a, w: w)
    pending = check_scores(scores, "my-score", ctx, defer=True)
    assert pending is not None and not bool(pending.ok)
    with pytest.raises(StrategyOutputError, match="strategy 'my-score' returned a weight_term"):
        check_mask(mask, "my-mask", ctx, pending=pending)
    with pytest.raises(StrategyOutputError, match="weight_term with non-finite values at channels"):
        check_scores(scores, "my-score", ctx)  # not deferred: raised at once
    output = torch.zeros(2, 4, 8)
    output[1, 2, 3] = float("-inf")
    pending = check_output(BlockOutput(output), "my-infer", ctx, (2, 4, 8), defer=True)
    assert pending is not None and not bool(pending.ok)
    with pytest.raises(StrategyOutputError, match="infer strategy 'my-infer' returned an output"):
        check_mask(mask, "my-mask", ctx, pending=pending)
    assert check_output(BlockOutput(torch.zeros(2, 4, 8)), "my-infer", ctx, (2, 4, 8)) is None
