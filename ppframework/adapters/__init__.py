"""Model-family adapters and the lookup from a model to its adapter."""

from __future__ import annotations

from torch import nn

from ppframework.adapters.base import BlockRunner, ModelAdapter
from ppframework.adapters.gemma3 import Gemma3Adapter
from ppframework.adapters.llama import LlamaLikeAdapter
from ppframework.adapters.opt import OPTAdapter
from ppframework.adapters.phi3 import Phi3Adapter
from ppframework.errors import ConfigError

#: Every adapter, tried in order by :func:`get_adapter` (see ``docs/families.md``).
ADAPTERS: tuple[type[ModelAdapter], ...] = (LlamaLikeAdapter, Phi3Adapter, Gemma3Adapter, OPTAdapter)


def supported_model_types() -> list[str]:
    """Every ``config.model_type`` an adapter exists for."""
    return sorted({t for adapter in ADAPTERS for t in adapter.model_types})


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``, chosen from ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter(model)
    raise ConfigError(
        f"model.name: model family {model_type!r} is not supported; supported model types: "
        f"{', '.join(supported_model_types())}."
    )


__all__ = ["ADAPTERS", "BlockRunner", "ModelAdapter", "get_adapter", "supported_model_types"]
