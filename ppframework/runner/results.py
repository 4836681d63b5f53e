"""The rows and the report of ``ppf run``: what each method measured, and reading a row back from JSON."""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any


@dataclass
class MethodResult:
    """One row of the results table."""

    method: str
    target_ratio: float
    layer_ratio: float
    realised_ratio: float
    perplexity: float
    median_forward_s: float
    time_ratio: float
    batch_seconds: list[float] = field(default_factory=list)
    delta_perplexity: float = 0.0
    probe_flops_share: float = 0.0
    ideal_time_ratio: float = 1.0
    static: bool = False
    error: str | None = None
    """Why the method failed (its measurements are then NaN, ``null`` in results.json), or None."""
    min_block_ratio: float = 0.0
    """The smallest ratio ``allocate`` gave a pruned block (``layer_ratio`` under ``uniform``)."""
    max_block_ratio: float = 0.0
    """The largest ratio ``allocate`` gave a pruned block."""
    realised_ratio_model: float = 0.0
    """The removed weights as a fraction of the whole model's parameters (embeddings included)."""
    dense_prefill: bool = False
    """``prefill: dense``: every perplexity window is a prompt and runs unpruned (realised ratio 0 by
    construction; the table says "dense prefill")."""

    @property
    def time_below_ideal(self) -> bool:
        """The single sequential timing came out below the FLOPs-ideal ratio: not physically a
        speed-up the pruning can give, so it is noise (flagged ``(!)`` in the table)."""
        t, ideal = self.time_ratio, self.ideal_time_ratio
        return not self.error and math.isfinite(t) and math.isfinite(ideal) and t < ideal

    @classmethod
    def failed(cls, label: str, ratio: float, error: str) -> MethodResult:
        """The row of a method that raised ``error``."""
        nan = float("nan")
        return cls(
            label, ratio, nan, nan, nan, nan, nan, delta_perplexity=nan, ideal_time_ratio=nan, error=error
        )


@dataclass
class RunReport:
    """Everything ``ppf run`` measured, with the settings that produced it.

    ``complete`` is False in the partial reports written while the run is still going.
    """

    rows: list[MethodResult]
    settings: dict[str, Any]
    calibration: dict[str, Any] | None
    environment: dict[str, Any]
    elapsed_s: float
    complete: bool = True
    sweep: dict[str, Any] | None = None
    """How the points ran: the launcher, the point store and which points were reused from it."""

    @property
    def failures(self) -> list[MethodResult]:
        """The rows of methods that failed."""
        return [row for row in self.rows if row.error]

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (non-finite numbers are written as ``null`` by :func:`write_report`)."""
        return {
            "rows": [{**asdict(r), "time_below_ideal": r.time_below_ideal} for r in self.rows],
            "settings": self.settings,
            "calibration": self.calibration,
            "environment": self.environment,
            "elapsed_s": self.elapsed_s,
            "complete": self.complete,
            "failed": [row.method for row in self.failures],
            "sweep": self.sweep,
        }


class DamagedRecord(ValueError):
    """A stored point's field does not hold what :class:`MethodResult` needs there."""

    def __init__(self, field_name: str, problem: str) -> None:
        self.field = field_name
        super().__init__(f"{field_name}: {problem}")


def shown(value: Any) -> str:
    """``type value`` of a stored value, cut to 40 characters, for error messages."""
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_ROW_CHECKS: dict[str, tuple[Any, str]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "str | None": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "float": (lambda v: v is None or _is_number(v), "a number or null"),
    "list[float]": (
        lambda v: isinstance(v, list) and all(x is None or _is_number(x) for x in v),
        "a list of numbers",
    ),
}
"""What a stored row's field may hold, by the field's annotation in :class:`MethodResult`."""


def row_from_json(data: Any) -> MethodResult:
    """A :class:`MethodResult` read back from JSON (``null`` numbers become NaN again), checked field
    by field.

    Raises:
        DamagedRecord: naming the first field (``row.<name>``) that is missing, unknown or of the
            wrong type.
    """
    if not isinstance(data, dict):
        raise DamagedRecord("row", f"expected a mapping, got {shown(data)}")
    known = {f.name: f for f in fields(MethodResult)}
    for name in data:
        if name not in known:
            raise DamagedRecord(f"row.{name}", "not a field of a result row")
    values: dict[str, Any] = {}
    for name, spec in known.items():
        if name not in data:
            if spec.default is MISSING and spec.default_factory is MISSING:
                raise DamagedRecord(f"row.{name}", "missing")
            continue
        value = data[name]
        accepts, expected = _ROW_CHECKS[str(spec.type)]
        if not accepts(value):
            raise DamagedRecord(f"row.{name}", f"expected {expected}, got {shown(value)}")
        if spec.type == "float":
            value = float("nan") if value is None else float(value)
        elif spec.type == "list[float]":
            value = [float("nan") if x is None else float(x) for x in value]
        values[name] = value
    return MethodResult(**values)

