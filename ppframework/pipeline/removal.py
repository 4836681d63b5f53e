"""Whole-layer removal (an ``allocate`` strategy with ``removes_layers``, e.g. ShortGPT's
``block-influence``): the removed decoder layers' forwards return their input, the others keep their
own forward.

A removed layer never reaches the model's key/value cache, so its cache entry stays empty while the
other layers fill theirs at their own layer index: ``generate()`` gives what a model built without
those layers gives. Each forward records the removed weights (the realised ratio) and, per removed
block, an event with no kept unit (FLOPs 0; the kept layers count dense).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ppframework.errors import ConfigError
from ppframework.pipeline.accounting import Accounting
from ppframework.pipeline.record import BlockEvent
from ppframework.types import BlockKind


class LayerRemoval(Accounting):
    """Attach and record for a method that removes whole layers."""

    #: The layers removed at the last attach (sorted; empty for other methods).
    removed_layers: list[int] = []

    @property
    def removes_layers(self) -> bool:
        """Whether this method removes whole layers instead of pruning inside blocks."""
        return bool(getattr(self.strategies["allocate"], "removes_layers", False))

    def layers_to_remove(self) -> list[int]:
        """The layers this method removes (sorted), chosen from the history's ``layer_influence``;
        what attaching routes to the identity and what an export drops."""
        influence = self.history.layer_influence if self.history is not None else None
        if influence is None:
            raise ConfigError(
                f"{self.method.label}: strategies.allocate {self.method.strategies.allocate.name!r} removes "
                "layers by their calibrated block influence, which this history lacks; build the pipeline "
                "with ppframework.build_pipeline (it calibrates it) or pass a calibration_history() of this "
                "run config"
            )
        strategy = self.strategies["allocate"]
        return sorted(
            strategy.layers_to_remove(
                influence, self.method.pruning.ratio, self.adapter.num_layers, self.pruned_layers
            )
        )

    def _attach_removal(self, backbone: nn.Module) -> None:
        """Choose the layers (:meth:`layers_to_remove`) and route them to the identity."""
        self.removed_layers = self.layers_to_remove()
        self.block_ratios = {
            (layer, kind): 1.0 if layer in self.removed_layers else 0.0
            for layer in self.pruned_layers
            for kind in BlockKind
            if kind in self.targets
        }
        self._handle = backbone.register_forward_pre_hook(self._on_removal_forward, with_kwargs=True)
        self._previous_forwards = {}
        for index in self.removed_layers:
            layer = self.adapter.layers[index]
            self._previous_forwards[index] = layer.__dict__.get("forward")
            layer.forward = self._removed_forward(index)

    def _on_removal_forward(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """A new forward of the model: count it and the weights its removed layers do not use."""
        self.batch_index += 1
        per_layer = self.total_prunable_params() / self.adapter.num_layers
        self.record.removed_params.append(per_layer * len(self.removed_layers))
        return args, kwargs

    def _removed_forward(self, index: int) -> Any:
        """The forward of removed layer ``index``: its input, unchanged, and the record of its blocks."""

        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            for kind in BlockKind:
                self.record.kept_units.setdefault((index, kind), []).append(0)
                self.record.events.append(
                    BlockEvent(
                        batch=self.batch_index,
                        layer=index,
                        kind=kind,
                        batch_size=int(hidden_states.shape[0]),
                        seq_len=int(hidden_states.shape[1]),
                        kept_units=0,
                        kept_kv_heads=0,
                        probe_rows=0,
                        probe_tokens=0,
                    )
                )
            return hidden_states

        forward._ppf_pipeline = self  # type: ignore[attr-defined]
        return forward
