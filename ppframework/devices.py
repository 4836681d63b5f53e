"""Where a module runs when a model is spread over devices (``model.device_map``, accelerate hooks).

A model loaded with a device map carries accelerate hooks (``_hf_hook``): each hook moves its module's
inputs to the module's *execution device*, and a module whose weights are offloaded (to CPU memory or
to disk) keeps them on the ``meta`` device between forwards and materialises them on the execution
device only while its own forward runs. Code that reads weights outside the module's own forward (the
pipeline's block runners, static scoring, the model fingerprint) or that places tensors next to a layer
(histories, masks) must therefore ask these helpers instead of reading ``param.device``:

* :func:`execution_device`: where a module (a decoder layer) computes;
* :func:`input_device`: where a model's input ids go (its input embedding's execution device);
* :func:`onloaded`: a context in which every offloaded weight of a module is materialised;
* :func:`named_parameters_materialised`: every parameter's stored value, offloaded ones included.

On a model without hooks every helper reduces to the plain answer (the parameters' device, a no-op
context, ``named_parameters()``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

__all__ = [
    "execution_device",
    "has_offloaded_weights",
    "hook_of",
    "input_device",
    "is_dispatched",
    "named_parameters_materialised",
    "onloaded",
]


def hook_of(module: nn.Module) -> Any:
    """The accelerate hook attached to ``module`` (``module._hf_hook``), or None."""
    return module.__dict__.get("_hf_hook")


def _hooks(hook: Any) -> list[Any]:
    """A hook and, for accelerate's ``SequentialHook``, the hooks it chains."""
    if hook is None:
        return []
    inner = getattr(hook, "hooks", None)
    if isinstance(inner, list | tuple):
        return [h for part in inner for h in _hooks(part)]
    return [hook]


def _as_device(value: Any) -> torch.device:
    if isinstance(value, int):  # accelerate names GPUs by index
        return torch.device("cuda", value)
    return torch.device(value)


def _hook_device(module: nn.Module) -> torch.device | None:
    for hook in _hooks(hook_of(module)):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return _as_device(device)
    return None


def _is_offloading(hook: Any) -> bool:
    """Whether one accelerate hook keeps its module's weights offloaded (in its ``weights_map``)."""
    return bool(getattr(hook, "offload", False)) and getattr(hook, "weights_map", None) is not None


def is_dispatched(model: nn.Module) -> bool:
    """Whether ``model`` was loaded with a device map (accelerate set ``hf_device_map`` and hooks)."""
    return isinstance(getattr(model, "hf_device_map", None), dict) and len(model.hf_device_map) > 0


def has_offloaded_weights(module: nn.Module) -> bool:
    """Whether any weight of ``module`` or its submodules is offloaded (kept on ``meta`` between forwards)."""
    return any(_is_offloading(h) for m in module.modules() for h in _hooks(hook_of(m)))


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on.

    The execution device of the first accelerate hook found on ``module`` or (in order) its submodules;
    without hooks the device of its first parameter or buffer that is not on ``meta``; CPU for a module
    with neither.
    """
    for sub in module.modules():
        device = _hook_device(sub)
        if device is not None:
            return device
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where ``model``'s input ids belong: the execution device of its input embedding (else of the
    model).

    For a model on one device this is the device of its parameters, as before; for a device-mapped one
    it is where the embedding runs, even when the embedding's weights are offloaded.
    """
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if isinstance(embedding, nn.Module):
        return execution_device(embedding)
    return execution_device(model)


@contextmanager
def onloaded(module: nn.Module) -> Iterator[None]:
    """Materialise every offloaded weight of ``module`` (and its submodules) on its execution device
    for the duration of the block, then offload them again.

    Uses each offloading hook's own ``pre_forward``/``post_forward`` (what accelerate does around the
    submodule's forward), so the weights are exactly those the hooked forward would use. While the
    block runs the hooks' offloading is paused, so calling a submodule (a norm) inside it neither
    reloads nor drops its weights. Weights that are not offloaded are left alone; a model without
    hooks costs one walk over its submodules.
    """
    with ExitStack() as stack:
        for sub in module.modules():
            for hook in _hooks(hook_of(sub)):
                if not _is_offloading(hook):
                    continue
                hook.pre_forward(sub)
                hook.offload = False
                stack.callback(_offload_again, hook, sub)
        yield


def _offload_again(hook: Any, module: nn.Module) -> None:
    hook.offload = True
    hook.post_forward(module, None)


def _offloaded_value(model: nn.Module, name: str, placeholder: torch.Tensor) -> torch.Tensor:
    """The stored value of the offloaded parameter ``name`` (from the nearest offloading hook's
    ``weights_map``: CPU memory or a memory-mapped file), in the placeholder's dtype."""
    parts = name.split(".")
    owners: list[tuple[nn.Module, str]] = []
    module = model
    for depth, part in enumerate(parts[:-1]):
        owners.append((module, ".".join(parts[depth:])))
        module = getattr(module, part)
    owners.append((module, parts[-1]))
    for owner, key in reversed(owners):
        for hook in _hooks(hook_of(owner)):
            if _is_offloading(hook) and key in hook.weights_map:
                value = hook.weights_map[key]
                return value.to(placeholder.dtype) if value.dtype != placeholder.dtype else value
    raise RuntimeError(
        f"parameter {name} is on the meta device and no accelerate offload hook holds its value"
    )


def named_parameters_materialised(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model.named_parameters()`` (same names, same order, shared tensors once) with each offloaded
    parameter's stored value (read from its offload storage, no device transfer) in place of the
    ``meta`` placeholder."""
    for name, param in model.named_parameters():
        if param.device.type == "meta":
            yield name, _offloaded_value(model, name, param)
        else:
            yield name, param
