"""Values under check: short descriptions for failure messages, snapshots, copies and comparisons."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


def _fmt(value: Any) -> str:
    """A short description of a value for failure messages."""
    if isinstance(value, torch.Tensor):
        head = f"tensor(shape={tuple(value.shape)}, dtype={value.dtype}"
        if value.numel() <= 24:
            return f"{head}, values={value.detach().cpu().tolist()})"
        return head + ")"
    if isinstance(value, (list, tuple)) and len(value) > 24:
        return f"{type(value).__name__} of {len(value)}"
    return repr(value)


def _snapshot(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in values.items()}


def _fields(obj: Any, prefix: str) -> dict[str, Any]:
    """The tensor-or-None fields of a dataclass, keyed ``prefix.field``."""
    if obj is None:
        return {}
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return {
        f"{prefix}.{name}": value
        for name, value in values.items()
        if value is None or isinstance(value, torch.Tensor)
    }


def _cloned(obj: Any) -> Any:
    """A copy of a dataclass with its tensor fields cloned."""
    tensors = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return dataclasses.replace(
        obj, **{k: v.clone() for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    )


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.equal(a.detach().cpu(), b.detach().cpu())
    return a == b
