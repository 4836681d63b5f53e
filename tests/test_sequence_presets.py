"""The per-sequence presets of issue 29, ``pp-seq``, ``pp-wanda-heads-seq`` and ``pp-comp-heads-seq``: each
is its batch preset with ``decision: sequence`` and nothing else, so on a batch of windows (the perplexity
protocol) every window gets what it would get scored alone, and at batch 1 it is its batch preset bit for
bit."""

from __future__ import annotations

import copy

import pytest
import torch
from prompt_helpers import calibrated_history

from ppframework.config import MethodConfig
from ppframework.pipeline import Pipeline
from ppframework.testing.tiny import tiny_model

SEQUENCE_PRESETS = {
    "pp-seq": "pp",
    "pp-wanda-heads-seq": "pp-wanda-heads",
    "pp-comp-heads-seq": "pp-comp-heads",
}
FIELDS_COMPARED = {"name", "description", "preset"}


@pytest.mark.parametrize(("preset", "base"), SEQUENCE_PRESETS.items())
def test_preset_is_its_batch_preset_deciding_per_sequence(preset: str, base: str) -> None:
    ours = MethodConfig.model_validate({"preset": preset}).model_dump(exclude=FIELDS_COMPARED)
    theirs = MethodConfig.model_validate({"preset": base, "decision": "sequence"})
    assert ours == theirs.model_dump(exclude=FIELDS_COMPARED)
    assert ours["decision"] == "sequence"


@pytest.fixture(scope="module")
def gemma():
    """A tiny Gemma 3 (post-norm gains, so pp-wanda-heads' gain and compensation are not identities)."""
    model = tiny_model("gemma3").eval()
    return model, calibrated_history(model, seq=32)


def _windows(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 200, (rows, 32), generator=torch.Generator().manual_seed(seed))


def _logits(model, method: MethodConfig, history, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    with Pipeline(model, method, history=copy.deepcopy(history)), torch.no_grad():
        for batch in batches:
            out.append(model(input_ids=batch, use_cache=False).logits)
    return out


@pytest.mark.parametrize(("preset", "base"), SEQUENCE_PRESETS.items())
def test_a_batch_of_windows_gives_each_window_what_it_gets_alone(gemma, preset: str, base: str) -> None:
    """Two batches of 3 windows under the preset: every row's logits are those of its window run alone
    through the batch preset, the windows one at a time (the history carried from one to the next), and
    deciding for the batch together gives other logits (so the test can tell the two apart)."""
    model, history = gemma
    batches = [_windows(3, seed) for seed in (1, 2)]
    method = MethodConfig.model_validate({"preset": preset, "pruning": {"ratio": 0.5, "skip_layers": []}})
    together = _logits(model, method, history, batches)
    single = MethodConfig.model_validate({"preset": base, "pruning": {"ratio": 0.5, "skip_layers": []}})
    alone = _logits(model, single, history, [b[r : r + 1] for b in batches for r in range(3)])
    for i, logits in enumerate(together):
        for r in range(3):
            torch.testing.assert_close(logits[r : r + 1], alone[3 * i + r], atol=2e-5, rtol=1e-5)
    batch_wise = _logits(model, single, history, batches)
    assert not torch.allclose(batch_wise[1], together[1], atol=1e-3)


@pytest.mark.parametrize(("preset", "base"), SEQUENCE_PRESETS.items())
def test_at_batch_one_and_at_ratio_zero(gemma, preset: str, base: str) -> None:
    model, history = gemma
    batches = [_windows(1, seed) for seed in (3, 4)]
    pruning = {"ratio": 0.4, "skip_layers": [0]}
    ours = _logits(
        model, MethodConfig.model_validate({"preset": preset, "pruning": pruning}), history, batches
    )
    theirs = _logits(
        model, MethodConfig.model_validate({"preset": base, "pruning": pruning}), history, batches
    )
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    assert not torch.allclose(
        ours[1], _logits(model, MethodConfig.model_validate({"preset": "dense"}), history, batches)[1]
    )
    unpruned = _logits(model, MethodConfig.model_validate({"preset": "dense"}), history, [_windows(3, 5)])
    zero = MethodConfig.model_validate({"preset": preset, "pruning": {"ratio": 0.0}})
    assert torch.equal(_logits(model, zero, history, [_windows(3, 5)])[0], unpruned[0])
