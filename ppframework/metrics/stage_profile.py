"""Where a pruned forward spends its time: a per-stage profiler for a :class:`~ppframework.pipeline.Pipeline`.

:class:`StageProfiler` is a pluggy plugin with one ``@hookimpl(wrapper=True)`` per stage hook, so it
times whatever strategy answers each stage, plus the instrumentation points the pipeline and the
runners expose through ``Pipeline.profiler`` (``probe_forward``, ``gather``, ``statistics``,
``history_update``). Two timings on CUDA (the same on CPU, where work is synchronous):

* ``sync`` brackets every measured region with ``torch.cuda.synchronize``: attributable, but each
  stage then also pays the launch latency the forward would otherwise hide behind queued work;
* ``events`` (unsynchronised) records a pair of CUDA events on the current stream around each
  region and reads them once, when the results are asked for: the GPU time from the stream reaching
  the stage to finishing it, with the host free to run ahead as in an unprofiled forward.

Either way, profile in separate, untimed forwards. ``annotate`` also opens a
``torch.profiler.record_function`` range per stage (``stage:<name>``), so an operator-level profile
can attribute each operator to its stage (:mod:`ppframework.metrics.op_profile`).

Example::

    profiler = StageProfiler(device).attach(pipe)
    with pipe, torch.no_grad():
        for _ in range(3):
            model(input_ids=ids, use_cache=False)
    profiler.detach(pipe)
    profiler.per_forward(3)  # {"select_probe": seconds per forward, ...}

Stage names (nested: ``gather`` and ``statistics`` run inside ``infer``):

================  ==========================================================================
select_probe      the probe selection hook
probe_forward     the probe's forward with full weights (pipeline)
score_channels    the scoring hook
fuse_history      the fusion hook
apply_mask        the masking hook
infer             the full pass on the kept units (gather and statistics included)
gather            slicing the kept weights into the gather buffers (runners)
statistics        the full-batch statistics of the output projection's input (``infer``)
history_update    the EMA / running-mean update of the history (pipeline)
================  ==========================================================================
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Generator, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Literal, Protocol

import pluggy
import torch

from ppframework.hookspecs import hookimpl
from ppframework.metrics.timing import synchronize


class Profiled(Protocol):
    """What the profilers use of a pipeline (a :class:`ppframework.pipeline.Pipeline` has it): its
    plugin manager, its ``profiler`` slot and its model. Typed here so that metrics need not import
    the pipeline above them."""

    plugin_manager: pluggy.PluginManager
    profiler: Any
    model: torch.nn.Module

#: The per-batch overhead of dynamic pruning, grouped as reported (stages summed per group).
OVERHEAD_GROUPS: dict[str, tuple[str, ...]] = {
    "selection": ("select_probe",),
    "probe forward": ("probe_forward",),
    "scoring and fusion": ("score_channels", "fuse_history", "apply_mask"),
    "gather": ("gather",),
    "history update": ("statistics", "history_update"),
}

STAGES: tuple[str, ...] = (
    "select_probe",
    "probe_forward",
    "score_channels",
    "fuse_history",
    "apply_mask",
    "infer",
    "gather",
    "statistics",
    "history_update",
)

PLUGIN_NAME = "ppframework-stage-profiler"

#: Prefix of the ``record_function`` range an annotating profiler opens around each stage.
RANGE_PREFIX = "stage:"

TIMINGS: tuple[str, ...] = ("sync", "events")


class StageProfiler:
    """Accumulates seconds per stage.

    Args:
        device: where the pipeline runs.
        clock: the host time source (tests pass a fake one).
        timing: ``sync`` (synchronise around every stage on CUDA) or ``events`` (CUDA events, no
            synchronisation until the results are read); the same on CPU.
        annotate: open a ``record_function`` range ``stage:<name>`` around each stage.
    """

    def __init__(
        self,
        device: torch.device | str | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
        timing: Literal["sync", "events"] = "sync",
        annotate: bool = False,
    ) -> None:
        if timing not in TIMINGS:
            raise ValueError(f"timing must be one of {', '.join(TIMINGS)}, got {timing!r}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.clock = clock
        self.timing = timing
        self.annotate = annotate
        self._totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._pending: list[tuple[str, Any, Any]] = []

    @property
    def uses_events(self) -> bool:
        """Whether stages are timed with CUDA events (``events`` timing on a CUDA device)."""
        return self.timing == "events" and self.device.type == "cuda"

    @property
    def totals(self) -> dict[str, float]:
        """Seconds per stage so far (reading them waits for the CUDA events still pending)."""
        self._resolve()
        return self._totals

    def _resolve(self) -> None:
        if not self._pending:
            return
        torch.cuda.synchronize(self.device)
        for name, start, end in self._pending:
            self._totals[name] += start.elapsed_time(end) / 1e3
        self._pending.clear()

    # -- timing ----------------------------------------------------------------------------------
    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the body as stage ``name`` (nested stages are timed independently)."""
        with ExitStack() as ranges:
            if self.annotate:
                ranges.enter_context(torch.profiler.record_function(RANGE_PREFIX + name))
            if self.uses_events:
                with torch.cuda.device(self.device):
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                try:
                    yield
                finally:
                    with torch.cuda.device(self.device):
                        end.record()
                    self._pending.append((name, start, end))
                    self.calls[name] += 1
                return
            synchronize(self.device)
            begin = self.clock()
            try:
                yield
            finally:
                synchronize(self.device)
                self._totals[name] += self.clock() - begin
                self.calls[name] += 1

    def _wrap(self, name: str) -> Generator[None, Any, Any]:
        with self.stage(name):
            return (yield)

    # -- the five hooks (wrappers: they time whichever strategy answers) ---------------------------
    @hookimpl(wrapper=True)
    def select_probe(self, ctx: Any, residual: Any, normed: Any, attention_mask: Any) -> Generator:
        """Times ``select_probe``."""
        return (yield from self._wrap("select_probe"))

    @hookimpl(wrapper=True)
    def score_channels(self, ctx: Any, probe: Any, probe_states: Any, weight: Any) -> Generator:
        """Times ``score_channels``."""
        return (yield from self._wrap("score_channels"))

    @hookimpl(wrapper=True)
    def fuse_history(self, ctx: Any, scores: Any, history: Any) -> Generator:
        """Times ``fuse_history``."""
        return (yield from self._wrap("fuse_history"))

    @hookimpl(wrapper=True)
    def apply_mask(self, ctx: Any, scores: Any, ratio: Any) -> Generator:
        """Times ``apply_mask``."""
        return (yield from self._wrap("apply_mask"))

    @hookimpl(wrapper=True)
    def infer(self, ctx: Any, block: Any, inputs: Any, mask: Any) -> Generator:
        """Times ``infer``."""
        return (yield from self._wrap("infer"))

    # -- attach / results --------------------------------------------------------------------------
    def attach(self, pipe: Profiled) -> StageProfiler:
        """Register on ``pipe``'s plugin manager and set ``pipe.profiler``; returns self."""
        if not pipe.plugin_manager.is_registered(self):
            pipe.plugin_manager.register(self, name=PLUGIN_NAME)
        pipe.profiler = self
        return self

    def detach(self, pipe: Profiled) -> None:
        """Undo :meth:`attach` (the pipeline runs unprofiled again)."""
        if pipe.plugin_manager.is_registered(self):
            pipe.plugin_manager.unregister(self)
        if pipe.profiler is self:
            pipe.profiler = None

    def reset(self) -> None:
        """Forget every measurement."""
        self._pending.clear()
        self._totals.clear()
        self.calls.clear()

    def per_forward(self, forwards: int) -> dict[str, float]:
        """Seconds per forward of every stage (``totals / forwards``), in :data:`STAGES` order."""
        if forwards < 1:
            raise ValueError(f"forwards must be >= 1, got {forwards}")
        names = [s for s in STAGES if s in self.totals] + [s for s in self.totals if s not in STAGES]
        return {name: self.totals[name] / forwards for name in names}

    def overhead(self, forwards: int) -> dict[str, float]:
        """Seconds per forward of each :data:`OVERHEAD_GROUPS` group, plus their ``total``."""
        stages = self.per_forward(forwards)
        groups = {g: sum(stages.get(s, 0.0) for s in members) for g, members in OVERHEAD_GROUPS.items()}
        groups["total"] = sum(groups.values())
        return groups
