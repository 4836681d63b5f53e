"""Typed run configuration (pydantic v2), presets, YAML/JSON loading and ``--set`` overrides.

Every model forbids unknown fields. Problems surface as :class:`~ppframework.errors.ConfigError`
naming the field (``methods[0].pruning.ratio``) before any model or data is touched.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ppframework.errors import ConfigError

STAGE_KEYS: tuple[str, ...] = ("select_probe", "score_channels", "fuse_history", "apply_mask", "infer")


class StrictModel(BaseModel):
    """Base for every config model: unknown fields are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(StrictModel):
    """Which model to load and where to run it."""

    name: str = Field("smollm2-135m", description="preset name, HF id, local directory or .gguf path")
    gguf_file: str | None = Field(None, description="GGUF file name inside `name` (a directory or hub id)")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    cache_dir: str | None = Field(None, description="where converted models are cached")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"unknown device {value!r}; choose auto, cpu, cuda or cuda:N")


class DataConfig(StrictModel):
    """The evaluation text and how it is cut into batches of windows."""

    name: str = Field("wikitext2", description="wikitext2, c4, or a local .txt/.raw/.jsonl/.json/.parquet")
    split: str = "test"
    data_dir: str | None = Field(None, description="local data folder; else $PPF_DATA_DIR, ../shared/data")
    seq_len: int = Field(1024, ge=2)
    batch_size: int = Field(20, ge=1)
    window_policy: Literal["contiguous", "random"] = "random"
    max_batches: int | None = Field(None, ge=1, description="batches to run, warm-up included")
    warmup_batches: int = Field(1, ge=0)


class CalibrationConfig(StrictModel):
    """Dense calibration that initialises the history (paper: 2,000 C4 windows)."""

    dataset: str = "c4"
    split: str = "validation"
    n_samples: int = Field(2000, ge=1)
    seq_len: int | None = Field(None, ge=2, description="defaults to data.seq_len")
    batch_size: int = Field(8, ge=1)
    seed: int = 0
    cache: bool = True
    cache_dir: str | None = None


class PruningConfig(StrictModel):
    """How much to prune and where."""

    ratio: float = Field(0.4, ge=0.0, lt=1.0, description="model-wide target ratio p")
    targets: list[Literal["attention", "mlp"]] = Field(default_factory=lambda: ["attention", "mlp"])
    skip_layers: list[int] = Field(default_factory=lambda: [0, 1, 2])
    inflate_ratio: bool = Field(True, description="p' = round(L / (L - skipped) * p, 2)")
    round_to: int = Field(8, ge=1, description="kept MLP width rounded up to a multiple of this")
    gqa_policy: Literal["query-only", "group"] = "query-only"

    @field_validator("skip_layers")
    @classmethod
    def _skip(cls, value: list[int]) -> list[int]:
        if any(i < 0 for i in value):
            raise ValueError("layer indices must be >= 0")
        return sorted(set(value))


class HistoryConfig(StrictModel):
    """The per-position activation history each pruned block keeps."""

    init: Literal["calibration", "none"] = "calibration"
    update: Literal["ema", "frozen"] = "ema"
    momentum: float = Field(0.99, ge=0.0, le=1.0)


class StageConfig(StrictModel):
    """One stage's strategy: a registered name plus its parameters."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data


def _pp_strategies() -> dict[str, Any]:
    return {
        "select_probe": {"name": "residual", "params": {"seq_ratio": 0.5, "batch_ratio": 0.05}},
        "score_channels": {"name": "ppsp"},
        "fuse_history": {"name": "importance-scaled"},
        "apply_mask": {"name": "structured"},
        "infer": {"name": "sliced"},
    }


class StrategiesConfig(StrictModel):
    """The strategy of each of the five stages."""

    select_probe: StageConfig
    score_channels: StageConfig
    fuse_history: StageConfig
    apply_mask: StageConfig
    infer: StageConfig


PRESETS: dict[str, dict[str, Any]] = {
    "pp": {
        "description": "Probe Pruning, paper defaults: residual probe (50% tokens, 5% sequences), "
        "calibration + EMA 0.99 history, importance-scaled fusion, PPsp, skip layers 0-2.",
        "pruning": {"ratio": 0.4},
        "strategies": _pp_strategies(),
        "history": {"init": "calibration", "update": "ema", "momentum": 0.99},
    },
    "dense": {
        "description": "No pruning (ratio 0): the pipeline does not touch the model.",
        "pruning": {"ratio": 0.0},
        "strategies": _pp_strategies(),
        "history": {"init": "none", "update": "frozen"},
    },
}


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class MethodConfig(StrictModel):
    """One pruning method: a preset and/or explicit pruning, strategies and history settings."""

    preset: str | None = None
    name: str = ""
    description: str = ""
    pruning: PruningConfig = Field(default_factory=PruningConfig)
    strategies: StrategiesConfig = Field(default_factory=lambda: StrategiesConfig(**_pp_strategies()))
    history: HistoryConfig = Field(default_factory=HistoryConfig)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"preset": data}
        if not isinstance(data, dict) or data.get("preset") is None:
            return data
        preset = data["preset"]
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(sorted(PRESETS))}")
        merged = _deep_merge(PRESETS[preset], data)
        merged.setdefault("name", preset)
        return merged

    @property
    def needs_calibration(self) -> bool:
        """Whether this method prunes and starts its history from a dense calibration."""
        return self.history.init == "calibration" and self.pruning.ratio > 0

    @property
    def label(self) -> str:
        """Short display name: ``name`` and the target ratio."""
        base = self.name or self.preset or "method"
        return f"{base} {self.pruning.ratio:.0%}"


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

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        names = [m.label for m in self.methods]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"methods: duplicate method labels {duplicates}; give each a distinct `name`")
        seq = self.calibration.seq_len
        if seq is not None and seq < self.data.seq_len:
            raise ValueError(
                f"calibration.seq_len ({seq}) must be >= data.seq_len ({self.data.seq_len}): the history "
                "is indexed by absolute position"
            )
        return self

    @property
    def calibration_seq_len(self) -> int:
        """Calibration window length (defaults to the evaluation's)."""
        return self.calibration.seq_len or self.data.seq_len


def format_location(loc: tuple[Any, ...]) -> str:
    """``('methods', 0, 'pruning', 'ratio')`` -> ``methods[0].pruning.ratio``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"


def validation_message(error: ValidationError) -> str:
    """One readable line per pydantic error, each naming its field."""
    lines = []
    for item in error.errors():
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field; remove it or check its spelling"
        lines.append(f"{format_location(loc)}: {message}" if loc else message)
    return "\n".join(lines)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, for example methods.0.pruning.ratio=0.2")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {text!r}: empty key")
    return path, yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML; list items by index) to a raw dict."""
    data = copy.deepcopy(raw)
    if overrides and "methods" not in data:
        data["methods"] = [{"preset": "pp"}]  # the default, materialised so methods.0.* can address it
    for text in overrides:
        path, value = _parse_override(text)
        node: Any = data
        for i, part in enumerate(path[:-1]):
            nxt = path[i + 1]
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {text!r}: {part!r} is not an index of a list of {len(node)}")
                node = node[int(part)]
                continue
            if part not in node or node[part] is None:
                node[part] = [] if nxt.isdigit() else {}
            node = node[part]
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"--set {text!r}: {last!r} is not an index of a list of {len(node)}")
            node[int(last)] = value
        else:
            node[last] = value
    return data


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (safe loader) or JSON config file into a dict."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config: file {str(file)!r} does not exist")
    text = file.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        kind = "JSON" if file.suffix == ".json" else "YAML"
        raise ConfigError(f"config: {file} is not valid {kind}: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {file} must hold a mapping at the top level, not {type(data).__name__}")
    return data


def parse_run_config(data: dict[str, Any]) -> RunConfig:
    """Validate a raw dict into a :class:`RunConfig` (shape only; see :func:`load_config`)."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc)) from None


def preset(name: str, **pruning: Any) -> MethodConfig:
    """A method from a preset, with pruning fields overridden: ``preset("pp", ratio=0.2)``."""
    try:
        return MethodConfig.model_validate({"preset": name, "pruning": pruning})
    except ValidationError as exc:
        raise ConfigError(validation_message(exc)) from None
