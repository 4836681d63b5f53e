"""The result of one ``ppf eval``: its rows, their settings, the frontier, and its JSON form."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ppframework.evaluate.frontier import FrontierReport
from ppframework.evaluate.rows import EvalRow


@dataclass
class EvalReport:
    """The rows, the settings that produced them, and where the plots went."""

    rows: list[EvalRow]
    settings: dict[str, Any]
    calibration: dict[str, Any] | None
    environment: dict[str, Any]
    elapsed_s: float
    baselines: list[str]
    plots: list[str] = field(default_factory=list)
    #: False in the partial reports written after each method while the evaluation is still going.
    complete: bool = True
    #: One record per generated completion (method, task, item, text, score), for generations.jsonl.
    generations: list[dict[str, Any]] = field(default_factory=list)
    #: The efficiency frontier (``evaluation.frontier``), when it ran.
    frontier: FrontierReport | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (derived ratios included)."""
        rows = []
        for row in self.rows:
            item = asdict(row)
            item["ideal_time_ratio"] = row.ideal_time_ratio
            rows.append(item)
        return {
            "rows": rows,
            "baselines": self.baselines,
            "settings": self.settings,
            "calibration": self.calibration,
            "environment": self.environment,
            "elapsed_s": self.elapsed_s,
            "plots": self.plots,
            "complete": self.complete,
            "frontier": self.frontier.to_json() if self.frontier is not None else None,
        }
