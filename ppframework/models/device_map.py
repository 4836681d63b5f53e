"""``model.device_map``: checking a device map and its companions, and describing where it put a model.

The settings are handed to ``from_pretrained`` (accelerate places the model); this module checks them
against this machine and the loaded model, and says which device decides ``dtype: auto``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from ppframework.config import ModelConfig, validation_message
from ppframework.models.errors import ModelError

__all__ = [
    "check_map_covers",
    "describe_map",
    "device_map_main_device",
    "placement_kwargs",
    "placement_problem",
    "shorten",
]

_PLACEMENT_WORDS = ("device_map", "device map", "offload", "max_memory", "disk", "dispatch", "meta device")


def shorten(text: str, limit: int = 400) -> str:
    """``text`` cut to at most ``limit`` characters (ending in `` ...`` when cut), for error messages."""
    return text if len(text) <= limit else text[: limit - 5].rstrip(", ") + " ..."


def placement_problem(message: str) -> bool:
    """Whether a loading error's ``message`` is about placing the model (device map, offloading)."""
    text = message.lower()
    return any(word in text for word in _PLACEMENT_WORDS)


def _check_gpu(module: str, index: int) -> None:
    """A device-map entry naming GPU ``index`` needs that GPU on this machine."""
    label = f"model.device_map[{module!r}]={index!r}"
    if not torch.cuda.is_available():
        raise ModelError(
            f"{label} names a GPU but CUDA is not available here (torch {torch.__version__}); map it to cpu "
            "(or disk)"
        )
    count = torch.cuda.device_count()
    if index >= count:
        raise ModelError(f"{label} but only {count} CUDA device(s) exist (0..{count - 1})")


def placement_kwargs(
    device: str,
    device_map: str | dict[str, int | str] | None,
    max_memory: dict[int | str, int | str] | None,
    offload_folder: str | Path | None,
) -> dict[str, Any] | None:
    """The ``from_pretrained`` keywords of a device map (None without one).

    The settings are checked by :class:`~ppframework.config.ModelConfig` itself (for callers that skip
    the config), then against this machine (the GPUs a mapping names must exist).
    """
    if device_map is None and max_memory is None and offload_folder is None:
        return None
    try:
        checked = ModelConfig(
            device=str(device).strip().lower(),
            device_map=device_map,
            max_memory=max_memory,
            offload_folder=None if offload_folder is None else str(offload_folder),
        )
    except ValidationError as exc:
        lines = validation_message(exc).splitlines()  # field errors name `device_map`, not `model.device_map`
        named = [line if line.startswith("model.") else f"model.{line}" for line in lines]
        raise ModelError("\n".join(named)) from None
    assert checked.device_map is not None  # max_memory / offload_folder without a map were refused
    kwargs: dict[str, Any] = {"device_map": checked.device_map}
    if isinstance(checked.device_map, dict):
        for module, value in checked.device_map.items():
            if isinstance(value, int):
                _check_gpu(module, value)
    elif checked.max_memory is not None:
        kwargs["max_memory"] = dict(checked.max_memory)
    if offload_folder is not None:
        folder = Path(offload_folder).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ModelError(
                f"model.offload_folder={str(offload_folder)!r} cannot be created ({exc.strerror or exc})"
            ) from None
        kwargs["offload_folder"] = str(folder)
    return kwargs


def check_map_covers(model: torch.nn.Module, device_map: dict[str, int | str]) -> None:
    """A mapping must place every parameter and buffer: transformers would silently put the rest on the
    CPU, without the hooks that move activations between devices. An entry that names no module,
    parameter or buffer of the model (a typo) is refused too: transformers would ignore it."""
    keys = list(device_map)
    known = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    known |= {n for n, _ in model.named_buffers()}
    for key in keys:
        if key not in known:
            top = sorted({n.split(".")[0] for n in known if n})
            raise ModelError(
                f"model.device_map[{key!r}]: the model has no module, parameter or buffer of that name; "
                f"its top-level modules are {', '.join(top)} (use dotted names such as model.layers.0)"
            )
    if "" in keys:
        return
    missing: list[str] = []
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    for tensor_name in names:
        if any(tensor_name == k or tensor_name.startswith(k + ".") for k in keys):
            continue
        parts = tensor_name.split(".")
        for depth in range(1, len(parts) + 1):  # the outermost module no key lies inside
            prefix = ".".join(parts[:depth])
            if not any(k == prefix or k.startswith(prefix + ".") for k in keys):
                break
        if prefix not in missing:
            missing.append(prefix)
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise ModelError(
            f"model.device_map does not place {shown}; map every top-level module, or use "
            "model.device_map: auto"
        )


def device_map_main_device(device_map: str | dict[str, int | str]) -> torch.device:
    """The device that decides ``dtype: auto`` for a device map: the first GPU it uses (a computed map:
    CUDA when available), else CPU."""
    if isinstance(device_map, str):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpus = [value for value in device_map.values() if isinstance(value, int)]
    return torch.device("cuda", gpus[0]) if gpus else torch.device("cpu")


def describe_map(device_map: dict[str, Any] | None) -> str:
    """``{device: module count}`` of a loaded model's ``hf_device_map``, for the log."""
    if not device_map:
        return "(none)"
    counts: dict[str, int] = {}
    for value in device_map.values():
        counts[str(value)] = counts.get(str(value), 0) + 1
    return ", ".join(f"{device}: {count} module(s)" for device, count in counts.items())
