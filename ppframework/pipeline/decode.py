"""The pipeline's side of the key/value cache: the decode state a prefill leaves, the decode steps that
continue it (``frozen``: the prefill's masks on pinned sliced weights), each attention block's cache
slot, and the cache of a pipeline detached mid-generation (see :mod:`ppframework.decoding`)."""

from __future__ import annotations

import logging
import weakref
from dataclasses import replace
from typing import Any

import torch

from ppframework.adapters.base import BlockRunner
from ppframework.adapters.kv_cache import KVSlot
from ppframework.decoding import DecodeState
from ppframework.pipeline.batch import _Batch
from ppframework.pipeline.state import PipelineState
from ppframework.types import BlockContext, BlockInputs, BlockKind, BlockMask

logger = logging.getLogger(__package__)  # the package's logger: its lines keep the name ppframework.pipeline


def refuse_after_detach(cache: Any, label: str) -> None:
    """Make every further ``update`` of ``cache`` (filled under a pipeline that is being detached)
    raise a clear error: the model's own layers would continue it under a different decision (with
    ``gqa_policy: group``, with other key/value heads: a shape error deep in attention)."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"this key/value cache was filled under the pipeline of {label!r}, which was detached "
            "(pipe.detach()) while a generation was continuing it; the model's own layers cannot "
            "continue a cache filled under the pipeline's decision: detach after generate() returns "
            "(or leave `with pipe:` then), or start a new generation from an empty cache"
        )

    try:
        cache.update = refuse  # an instance attribute: attention calls cache.update(...) per layer
    except AttributeError:  # a cache type that refuses new attributes: nothing to mark
        logger.debug("could not mark the cache of %s as detached", label)


class DecodeSteps(PipelineState):
    """The decode state of the last prefill, the frozen decode steps and the cache slots."""

    def _decode_batch(
        self, cache: Any, past: int, batch: int, seq: int, mask: torch.Tensor | None, device: torch.device
    ) -> _Batch:
        """A decode step: it must continue the cache this pipeline's last prefill filled."""
        state = self._decode
        if state is None or not state.owns(cache):
            raise RuntimeError(
                "this forward continues a key/value cache that the attached pipeline did not fill with its "
                "last decision (it was filled while detached, by another pipeline, or before a newer "
                "decision); start generation from an empty cache while the pipeline is attached"
            )
        if mask is not None and mask.shape[1] != past + seq:
            raise ValueError(
                f"attention_mask: {mask.shape[1]} columns, but {past} cached + {seq} new tokens; pass the "
                "mask of every token so far"
            )
        self.adapter.check_supported(past + seq)
        state.steps += 1
        if state.steps == 1:
            self._first_decode_step(state)
        if mask is None:
            current = torch.ones(batch, seq, dtype=torch.long, device=device)
        else:
            current = mask[:, past:]
        return _Batch(current, None, False, None, decode=state, past=past, key_mask=mask)

    def _first_decode_step(self, state: DecodeState) -> None:
        """Called once per ``generate`` call, at its first decode step (the pipeline records the
        share of weights its decode steps remove)."""

    def _pin_for_decode(self, runner: BlockRunner) -> None:
        """Pin ``runner``'s sliced weights for the decode steps of this ``generate`` call (gathered at
        their first use, reused by every later step; freed by :meth:`_end_decode`). The one set per
        call recycles the last call's storage; a row run alone (``decision: sequence``) keeps its own."""
        runner.pin_weights(recycle=self._row is None)
        self._pinned_for_decode = True

    def _end_decode(self) -> None:
        """Forget the last prefill's decision and free the weights it pinned for its decode steps."""
        self._decode = None
        if self._pinned_for_decode and not self.is_static:
            for runner in self._runners.values():
                runner.unpin_weights()
        self._pinned_for_decode = False

    def _begin_decode(self, cache: Any, rows: int) -> None:
        """A decision forward that fills ``cache``: start the state its decode steps will continue."""
        if self._decode is not None and self._decode.owns(cache):
            return  # an earlier layer of this forward started it
        self._decode = DecodeState.for_cache(cache, self.method.decode)
        if self.per_row and rows > 1:
            self._track_rows(self._decode, cache, rows)

    @staticmethod
    def _track_rows(state: DecodeState, cache: Any, rows: int) -> None:
        """Give ``state`` one child per row, and keep them in step when beam search reorders the cache."""
        state.rows = [DecodeState(state.cache, state.policy) for _ in range(rows)]
        own = cache.__dict__.get("reorder_cache")  # an instance's own wrapper, if it has one
        reorder = own if own is not None else getattr(type(cache), "reorder_cache", None)
        if reorder is None:
            return
        # Weak references only: a cycle cache -> wrapper -> cache (or -> state -> pinned weights) would
        # keep every row's sliced weights alive until the garbage collector happens to run.
        cache_ref, state_ref = weakref.ref(cache), weakref.ref(state)

        def reorder_rows(beam_idx: torch.Tensor) -> Any:
            result = reorder(beam_idx) if own is not None else reorder(cache_ref(), beam_idx)
            current = state_ref()
            if current is not None:
                order = beam_idx.tolist()
                if order != list(range(len(current.rows))):
                    current.rows[:] = [current.rows[i] for i in order]
                    current.forget_row_order()  # stacked weights and unions follow the new rows
            return result

        cache.reorder_cache = reorder_rows  # this cache object only; it dies with the generation

    def _slot(self, runner: BlockRunner, kind: BlockKind, batch: _Batch, cache: Any) -> KVSlot | None:
        """The cache slot of an attention block's full pass (None without a cache or for the MLP)."""
        if cache is None or kind is not BlockKind.ATTENTION:
            return None
        full_kv = self._full_kv or (not batch.decoding and self.method.decode == "dense")
        return batch.kv_slot(cache, runner.layer_idx, full_kv)

    def _infer(
        self,
        ctx: BlockContext,
        runner: BlockRunner,
        inputs: BlockInputs,
        mask: BlockMask,
        slot: KVSlot | None,
    ) -> Any:
        """``infer`` with the block's cache slot set on the runner for the duration of the call."""
        if slot is None:
            return self.hooks.infer(ctx, runner, inputs, mask)
        if slot.full_kv and mask.kept_kv_heads is not None:
            mask = replace(mask, kept_kv_heads=None)  # compute (and cache) every key/value head
        runner.kv_slot = slot
        try:
            return self.hooks.infer(ctx, runner, inputs, mask)
        finally:
            runner.kv_slot = None

    def _frozen_step(
        self,
        index: int,
        kind: BlockKind,
        runner: BlockRunner,
        inputs: BlockInputs,
        decode: DecodeState,
        slot: KVSlot | None,
    ) -> torch.Tensor:
        """A frozen decode step of one pruned block: the prefill's mask, on its pinned weights."""
        mask = decode.masks[(index, kind)]
        ctx = self._context(index, kind, runner, inputs.normed.shape[1], None, False, False)
        return self._infer(ctx, runner, inputs, mask, slot).output
