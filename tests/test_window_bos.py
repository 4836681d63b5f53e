"""data.window_bos: every evaluation and calibration window starts with BOS (Gemma-style models)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ppframework.api import calibration_batches, calibration_description, load_config
from ppframework.data import DataError, start_with_bos
from ppframework.runner import eval_batches, window_bos_phrase
from ppframework.testing.tiny import tiny_model, tiny_tokenizer


def test_start_with_bos_keeps_the_shape_and_shifts_by_one():
    windows = torch.arange(12).reshape(3, 4)
    out = start_with_bos(windows, SimpleNamespace(bos_token_id=99))
    assert out.tolist() == [[99, 0, 1, 2], [99, 4, 5, 6], [99, 8, 9, 10]]
    with pytest.raises(DataError, match="data.window_bos: the tokenizer has no BOS token"):
        start_with_bos(windows, SimpleNamespace(bos_token_id=None))


def test_evaluation_and_calibration_windows_start_with_bos(tiny_text_file):
    tokenizer = tiny_tokenizer()
    if tokenizer.bos_token_id is None:
        pytest.skip("the tiny tokenizer has no BOS token")
    base = {
        "data": {"name": str(tiny_text_file), "seq_len": 16, "batch_size": 2, "max_batches": 2},
        "calibration": {"dataset": str(tiny_text_file), "n_samples": 4, "batch_size": 2},
    }
    plain = load_config(base)
    with_bos = load_config({**base, "data": {**base["data"], "window_bos": True}})
    for batch in eval_batches(with_bos, tokenizer):
        assert (batch[:, 0] == tokenizer.bos_token_id).all() and batch.shape[1] == 16
    assert all((b[:, 0] == tokenizer.bos_token_id).all() for b in calibration_batches(with_bos, tokenizer))
    # the text tokens are those of the plain windows, shifted right by one
    first_plain, first_bos = eval_batches(plain, tokenizer)[0], eval_batches(with_bos, tokenizer)[0]
    assert torch.equal(first_bos[:, 1:], first_plain[:, :-1])
    # a different calibration: a different cache key; the plain key is unchanged by the option's existence
    model = tiny_model("llama")
    assert calibration_description(model, tokenizer, with_bos) != calibration_description(
        model, tokenizer, plain
    )
    assert "window_bos" not in calibration_description(model, tokenizer, plain)
    assert "BOS" in window_bos_phrase(with_bos.model_dump()["data"])
