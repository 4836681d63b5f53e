"""How much each pruned block keeps: the ``allocate`` stage (per attach, per batch, or from the
calibration history's scores), and the decisions a static method makes once from the history alone."""

from __future__ import annotations

from ppframework import validation
from ppframework.devices import onloaded
from ppframework.errors import ConfigError
from ppframework.pipeline.state import PipelineState
from ppframework.types import AllocationContext, BlockContext, BlockKey, BlockKind, BlockMask, ChannelScores


class Allocation(PipelineState):
    """``allocate`` and the history-only (static) decisions."""

    def _decide_static(self) -> None:
        """Decide every block once from the history alone and pin its sliced weights.

        The decision sums the history over all the positions it covers (not over one batch's),
        so it is the same for every batch. Every block is scored first, then ``allocate`` decides
        each block's ratio (from the scores when the strategy asks for them), then each block's
        mask is chosen; the sliced weights are gathered on first use and kept.
        """
        blocks = [key for key in self._runners if key[1] in self.targets]
        if any(key not in self._static_masks for key in blocks):
            contexts, scored = self._history_scores()
            given = scored if self._allocation_needs_scores else None
            self.block_ratios = self._allocate(given, self._history_positions())
            for key in blocks:
                runner = self._runners[key]
                mask = self.hooks.apply_mask(contexts[key], scored[key], self.block_ratios[key])
                if self.validate_outputs:
                    hidden = runner.out_proj.weight.shape[0]
                    validation.check_mask(mask, self.strategies["apply_mask"], contexts[key], hidden)
                self._static_masks[key] = mask
        for key in blocks:
            self._runners[key].pin_weights()

    def static_masks(self) -> dict[BlockKey, BlockMask]:
        """A static method's decision: every pruned target block's mask (decided now if not yet).

        Raises :class:`~ppframework.errors.ConfigError` for a dynamic method (it decides per batch) and
        for a method that needs a calibration history the pipeline does not have.
        """
        if not self.is_static:
            raise ConfigError(
                f"{self.method.label}: a dynamic method decides per batch and has no single decision; "
                "save its state with Pipeline.save(DIR) instead"
            )
        if getattr(self.strategies["allocate"], "removes_layers", False):
            raise ConfigError(
                f"{self.method.label}: strategies.allocate {self.method.strategies.allocate.name!r} removes "
                "whole layers and has no per-block masks; Pipeline.layers_to_remove() lists them (an export "
                "drops them)"
            )
        if self.needs_history and self.history is None:
            raise ConfigError(
                "history.init: this method needs a calibration history; build the pipeline with "
                "ppframework.build_pipeline (it calibrates or loads the cache) or pass history=..."
            )
        if not self.is_dense:
            self._decide_static()
        return dict(self._static_masks)

    def _history_scores(self) -> tuple[dict[BlockKey, BlockContext], dict[BlockKey, ChannelScores]]:
        """Every pruned block scored from the history alone (no probe), with the method's metric and
        fusion over all the positions the history covers: (contexts, scores) per block."""
        contexts: dict[BlockKey, BlockContext] = {}
        scored: dict[BlockKey, ChannelScores] = {}
        for index, kind in (key for key in self._runners if key[1] in self.targets):
            runner = self._runners[(index, kind)]
            history = self.history.get(index, kind) if self.history is not None else None
            positions = history.sq_mean.shape[0] if history is not None else 1
            ctx = self._context(index, kind, runner, positions, None, False)
            with onloaded(runner.out_proj):  # offloaded weights (device maps) are read back
                scores = self.hooks.score_channels(ctx, None, None, runner.out_proj.weight)
            if self.validate_outputs:
                validation.check_scores(scores, self.strategies["score_channels"], ctx)
            scores = self.hooks.fuse_history(ctx, scores, history)
            if self.validate_outputs:
                validation.check_fused(scores, self.strategies["fuse_history"], ctx, defer=False)
            contexts[(index, kind)], scored[(index, kind)] = ctx, scores
        return contexts, scored

    def allocation_context(self, seq_len: int = 1, batch_index: int = -1) -> AllocationContext:
        """What the ``allocate`` strategy is told about the model and this method."""
        pruning = self.method.pruning
        attention = self.adapter.geometry(BlockKind.ATTENTION)
        follow = self._flops.kv_follow_query or attention.group_size == 1  # k/v rows go with the head
        return AllocationContext(
            num_layers=self.adapter.num_layers,
            pruned_layers=tuple(self.pruned_layers),
            targets=tuple(kind for kind in BlockKind if kind in self.targets),
            geometries={kind: self.adapter.geometry(kind) for kind in BlockKind},
            hidden_size=int(self.adapter.config.hidden_size),
            mlp_matrices=int(self.adapter.mlp_matrices),
            layer_ratio=self.layer_ratio,
            seq_len=max(int(seq_len), 1),
            round_to=pruning.round_to,
            gqa_policy=pruning.gqa_policy,
            kv_follow_query=bool(follow),
            batch_index=batch_index,
        )

    def _allocate(
        self, scores: dict[BlockKey, ChannelScores] | None, seq_len: int, batch_index: int = -1
    ) -> dict[BlockKey, float]:
        """Ask ``allocate`` for every pruned block's ratio and check the answer."""
        plan = self.allocation_context(seq_len, batch_index)
        ratios = self.hooks.allocate(plan, scores, self.method.pruning.ratio)
        if self.validate_outputs:
            ratios = validation.check_allocation(ratios, self.strategies["allocate"], plan)
        return ratios

    def _history_positions(self) -> int:
        """Positions the history covers (1 without a history): the sequence length of a decision
        made at attach."""
        return self.history.max_positions if self.history is not None and self.history.max_positions else 1
