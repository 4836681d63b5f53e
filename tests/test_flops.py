"""Analytic FLOPs against hand counts, and against torch's FlopCounterMode on tiny models."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ppframework.adapters import get_adapter
from ppframework.config import MethodConfig
from ppframework.metrics.flops import (
    BlockShape,
    FlopsCounter,
    FlopsReport,
    attention_flops,
    dense_forward_flops,
    lm_head_flops,
    mlp_flops,
    probe_flops,
)
from ppframework.pipeline import Pipeline
from ppframework.runner import pipeline_flops
from ppframework.testing.tiny import tiny_model
from ppframework.types import BlockGeometry, BlockKind

ATT, MLP = BlockKind.ATTENTION, BlockKind.MLP

# Hand-count configuration: D=8, 2 query heads of width 4, 1 key/value head, MLP 16 (gated: 3
# matrices), vocabulary 10, 2 layers; batch B=2, T=3.
D, H, KV, HD, FF, VOCAB, LAYERS, B, T = 8, 2, 1, 4, 16, 10, 2, 2, 3

# Dense attention, per layer:
#   q: 2*B*T*D*(H*HD)  = 2*2*3*8*8 = 768
#   k: 2*B*T*D*(KV*HD) = 2*2*3*8*4 = 384, v: 384
#   o: 2*B*T*(H*HD)*D  = 768
#   scores + values: 2 * 2*B*H*T*T*HD = 2 * 2*2*2*3*3*4 = 576
DENSE_ATT = 768 + 384 + 384 + 768 + 576  # 2880
# Dense MLP: 3 * 2*B*T*D*FF = 3 * 2*2*3*8*16 = 3 * 1536
DENSE_MLP = 4608
# Pruned attention, 1 query head kept, the key/value head dense (query-only GQA policy):
#   q 2*2*3*8*4 = 384, k 384, v 384, o 384, scores + values 2 * 2*2*1*3*3*4 = 288
PRUNED_ATT = 384 + 384 + 384 + 384 + 288  # 1824
# Pruned MLP, 8 channels: 3 * 2*2*3*8*8
PRUNED_MLP = 2304
# Probe of 1 row x 2 tokens, full weights:
#   attention: q 2*1*2*8*8 = 256, k 2*1*2*8*4 = 128, v 128, scores + values 2 * 2*1*2*2*2*4 = 128, no o
PROBE_ATT = 256 + 128 + 128 + 128  # 640
#   MLP: gate + up only: 2 * (2*1*2*8*16) = 2 * 512
PROBE_MLP = 1024
# LM head: 2*B*T*D*VOCAB = 2*2*3*8*10
LM_HEAD = 960


def hand_counter() -> FlopsCounter:
    return FlopsCounter(
        num_layers=LAYERS,
        hidden=D,
        attention=BlockGeometry(ATT, units=H, unit_width=HD, num_kv_heads=KV),
        mlp=BlockGeometry(MLP, units=FF, unit_width=1),
        mlp_matrices=3,
        vocab=VOCAB,
    )


def test_block_formulas_match_hand_count() -> None:
    assert attention_flops(B, T, D, H, KV, HD) == 2880 == DENSE_ATT
    assert mlp_flops(B, T, D, FF, 3) == 4608 == DENSE_MLP
    assert attention_flops(B, T, D, 1, KV, HD) == 1824 == PRUNED_ATT
    assert mlp_flops(B, T, D, 8, 3) == 2304 == PRUNED_MLP
    assert probe_flops(ATT, 1, 2, D, q_heads=H, kv_heads=KV, head_dim=HD) == 640 == PROBE_ATT
    assert probe_flops(MLP, 1, 2, D, channels=FF, mlp_matrices=3) == 1024 == PROBE_MLP
    assert probe_flops(MLP, 0, 2, D, channels=FF, mlp_matrices=3) == 0
    assert lm_head_flops(B, T, D, VOCAB) == 960 == LM_HEAD
    # OPT-style MLP (fc1, fc2): 2 * 2*2*3*8*16 = 3072; its probe is fc1 only: 2*1*2*8*16 = 512.
    assert mlp_flops(B, T, D, FF, 2) == 3072
    assert probe_flops(MLP, 1, 2, D, channels=FF, mlp_matrices=2) == 512


def test_block_shape() -> None:
    att = BlockShape(ATT, B, T, D, q_heads=1, kv_heads=1, head_dim=HD)
    assert att.flops() == 1824
    mlp = BlockShape(MLP, 1, 2, D, channels=FF, mlp_matrices=3)
    assert mlp.probe_flops() == 1024


def test_counter_dense_batch() -> None:
    counter = hand_counter()
    assert counter.dense_decoder_flops(B, T) == 2 * (2880 + 4608) == 14976
    counter.add_dense_batch(B, T)
    report = counter.report()
    assert (report.dense, report.pruned, report.probe, report.lm_head) == (14976, 14976, 0, 960)
    assert report.ideal_ratio == 1.0
    assert report.ideal_ratio_whole == 1.0
    assert report.probe_share == 0.0
    assert (report.batches, report.tokens) == (1, 6)


def test_counter_skipped_layer_counts_dense_and_probe() -> None:
    counter = hand_counter()
    counter.begin_batch(B, T)
    # Layer 0 skipped (not reported); layer 1 pruned with a 1 x 2 probe.
    counter.add_block(ATT, B, T, kept_units=torch.tensor([1]), probe_rows=1, probe_tokens=2)
    counter.add_block(MLP, B, T, kept_units=8, probe_rows=1, probe_tokens=2)
    counter.end_batch()
    report = counter.report()
    assert report.dense == 14976
    assert report.pruned == (2880 + 4608) + (1824 + 2304) == 11616
    assert report.probe == 640 + 1024 == 1664
    assert report.lm_head == 960
    assert report.probe_share == pytest.approx(1664 / 14976)
    assert report.ideal_ratio == pytest.approx((11616 + 1664) / 14976)
    assert report.ideal_ratio_whole == pytest.approx((11616 + 1664 + 960) / (14976 + 960))
    assert report.to_dict()["ideal_ratio"] == pytest.approx(13280 / 14976)


def test_counter_auto_batches_by_layer_and_group_kv() -> None:
    counter = hand_counter()
    for _ in range(2):  # two batches, only layer 1 reported; the repeated layer opens batch 2
        counter.add_block(ATT, B, T, kept_units=1, layer=1)
        counter.add_block(MLP, B, T, kept_units=8, layer=1)
    report = counter.report()
    assert report.batches == 2
    assert report.pruned == 2 * 11616
    # Group-aware GQA: kept key/value heads given explicitly (0 kv heads is not realistic; 1 of 1 is).
    shape = counter.block_shape(ATT, B, T, kept_units=1, kept_kv_heads_count=1)
    assert shape.flops() == 1824
    with pytest.raises(ValueError, match="more than 2"):
        counter.begin_batch(B, T)
        for _ in range(3):
            counter.add_block(MLP, B, T)


def test_report_empty_is_nan() -> None:
    report = FlopsReport(0, 0, 0, 0)
    assert math.isnan(report.ideal_ratio) and math.isnan(report.probe_share)


def test_from_fake_adapter_and_kv_follow_query() -> None:
    geos = {
        ATT: BlockGeometry(ATT, units=H, unit_width=HD, num_kv_heads=H),
        MLP: BlockGeometry(MLP, units=FF, unit_width=1),
    }
    adapter = SimpleNamespace(
        config=SimpleNamespace(hidden_size=D, vocab_size=VOCAB),
        num_layers=LAYERS,
        mlp_matrices=2,
        family="opt",
        geometry=lambda kind: geos[kind],
    )
    counter = FlopsCounter.from_adapter(adapter)
    assert counter.kv_follow_query
    # OPT prunes k/v with q: 1 head kept -> kv 1 (the hand-counted 1824).
    assert counter.block_shape(ATT, B, T, kept_units=1).flops() == 1824
    # Dense: attention with 2 kv heads: 768*4 + 576 = 3648; MLP 2 * 1536 = 3072; 2 layers + LM head.
    assert dense_forward_flops(adapter, B, T) == 2 * (3648 + 3072) + 960


def _sdpa_core(batch: int, heads: int, seq: int, head_dim: int) -> int:
    """Scores + values: FlopCounterMode does not count CPU SDPA, so it is added analytically."""
    return 2 * (2 * batch * heads * seq * seq * head_dim)


@pytest.mark.parametrize("family", ["llama-gqa", "opt"])
def test_matches_torch_flop_counter(family: str) -> None:
    model = tiny_model(family, num_hidden_layers=2)
    adapter = get_adapter(model)
    batch, seq = 2, 12
    ids = torch.randint(4, 100, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as mode:
        model(input_ids=ids, use_cache=False)
    att = adapter.geometry(ATT)
    core = adapter.num_layers * _sdpa_core(batch, att.units, seq, att.unit_width)
    assert dense_forward_flops(adapter, batch, seq) == mode.get_total_flops() + core

    # Pruned attention block (2 of 4 heads) and MLP block (40 channels) through the adapter's runners.
    counter = FlopsCounter.from_adapter(adapter)
    x = torch.randn(batch, seq, model.config.hidden_size)
    mask = torch.ones(batch, seq, dtype=torch.long)
    rotary = None
    if family != "opt":
        positions = torch.arange(seq)[None]
        rotary = model.model.rotary_emb(x, positions)
    heads = torch.tensor([0, 2])
    channels = torch.arange(40)
    for kind, kept in ((ATT, heads), (MLP, channels)):
        runner = adapter.runner(0, kind)
        with torch.no_grad(), FlopCounterMode(display=False) as mode:
            z = runner.pre_output(x, attention_mask=mask, rotary=rotary, kept_units=kept)
            runner.output(z, runner.channels_of(kept))
        expected = counter.block_shape(kind, batch, seq, kept_units=kept).flops()
        extra = _sdpa_core(batch, 2, seq, att.unit_width) if kind is ATT else 0
        assert expected == mode.get_total_flops() + extra, kind


@pytest.mark.parametrize("preset", ["no-history", "full-batch"])
def test_pipeline_flops_of_a_per_sequence_batch_are_its_rows_run_alone(preset: str) -> None:
    """Under ``decision: sequence`` every row runs its pruned layers alone, so the batch's FLOPs are
    those of its rows decided one at a time (before the events carried their row, each row's blocks
    opened a new counted batch whose unreported layers counted dense: 2.3x the dense FLOPs here)."""
    model = tiny_model("llama")
    ids = torch.randint(0, 200, (3, 40), generator=torch.Generator().manual_seed(1))

    def report(decision: str, x: torch.Tensor) -> FlopsReport:
        method = MethodConfig.model_validate(
            {"preset": preset, "pruning": {"ratio": 0.3, "skip_layers": [0]}, "decision": decision}
        )
        pipe = Pipeline(model, method)
        with pipe, torch.no_grad():
            model(input_ids=x, use_cache=False)
        return pipeline_flops(pipe)

    together = report("sequence", ids)
    alone = [report("batch", ids[b : b + 1]) for b in range(ids.shape[0])]
    dense = FlopsCounter.from_adapter(get_adapter(model)).dense_decoder_flops(3, 40)
    assert together.dense == sum(r.dense for r in alone) == dense
    assert together.pruned == sum(r.pruned for r in alone)
    assert together.probe == sum(r.probe for r in alone) > 0
    assert together.lm_head == sum(r.lm_head for r in alone)
