"""What can be read of a model without loading its weights (used by :mod:`ppframework.preflight`).

Its ``config.json`` and directory, found without the network, and checks of a config file and of a
``.safetensors`` file's header.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ppframework.models.errors import ModelError
from ppframework.models.gguf import cache_complete, default_cache_dir, gguf_cache_dir
from ppframework.models.presets import PRESETS, presets_text
from ppframework.models.sources import check_gguf_name, resolve_source

__all__ = ["ModelFiles", "check_safetensors_file", "find_model_files", "read_model_config"]


@dataclass(frozen=True)
class ModelFiles:
    """Files of a model readable without loading its weights.

    Attributes:
        config_file: its ``config.json``, or None when there is none yet (an unconverted GGUF file, a
            hub id not in the local cache).
        directory: the local Hugging Face directory (config, tokenizer, weights), or None.
        note: why ``config_file`` is None (for a log line).
        conversion_dir: where a GGUF file not converted yet will be converted to (else None).
    """

    config_file: Path | None
    directory: Path | None
    note: str = ""
    conversion_dir: Path | None = None


def find_model_files(
    name: str, gguf_file: str | None = None, cache_dir: str | Path | None = None
) -> ModelFiles:
    """Locate ``name``'s ``config.json`` and directory without loading weights or using the network.

    Raises :class:`ModelError` for a ``model.name`` / ``model.gguf_file`` that cannot work (the same
    checks :func:`~ppframework.models.load_model` makes first).
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelError(f"model.name={name!r} must be a preset ({presets_text()}), a path or a hub id")
    path = Path(name).expanduser()
    is_hub = name not in PRESETS and not path.exists()
    if is_hub and gguf_file is not None:
        check_gguf_name(gguf_file)
        return ModelFiles(None, None, f"GGUF file {gguf_file!r} of hub repo {name!r} is read when loading")
    if is_hub:
        resolve_source(name, None)  # checks the spelling of the id
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
        except Exception:  # an unusual id or cache layout: leave it to the loader
            cached = None
        if isinstance(cached, str) and Path(cached).is_file():
            return ModelFiles(Path(cached), None)
        return ModelFiles(None, None, f"hub model {name!r} is not in the local cache yet")
    source = resolve_source(name, gguf_file)
    if source.kind == "dir":
        directory = Path(source.location)
        return ModelFiles(directory / "config.json", directory)
    converted = gguf_cache_dir(Path(source.location), default_cache_dir(cache_dir))
    if cache_complete(converted):
        return ModelFiles(converted / "config.json", converted)
    return ModelFiles(
        None, None, f"{source.label} has not been converted yet (its config comes with it)", converted
    )


def read_model_config(config_file: Path) -> dict[str, Any]:
    """Read a model's ``config.json``; :class:`ModelError` naming the file if it is not a JSON mapping."""
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ModelError(f"model.name: {config_file} is not UTF-8 JSON ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"model.name: {config_file} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise ModelError(f"model.name: {config_file} cannot be read ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise ModelError(
            f"model.name: {config_file} must hold a JSON object (a mapping), not {type(data).__name__}"
        )
    return data


def check_safetensors_file(path: Path) -> None:
    """Check a ``.safetensors`` file's header and size without reading its tensors.

    Raises :class:`ModelError` naming the file when it is empty, truncated or not safetensors.
    """
    problem = None
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length <= 0 or 8 + length > size:
                problem = f"{size} bytes, too short for its header"
            else:
                header = json.loads(handle.read(length).decode("utf-8"))
                ends = [
                    int(v["data_offsets"][1])
                    for k, v in header.items()
                    if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v
                ]
                need = 8 + length + max(ends, default=0)
                if need > size:
                    problem = f"truncated: {size} bytes, its header describes {need}"
    except (OSError, ValueError, UnicodeDecodeError, AttributeError, TypeError, KeyError, IndexError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        raise ModelError(
            f"model.name: weights file {path} is damaged or not safetensors ({problem}); re-save or "
            "re-download the model"
        )
