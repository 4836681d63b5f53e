"""Export folders: checked before any work, written whole or not at all, verified by hash on load.

:func:`staged_folder` writes into a temporary folder beside the target and renames it into place
only when everything was written, so a crash or an error never leaves half an export. Every file is
listed in ``ppf_manifest.json`` with its size and SHA-256; :func:`verify_folder` refuses a folder
whose files are missing (a missing shard), shorter or longer than written (truncated), or changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ppframework.export.errors import ExportError
from ppframework.outputs import atomic_write_text, check_out_dir

MANIFEST = "ppf_manifest.json"
"""The file listing every other file of an export folder with its size and SHA-256."""


def check_target(out: str | Path, field: str = "--out") -> Path:
    """Refuse, before any work, a target that exists and is not an empty folder, or cannot be written."""
    path = check_out_dir(out, field, files=())
    if path.is_dir() and any(path.iterdir()):
        raise ExportError(
            f"{field}: folder {str(path)!r} is not empty; an export is written into a new or empty folder "
            "(choose another folder or remove this one)"
        )
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, kind: str) -> dict[str, Any]:
    """List every file under ``folder`` (size, SHA-256) in ``ppf_manifest.json``; return the listing."""
    files = {
        path.relative_to(folder).as_posix(): {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    manifest = {"kind": kind, "files": files}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


@contextmanager
def staged_folder(out: str | Path, field: str, kind: str) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success list it (:func:`write_manifest`) and rename
    it to ``out``; on any error remove it (``out`` is left as it was)."""
    target = check_target(out, field)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=parent))
    except OSError as exc:
        raise ExportError(
            f"{field}: cannot write beside {str(target)!r} ({exc}); choose a writable folder"
        ) from None
    try:
        yield tmp
        write_manifest(tmp, kind)
        os.chmod(tmp, 0o755)
        if target.is_dir():
            target.rmdir()  # empty (checked); fails if something appeared meanwhile
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def verify_folder(folder: str | Path, kind: str) -> Path:
    """Check ``folder`` against its manifest; :class:`ExportError` naming the first bad file."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ExportError(f"{str(path)!r}: no such folder")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(
            f"{str(path)!r}: no readable {MANIFEST} ({type(exc).__name__}); not a ppframework export, "
            "or damaged"
        ) from None
    if manifest.get("kind") != kind:
        raise ExportError(f"{str(path)!r}: holds a {manifest.get('kind')!r}, not a {kind!r}")
    for name, entry in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise ExportError(f"{str(path)!r}: file {name!r} is missing (a missing shard?); export again")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise ExportError(
                f"{str(path)!r}: file {name!r} has {size} bytes, {entry['bytes']} were written (truncated "
                "or damaged); export again"
            )
        if _sha256(file) != entry["sha256"]:
            raise ExportError(f"{str(path)!r}: file {name!r} fails its SHA-256 check (modified or damaged)")
    return path
