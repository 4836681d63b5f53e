"""Where a pruned forward spends its time: a per-stage profiler for a :class:`~ppframework.pipeline.Pipeline`.

:class:`StageProfiler` is a pluggy plugin with one ``@hookimpl(wrapper=True)`` per stage hook, so it
times whatever strategy answers each stage, plus the instrumentation points the pipeline and the
runners expose through ``Pipeline.profiler`` (``probe_forward``, ``gather``, ``statistics``,
``history_update``). On CUDA every measured region is bracketed by ``torch.cuda.synchronize``, which
makes the numbers attributable but slows the forward: profile in separate, untimed forwards.

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
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from ppframework.hookspecs import hookimpl
from ppframework.metrics.timing import synchronize

if TYPE_CHECKING:
    from ppframework.pipeline import Pipeline

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


class StageProfiler:
    """Accumulates wall-clock seconds per stage (synchronised on CUDA).

    Args:
        device: where the pipeline runs (CUDA devices are synchronised around every stage).
        clock: the time source (tests pass a fake one).
    """

    def __init__(
        self, device: torch.device | str | None = None, *, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.clock = clock
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    # -- timing ----------------------------------------------------------------------------------
    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the body as stage ``name`` (nested stages are timed independently)."""
        synchronize(self.device)
        start = self.clock()
        try:
            yield
        finally:
            synchronize(self.device)
            self.totals[name] += self.clock() - start
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
    def attach(self, pipe: Pipeline) -> StageProfiler:
        """Register on ``pipe``'s plugin manager and set ``pipe.profiler``; returns self."""
        if not pipe.plugin_manager.is_registered(self):
            pipe.plugin_manager.register(self, name=PLUGIN_NAME)
        pipe.profiler = self
        return self

    def detach(self, pipe: Pipeline) -> None:
        """Undo :meth:`attach` (the pipeline runs unprofiled again)."""
        if pipe.plugin_manager.is_registered(self):
            pipe.plugin_manager.unregister(self)
        if pipe.profiler is self:
            pipe.profiler = None

    def reset(self) -> None:
        """Forget every measurement."""
        self.totals.clear()
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
