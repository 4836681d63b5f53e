"""Reading YAML/JSON config files and validating raw dicts into configs, every problem a
:class:`~ppframework.errors.ConfigError` naming its field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ppframework.config.messages import validation_message
from ppframework.config.method import MethodConfig
from ppframework.config.run import RunConfig
from ppframework.errors import ConfigError


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
