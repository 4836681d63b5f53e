"""Result files: strict JSON, atomic writes, output-folder checks and the per-folder run lock.

* Every file is written to a temporary file in the same folder and moved into place with
  :func:`os.replace`, so a reader (or a crash) never sees half a file.
* :func:`strict_json` maps NaN and +-inf to ``null`` and refuses anything else a strict JSON
  parser would reject (``allow_nan=False``).
* :func:`check_out_dir` tells, before any work, whether a folder can receive results.
* :func:`hold_out_dir` holds ``<out>/.ppf.lock`` (``fcntl.flock``) while a command runs, so a second
  run on the same folder is refused instead of silently overwriting the first one's files. The lock
  is re-entrant within one process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ppframework.errors import ConfigError

try:  # POSIX only; elsewhere the lock is skipped with a log line
    import fcntl
except ImportError:  # pragma: no cover - not on the CI platforms
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

LOCK_NAME = ".ppf.lock"
"""The lock file held in an output folder while a command writes to it."""

_held: dict[Path, tuple[int, Any]] = {}  # resolved folder -> (depth, open lock file)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-inf) replaced by ``None``, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def strict_json(value: Any, indent: int | None = 2) -> str:
    """Strictly valid JSON text of ``value`` (non-finite floats become ``null``; other objects ``str``)."""
    return json.dumps(json_safe(value), indent=indent, allow_nan=False, default=str)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and :func:`os.replace`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write_bytes` of UTF-8 ``text``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, value: Any) -> Path:
    """Atomically write ``value`` as strict JSON (see :func:`strict_json`)."""
    return atomic_write_text(path, strict_json(value) + "\n")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that needs a file name (e.g. a plot);
    on success it is moved onto ``path``, on failure removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


RESULT_FILES: tuple[str, ...] = (
    "results.json",
    "results.csv",
    "results.md",
    "generations.jsonl",
    "results.partial.json",
    "results.partial.csv",
    "results.partial.md",
    "results.partial.generations.jsonl",
)
"""The report files a command writes into ``--out`` (each must be a file or absent, never a folder)."""


def check_out_dir(out_dir: str | Path, field: str = "--out", files: Sequence[str] = RESULT_FILES) -> Path:
    """Check that ``out_dir`` is (or can become) a writable folder; return it.

    Nothing is created. Raises :class:`ConfigError` naming ``field`` and the folder when it is an
    existing file, lies under a file, or is not writable, or when one of ``files`` (the report files
    written at the end of a run) exists in it as a folder.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{field}: {str(out)!r} is an existing file, not a folder; choose a folder")
    for name in files:
        if (out / name).is_dir():
            raise ConfigError(
                f"{field}: {out / name} is a folder, so the results cannot be written there; move or "
                "remove it, or choose another output folder"
            )
    probe = out
    while not probe.exists():
        parent = probe.parent
        if parent == probe:
            break
        probe = parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{field}: {str(out)!r} cannot be created: {str(probe)!r} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        if probe == out:
            raise ConfigError(f"{field}: folder {str(out)!r} is not writable; choose a writable folder")
        raise ConfigError(
            f"{field}: folder {str(out)!r} cannot be created: {str(probe)!r} is not writable; choose a "
            "writable folder"
        )
    return out


def folder_problem(folder: str | Path) -> str | None:
    """Why files cannot be written into ``folder`` (created if needed), or None when they can."""
    try:
        check_out_dir(folder, "folder", files=())
    except ConfigError as exc:
        return str(exc).removeprefix("folder: ")
    return None


@contextmanager
def hold_out_dir(out_dir: str | Path, field: str = "--out") -> Iterator[Path]:
    """Create ``out_dir`` and hold its lock file for the duration of the block.

    Raises :class:`ConfigError` naming the folder when another process holds it. Re-entrant in
    one process (a nested hold of the same folder is a no-op). A folder this call created is removed
    again when the block raises before anything but the lock file was written into it.
    """
    out = check_out_dir(out_dir, field)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{field}: folder {str(out)!r} cannot be created ({exc})") from None
    key = out.resolve()
    if key in _held:
        depth, handle = _held[key]
        _held[key] = (depth + 1, handle)
        try:
            yield out
        finally:
            depth, handle = _held[key]
            _held[key] = (depth - 1, handle)
        return
    lock_path = key / LOCK_NAME
    try:
        handle = open(lock_path, "a+")  # noqa: SIM115 - held open across the block
    except OSError as exc:
        raise ConfigError(f"{field}: cannot create the lock file {str(lock_path)!r} ({exc})") from None
    if fcntl is not None:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise ConfigError(
                f"{field}: another ppf command is writing to {str(out)!r} (it holds {str(lock_path)!r}); "
                "wait for it to finish or choose another output folder"
            ) from None
    else:  # pragma: no cover
        logger.info("no fcntl here: %s is not locked against concurrent runs", out)
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
    except OSError:
        pass
    _held[key] = (1, handle)
    failed = True
    try:
        yield out
        failed = False
    finally:
        del _held[key]
        if failed and created and [p.name for p in key.iterdir()] == [LOCK_NAME]:
            try:
                lock_path.unlink()
                key.rmdir()
            except OSError:
                pass
        handle.close()  # releases the flock; the lock file stays, harmlessly


RESULTS_STEM = "results"
PARTIAL_STEM = "results.partial"
"""Where a partial report goes while ``results.json`` holds a complete one (see :func:`results_stem`)."""


def holds_complete_results(out_dir: str | Path) -> bool:
    """Whether ``out_dir/results.json`` is a finished run's (readable, ``complete`` true)."""
    path = Path(out_dir) / f"{RESULTS_STEM}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("complete") is True


def results_stem(out_dir: str | Path, complete: bool) -> str:
    """The name (without extension) a report is written under: ``results``, or ``results.partial``
    for a partial report while ``results.json`` holds complete ones, so an interrupted or failing
    re-run never replaces finished results with fewer."""
    if not complete and holds_complete_results(out_dir):
        return PARTIAL_STEM
    return RESULTS_STEM


def remove_partial_results(out_dir: str | Path) -> None:
    """Remove ``results.partial.*`` (once a complete report is written)."""
    for path in Path(out_dir).glob(f"{PARTIAL_STEM}.*"):
        try:
            path.unlink()
        except OSError as exc:
            logger.warning("could not remove the partial results %s: %s", path, exc)
