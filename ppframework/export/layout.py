"""The widths of a pruned model, layer by layer, and how kept query heads share key/value heads.

A static decision keeps, per attention block, a sorted set of query heads; under grouped-query
attention each kept head reads the key/value head of its group. A Hugging Face attention module
needs every key/value head to serve the same number of query heads, so the exported block gives each
key/value head ``count / share`` *slots* (copies), each serving ``share`` consecutive kept query heads,
where ``share`` divides every group's count (:func:`kv_share`). The copies compute the same keys and
values, so the block computes exactly what the pipeline computed.

:class:`PrunedLayout` is what the per-layer format stores (``ppf_layers.json``, docs/export.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

#: Version of the ``ppf_layers.json`` format.
LAYOUT_VERSION = 1


def group_counts(kept_heads: torch.Tensor, group_size: int) -> dict[int, int]:
    """How many kept query heads each key/value head serves (only heads serving at least one)."""
    counts: dict[int, int] = {}
    for head in kept_heads.tolist():
        kv = int(head) // group_size
        counts[kv] = counts.get(kv, 0) + 1
    return counts


def kv_share(counts: dict[int, int]) -> int:
    """The largest number of query heads one key/value slot can serve: the gcd of the group counts."""
    return math.gcd(*counts.values()) if counts else 1


def kv_slots(kept_heads: torch.Tensor, group_size: int, share: int) -> list[int]:
    """The original key/value head of each exported key/value slot, in order.

    ``kept_heads`` are sorted, so heads of one group are consecutive; every ``share`` of them get one
    slot of their group's key/value head. ``share`` must divide every group's count.
    """
    slots: list[int] = []
    for kv, count in sorted(group_counts(kept_heads, group_size).items()):
        if count % share:
            raise ValueError(f"key/value head {kv} serves {count} kept heads, not a multiple of {share}")
        slots.extend([kv] * (count // share))
    return slots


@dataclass(frozen=True)
class LayerWidths:
    """One decoder layer's widths after pruning (and which of its output projections carry a bias)."""

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    attention_output_bias: bool = False
    mlp_output_bias: bool = False

    def shape(self) -> tuple[int, int, int]:
        """(query heads, key/value heads, MLP width): what a Hugging Face config must hold for all layers."""
        return (self.num_attention_heads, self.num_key_value_heads, self.intermediate_size)


@dataclass(frozen=True)
class PrunedLayout:
    """Every layer's widths, the head size, and where the export came from."""

    family: str
    head_dim: int
    layers: tuple[LayerWidths, ...]

    @property
    def uniform(self) -> bool:
        """Whether every layer has the same widths (a standard config can describe the model)."""
        return len({layer.shape() for layer in self.layers}) <= 1

    def to_json(self) -> dict[str, Any]:
        """The ``ppf_layers.json`` content."""
        return {
            "format_version": LAYOUT_VERSION,
            "family": self.family,
            "head_dim": self.head_dim,
            "layers": [asdict(layer) for layer in self.layers],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PrunedLayout:
        """Read :meth:`to_json`'s content back; ``ValueError`` names what is wrong."""
        if not isinstance(data, dict) or data.get("format_version") != LAYOUT_VERSION:
            raise ValueError(f"ppf_layers.json: not format_version {LAYOUT_VERSION}")
        try:
            layers = tuple(LayerWidths(**layer) for layer in data["layers"])
            return cls(family=str(data["family"]), head_dim=int(data["head_dim"]), layers=layers)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"ppf_layers.json: malformed ({type(exc).__name__}: {exc})") from None
