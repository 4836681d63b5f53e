"""The ``model`` section: which model to load, in which dtype, and on which device(s) or device map."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ppframework.config.base import StrictModel

DEVICE_MAP_STRATEGIES: tuple[str, ...] = ("auto", "balanced", "balanced_low_0", "sequential")
"""``model.device_map`` strings: accelerate computes the map (``max_memory`` caps each device)."""

_MEMORY_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([GMK])(I?)B\s*$", re.IGNORECASE)


def _device_name(value: Any) -> int | str | None:
    """A device of a device map in accelerate's spelling (GPU index int, ``cpu``, ``disk``), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    if text.isdigit():
        return int(text)
    if text in ("cpu", "disk"):
        return text
    if text == "cuda":
        return 0
    if text.startswith("cuda:") and text[5:].isdigit():
        return int(text[5:])
    return None


class ModelConfig(StrictModel):
    """Which model to load and where to run it."""

    name: str = Field("smollm2-135m", description="preset name, HF id, local directory or .gguf path")
    gguf_file: str | None = Field(None, description="GGUF file name inside `name` (a directory or hub id)")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    cache_dir: str | None = Field(None, description="where converted models are cached")
    device_map: str | dict[str, int | str] | None = Field(
        None,
        description="spread the model over devices through accelerate (docs/device-map.md): auto, balanced, "
        "balanced_low_0 or sequential, or a mapping of every top-level module (model.embed_tokens, "
        "model.layers.3, lm_head, ...; '' alone: the whole model) to a GPU index, cuda:N, cpu or disk; "
        "leaves model.device at auto",
    )
    max_memory: dict[int | str, int | str] | None = Field(
        None,
        description="most memory accelerate may use per device when it computes model.device_map: GPU index "
        "(or cuda:N), cpu or disk to bytes or a size such as 20GiB",
    )
    offload_folder: str | None = Field(
        None,
        description="folder for weights a device map offloads to disk when they must be re-saved (weights "
        "not in safetensors format); safetensors weights are read where they are",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"unknown device {value!r}; choose auto, cpu, cuda or cuda:N")

    @field_validator("device_map", mode="before")
    @classmethod
    def _device_map(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            if value not in DEVICE_MAP_STRATEGIES:
                raise ValueError(
                    f"unknown device map {value!r}; choose {', '.join(DEVICE_MAP_STRATEGIES)}, or give a "
                    "mapping of module names to devices (a GPU index, cuda:N, cpu or disk)"
                )
            return value
        if not isinstance(value, dict):
            return value  # pydantic reports the type
        if not value:
            raise ValueError(
                "is an empty mapping; map module names to devices, or leave model.device_map unset"
            )
        if "" in value and len(value) > 1:
            raise ValueError(
                "'' (the whole model) cannot be combined with other entries (accelerate cannot dispatch "
                "that); map each top-level module (e.g. model.embed_tokens, model.layers.0, ..., model.norm, "
                "lm_head), or use auto"
            )
        mapping: dict[str, int | str] = {}
        for module, device in value.items():
            if not isinstance(module, str):
                raise ValueError(
                    f"key {module!r} is not a module name; keys are module names such as 'model.layers.3' "
                    "('' for the whole model)"
                )
            name = _device_name(device)
            if name is None:
                raise ValueError(
                    f"module {module!r} maps to {device!r}; use a GPU index (0, 1, ...), cuda:N, cpu or disk"
                )
            mapping[module] = name
        return mapping

    @field_validator("max_memory", mode="before")
    @classmethod
    def _max_memory(cls, value: Any) -> Any:
        if value is None or not isinstance(value, dict):
            return value
        if not value:
            raise ValueError("is an empty mapping; give a size per device, or leave model.max_memory unset")
        limits: dict[int | str, int | str] = {}
        for device, size in value.items():
            name = _device_name(device)
            if name is None:
                raise ValueError(f"device {device!r} is not a GPU index (0, 1, ...), cuda:N, cpu or disk")
            if isinstance(size, bool) or not isinstance(size, int | str):
                raise ValueError(f"{device!r}: {size!r} is not a size; give bytes or a size such as '20GiB'")
            if isinstance(size, int):
                if size <= 0:
                    raise ValueError(f"{device!r}: {size} bytes must be positive")
                limits[name] = size
                continue
            match = _MEMORY_SIZE.match(size)
            if match is None or float(match.group(1)) <= 0:
                raise ValueError(
                    f"{device!r}: {size!r} is not a size; give bytes or a positive number with GiB, MiB, "
                    "KiB, GB, MB or KB (e.g. '20GiB')"
                )
            number, unit, binary = match.groups()
            limits[name] = f"{number}{unit.upper()}{'i' if binary else ''}B"
        return limits

    @model_validator(mode="after")
    def _placement(self) -> ModelConfig:
        device_map = self.device_map
        if device_map is not None and self.device != "auto":
            raise ValueError(
                f"model.device={self.device!r} conflicts with model.device_map, which places every module "
                "itself; leave model.device at 'auto' (or unset model.device_map)"
            )
        if self.max_memory is not None:
            if device_map is None:
                raise ValueError(
                    "model.max_memory needs model.device_map: it caps what accelerate puts on each device "
                    "when it computes the map; set model.device_map to one of "
                    f"{', '.join(DEVICE_MAP_STRATEGIES)}"
                )
            if isinstance(device_map, dict):
                raise ValueError(
                    "model.max_memory only applies to a computed model.device_map "
                    f"({', '.join(DEVICE_MAP_STRATEGIES)}); an explicit mapping already places every module, "
                    "so remove model.max_memory"
                )
        if self.offload_folder is not None and device_map is None:
            raise ValueError(
                "model.offload_folder needs model.device_map (it holds the weights a device map offloads to "
                "disk); set model.device_map or remove model.offload_folder"
            )
        return self
