"""The decision path of one pruned block on a decision forward: probe -> score -> fuse -> mask ->
infer, every strategy's answer checked, then the history update and the record of the mask chosen."""

from __future__ import annotations

from typing import Any

import torch

from ppframework import validation
from ppframework.adapters.base import BlockRunner, ProbeReuse
from ppframework.pipeline.accounting import Accounting
from ppframework.pipeline.batch import LayerCall, _Batch
from ppframework.pipeline.decode import DecodeSteps
from ppframework.pipeline.stages import no_stage
from ppframework.types import BlockContext, BlockInputs, BlockKind, BlockMask, Probe


class Decisions(Accounting, DecodeSteps):
    """A pruned layer's blocks run through the five stage hooks (dense blocks run untouched)."""

    def _blocks_forward(self, call: LayerCall, hidden: torch.Tensor) -> torch.Tensor:
        """The layer's attention then MLP block on ``hidden`` (position layout)."""
        layer, batch, rotary = call.layer, call.batch, call.rotary
        for kind in BlockKind:
            normed = self.adapter.block_input(layer, kind, hidden)
            inputs = BlockInputs(
                normed=normed,
                residual=hidden,
                attention_mask=batch.attention_mask,
                attn_bias=batch.attn_bias(normed.dtype) if kind is BlockKind.ATTENTION else None,
                rotary=rotary if kind is BlockKind.ATTENTION else None,
                has_padding=batch.has_padding,
            )
            out = self._run_block(call.index, kind, inputs, batch, call.cache)
            hidden = self.adapter.block_residual(layer, kind, hidden, out)
        return hidden

    def _run_block(
        self, index: int, kind: BlockKind, inputs: BlockInputs, batch: _Batch, cache: Any = None
    ) -> torch.Tensor:
        """Block ``(index, kind)`` of the current forward: untouched when it is not a target, else a
        frozen decode step, a static method's mask, or the decision path."""
        runner = self._runners[(index, kind)]
        slot = self._slot(runner, kind, batch, cache)
        if kind not in self.targets:
            runner.kv_slot = slot
            try:
                z = runner.pre_output(
                    inputs.normed,
                    attention_mask=inputs.attention_mask if batch.has_padding else None,
                    attn_bias=inputs.attn_bias,
                    rotary=inputs.rotary,
                )
            finally:
                runner.kv_slot = None
            return runner.output(z)
        if batch.decode is not None:  # a frozen decode step: the prefill's mask, its pinned weights
            return self._frozen_step(index, kind, runner, inputs, batch.decode, slot)
        ctx, history = self._decision_context(index, kind, runner, inputs.normed.shape[1], batch)
        hooks = self.hooks
        check, picked = self.validate_outputs, self.strategies
        if self.is_static:
            mask = self._static_masks[(index, kind)]
            result = self._infer(ctx, runner, inputs, mask, slot)
            if check:
                self._later_checks.append(
                    validation.check_output(result, picked["infer"], ctx, inputs.residual.shape, mask, None)
                )
            self._record(index, kind, mask, inputs.normed.shape, None)
            self._remember(index, kind, mask, cache)
            return result.output
        stage = no_stage if self._profiler is None else self._profiler.stage
        probe = hooks.select_probe(ctx, inputs.residual, inputs.normed, inputs.attention_mask)
        if check:
            validation.check_probe(probe, picked["select_probe"], ctx, *inputs.normed.shape[:2])
        states = None
        if probe is not None:
            with stage("probe_forward"):
                states, inputs.probe_reuse = self._probe_pass(runner, probe, inputs, batch)
        mask = self._choose_mask(ctx, runner, probe, states, history)
        if cache is not None and self.method.decode == "frozen":
            self._pin_for_decode(runner)  # gathered by this forward's full pass
        result = self._infer(ctx, runner, inputs, mask, slot)
        if check:
            self._later_checks.append(
                validation.check_output(result, picked["infer"], ctx, inputs.residual.shape, mask, None)
            )
        inputs.probe_reuse = None
        if ctx.collect_stats and result.sq_mean is not None:
            with stage("history_update"):
                valid = result.position_valid if batch.has_padding else None
                self._update_history(history, result.sq_mean, valid, batch, result.kept_channels)
        self._record(index, kind, mask, inputs.normed.shape, probe)
        self._remember(index, kind, mask, cache)
        return result.output

    def _probe_pass(
        self, runner: BlockRunner, probe: Probe, inputs: BlockInputs, batch: _Batch
    ) -> tuple[torch.Tensor, ProbeReuse | None]:
        """The probe forward, plus what the full pass may reuse when that is enabled and free."""
        reuse = self.reuse_probe
        if reuse is None:
            reuse = inputs.normed.device.type == "cpu"
        reuse = (
            reuse
            and not torch.is_grad_enabled()
            and getattr(self.strategies["infer"], "uses_probe_reuse", False)
        )
        return runner.probe_forward(
            inputs.normed,
            probe.batch_index,
            probe.token_index,
            attention_mask=probe.valid.long() if batch.has_padding else None,
            rotary=inputs.rotary,
            keep_for_reuse=reuse,
        )

    def _decision_context(
        self, index: int, kind: BlockKind, runner: BlockRunner, seq_len: int, batch: _Batch
    ) -> tuple[BlockContext, Any]:
        """The context of a decision on block ``(index, kind)`` for ``batch``, and the block's history
        (None without one); the context collects statistics when the history is updated."""
        history = self.history.get(index, kind) if self.history is not None else None
        collect = history is not None and self.updates_history and not self._untracked
        ctx = self._context(
            index,
            kind,
            runner,
            seq_len,
            batch.position_valid,
            collect,
            batch.has_padding,
            batch.probe_flops_scale,
            batch.rows_per_position,
        )
        return ctx, history

    def _choose_mask(
        self,
        ctx: BlockContext,
        runner: BlockRunner,
        probe: Probe | None,
        states: torch.Tensor | None,
        history: Any,
    ) -> BlockMask:
        """``score_channels``, ``fuse_history`` and ``apply_mask`` for one decision, each answer checked
        (value checks read back together with the mask's, an earlier block's first)."""
        hooks, check, picked = self.hooks, self.validate_outputs, self.strategies
        scores = hooks.score_channels(ctx, probe, states, runner.out_proj.weight)
        pending = self._later_checks
        if check:
            pending.append(validation.check_scores(scores, picked["score_channels"], ctx, probe, None))
        scores = hooks.fuse_history(ctx, scores, history)
        if check:
            pending.append(validation.check_fused(scores, picked["fuse_history"], ctx))
        mask = hooks.apply_mask(ctx, scores, self.block_ratios[(ctx.layer, ctx.kind)])
        if check:
            self._later_checks = []
            validation.check_mask(mask, picked["apply_mask"], ctx, runner.out_proj.weight.shape[0], pending)
        return mask

    def _update_history(
        self,
        history: Any,
        stats: torch.Tensor,
        position_valid: torch.Tensor | None,
        batch: _Batch,
        channels: torch.Tensor | None,
    ) -> None:
        """One history update by the method's rule (EMA or running mean) from a decision's statistics
        (``channels`` None: every channel)."""
        if self.method.history.update == "running-mean":
            history.running_mean_update(stats, batch.rows_per_position, channels)
        else:
            history.ema_update(stats, position_valid, channels, self.method.history.momentum)

    def _remember(self, index: int, kind: BlockKind, mask: BlockMask, cache: Any) -> None:
        """Keep a decision's mask (for the decode steps that will continue its cache, if any)."""
        self.last_masks[(index, kind)] = mask
        row = self._row
        if row is not None:
            while len(self.last_row_masks) <= row:
                self.last_row_masks.append({})
            self.last_row_masks[row][(index, kind)] = mask
        if cache is not None and self._decode is not None:
            state = self._decode if row is None else self._decode.rows[row]
            state.masks[(index, kind)] = mask
