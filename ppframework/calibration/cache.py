"""The calibration cache: a history on disk as safetensors plus a JSON header (never pickle).

The cache is never trusted blindly: its header carries a SHA-256 checksum of every tensor and the
shapes it was built for (layers, block kinds, positions, channels per kind). A file that cannot be
read, fails its checksum, holds non-finite or degenerate values, or does not match the model it is
loaded for is reported by path (``logging.warning``), discarded and recomputed. A cache folder that
cannot be written is reported the same way and the run continues without caching.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ppframework.history import BlockHistory, HistoryStore
from ppframework.types import BlockKind

# the package's logger: its lines keep the name ppframework.calibration
logger = logging.getLogger(__package__)

CACHE_FORMAT_VERSION = 2


class CacheError(Exception):
    """A calibration cache file that must not be used; the message says why."""


def default_cache_dir() -> Path:
    """``$PPF_CACHE_DIR`` or ``~/.cache/ppframework``."""
    return Path(os.environ.get("PPF_CACHE_DIR") or Path.home() / ".cache" / "ppframework")


def cache_key(description: dict[str, Any]) -> str:
    """Stable short hash of everything the calibration depends on."""
    text = json.dumps({"format": CACHE_FORMAT_VERSION, **description}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _tensors(store: HistoryStore) -> dict[str, torch.Tensor]:
    """``store``'s tensors by name (``layer.kind.sq_mean`` / ``.mean``), fp32 on the CPU."""
    tensors = {}
    for (layer, kind), hist in store.blocks.items():
        tensors[f"{layer}.{kind.value}.sq_mean"] = hist.sq_mean.detach().to("cpu", torch.float32).contiguous()
        if hist.mean is not None:
            tensors[f"{layer}.{kind.value}.mean"] = hist.mean.detach().to("cpu", torch.float32).contiguous()
    return tensors


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def store_shapes(store: HistoryStore) -> dict[str, Any]:
    """The shapes (as in :func:`expected_shapes`) ``store`` actually has."""
    keys = sorted(store.blocks, key=lambda k: (k[0], k[1].value))
    channels: dict[str, int] = {}
    positions = 0
    for (_, kind), hist in store.blocks.items():
        positions = int(hist.sq_mean.shape[0]) if hist.sq_mean.dim() == 2 else -1
        channels[kind.value] = int(hist.sq_mean.shape[-1]) if hist.sq_mean.dim() else -1
    return {
        "layers": sorted({layer for layer, _ in keys}),
        "kinds": sorted({kind.value for _, kind in keys}),
        "positions": positions,
        "channels": channels,
    }


def write_safetensors_atomically(
    tensors: dict[str, torch.Tensor], path: Path, header: dict[str, Any]
) -> None:
    """``tensors`` into the safetensors file ``path`` with ``header`` (JSON) as its metadata, through a
    temporary file renamed into place (a crash never leaves a half-written file at ``path``)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"header": json.dumps(header, default=str)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_history(store: HistoryStore, path: Path, header: dict[str, Any]) -> None:
    """Write ``path`` (.safetensors) and ``path`` with .json (the header), each atomically.

    The stored header is ``header`` plus the cache format, the checksum of the tensors and their
    shapes (see :func:`load_history`). Raises :class:`OSError` when the folder cannot be written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = _tensors(store)
    full = {
        **header,
        "format": CACHE_FORMAT_VERSION,
        "checksum": tensors_checksum(tensors),
        "shapes": store_shapes(store),
    }
    write_safetensors_atomically(tensors, path, full)
    from ppframework.outputs import atomic_write_text

    atomic_write_text(path.with_suffix(".json"), json.dumps(full, indent=2, default=str))


def _check_block(name: str, tensor: torch.Tensor, shape: tuple[int, int] | None) -> None:
    if shape is not None and tuple(tensor.shape) != shape:
        raise CacheError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
    if not bool(torch.isfinite(tensor).all()):
        raise CacheError(f"{name} holds NaN or infinite values")


def load_history(path: Path, expected: dict[str, Any] | None = None) -> HistoryStore:
    """Read and verify a history written by :func:`save_history`.

    ``expected`` (see :func:`expected_shapes`) is what the caller's model needs. Raises
    :class:`CacheError` when the file cannot be read, its checksum or format does not match, a value
    is not finite, a ``sq_mean`` block is negative or all zeros, or the shapes differ from the
    header's or from ``expected``.
    """
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # SafetensorError, OSError, ...: truncated, empty or foreign bytes
        raise CacheError(f"not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    try:
        header = json.loads(metadata.get("header", "{}"))
    except json.JSONDecodeError as exc:
        raise CacheError(f"its header is not valid JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != CACHE_FORMAT_VERSION:
        raise CacheError(f"written in another cache format (expected format {CACHE_FORMAT_VERSION})")
    if header.get("checksum") != tensors_checksum(tensors):
        raise CacheError("its checksum does not match its tensors (the file was modified or damaged)")
    shapes = header.get("shapes")
    if expected is not None and shapes != expected:
        raise CacheError(f"it was built for shapes {shapes}, but this model needs {expected}")
    if not isinstance(shapes, dict):
        raise CacheError("its header has no shapes")
    samples = int(header.get("n_samples", 0))
    blocks: dict[tuple[int, BlockKind], BlockHistory] = {}
    try:
        for name, tensor in tensors.items():
            layer, kind, field = name.split(".")
            key = (int(layer), BlockKind(kind))
            shape = (int(shapes["positions"]), int(shapes["channels"][kind]))
            _check_block(name, tensor, shape)
            hist = blocks.setdefault(key, BlockHistory(sq_mean=torch.empty(0), samples=samples))
            if field == "sq_mean":
                if bool((tensor < 0).any()) or not bool(tensor.any()):
                    raise CacheError(f"{name} is negative or all zeros, which no calibration produces")
                hist.sq_mean = tensor
            elif field == "mean":
                hist.mean = tensor
            else:
                raise CacheError(f"unknown tensor {name!r}")
    except (ValueError, KeyError, TypeError) as exc:
        raise CacheError(f"unexpected tensor names or header ({type(exc).__name__}: {exc})") from None
    wanted = {(layer, BlockKind(kind)) for layer in shapes["layers"] for kind in shapes["kinds"]}
    missing = sorted(f"{layer}.{kind.value}" for layer, kind in wanted - set(blocks))
    if missing or set(blocks) - wanted:
        raise CacheError(f"blocks missing or unexpected (missing: {', '.join(missing) or 'none'})")
    empty = sorted(f"{layer}.{kind.value}" for (layer, kind), h in blocks.items() if h.sq_mean.numel() == 0)
    if empty:
        raise CacheError(f"blocks without sq_mean: {', '.join(empty)}")
    return HistoryStore(blocks)


def _discard(path: Path) -> None:
    for file in (path, path.with_suffix(".json")):
        try:
            file.unlink()
        except OSError:
            pass


def cached_calibration(
    description: dict[str, Any],
    compute: Callable[[], HistoryStore],
    cache_dir: Path | None,
    use_cache: bool = True,
    expected: dict[str, Any] | None = None,
) -> tuple[HistoryStore, Path | None, bool]:
    """Load the calibration keyed by ``description`` from disk, or compute and store it.

    ``expected`` (see :func:`expected_shapes`) is checked against the cached file; a damaged or
    mismatched file is reported (``logging.warning``, with its path), discarded and recomputed. When
    the cache cannot be written the run continues without it (also a warning).

    Returns (store, cache file or None, whether it was loaded from the cache).
    """
    if not use_cache:
        return compute(), None, False
    directory = (cache_dir or default_cache_dir()) / "calibration"
    path = directory / f"calib-{cache_key(description)}.safetensors"
    if path.is_file():
        try:
            store = load_history(path, expected)
        except CacheError as exc:
            logger.warning("calibration cache %s is unusable: %s; discarding it and recomputing", path, exc)
            _discard(path)
        else:
            logger.info("calibration loaded from cache %s", path)
            return store, path, True
    store = compute()
    try:
        save_history(store, path, description)
    except OSError as exc:
        logger.warning(
            "calibration cache folder %s cannot be written (%s); continuing without caching (set "
            "calibration.cache_dir or PPF_CACHE_DIR to a writable folder, or calibration.cache=false)",
            directory,
            exc.strerror or exc,
        )
        return store, None, False
    logger.info("calibration cached at %s", path)
    return store, path, False
