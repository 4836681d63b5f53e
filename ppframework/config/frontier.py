"""The ``evaluation.frontier`` section: every method at every ratio, timed against dense."""

from __future__ import annotations

import copy
import math
from typing import Any

from pydantic import Field, field_validator, model_validator

from ppframework.config.base import StrictModel

FRONTIER_METHODS: tuple[str, ...] = (
    "pp", "flap", "flap-ppcode", "flap-uniform", "wanda-sp", "static-ppsp", "full-batch"
)
"""The methods of the issue's efficiency frontier (full-batch is the oracle, with its real runtime)."""

FLAP_BASELINES: tuple[str, ...] = ("flap", "flap-ppcode")
"""The two FLAPs PRR is always reported against when the frontier has them: FLAP as FLAP defines it and
as the PP code computes it (the paper's FLAP numbers; docs/method.md)."""


class FrontierConfig(StrictModel):
    """The efficiency frontier of ``ppf eval``: every method at every ratio, timed against dense.

    When ``methods`` is set, the run's ``methods`` are generated from it (each entry at each ratio,
    labelled ``<name> <ratio>%``) and the report adds the frontier table (docs/evaluation.md).
    """

    methods: list[str | dict[str, Any]] = Field(
        default_factory=list,
        description="preset names or method dicts without pruning.ratio; empty = no frontier",
    )
    ratios: list[float] = Field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    reference_ratio: float = Field(0.4, description="where PRR and PRR ratios are reported (one of ratios)")
    baseline: str | None = Field(
        None,
        description="the static method (name, no ratio) to compare at equal runtime; None = the static "
        "method with the lowest perplexity at reference_ratio",
    )

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, value: list[float]) -> list[float]:
        bad = [r for r in value if not 0 < r < 1]
        if bad:
            raise ValueError(f"values {bad} outside (0, 1); pruning ratios are fractions")
        if len(set(value)) != len(value):
            raise ValueError("a ratio is listed twice")
        return sorted(value)

    @model_validator(mode="after")
    def _reference(self) -> FrontierConfig:
        if self.methods and not any(math.isclose(self.reference_ratio, r) for r in self.ratios):
            raise ValueError(
                f"reference_ratio: {self.reference_ratio} is not one of ratios {self.ratios}; add it there"
            )
        for index, entry in enumerate(self.methods):
            pruning = entry.get("pruning") if isinstance(entry, dict) else None
            if isinstance(pruning, dict) and "ratio" in pruning:
                raise ValueError(
                    f"methods[{index}].pruning.ratio: {pruning['ratio']} would be replaced by each of "
                    f"evaluation.frontier.ratios {self.ratios}; drop it (the frontier runs every method "
                    "at every one of ratios)"
                )
        names = list(dict.fromkeys(self.method_name(e) for e in self.methods))
        if self.methods and self.baseline is not None and self.baseline not in names:
            raise ValueError(
                f"baseline: {self.baseline!r} is not one of the frontier's methods ({', '.join(names)}); "
                "give one of them (its name, no ratio) or drop baseline to pick the best static method"
            )
        return self

    @property
    def enabled(self) -> bool:
        """True when the frontier has methods."""
        return bool(self.methods)

    def method_name(self, entry: str | dict[str, Any]) -> str:
        """The name a frontier entry is shown under (its ``name``, else its preset)."""
        if isinstance(entry, str):
            return entry
        return str(entry.get("name") or entry.get("preset") or "method")

    def expand(self) -> list[dict[str, Any]]:
        """Method dicts: every entry at every ratio (the entry's own ``pruning`` kept, ratio set)."""
        out = []
        for entry in self.methods:
            base = {"preset": entry} if isinstance(entry, str) else copy.deepcopy(entry)
            for ratio in self.ratios:
                method = copy.deepcopy(base)
                method["pruning"] = {**method.get("pruning", {}), "ratio": ratio}
                out.append(method)
        return out
