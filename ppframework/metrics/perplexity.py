"""Perplexity over fixed-size batches of windows, with a warm-up batch that is run but not scored."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ppframework.metrics.timing import median, timed


@dataclass
class PerplexityResult:
    """Perplexity and the forward time of every scored batch."""

    perplexity: float
    nll_sum: float
    tokens: int
    scored_batches: int
    warmup_batches: int
    batch_seconds: list[float] = field(default_factory=list)

    @property
    def median_seconds(self) -> float:
        """Median forward time of a scored batch."""
        return median(self.batch_seconds)


def batch_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL in fp32 and the number of predicted tokens."""
    vocab = logits.shape[-1]
    shift_logits = logits[:, :-1].reshape(-1, vocab).float()
    targets = input_ids[:, 1:].reshape(-1)
    nll = F.cross_entropy(shift_logits, targets, reduction="sum")
    return float(nll), int(targets.numel())


@torch.inference_mode()
def evaluate_perplexity(
    model: torch.nn.Module,
    batches: list[torch.Tensor],
    *,
    warmup_batches: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Run every batch through ``model``; score all but the first ``warmup_batches``.

    The warm-up batches run exactly like the others (a dynamic method updates its history on
    them) but count neither in the perplexity nor in the timing.
    """
    if len(batches) <= warmup_batches:
        raise ValueError(
            f"data.max_batches: {len(batches)} batch(es) leave nothing to score after "
            f"{warmup_batches} warm-up batch(es); use more windows or fewer warm-up batches"
        )
    device = next(model.parameters()).device
    nll_sum, tokens, seconds = 0.0, 0, []
    for index, batch in enumerate(tqdm(batches, desc=desc, unit="batch", disable=not progress)):
        ids = batch.to(device)
        output, elapsed = timed(lambda ids=ids: model(input_ids=ids, use_cache=False), device)
        if index < warmup_batches:
            continue
        seconds.append(elapsed)
        nll, count = batch_nll(output.logits, ids)
        nll_sum += nll
        tokens += count
    return PerplexityResult(
        perplexity=math.exp(nll_sum / tokens),
        nll_sum=nll_sum,
        tokens=tokens,
        scored_batches=len(batches) - warmup_batches,
        warmup_batches=warmup_batches,
        batch_seconds=seconds,
    )
