"""``pp-prompt-batch``: ``pp-prompt`` deciding once per batch from the batch's dense prompts.

It is ``pp-prompt`` with ``decision: batch`` and nothing else; at batch 1 it is ``pp-prompt`` bit for bit;
at batch B every row decodes on one set of masks, decided from the pooled evidence of every real prompt
token, so the decision does not depend on the order of the rows or on how often each prompt appears.
"""

from __future__ import annotations

import copy

import pytest
import torch
from prompt_helpers import calibrated_history, encode_left, greedy_generate, method_at

from ppframework.config import MethodConfig
from ppframework.pipeline import Pipeline
from ppframework.testing.tiny import tiny_model

PROMPTS = ["Hello there, how are", "A much longer prompt, to test left padding here", "Short one"]
FIELDS_COMPARED = {"name", "description", "preset"}
NEW = 6


@pytest.fixture(scope="module", params=["llama-gqa", "gemma3"])
def model_and_history(request):
    model = tiny_model(request.param).eval()
    return model, calibrated_history(model)


def _run(model, method: MethodConfig, history, prompts: list[str]):
    pipe = Pipeline(model, method, history=copy.deepcopy(history))
    with pipe:
        out = greedy_generate(model, encode_left(prompts), NEW)
    return out, pipe


def test_preset_is_pp_prompt_deciding_per_batch() -> None:
    ours = MethodConfig.model_validate({"preset": "pp-prompt-batch"})
    theirs = MethodConfig.model_validate({"preset": "pp-prompt", "decision": "batch"})
    assert ours.model_dump(exclude=FIELDS_COMPARED) == theirs.model_dump(exclude=FIELDS_COMPARED)
    assert (ours.decision, ours.prefill, ours.strategies.select_probe.name) == ("batch", "dense", "full")


def test_at_batch_one_it_is_pp_prompt(model_and_history) -> None:
    model, history = model_and_history
    batch_out, batch_pipe = _run(model, method_at("pp-prompt-batch"), history, PROMPTS[1:2])
    seq_out, seq_pipe = _run(model, method_at("pp-prompt"), history, PROMPTS[1:2])
    assert torch.equal(batch_out.sequences, seq_out.sequences)
    assert all(torch.equal(a, b) for a, b in zip(batch_out.logits, seq_out.logits, strict=True))
    for key, mask in seq_pipe.last_masks.items():
        assert torch.equal(batch_pipe.last_masks[key].kept_units, mask.kept_units), key


def test_one_decision_for_the_batch_pooled_over_its_prompts(model_and_history) -> None:
    """Every row decodes on one set of masks; permuting the rows or repeating every prompt leaves that
    decision unchanged (the evidence is pooled over real tokens; padding never counts), and it is not
    every row's own decision (so the test tells ``batch`` from ``sequence``)."""
    model, history = model_and_history
    method = method_at("pp-prompt-batch")
    out, pipe = _run(model, method, history, PROMPTS)
    masks = pipe.last_masks
    assert masks and any(m.n_kept < m.total_units for m in masks.values())
    for prompts in (PROMPTS[::-1], PROMPTS + PROMPTS):
        _, other = _run(model, method, history, prompts)
        for key, mask in masks.items():
            assert torch.equal(other.last_masks[key].kept_units, mask.kept_units), (prompts, key)
    _, per_row = _run(model, method_at("pp-prompt"), history, PROMPTS)
    assert any(
        not torch.equal(row[key].kept_units, masks[key].kept_units)
        for row in per_row.last_row_masks
        for key in masks
    )
    dense = greedy_generate(model, encode_left(PROMPTS), NEW)
    torch.testing.assert_close(out.logits[0], dense.logits[0], atol=0, rtol=0)  # the prompts ran dense


@pytest.mark.parametrize("ratio", [0.0, 0.01])
def test_nothing_pruned_gives_the_unmodified_models_tokens(model_and_history, ratio: float) -> None:
    model, history = model_and_history
    out, _ = _run(
        model, method_at("pp-prompt-batch", pruning={"ratio": ratio, "skip_layers": []}), history, PROMPTS
    )
    reference = greedy_generate(model, encode_left(PROMPTS), NEW)
    assert torch.equal(out.sequences, reference.sequences)
