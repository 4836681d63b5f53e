"""What a pipeline is made of: the method's strategies behind their stage hooks, the checks of its
settings against the model, and the state every part of the pipeline reads (runners, ratios, history,
the current forward, the decode state).

:class:`PipelineState` is the base of every part of :class:`~ppframework.pipeline.Pipeline`; it holds
no behaviour beyond what every part shares (the block context, the pending value checks).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pluggy
import torch
from torch import nn

from ppframework import hookspecs, validation
from ppframework.adapters import ModelAdapter, get_adapter
from ppframework.adapters.base import BlockRunner, GatherBuffers
from ppframework.config import MethodConfig
from ppframework.decoding import DecodeState
from ppframework.errors import ConfigError
from ppframework.history import HistoryStore
from ppframework.metrics.flops import FlopsCounter
from ppframework.pipeline.batch import _Batch
from ppframework.pipeline.record import PruningRecord
from ppframework.pipeline.stages import StageHooks
from ppframework.registry import StrategyRegistry, default_registry
from ppframework.types import BlockContext, BlockKey, BlockKind, BlockMask

logger = logging.getLogger(__package__)  # the package's logger: its lines keep the name ppframework.pipeline


def inflated_ratio(ratio: float, num_layers: int, n_skipped: int, inflate: bool = True) -> float:
    """Per-layer ratio ``p' = round(L / (L - n_skipped) * p, 2)`` (or ``p`` without inflation)."""
    if not inflate or n_skipped == 0 or ratio == 0:
        return ratio
    return round(num_layers / (num_layers - n_skipped) * ratio, 2)


class PipelineState:
    """A pipeline's strategies, settings and state (see :class:`~ppframework.pipeline.Pipeline`)."""

    #: Check every strategy's output at the hook boundary (:mod:`ppframework.validation`); a
    #: broken one raises ``StrategyOutputError`` naming the stage and strategy. Set False per
    #: pipeline to skip the checks (they cost up to two host-device syncs per block on CUDA).
    validate_outputs: bool = True
    #: value checks left on the device (CUDA), read back with the next mask check or forward
    _later_checks: list[validation.Pending | None]

    def __init__(
        self,
        model: nn.Module,
        method: MethodConfig,
        *,
        history: HistoryStore | None = None,
        registry: StrategyRegistry | None = None,
        seed: int = 0,
        field_prefix: str = "method",
    ) -> None:
        self.model = model
        self._later_checks = []
        self.method = method
        self.adapter: ModelAdapter = get_adapter(model)
        registry = registry or default_registry()
        self.strategies = registry.build_method(method, field_prefix)
        self.plugin_manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.plugin_manager.add_hookspecs(hookspecs)
        for stage, strategy in self.strategies.items():
            self.plugin_manager.register(strategy, name=f"{stage}:{getattr(method.strategies, stage).name}")
        self.plugin_manager.check_pending()
        self.hooks = StageHooks(self.plugin_manager)

        pruning = method.pruning
        n_layers = self.adapter.num_layers
        bad = [i for i in pruning.skip_layers if i >= n_layers]
        if bad:
            raise ConfigError(
                f"{field_prefix}.pruning.skip_layers: {bad} out of range for a {n_layers}-layer model"
            )
        skipped = len(pruning.skip_layers)
        if pruning.ratio > 0 and skipped >= n_layers:
            raise ConfigError(f"{field_prefix}.pruning.skip_layers: every layer is skipped; nothing to prune")
        self.layer_ratio = inflated_ratio(pruning.ratio, n_layers, skipped, pruning.inflate_ratio)
        if self.layer_ratio >= 1.0:
            raise ConfigError(
                f"{field_prefix}.pruning.ratio: {pruning.ratio} inflates to a per-layer ratio of "
                f"{self.layer_ratio} >= 1 with {skipped} skipped layers; lower the ratio or skip fewer layers"
            )
        self.pruned_layers = (
            [i for i in range(n_layers) if i not in pruning.skip_layers] if pruning.ratio > 0 else []
        )
        self.targets = {BlockKind(t) for t in pruning.targets}
        self.history = history
        self.needs_history = method.needs_calibration
        self.updates_history = method.history.init == "calibration" and method.history.update != "frozen"
        probe_strategy = self.strategies["select_probe"]
        self.is_static = not getattr(probe_strategy, "dynamic", True) and not self.updates_history
        #: Whether the probe reads the residual stream and normed input (a dense prefill skips both
        #: for a probe that declares ``reads_block_input = False``, as ``full`` and ``none`` do).
        self.probe_reads_block_input = bool(getattr(probe_strategy, "reads_block_input", True))
        allocator = self.strategies["allocate"]
        self._allocation_needs_scores = bool(getattr(allocator, "needs_scores", False))
        #: Per-block ratios a ``from_history`` allocator decided at the first attach of a dynamic
        #: method (from the history as calibrated, before any batch updated it).
        self._history_structure: dict[BlockKey, float] | None = None
        self._allocate_per_batch = bool(getattr(allocator, "per_batch", False)) and not self.is_static
        calibrated = method.history.init == "calibration"
        from_history = bool(getattr(allocator, "from_history", False)) and calibrated
        if self._allocation_needs_scores and not self.is_static and self.pruned_layers and not from_history:
            raise ConfigError(
                f"{field_prefix}.strategies.allocate: {method.strategies.allocate.name!r} needs every "
                "block's scores before the first layer runs, which only static methods have (a probe with "
                "dynamic = False and a frozen or absent history); use allocate 'uniform'"
            )
        #: The ratio ``apply_mask`` gets for each pruned block, as ``allocate`` decided it (filled
        #: when the pipeline attaches; static methods: when they decide).
        self.block_ratios: dict[BlockKey, float] = {}
        self._flops = FlopsCounter.from_adapter(self.adapter)
        self._probe_scales: dict[tuple[int, int], float] = {}
        self._output_gains: dict[BlockKey, torch.Tensor | None] = {}
        self._static_masks: dict[tuple[int, BlockKind], BlockMask] = {}
        self.generator = torch.Generator().manual_seed(seed)
        self.batch_index = -1
        self.record = PruningRecord()
        self._runners = {
            (i, kind): self.adapter.runner(i, kind) for i in self.pruned_layers for kind in BlockKind
        }
        #: Shared storage for the per-batch weight gathers (one buffer per role serves every layer).
        self.buffers = GatherBuffers()
        for runner in self._runners.values():
            runner.buffers = self.buffers
        #: Reuse the probe's exact per-token values in the full pass (None = where it is free: on
        #: CPU; on CUDA it would need the probe rows on the host, a synchronisation per block).
        self.reuse_probe: bool | None = None
        self._profiler: Any = None
        self._batch: _Batch | None = None
        self._handle: Any = None
        self._attached = False
        #: Each pruned layer's instance ``forward`` before attach (None: it had only its class's).
        self._previous_forwards: dict[int, Any] = {}
        #: The decision the last prefill made for the cache it filled (decode steps continue it).
        self._decode: DecodeState | None = None
        self._pinned_for_decode = False
        #: The mask of every pruned block chosen by the last decision forward (a prefill included).
        self.last_masks: dict[tuple[int, BlockKind], BlockMask] = {}
        #: ``decision: sequence``: each row's masks from the last decision forward (one dict per row).
        self.last_row_masks: list[dict[tuple[int, BlockKind], BlockMask]] = []
        self._untracked = False
        #: ``decision: sequence``: rows decide alone and run alone (static methods decide for no batch).
        self.per_row = method.decision == "sequence" and not self.is_static and bool(self.pruned_layers)
        #: ``prefill: dense``: decision forwards run the unpruned layers and decide from what they computed.
        self.dense_prefill = method.prefill == "dense"
        #: The cache keeps every key/value head (rows or dense prefills share one cache layout).
        self._full_kv = self.per_row or self.dense_prefill
        self._row: int | None = None  # the row being run alone (decision: sequence)
        self._record_weight = 1.0  # a row's share of its batch in the removed-weights record
        if self.dense_prefill and self.pruned_layers:
            logger.info(
                "%s: prefill 'dense': decision forwards (prompts, perplexity windows) run the unpruned "
                "layers; only decode steps run on the masks decided from them",
                method.label,
            )

    @property
    def is_dense(self) -> bool:
        """True when the method prunes nothing (the model then runs untouched)."""
        return not self.pruned_layers

    @property
    def history_structure(self) -> dict[BlockKey, float] | None:
        """Per-block ratios a ``from_history`` allocator decided at the first attach (None: not decided,
        or not such an allocator); kept with a saved pipeline (:meth:`Pipeline.save`)."""
        return None if self._history_structure is None else dict(self._history_structure)

    @history_structure.setter
    def history_structure(self, ratios: dict[BlockKey, float] | None) -> None:
        self._history_structure = None if ratios is None else dict(ratios)

    @contextmanager
    def untracked(self) -> Iterator[PipelineState]:
        """Forwards inside this block decide and prune as usual but leave the history unchanged.

        The paper's code runs its first batch once like this as a warm-up (``data.warmup_policy:
        untracked``). The masks are still recorded (skip them with ``realised_ratio(skip_batches)``).
        """
        previous, self._untracked = self._untracked, True
        try:
            yield self
        finally:
            self._untracked = previous

    @property
    def profiler(self) -> Any:
        """The stage profiler timing this pipeline's stages, or None (the default: no cost).

        Anything with a ``stage(name)`` context manager; see
        :class:`ppframework.metrics.stage_profile.StageProfiler`, which also times the five hooks.
        The pipeline times ``probe_forward`` and ``history_update``; the runners ``gather`` and
        the built-in ``infer`` strategies ``statistics``.
        """
        return self._profiler

    @profiler.setter
    def profiler(self, profiler: Any) -> None:
        self._profiler = profiler
        for runner in self._runners.values():
            runner.profiler = profiler

    def _read_later_checks(self) -> None:
        """Read back the value checks still pending from the last forward (see :mod:`validation`)."""
        pending, self._later_checks = self._later_checks, []
        validation.read_pending(pending)

    def _context(
        self,
        index: int,
        kind: BlockKind,
        runner: BlockRunner,
        seq_len: int,
        position_valid: torch.Tensor | None,
        collect: bool,
        has_padding: bool | None = None,
        probe_flops_scale: float = 1.0,
        rows_per_position: torch.Tensor | None = None,
    ) -> BlockContext:
        """The context the stage hooks get for one block of the current batch."""
        return BlockContext(
            layer=index,
            kind=kind,
            batch_index=self.batch_index,
            geometry=runner.geometry,
            seq_len=seq_len,
            generator=self.generator,
            round_to=self.method.pruning.round_to,
            gqa_policy=self.method.pruning.gqa_policy,
            position_valid=position_valid,
            collect_stats=collect,
            has_padding=has_padding,
            mlp_matrices=int(self.adapter.mlp_matrices),
            probe_flops_scale=probe_flops_scale,
            rows_per_position=rows_per_position,
            output_gain=self._output_gain(index, kind),
        )

    def _output_gain(self, index: int, kind: BlockKind) -> torch.Tensor | None:
        """The adapter's output gain of a block (read once, then kept; the weights are frozen)."""
        if (index, kind) not in self._output_gains:
            self._output_gains[(index, kind)] = self.adapter.output_gain(index, kind)
        return self._output_gains[(index, kind)]
