"""Ablations composed in config: one base run, named variants merged onto it, and a grid.

An ablation file::

    base:                      # a run config (model, data, calibration, seed, ...)
      data: {seq_len: 512, batch_size: 8}
      method: {preset: pp}     # the method every variant starts from
    variants:                  # name -> partial method override (or a preset name)
      pp: {}
      random-probe: {strategies: {select_probe: random}}
      wanda-sp: wanda-sp       # shorthand for {preset: wanda-sp}
    grid:                      # dotted method fields -> values; every variant runs at every point
      pruning.ratio: [0.2, 0.4]
    resources:                 # optional: per worker under `ppf ablate --launcher ray`
      cpus: 1

A variant that names a ``preset`` starts from that preset (keeping only the base method's
``pruning``) and carries that preset's description; otherwise it is merged onto the base method and
its description is the base method's plus a summary of the override. Every variant is validated,
strategies included, before any model or data is touched; errors name the variant (and the grid
point). Checks that need the model's ``config.json`` (skip layers, per-layer ratios, positions) run
in :mod:`ppframework.preflight` before the weights load, with the same names
(:attr:`AblationPlan.method_fields`).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from ppframework.config import (
    PRESETS,
    MethodConfig,
    RunConfig,
    StrictModel,
    _parse_override,
    apply_overrides,
    merge_method,
    parse_run_config,
    read_config_file,
    validation_message,
)
from ppframework.errors import ConfigError
from ppframework.registry import StrategyRegistry, default_registry


class WorkerResources(StrictModel):
    """What each worker asks the cluster for under ``ppf ablate --launcher ray`` (unused by ``local``)."""

    cpus: float = Field(1.0, gt=0, description="CPUs per worker (also its PyTorch thread count)")
    gpus: float = Field(0.0, ge=0, description="GPUs per worker (fractions share a GPU)")
    memory_gb: float | None = Field(None, gt=0, description="memory per worker in GiB (Ray schedules by it)")
    workers: int | None = Field(
        None, ge=1, description="workers to start (default: as many as the cluster's CPUs/GPUs allow)"
    )


class AblationFile(StrictModel):
    """The raw shape of an ablation file (variants and grid are expanded by :func:`load_ablation`)."""

    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict)
    variants: dict[str, dict[str, Any] | str | None]
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    resources: WorkerResources | None = None

    @field_validator("variants")
    @classmethod
    def _some(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not value:
            raise ValueError("name at least one variant, e.g. `pp: {}`")
        return value

    @field_validator("grid")
    @classmethod
    def _grid(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in value.items():
            if not values:
                raise ValueError(f"grid key {key!r} has no values")
        return value


@dataclass(frozen=True)
class AblationPoint:
    """One method of the ablation: the variant it came from and its grid coordinates."""

    variant: str
    grid: dict[str, Any]
    method: MethodConfig


@dataclass
class AblationPlan:
    """A validated ablation: the run config (all points as methods) and where each came from."""

    run: RunConfig
    points: list[AblationPoint]
    description: str = ""
    resources: WorkerResources | None = None
    """The file's ``resources`` section (None when it has none)."""

    @property
    def method_fields(self) -> list[str]:
        """How to name each method of :attr:`run` in messages: ``variants.<name>`` (+ the grid point)."""
        return [point_field(p.variant, p.grid) for p in self.points]


def point_field(variant: str, point: dict[str, Any]) -> str:
    """``variants.<variant>``, followed by ``at {grid point}`` when there is a grid."""
    return f"variants.{variant}" + (f" at {point}" if point else "")


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"grid.{dotted}: {part!r} is not a mapping in the method")
    node[parts[-1]] = copy.deepcopy(value)


def _has_path(data: dict[str, Any], dotted: str) -> bool:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _point_suffix(point: dict[str, Any]) -> str:
    """Grid values other than the ratio go into the method name (the label shows the ratio)."""
    extra = [f"{key.split('.')[-1]}={value}" for key, value in point.items() if key != "pruning.ratio"]
    return f" [{', '.join(extra)}]" if extra else ""


def _flatten(value: Any, prefix: str = "") -> list[str]:
    if isinstance(value, dict) and value:
        out: list[str] = []
        for key, item in value.items():
            out += _flatten(item, f"{prefix}.{key}" if prefix else str(key))
        return out
    return [f"{prefix}={value}"]


def _base_description(base_method: dict[str, Any]) -> str:
    if base_method.get("description"):
        return str(base_method["description"])
    preset = base_method.get("preset")
    return str(PRESETS[preset]["description"]) if preset in PRESETS else ""


def variant_method(base_method: dict[str, Any], override: dict[str, Any] | str | None) -> dict[str, Any]:
    """The raw method dict of one variant (see the module docstring for the merge and description rules)."""
    if override is None:
        override = {}
    if isinstance(override, str):
        override = {"preset": override}
    if "preset" in override:
        start = {"pruning": copy.deepcopy(base_method["pruning"])} if "pruning" in base_method else {}
        return merge_method(start, override)
    merged = merge_method(base_method, override)
    if "description" not in override:
        rest = {k: v for k, v in override.items() if k not in ("name", "description")}
        changes = _flatten(rest) if rest else []
        base = _base_description(base_method)
        summary = f"Base method with {', '.join(changes)}." if changes else ""
        merged["description"] = " ".join(part for part in (base, summary) if part)
    return merged


def expand(ablation: AblationFile) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(variant, grid point, raw method) for every grid point x variant, grid-major."""
    base_method = ablation.base.get("method", {"preset": "pp"})
    if isinstance(base_method, str):
        base_method = {"preset": base_method}
    keys = list(ablation.grid)
    points = [dict(zip(keys, values, strict=True)) for values in itertools.product(*ablation.grid.values())]
    for name, override in ablation.variants.items():
        for key in keys:
            if isinstance(override, dict) and _has_path(override, key):
                raise ConfigError(
                    f"variants.{name}.{key}: the grid also sets {key}, so this value would be ignored; "
                    "remove it from the variant or from the grid"
                )
    out = []
    for point in points or [{}]:
        for name, override in ablation.variants.items():
            method = variant_method(base_method, override)
            for key, value in point.items():
                _set_path(method, key, value)
            method["name"] = name + _point_suffix(point)
            out.append((name, point, method))
    return out


def _apply_grid_overrides(raw: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Apply the ``--set grid.KEY=[...]`` overrides, whose KEY is itself dotted (``pruning.ratio``), to
    a copy of ``raw``; return it and the other overrides (for :func:`apply_overrides`)."""
    rest: list[str] = []
    grid_values: dict[str, Any] = {}
    for text in overrides:
        path, value = _parse_override(text)
        if path[0] == "grid" and len(path) > 1:
            grid_values[".".join(path[1:])] = value
        else:
            rest.append(text)
    if not grid_values:
        return raw, rest
    data = copy.deepcopy(raw)
    grid = data.get("grid")
    data["grid"] = {**(grid if isinstance(grid, dict) else {}), **grid_values}
    return data, rest


def load_ablation(
    source: str | Path | dict[str, Any],
    overrides: list[str] | None = None,
    registry: StrategyRegistry | None = None,
) -> AblationPlan:
    """Read, expand and fully validate an ablation file (strategies included) without touching models."""
    raw = source if isinstance(source, dict) else read_config_file(source)
    raw, overrides = _apply_grid_overrides(raw, overrides or [])
    raw = apply_overrides(raw, overrides, default_methods=False) if overrides else raw
    try:
        ablation = AblationFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc)) from None
    if "methods" in ablation.base:
        raise ConfigError("base.methods: an ablation builds its methods from `variants`; use base.method")
    base = {k: v for k, v in ablation.base.items() if k != "method"}
    try:
        parse_run_config({**base, "methods": []})
    except ConfigError as exc:
        raise ConfigError("\n".join(f"base.{line}" for line in str(exc).splitlines())) from None
    registry = registry or default_registry()
    points: list[AblationPoint] = []
    for name, point, raw_method in expand(ablation):
        where = point_field(name, point)
        try:
            method = MethodConfig.model_validate(raw_method)
        except ValidationError as exc:
            lines = validation_message(exc).splitlines()
            raise ConfigError("\n".join(f"{where}: {line}" for line in lines)) from None
        registry.build_method(method, f"variants.{name}")
        points.append(AblationPoint(name, point, method))
    labels: dict[str, str] = {}
    for p in points:
        label, where = p.method.label, point_field(p.variant, p.grid)
        if label in labels:
            raise ConfigError(
                f"{where}: duplicate method labels [{label!r}] (also {labels[label]}); give each variant and "
                "grid point a distinct name or ratio"
            )
        labels[label] = where
    methods = [{**p.method.model_dump(), "preset": None} for p in points]  # already resolved
    run = parse_run_config({**base, "methods": methods})
    return AblationPlan(
        run=run, points=points, description=ablation.description, resources=ablation.resources
    )
