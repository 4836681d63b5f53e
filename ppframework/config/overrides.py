"""``--set KEY=VALUE`` overrides: values parsed as YAML, applied to a raw config dict by dotted path."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from ppframework.errors import ConfigError


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split one ``--set KEY=VALUE`` into the dotted path of KEY and VALUE parsed as YAML."""
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
        path, value = parse_override(text)
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
