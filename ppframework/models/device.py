"""Turning ``model.device`` and ``model.dtype`` into a :class:`torch.device` and a :class:`torch.dtype`."""

from __future__ import annotations

import re

import torch

from ppframework.models.errors import ModelError

__all__ = ["DEVICE_CHOICES", "DTYPE_CHOICES", "resolve_device", "resolve_dtype"]

#: Valid values of ``model.dtype``; ``auto`` is float32 on CPU and float16 on CUDA.
DTYPE_CHOICES: tuple[str, ...] = ("auto", "float32", "float16", "bfloat16")
#: Valid forms of ``model.device``; ``auto`` is ``cuda`` when available, else ``cpu``.
DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda", "cuda:N")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``model.device`` into a :class:`torch.device`.

    ``auto`` picks ``cuda`` when available, else ``cpu``; ``cpu``, ``cuda`` and ``cuda:N`` are accepted.
    Raises :class:`ModelError` for anything else or for a CUDA device that is not available.
    """
    text = str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise ModelError(f"model.device={device!r} is not valid; choose one of {', '.join(DEVICE_CHOICES)}")
    if not torch.cuda.is_available():
        raise ModelError(
            f"model.device={device!r} but CUDA is not available here (torch {torch.__version__}); "
            "use model.device='cpu' or 'auto'"
        )
    if match.group(1) is not None:
        index = int(match.group(1))
        count = torch.cuda.device_count()
        if index >= count:
            raise ModelError(
                f"model.device={device!r} but only {count} CUDA device(s) exist (cuda:0..cuda:{count - 1})"
            )
        return torch.device("cuda", index)
    return torch.device("cuda")


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """Turn ``model.dtype`` into a :class:`torch.dtype` (``auto``: float32 on CPU, float16 on CUDA).

    Raises :class:`ModelError` listing :data:`DTYPE_CHOICES` for anything else.
    """
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
        raise ModelError(f"model.dtype={dtype} is not supported; choose one of {', '.join(DTYPE_CHOICES)}")
    text = str(dtype).strip().lower()
    if text == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if text not in _DTYPES:
        raise ModelError(f"model.dtype={dtype!r} is not valid; choose one of {', '.join(DTYPE_CHOICES)}")
    return _DTYPES[text]
