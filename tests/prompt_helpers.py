"""Helpers shared by the prompt-conditioned generation tests (tiny models, left-padded prompts)."""

from __future__ import annotations

from typing import Any

import torch

from ppframework.adapters import get_adapter
from ppframework.calibration import calibrate
from ppframework.config import MethodConfig
from ppframework.history import HistoryStore
from ppframework.testing.tiny import tiny_tokenizer


def encode_left(prompts: list[str]) -> dict[str, torch.Tensor]:
    """``prompts`` tokenised by the tiny tokenizer, left-padded into one batch."""
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    return dict(tok(prompts, return_tensors="pt", padding=True))


def calibrated_history(model: torch.nn.Module, seq: int = 128) -> HistoryStore:
    """A calibration history of ``model`` from four seeded random windows of ``seq`` tokens."""
    ids = torch.randint(4, 90, (4, seq), generator=torch.Generator().manual_seed(1))
    return calibrate(model, get_adapter(model), [ids], progress=False)


def method_at(preset: str = "pp", **fields) -> MethodConfig:
    """``preset`` at 40% with layer 0 skipped, ``fields`` (``pruning`` merged) on top."""
    pruning = {"skip_layers": [0], "ratio": 0.4, **fields.pop("pruning", {})}
    return MethodConfig.model_validate({"preset": preset, "pruning": pruning, **fields})


def greedy_generate(model: torch.nn.Module, enc: dict[str, torch.Tensor], new: int, **kwargs: Any) -> Any:
    """Exactly ``new`` greedy tokens for the batch ``enc`` (pad id 3), with the per-step logits."""
    with torch.inference_mode():
        return model.generate(
            **enc,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=3,
            return_dict_in_generate=True,
            output_logits=True,
            **kwargs,
        )
