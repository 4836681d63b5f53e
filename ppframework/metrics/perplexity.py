"""Perplexity over fixed-size batches of windows, with a warm-up batch that is run but not scored."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ppframework.devices import input_device
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
    warmup_policy: str = "skip",
    untracked: Callable[[], AbstractContextManager[object]] = nullcontext,
) -> PerplexityResult:
    """Run every batch through ``model`` and score them after the warm-up.

    ``warmup_policy`` (``data.warmup_policy``):

    * ``"skip"`` (default): score all but the first ``warmup_batches``. The warm-up batches run
      exactly like the others (a dynamic method updates its history on them) but count neither in
      the perplexity nor in the timing.
    * ``"untracked"`` (the paper's code): first run the first ``warmup_batches`` once inside
      ``untracked()`` (a pipeline's :meth:`~ppframework.pipeline.Pipeline.untracked`: its history does
      not change), unscored; then run and score every batch, those included.
    """
    if warmup_policy not in ("skip", "untracked"):
        raise ValueError(f"data.warmup_policy: {warmup_policy!r} is not 'skip' or 'untracked'")
    device = input_device(model)
    if warmup_policy == "untracked":
        if not batches:
            raise ValueError("data.max_batches: no batches to score")
        with untracked():
            for batch in batches[:warmup_batches]:
                model(input_ids=batch.to(device), use_cache=False)
        skip = 0
    else:
        if len(batches) <= warmup_batches:
            raise ValueError(
                f"data.max_batches: {len(batches)} batch(es) leave nothing to score after "
                f"{warmup_batches} warm-up batch(es); use more windows or fewer warm-up batches"
            )
        skip = warmup_batches
    nll_sum, tokens, seconds = 0.0, 0, []
    for index, batch in enumerate(tqdm(batches, desc=desc, unit="batch", disable=not progress)):
        ids = batch.to(device)
        output, elapsed = timed(lambda ids=ids: model(input_ids=ids, use_cache=False), device)
        if index < skip:
            continue
        seconds.append(elapsed)
        nll, count = batch_nll(output.logits, ids)
        nll_sum += nll
        tokens += count
    return PerplexityResult(
        perplexity=math.exp(nll_sum / tokens),
        nll_sum=nll_sum,
        tokens=tokens,
        scored_batches=len(batches) - skip,
        warmup_batches=warmup_batches,
        batch_seconds=seconds,
    )
