"""The parts of a method: pruning (how much, where), history settings and the six stages' strategies."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ppframework.config.base import StrictModel
from ppframework.hookspecs import STAGES

STAGE_KEYS: tuple[str, ...] = STAGES
"""The strategy stages a method configures (one place: :data:`ppframework.hookspecs.STAGES`)."""


class PruningConfig(StrictModel):
    """How much to prune and where."""

    ratio: float = Field(0.4, description="model-wide target ratio p, a finite number in [0, 1)")
    targets: list[Literal["attention", "mlp"]] = Field(
        default_factory=lambda: ["attention", "mlp"], description="blocks to prune: attention and/or mlp"
    )
    skip_layers: list[int] = Field(default_factory=lambda: [0, 1, 2])
    inflate_ratio: bool = Field(True, description="p' = round(L / (L - skipped) * p, 2)")
    round_to: int = Field(8, ge=1, description="kept MLP width rounded up to a multiple of this")
    gqa_policy: Literal["query-only", "group"] = "query-only"

    @field_validator("ratio", mode="before")
    @classmethod
    def _ratio(cls, value: Any) -> Any:
        if isinstance(value, bool):  # pydantic would read false as 0.0 and true as 1.0
            raise ValueError(f"must be a number in [0, 1), not a boolean ({value})")
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                return value  # pydantic reports "a valid number"
        if isinstance(number, bool) or not isinstance(number, int | float):
            return value
        if not (math.isfinite(number) and 0.0 <= number < 1.0):
            raise ValueError(f"must be a finite number in [0, 1), got {number}")
        return value

    @field_validator("ratio")
    @classmethod
    def _ratio_range(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"must be a finite number in [0, 1), got {value!r}")
        return value

    @field_validator("targets")
    @classmethod
    def _targets(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(
                "is empty, so the method would prune nothing; name at least one of 'attention', 'mlp' "
                "(for an unpruned baseline use ratio 0 or the 'dense' preset)"
            )
        return list(dict.fromkeys(value))

    @field_validator("skip_layers")
    @classmethod
    def _skip(cls, value: list[int]) -> list[int]:
        if any(i < 0 for i in value):
            raise ValueError("layer indices must be >= 0")
        return sorted(set(value))


class HistoryConfig(StrictModel):
    """The per-position activation history each pruned block keeps."""

    init: Literal["calibration", "none"] = Field(
        "calibration", description="calibration: dense calibration means; none: no history"
    )
    update: Literal["ema", "frozen", "running-mean"] = Field(
        "ema",
        description="ema: Hist <- m Hist + (1-m) batch (PP); frozen: calibration only (static); "
        "running-mean: exact mean over calibration samples and every batch seen",
    )
    momentum: float = Field(0.99, ge=0.0, le=1.0, description="EMA momentum m (update: ema)")
    beyond: Literal["extend", "refuse"] = Field(
        "extend",
        description="an input longer than the history's positions (calibration.seq_len): extend = every "
        "position past them starts from the mean of the calibrated positions 1 onwards (position 0, the "
        "first token, is an outlier) and is updated like any other; refuse = an error before any layer runs",
    )


class StageConfig(StrictModel):
    """One stage's strategy: a registered name plus its parameters."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data


class StrategiesConfig(StrictModel):
    """The strategy of each of the six stages (``allocate`` defaults to ``uniform``)."""

    allocate: StageConfig = Field(
        default_factory=lambda: StageConfig(name="uniform"),
        description="per-block ratios: uniform (p' everywhere), adaptive (FLAP's global selection, static "
        "methods) or adaptive-calibration (the same, decided at attach from the calibration history's "
        "scores; dynamic methods too)",
    )
    select_probe: StageConfig
    score_channels: StageConfig
    fuse_history: StageConfig
    apply_mask: StageConfig
    infer: StageConfig
