"""A cache of weight terms: a metric's weight factor depends only on the (frozen) weight."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch


class WeightTermCache:
    """Weight terms depend only on the (frozen) weight; compute once per weight and version.

    Entries hold a weak reference to their weight, so a new tensor that happens to reuse a freed
    one's address is never mistaken for it; entries of freed weights are dropped (an offloaded
    weight of a device-mapped model is a new tensor at every forward). Inference tensors (weights
    materialised under ``torch.inference_mode``) keep no version counter and count as unchanged.
    """

    def __init__(self) -> None:
        self._cache: dict[int, tuple[weakref.ref[torch.Tensor], int, torch.Tensor]] = {}

    @staticmethod
    def _version(weight: torch.Tensor) -> int:
        return -1 if weight.is_inference() else weight._version

    def get(self, weight: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        entry = self._cache.get(id(weight))
        version = self._version(weight)
        if entry is not None and entry[0]() is weight and entry[1] == version:
            return entry[2]
        term = fn(weight)
        if entry is not None and entry[0]() is None or len(self._cache) > 64:
            self._cache = {key: e for key, e in self._cache.items() if e[0]() is not None}
        self._cache[id(weight)] = (weakref.ref(weight), version, term)
        return term
