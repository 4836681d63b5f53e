"""The small pieces both speed reports' markdown is made of: a number or ``n/a``, a target's verdict,
and the line describing the workload and the machine."""

from __future__ import annotations

import math
from typing import Any


def fmt(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``; ``n/a`` for None or NaN."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def met(flag: bool) -> str:
    """A target's verdict: ``met`` or ``NOT met``."""
    return "met" if flag else "NOT met"


def workload_words(settings: dict[str, Any]) -> str:
    """The opening of a report's settings line: the workload and its shape, the device and the dtype
    (ends with ``", "``, for the benchmark's own settings to follow)."""
    s, shape = settings, settings["shape"]
    return (
        f"{s['workload']} (hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
        f"{shape['num_attention_heads']} heads / {shape['num_key_value_heads']} kv, MLP "
        f"{shape['intermediate_size']}, vocab {shape['vocab_size']}); {s['device']} ({s['device_name']}), "
        f"{s['dtype']}, "
    )
