"""The Pipeline: attaches to a model, asks ``allocate`` how much each pruned block keeps, and runs
every pruned block through the five per-block stage hooks."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import pluggy
import torch
from torch import nn

from ppframework import hookspecs, validation
from ppframework.adapters import ModelAdapter, get_adapter
from ppframework.adapters.base import BlockRunner, GatherBuffers, ProbeReuse, additive_attention_bias
from ppframework.adapters.kv_cache import KVSlot, RowCache, cache_length
from ppframework.config import MethodConfig
from ppframework.decoding import DecodeState
from ppframework.devices import execution_device, has_offloaded_weights, hook_of, onloaded
from ppframework.errors import ConfigError
from ppframework.history import HistoryStore
from ppframework.metrics.flops import FlopsCounter
from ppframework.positions import RowShift, row_shifts
from ppframework.registry import StrategyRegistry, default_registry
from ppframework.strategies.inference import squared_mean_per_position
from ppframework.types import (
    AllocationContext,
    BlockContext,
    BlockInputs,
    BlockKey,
    BlockKind,
    BlockMask,
    ChannelScores,
    Probe,
)

logger = logging.getLogger(__name__)

_NO_STAGE = nullcontext()


def _no_stage(name: str) -> AbstractContextManager[None]:
    """The stage timer used when no profiler is set: does nothing."""
    return _NO_STAGE


def _pipeline_forward(layer: nn.Module) -> Pipeline | None:
    """The pipeline whose forward is set on ``layer``, or None."""
    return getattr(layer.__dict__.get("forward"), "_ppf_pipeline", None)


def _row_rotary(
    rotary: tuple[torch.Tensor, torch.Tensor] | None, row: int, length: int | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Row ``row``'s rotary tables (its first ``length`` positions; None = all), batch dimension kept."""
    if rotary is None:
        return None

    def take(table: torch.Tensor) -> torch.Tensor:
        table = table if table.shape[0] == 1 else table[row : row + 1]
        return table if length is None else table[:, :length]

    return take(rotary[0]), take(rotary[1])


def inflated_ratio(ratio: float, num_layers: int, n_skipped: int, inflate: bool = True) -> float:
    """Per-layer ratio ``p' = round(L / (L - n_skipped) * p, 2)`` (or ``p`` without inflation)."""
    if not inflate or n_skipped == 0 or ratio == 0:
        return ratio
    return round(num_layers / (num_layers - n_skipped) * ratio, 2)


class StageHooks:
    """Typed facade over a pipeline's plugin manager: one method per stage hook."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._hook = pm.hook

    def allocate(
        self, plan: AllocationContext, scores: dict[BlockKey, ChannelScores] | None, target: float
    ) -> dict[BlockKey, float]:
        return self._hook.allocate(plan=plan, scores=scores, target=target)

    def select_probe(
        self, ctx: BlockContext, residual: torch.Tensor, normed: torch.Tensor, attention_mask: torch.Tensor
    ) -> Probe | None:
        return self._hook.select_probe(
            ctx=ctx, residual=residual, normed=normed, attention_mask=attention_mask
        )

    def score_channels(
        self, ctx: BlockContext, probe: Probe | None, probe_states: torch.Tensor | None, weight: torch.Tensor
    ) -> Any:
        return self._hook.score_channels(ctx=ctx, probe=probe, probe_states=probe_states, weight=weight)

    def fuse_history(self, ctx: BlockContext, scores: Any, history: Any) -> Any:
        return self._hook.fuse_history(ctx=ctx, scores=scores, history=history)

    def apply_mask(self, ctx: BlockContext, scores: Any, ratio: float) -> BlockMask:
        return self._hook.apply_mask(ctx=ctx, scores=scores, ratio=ratio)

    def infer(self, ctx: BlockContext, block: BlockRunner, inputs: BlockInputs, mask: BlockMask) -> Any:
        return self._hook.infer(ctx=ctx, block=block, inputs=inputs, mask=mask)


@dataclass
class _Batch:
    """What the backbone's forward pre-hook learns about the current forward.

    A decision forward (nothing cached before) carries its mask in position layout (``shift`` rolls
    left-padded rows so that columns are positions). A decode step continues a cache this pipeline
    filled: ``past`` tokens are cached, ``key_mask`` covers them and the new ones.
    """

    attention_mask: torch.Tensor
    position_valid: torch.Tensor | None
    has_padding: bool
    rows_per_position: torch.Tensor | None
    shift: RowShift | None = None
    probe_flops_scale: float = 1.0
    decode: DecodeState | None = None
    past: int = 0
    key_mask: torch.Tensor | None = None
    row_lengths: list[int] | None = None
    _bias: dict[torch.dtype, torch.Tensor | None] = field(default_factory=dict)
    _key_bias: dict[Any, torch.Tensor | None] = field(default_factory=dict)
    _rotary: tuple[Any, tuple[torch.Tensor, torch.Tensor] | None] | None = None
    _placed: dict[torch.device, _Batch] = field(default_factory=dict)

    @property
    def decoding(self) -> bool:
        """Whether this forward is a decode step (it continues a cache)."""
        return self.decode is not None

    def on(self, device: torch.device) -> _Batch:
        """This forward's batch with its tensors on ``device`` (a layer's device in a device-mapped
        model): self when they are there already, else a copy made once per device and forward."""
        if self.attention_mask.device == device:
            return self
        placed = self._placed.get(device)
        if placed is None:

            def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
                return None if tensor is None else tensor.to(device)

            placed = replace(
                self,
                attention_mask=self.attention_mask.to(device),
                position_valid=move(self.position_valid),
                rows_per_position=move(self.rows_per_position),
                shift=None if self.shift is None else self.shift.to(device),
                key_mask=move(self.key_mask),
                _bias={},
                _key_bias={},
                _rotary=None,
                _placed={},
            )
            self._placed[device] = placed
        return placed

    def attn_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        if not self.has_padding or self.decoding:
            return None
        if dtype not in self._bias:
            self._bias[dtype] = additive_attention_bias(self.attention_mask, dtype)
        return self._bias[dtype]

    def aligned_rotary(
        self, rotary: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The model's rotary tables in this forward's layout (rolled once, shared by the layers)."""
        if rotary is None or self.shift is None:
            return rotary
        if self._rotary is None or self._rotary[0] is not rotary[0]:
            cos, sin = rotary
            self._rotary = (rotary[0], (self.shift.to_positions(cos), self.shift.to_positions(sin)))
        return self._rotary[1]

    def kv_slot(self, cache: Any, layer_idx: int, full_kv: bool) -> KVSlot:
        """A slot of the model's cache for one attention block of this forward."""
        return KVSlot(
            cache,
            layer_idx,
            self.past,
            key_mask=self.key_mask,
            shift=self.shift,
            full_kv=full_kv,
            bias_cache=self._key_bias,
        )


@dataclass(frozen=True)
class BlockEvent:
    """The shapes one pruned block actually used for one batch (for FLOPs accounting)."""

    batch: int
    layer: int
    kind: BlockKind
    batch_size: int
    seq_len: int
    kept_units: int
    kept_kv_heads: int
    probe_rows: int
    probe_tokens: int


@dataclass
class PruningRecord:
    """Kept-unit counts per batch, for the realised model-wide ratio, and per-block shapes."""

    removed_params: list[float] = field(default_factory=list)
    kept_units: dict[tuple[int, BlockKind], list[int]] = field(default_factory=dict)
    events: list[BlockEvent] = field(default_factory=list)


def _refuse_after_detach(cache: Any, label: str) -> None:
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


class Pipeline:
    """Online dynamic structured pruning of one model with one method.

    Use as a context manager: inside ``with pipe:`` every forward of the model runs pruned.
    Attaching replaces the forward of each pruned decoder layer (weights stay shared);
    detaching restores the original forwards exactly. ``with`` blocks nest: only the outermost
    exit detaches.
    """

    #: Check every strategy's output at the hook boundary (:mod:`ppframework.validation`); a
    #: broken one raises ``StrategyOutputError`` naming the stage and strategy. Set False per
    #: pipeline to skip the checks (they cost up to two host-device syncs per block on CUDA).
    validate_outputs: bool = True
    _with_depth: int = 0  # nesting of `with pipe:` blocks
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

    # -- attach / detach -----------------------------------------------------------------------
    @property
    def is_dense(self) -> bool:
        """True when the method prunes nothing (the model then runs untouched)."""
        return not self.pruned_layers

    def attach(self) -> Pipeline:
        """Route the model's pruned layers through the pipeline."""
        if self._attached:
            return self
        if self.needs_history and self.history is None:
            raise ConfigError(
                "history.init: this method needs a calibration history; build the pipeline with "
                "ppframework.build_pipeline (it calibrates or loads the cache) or pass history=..."
            )
        layers = self.adapter.layers
        devices = [execution_device(layer) for layer in layers]
        if self.history is not None:
            required = self.pruned_layers if self.needs_history else ()
            validation.check_history(self.history, self.adapter, required, self.targets)
            self.history.place(lambda layer: devices[layer])  # each block's history beside its layer
        if not self.is_dense:
            if any(_pipeline_forward(layers[i]) is not None for i in self.pruned_layers):
                raise RuntimeError(
                    "another pipeline is already attached to this model; detach it first (use `with pipe:`)"
                )
            if self.is_static:  # before patching: a failing decision leaves the model untouched
                self._decide_static()
            elif self._allocation_needs_scores:  # a structure from the calibration history's scores
                if self._history_structure is None:  # decided at the first attach, kept after
                    _, scored = self._history_scores()
                    self._history_structure = self._allocate(scored, self._history_positions())
                self.block_ratios = dict(self._history_structure)
            else:
                self.block_ratios = self._allocate(None, self._history_positions())
            backbone = self._backbone()
            self._handle = backbone.register_forward_pre_hook(self._on_forward, with_kwargs=True)
            self._previous_forwards = {}
            for index in self.pruned_layers:
                layer = layers[index]
                # Whatever forward the instance has (accelerate's hooked one included) is kept, called
                # for dense decode steps, and put back exactly on detach.
                self._previous_forwards[index] = layer.__dict__.get("forward")
                layer.forward = self._layer_forward_fn(index, layer, layer.forward)
        self._attached = True
        return self

    def detach(self) -> None:
        """Restore the model's original forwards.

        The key/value cache of the last prefill (if a generation still holds it) is marked so that
        continuing it without the pipeline raises a clear error instead of mixing decisions.
        """
        if not self._attached:
            return
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        previous_forwards, self._previous_forwards = self._previous_forwards, {}
        for index in self.pruned_layers:
            layer = self.adapter.layers[index]
            if _pipeline_forward(layer) is not self:
                if index in previous_forwards:
                    logger.warning(
                        "layer %d's forward was replaced while the pipeline was attached; leaving it",
                        index,
                    )
                continue
            previous = previous_forwards.get(index)
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous
        self._batch = None
        state = self._decode
        cache = state.cache() if state is not None else None
        if cache is not None:
            _refuse_after_detach(cache, self.method.label)
        self._end_decode()
        self._attached = False

    @contextmanager
    def untracked(self) -> Iterator[Pipeline]:
        """Forwards inside this block decide and prune as usual but leave the history unchanged.

        The paper's code runs its first batch once like this as a warm-up (``data.warmup_policy:
        untracked``). The masks are still recorded (skip them with ``realised_ratio(skip_batches)``).
        """
        previous, self._untracked = self._untracked, True
        try:
            yield self
        finally:
            self._untracked = previous

    def release(self) -> None:
        """Detach and drop a static method's cached sliced weights (they are otherwise kept for
        the pipeline's lifetime, so re-attaching costs no gather) and the gather buffers."""
        self.detach()
        for runner in self._runners.values():
            runner.unpin_weights()
        self.buffers.clear()

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

    def __enter__(self) -> Pipeline:
        self.attach()
        self._with_depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._with_depth -= 1
        if self._with_depth <= 0:  # only the outermost `with` detaches
            self._with_depth = 0
            try:
                if exc[0] is None:
                    self._read_later_checks()  # the last forward's, so no bad output goes unreported
            finally:
                self._later_checks = []
                self.detach()

    def _backbone(self) -> nn.Module:
        layers = self.adapter.layers
        for module in self.model.modules():
            if any(child is layers for child in module.children()):
                return module
        raise RuntimeError("could not find the module that owns the decoder layers")

    # -- per batch ------------------------------------------------------------------------------
    def _read_later_checks(self) -> None:
        """Read back the value checks still pending from the last forward (see :mod:`validation`)."""
        pending, self._later_checks = self._later_checks, []
        validation.read_pending(pending)

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        self._read_later_checks()
        ref = kwargs.get("input_ids", args[0] if args else None)
        if ref is None:
            ref = kwargs.get("inputs_embeds")
        batch, seq = ref.shape[:2]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(
                "ppframework needs a 2-D attention_mask (batch, seq) of 1 for tokens, 0 for padding; a "
                "4-D mask comes from a static cache (generate(cache_implementation='static')), which the "
                "pipeline does not support: use the default dynamic cache"
            )
        past = cache_length(cache)
        if past > 0:
            self._batch = self._decode_batch(cache, past, batch, seq, mask, ref.device)
            return args, kwargs
        self._end_decode()
        if cache is None and kwargs.get("use_cache") is not True:
            kwargs["use_cache"] = False  # nothing will continue this forward: no cache to fill
        if mask is None:
            mask = torch.ones(batch, seq, dtype=torch.long, device=ref.device)
        elif mask.shape[1] != seq:
            raise ValueError(
                f"attention_mask: {mask.shape[1]} columns for {seq} tokens and nothing cached; "
                "a forward without a cache needs one mask column per token"
            )
        if self.history is not None and self.history.max_positions and seq > self.history.max_positions:
            self._extend_history(seq)
        self.adapter.check_supported(seq)
        real = mask.bool()
        has_padding = not bool(real.all())
        positions = kwargs.get("position_ids")
        if positions is None and has_padding:  # without padding the model's own positions are columns
            positions = self.adapter.default_positions(mask)
        shift = row_shifts(mask, positions) if positions is not None and positions.dim() == 2 else None
        if shift is not None:
            mask = shift.to_positions(mask)
            real = mask.bool()
        self._batch = _Batch(
            mask,
            real.any(dim=0),
            has_padding,
            real.sum(dim=0),
            shift=shift,
            probe_flops_scale=self._probe_flops_scale(batch, seq),
            row_lengths=[int(n) for n in real.sum(dim=1).tolist()] if self.per_row and batch > 1 else None,
        )
        self.batch_index += 1
        self.record.removed_params.append(0.0)
        if self.per_row:
            self.last_row_masks = []
        if self._allocate_per_batch:
            self.block_ratios = self._allocate(None, seq, self.batch_index)
        return args, kwargs

    def _extend_history(self, seq: int) -> None:
        """An input longer than the history: extend it (``history.beyond: extend``) or refuse."""
        assert self.history is not None
        known = self.history.max_positions
        if self.method.history.beyond == "refuse":
            raise ValueError(
                f"sequence length {seq} exceeds the history's {known} positions; calibrate with "
                "calibration.seq_len >= the longest input (data.seq_len, prompts), or set "
                "history.beyond: extend"
            )
        logger.info(
            "%s: input of %d tokens past the history's %d positions; positions %d-%d start from the mean "
            "of the calibrated positions (history.beyond: extend)",
            self.method.label,
            seq,
            known,
            known,
            seq - 1,
        )
        self.history.extend(seq)
        self.history.place(lambda layer: execution_device(self.adapter.layers[layer]))

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
        if mask is None:
            current = torch.ones(batch, seq, dtype=torch.long, device=device)
        else:
            current = mask[:, past:]
        return _Batch(current, None, False, None, decode=state, past=past, key_mask=mask)

    def _end_decode(self) -> None:
        """Forget the last prefill's decision and free the weights it pinned for its decode steps."""
        self._decode = None
        if self._pinned_for_decode and not self.is_static:
            for runner in self._runners.values():
                runner.unpin_weights()
        self._pinned_for_decode = False

    def _layer_forward_fn(self, index: int, layer: nn.Module, previous: Any) -> Any:
        """The forward the pipeline sets on a pruned layer; ``previous`` is the forward the layer had
        (its class's, or accelerate's hooked one), which dense decode steps call unchanged.

        On the pruned path an accelerate hook on the layer still does its work: its ``pre_forward``
        moves the inputs to the layer's execution device (and loads weights it offloads), its
        ``post_forward`` offloads them again and moves the output where the hook wants it; the
        layer's submodules' offloaded weights are materialised for the whole layer (:func:`onloaded`),
        as the block runners read them directly.
        """

        offloads = has_offloaded_weights(layer)  # known at attach: no walk per forward otherwise

        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            batch = self._batch
            if batch is not None and batch.decoding and batch.decode.policy == "dense":
                return previous(hidden_states, *args, **kwargs)
            if batch is not None and not batch.decoding and self.dense_prefill:
                return self._dense_prefill(index, layer, previous, hidden_states, args, kwargs)
            weights = onloaded(layer) if offloads else _NO_STAGE
            hook = hook_of(layer)
            if hook is None:
                with weights:
                    return self._layer_forward(index, layer, hidden_states, kwargs)
            moved, kwargs = hook.pre_forward(layer, hidden_states, *args, **kwargs)
            try:
                with torch.no_grad() if getattr(hook, "no_grad", False) else nullcontext(), weights:
                    output = self._layer_forward(index, layer, moved[0], kwargs)
            except BaseException:
                hook.post_forward(layer, None)  # offload what pre_forward loaded
                raise
            return hook.post_forward(layer, output)

        forward._ppf_pipeline = self  # type: ignore[attr-defined]
        return forward

    def _layer_forward(
        self, index: int, layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        batch = self._batch
        if batch is None:
            raise RuntimeError(
                "the pipeline's layer ran outside a model forward; call the model, not the layer"
            )
        batch = batch.on(hidden.device)  # masks and positions beside this layer
        rotary = batch.aligned_rotary(self.adapter.rotary(kwargs))
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and not batch.decoding:
            self._begin_decode(cache, hidden.shape[0])
        if batch.shift is not None:
            hidden = batch.shift.to_positions(hidden)
        if self.per_row and hidden.shape[0] > 1:
            hidden = self._rows_forward(index, layer, hidden, batch, rotary, cache)
        else:
            hidden = self._blocks_forward(index, layer, hidden, batch, rotary, cache)
        if batch.shift is not None:
            hidden = batch.shift.to_columns(hidden)
        return hidden

    def _blocks_forward(
        self,
        index: int,
        layer: nn.Module,
        hidden: torch.Tensor,
        batch: _Batch,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        cache: Any,
    ) -> torch.Tensor:
        """Layer ``index``'s attention then MLP block on ``hidden`` (position layout)."""
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
            out = self._run_block(index, kind, inputs, batch, cache)
            hidden = self.adapter.block_residual(layer, kind, hidden, out)
        return hidden

    def _begin_decode(self, cache: Any, rows: int) -> None:
        """A decision forward that fills ``cache``: start the state its decode steps will continue."""
        if self._decode is not None and self._decode.owns(cache):
            return  # an earlier layer of this forward started it
        self._decode = DecodeState.for_cache(cache, self.method.decode)
        if self.per_row and rows > 1:
            self._track_rows(self._decode, cache, rows)

    # -- decision: sequence -------------------------------------------------------------------------
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
                current.rows[:] = [current.rows[i] for i in beam_idx.tolist()]
            return result

        cache.reorder_cache = reorder_rows  # this cache object only; it dies with the generation

    def _rows_forward(
        self,
        index: int,
        layer: nn.Module,
        hidden: torch.Tensor,
        batch: _Batch,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        cache: Any,
    ) -> torch.Tensor:
        """Layer ``index`` with every row run alone (``decision: sequence``), in position layout.

        A decision forward runs row ``b`` on its ``row_lengths[b]`` real tokens as a batch of one,
        so it decides and computes exactly what that prompt alone would (padding never runs); a
        decode step runs row ``b`` on the masks and sliced weights of its own prefill. Every row of
        a layer decides from the history as it stood before that row, and updates it after, in
        row order: as if the prompts had come one at a time. The rows' keys and values reach the
        model's cache in one update per layer (:class:`RowCache`).
        """
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
                    row_rotary = _row_rotary(rotary, b, None)
                else:
                    length = batch.row_lengths[b] if batch.row_lengths is not None else seq
                    row_hidden = hidden[b : b + 1, :length]
                    row_batch = self._decision_row_batch(length, hidden.device)
                    row_rotary = _row_rotary(rotary, b, length)
                for key, runner in runners.items():  # the row's own pinned weights (none before its prefill)
                    runner.pinned = None if row_state is None else row_state.pins.get(key)
                    if decoding and frozen and runner.pinned is None:
                        runner.pin_weights()  # a dense prefill gathered nothing: the first step does
                row_out = self._blocks_forward(index, layer, row_hidden, row_batch, row_rotary, row_cache)
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

    def _run_block(
        self, index: int, kind: BlockKind, inputs: BlockInputs, batch: _Batch, cache: Any = None
    ) -> torch.Tensor:
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
            mask = batch.decode.masks[(index, kind)]
            ctx = self._context(index, kind, runner, inputs.normed.shape[1], None, False, False)
            return self._infer(ctx, runner, inputs, mask, slot).output
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
        stage = _no_stage if self._profiler is None else self._profiler.stage
        probe = hooks.select_probe(ctx, inputs.residual, inputs.normed, inputs.attention_mask)
        if check:
            validation.check_probe(probe, picked["select_probe"], ctx, *inputs.normed.shape[:2])
        states = None
        if probe is not None:
            with stage("probe_forward"):
                states, inputs.probe_reuse = self._probe_pass(runner, probe, inputs, batch)
        mask = self._choose_mask(ctx, runner, probe, states, history)
        if cache is not None and self.method.decode == "frozen":
            runner.pin_weights()  # gathered once here, reused by every decode step of this generate
            self._pinned_for_decode = True
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

    # -- prefill: dense ------------------------------------------------------------------------------
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
        from its own real tokens, in row order. Static methods keep their mask.
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
        hidden = hidden.to(z_attn.device)
        residual = {BlockKind.ATTENTION: hidden}
        residual[BlockKind.MLP] = self.adapter.block_residual(layer, BlockKind.ATTENTION, hidden, attn_out)
        for kind in BlockKind:
            if kind not in self.targets:
                continue
            z, res = captured[kind][0], residual[kind]
            normed = self.adapter.block_input(layer, kind, res)
            if batch.shift is not None:
                z, res, normed = (batch.shift.to_positions(t) for t in (z, res, normed))
            self._decide_dense(index, kind, z, res, normed, batch, cache)
        return output

    def _decide_dense(
        self,
        index: int,
        kind: BlockKind,
        z: torch.Tensor,
        residual: torch.Tensor,
        normed: torch.Tensor,
        batch: _Batch,
        cache: Any,
    ) -> None:
        """Decide block ``(index, kind)`` from its dense activations ``z`` (position layout)."""
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
                    part = slice(b, b + 1), slice(0, length)
                    row = (z[part], residual[part], normed[part])
                    self._decide_one(index, kind, runner, *row, row_batch, cache)
            finally:
                self._row = None
            return
        self._decide_one(index, kind, runner, z, residual, normed, batch, cache)
        if frozen:
            runner.pin_weights()  # filled at the first decode step, reused by the rest
            self._pinned_for_decode = True

    def _decide_one(
        self,
        index: int,
        kind: BlockKind,
        runner: BlockRunner,
        z: torch.Tensor,
        residual: torch.Tensor,
        normed: torch.Tensor,
        batch: _Batch,
        cache: Any,
    ) -> None:
        """Probe, score, fuse, mask and update the history for one decision on dense activations."""
        ctx, history = self._decision_context(index, kind, runner, z.shape[1], batch)
        probe = self.hooks.select_probe(ctx, residual, normed, batch.attention_mask)
        if self.validate_outputs:
            validation.check_probe(probe, self.strategies["select_probe"], ctx, *normed.shape[:2])
        states = None
        if probe is not None:
            states = z.index_select(0, probe.batch_index).index_select(1, probe.token_index)
        mask = self._choose_mask(ctx, runner, probe, states, history)
        if ctx.collect_stats:
            stats, valid = squared_mean_per_position(z, batch.attention_mask, batch.has_padding)
            self._update_history(history, stats, valid if batch.has_padding else None, batch, None)
        self._remember(index, kind, mask, cache)

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
        )

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

    # -- allocation ----------------------------------------------------------------------------
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

    def _probe_flops_scale(self, batch: int, seq: int) -> float:
        """Dense decoder FLOPs / dense FLOPs of the blocks that probe, for a (batch, seq) batch."""
        key = (batch, seq)
        if key not in self._probe_scales:
            probed = sum(self._flops.dense_block_flops(kind, batch, seq) for kind in self.targets)
            probed *= len(self.pruned_layers)
            dense = self._flops.dense_decoder_flops(batch, seq)
            self._probe_scales[key] = dense / probed if probed else 1.0
        return self._probe_scales[key]

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

    # -- accounting ----------------------------------------------------------------------------
    def _params_per_unit(self, kind: BlockKind) -> tuple[int, int]:
        """(parameters per query head / channel, parameters per key/value head)."""
        hidden = int(self.adapter.config.hidden_size)
        geo = self.adapter.geometry(kind)
        if kind is BlockKind.ATTENTION:
            return 2 * hidden * geo.unit_width, 2 * hidden * geo.unit_width
        return self.adapter.mlp_matrices * hidden, 0

    def total_prunable_params(self) -> int:
        """Weights of every decoder layer's attention and MLP projections (biases excluded)."""
        total = 0
        for kind in BlockKind:
            geo = self.adapter.geometry(kind)
            per_unit, per_kv = self._params_per_unit(kind)
            total += geo.units * per_unit + geo.num_kv_heads * per_kv
        return total * self.adapter.num_layers

    def _record(
        self, index: int, kind: BlockKind, mask: BlockMask, shape: torch.Size, probe: Probe | None
    ) -> None:
        per_unit, per_kv = self._params_per_unit(kind)
        geo = self.adapter.geometry(kind)
        removed = (geo.units - mask.n_kept) * per_unit
        kept_kv = geo.num_kv_heads
        if mask.kept_kv_heads is not None:
            kept_kv = int(mask.kept_kv_heads.numel())
            removed += (geo.num_kv_heads - kept_kv) * per_kv
        self.record.removed_params[-1] += removed * self._record_weight
        self.record.kept_units.setdefault((index, kind), []).append(mask.n_kept)
        self.record.events.append(
            BlockEvent(
                batch=self.batch_index,
                layer=index,
                kind=kind,
                batch_size=int(shape[0]),
                seq_len=int(shape[1]),
                kept_units=mask.n_kept,
                kept_kv_heads=kept_kv,
                probe_rows=0 if probe is None else int(probe.batch_index.numel()),
                probe_tokens=0 if probe is None else int(probe.token_index.numel()),
            )
        )

    def realised_ratio(self, skip_batches: int = 0) -> float:
        """Mean over recorded batches (after ``skip_batches``) of the fraction of prunable weights removed."""
        removed = self.record.removed_params[skip_batches:]
        if not removed:
            return 0.0
        return sum(removed) / len(removed) / self.total_prunable_params()

    def realised_ratio_model(self, skip_batches: int = 0) -> float:
        """The same removed weights as a fraction of every parameter of the model (embeddings and an
        untied LM head included; see :meth:`~ppframework.adapters.base.ModelAdapter.parameter_counts`)."""
        total = self.adapter.parameter_counts()["model"]
        return self.realised_ratio(skip_batches) * self.total_prunable_params() / total if total else 0.0

    def reset_record(self) -> None:
        """Forget the recorded masks (the history is kept)."""
        self.record = PruningRecord()
