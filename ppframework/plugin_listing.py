"""What ``ppf plugins`` shows: each plugin distribution, its version, strategies and load error."""

from __future__ import annotations

import importlib.metadata
from typing import Any

from ppframework.hookspecs import STAGES
from ppframework.registry import (
    BUILTIN_SOURCE,
    LOAD_PLUGINS_ENV,
    PluginReport,
    StrategyRegistry,
    plugin_filter,
)


def _builtin_version() -> str:
    try:
        return importlib.metadata.version("ppframework")
    except importlib.metadata.PackageNotFoundError:
        return ""


def group_by_stage(strategies: list[tuple[str, str]]) -> dict[str, list[str]]:
    """``{stage: [names]}`` in pipeline stage order, names in registration order; empty stages left out."""
    grouped: dict[str, list[str]] = {stage: [] for stage in STAGES}
    for stage, name in strategies:
        grouped.setdefault(stage, []).append(name)
    return {stage: names for stage, names in grouped.items() if names}


def format_strategies(strategies: list[tuple[str, str]]) -> str:
    """``"select_probe: variance; score_channels: ppsp-l1"`` (``-`` when there are none)."""
    grouped = group_by_stage(strategies)
    return "; ".join(f"{stage}: {', '.join(names)}" for stage, names in grouped.items()) or "-"


def _row(report: PluginReport) -> dict[str, Any]:
    builtin = report.name == BUILTIN_SOURCE
    return {
        "distribution": report.name,
        "version": report.version or (_builtin_version() if builtin else ""),
        "builtin": builtin,
        "stages": group_by_stage(report.strategies),
        "strategies": format_strategies(report.strategies),
        "error": report.error,
    }


def plugin_rows(registry: StrategyRegistry) -> list[dict[str, Any]]:
    """One dict per loaded (or failed) plugin distribution, built-ins first, then in load order.

    Keys: ``distribution``, ``version``, ``builtin`` (bool), ``stages`` (``{stage: [names]}``),
    ``strategies`` (the same as one display string) and ``error`` (None when it loaded).
    """
    rows = [_row(report) for report in registry.plugins]
    return sorted(rows, key=lambda row: not row["builtin"])  # stable: keeps load order otherwise


def filter_line(registry: StrategyRegistry | None = None) -> str | None:
    """A sentence describing ``PPF_LOAD_PLUGINS`` when it is set, else None.

    With a ``registry`` whose entry points were loaded, the filter it was built with is described
    and the installed distributions it hid are named.
    """
    allowed = registry.plugin_filter if registry is not None and registry.plugin_filter is not None else None
    if allowed is None:
        allowed = plugin_filter()
    if allowed is None:
        return None
    if not allowed:
        line = f"{LOAD_PLUGINS_ENV} is empty: no third-party plugins are loaded"
    else:
        line = f"{LOAD_PLUGINS_ENV}={','.join(sorted(allowed))}: only these plugin distributions are loaded"
    hidden = registry.hidden_plugins if registry is not None else []
    if hidden:
        line += f" (hidden: {', '.join(hidden)})"
    return line


def format_plugins(registry: StrategyRegistry) -> str:
    """A plain-text table of :func:`plugin_rows`, plus the ``PPF_LOAD_PLUGINS`` filter when set.

    Columns are distribution, version and strategies; a load error is printed on its own line
    under the plugin's row, as ``error: ...`` (multi-line errors stay indented).
    """
    rows = plugin_rows(registry)
    table = [["distribution", "version", "strategies"]]
    table += [[row["distribution"], row["version"] or "-", row["strategies"]] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(2)]
    indent = " " * (sum(widths) + 4)
    lines = []
    for i, line in enumerate(table):
        lines.append(f"{line[0].ljust(widths[0])}  {line[1].ljust(widths[1])}  {line[2]}".rstrip())
        error = rows[i - 1]["error"] if i else None
        if error:
            first, *rest = error.splitlines()
            lines.append(f"{indent}error: {first}")
            lines += [f"{indent}       {more}" for more in rest]
    note = filter_line(registry)
    if note:
        lines += ["", note]
    return "\n".join(lines)
