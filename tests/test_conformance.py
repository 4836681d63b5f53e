"""The strategy conformance suite (:mod:`ppframework.testing.conformance`).

Every registered strategy must pass its stage's check, and deliberately broken strategies must
make the matching check fail with an AssertionError naming the strategy and the rule.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ppframework.hookspecs import STAGES, hookimpl
from ppframework.registry import StrategyRegistry
from ppframework.strategies.fusion import ImportanceScaledFusion
from ppframework.strategies.inference import SlicedInference
from ppframework.strategies.masking import StructuredMask
from ppframework.strategies.probe import FullBatchProbe, ResidualProbe
from ppframework.strategies.scoring import PPspScore
from ppframework.testing import (
    STAGE_CHECKS,
    check_apply_mask,
    check_fuse_history,
    check_infer,
    check_score_channels,
    check_select_probe,
    check_strategy,
    make_context,
    registered_strategies,
)
from ppframework.types import BlockKind, BlockMask, BlockOutput, Probe

EXAMPLES = 20  # per registered strategy
BROKEN_EXAMPLES = 10  # per deliberately broken strategy (each fails on almost every input)


# --------------------------------------------------------------------------- every registered strategy


@pytest.mark.parametrize("info", registered_strategies(), ids=lambda info: f"{info.stage}:{info.name}")
def test_registered_strategy_conforms(info):
    check_strategy(info.build(), max_examples=EXAMPLES)


def test_every_stage_has_a_check_and_a_registered_strategy():
    assert tuple(STAGE_CHECKS) == STAGES
    for stage in STAGES:
        assert registered_strategies(stage), stage
        assert all(info.stage == stage for info in registered_strategies(stage))


# --------------------------------------------------------------------------- broken strategies


class UnsortedProbe(FullBatchProbe):
    """Returns the full batch with the positions in descending order."""

    name = "unsorted"

    @hookimpl
    def select_probe(self, ctx, residual, normed, attention_mask):
        probe = super().select_probe(ctx=ctx, residual=residual, normed=normed, attention_mask=attention_mask)
        tokens = torch.cat([probe.token_index.flip(0), probe.token_index[:1]])  # never sorted
        rows = probe.batch_index
        return Probe(rows, tokens, attention_mask.bool()[rows][:, tokens])


class OutOfRangeProbe(FullBatchProbe):
    """Probes every row and one position past the end of the sequence."""

    name = "out-of-range"

    @hookimpl
    def select_probe(self, ctx, residual, normed, attention_mask):
        batch, seq = attention_mask.shape
        rows, tokens = torch.arange(batch), torch.arange(seq + 1)  # one position past the end
        return Probe(rows, tokens, torch.ones(batch, seq + 1, dtype=torch.bool))


class GlobalRandomProbe(FullBatchProbe):
    """Picks one position with the global RNG instead of ``ctx.generator``."""

    name = "global-rng"

    @hookimpl
    def select_probe(self, ctx, residual, normed, attention_mask):
        real = attention_mask.bool()
        positions = real.any(dim=0).nonzero().flatten()
        tokens = positions[torch.randint(0, positions.numel(), (1,))]
        rows = real[:, tokens].any(dim=1).nonzero().flatten()
        return Probe(rows, tokens, real[rows][:, tokens])


class NegativeScore(PPspScore):
    """A weight term that can be negative."""

    name = "negative"

    @hookimpl
    def score_channels(self, ctx, probe, probe_states, weight):
        scores = super().score_channels(ctx=ctx, probe=probe, probe_states=probe_states, weight=weight)
        scores.weight_term = scores.weight_term - scores.weight_term.max() - 1.0
        return scores


class MutatingFusion(ImportanceScaledFusion):
    """Decays the history in place while fusing."""

    name = "mutating"

    @hookimpl
    def fuse_history(self, ctx, scores, history):
        if history is not None:
            history.sq_mean.mul_(0.5).add_(1.0)
        return super().fuse_history(ctx=ctx, scores=scores, history=history)


class RefusingFusion(ImportanceScaledFusion):
    """Supports no combination at all."""

    name = "refusing"

    @hookimpl
    def fuse_history(self, ctx, scores, history):
        raise ValueError("this fusion supports nothing")


class EmptyMask(StructuredMask):
    """Keeps no unit."""

    name = "empty"

    @hookimpl
    def apply_mask(self, ctx, scores, ratio):
        mask = super().apply_mask(ctx=ctx, scores=scores, ratio=ratio)
        return BlockMask(kept_units=mask.kept_units[:0], total_units=mask.total_units)


class WrongShapeInfer(SlicedInference):
    """Drops the last hidden feature of the output."""

    name = "wrong-shape"

    @hookimpl
    def infer(self, ctx, block, inputs, mask):
        out = super().infer(ctx=ctx, block=block, inputs=inputs, mask=mask)
        return BlockOutput(out.output[..., :-1], out.sq_mean, out.position_valid, out.kept_channels)


class UnmarkedProbe:
    """Forgot ``@hookimpl``: pluggy would never call it."""

    stage = "select_probe"
    name = "unmarked"

    def select_probe(self, ctx, residual, normed, attention_mask):
        return None


class MisspelledProbe:
    """Asks for an argument the hook spec does not have."""

    stage = "select_probe"
    name = "misspelled"

    @hookimpl
    def select_probe(self, ctx, residuals):
        return None


BROKEN = [
    (check_select_probe, UnsortedProbe(), "sorted strictly ascending", BROKEN_EXAMPLES),
    (check_select_probe, OutOfRangeProbe(), "in range", BROKEN_EXAMPLES),
    (check_select_probe, GlobalRandomProbe(), "deterministic", 25),  # needs >= 2 real positions
    (check_score_channels, NegativeScore(), "weight_term is finite and >= 0", BROKEN_EXAMPLES),
    (check_fuse_history, MutatingFusion(), "the history is not modified", BROKEN_EXAMPLES),
    (check_fuse_history, RefusingFusion(), "at least one supported combination", BROKEN_EXAMPLES),
    (check_apply_mask, EmptyMask(), "keeps at least one unit", BROKEN_EXAMPLES),
    (check_infer, WrongShapeInfer(), "output has shape (B, T, hidden)", BROKEN_EXAMPLES),
    (check_select_probe, UnmarkedProbe(), "marked with @hookimpl", 1),
    (check_select_probe, MisspelledProbe(), "matches the hookspec", 1),
]


@pytest.mark.parametrize(("check", "strategy", "rule", "examples"), BROKEN, ids=[b[1].name for b in BROKEN])
def test_broken_strategy_fails_its_check(check, strategy, rule, examples):
    with pytest.raises(AssertionError) as failure:
        check(strategy, max_examples=examples)
    message = str(failure.value)
    assert rule in message
    assert repr(strategy.name) in message and type(strategy).__qualname__ in message


def test_check_strategy_dispatches_on_the_stage():
    with pytest.raises(AssertionError, match="in range"):
        check_strategy(OutOfRangeProbe(), max_examples=BROKEN_EXAMPLES)
    with pytest.raises(AssertionError, match="weight_term"):
        check_strategy(NegativeScore(), max_examples=BROKEN_EXAMPLES, stage="score_channels")


def test_check_strategy_rejects_unknown_stages():
    with pytest.raises(ValueError, match="unknown stage"):
        check_strategy(ResidualProbe(), stage="select_probes")
    no_stage = type("NoStage", (), {"name": "no-stage"})()
    with pytest.raises(AssertionError, match="declares a `stage`"):
        check_strategy(no_stage)
    with pytest.raises(ValueError, match="max_examples"):
        check_select_probe(ResidualProbe(), max_examples=0)


def test_check_strategy_accepts_classes_and_registry_entries():
    check_strategy(ResidualProbe, max_examples=3)
    check_strategy(registered_strategies("apply_mask")[0], max_examples=3)


# --------------------------------------------------------------------------- helpers


def test_make_context_defaults_and_validation():
    ctx = make_context(BlockKind.ATTENTION)
    assert ctx.kind is BlockKind.ATTENTION and ctx.geometry.kind is BlockKind.ATTENTION
    assert ctx.seq_len == 8 and ctx.position_valid.dtype == torch.bool and bool(ctx.position_valid.all())
    valid = torch.tensor([True, True, False])
    ctx = make_context("mlp", seq_len=3, position_valid=valid, seed=5, collect_stats=True, round_to=8)
    assert ctx.seq_len == 3 and torch.equal(ctx.position_valid, valid)
    assert ctx.collect_stats and ctx.round_to == 8 and ctx.geometry.unit_width == 1
    same_seed = make_context("mlp", seed=5)
    assert torch.equal(torch.rand(4, generator=ctx.generator), torch.rand(4, generator=same_seed.generator))
    with pytest.raises(ValueError, match="position_valid"):
        make_context("mlp", seq_len=4, position_valid=valid)
    with pytest.raises(ValueError, match="geometry"):
        make_context("mlp", make_context("attention").geometry)


def test_registered_strategies_filters_and_takes_a_registry():
    registry = StrategyRegistry()
    registry.load_builtins()
    infos = registered_strategies("infer", registry=registry)
    assert [info.name for info in infos] == registry.names("infer")
    assert len(registered_strategies(registry=registry)) == len(registry.all())
    with pytest.raises(ValueError, match="unknown stage"):
        registered_strategies("probe")


def test_importing_the_package_is_light():
    code = (
        "import sys, ppframework.testing as t; "
        "assert callable(t.check_strategy); "
        "heavy = [m for m in ('pytest', 'hypothesis') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_conformance_runs_the_pipelines_output_checks():
    from ppframework.testing.conformance.subject import _Subject
    from ppframework.validation import check_mask

    subject = _Subject(StructuredMask(), "apply_mask")
    ctx = make_context("mlp")
    bad = BlockMask(kept_units=torch.tensor([1, 1]), total_units=ctx.geometry.units)
    with pytest.raises(AssertionError) as failure:
        subject.require_accepted(check_mask, bad, ctx)
    message = str(failure.value)
    assert "'structured'" in message and "the pipeline's output checks accept the result" in message
    assert "kept_units with repeated values [1, 1]" in message
    subject.require_accepted(check_mask, BlockMask(torch.tensor([0, 1]), ctx.geometry.units), ctx)
