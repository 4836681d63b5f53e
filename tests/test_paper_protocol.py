"""The paper's protocol as an option: an untracked warm-up (history unchanged), then every batch scored."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ppframework.adapters import get_adapter
from ppframework.api import load_config
from ppframework.calibration import calibrate
from ppframework.config import MethodConfig
from ppframework.errors import ConfigError
from ppframework.metrics.perplexity import evaluate_perplexity
from ppframework.pipeline import Pipeline
from ppframework.testing.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _pp(model, calibration_batches) -> Pipeline:
    method = MethodConfig.model_validate({"preset": "pp", "pruning": {"ratio": 0.4, "skip_layers": []}})
    history = calibrate(model, get_adapter(model), calibration_batches, progress=False)
    return Pipeline(model, method, history=history)


def _snapshot(pipe: Pipeline) -> dict:
    return {key: block.sq_mean.clone() for key, block in pipe.history.blocks.items()}


def _batches(n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 200, (4, 16), generator=gen) for _ in range(n)]


def test_untracked_forward_leaves_the_history_unchanged():
    model = tiny_model("llama")
    pipe = _pp(model, _batches(2, 0))
    before = _snapshot(pipe)
    batch = _batches(1, 1)[0]
    with pipe, torch.no_grad():
        with pipe.untracked():
            model(input_ids=batch, use_cache=False)
        for key, value in before.items():
            assert torch.equal(pipe.history.get(*key).sq_mean, value), key
        assert pipe.realised_ratio() > 0  # it still pruned
        model(input_ids=batch, use_cache=False)  # outside: the EMA runs again
    assert any(not torch.equal(pipe.history.get(*key).sq_mean, v) for key, v in before.items())


def test_untracked_policy_scores_every_batch_after_a_warmup_that_leaves_no_trace():
    model = tiny_model("llama")
    calibration, batches = _batches(2, 0), _batches(3, 2)
    paper = _pp(model, calibration)
    with paper:
        result = evaluate_perplexity(
            model,
            batches,
            warmup_batches=1,
            progress=False,
            warmup_policy="untracked",
            untracked=paper.untracked,
        )
    assert result.scored_batches == 3 and len(result.batch_seconds) == 3
    # by hand: the warm-up changed nothing, so scoring every batch from the calibrated history is the same
    by_hand = _pp(model, calibration)
    with by_hand:
        expected = evaluate_perplexity(model, batches, warmup_batches=0, progress=False)
    assert result.perplexity == pytest.approx(expected.perplexity, rel=1e-6)
    # the default policy differs: its warm-up updates the history and is not scored
    default = _pp(model, calibration)
    with default:
        skipped = evaluate_perplexity(model, batches, warmup_batches=1, progress=False)
    assert skipped.scored_batches == 2


def test_untracked_policy_allows_warmup_not_below_max_batches():
    base = {"data": {"max_batches": 1, "warmup_batches": 1}}
    with pytest.raises(ConfigError, match="data.warmup_batches"):
        load_config(base)
    cfg = load_config({"data": {"max_batches": 1, "warmup_batches": 1, "warmup_policy": "untracked"}})
    assert cfg.data.warmup_policy == "untracked"
    with pytest.raises(ConfigError, match="warmup_policy"):
        load_config({"data": {"warmup_policy": "scored"}})


def test_paper_protocol_config():
    cfg = load_config(ROOT / "configs" / "paper-protocol.yaml")
    assert cfg.data.warmup_policy == "untracked"
    assert (cfg.data.seq_len, cfg.data.batch_size, cfg.data.max_batches) == (1024, 20, None)
    assert cfg.calibration.n_samples == 2000
    assert {m.pruning.round_to for m in cfg.methods} == {64}


def test_ppf_run_with_the_untracked_policy(tmp_path, tiny_model_dir, tiny_text_file, monkeypatch):
    from ppframework.runner import format_table, run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(
        {
            "model": {"name": str(tiny_model_dir("llama")), "device": "cpu"},
            "data": {
                "name": str(tiny_text_file),
                "seq_len": 32,
                "batch_size": 4,
                "max_batches": 3,
                "warmup_policy": "untracked",
            },
            "calibration": {
                "dataset": str(tiny_text_file),
                "n_samples": 8,
                "batch_size": 4,
                "cache_dir": str(tmp_path / "cache"),
            },
            "methods": [{"preset": "pp", "pruning": {"ratio": 0.4, "skip_layers": [0]}}],
            "progress": False,
        }
    )
    report = run(cfg)
    assert report.settings["resolved"]["scored_batches"] == 3
    assert "1 untracked warm-up batch(es)" in format_table(report)
    assert 0 < report.rows[1].realised_ratio < 1
