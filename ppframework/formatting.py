"""How numbers appear in the markdown tables of ``ppf eval`` and the frontier."""

from __future__ import annotations

import math

__all__ = ["format_number"]


def format_number(value: float | None, spec: str = ".3f") -> str:
    """``value`` formatted with ``spec``; ``-`` for None or NaN, ``inf`` for an infinity."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)
