"""Recycled decode pins: a dynamic method's sliced weights for one ``generate`` call are gathered into
storage its runners keep, so the next call overwrites memory already mapped instead of page-faulting
fresh megabytes (``BlockRunner.pin_weights(recycle=True)``)."""

from __future__ import annotations

import copy

import pytest
import torch
from prompt_helpers import calibrated_history, encode_left, greedy_generate, method_at

from ppframework.adapters.base import BlockRunner
from ppframework.pipeline import Pipeline
from ppframework.testing.tiny import tiny_model

PROMPTS = [["Hello there, how are"], ["A much longer prompt, to test another decision here"], ["Short"]]
NEW = 6


def _pointers(runners: list[BlockRunner]) -> dict[int, dict[str, int]]:
    """Where each runner's pinned weights live, by role."""
    return {id(r): {role: pin[2].data_ptr() for role, pin in r.pinned.items()} for r in runners if r.pinned}


def _run_all(pipe: Pipeline, model) -> list:
    outs = []
    with pipe:
        for prompt in PROMPTS:
            outs.append(greedy_generate(model, encode_left(prompt), NEW))
    return outs


@pytest.fixture(scope="module")
def model_and_history():
    model = tiny_model("llama-gqa").eval()
    return model, calibrated_history(model)


@pytest.mark.parametrize("preset", ["pp", "pp-prompt"])
def test_recycled_pins_give_every_call_what_fresh_pins_give(model_and_history, preset):
    """Calls in a row on recycled storage give the tokens and logits of calls on fresh tensors
    (a stale or shared pin would show up as other tokens: the decisions differ from call to call)."""
    model, history = model_and_history
    method = method_at(preset)
    recycled = _run_all(Pipeline(model, method, history=copy.deepcopy(history)), model)
    fresh_pipe = Pipeline(model, method, history=copy.deepcopy(history))
    fresh_pipe.recycle_pins = False
    fresh = _run_all(fresh_pipe, model)
    assert all(r.pin_storage_bytes == 0 for r in fresh_pipe._runners.values())
    for a, b in zip(recycled, fresh, strict=True):
        assert torch.equal(a.sequences, b.sequences)
        for x, y in zip(a.logits, b.logits, strict=True):
            assert torch.equal(x, y)


def test_the_next_call_overwrites_the_last_calls_storage_and_release_frees_it(model_and_history):
    model, history = model_and_history
    pipe = Pipeline(model, method_at("pp-prompt"), history=copy.deepcopy(history))
    runners = list(pipe._runners.values())
    with pipe:
        greedy_generate(model, encode_left(PROMPTS[0]), NEW)
        first = _pointers(runners)
        greedy_generate(model, encode_left(PROMPTS[0]), NEW)  # the same prompt: the same kept shapes
        second = _pointers(runners)
    assert first and first == second
    assert all(r.pin_storage_bytes > 0 for r in runners if id(r) in first)
    pipe.release()
    assert all(r.pin_storage_bytes == 0 for r in runners)


@pytest.mark.parametrize("prefill", ["pruned", "dense"])
def test_rows_of_a_sequence_batch_keep_their_own_pins(model_and_history, prefill):
    """Under ``decision: sequence`` every row pins its own weights (at its pruned prefill, or at the
    first decode step after a dense one): none of them is recycled storage, and no two rows share
    memory."""
    model, history = model_and_history
    pipe = Pipeline(model, method_at("pp-prompt", prefill=prefill), history=copy.deepcopy(history))
    with pipe:
        greedy_generate(model, encode_left([p[0] for p in PROMPTS]), NEW)
        rows = pipe._decode.rows
        pointers = [
            w.data_ptr() for row in rows for pins in row.pins.values() for (_, _, w, _) in pins.values()
        ]
    assert len(rows) == len(PROMPTS) and pointers
    assert len(set(pointers)) == len(pointers)
    assert all(r.pin_storage_bytes == 0 for r in pipe._runners.values())
