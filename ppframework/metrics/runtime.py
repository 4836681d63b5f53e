"""Interleaved runtime comparisons and decoder-only timing.

:func:`time_interleaved` runs several callables round-robin (A B C, then C B A, B C A, A C B, ...)
so that slow drifts of a noisy machine (thermal throttling, other processes) hit every variant alike
and their *ratio* holds even when absolute seconds do not; every other round runs backwards, so two
variants compared per round run in each order equally often. :class:`DecoderTimer` measures, per
forward, the time spent inside a model's decoder layers alone (from the first layer's entry to the
last layer's exit), next to the whole forward timed by the caller.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch import nn

from ppframework.metrics.timing import synchronize

Clock = Callable[[], float]


def _device(device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


@dataclass
class TimingStats:
    """Seconds of repeated calls of one variant.

    Attributes:
        name: the variant.
        seconds: one entry per timed call, in run order.
        tokens: tokens processed per call, when known (for :meth:`tokens_per_s`).
    """

    name: str
    seconds: list[float] = field(default_factory=list)
    tokens: int | None = None

    def _quartiles(self) -> tuple[float, float, float]:
        if not self.seconds:
            return (float("nan"),) * 3
        if len(self.seconds) == 1:
            value = self.seconds[0]
            return value, value, value
        q25, q50, q75 = statistics.quantiles(self.seconds, n=4, method="inclusive")
        return q25, q50, q75

    @property
    def median(self) -> float:
        """Median seconds per call (NaN when empty)."""
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def q25(self) -> float:
        """First quartile (linear interpolation between order statistics)."""
        return self._quartiles()[0]

    @property
    def q75(self) -> float:
        """Third quartile (linear interpolation between order statistics)."""
        return self._quartiles()[2]

    @property
    def iqr(self) -> float:
        """Interquartile range ``q75 - q25`` (0 for a single call)."""
        q25, _, q75 = self._quartiles()
        return q75 - q25

    @property
    def min(self) -> float:
        """Fastest call."""
        return min(self.seconds) if self.seconds else float("nan")

    @property
    def mean(self) -> float:
        """Mean seconds per call."""
        return statistics.fmean(self.seconds) if self.seconds else float("nan")

    def tokens_per_s(self, tokens: int | None = None) -> float:
        """Throughput at the median: ``tokens / median`` (``tokens`` defaults to the stored count)."""
        count = tokens if tokens is not None else self.tokens
        if count is None:
            raise ValueError(f"tokens_per_s: no token count for {self.name!r}; pass tokens=")
        median = self.median
        return count / median if median > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """Summary for JSON reports."""
        out: dict[str, Any] = {
            "name": self.name,
            "repeats": len(self.seconds),
            "median_s": self.median,
            "iqr_s": self.iqr,
            "min_s": self.min,
            "seconds": list(self.seconds),
        }
        if self.tokens is not None:
            out["tokens_per_s"] = self.tokens_per_s()
        return out


def round_order(names: list[str], round_index: int) -> list[str]:
    """The order of round ``round_index`` of :func:`time_interleaved`: ``names`` rotated by
    ``round_index // 2``, reversed when ``round_index`` is odd."""
    if not names:
        return []
    shift = (round_index // 2) % len(names)
    order = names[shift:] + names[:shift]
    return order[::-1] if round_index % 2 else order


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    device: torch.device | str | None = None,
    *,
    tokens: int | None = None,
    clock: Clock = time.perf_counter,
) -> dict[str, TimingStats]:
    """Time every callable ``repeats`` times, interleaved, after ``warmup`` untimed rounds.

    Round ``r`` runs :func:`round_order` ``(names, r)``: the insertion order of ``fns`` rotated
    by ``r // 2``, backwards in odd rounds (A B C, C B A, B C A, A C B, ...). So no variant always
    runs first, and any two run in each order in every pair of rounds: a per-round difference
    between neighbours (``speed.py``'s paired overhead) does not carry what running first or second
    does to a call. On a CUDA ``device`` each call is bracketed by ``torch.cuda.synchronize``.
    Return values are discarded.

    Args:
        fns: name -> zero-argument callable.
        repeats: timed rounds (each runs every callable once).
        warmup: untimed rounds before, in the plain order.
        device: where the callables run (None = CPU, no synchronisation).
        tokens: tokens per call, stored in every :class:`TimingStats` for throughput.
        clock: the time source (tests pass a fake one).

    Returns:
        name -> :class:`TimingStats`, in the order of ``fns``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    dev = _device(device)
    names = list(fns)
    stats = {name: TimingStats(name, tokens=tokens) for name in names}
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(dev)
    for round_index in range(repeats):
        for name in round_order(names, round_index):
            synchronize(dev)
            start = clock()
            fns[name]()
            synchronize(dev)
            stats[name].seconds.append(clock() - start)
    return stats


def ratio_to(stats: dict[str, TimingStats], reference_name: str) -> dict[str, float]:
    """Median time of each variant divided by the reference's median (the reference maps to 1.0)."""
    if reference_name not in stats:
        raise KeyError(f"ratio_to: no timing named {reference_name!r} (have {', '.join(stats)})")
    reference = stats[reference_name].median
    return {name: (s.median / reference if reference > 0 else float("nan")) for name, s in stats.items()}


class DecoderTimer:
    """Times the decoder layers alone, once per forward, with module hooks.

    A forward pre-hook on the first layer of ``layers`` starts the clock and a forward hook on the
    last layer stops it (both synchronise on CUDA, which adds two syncs per forward). Hooks run
    around whatever ``self.forward`` is, because ``nn.Module.__call__`` calls them, so they still
    fire when a pipeline replaces a layer's ``forward`` on the instance. Work done outside the
    layers' calls (e.g. in a model-level hook) is not included.

    Example::

        with DecoderTimer(adapter.layers) as timer:
            model(input_ids=ids)
        timer.seconds  # one entry per forward

    Args:
        layers: the decoder layers (an ``nn.ModuleList`` or any non-empty sequence of modules).
        device: where they run; None = the device of the first layer's first parameter (CPU if none).
        clock: the time source.
    """

    def __init__(
        self,
        layers: nn.ModuleList | list[nn.Module],
        device: torch.device | str | None = None,
        *,
        clock: Clock = time.perf_counter,
    ) -> None:
        if len(layers) == 0:
            raise ValueError("DecoderTimer needs at least one layer")
        self.layers = layers
        if device is None:
            param = next(layers[0].parameters(), None)
            device = param.device if param is not None else None
        self.device = _device(device)
        self.clock = clock
        self.seconds: list[float] = []
        self._start: float | None = None
        self._handles: list[Any] = []

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        synchronize(self.device)
        self._start = self.clock()

    def _post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._start is None:
            return
        synchronize(self.device)
        self.seconds.append(self.clock() - self._start)
        self._start = None

    def __enter__(self) -> DecoderTimer:
        self._handles = [
            self.layers[0].register_forward_pre_hook(self._pre_hook),
            self.layers[-1].register_forward_hook(self._post_hook),
        ]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._start = None

    def stats(self, name: str = "decoder", tokens: int | None = None) -> TimingStats:
        """The recorded forwards as :class:`TimingStats`."""
        return TimingStats(name, list(self.seconds), tokens=tokens)

    @property
    def total(self) -> float:
        """Seconds summed over the recorded forwards."""
        return float(sum(self.seconds))
