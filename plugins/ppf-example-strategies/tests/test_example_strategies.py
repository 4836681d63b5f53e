"""Tests of the example plugin: ppframework's conformance suite, hand-computed metrics, config use."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from ppframework.api import load_config
from ppframework.errors import ConfigError
from ppframework.registry import LOAD_PLUGINS_ENV, default_registry
from ppframework.strategies.fusion import ImportanceScaledFusion
from ppframework.strategies.probe import ProbeParams
from ppframework.strategies.scoring import ppsp_weight_term
from ppframework.testing import check_strategy, make_context
from ppframework.types import BlockContext, BlockGeometry, BlockKind, Probe
from pydantic import ValidationError

from ppf_example_strategies import (
    PPspL1Score,
    VarianceProbe,
    VarianceProbeParams,
    ppsp_l1_weight_term,
    select_variance_probe,
)

DIST = "ppf-example-strategies"


def mlp_context(channels: int, seq_len: int) -> BlockContext:
    """An MLP-block context with ``channels`` channels, from ppframework's testing kit."""
    return make_context(
        BlockKind.MLP, BlockGeometry(kind=BlockKind.MLP, units=channels, unit_width=1), seq_len=seq_len
    )


def spread(values: list[list[float]]) -> torch.Tensor:
    """(B, T, 2) features ``[x, -x]``: each token's variance over its 2 features is exactly ``x^2``."""
    x = torch.tensor(values)
    return torch.stack([x, -x], dim=-1)


# -- conformance --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [VarianceProbeParams(), VarianceProbeParams(seq_ratio=0.25, batch_ratio=1.0)],
    ids=["defaults", "quarter-tokens-all-rows"],
)
def test_variance_probe_passes_the_conformance_suite(params: VarianceProbeParams) -> None:
    check_strategy(VarianceProbe(params))


def test_ppsp_l1_passes_the_conformance_suite() -> None:
    check_strategy(PPspL1Score())


# -- the variance probe, by hand ------------------------------------------------------------------


def test_variance_probe_ranks_tokens_then_rows_by_feature_variance() -> None:
    # per-token variances (x^2):  row 0: 1 9 0 4    row 1: 4 0 1 2.25    row 2: 0 0 [25, padding] 0
    normed = spread([[1.0, 3.0, 0.0, 2.0], [2.0, 0.0, 1.0, 1.5], [0.0, 0.0, 5.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 1]])
    residual = torch.zeros(3, 4, 2)
    residual[:, 2] = 100.0  # the residual would pick position 2; the variance probe ignores it
    probe = VarianceProbe(VarianceProbeParams(seq_ratio=0.5, batch_ratio=0.5)).select_probe(
        ctx=mlp_context(2, 4), residual=residual, normed=normed, attention_mask=mask
    )
    # token scores 5, 9, 1 (padding's 25 excluded), 6.25 -> k_T = 2: positions 1 and 3
    assert probe.token_index.tolist() == [1, 3]
    # row scores on {1, 3}: 13, 2.25, 0 -> k_B = ceil(0.5 * 3) = 2: rows 0 and 1
    assert probe.batch_index.tolist() == [0, 1]
    assert probe.valid.tolist() == [[True, True], [True, True]]


def test_variance_probe_never_chooses_padding() -> None:
    normed = spread([[1.0, 2.0, 9.0], [3.0, 1.0, 9.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # position 2 and row 2 are all padding
    probe = select_variance_probe(normed, mask, seq_ratio=1.0, batch_ratio=1.0)
    assert probe.token_index.tolist() == [0, 1]
    assert probe.batch_index.tolist() == [0, 1]
    assert probe.valid.tolist() == [[True, True], [True, False]]


def test_variance_probe_keeps_at_least_two_positions_like_pp() -> None:
    normed = spread([[1.0, 4.0, 2.0, 3.0]])
    probe = select_variance_probe(
        normed, torch.ones(1, 4, dtype=torch.long), seq_ratio=0.01, batch_ratio=0.05
    )
    assert probe.token_index.tolist() == [1, 3]
    assert probe.batch_index.tolist() == [0]


def test_variance_probe_params_default_like_pp_and_forbid_unknown_fields() -> None:
    pp = ProbeParams()
    ours = VarianceProbeParams()
    assert (ours.seq_ratio, ours.batch_ratio) == (pp.seq_ratio, pp.batch_ratio) == (0.5, 0.05)
    with pytest.raises(ValidationError):
        VarianceProbeParams(sink_threshold=3)
    with pytest.raises(ValidationError):
        VarianceProbeParams(seq_ratio=0.0)


# -- ppsp-l1, by hand -----------------------------------------------------------------------------


def test_ppsp_l1_weight_term_sums_squared_weights_over_output_rows() -> None:
    weight = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, -1.0]])  # (hidden=3, C=2)
    assert ppsp_l1_weight_term(weight).tolist() == [10.0, 5.0]  # 1+9+0, 4+0+1
    # PPsp's L2 over rows differs: sqrt(1 + 81 + 0), sqrt(16 + 0 + 1)
    assert torch.allclose(ppsp_weight_term(weight), torch.tensor([82.0, 17.0]).sqrt())


def test_ppsp_l1_scores_probe_evidence_times_weight_term() -> None:
    weight = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, -1.0]])
    states = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])  # (k_B=2, k_T=1, C=2)
    probe = Probe(
        batch_index=torch.tensor([0, 1]),
        token_index=torch.tensor([5]),
        valid=torch.tensor([[True], [False]]),  # row 1 is padding at position 5
    )
    ctx = mlp_context(2, 8)
    scores = PPspL1Score().score_channels(ctx=ctx, probe=probe, probe_states=states, weight=weight)
    assert scores.metric == "ppsp-l1" and scores.head_reduce == "l2"
    assert scores.weight_term.tolist() == [10.0, 5.0]
    assert scores.evidence.tolist() == [[1.0, 4.0]]  # mean over real rows of the squares
    assert scores.positions.tolist() == [5] and scores.position_valid.tolist() == [True]
    fused = ImportanceScaledFusion().fuse_history(ctx=ctx, scores=scores, history=None)
    assert fused.activation.tolist() == [1.0, 4.0]
    assert fused.channel_scores().tolist() == [10.0, 20.0]  # a_c * sum_i W[i, c]^2


def test_ppsp_l1_without_probe_has_no_evidence_and_needs_an_activation() -> None:
    weight = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    scores = PPspL1Score().score_channels(ctx=mlp_context(2, 4), probe=None, probe_states=None, weight=weight)
    assert scores.evidence is None and scores.positions is None
    scores.activation = torch.tensor([0.5, 2.0])
    assert scores.channel_scores().tolist() == [5.0, 8.0]
    scores.activation = None
    with pytest.raises(ValueError, match="activation"):
        scores.channel_scores()


# -- used by name from a config -------------------------------------------------------------------


@pytest.fixture
def installed_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process-wide registry with every installed plugin loaded; rebuilt from the real env after."""
    monkeypatch.delenv(LOAD_PLUGINS_ENV, raising=False)
    registry = default_registry(refresh=True)
    if "variance" not in registry.names("select_probe"):
        pytest.fail(f"{DIST} is not installed: pip install -e plugins/{DIST}")
    yield
    monkeypatch.undo()
    default_registry(refresh=True)


def test_run_config_naming_the_plugin_strategies_validates(installed_registry: None) -> None:
    cfg = load_config(
        {
            "methods": [
                {
                    "preset": "pp",
                    "strategies": {"select_probe": {"name": "variance"}, "score_channels": "ppsp-l1"},
                }
            ]
        }
    )
    strategies = cfg.methods[0].strategies
    assert strategies.select_probe.name == "variance"
    assert strategies.score_channels.name == "ppsp-l1"
    built = default_registry().build_method(cfg.methods[0])
    assert isinstance(built["select_probe"], VarianceProbe)
    assert (built["select_probe"].params.seq_ratio, built["select_probe"].params.batch_ratio) == (0.5, 0.05)
    assert isinstance(built["score_channels"], PPspL1Score)
    assert default_registry().get("select_probe", "variance").source == DIST


def test_run_config_with_a_bad_variance_param_names_the_field(installed_registry: None) -> None:
    bad = {"select_probe": {"name": "variance", "params": {"sink_threshold": 3}}}
    with pytest.raises(ConfigError, match=r"methods\[0\]\.strategies\.select_probe\.params.*sink_threshold"):
        load_config({"methods": [{"preset": "pp", "strategies": bad}]})
