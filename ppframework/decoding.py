"""What decode steps do: the ``decode`` policy of a method and the per-``generate`` decode state.

A forward with an empty key/value cache (or none) is a *decision* forward: the method runs exactly
as for any batch (probe, fuse, mask, sliced inference, history update at real positions). When it
fills a cache, the pipeline remembers that cache and the per-block masks it decided. A later forward
that continues that cache is a *decode* step, run by the method's ``decode`` policy:

``frozen`` (default)
    every pruned block reuses the mask decided at prefill, on sliced weights gathered once for the
    whole ``generate`` call; the cache stays consistent for any attention layout (under the
    ``group`` GQA policy it holds only the kept key/value heads).
``dense``
    decode steps run the unpruned layers (prefill-only pruning); the prefill then stores every
    key/value head in the cache, so the dense layers find the keys they expect.

Decode steps never touch the history, run no probe and record no pruning events: the history
describes the prompts the method decided on, one entry per position.

Under ``decision: sequence`` the state has one child state per row of the batch (``rows``), each
with that row's masks and its own pinned sliced weights (``pins``). Its decode steps follow the
method's ``sequence_decode``:

``loop`` (default)
    row by row, each row a batch of one on its own pinned weights;
``batched``
    every row on its own kept weights in one pass: the rows' kept weights stacked per projection
    (``stacked``, gathered at the first decode step) and batched matrix products; when the rows keep
    different numbers of units (or a runner cannot), the loop instead;
``union``
    the whole batch in one pass on the union of the rows' kept units (``union``: one state whose
    masks are the unions, one set of pinned weights); each row then sees at least the units it chose.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Literal

from ppframework.types import BlockKind, BlockMask

DecodePolicy = Literal["frozen", "dense"]

#: The decode policies a method can name (``MethodConfig.decode``).
DECODE_POLICIES: tuple[str, ...] = ("frozen", "dense")

SequenceDecode = Literal["loop", "batched", "union"]

#: How the decode steps of ``decision: sequence`` run a batch of several rows
#: (``MethodConfig.sequence_decode``).
SEQUENCE_DECODES: tuple[str, ...] = ("loop", "batched", "union")


@dataclass
class DecodeState:
    """The decision one prefill made, kept for the decode steps that continue its cache."""

    cache: weakref.ReferenceType[Any]
    policy: DecodePolicy
    masks: dict[tuple[int, BlockKind], BlockMask] = field(default_factory=dict)
    steps: int = 0
    #: ``decision: sequence``: one state per row of the batch (reordered with the cache by beam search).
    rows: list[DecodeState] = field(default_factory=list)
    #: A row's sliced weights, pinned at its prefill (or first decode step) per block runner.
    pins: dict[tuple[int, BlockKind], Any] = field(default_factory=dict)
    #: ``sequence_decode: batched``: each block's rows' kept weights, stacked (None: not stackable).
    stacked: dict[tuple[int, BlockKind], Any] = field(default_factory=dict)
    #: ``sequence_decode: union``: the state whose masks are the unions of the rows' (built once).
    union: DecodeState | None = None
    #: Why the rows of this state run one by one despite ``sequence_decode`` (None: they do not).
    fallback: str | None = None

    def forget_row_order(self) -> None:
        """Drop what was built from the rows in their old order (beam search reordered them)."""
        self.stacked.clear()
        self.union = None

    @classmethod
    def for_cache(cls, cache: Any, policy: DecodePolicy) -> DecodeState:
        """A fresh state bound to ``cache`` (held weakly: a finished generation frees it)."""
        return cls(weakref.ref(cache), policy)

    def owns(self, cache: Any) -> bool:
        """Whether ``cache`` is the one this state's prefill filled."""
        return cache is not None and self.cache() is cache
