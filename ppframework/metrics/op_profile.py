"""Which operators each stage of a pruned forward spends its time in.

:func:`profile_ops_by_stage` runs forwards under ``torch.profiler`` with a
:class:`~ppframework.metrics.stage_profile.StageProfiler` that annotates every stage (a
``record_function`` range ``stage:<name>``), then charges each operator's *self* time (host, and
device time of the kernels it launched on CUDA) to the innermost stage around it. Operators outside
every stage (the model's norms, the unpruned layers, the embedding and LM head) go to ``outside``.
Nothing is synchronised per stage, so launch latency is not exaggerated; the profiler's own
bookkeeping slows the forward, so compare shares, not absolute times, with an unprofiled run.

Example::

    table = profile_ops_by_stage(pipe, lambda: model(input_ids=ids, use_cache=False), forwards=1)
    table.stage_totals()            # {"probe_forward": (host s, device s), ...} per forward
    print(table.to_markdown(top=6))
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ppframework.metrics.stage_profile import RANGE_PREFIX, STAGES, Profiled, StageProfiler

#: Where operators outside every stage are charged.
OUTSIDE = "outside"


@dataclass
class OpTime:
    """One operator's self time within one stage, summed over the profiled forwards."""

    calls: int = 0
    host_s: float = 0.0
    device_s: float = 0.0


@dataclass
class OpProfile:
    """Operator self times per stage, summed over ``forwards`` profiled forwards."""

    forwards: int
    device_type: str
    ops: dict[str, dict[str, OpTime]] = field(default_factory=dict)

    def stage_totals(self) -> dict[str, tuple[float, float]]:
        """Per stage, (host seconds, device seconds) per forward, in pipeline order."""
        order = [s for s in (*STAGES, OUTSIDE) if s in self.ops] + [
            s for s in self.ops if s not in STAGES and s != OUTSIDE
        ]
        return {
            stage: (
                sum(t.host_s for t in self.ops[stage].values()) / self.forwards,
                sum(t.device_s for t in self.ops[stage].values()) / self.forwards,
            )
            for stage in order
        }

    def top(self, stage: str, n: int) -> list[tuple[str, OpTime]]:
        """The ``n`` operators of ``stage`` with the most time (device time on CUDA, else host)."""
        key = (lambda t: t.device_s) if self.device_type == "cuda" else (lambda t: t.host_s)
        return sorted(self.ops.get(stage, {}).items(), key=lambda item: -key(item[1]))[:n]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per stage, per operator, calls and seconds per forward."""
        return {
            "forwards": self.forwards,
            "device_type": self.device_type,
            "stages": {
                stage: {
                    name: {
                        "calls": t.calls / self.forwards,
                        "host_s": t.host_s / self.forwards,
                        "device_s": t.device_s / self.forwards,
                    }
                    for name, t in ops.items()
                }
                for stage, ops in self.ops.items()
            },
        }

    def to_markdown(self, top: int = 6, dense_s: float | None = None) -> str:
        """A table: each stage's total, then its ``top`` operators (ms per forward; with ``dense_s``,
        also as a share of that time)."""
        cuda = self.device_type == "cuda"
        head = "| stage | operator | calls | host ms |" + (" device ms |" if cuda else "")
        head += " share of dense |" if dense_s else ""
        cols = head.count("|") - 1
        lines = [head, "|" + "---|" * cols]

        def row(stage: str, name: str, calls: float | str, host: float, device: float) -> str:
            cells = [stage, name, str(calls), f"{host * 1e3:.2f}"]
            if cuda:
                cells.append(f"{device * 1e3:.2f}")
            if dense_s:
                cells.append(f"{(device if cuda else host) / dense_s:.2%}")
            return "| " + " | ".join(cells) + " |"

        for stage, (host, device) in self.stage_totals().items():
            lines.append(row(f"**{stage}**", "(all)", "", host, device))
            for name, t in self.top(stage, top):
                calls = t.calls / self.forwards
                lines.append(
                    row("", f"`{name}`", f"{calls:g}", t.host_s / self.forwards, t.device_s / self.forwards)
                )
        return "\n".join(lines)


def _stage_of(event: Any) -> str:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(RANGE_PREFIX):
            return parent.name[len(RANGE_PREFIX) :]
        parent = parent.cpu_parent
    return OUTSIDE


def _device_self_s(event: Any) -> float:
    return float(getattr(event, "self_device_time_total", 0.0) or 0.0) / 1e6


def profile_ops_by_stage(pipe: Profiled, forward: Callable[[], None], forwards: int = 1) -> OpProfile:
    """Run ``forward`` (one model forward under ``pipe``) ``forwards`` times under the PyTorch
    profiler and return every operator's self time per stage.

    ``forward`` must enter the pipeline itself (``with pipe: model(...)``); the profiler attaches a
    stage annotator to ``pipe`` for the duration and detaches it after.
    """
    if forwards < 1:
        raise ValueError(f"forwards must be >= 1, got {forwards}")
    device = next(iter(pipe.model.parameters())).device
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    annotator = StageProfiler(device, timing="events", annotate=True).attach(pipe)
    try:
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(forwards):
                forward()
    finally:
        annotator.detach(pipe)
    ops: dict[str, dict[str, OpTime]] = defaultdict(lambda: defaultdict(OpTime))
    for event in prof.events():
        if event.name.startswith(RANGE_PREFIX) or getattr(event, "device_type", None) not in (
            None,
            torch.autograd.DeviceType.CPU,
        ):
            continue  # stage ranges themselves; kernels are charged through the op that launched them
        entry = ops[_stage_of(event)][event.name]
        entry.calls += 1
        entry.host_s += event.self_cpu_time_total / 1e6
        entry.device_s += _device_self_s(event)
    return OpProfile(
        forwards=forwards,
        device_type=device.type,
        ops={stage: dict(by_op) for stage, by_op in ops.items()},
    )
