"""Output-aware weight terms: fold the gain a block's output passes through into the weight.

A family whose blocks norm their output before the residual (Gemma 3's post-attention and
post-feedforward RMSNorms) multiplies output row ``i`` of the output projection by a gain ``g_i``
(from about 0 to over 1000 on Gemma 3 270M). A metric's weight term computed on ``W`` alone does not
see it; computed on ``diag(g) W`` it measures what a channel contributes to the residual stream. The
norm's division by the output's RMS is one scalar per token and changes no ranking within a block.
Where the adapter reports no gain (every family but Gemma 3) the terms are the plain ones.
"""

from __future__ import annotations

import torch


def fold_gain(weight: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
    """``diag(gain) @ weight`` in fp32 (``weight`` in fp32 when ``gain`` is None)."""
    if gain is None:
        return weight.float()
    return weight.float() * gain.to(weight.device, torch.float32)[:, None]
