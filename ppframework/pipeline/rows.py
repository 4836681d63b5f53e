"""``decision: sequence``: every row of a batch decides alone and runs alone, on its own real tokens at
a decision forward and on its own masks and pinned weights at a decode step."""

from __future__ import annotations

import torch

from ppframework.adapters.kv_cache import RowCache
from ppframework.pipeline.batch import LayerCall, _Batch
from ppframework.pipeline.decision import Decisions
from ppframework.types import BlockKind


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
        row_cache = RowCache(cache, rows, batch.past) if cache is not None else None
        runners = {(index, kind): self._runners[(index, kind)] for kind in BlockKind}
        frozen = self.method.decode == "frozen"
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
