"""ShortGPT's block influence (Men et al., 2024, arXiv 2403.03853) of every decoder layer.

``BI_i = 1 - E_t[cos(x_i[t], x_{i+1}[t])]``: one minus the mean, over every token of the calibration
windows, of the cosine similarity between layer ``i``'s input and output hidden states. A layer that
barely turns the residual stream has a low influence and is the first to be removed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ppframework.adapters import ModelAdapter
from ppframework.devices import input_device


def cosine_influence(inputs: torch.Tensor, outputs: torch.Tensor) -> tuple[float, int]:
    """(sum over tokens of ``1 - cos(input, output)``, tokens) for (..., D) hidden states (fp32)."""
    cos = torch.nn.functional.cosine_similarity(inputs.float(), outputs.float(), dim=-1)
    return float((1.0 - cos).sum()), int(cos.numel())


class _Influence:
    """Forward hook on one decoder layer: accumulates ``1 - cos`` over its tokens."""

    def __init__(self) -> None:
        self.total = 0.0
        self.tokens = 0

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        hidden_in = args[0] if args else kwargs["hidden_states"]
        hidden_out = output[0] if isinstance(output, tuple) else output
        total, tokens = cosine_influence(hidden_in.detach(), hidden_out.detach())
        self.total += total
        self.tokens += tokens


def block_influence(
    model: nn.Module, adapter: ModelAdapter, batches: list[torch.Tensor], progress: bool = True
) -> torch.Tensor:
    """(L,) block influence of every decoder layer over ``batches`` (dense forwards, fp32, CPU)."""
    if not batches:
        raise ValueError("block influence needs at least one calibration batch")
    hooks = [_Influence() for _ in range(adapter.num_layers)]
    handles = [
        layer.register_forward_hook(hook, with_kwargs=True)
        for layer, hook in zip(adapter.layers, hooks, strict=True)
    ]
    device = input_device(model)
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc="block influence", unit="batch", disable=not progress):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return torch.tensor([h.total / max(h.tokens, 1) for h in hooks], dtype=torch.float32)
