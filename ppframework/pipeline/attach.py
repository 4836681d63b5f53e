"""The Pipeline: attaches to a model, asks ``allocate`` how much each pruned block keeps, and runs
every pruned block through the five per-block stage hooks.

This module holds what attaching means: the forwards it sets on the pruned layers (and puts back on
detach), ``with`` blocks, and a layer's forward on the pruned path. The parts it is made of:

- :mod:`.state`: the strategies, settings and state; :mod:`.accounting`: the removed weights;
- :mod:`.allocation`: the ``allocate`` stage and static decisions;
- :mod:`.forward`: the backbone's pre-hook describing each forward (:mod:`.batch`);
- :mod:`.decision`: probe -> score -> fuse -> mask -> infer and the history update;
- :mod:`.rows`: ``decision: sequence``; :mod:`.dense_prefill`: ``prefill: dense``;
- :mod:`.decode`: the decode state and the decode steps that continue a prefill's cache;
- :mod:`.removal`: methods that remove whole layers (ShortGPT's ``block-influence``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ppframework import validation
from ppframework.devices import execution_device, has_offloaded_weights, hook_of, onloaded
from ppframework.errors import ConfigError
from ppframework.pipeline.batch import LayerCall
from ppframework.pipeline.decode import refuse_after_detach
from ppframework.pipeline.dense_prefill import DensePrefill
from ppframework.pipeline.forward import ForwardHook
from ppframework.pipeline.removal import LayerRemoval
from ppframework.pipeline.stages import NO_STAGE

logger = logging.getLogger(__package__)  # the package's logger: its lines keep the name ppframework.pipeline


def _pipeline_forward(layer: nn.Module) -> Pipeline | None:
    """The pipeline whose forward is set on ``layer``, or None."""
    return getattr(layer.__dict__.get("forward"), "_ppf_pipeline", None)


class Pipeline(DensePrefill, ForwardHook, LayerRemoval):
    """Online dynamic structured pruning of one model with one method.

    Use as a context manager: inside ``with pipe:`` every forward of the model runs pruned.
    Attaching replaces the forward of each pruned decoder layer (weights stay shared);
    detaching restores the original forwards exactly. ``with`` blocks nest: only the outermost
    exit detaches.
    """

    _with_depth: int = 0  # nesting of `with pipe:` blocks
    #: What :meth:`save` calls: ``writer(pipeline, folder) -> folder`` (set by ``ppframework.export``).
    state_writer: ClassVar[Callable[[Pipeline, Path], Path] | None] = None

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
            if self.removes_layers:  # whole layers go; the others keep their own forward
                self._attach_removal(self._backbone())
                self._attached = True
                return self
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
            refuse_after_detach(cache, self.method.label)
        self._end_decode()
        self._attached = False

    @property
    def recycle_pins(self) -> bool:
        """Whether decode pins are gathered into storage kept from one ``generate`` call to the next
        (default True; False: fresh tensors every call, what ``speed.py --generation --fresh-pins``
        times as the before state). See :meth:`BlockRunner.pin_weights`."""
        return all(runner.recycle_pins for runner in self._runners.values())

    @recycle_pins.setter
    def recycle_pins(self, recycle: bool) -> None:
        for runner in self._runners.values():
            runner.recycle_pins = recycle

    def release(self) -> None:
        """Detach and drop a static method's cached sliced weights (they are otherwise kept for
        the pipeline's lifetime, so re-attaching costs no gather), the storage that a dynamic method's
        decode pins are recycled in, and the gather buffers."""
        self.detach()
        for runner in self._runners.values():
            runner.unpin_weights()
            runner.release_pin_storage()
        self.buffers.clear()

    def save(self, folder: str | Path) -> Path:
        """Write this pipeline's method, calibration history (as it stands now), random generator state
        and the model's fingerprint into the new folder ``folder``; restore it with
        ``ppframework.load_pipeline(model, folder)`` (see docs/export.md). Returns the folder.

        The writer is :data:`state_writer`, which ``ppframework.export`` (a layer above the pipeline)
        sets when it is imported, as ``import ppframework`` does."""
        writer = Pipeline.state_writer
        if writer is None:
            raise RuntimeError("no pipeline state writer: import ppframework.export (ppframework does)")
        return writer(self, Path(folder))

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
        """The module whose children include the decoder layers (its forward pre-hook sees every forward)."""
        layers = self.adapter.layers
        for module in self.model.modules():
            if any(child is layers for child in module.children()):
                return module
        raise RuntimeError("could not find the module that owns the decoder layers")

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
            weights = onloaded(layer) if offloads else NO_STAGE
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
        """Layer ``index`` on the pruned path: its blocks (or its rows, one at a time) in position layout."""
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
        call = LayerCall(index, layer, batch, rotary, cache)
        if self.per_row and hidden.shape[0] > 1:
            hidden = self._rows_forward(call, hidden)
        else:
            hidden = self._blocks_forward(call, hidden)
        if batch.shift is not None:
            hidden = batch.shift.to_columns(hidden)
        return hidden
