"""Merging a method override onto a base method dict (presets, ablation variants).

Plain dicts in, plain dicts out: nothing here validates; :class:`~ppframework.config.MethodConfig` does.
"""

from __future__ import annotations

import copy
from typing import Any


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
