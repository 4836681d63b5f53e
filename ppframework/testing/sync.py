"""A CUDA check for tests: no host-device synchronisation inside given modules."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def no_sync_in_layers(layers: Iterable[nn.Module]) -> Iterator[None]:
    """While the body runs, any host-device synchronisation inside one of ``layers``' forwards
    raises (CUDA sync debug mode ``error`` from each forward's start to its end); the mode and the
    hooks are restored afterwards."""
    handles = []
    for layer in layers:
        handles.append(layer.register_forward_pre_hook(lambda *_: torch.cuda.set_sync_debug_mode("error")))
        handles.append(layer.register_forward_hook(lambda *_: torch.cuda.set_sync_debug_mode("default")))
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
        for handle in handles:
            handle.remove()
