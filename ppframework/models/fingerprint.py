"""A model's fingerprint: a short, process-independent identifier of its config and weights.

:func:`model_fingerprint` keys on-disk caches (e.g. calibration statistics).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import torch

from ppframework.devices import named_parameters_materialised

__all__ = ["model_fingerprint"]

#: Config keys that do not change what the weights compute (paths, versions, runtime switches).
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "_commit_hash",
        "transformers_version",
        "architectures",
        "dtype",
        "torch_dtype",
        "attn_implementation",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "_attn_implementation_internal",
        "_experts_implementation",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)
_SAMPLE_SIZE = 4096


def _clean_config(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean_config(v) for k, v in value.items() if k not in _VOLATILE_CONFIG_KEYS}
    if isinstance(value, list):
        return [_clean_config(v) for v in value]
    return value


def _tensor_digest(tensor: torch.Tensor) -> str:
    """Name-free digest of a tensor's content: a strided sample (exact) plus full-tensor moments.

    The sample's bytes and ``math.fsum`` sums are exact, hence identical in every process; the
    full-tensor sum and L2 norm (float64) catch edits between sampled positions and are rounded relative
    to the tensor's scale so reduction-order noise cannot change them.
    """
    flat = tensor.detach().reshape(-1)
    count = flat.numel()
    if count == 0:
        return "empty"
    stride = max(1, math.ceil(count / _SAMPLE_SIZE))
    sample = flat[::stride][:_SAMPLE_SIZE].to(device="cpu", dtype=torch.float64).contiguous()
    sample_hash = hashlib.sha256(sample.numpy().tobytes()).hexdigest()[:16]
    values = sample.tolist()
    sample_sum = math.fsum(values)
    sample_sq = math.fsum(v * v for v in values)
    norm = float(torch.linalg.vector_norm(flat, dtype=torch.float64))
    total = float(torch.sum(flat, dtype=torch.float64))
    # |total| <= sqrt(count) * norm; quantise to 1e-9 of that bound.
    bound = math.sqrt(count) * norm
    total_q = round(total / bound * 1e9) if bound > 0 and math.isfinite(bound) else repr(total)
    return f"{sample_hash} {sample_sum!r} {sample_sq!r} {norm:.9g} {total_q}"


def model_fingerprint(model: torch.nn.Module) -> str:
    """A 16-hex-digit identifier of a model's config and weights, stable across processes.

    Every term is either exact or rounded relative to the tensor's scale, so the value is meant to be the
    same on CPU and CUDA too; it differs between dtypes.

    Hashes the config JSON (without paths, versions and runtime switches such as ``use_cache``) and, for
    each parameter in ``named_parameters()`` order, its name, shape, dtype and a content digest (an exact
    strided sample of at most 4096 values plus the float64 sum and norm of the whole tensor). Changing any
    weight materially (a row, a column, a sign pattern) changes the result; changing dtype does too.
    A device-mapped model has the same fingerprint as the same model on one device (offloaded weights
    are read from their offload storage).
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        config_dict = _clean_config(json.loads(config.to_json_string(use_diff=False)))
        digest.update(json.dumps(config_dict, sort_keys=True).encode())
    digest.update(type(model).__name__.encode())
    for param_name, param in named_parameters_materialised(model):  # offloaded weights read back
        line = f"\n{param_name} {tuple(param.shape)} {str(param.dtype)} {_tensor_digest(param)}"
        digest.update(line.encode())
    return digest.hexdigest()[:16]
