"""A probe sized by a FLOPs budget (``select_probe: {name: residual, params: {flops_share: ...}}``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ppframework.api import load_config
from ppframework.config import MethodConfig
from ppframework.errors import ConfigError
from ppframework.metrics.flops import attention_flops, mlp_flops, probe_flops
from ppframework.pipeline import Pipeline
from ppframework.runner import pipeline_flops
from ppframework.strategies.probe import (
    ProbeParams,
    ResidualProbe,
    budget_probe_sizes,
    select_residual_probe,
)
from ppframework.testing import check_strategy, make_context
from ppframework.testing.tiny import tiny_model
from ppframework.types import BlockGeometry, BlockKind

ATT, MLP = BlockKind.ATTENTION, BlockKind.MLP


def test_budget_sizes_by_hand():
    geo = BlockGeometry(MLP, units=10, unit_width=1)
    # B 4, T 10, D 2, gated MLP: dense 3 * 2*4*10*2*10 = 4800; a probe costs 2 * 2*r*t*2*10 = 80 r t
    assert mlp_flops(4, 10, 2, 10, 3) == 4800 and probe_flops(MLP, 1, 6, 2, channels=10) == 480
    assert budget_probe_sizes(MLP, geo, 4, 10, 2, 0.1) == (1, 6)  # 480: one row, 6 tokens
    assert budget_probe_sizes(MLP, geo, 4, 10, 2, 0.2) == (1, 10)  # 960: a whole row (800), not two
    assert budget_probe_sizes(MLP, geo, 4, 10, 2, 0.5) == (3, 10)  # 2400: three whole rows
    assert budget_probe_sizes(MLP, geo, 4, 10, 2, 0.99) == (4, 10)
    assert budget_probe_sizes(MLP, geo, 4, 10, 2, 0.001) == (1, 2)  # never below 1 x 2
    assert budget_probe_sizes(MLP, geo, 4, 10, 2, 0.05, scale=2.0) == (1, 6)  # a share of the decoder
    assert budget_probe_sizes(MLP, geo, 4, 10, 2, 0.075, mlp_matrices=2) == (
        1,
        6,
    )  # OPT: 40 r t <= 240 of 3200


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from((ATT, MLP)),
    heads=st.sampled_from((1, 2, 4, 8)),
    group=st.sampled_from((1, 2, 4)),
    width=st.integers(1, 16),
    units=st.integers(1, 64),
    batch=st.integers(1, 12),
    seq=st.integers(1, 300),
    hidden=st.integers(1, 64),
    share=st.floats(1e-4, 0.9),
)
def test_budget_sizes_are_the_largest_within_the_budget(
    kind, heads, group, width, units, batch, seq, hidden, share
):
    kv = max(heads // group, 1)
    if kind is ATT:
        geo = BlockGeometry(ATT, heads, width, kv)
        dense = attention_flops(batch, seq, hidden, heads, kv, width)

        def cost(r: int, t: int) -> int:
            return probe_flops(ATT, r, t, hidden, q_heads=heads, kv_heads=kv, head_dim=width)
    else:
        geo = BlockGeometry(MLP, units, 1)
        dense = mlp_flops(batch, seq, hidden, units, 3)

        def cost(r: int, t: int) -> int:
            return probe_flops(MLP, r, t, hidden, channels=units)

    rows, tokens = budget_probe_sizes(kind, geo, batch, seq, hidden, share)
    budget = share * dense
    assert 1 <= rows <= batch and min(2, seq) <= tokens <= seq
    assert rows == 1 or tokens == seq  # rows grow only once one row holds every position
    if (rows, tokens) != (1, min(2, seq)):
        assert cost(rows, tokens) <= budget
    if tokens < seq:
        assert cost(1, tokens + 1) > budget
    elif rows < batch:
        assert cost(rows + 1, seq) > budget
    # a larger budget never gives a smaller probe
    bigger = budget_probe_sizes(kind, geo, batch, seq, hidden, min(share * 2, 0.99))
    assert bigger[0] * bigger[1] >= rows * tokens


def test_budget_probe_selects_like_the_ratio_probe_at_its_sizes():
    gen = torch.Generator().manual_seed(0)
    residual = torch.randn(6, 40, 8, generator=gen)
    mask = torch.ones(6, 40, dtype=torch.long)
    mask[2, :7] = 0
    ctx = make_context(MLP, BlockGeometry(MLP, 16, 1), seq_len=40)
    probe = ResidualProbe(ProbeParams(flops_share=0.01))
    sizes = probe.sizes(ctx, 6, 40, 8)
    assert sizes == budget_probe_sizes(MLP, ctx.geometry, 6, 40, 8, 0.01)
    chosen = probe.select_probe(ctx=ctx, residual=residual, normed=residual, attention_mask=mask)
    expected = select_residual_probe(residual, mask, 0.5, 0.05, sizes=sizes)
    assert torch.equal(chosen.batch_index, expected.batch_index)
    assert torch.equal(chosen.token_index, expected.token_index)
    assert (chosen.batch_index.numel(), chosen.token_index.numel()) == sizes


def test_budget_probe_conforms():
    check_strategy(ResidualProbe(ProbeParams(flops_share=0.02)), max_examples=15)


def test_flops_share_excludes_the_ratios():
    assert ProbeParams().seq_ratio == 0.5 and ProbeParams().batch_ratio == 0.05  # unchanged defaults
    assert ProbeParams(seq_ratio=None).seq_ratio == 0.5  # null falls back to the default
    assert ProbeParams(flops_share=0.01, seq_ratio=None, batch_ratio=None).flops_share == 0.01
    with pytest.raises(ValueError, match="cannot be combined with seq_ratio"):
        ProbeParams(flops_share=0.01, seq_ratio=0.5)


def test_config_error_names_the_field():
    with pytest.raises(ConfigError) as info:
        load_config(
            {"methods": [{"preset": "pp", "strategies": {"select_probe": {"params": {"flops_share": 0.01}}}}]}
        )
    message = str(info.value)
    assert message.startswith("methods[0].strategies.select_probe.params: flops_share sizes the probe")
    assert "batch_ratio and seq_ratio" in message and "null" in message
    with pytest.raises(ConfigError, match=r"select_probe\.params\.flops_share"):
        load_config(
            {"methods": [{"preset": "pp", "strategies": {"select_probe": {"params": {"flops_share": 2}}}}]}
        )
    cfg = load_config(
        {
            "methods": [
                {
                    "preset": "pp",
                    "strategies": {
                        "select_probe": {
                            "params": {"seq_ratio": None, "batch_ratio": None, "flops_share": 0.01}
                        }
                    },
                }
            ]
        }
    )
    assert cfg.methods[0].strategies.select_probe.params["flops_share"] == 0.01


@pytest.mark.parametrize("share", [0.02, 0.05])
def test_pipeline_probes_cost_about_the_share_of_the_decoder(share):
    model = tiny_model("llama")
    ids = torch.randint(0, 200, (4, 96), generator=torch.Generator().manual_seed(1))
    method = MethodConfig.model_validate(
        {
            "preset": "no-history",
            "pruning": {"ratio": 0.3, "skip_layers": [0]},
            "strategies": {
                "select_probe": {"params": {"seq_ratio": None, "batch_ratio": None, "flops_share": share}}
            },
        }
    )
    pipe = Pipeline(model, method)
    with pipe, torch.no_grad():
        model(input_ids=ids, use_cache=False)
    report = pipeline_flops(pipe)
    assert report.probe_share <= share  # the probes of the 3 pruned layers, over all 4 layers' dense FLOPs
    assert report.probe_share > share * 0.75  # ... and close to it (one token is a small step here)
    assert {(e.probe_rows) for e in pipe.record.events} == {1}
