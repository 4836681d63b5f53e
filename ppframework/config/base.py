"""The base of every config model (unknown fields are errors, assignments are validated) and the
check for values listed twice that several models share."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base for every config model: unknown fields are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def repeated(values: list[Any]) -> list[Any]:
    """The values that ``values`` lists more than once, each once, sorted."""
    return sorted({v for v in values if values.count(v) > 1})


def refuse_repeats(values: list[Any], what: str) -> None:
    """Raise ``ValueError("<what> [...] listed twice")`` when ``values`` lists a value more than once."""
    duplicates = repeated(values)
    if duplicates:
        raise ValueError(f"{what} {duplicates} listed twice")
