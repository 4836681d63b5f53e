"""The point store: every finished point of a run, kept under the key of its resolved settings.

A *point* is dense or one method of a run config. Its key is a hash of everything that decides its
result (model, data, calibration, seed and, for a method, the whole resolved method, plus the
store format and the ppframework version) and nothing that does not (output folder, progress bars,
cache folders, notes). ``ppf ablate --out DIR`` keeps ``DIR/points/<key>.json`` for every point it
finishes, so running the same file again reuses them and only runs what is missing: a crash or an
interrupt loses at most the points that were running. ``--rerun`` runs everything again.

A failed point is stored too (its error shows in the table), but it is never reused: a re-run
tries it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ppframework.config import RunConfig
from ppframework.errors import ConfigError
from ppframework.outputs import strict_json, write_json
from ppframework.runner.results import DamagedRecord, MethodResult, row_from_json, shown

logger = logging.getLogger(__name__)

STORE_FORMAT = 1
"""Version of the stored record layout; part of every key, so a new layout never reuses old points."""

POINTS_FOLDER = "points"
"""The store's folder inside ``--out``."""


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("ppframework")
    except Exception:  # not installed as a distribution (e.g. a source tree on sys.path)
        return "unknown"


def run_identity(cfg: RunConfig) -> dict[str, Any]:
    """The settings shared by every point of ``cfg`` that decide results (see the module docstring)."""
    dumped = cfg.model_dump(mode="json", exclude={"methods", "out_dir", "progress", "note", "evaluation"})
    dumped["model"].pop("cache_dir", None)
    for key in ("cache", "cache_dir"):
        dumped["calibration"].pop(key, None)
    return {"store_format": STORE_FORMAT, "ppframework": _package_version(), **dumped}


def settings_key(settings: dict[str, Any]) -> str:
    """A short, stable hash of ``settings`` (canonical JSON, sorted keys)."""
    text = json.dumps(json.loads(strict_json(settings, indent=None)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


@dataclass(frozen=True)
class PointKeys:
    """The store keys of a run config's points: ``dense`` and one per method, in order."""

    dense: str
    methods: list[str]
    settings: dict[str, dict[str, Any]]
    """key -> the settings it was derived from (written into each record)."""

    @classmethod
    def of(cls, cfg: RunConfig) -> PointKeys:
        """The keys of every point of ``cfg``."""
        run = run_identity(cfg)
        dense_settings = {"point": "dense", "run": run}
        dense = settings_key(dense_settings)
        settings = {dense: dense_settings}
        methods = []
        for method in cfg.methods:
            method_settings = {"point": "method", "run": run, "method": method.model_dump(mode="json")}
            key = settings_key(method_settings)
            settings[key] = method_settings
            methods.append(key)
        return cls(dense, methods, settings)


class PointStore:
    """``<folder>/<key>.json`` per finished point; written atomically, read defensively."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @classmethod
    def in_out_dir(cls, out_dir: str | Path) -> PointStore:
        """The store of an output folder (``<out_dir>/points``)."""
        return cls(Path(out_dir) / POINTS_FOLDER)

    def check_folder(self) -> None:
        """Refuse a store path that exists but is not a folder (before any work, naming the fix).

        Raises:
            ConfigError: the path is a file (or anything else but a folder).
        """
        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError(
                f"{self.folder}: is a file, not a folder; ppf ablate keeps every finished point in this "
                "folder. Move or remove the file, or use another --out"
            )

    def path(self, key: str) -> Path:
        """Where the record of ``key`` lives."""
        return self.folder / f"{key}.json"

    def load(self, key: str) -> dict[str, Any] | None:
        """The successful record of ``key``, or None (missing, failed, or unreadable: logged)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            logger.warning("stored point %s is unreadable (%s); running the point again", path, exc)
            return None
        row = record.get("row") if isinstance(record, dict) else None
        if not isinstance(row, dict) or record.get("key") != key:
            logger.warning("stored point %s does not hold the point %s; running the point again", path, key)
            return None
        if row.get("error"):
            return None
        return record

    def save(self, key: str, record: dict[str, Any], settings: dict[str, Any] | None = None) -> Path:
        """Store ``record`` (a ``row`` and whatever else the point needs) under ``key``.

        Adds the key, the settings it came from, when, and which host/process finished it.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        full = {
            "key": key,
            **record,
            "settings": settings,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        return write_json(self.path(key), full)

    def try_save(self, key: str, record: dict[str, Any], settings: dict[str, Any] | None = None) -> None:
        """:meth:`save`, logging instead of raising when the folder cannot be written."""
        try:
            self.save(key, record, settings)
        except OSError as exc:
            logger.warning("could not store point %s in %s: %s", key, self.folder, exc)


def sweep_summary(
    launcher: str, store: PointStore | None, resumed: list[str], **extra: Any
) -> dict[str, Any]:
    """The report's ``sweep`` entry: launcher, store folder and the points reused from it."""
    return {
        "launcher": launcher,
        "store": str(store.folder) if store is not None else None,
        "resumed": list(resumed),
        **extra,
    }


def save_dense(
    store: PointStore, keys: PointKeys, row: MethodResult, resolved: dict[str, Any], env: dict[str, Any]
) -> None:
    """Store the dense point with what a resumed run needs to rebuild its report."""
    record = {"row": asdict(row), "resolved": resolved, "environment": env}
    store.try_save(keys.dense, record, keys.settings[keys.dense])


def load_dense(
    store: PointStore, key: str
) -> tuple[MethodResult, dict[str, Any], dict[str, Any]] | None:
    """The stored dense row, resolved settings and environment, or None (damaged records: logged)."""
    record = store.load(key)
    if record is None:
        return None
    try:
        row = row_from_json(record["row"])
        for name in ("resolved", "environment"):
            if not isinstance(record.get(name), dict):
                raise DamagedRecord(name, f"expected a mapping, got {shown(record.get(name))}")
    except DamagedRecord as exc:
        logger.warning("stored point %s is damaged (%s); running the point again", store.path(key), exc)
        return None
    return row, dict(record["resolved"]), dict(record["environment"])


def save_method(
    store: PointStore, keys: PointKeys, index: int, row: MethodResult, calibration: dict[str, Any] | None
) -> None:
    """Store method ``index``'s row (failed rows too: they show in the table, and are run again)."""
    key = keys.methods[index]
    store.try_save(key, {"row": asdict(row), "calibration": calibration}, keys.settings[key])


def load_method(store: PointStore, key: str) -> tuple[MethodResult, dict[str, Any] | None] | None:
    """A stored successful method row and its calibration info, or None."""
    record = store.load(key)
    if record is None:
        return None
    try:
        row = row_from_json(record["row"])
        calibration = record.get("calibration")
        if calibration is not None and not isinstance(calibration, dict):
            raise DamagedRecord("calibration", f"expected a mapping or null, got {shown(calibration)}")
    except DamagedRecord as exc:
        logger.warning("stored point %s is damaged (%s); running the point again", store.path(key), exc)
        return None
    return row, calibration
