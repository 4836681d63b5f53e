"""Writing a benchmark's report: its JSON and its markdown side by side in one folder, the markdown
also printed (shared by ``speed.py``, ``ab_speed.py`` and ``block_reuse.py``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_report(
    out: Path,
    stem: str,
    report: dict[str, Any],
    to_markdown: Callable[[dict[str, Any]], str],
    json_default: Callable[[Any], Any] | None = None,
) -> str:
    """Write ``report`` to ``out/<stem>.json`` (``json_default``: how to write what JSON cannot), then
    ``to_markdown(report)`` to ``out/<stem>.md`` (creating ``out``); print the markdown and return it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=json_default))
    markdown = to_markdown(report)
    (out / f"{stem}.md").write_text(markdown + "\n")
    print(markdown)
    return markdown
