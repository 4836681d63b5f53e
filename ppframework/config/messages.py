"""Readable validation errors: one line per problem, each naming its field (``methods[0].pruning.ratio``)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


def format_location(loc: tuple[Any, ...]) -> str:
    """``('methods', 0, 'pruning', 'ratio')`` -> ``methods[0].pruning.ratio``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"


def prefix_lines(prefix: str, message: str) -> str:
    """``message`` with ``prefix`` put before each of its lines (errors of a nested part, named by it)."""
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
