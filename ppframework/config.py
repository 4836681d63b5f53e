"""Typed run configuration (pydantic v2), presets, YAML/JSON loading and ``--set`` overrides.

Every model forbids unknown fields. Problems surface as :class:`~ppframework.errors.ConfigError`
naming the field (``methods[0].pruning.ratio``) before any model or data is touched.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ppframework.errors import ConfigError
from ppframework.hookspecs import STAGES

STAGE_KEYS: tuple[str, ...] = STAGES
"""The strategy stages a method configures (one place: :data:`ppframework.hookspecs.STAGES`)."""


def method_label(name: str, ratio: float) -> str:
    """How a method is shown and keyed in results: ``<name> <ratio>%`` (e.g. ``pp 40%``)."""
    return f"{name} {ratio:.0%}"


class StrictModel(BaseModel):
    """Base for every config model: unknown fields are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


DEVICE_MAP_STRATEGIES: tuple[str, ...] = ("auto", "balanced", "balanced_low_0", "sequential")
"""``model.device_map`` strings: accelerate computes the map (``max_memory`` caps each device)."""

_MEMORY_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([GMK])(I?)B\s*$", re.IGNORECASE)


def _device_name(value: Any) -> int | str | None:
    """A device of a device map in accelerate's spelling (GPU index int, ``cpu``, ``disk``), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    if text.isdigit():
        return int(text)
    if text in ("cpu", "disk"):
        return text
    if text == "cuda":
        return 0
    if text.startswith("cuda:") and text[5:].isdigit():
        return int(text[5:])
    return None


class ModelConfig(StrictModel):
    """Which model to load and where to run it."""

    name: str = Field("smollm2-135m", description="preset name, HF id, local directory or .gguf path")
    gguf_file: str | None = Field(None, description="GGUF file name inside `name` (a directory or hub id)")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    cache_dir: str | None = Field(None, description="where converted models are cached")
    device_map: str | dict[str, int | str] | None = Field(
        None,
        description="spread the model over devices through accelerate (docs/device-map.md): auto, balanced, "
        "balanced_low_0 or sequential, or a mapping of every top-level module (model.embed_tokens, "
        "model.layers.3, lm_head, ...; '' alone: the whole model) to a GPU index, cuda:N, cpu or disk; "
        "leaves model.device at auto",
    )
    max_memory: dict[int | str, int | str] | None = Field(
        None,
        description="most memory accelerate may use per device when it computes model.device_map: GPU index "
        "(or cuda:N), cpu or disk to bytes or a size such as 20GiB",
    )
    offload_folder: str | None = Field(
        None,
        description="folder for weights a device map offloads to disk when they must be re-saved (weights "
        "not in safetensors format); safetensors weights are read where they are",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"unknown device {value!r}; choose auto, cpu, cuda or cuda:N")

    @field_validator("device_map", mode="before")
    @classmethod
    def _device_map(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            if value not in DEVICE_MAP_STRATEGIES:
                raise ValueError(
                    f"unknown device map {value!r}; choose {', '.join(DEVICE_MAP_STRATEGIES)}, or give a "
                    "mapping of module names to devices (a GPU index, cuda:N, cpu or disk)"
                )
            return value
        if not isinstance(value, dict):
            return value  # pydantic reports the type
        if not value:
            raise ValueError(
                "is an empty mapping; map module names to devices, or leave model.device_map unset"
            )
        if "" in value and len(value) > 1:
            raise ValueError(
                "'' (the whole model) cannot be combined with other entries (accelerate cannot dispatch "
                "that); map each top-level module (e.g. model.embed_tokens, model.layers.0, ..., model.norm, "
                "lm_head), or use auto"
            )
        mapping: dict[str, int | str] = {}
        for module, device in value.items():
            if not isinstance(module, str):
                raise ValueError(
                    f"key {module!r} is not a module name; keys are module names such as 'model.layers.3' "
                    "('' for the whole model)"
                )
            name = _device_name(device)
            if name is None:
                raise ValueError(
                    f"module {module!r} maps to {device!r}; use a GPU index (0, 1, ...), cuda:N, cpu or disk"
                )
            mapping[module] = name
        return mapping

    @field_validator("max_memory", mode="before")
    @classmethod
    def _max_memory(cls, value: Any) -> Any:
        if value is None or not isinstance(value, dict):
            return value
        if not value:
            raise ValueError("is an empty mapping; give a size per device, or leave model.max_memory unset")
        limits: dict[int | str, int | str] = {}
        for device, size in value.items():
            name = _device_name(device)
            if name is None:
                raise ValueError(f"device {device!r} is not a GPU index (0, 1, ...), cuda:N, cpu or disk")
            if isinstance(size, bool) or not isinstance(size, int | str):
                raise ValueError(f"{device!r}: {size!r} is not a size; give bytes or a size such as '20GiB'")
            if isinstance(size, int):
                if size <= 0:
                    raise ValueError(f"{device!r}: {size} bytes must be positive")
                limits[name] = size
                continue
            match = _MEMORY_SIZE.match(size)
            if match is None or float(match.group(1)) <= 0:
                raise ValueError(
                    f"{device!r}: {size!r} is not a size; give bytes or a positive number with GiB, MiB, "
                    "KiB, GB, MB or KB (e.g. '20GiB')"
                )
            number, unit, binary = match.groups()
            limits[name] = f"{number}{unit.upper()}{'i' if binary else ''}B"
        return limits

    @model_validator(mode="after")
    def _placement(self) -> ModelConfig:
        device_map = self.device_map
        if device_map is not None and self.device != "auto":
            raise ValueError(
                f"model.device={self.device!r} conflicts with model.device_map, which places every module "
                "itself; leave model.device at 'auto' (or unset model.device_map)"
            )
        if self.max_memory is not None:
            if device_map is None:
                raise ValueError(
                    "model.max_memory needs model.device_map: it caps what accelerate puts on each device "
                    "when it computes the map; set model.device_map to one of "
                    f"{', '.join(DEVICE_MAP_STRATEGIES)}"
                )
            if isinstance(device_map, dict):
                raise ValueError(
                    "model.max_memory only applies to a computed model.device_map "
                    f"({', '.join(DEVICE_MAP_STRATEGIES)}); an explicit mapping already places every module, "
                    "so remove model.max_memory"
                )
        if self.offload_folder is not None and device_map is None:
            raise ValueError(
                "model.offload_folder needs model.device_map (it holds the weights a device map offloads to "
                "disk); set model.device_map or remove model.offload_folder"
            )
        return self


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
    window_bos: bool = Field(
        False,
        description="start every evaluation and calibration window with the tokenizer's BOS token followed "
        "by seq_len - 1 text tokens (for models that always saw BOS in training, e.g. Gemma)",
    )
    warmup_policy: Literal["skip", "untracked"] = Field(
        "skip",
        description="skip: the first warmup_batches update the history and are not scored; untracked (the "
        "paper's code): they run once first without touching the history, then every batch is scored",
    )


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


def _pp_strategies() -> dict[str, Any]:
    return {
        "allocate": {"name": "uniform"},
        "select_probe": {"name": "residual", "params": {"seq_ratio": 0.5, "batch_ratio": 0.05}},
        "score_channels": {"name": "ppsp"},
        "fuse_history": {"name": "importance-scaled"},
        "apply_mask": {"name": "structured"},
        "infer": {"name": "sliced"},
    }


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


def _strategies(**changes: Any) -> dict[str, Any]:
    """PP's strategies with some stages replaced (``select_probe="none"`` or a dict)."""
    strategies = _pp_strategies()
    for stage, value in changes.items():
        strategies[stage] = {"name": value} if isinstance(value, str) else value
    return strategies


_CALIBRATION_EMA = {"init": "calibration", "update": "ema", "momentum": 0.99}
_CALIBRATION_ONLY = {"init": "calibration", "update": "frozen"}
_NO_HISTORY = {"init": "none", "update": "frozen"}

PRESETS: dict[str, dict[str, Any]] = {
    "pp": {
        "description": "Probe Pruning, paper defaults: residual probe (50% tokens, 5% sequences), "
        "calibration + EMA 0.99 history, importance-scaled fusion, PPsp, skip layers 0-2.",
        "pruning": {"ratio": 0.4},
        "strategies": _pp_strategies(),
        "history": _CALIBRATION_EMA,
        "decode": "frozen",
    },
    "full-batch": {
        "description": "Full-batch probing (paper's oracle): the whole batch is the probe, no history, "
        "a_c = sum_t P[t, c], PPsp. Costs a second pass over the batch.",
        "pruning": {"ratio": 0.4},
        "strategies": _strategies(select_probe="full", fuse_history="none"),
        "history": _NO_HISTORY,
        "decode": "frozen",
    },
    "pp-prompt": {
        "description": "Probe Pruning for generation (ours, not the paper's): every prompt decides alone "
        "(decision: sequence) from its own dense prefill (prefill: dense: the prompt's logits and key/value "
        "cache are the dense model's, and every real token of the prompt is the probe), fused with the "
        "calibration + EMA 0.99 history (importance-scaled), PPsp, skip layers 0-2; decode steps run on "
        "the masks decided. Prunes decode steps only: perplexity windows run dense.",
        "pruning": {"ratio": 0.4},
        "strategies": _strategies(select_probe="full"),
        "history": _CALIBRATION_EMA,
        "decode": "frozen",
        "decision": "sequence",
        "prefill": "dense",
    },
    "no-history": {
        "description": "PP without history (ablation): residual probe, a_c = sum_t P[t, c], PPsp.",
        "pruning": {"ratio": 0.4},
        "strategies": _strategies(fuse_history="none"),
        "history": _NO_HISTORY,
        "decode": "frozen",
    },
    "history-only": {
        "description": "History only (ablation): no probe; a_c from calibration + EMA 0.99 history, the "
        "decision for batch n uses history up to batch n-1; PPsp.",
        "pruning": {"ratio": 0.4},
        "strategies": _strategies(select_probe="none", fuse_history="history-only"),
        "history": _CALIBRATION_EMA,
        "decode": "frozen",
    },
    "random-probe": {
        "description": "Random probe (ablation): uniform random positions then sequences at PP's sizes; "
        "otherwise PP.",
        "pruning": {"ratio": 0.4},
        "strategies": _strategies(
            select_probe={"name": "random", "params": {"seq_ratio": 0.5, "batch_ratio": 0.05}}
        ),
        "history": _CALIBRATION_EMA,
        "decode": "frozen",
    },
    "fixed-fusion": {
        "description": "Fixed-ratio fusion (ablation): F = (1-q) Hist + q P with q = 0.5 instead of "
        "importance scaling; otherwise PP.",
        "pruning": {"ratio": 0.4},
        "strategies": _strategies(fuse_history={"name": "fixed", "params": {"probe_weight": 0.5}}),
        "history": _CALIBRATION_EMA,
        "decode": "frozen",
    },
    "static-ppsp": {
        "description": "Static PPsp: no probe, calibration history only (frozen), PPsp; decided once, "
        "sliced weights cached.",
        "pruning": {"ratio": 0.4},
        "strategies": _strategies(select_probe="none", fuse_history="history-only"),
        "history": _CALIBRATION_ONLY,
        "decode": "frozen",
    },
    "wanda-sp": {
        "description": "Wanda-sp (static baseline): S_c = sum_i |W[i,c]| sqrt(a_c) from calibration, heads "
        "by sum; decided once, sliced weights cached.",
        "pruning": {"ratio": 0.4},
        "strategies": _strategies(
            select_probe="none", fuse_history="history-only", score_channels="wanda-sp"
        ),
        "history": _CALIBRATION_ONLY,
        "decode": "frozen",
    },
    "flap": {
        "description": "FLAP (static baseline) as the PP paper runs it: S_c = fluct_c * sum_i W[i,c]^2 with "
        "fluct_c the calibration variance of the channel over all positions, heads by sum, bias "
        "compensation, adaptive structure (scores standardised per block, one FLOPs-weighted global "
        "selection); decided once, sliced weights cached.",
        "pruning": {"ratio": 0.4},
        "strategies": _strategies(
            allocate="adaptive",
            select_probe="none",
            fuse_history="history-only",
            score_channels={"name": "flap", "params": {"bias_compensation": True}},
        ),
        "history": _CALIBRATION_ONLY,
        "decode": "frozen",
    },
    "flap-uniform": {
        "description": "FLAP metric at a uniform per-layer ratio (ablation of FLAP's structure search): "
        "S_c = fluct_c * sum_i W[i,c]^2 with fluct_c the per-position variance summed over positions, "
        "heads by sum, bias compensation; decided once, sliced weights cached.",
        "pruning": {"ratio": 0.4},
        "strategies": _strategies(
            select_probe="none",
            fuse_history="history-only",
            score_channels={
                "name": "flap",
                "params": {"bias_compensation": True, "fluctuation": "per-position"},
            },
        ),
        "history": _CALIBRATION_ONLY,
        "decode": "frozen",
    },
    "magnitude": {
        "description": "Magnitude (static baseline): S_c = sum_i |W[i,c]|, weights only, heads by sum; "
        "decided once, sliced weights cached.",
        "pruning": {"ratio": 0.4},
        "strategies": _strategies(
            select_probe="none", fuse_history="history-only", score_channels="magnitude"
        ),
        "history": _NO_HISTORY,
        "decode": "frozen",
    },
    "griffin": {
        "description": "GRIFFIN (Dong et al., 2024; baseline): the prompt runs dense; each MLP keeps, for "
        "every decode step, the channels with the largest L2 norm over the prompt's tokens of the per-token "
        "L2-normalised activations; every row decides alone, every layer pruned. Attention is not pruned: "
        "ratio is the fraction of MLP channels removed, so the model-wide realised ratio is smaller.",
        "pruning": {
            "ratio": 0.5,
            "targets": ["mlp"],
            "skip_layers": [],
            "inflate_ratio": False,
            "round_to": 1,
        },
        "strategies": _strategies(select_probe="full", score_channels="griffin", fuse_history="none"),
        "history": _NO_HISTORY,
        "decode": "frozen",
        "prefill": "dense",
        "decision": "sequence",
    },
    "dense": {
        "description": "No pruning (ratio 0): the pipeline does not touch the model.",
        "pruning": {"ratio": 0.0},
        "strategies": _pp_strategies(),
        "history": _NO_HISTORY,
        "decode": "frozen",
    },
}


def _normalise_stages(method: dict[str, Any]) -> dict[str, Any]:
    """Stage shorthands (``select_probe: random``) become ``{"name": "random"}``."""
    strategies = method.get("strategies")
    if not isinstance(strategies, dict):
        return method
    method = dict(method)
    method["strategies"] = {
        stage: {"name": value} if isinstance(value, str) else value for stage, value in strategies.items()
    }
    return method


def merge_method(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge a method override onto a base method dict.

    Dicts merge recursively, except that a stage whose strategy ``name`` changes starts from the
    new strategy's defaults (the old strategy's ``params`` are dropped, not carried over).
    """
    base, override = _normalise_stages(base), _normalise_stages(override)
    merged = _deep_merge(base, override)
    for stage, value in (override.get("strategies") or {}).items():
        old = (base.get("strategies") or {}).get(stage)
        if (
            isinstance(value, dict)
            and isinstance(old, dict)
            and value.get("name", old.get("name")) != old.get("name")
        ):
            merged["strategies"][stage] = copy.deepcopy(value)
    return merged


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


ACTIVATION_METRICS = {"ppsp", "wanda-sp", "flap"}
PROBE_FUSIONS = {"importance-scaled", "none", "fixed", "completion"}
HISTORY_FUSIONS = {"importance-scaled", "history-only", "fixed", "completion"}
BUILTIN_FUSIONS = PROBE_FUSIONS | HISTORY_FUSIONS
BUILTIN_PROBES = {"residual", "random", "full", "none"}


def method_inconsistency(method: MethodConfig) -> str | None:
    """Why the built-in strategies of ``method`` cannot work together, or None.

    Only combinations of built-in strategy names are judged; third-party strategies are trusted.
    """
    if method.pruning.ratio == 0:
        return None
    if method.prefill == "dense" and method.decode == "dense":
        return (
            "prefill: 'dense' with decode: 'dense' prunes nothing (both phases run the unpruned layers); "
            "use decode 'frozen' to run decode steps on the masks the dense prefill decided"
        )
    st = method.strategies
    probe, fusion, metric = st.select_probe.name, st.fuse_history.name, st.score_channels.name
    has_probe = probe != "none"
    has_history = method.history.init == "calibration"
    history_moves = has_history and method.history.update != "frozen"
    if st.allocate.name == "adaptive" and (probe in BUILTIN_PROBES - {"none"} or history_moves):
        return (
            "strategies.allocate: 'adaptive' ranks every block's scores before the first layer runs, which "
            "only static methods can do; use select_probe 'none' and history.update 'frozen' (or "
            "history.init 'none'), or allocate 'uniform'"
        )
    if st.allocate.name == "adaptive-calibration" and not has_history:
        return (
            "strategies.allocate: 'adaptive-calibration' decides the structure from the calibration "
            "history's scores; set history.init 'calibration', or use allocate 'uniform'"
        )
    if fusion not in BUILTIN_FUSIONS:
        return None
    if fusion == "fixed" and not (has_probe and has_history):
        return (
            "strategies.fuse_history: 'fixed' fuses probe and history; it needs a select_probe other than "
            "'none' and history.init 'calibration'"
        )
    if fusion == "none" and not has_probe and metric in ACTIVATION_METRICS:
        return (
            "strategies.fuse_history: 'none' uses the probe alone, but select_probe is 'none'; choose a "
            "probe (residual, random, full) or fuse_history 'history-only'"
        )
    if metric == "flap" and (has_probe and fusion != "history-only" or not has_history):
        return (
            "strategies.score_channels: 'flap' scores the calibration's fluctuation; use select_probe 'none' "
            "(or fuse_history 'history-only') and history.init 'calibration'"
        )
    ppsp_params = st.score_channels.params
    from_calibration = ppsp_params.get("compensation_mean", "calibration") == "calibration" or not has_probe
    if metric == "ppsp" and ppsp_params.get("bias_compensation") and from_calibration and not has_history:
        return (
            "strategies.score_channels.params.bias_compensation: compensation adds back the calibration "
            "mean of the pruned channels, which needs history.init 'calibration'; set it, take the means "
            "from the probe (compensation_mean: probe, with a probe), or turn bias_compensation off"
        )
    if metric in ACTIVATION_METRICS:
        from_probe = has_probe and fusion in PROBE_FUSIONS
        from_history = has_history and fusion in HISTORY_FUSIONS
        if not (from_probe or from_history):
            return (
                f"strategies.score_channels: {metric!r} needs activations, but this method has neither a "
                f"probe feeding fuse_history {fusion!r} nor a calibration history; set history.init "
                "'calibration' or choose a probe"
            )
    return None


class MethodConfig(StrictModel):
    """One pruning method: a preset and/or explicit pruning, strategies and history settings."""

    preset: str | None = None
    name: str = ""
    description: str = ""
    pruning: PruningConfig = Field(default_factory=PruningConfig)
    strategies: StrategiesConfig = Field(default_factory=lambda: StrategiesConfig(**_pp_strategies()))
    history: HistoryConfig = Field(default_factory=HistoryConfig)
    decode: Literal["frozen", "dense"] = Field(
        "frozen",
        description="decode steps of generate(): frozen = reuse the masks decided at prefill on sliced "
        "weights gathered once; dense = run them unpruned (prefill-only pruning)",
    )
    decision: Literal["batch", "sequence"] = Field(
        "batch",
        description="who a decision forward decides for: batch = one set of masks for the whole batch "
        "(the paper's); sequence = every row decides alone, from its own real tokens, as if the prompts "
        "came one at a time (the history updated after each row), and its decode steps run on its own "
        "kept weights (row by row; static methods decide for no batch and ignore it)",
    )
    prefill: Literal["pruned", "dense"] = Field(
        "pruned",
        description="what a decision forward computes: pruned = the method's probe, masks and sliced "
        "inference (the paper's); dense = the unpruned layers (exact logits and key/value cache), whose "
        "activations at every real token are the probe for scoring and history fusion; the masks decided "
        "from them serve the decode steps only",
    )

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
        merged = merge_method({k: v for k, v in PRESETS[preset].items() if k != "description"}, data)
        merged.setdefault("name", preset)
        merged.setdefault("description", PRESETS[preset]["description"])
        return merged

    @model_validator(mode="after")
    def _consistent(self) -> MethodConfig:
        problem = method_inconsistency(self)
        if problem:
            raise ValueError(problem)
        return self

    @property
    def needs_calibration(self) -> bool:
        """Whether this method prunes and starts its history from a dense calibration."""
        return self.history.init == "calibration" and self.pruning.ratio > 0

    @property
    def label(self) -> str:
        """Short display name: ``name`` and the target ratio."""
        return method_label(self.name or self.preset or "method", self.pruning.ratio)


ZEROSHOT_TASKS: tuple[str, ...] = (
    "boolq",
    "piqa",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
)


class ZeroShotConfig(StrictModel):
    """Zero-shot multiple choice (``ppf eval``): lm-eval-harness prompt forms, acc and acc_norm."""

    enabled: bool = True
    tasks: list[str] = Field(default_factory=lambda: list(ZEROSHOT_TASKS))
    limit: int | None = Field(None, ge=1, description="first N items per task (None = all)")
    batch_size: int = Field(8, ge=1, description="requests per batch (fixed order, right padding)")
    max_length: int | None = Field(
        None,
        ge=2,
        description="left-truncate longer requests to this many input tokens (default: the model's "
        "context, or calibration.seq_len for every row when a method has a calibrated history)",
    )


class LmEvalConfig(StrictModel):
    """lm-evaluation-harness tasks (``ppf eval``, extra ``ppframework[lm-eval]``) on dense and each method.

    The seven paper tasks read the local data folder (task configs in ``ppframework/lm_eval_tasks``);
    any other name is a stock harness task (needs the hub or its cache).
    """

    enabled: bool = False
    tasks: list[str] = Field(default_factory=lambda: list(ZEROSHOT_TASKS))
    limit: int | None = Field(
        None, ge=1, description="first N documents per task (None = all; --limit sets it)"
    )
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples (None = the task's default)")
    batch_size: int = Field(8, ge=1, description="requests per forward (fixed; 'auto' is not allowed)")
    max_length: int | None = Field(
        None, ge=2, description="HFLM max_length (default: as evaluation.zeroshot.max_length)"
    )
    include_path: str | None = Field(None, description="extra folder of harness task YAMLs")
    local_data: bool = Field(
        True, description="run the seven paper tasks from the data folder (False: the stock hub tasks)"
    )
    seed: int = Field(1234, description="the harness's random/numpy/torch/few-shot seed")
    allow_code_execution: bool = Field(
        False,
        description="let code tasks (humaneval, mbpp) run the generated programs in ppframework's sandbox "
        "(the harness's confirm_run_unsafe_code)",
    )

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("list at least one task")
        duplicates = sorted({t for t in value if value.count(t) > 1})
        if duplicates:
            raise ValueError(f"task(s) {duplicates} listed twice")
        return value


class RuntimeConfig(StrictModel):
    """Interleaved dense/method timing (``ppf eval``) on the first evaluation batch."""

    enabled: bool = True
    repeats: int = Field(5, ge=1, description="timed dense/method pairs (order alternates A B, B A)")
    warmup: int = Field(1, ge=0, description="untimed forwards of each before timing")


GENERATION_TASK_NAMES: tuple[str, ...] = ("humaneval", "mbpp", "xsum")


class GenerationTaskConfig(StrictModel):
    """One generation task of ``ppf eval`` and how much of it to run."""

    name: Literal["humaneval", "mbpp", "xsum"]
    limit: int | None = Field(None, ge=1, description="first N items (None = all; --limit caps it too)")
    max_new_tokens: int | None = Field(None, ge=1, description="default: the task's (256 code, 64 XSum)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data


class GenerationConfig(StrictModel):
    """Generation tasks of ``ppf eval`` (HumanEval, MBPP: pass@1; XSum: ROUGE) through model.generate()."""

    enabled: bool = False
    tasks: list[GenerationTaskConfig] = Field(
        default_factory=lambda: [GenerationTaskConfig(name=n) for n in GENERATION_TASK_NAMES]
    )
    limit: int | None = Field(None, ge=1, description="cap on items per task (set by --limit)")
    batch_size: int = Field(8, ge=1, description="prompts per generate call (input order, left padding)")
    timeout_s: float = Field(10.0, gt=0, description="time limit of each generated program (code tasks)")
    workers: int = Field(2, ge=1, description="programs run in parallel (code tasks)")
    allow_code_execution: bool = Field(
        False,
        description="let code tasks (humaneval, mbpp) run the generated programs in ppframework's sandbox "
        "(Linux namespaces; docs/evaluation.md, Running generated code)",
    )

    @field_validator("tasks")
    @classmethod
    def _unique(cls, value: list[GenerationTaskConfig]) -> list[GenerationTaskConfig]:
        names = [t.name for t in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"task(s) {duplicates} listed twice")
        return value


FRONTIER_METHODS: tuple[str, ...] = ("pp", "flap", "flap-uniform", "wanda-sp", "static-ppsp", "full-batch")
"""The methods of the issue's efficiency frontier (full-batch is the oracle, with its real runtime)."""


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


class FidelityConfig(StrictModel):
    """Quality measures without future tokens in ``ppf eval`` (docs/evaluation.md, "Measures without
    future tokens"): fidelity to dense on prompt sets, continuation perplexity on corpora."""

    enabled: bool = False
    prompt_sets: list[Literal["xsum", "humaneval", "mbpp"]] = Field(
        default_factory=lambda: ["xsum", "humaneval", "mbpp"],
        description="prompt sets for fidelity to dense (built as the generation tasks build their prompts)",
    )
    prompts: int = Field(16, ge=1, description="prompts per prompt set (the first N that fit)")
    new_tokens: int = Field(32, ge=1, description="dense greedy continuation tokens per prompt")
    corpora: list[str] | None = Field(
        None,
        description="corpora for continuation perplexity (wikitext2, c4 or a local text file); None = "
        "data.name",
    )
    windows: int = Field(16, ge=1, description="windows of data.seq_len tokens per corpus")
    prefix_len: int | None = Field(
        None, ge=1, description="tokens of each window the method decides on (default data.seq_len // 2)"
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        description="prompts or windows per decision (default data.batch_size, at most windows)",
    )

    @field_validator("prompt_sets")
    @classmethod
    def _prompt_sets(cls, value: list[str]) -> list[str]:
        duplicates = sorted({n for n in value if value.count(n) > 1})
        if duplicates:
            raise ValueError(f"prompt set(s) {duplicates} listed twice")
        return value

    @field_validator("corpora")
    @classmethod
    def _corpora(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            duplicates = sorted({n for n in value if value.count(n) > 1})
            if duplicates:
                raise ValueError(f"corpus/corpora {duplicates} listed twice")
        return value


class EvaluationConfig(StrictModel):
    """What ``ppf eval`` measures besides perplexity, and the efficiency comparison."""

    perplexity: bool = True
    zeroshot: ZeroShotConfig = Field(default_factory=ZeroShotConfig)
    lm_eval: LmEvalConfig = Field(default_factory=LmEvalConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    frontier: FrontierConfig = Field(default_factory=FrontierConfig)
    fidelity: FidelityConfig = Field(default_factory=FidelityConfig)
    baselines: list[str] | None = Field(
        None,
        description="method labels (e.g. 'flap 40%') to compare PRR against; None = every static method",
    )
    plot: bool = True


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
            raise ValueError(_prefixed("evaluation.frontier.", validation_message(exc))) from None
        expanded = parsed.expand()
        per_entry = len(parsed.ratios)
        for index, entry in enumerate(parsed.methods):  # one error per entry, named by its position
            try:
                MethodConfig.model_validate(expanded[index * per_entry])
            except ValidationError as exc:
                prefix = f"evaluation.frontier.methods[{index}] ({parsed.method_name(entry)!r}): "
                raise ValueError(_prefixed(prefix, validation_message(exc))) from None
        return {**data, "methods": expanded}

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        names = [m.label for m in self.methods]
        duplicates = sorted({n for n in names if names.count(n) > 1})
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


def format_location(loc: tuple[Any, ...]) -> str:
    """``('methods', 0, 'pruning', 'ratio')`` -> ``methods[0].pruning.ratio``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"


def _prefixed(prefix: str, message: str) -> str:
    return "\n".join(prefix + line for line in message.splitlines())


def validation_message(error: ValidationError) -> str:
    """One readable line per pydantic error, each naming its field."""
    lines = []
    for item in error.errors():
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field; remove it or check its spelling"
        where = format_location(loc)
        named = message.startswith((f"{where}.", f"{where}:"))  # a cross-field check naming its fields
        lines.append(f"{where}: {message}" if loc and not named else message)
    return "\n".join(lines)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, for example methods.0.pruning.ratio=0.2")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {text!r}: empty key")
    if not raw.strip():
        return path, ""
    try:
        return path, yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(
            f"--set {text!r}: the value {raw!r} is not valid YAML ({reason}); quote it to pass a string, "
            "e.g. --set 'note=\"[text\"'"
        ) from None


def apply_overrides(
    raw: dict[str, Any], overrides: list[str], *, default_methods: bool = True
) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML; list items by index) to a raw dict.

    With ``default_methods`` (run configs) a missing ``methods`` list is materialised as the default
    ``[{"preset": "pp"}]`` so that ``methods.0.*`` can address it; ablation files pass False.
    """
    data = copy.deepcopy(raw)
    if overrides and default_methods and "methods" not in data:
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
            else:
                if part not in node or node[part] is None:
                    node[part] = [] if nxt.isdigit() else {}
                node = node[part]
            if not isinstance(node, dict | list):
                where = ".".join(path[: i + 1])
                raise ConfigError(
                    f"--set {text!r}: {where} is a {type(node).__name__} ({node!r}), not a mapping or list, "
                    f"so it has no field {nxt!r}; set {where}=... instead"
                )
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
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config: {file} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8 YAML "
            "or JSON"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config: {file} cannot be read ({exc.strerror or exc})") from None
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
