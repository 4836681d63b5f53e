"""``decision: sequence``: every row of a batch decides alone and runs alone, on its own real tokens at
a decision forward and on its own masks at a decode step: one row after another (``sequence_decode:
loop``), all rows in one pass on their own stacked weights (``batched``), or all rows in one pass on
the union of their kept units (``union``)."""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from ppframework.adapters.batched_rows import (
    StackedBlock,
    run_stacked,
    stack_block,
    stacked_bytes,
    unsupported,
)
from ppframework.adapters.kv_cache import RowCache
from ppframework.decoding import DecodeState
from ppframework.pipeline.batch import LayerCall, _Batch
from ppframework.pipeline.decision import Decisions
from ppframework.strategies.inference import SlicedInference
from ppframework.types import BlockInputs, BlockKind, BlockMask

logger = logging.getLogger(__package__)

#: The most bytes ``sequence_decode: batched`` stacks for one ``generate`` call by default
#: (:attr:`RowDecisions.max_stacked_bytes`); above it the rows run one by one.
MAX_STACKED_BYTES = 8 * 2**30

BlockKey = tuple[int, BlockKind]


def union_masks(rows: list[dict[BlockKey, BlockMask]]) -> dict[BlockKey, BlockMask] | str:
    """Per block, the union of the rows' kept units (sorted), or why there is none: a block some row
    did not decide, or a mask with an output bias (the union's pruned set would need its own)."""
    masks: dict[BlockKey, BlockMask] = {}
    for key in rows[0]:
        row_masks = [row.get(key) for row in rows]
        if any(m is None for m in row_masks):
            return f"block {key} was not decided for every row"
        if any(m.output_bias is not None for m in row_masks):  # type: ignore[union-attr]
            return "masks with an output bias (the union's pruned units would need their own bias)"
        kept = torch.unique(torch.cat([m.kept_units for m in row_masks]))  # type: ignore[union-attr]
        masks[key] = BlockMask(kept_units=kept, total_units=row_masks[0].total_units)  # type: ignore[union-attr]
    return masks


def rotary_of_row(
    rotary: tuple[torch.Tensor, torch.Tensor] | None, row: int, length: int | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Row ``row``'s rotary tables (its first ``length`` positions; None = all), batch dimension kept."""
    if rotary is None:
        return None

    def take(table: torch.Tensor) -> torch.Tensor:
        table = table if table.shape[0] == 1 else table[row : row + 1]
        return table if length is None else table[:, :length]

    return take(rotary[0]), take(rotary[1])


class RowDecisions(Decisions):
    """A pruned layer run row by row (``decision: sequence``)."""

    #: ``sequence_decode: batched``: the most bytes of stacked weights one ``generate`` call may hold
    #: (every row's kept weights of every pruned block); above it the rows run one by one (logged).
    max_stacked_bytes: int = MAX_STACKED_BYTES

    def _rows_forward(self, call: LayerCall, hidden: torch.Tensor) -> torch.Tensor:
        """Layer ``call.index`` with every row run alone (``decision: sequence``), in position layout.

        A decision forward runs row ``b`` on its ``row_lengths[b]`` real tokens as a batch of one,
        so it decides and computes exactly what that prompt alone would (padding never runs); a
        decode step runs row ``b`` on the masks and sliced weights of its own prefill. Every row of
        a layer decides from the history as it stood before that row, and updates it after, in
        row order: as if the prompts had come one at a time. The rows' keys and values reach the
        model's cache in one update per layer (:class:`RowCache`).
        """
        index, batch, rotary, cache = call.index, call.batch, call.rotary, call.cache
        rows, seq = hidden.shape[:2]
        out = hidden.clone()  # padding positions pass through unchanged
        state = self._decode if cache is not None else None
        decoding = batch.decoding
        if decoding and (batch.decode is None or len(batch.decode.rows) != rows):
            raise RuntimeError(
                f"decision 'sequence': this decode step has {rows} rows but its prefill decided for "
                f"{0 if batch.decode is None else len(batch.decode.rows)}; continue the cache with the "
                "same rows"
            )
        frozen = self.method.decode == "frozen"
        if decoding and frozen and self.method.sequence_decode != "loop":
            one_pass = self._one_pass_step(call, hidden)
            if one_pass is not None:
                return one_pass
        row_cache = RowCache(cache, rows, batch.past) if cache is not None else None
        runners = {(index, kind): self._runners[(index, kind)] for kind in BlockKind}
        self._record_weight = 1.0 / rows
        try:
            for b in range(rows):
                self._row = b
                if row_cache is not None:
                    row_cache.row = b
                row_state = None if state is None else state.rows[b]
                if decoding:
                    row_hidden = hidden[b : b + 1]
                    row_batch = self._decode_row_batch(batch, b)
                    row_rotary = rotary_of_row(rotary, b, None)
                else:
                    length = batch.row_lengths[b] if batch.row_lengths is not None else seq
                    row_hidden = hidden[b : b + 1, :length]
                    row_batch = self._decision_row_batch(length, hidden.device)
                    row_rotary = rotary_of_row(rotary, b, length)
                for key, runner in runners.items():  # the row's own pinned weights (none before its prefill)
                    runner.pinned = None if row_state is None else row_state.pins.get(key)
                    if decoding and frozen and runner.pinned is None:
                        runner.pin_weights()  # a dense prefill gathered nothing: the first step does
                row_call = LayerCall(index, call.layer, row_batch, row_rotary, row_cache)
                row_out = self._blocks_forward(row_call, row_hidden)
                out[b : b + 1, : row_out.shape[1]] = row_out
                if row_state is not None and frozen:
                    for key, runner in runners.items():
                        if runner.pinned is not None:
                            row_state.pins[key] = runner.pinned
        finally:
            self._row = None
            self._record_weight = 1.0
            for runner in runners.values():
                runner.pinned = None
        if row_cache is not None:
            row_cache.flush(seq, batch.shift)
        return out

    def _decision_row_batch(self, length: int, device: torch.device) -> _Batch:
        """A decision forward's row alone: ``length`` real tokens, no padding."""
        ones = torch.ones(1, length, dtype=torch.long, device=device)
        return _Batch(
            ones,
            torch.ones(length, dtype=torch.bool, device=device),
            False,
            torch.ones(length, dtype=torch.long, device=device),
            probe_flops_scale=self._probe_flops_scale(1, length),
        )

    @staticmethod
    def _decode_row_batch(batch: _Batch, row: int) -> _Batch:
        """A decode step's row alone, continuing that row's cache with its own decision."""
        assert batch.decode is not None
        key_mask = None if batch.key_mask is None else batch.key_mask[row : row + 1]
        return _Batch(
            batch.attention_mask[row : row + 1],
            None,
            False,
            None,
            decode=batch.decode.rows[row],
            past=batch.past,
            key_mask=key_mask,
        )

    # -- decode steps in one pass (sequence_decode: batched | union) ----------------------------------
    def _one_pass_step(self, call: LayerCall, hidden: torch.Tensor) -> torch.Tensor | None:
        """A decode step of layer ``call.index`` with every row in one pass, or None when the rows must
        run one by one (the reason is logged once per pipeline and kept for the whole ``generate``)."""
        state = call.batch.decode
        assert state is not None
        if state.fallback is not None:
            return None
        if self.method.sequence_decode == "union":
            return self._union_step(call, hidden, state)
        stacks = self._stacks(call.index, state)
        if stacks is None:
            return None
        return self._stacked_forward(call, hidden, stacks)

    def _fall_back(self, state: DecodeState, reason: str) -> None:
        """Run this ``generate`` call's rows one by one from now on, saying why (once per reason)."""
        state.fallback = reason
        said = self.__dict__.setdefault("_said_fallbacks", set())
        if reason not in said:
            said.add(reason)
            logger.info(
                "%s: sequence_decode %r falls back to running the rows one by one: %s",
                self.method.label,
                self.method.sequence_decode,
                reason,
            )

    def _stacks(self, index: int, state: DecodeState) -> dict[BlockKey, StackedBlock] | None:
        """Layer ``index``'s stacked row weights per pruned block (gathered at the first decode step,
        then kept for the ``generate`` call), or None after falling back to the loop."""
        keys = [(index, kind) for kind in BlockKind if kind in self.targets]
        if all(key in state.stacked for key in keys):
            return {key: state.stacked[key] for key in keys}
        if not isinstance(self.strategies["infer"], SlicedInference):
            self._fall_back(
                state, f"the infer strategy {self.method.strategies.infer.name!r} is not 'sliced'"
            )
            return None
        if not state.stacked:  # the first layer of the first decode step: can the whole call stack?
            reason = self._stack_refusal(state)
            if reason is not None:
                self._fall_back(state, reason)
                return None
        for key in keys:
            if key not in state.stacked:
                stacked = stack_block(self._runners[key], [row.masks[key] for row in state.rows])
                assert stacked is not None  # checked by _stack_refusal
                state.stacked[key] = stacked
                for row in state.rows:  # the stack replaces the rows' own pinned weights
                    row.pins.pop(key, None)
        return {key: state.stacked[key] for key in keys}

    def _stack_refusal(self, state: DecodeState) -> str | None:
        """Why the rows of ``state`` cannot run on stacked weights (None: they can)."""
        rows = len(state.rows)
        total = 0
        for key in state.rows[0].masks:
            if key[1] not in self.targets:
                continue
            masks = [row.masks.get(key) for row in state.rows]
            if any(m is None for m in masks):
                return f"block {key} was not decided for every row"
            counts = sorted({m.n_kept for m in masks})  # type: ignore[union-attr]
            if len(counts) > 1:
                return f"the rows keep different numbers of units in layer {key[0]} {key[1].value} ({counts})"
            runner = self._runners[key]
            reason = unsupported(runner)
            if reason is not None:
                return f"{reason} (layer {key[0]}) has no batched kernel"
            total += stacked_bytes(runner, counts[0], rows)
        if total > self.max_stacked_bytes:
            return (
                f"{rows} rows' stacked weights need {total / 2**30:.2f} GiB, above max_stacked_bytes "
                f"({self.max_stacked_bytes / 2**30:.2f} GiB)"
            )
        return None

    def _stacked_forward(
        self, call: LayerCall, hidden: torch.Tensor, stacks: dict[BlockKey, StackedBlock]
    ) -> torch.Tensor:
        """The layer's blocks on the whole batch, each pruned block on every row's stacked weights."""
        index, layer, batch, cache = call.index, call.layer, call.batch, call.cache
        for kind in BlockKind:
            normed = self.adapter.block_input(layer, kind, hidden)
            rotary = call.rotary if kind is BlockKind.ATTENTION else None
            runner = self._runners[(index, kind)]
            stacked = stacks.get((index, kind))
            if stacked is not None:
                slot = self._slot(runner, kind, batch, cache)
                out = run_stacked(runner, stacked, normed, rotary=rotary, slot=slot)
            else:  # a block the method does not prune: dense, as in every path
                inputs = BlockInputs(
                    normed=normed,
                    residual=hidden,
                    attention_mask=batch.attention_mask,
                    rotary=rotary,
                    has_padding=batch.has_padding,
                )
                out = self._run_block(index, kind, inputs, batch, cache)
            hidden = self.adapter.block_residual(layer, kind, hidden, out)
        return hidden

    def _union_step(self, call: LayerCall, hidden: torch.Tensor, state: DecodeState) -> torch.Tensor | None:
        """The layer's decode step for the whole batch on the union of the rows' kept units (one set of
        pinned weights for the ``generate`` call), or None after falling back to the loop."""
        union = state.union
        if union is None:
            masks = union_masks([row.masks for row in state.rows])
            if isinstance(masks, str):
                self._fall_back(state, masks)
                return None
            union = state.union = DecodeState(state.cache, state.policy, masks=masks)
            for row in state.rows:  # the union's weights replace the rows' own
                row.pins.clear()
        runners = {(call.index, kind): self._runners[(call.index, kind)] for kind in BlockKind}
        try:
            for key, runner in runners.items():
                runner.pinned = union.pins.get(key)
                if runner.pinned is None:
                    runner.pin_weights()
            out = self._blocks_forward(replace(call, batch=replace(call.batch, decode=union)), hidden)
            for key, runner in runners.items():
                union.pins[key] = runner.pinned
        finally:
            for runner in runners.values():
                runner.pinned = None
        return out

    # -- what decode steps remove ------------------------------------------------------------------------
    def _first_decode_step(self, state: DecodeState) -> None:
        """Record the share of prunable weights this ``generate`` call's decode steps remove."""
        self.decode_record.append(self._decode_removed(state) / self.total_prunable_params())

    def _decode_removed(self, state: DecodeState) -> float:
        """Weights the decode steps of ``state`` remove (per row, averaged over the rows)."""
        if state.policy == "dense":
            return 0.0
        if not state.rows:
            return self.removed_by_masks(state.masks)
        if self.method.sequence_decode == "union":
            masks = union_masks([row.masks for row in state.rows])
            if not isinstance(masks, str):
                return self.removed_by_masks(masks)
        return sum(self.removed_by_masks(row.masks) for row in state.rows) / len(state.rows)

    def removed_by_masks(self, masks: dict[BlockKey, BlockMask]) -> float:
        """Prunable weights the ``masks`` remove in a decode step (with a cache that keeps every
        key/value head, ``decision: sequence`` or ``prefill: dense``, the key/value heads all run)."""
        removed = 0
        for (_, kind), mask in masks.items():
            per_unit, per_kv = self._params_per_unit(kind)
            removed += (mask.total_units - mask.n_kept) * per_unit
            if mask.kept_kv_heads is not None and not self._full_kv:
                removed += (self.adapter.geometry(kind).num_kv_heads - mask.kept_kv_heads.numel()) * per_kv
        return float(removed)

    @property
    def decode_record(self) -> list[float]:
        """The share of prunable weights removed by the decode steps of each ``generate`` call (one entry
        per call with decode steps, in order)."""
        record: list[float] | None = self.__dict__.get("_decode_record")
        if record is None:
            record = self.__dict__["_decode_record"] = []
        return record

    def decode_realised_ratio(self) -> float | None:
        """Mean over ``generate`` calls of the share of the decoder's prunable weights their decode
        steps removed (None: no decode step ran). For a ``prefill: dense`` method this is what pruning
        does; its :meth:`realised_ratio` records the prompts, which run dense."""
        record = self.decode_record
        return sum(record) / len(record) if record else None
