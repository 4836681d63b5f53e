"""Calibration: the dense statistics every history starts from, their on-disk cache, and the
calibration a run config asks for.

- :mod:`.dense`: :func:`calibrate` (exact per-position means at every output projection's input) and
  :func:`expected_shapes`;
- :mod:`.cache`: the safetensors + JSON cache, verified on load (:func:`cached_calibration`);
- :mod:`.orchestration`: a run config's calibration windows, cache key and history
  (:func:`~ppframework.calibration.orchestration.calibration_history`; it reads configs, data and
  models, so it is imported from its module, not from this package).
"""

from ppframework.calibration.cache import (
    CACHE_FORMAT_VERSION,
    CacheError,
    cache_key,
    cached_calibration,
    default_cache_dir,
    load_history,
    save_history,
    store_shapes,
    tensors_checksum,
)
from ppframework.calibration.dense import calibrate, expected_shapes
from ppframework.history import BlockHistory, HistoryStore

__all__ = [
    "CACHE_FORMAT_VERSION",
    "BlockHistory",
    "CacheError",
    "HistoryStore",
    "cache_key",
    "cached_calibration",
    "calibrate",
    "default_cache_dir",
    "expected_shapes",
    "load_history",
    "save_history",
    "store_shapes",
    "tensors_checksum",
]
