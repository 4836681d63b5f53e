"""``prefill: dense``: a decision forward runs each pruned layer unpruned, captures the inputs of its
output projections on the way, and decides every block's mask (for the decode steps) from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ppframework import validation
from ppframework.adapters.base import BlockRunner
from ppframework.pipeline.batch import _Batch
from ppframework.pipeline.rows import RowDecisions
from ppframework.strategies.inference import squared_mean_per_position
from ppframework.types import BlockKind, BlockMask


@dataclass(frozen=True)
class DenseActivations:
    """One block's activations from a dense forward, in position layout: the input ``z`` of its output
    projection, the residual stream before it and its normed input."""

    z: torch.Tensor
    residual: torch.Tensor
    normed: torch.Tensor

    def row(self, row: int, length: int) -> DenseActivations:
        """Row ``row``'s first ``length`` positions, batch dimension kept."""
        part = slice(row, row + 1), slice(0, length)
        return DenseActivations(self.z[part], self.residual[part], self.normed[part])


class DensePrefill(RowDecisions):
    """Decisions made from a dense prefill's own activations (no probe forward)."""

    def _dense_prefill(
        self, index: int, layer: nn.Module, previous: Any, hidden: torch.Tensor, args: tuple, kwargs: dict
    ) -> Any:
        """A decision forward under ``prefill: dense``: the layer's own forward runs unpruned (so the
        logits and the key/value cache are exactly the dense model's), and the inputs of its output
        projections, captured on the way, are the activations the decision is made from.

        For every pruned block the probe's rows and positions of those exact activations are the
        evidence ``score_channels`` scores (no probe forward), fused with the history; the mask chosen
        serves the decode steps that continue the cache. The history is updated from every channel
        (all were computed), at real positions only. Under ``decision: sequence`` each row decides
        from its own real tokens, in row order. Static methods keep their mask. A probe strategy with
        ``reads_block_input = False`` (``full``, ``none``) gets zero-width residual and normed tensors
        (the right batch and position sizes), and neither is computed.
        """
        captured: dict[BlockKind, tuple[torch.Tensor, torch.Tensor]] = {}
        handles = []
        for kind in BlockKind:

            def capture(module: nn.Module, inp: tuple, out: torch.Tensor, kind: BlockKind = kind) -> None:
                shape = (*hidden.shape[:2], -1)  # some families (OPT's MLP) run on (B * T, D) rows
                captured[kind] = (inp[0].reshape(shape), out.reshape(shape))

            handles.append(self._runners[(index, kind)].out_proj.register_forward_hook(capture))
        try:
            output = previous(hidden, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        missing = [kind.value for kind in BlockKind if kind not in captured]
        if missing:
            raise RuntimeError(
                f"prefill 'dense': layer {index}'s forward did not call the output projection of its "
                f"{', '.join(missing)} block; this family cannot decide from a dense prefill"
            )
        z_attn, attn_out = captured[BlockKind.ATTENTION]
        batch = self._batch
        assert batch is not None
        batch = batch.on(z_attn.device)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            self._begin_decode(cache, z_attn.shape[0])
        residual: dict[BlockKind, torch.Tensor] = {}
        if self.probe_reads_block_input:
            hidden = hidden.to(z_attn.device)
            residual[BlockKind.ATTENTION] = hidden
            residual[BlockKind.MLP] = self.adapter.block_residual(
                layer, BlockKind.ATTENTION, hidden, attn_out
            )
        for kind in BlockKind:
            if kind not in self.targets:
                continue
            z = captured[kind][0]
            if kind in residual:
                res = residual[kind]
                normed = self.adapter.block_input(layer, kind, res)
            else:  # the probe reads neither: zero-width stand-ins with the batch and position sizes
                res = normed = z.new_empty((*z.shape[:2], 0))
            if batch.shift is not None:
                z, res, normed = (batch.shift.to_positions(t) for t in (z, res, normed))
            self._decide_dense(index, kind, DenseActivations(z, res, normed), batch, cache)
        return output

    def _decide_dense(
        self, index: int, kind: BlockKind, acts: DenseActivations, batch: _Batch, cache: Any
    ) -> None:
        """Decide block ``(index, kind)`` from its dense activations (position layout)."""
        z, normed = acts.z, acts.normed
        runner = self._runners[(index, kind)]
        units = runner.geometry.units
        ran = BlockMask(kept_units=torch.arange(units, device=z.device), total_units=units)
        self._record(index, kind, ran, normed.shape, None)  # what ran: every unit
        frozen = cache is not None and self.method.decode == "frozen"
        if self.is_static:
            self._remember(index, kind, self._static_masks[(index, kind)], cache)
            return
        rows = z.shape[0]
        if self.per_row and rows > 1:
            lengths = batch.row_lengths or [z.shape[1]] * rows
            try:
                for b in range(rows):
                    self._row = b
                    length = lengths[b]
                    row_batch = self._decision_row_batch(length, z.device)
                    self._decide_one(index, kind, runner, acts.row(b, length), row_batch, cache)
            finally:
                self._row = None
            return
        self._decide_one(index, kind, runner, acts, batch, cache)
        if frozen:
            self._pin_for_decode(runner)  # gathered at the first decode step

    def _decide_one(
        self,
        index: int,
        kind: BlockKind,
        runner: BlockRunner,
        acts: DenseActivations,
        batch: _Batch,
        cache: Any,
    ) -> None:
        """Probe, score, fuse, mask and update the history for one decision on dense activations."""
        z, residual, normed = acts.z, acts.residual, acts.normed
        ctx, history = self._decision_context(index, kind, runner, z.shape[1], batch)
        probe = self.hooks.select_probe(ctx, residual, normed, batch.attention_mask)
        if self.validate_outputs:
            validation.check_probe(probe, self.strategies["select_probe"], ctx, *normed.shape[:2])
        states = None
        if probe is not None:
            states = _select(_select(z, 0, probe.batch_index), 1, probe.token_index)
        mask = self._choose_mask(ctx, runner, probe, states, history)
        if ctx.collect_stats:
            stats, valid = squared_mean_per_position(z, batch.attention_mask, batch.has_padding)
            self._update_history(history, stats, valid if batch.has_padding else None, batch, None)
        self._remember(index, kind, mask, cache)


def _select(values: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``values.index_select(dim, index)``, or ``values`` itself when ``index`` picks every entry of
    ``dim`` in order (the ``full`` probe: every row, and every position real in some row): a probe's
    indices are sorted, unique and in range, so as many of them as ``dim`` has entries is ``arange``.
    Saves a copy of the block's activations per decision (the hook's probe states are read-only)."""
    return values if index.numel() == values.shape[dim] else values.index_select(dim, index)
