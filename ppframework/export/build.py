"""Build a (smaller) Hugging Face model from a config, per-layer widths and a state dict.

The model class is built from its config without initialising any weight (``no_init_weights``: the
full-size tensors are allocated but never touched), every projection whose exported shape differs
is replaced by an ``nn.Linear`` of the exported shape (with a bias where the state dict has one), the
attention modules are told their head counts, and the state dict is assigned in place. No original
model and no pipeline is needed, and the built model runs Hugging Face's own modeling code.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from ppframework.adapters import get_adapter
from ppframework.export.families import ExportFamily
from ppframework.export.layout import PrunedLayout

logger = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


def layers_prefix(model: nn.Module) -> str:
    """The state-dict prefix of the decoder layers (e.g. ``model.layers``)."""
    layers = get_adapter(model).layers
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise RuntimeError("the decoder layers are not a submodule of the model")


def _resize_linears(layer: nn.Module, prefix: str, state: State) -> None:
    """Replace every ``nn.Linear`` of ``layer`` whose shape or bias differs from ``state``'s."""
    for name, module in list(layer.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        weight = state.get(f"{prefix}.{name}.weight")
        if weight is None:
            continue
        has_bias = f"{prefix}.{name}.bias" in state
        if tuple(module.weight.shape) == tuple(weight.shape) and (module.bias is not None) == has_bias:
            continue
        out_features, in_features = weight.shape
        new = nn.Linear(in_features, out_features, bias=has_bias, device="meta", dtype=weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(layer.get_submodule(parent_name) if parent_name else layer, child, new)


def _zero_missing_biases(model: nn.Module, state: State) -> None:
    """Zero biases for modules that have one the state dict lacks (a config switch such as
    ``attention_bias`` gives q/k/v a bias too, where only ``o_proj`` needs one)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.bias is not None and f"{name}.bias" not in state:
            if f"{name}.weight" in state:
                weight = state[f"{name}.weight"]
                state[f"{name}.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)


def build_pruned_model(
    config: PretrainedConfig, state: State, family: ExportFamily, layout: PrunedLayout | None = None
) -> PreTrainedModel:
    """A model of ``config``'s class holding exactly ``state``.

    ``layout`` (the per-layer format) gives each layer its own widths; None means ``config`` already
    states them (a standard checkpoint). Raises ``ValueError`` naming the tensors when ``state`` does
    not fit the model.
    """
    floating = [t for t in state.values() if t.is_floating_point()]
    dtype = floating[0].dtype if floating else torch.float32
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    prefix = layers_prefix(model)
    layers = get_adapter(model).layers
    if layout is not None:
        if len(layout.layers) != len(layers):
            raise ValueError(f"the layout has {len(layout.layers)} layers, the config {len(layers)}")
        for index, (layer, widths) in enumerate(zip(layers, layout.layers, strict=True)):
            _resize_linears(layer, f"{prefix}.{index}", state)
            attn = layer.get_submodule(family.attention)
            family.set_attention_widths(attn, widths.num_attention_heads, widths.num_key_value_heads, config)
            family.set_mlp_width(
                layer.get_submodule(family.mlp) if family.mlp else layer, widths.intermediate_size
            )
    state = dict(state)
    _zero_missing_biases(model, state)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        raise ValueError(
            f"the weights do not fit the model: missing {missing[:5] or 'none'}, unexpected "
            f"{sorted(result.unexpected_keys)[:5] or 'none'}"
        )
    model.tie_weights()
    meta = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise ValueError(f"the weights do not fit the model: no values for {meta[:5]}")
    model.eval()
    return model
