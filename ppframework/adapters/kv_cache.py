"""A block's view of the model's own key/value cache (transformers ``Cache`` objects) for one forward.

The pipeline hands an attention runner a :class:`KVSlot` while it runs the block's full batch (never
while it runs the probe). The runner computes keys and values for the units it runs, stores them with
:meth:`KVSlot.store` (through the cache's own ``update``, so any of transformers' cache classes works)
and attends to what comes back, with :meth:`KVSlot.key_bias` as the mask when earlier tokens are
cached. Which key/value heads a layer's cache holds is therefore decided by what the runner computes:
all of them under the paper's ``query-only`` GQA policy, only the kept groups under ``group``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ppframework.adapters.masks import position_bias
from ppframework.positions import RowShift


def cache_length(cache: Any) -> int:
    """Tokens already held by a transformers cache (0 for None or an empty cache)."""
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    return int(cache.get_seq_length())


def key_bias(
    key_mask: torch.Tensor | None,
    past: int,
    queries: int,
    keys: int,
    dtype: torch.dtype,
    window: int | None = None,
) -> torch.Tensor | None:
    """Additive attention bias (B or 1, 1, queries, keys) for queries that follow ``past`` cached tokens.

    Query ``i`` sits at column ``past + i`` and may see key ``j`` when ``j <= past + i`` and the key is
    real text (``key_mask[b, j] == 1``; None = every key is real; keys past the mask's width, the unused
    slots of a static cache, are never seen). With ``window`` a query sees only keys less than
    ``window`` columns back (sliding-window attention). A sliding-window cache returns only its last
    keys (fewer than ``past + queries``): they are then the last columns. None when nothing needs
    masking (one query that sees every key, every key real).
    """
    offset = max(past + queries - keys, 0)  # first column the returned keys hold
    if key_mask is None and queries == 1 and offset + keys == past + 1 and (window is None or keys <= window):
        return None
    device = key_mask.device if key_mask is not None else None
    query_at = torch.arange(queries, device=device) + past
    key_at = torch.arange(keys, device=device) + offset
    real = None
    if key_mask is not None:
        real = key_mask.bool()[:, offset:]
        width = real.shape[1]
        if width < keys:
            real = torch.nn.functional.pad(real, (0, keys - width), value=False)
        elif width > keys:
            real = real[:, :keys]
    return position_bias(query_at, key_at, real, window, dtype)


@dataclass
class KVSlot:
    """One attention block's share of the model's cache for one forward.

    Attributes:
        cache: the transformers ``Cache`` the model passed to its layers.
        layer_idx: the attention module's index into the cache.
        past: tokens the cache held before this forward.
        key_mask: (B, past + T) 1 for real keys, or None when every key is real.
        shift: the forward's left-padding roll (decision forwards only): the runner works in position
            layout, the cache holds the model's column layout.
        full_kv: store every key/value head even when the runner prunes some (the cache then also
            serves dense decode steps).
        bias_cache: biases already built in this forward, shared by every layer.
    """

    cache: Any
    layer_idx: int
    past: int
    key_mask: torch.Tensor | None = None
    shift: RowShift | None = None
    full_kv: bool = False
    bias_cache: dict[tuple[int, int, torch.dtype, int | None], torch.Tensor | None] = field(
        default_factory=dict
    )
    stored: bool = False

    def store(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this forward's (B, heads, T, d) keys and values; return what the queries attend to.

        With nothing cached before, that is ``keys``/``values`` themselves (in the runner's layout);
        otherwise the cache's whole content. Storing twice in one forward is an error: an ``infer``
        strategy must run the block's full batch once.
        """
        if self.stored:
            raise RuntimeError(
                f"the key/value cache of layer {self.layer_idx} was written twice in one forward: the infer "
                "strategy ran the attention block's full batch more than once"
            )
        self.stored = True
        if self.shift is not None:
            stored_k, stored_v = self.shift.to_columns(keys, dim=2), self.shift.to_columns(values, dim=2)
        else:
            stored_k, stored_v = keys, values
        all_k, all_v = self.cache.update(stored_k, stored_v, self.layer_idx)
        if self.past == 0:
            return keys, values
        return all_k, all_v

    def bias(
        self, queries: int, keys: int, dtype: torch.dtype, window: int | None = None
    ) -> torch.Tensor | None:
        """:func:`key_bias` for this forward (built once per shape and window, shared by the layers)."""
        key = (queries, keys, dtype, window)
        if key not in self.bias_cache:
            self.bias_cache[key] = key_bias(self.key_mask, self.past, queries, keys, dtype, window)
        return self.bias_cache[key]


class RowCache:
    """One layer's key/value cache seen one row at a time (``decision: sequence``).

    Each row of the batch runs the block alone; its attention runner stores that row's keys and values
    here (through :class:`KVSlot`, as with the model's own cache) and attends to the row's cached keys
    followed by the new ones. :meth:`flush` then writes every row's new keys and values into the
    model's cache with one ``update``, so the cache keeps the batch layout ``generate`` expects.

    ``row`` is the row being run; ``past`` the tokens cached before this forward. In a decision
    forward (``past == 0``) row ``b`` stores its ``lengths[b]`` real tokens in position layout; the
    flush pads them to ``seq`` columns and rolls them back to the model's column layout (``shift``).
    A decode step reads the row's cached keys from the cache layer's ``keys``/``values`` (transformers'
    dynamic caches, sliding-window layers included); caches without them are refused.
    """

    def __init__(self, cache: Any, rows: int, past: int) -> None:
        self.cache = cache
        self.past = past
        self.row = 0
        self.layer_idx: int | None = None
        self._keys: list[torch.Tensor | None] = [None] * rows
        self._values: list[torch.Tensor | None] = [None] * rows

    def _cached(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        layers = getattr(self.cache, "layers", None)
        layer = layers[layer_idx] if layers is not None and layer_idx < len(layers) else None
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
            raise RuntimeError(
                f"decision 'sequence' reads each row's cached keys from the cache's layers[{layer_idx}]"
                f".keys/.values, which a {type(self.cache).__name__} does not have; use the default "
                "dynamic cache or decision 'batch'"
            )
        return keys, values

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep row ``row``'s (1, heads, T, d) keys/values; return what its queries attend to."""
        self.layer_idx = layer_idx
        self._keys[self.row], self._values[self.row] = keys, values
        if self.past == 0:
            return keys, values
        cached_k, cached_v = self._cached(layer_idx)
        row = slice(self.row, self.row + 1)
        return torch.cat([cached_k[row], keys], dim=-2), torch.cat([cached_v[row], values], dim=-2)

    def flush(self, seq: int, shift: RowShift | None) -> None:
        """Write every row's new keys/values into the model's cache (one ``update`` per layer)."""
        if self.layer_idx is None:
            return
        if any(k is None for k in self._keys):
            raise RuntimeError("decision 'sequence': a row stored no keys/values in this layer's cache")
        keys, values = self._keys, self._values
        if self.past == 0:  # rows of different lengths: pad in position layout, then back to columns

            def padded(parts: list[torch.Tensor | None]) -> torch.Tensor:
                stacked = torch.cat(
                    [torch.nn.functional.pad(p, (0, 0, 0, seq - p.shape[-2])) for p in parts],  # type: ignore[union-attr]
                    dim=0,
                )
                return stacked if shift is None else shift.to_columns(stacked, dim=2)

            all_k, all_v = padded(keys), padded(values)
        else:
            all_k, all_v = torch.cat(keys, dim=0), torch.cat(values, dim=0)  # type: ignore[arg-type]
        self.cache.update(all_k, all_v, self.layer_idx)
        self.layer_idx = None
