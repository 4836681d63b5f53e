"""Interleaved runtime of a method against dense on the same batch (``evaluation.runtime``).

Dense and the method alternate (A B, B A, ...); the whole forward and the decoder layers alone are
timed, and :class:`RuntimeResult` turns the pairs into median ratios and their spread.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ppframework.devices import input_device
from ppframework.metrics.noise import RatioSpread, ratio_spread
from ppframework.metrics.runtime import DecoderTimer
from ppframework.metrics.timing import timed
from ppframework.pipeline import Pipeline


@dataclass
class RuntimeResult:
    """Interleaved timing of one method against dense on the same batch."""

    method_s: list[float] = field(default_factory=list)
    dense_s: list[float] = field(default_factory=list)
    method_decoder_s: list[float] = field(default_factory=list)
    dense_decoder_s: list[float] = field(default_factory=list)
    tokens: int = 0

    @staticmethod
    def _median(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    @property
    def time_ratio(self) -> float:
        """Median method time / median dense time, whole forward."""
        return self._median(self.method_s) / self._median(self.dense_s)

    @property
    def decoder_time_ratio(self) -> float:
        """The same for the decoder layers alone (the LM head is never pruned)."""
        return self._median(self.method_decoder_s) / self._median(self.dense_decoder_s)

    @property
    def pair_ratios(self) -> RatioSpread:
        """Median and quartiles of the per-pair ratios (method / dense of the same pair)."""
        return ratio_spread(self.method_s, self.dense_s)

    @property
    def spread(self) -> float:
        """Interquartile range of the per-pair ratios (0 for fewer than two pairs)."""
        return self.pair_ratios.iqr if len(self.method_s) >= 2 else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Tokens per second of the method (whole forward, median)."""
        return self.tokens / self._median(self.method_s)

    @property
    def dense_tokens_per_s(self) -> float:
        """Tokens per second of dense in the same pairs."""
        return self.tokens / self._median(self.dense_s)


def time_against_dense(
    model: nn.Module,
    layers: nn.ModuleList,
    pipe: Pipeline,
    batch: torch.Tensor,
    repeats: int,
    warmup: int,
    progress: bool = False,
    desc: str = "runtime",
) -> RuntimeResult:
    """Interleaved timing: dense and ``pipe`` alternate (A B, B A, ...) on the same batch.

    Attaching/detaching happens outside the timed region; each timed call is synchronised on
    CUDA. ``warmup`` untimed calls of each come first.
    """
    device = input_device(model)
    ids = batch.to(device)
    result = RuntimeResult(tokens=int(ids.numel()))

    def forward() -> Any:
        return model(input_ids=ids, use_cache=False)

    def one(pruned: bool, record: bool) -> None:
        if pruned:
            pipe.attach()
        else:
            pipe.detach()
        with DecoderTimer(layers, device) as timer:
            _, seconds = timed(forward, device)
        if record:
            (result.method_s if pruned else result.dense_s).append(seconds)
            decoder = timer.seconds[-1] if timer.seconds else float("nan")
            (result.method_decoder_s if pruned else result.dense_decoder_s).append(decoder)

    with torch.inference_mode():
        for _ in range(warmup):
            one(False, False)
            one(True, False)
        for r in tqdm(range(repeats), desc=desc, unit="pair", disable=not progress):
            order = (False, True) if r % 2 == 0 else (True, False)
            for pruned in order:
                one(pruned, True)
    pipe.detach()
    return result


def make_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of ``model`` (through its adapter)."""
    from ppframework.adapters import get_adapter

    return get_adapter(model).layers
