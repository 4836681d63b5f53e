"""Peak memory of a region of code: CUDA allocator peak on GPU, resident set size on CPU.

Caveat on CPU: ``resource.getrusage(...).ru_maxrss`` is the *process-lifetime* high-water mark of
the resident set, not the peak inside the measured region. If the process was bigger at some earlier
point (loading a model, an earlier run), the region's own peak is hidden below it. :class:`PeakMemory`
therefore also samples the current RSS from ``/proc/self/statm`` before and after the region (Linux)
and says whether the high-water mark rose during the region (``peak_in_region``): only then is
``peak_rss_bytes`` the region's own peak. Compare dense and pruned runs on CPU in separate processes,
or use the RSS delta, when this matters. On CUDA the allocator's peak is reset on entry and is exact.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType

import torch

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(n: float | None) -> str:
    """Human-readable binary size, e.g. ``format_bytes(1536) == '1.50 KiB'``; ``'n/a'`` for None."""
    if n is None:
        return "n/a"
    value = float(n)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            return f"{sign}{int(value)} {unit}" if unit == "B" else f"{sign}{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def peak_rss_bytes() -> int | None:
    """Process-lifetime peak resident set size in bytes (``ru_maxrss``), or None where unavailable."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    maxrss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    # Linux reports KiB, macOS bytes.
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def current_rss_bytes() -> int | None:
    """Current resident set size in bytes from ``/proc/self/statm``, or None where unavailable."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            resident_pages = int(handle.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class PeakMemory:
    """Context manager measuring the peak memory of its body, in bytes.

    On CUDA (``device`` a CUDA device): synchronises, resets the allocator's peak statistics on
    entry and reads ``torch.cuda.max_memory_allocated(device)`` on exit (``peak_bytes``), plus the
    allocation at entry (``start_bytes``) so ``increase_bytes`` is the extra memory of the region.

    On CPU (the default): ``peak_bytes`` is the process's peak RSS (``peak_rss_bytes``, a
    lifetime high-water mark, see the module docstring), ``rss_before_bytes``/``rss_after_bytes``
    are current RSS samples around the region and ``rss_delta_bytes`` their difference;
    ``peak_in_region`` tells whether the high-water mark rose inside the region.

    Example::

        with PeakMemory(device) as mem:
            model(input_ids=ids)
        log.info("peak %s", format_bytes(mem.peak_bytes))
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.peak_bytes: int | None = None
        self.start_bytes: int | None = None
        self.peak_rss_bytes: int | None = None
        self.rss_before_bytes: int | None = None
        self.rss_after_bytes: int | None = None
        self._peak_rss_before: int | None = None

    @property
    def is_cuda(self) -> bool:
        """Whether the CUDA allocator is measured."""
        return self.device.type == "cuda"

    def __enter__(self) -> PeakMemory:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = int(torch.cuda.memory_allocated(self.device))
        else:
            self._peak_rss_before = peak_rss_bytes()
            self.rss_before_bytes = current_rss_bytes()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self.rss_after_bytes = current_rss_bytes()
            self.peak_rss_bytes = peak_rss_bytes()
            self.peak_bytes = self.peak_rss_bytes

    @property
    def increase_bytes(self) -> int | None:
        """CUDA: peak minus the allocation at entry; CPU: None (see ``rss_delta_bytes``)."""
        if self.peak_bytes is None or self.start_bytes is None:
            return None
        return self.peak_bytes - self.start_bytes

    @property
    def rss_delta_bytes(self) -> int | None:
        """CPU: current RSS after minus before the region (may be negative), None where unknown."""
        if self.rss_before_bytes is None or self.rss_after_bytes is None:
            return None
        return self.rss_after_bytes - self.rss_before_bytes

    @property
    def peak_in_region(self) -> bool | None:
        """CPU: whether the lifetime RSS peak rose inside the region (then it is the region's peak)."""
        if self._peak_rss_before is None or self.peak_rss_bytes is None:
            return None
        return self.peak_rss_bytes > self._peak_rss_before

    def as_dict(self) -> dict[str, int | bool | str | None]:
        """The measurements, for JSON reports."""
        return {
            "device": str(self.device),
            "peak_bytes": self.peak_bytes,
            "start_bytes": self.start_bytes,
            "increase_bytes": self.increase_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
            "rss_delta_bytes": self.rss_delta_bytes,
            "peak_in_region": self.peak_in_region,
        }
