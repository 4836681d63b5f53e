"""A whole run (:class:`RunConfig`): model, data, calibration, the methods and the evaluation, with the
checks that span sections."""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError, model_validator

from ppframework.config.base import StrictModel, repeated
from ppframework.config.data import CalibrationConfig, DataConfig
from ppframework.config.evaluation import EvaluationConfig
from ppframework.config.frontier import FrontierConfig
from ppframework.config.messages import prefix_lines, validation_message
from ppframework.config.method import MethodConfig
from ppframework.config.model import ModelConfig


class RunConfig(StrictModel):
    """A whole run: model, data, calibration, the methods to compare with dense, and outputs."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    methods: list[MethodConfig] = Field(default_factory=lambda: [MethodConfig(preset="pp")])
    seed: int = 0
    out_dir: str | None = None
    progress: bool = True
    note: str = Field("", description="free text printed with the results (e.g. why sizes are small)")
    evaluation: EvaluationConfig = Field(
        default_factory=EvaluationConfig, description="used by `ppf eval` (ignored by `ppf run`)"
    )

    @model_validator(mode="before")
    @classmethod
    def _frontier_methods(cls, data: Any) -> Any:
        """``evaluation.frontier.methods`` generates ``methods`` (the two cannot both be given)."""
        if not isinstance(data, dict):
            return data
        evaluation = data.get("evaluation")
        frontier = evaluation.get("frontier") if isinstance(evaluation, dict) else None
        if not isinstance(frontier, dict) or not frontier.get("methods"):
            return data
        if data.get("methods"):
            raise ValueError(
                "methods: give either `methods` or `evaluation.frontier.methods` (which generates every "
                "method at every ratio), not both"
            )
        try:
            parsed = FrontierConfig.model_validate(frontier)
        except ValidationError as exc:
            raise ValueError(prefix_lines("evaluation.frontier.", validation_message(exc))) from None
        expanded = parsed.expand()
        per_entry = len(parsed.ratios)
        for index, entry in enumerate(parsed.methods):  # one error per entry, named by its position
            try:
                MethodConfig.model_validate(expanded[index * per_entry])
            except ValidationError as exc:
                prefix = f"evaluation.frontier.methods[{index}] ({parsed.method_name(entry)!r}): "
                raise ValueError(prefix_lines(prefix, validation_message(exc))) from None
        return {**data, "methods": expanded}

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        duplicates = repeated([m.label for m in self.methods])
        if duplicates:
            raise ValueError(f"methods: duplicate method labels {duplicates}; give each a distinct `name`")
        data = self.data
        scored_none = data.max_batches is not None and data.warmup_batches >= data.max_batches
        if data.warmup_policy == "skip" and scored_none:
            raise ValueError(
                f"data.warmup_batches ({data.warmup_batches}) must be less than data.max_batches "
                f"({data.max_batches}): warm-up batches are not scored, so no batch would be; raise "
                "data.max_batches or lower data.warmup_batches"
            )
        seq = self.calibration.seq_len
        refusing = [m.label for m in self.methods if m.needs_calibration and m.history.beyond == "refuse"]
        if seq is not None and seq < self.data.seq_len and refusing:
            raise ValueError(
                f"calibration.seq_len ({seq}) must be >= data.seq_len ({self.data.seq_len}) for "
                f"{', '.join(refusing)} (history.beyond: refuse): the history is indexed by absolute "
                "position; raise calibration.seq_len or set history.beyond: extend"
            )
        return self

    @model_validator(mode="after")
    def _fidelity(self) -> RunConfig:
        """The fidelity prefix must leave tokens to score; an explicit batch must fit the windows."""
        fid, seq = self.evaluation.fidelity, self.data.seq_len
        if fid.prefix_len is not None and fid.prefix_len >= seq:
            raise ValueError(
                f"evaluation.fidelity.prefix_len: {fid.prefix_len} must be below the window's "
                f"data.seq_len ({seq}), so that some tokens are left to score"
            )
        if fid.batch_size is not None and fid.batch_size > fid.windows:
            raise ValueError(
                f"evaluation.fidelity.batch_size: {fid.batch_size} exceeds evaluation.fidelity.windows "
                f"({fid.windows}); continuation perplexity decides on whole batches of windows"
            )
        return self

    @property
    def calibration_seq_len(self) -> int:
        """Calibration window length (defaults to the evaluation's)."""
        return self.calibration.seq_len or self.data.seq_len
