"""Export a whole-layer removal (``shortgpt``) as a model with fewer decoder layers.

The kept layers are renumbered 0..L'-1 in order, the config's ``num_hidden_layers`` becomes L' and
every per-layer list of the config (Gemma 3's and Qwen2's ``layer_types``) keeps the entries of the
kept layers, so a sliding-window layer stays one. Every kept tensor is the source's, unchanged: the
result is a standard Hugging Face checkpoint of the same family, and its forward equals the pipeline's
(whose removed layers return their input) and ``generate()`` with the key/value cache equals it too.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ppframework.export.build import layers_prefix

#: Config fields that hold one entry per decoder layer, where a family has them.
PER_LAYER_FIELDS: tuple[str, ...] = ("layer_types",)


def kept_layers(num_layers: int, removed: Sequence[int]) -> list[int]:
    """The source indices of the layers that stay, in order."""
    gone = set(removed)
    return [index for index in range(num_layers) if index not in gone]


def removed_layers_config(config: Any, removed: Sequence[int]) -> Any:
    """A copy of ``config`` describing the model without the ``removed`` layers."""
    num_layers = int(config.num_hidden_layers)
    keep = kept_layers(num_layers, removed)
    if not keep:
        raise ValueError(f"removing layers {sorted(removed)} of {num_layers} would leave no decoder layer")
    out = copy.deepcopy(config)
    out.num_hidden_layers = len(keep)
    for name in PER_LAYER_FIELDS:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == num_layers:
            setattr(out, name, [values[index] for index in keep])
    if hasattr(out, "max_window_layers") and isinstance(out.max_window_layers, int):
        # Qwen2: layers below max_window_layers use full attention; count the kept ones below it.
        out.max_window_layers = sum(1 for index in keep if index < config.max_window_layers)
    return out


def removed_layers_state(model: nn.Module, removed: Sequence[int]) -> dict[str, torch.Tensor]:
    """``model``'s state dict without the ``removed`` layers, the kept ones renumbered from 0."""
    prefix = layers_prefix(model)
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    num_layers = int(model.config.num_hidden_layers)
    new_index = {old: new for new, old in enumerate(kept_layers(num_layers, removed))}
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        match = pattern.match(name)
        if match is None:
            state[name] = tensor.detach().clone()
            continue
        old = int(match.group(1))
        if old in new_index:
            state[f"{prefix}.{new_index[old]}.{match.group(2)}"] = tensor.detach().clone()
    return state
