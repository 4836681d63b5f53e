"""Resolving ``model.name`` (and ``model.gguf_file``) to what it names: a GGUF file, a directory or a hub id.

A preset wins, then an existing local path, then a Hugging Face hub id; a GGUF file named inside a hub
repository is fetched from the hub (or its local cache) here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ppframework.models.errors import ModelError
from ppframework.models.presets import PRESETS, presets_text

__all__ = ["Source", "check_gguf_name", "resolve_source"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass(frozen=True)
class Source:
    """Where a model's files are.

    Attributes:
        kind: ``gguf`` (a local ``.gguf`` file), ``dir`` (a local Hugging Face directory) or ``hub``.
        location: the ``.gguf`` path, the directory, or the hub id.
        label: how to describe it in logs.
    """

    kind: Literal["gguf", "dir", "hub"]
    location: str  # a .gguf path, a directory, or a hub id
    label: str  # how to describe it in logs


def check_gguf_name(gguf_file: str) -> None:
    """:class:`ModelError` unless ``model.gguf_file`` names a ``.gguf`` file."""
    if not gguf_file.strip() or not gguf_file.endswith(".gguf"):
        raise ModelError(f"model.gguf_file={gguf_file!r} must be the name of a .gguf file (or left unset)")


def resolve_source(name: str, gguf_file: str | None) -> Source:
    """What ``model.name`` / ``model.gguf_file`` name; :class:`ModelError` when they name nothing usable."""
    if gguf_file is not None:
        check_gguf_name(gguf_file)
    if name in PRESETS:
        if gguf_file is not None:
            raise ModelError(
                f"model.gguf_file={gguf_file!r} cannot be combined with the preset model.name={name!r}, "
                "which fixes its own file; leave model.gguf_file unset"
            )
        path = PRESETS[name].locate(name)
        return Source("gguf", str(path), f"preset {name!r} ({path})")

    path = Path(name).expanduser()
    if path.is_dir():
        return _resolve_directory(name, path, gguf_file)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(
                f"model.name={name!r} is a file but not a .gguf file; give a model directory, a .gguf file, "
                f"a hub id or a preset ({presets_text()})"
            )
        if gguf_file is not None and gguf_file != path.name:
            raise ModelError(
                f"model.gguf_file={gguf_file!r} conflicts with model.name={name!r}, which already is a .gguf "
                "file; leave model.gguf_file unset"
            )
        return Source("gguf", str(path.resolve()), f"GGUF file {path.resolve()}")

    looks_like_path = name.startswith(("/", ".", "~")) or name.endswith(".gguf") or name.count("/") > 1
    if looks_like_path or not _HUB_ID.match(name):
        raise ModelError(
            f"model.name={name!r} is not a preset ({presets_text()}), an existing directory or .gguf file, "
            "or a Hugging Face hub id; check the path"
        )
    if gguf_file is not None:
        local = _hub_gguf_file(name, gguf_file)
        return Source("gguf", str(local), f"GGUF file {gguf_file!r} of hub repo {name!r} ({local})")
    return Source("hub", name, f"hub id {name!r}")


def _resolve_directory(name: str, path: Path, gguf_file: str | None) -> Source:
    if gguf_file is not None:
        candidate = path / gguf_file
        if not candidate.is_file():
            found = sorted(p.name for p in path.glob("*.gguf"))
            raise ModelError(
                f"model.gguf_file={gguf_file!r} does not exist in model.name={name!r}; "
                f".gguf files there: {', '.join(found) or 'none'}"
            )
        resolved = candidate.resolve()
        return Source("gguf", str(resolved), f"GGUF file {resolved}")
    if (path / "config.json").is_file():
        resolved = path.resolve()
        return Source("dir", str(resolved), f"directory {resolved}")
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        resolved = ggufs[0].resolve()
        return Source("gguf", str(resolved), f"GGUF file {resolved}")
    if len(ggufs) > 1:
        raise ModelError(
            f"model.name={name!r} holds several .gguf files; choose one with model.gguf_file "
            f"({', '.join(p.name for p in ggufs)})"
        )
    raise ModelError(
        f"model.name={name!r} is a directory without config.json or a .gguf file; point it at a Hugging "
        "Face model directory (as written by save_pretrained), a .gguf file, a hub id or a preset "
        f"({presets_text()})"
    )


def _hub_gguf_file(repo_id: str, gguf_file: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=gguf_file))
    except Exception as exc:  # offline misses, 404s, auth: all mean "cannot get it here"
        raise ModelError(
            f"model.name={repo_id!r} / model.gguf_file={gguf_file!r} could not be fetched from the hub or "
            f"its local cache ({type(exc).__name__}: {exc}); download it to a local directory, or use a "
            f"preset ({presets_text()})"
        ) from exc
