"""``per-block``: one ``score_channels`` strategy for attention heads, another for MLP channels
(presets ``pp-blockwise`` and ``pp-prompt-blockwise``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ppframework.adapters import get_adapter
from ppframework.calibration import calibrate
from ppframework.config import MethodConfig
from ppframework.errors import ConfigError
from ppframework.pipeline import Pipeline
from ppframework.registry import default_registry
from ppframework.strategies.per_block import PerBlockParams, PerBlockScore
from ppframework.strategies.scoring import PPspParams, PPspScore
from ppframework.strategies.wanda import WandaScore
from ppframework.testing.conformance import check_score_channels
from ppframework.testing.tiny import tiny_model
from ppframework.types import BlockKind

WANDA = {"name": "wanda", "params": {"head_reduce": "l2", "output_gain": True}}
PPSP = {"name": "ppsp", "params": {"output_gain": True}}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _batches(rows: list[int], seq: int = 24, seed: int = 5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 200, (r, seq), generator=gen) for r in rows]


def _method(score: dict[str, Any], *, static: bool = False, ratio: float = 0.4) -> MethodConfig:
    strategies: dict[str, Any] = {"score_channels": score}
    if static:
        strategies.update(select_probe="none", fuse_history="history-only")
    return MethodConfig.model_validate(
        {
            "preset": "pp",
            "pruning": {"ratio": ratio, "skip_layers": [0]},
            "strategies": strategies,
            **({"history": {"init": "calibration", "update": "frozen"}} if static else {}),
        }
    )


def _run(model: torch.nn.Module, method: MethodConfig, history: Any, batches: list[torch.Tensor]) -> Any:
    """(logits of every batch, the pipeline's static masks by block)."""
    pipe = Pipeline(model, method, history=history.clone())
    with pipe, torch.no_grad():
        logits = torch.stack([model(input_ids=b, use_cache=False).logits for b in batches])
    return logits, dict(pipe._static_masks)


@pytest.mark.parametrize("family", ["llama-gqa", "gemma3"])
def test_the_same_scorer_for_both_kinds_is_that_scorer(family: str) -> None:
    model = tiny_model(family)
    batches = _batches([4, 4, 4])
    history = calibrate(model, get_adapter(model), batches, progress=False)
    for child in (PPSP, WANDA):
        alone, _ = _run(model, _method(child), history, batches)
        split, _ = _run(
            model,
            _method({"name": "per-block", "params": {"attention": child, "mlp": child}}),
            history,
            batches,
        )
        assert torch.equal(alone, split), (family, child["name"])


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_each_kind_gets_its_own_scorers_choice(family: str) -> None:
    """Static decisions depend on the calibration history only, so a block's kept set under per-block
    is the kept set of the method that uses that block's scorer everywhere."""
    model = tiny_model(family)
    batches = _batches([4, 4, 4])
    history = calibrate(model, get_adapter(model), batches, progress=False)
    _, wanda = _run(model, _method(WANDA, static=True), history, batches)
    _, ppsp = _run(model, _method(PPSP, static=True), history, batches)
    split_method = _method({"name": "per-block", "params": {"attention": WANDA, "mlp": PPSP}}, static=True)
    _, split = _run(model, split_method, history, batches)
    assert set(split) == set(wanda) == set(ppsp)
    differs = False
    for (layer, kind), mask in split.items():
        expected = wanda if kind is BlockKind.ATTENTION else ppsp
        assert torch.equal(mask.kept_units, expected[(layer, kind)].kept_units), (layer, kind)
        other = ppsp if kind is BlockKind.ATTENTION else wanda
        differs |= not torch.equal(mask.kept_units, other[(layer, kind)].kept_units)
    assert differs, "the two scorers keep the same units everywhere: the test would not see a swap"


@pytest.mark.parametrize(
    "preset", ["pp-blockwise", "pp-prompt-blockwise", "pp-wanda-heads", "pp-prompt-wanda-heads"]
)
def test_ratio_zero_is_the_unmodified_model(preset: str) -> None:
    model = tiny_model("gemma3")
    batches = _batches([2, 2])
    history = calibrate(model, get_adapter(model), batches, progress=False)
    with torch.no_grad():
        dense = [model(input_ids=b, use_cache=False).logits for b in batches]
    method = MethodConfig.model_validate({"preset": preset, "pruning": {"ratio": 0.0}})
    with Pipeline(model, method, history=history.clone()), torch.no_grad():
        for batch, expected in zip(batches, dense, strict=True):
            assert torch.equal(model(input_ids=batch, use_cache=False).logits, expected)
        generated = model.generate(batches[0][:1, :8], max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        assert torch.equal(generated, model.generate(batches[0][:1, :8], max_new_tokens=4, do_sample=False))


def test_presets_use_the_default_children() -> None:
    for preset in ("pp-blockwise", "pp-prompt-blockwise"):
        built = default_registry().build_method(MethodConfig.model_validate({"preset": preset}))
        scorer = built["score_channels"]
        assert isinstance(scorer, PerBlockScore)
        attention, mlp = scorer.children[BlockKind.ATTENTION], scorer.children[BlockKind.MLP]
        assert isinstance(attention, WandaScore) and attention.head_reduce == "l2" and attention.output_gain
        assert isinstance(mlp, PPspScore) and mlp.output_gain


def test_pp_wanda_heads_compensates_the_heads_only_and_its_mlp_is_pp() -> None:
    """``pp-wanda-heads``: compensated dynamic Wanda (heads by sum, output gain) for attention, the paper's
    PPsp for the MLP. With every attention head kept (``targets: [mlp]``) it is ``pp`` bit for bit;
    pruned, every attention block carries a compensation bias and no MLP block does."""
    built = default_registry().build_method(MethodConfig.model_validate({"preset": "pp-wanda-heads"}))
    scorer = built["score_channels"]
    attention, mlp = scorer.children[BlockKind.ATTENTION], scorer.children[BlockKind.MLP]
    assert isinstance(attention, WandaScore) and attention.head_reduce == "sum"
    assert attention.output_gain and attention.bias_compensation
    assert type(mlp) is PPspScore and mlp.params == PPspParams()
    model = tiny_model("gemma3")
    batches = _batches([4, 4])
    history = calibrate(model, get_adapter(model), batches, progress=False)
    pruning = {"ratio": 0.4, "skip_layers": [0]}
    mlp_only = {"ratio": 0.4, "skip_layers": [0], "targets": ["mlp"]}
    heads = MethodConfig.model_validate({"preset": "pp-wanda-heads", "pruning": mlp_only})
    pp = MethodConfig.model_validate({"preset": "pp", "pruning": mlp_only})
    assert torch.equal(_run(model, heads, history, batches)[0], _run(model, pp, history, batches)[0])
    method = MethodConfig.model_validate({"preset": "pp-wanda-heads", "pruning": pruning})
    pipe = Pipeline(model, method, history=history.clone())
    with pipe, torch.no_grad():
        model(input_ids=batches[0], use_cache=False)
    assert {kind for _, kind in pipe.last_masks} == set(BlockKind)
    for (layer, kind), mask in pipe.last_masks.items():
        assert (mask.output_bias is not None) == (kind is BlockKind.ATTENTION), (layer, kind)


@pytest.mark.parametrize(
    ("score", "match"),
    [
        (
            {"name": "per-block", "params": {"mlp": {"name": "no-such-metric"}}},
            r"strategies\.score_channels\.params\.mlp\.name",
        ),
        (
            {
                "name": "per-block",
                "params": {"attention": {"name": "wanda", "params": {"head_reduce": "max"}}},
            },
            r"strategies\.score_channels\.params\.attention\.params\.head_reduce",
        ),
        ({"name": "per-block", "params": {"embedding": PPSP}}, r"strategies\.score_channels\.params"),
        ({"name": "per-block", "params": {"mlp": 3}}, r"strategies\.score_channels\.params\.mlp"),
    ],
)
def test_bad_children_are_refused_naming_the_field(score: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        default_registry().build_method(_method(score))


def test_a_child_that_cannot_work_with_the_probe_is_refused_before_any_model_loads() -> None:
    with pytest.raises((ConfigError, ValueError), match=r"score_channels\.params\.attention: 'flap'"):
        _method({"name": "per-block", "params": {"attention": {"name": "flap"}, "mlp": PPSP}})


def test_direct_construction_knows_the_builtin_children_only() -> None:
    assert isinstance(PerBlockScore().children[BlockKind.MLP], PPspScore)
    with pytest.raises(ValueError, match="params.mlp: 'griffin'"):
        PerBlockScore(PerBlockParams.model_validate({"mlp": {"name": "griffin"}}))


def test_per_block_meets_the_score_channels_contract() -> None:
    check_score_channels(PerBlockScore(), max_examples=10)


def test_the_childrens_calibration_passes_are_asked_for() -> None:
    method = _method(
        {"name": "per-block", "params": {"attention": {"name": "taylor"}, "mlp": PPSP}}, static=True
    )
    scorer = default_registry().build_method(method)["score_channels"]
    assert scorer.calibration_statistics == ("taylor",)
    assert PerBlockScore().calibration_statistics == ()
