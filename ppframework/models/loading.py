"""Loading a causal LM and its tokenizer: :func:`load_model`, the single entry point, and its config forms.

``name`` may be a preset, a local Hugging Face directory (or one holding a single ``.gguf`` file), a
``.gguf`` file, or a hub id; GGUF files go through the cached conversion of
:mod:`ppframework.models.gguf`, device maps through :mod:`ppframework.models.device_map`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from ppframework.config import ModelConfig
from ppframework.models.device import resolve_device, resolve_dtype
from ppframework.models.device_map import (
    check_map_covers,
    describe_map,
    device_map_main_device,
    placement_kwargs,
    placement_problem,
    shorten,
)
from ppframework.models.errors import ModelError
from ppframework.models.gguf import converted_gguf, default_cache_dir
from ppframework.models.presets import presets_text
from ppframework.models.sources import resolve_source
from ppframework.models.tokenizer import load_tokenizer

__all__ = ["load_model", "load_model_from_config", "load_model_kwargs"]

logger = logging.getLogger("ppframework.models")  # one logger for the package, as before its split


def _load_causal_lm(
    location: str, name: str, dtype: torch.dtype, placement: dict[str, Any] | None = None
) -> PreTrainedModel:
    kwargs: dict[str, Any] = {"dtype": dtype, **(placement or {})}
    try:
        try:
            return AutoModelForCausalLM.from_pretrained(location, attn_implementation="sdpa", **kwargs)
        except ValueError as exc:
            if "sdpa" not in str(exc).lower() and "scaled_dot_product" not in str(exc).lower():
                raise
            logger.warning("%s does not support SDPA attention (%s); using eager attention", name, exc)
            return AutoModelForCausalLM.from_pretrained(location, attn_implementation="eager", **kwargs)
    except OSError as exc:
        raise ModelError(
            f"model.name={name!r} could not be loaded ({exc}); when offline use a local model directory or a "
            f"preset ({presets_text()})"
        ) from exc
    except ValueError as exc:
        if placement and "offload_folder" in str(exc):
            raise ModelError(
                "model.offload_folder: the device map offloads weights to disk that transformers must "
                "re-save (they are not in safetensors format, or are converted while loading); set "
                "model.offload_folder to a folder for them"
            ) from exc
        if placement and placement_problem(str(exc)):
            raise ModelError(
                f"model.device_map: transformers/accelerate cannot place the model: {shorten(str(exc))}"
            ) from exc
        raise ModelError(
            f"model.name={name!r} is not a causal language model transformers can load: {exc}"
        ) from exc
    except Exception as exc:
        if placement and placement_problem(str(exc)):
            raise ModelError(
                "model.device_map: transformers/accelerate cannot place the model "
                f"({type(exc).__name__}: {shorten(str(exc))})"
            ) from exc
        if "safetensor" not in type(exc).__name__.lower():
            raise
        raise ModelError(
            f"model.name={name!r}: a weights file in {location} is damaged or truncated "
            f"({type(exc).__name__}: {exc}); re-save or re-download the model"
        ) from exc


def load_model(
    name: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    gguf_file: str | None = None,
    cache_dir: str | Path | None = None,
    device_map: str | dict[str, int | str] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode with gradients off.

    Args:
        name: a preset (see :data:`~ppframework.models.PRESETS`), a local Hugging Face model directory, a
            ``.gguf`` file, or a hub id (local paths win over hub ids of the same spelling).
        dtype: ``auto`` (float32 on CPU, float16 on CUDA; with a device map float16 when it uses a GPU),
            ``float32``, ``float16`` or ``bfloat16``.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; must stay ``auto`` with
            ``device_map``.
        gguf_file: a ``.gguf`` file inside the directory or hub repo ``name``.
        cache_dir: root of the ppframework cache for dequantised GGUF copies (default
            ``$PPF_CACHE_DIR`` or ``~/.cache/ppframework``).
        device_map: spread the model over devices through accelerate (``model.device_map``; see
            ``docs/device-map.md``): ``auto``, ``balanced``, ``balanced_low_0`` or ``sequential``, or a
            mapping of module names to a GPU index, ``cuda:N``, ``cpu`` or ``disk``. None: one device.
        max_memory: per-device caps for a computed ``device_map`` (GPU index, ``cpu`` or ``disk`` to
            bytes or a size such as ``"20GiB"``).
        offload_folder: where weights the map offloads to ``disk`` are re-saved when they must be (not
            safetensors, or converted while loading); safetensors weights are read where they are.

    Returns:
        ``(model, tokenizer)``; the model uses SDPA attention where supported, the tokenizer has a pad
        token (eos when it had none). A device-mapped model carries accelerate's hooks and
        ``model.hf_device_map``.

    Raises:
        ModelError: a bad ``model.*`` setting, or a model that cannot be found or loaded.
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelError(f"model.name={name!r} must be a preset ({presets_text()}), a path or a hub id")
    placement = placement_kwargs(device, device_map, max_memory, offload_folder)
    if placement is None:
        torch_device = resolve_device(device)
    else:
        torch_device = device_map_main_device(placement["device_map"])
    torch_dtype = resolve_dtype(dtype, torch_device)
    source = resolve_source(name, gguf_file)

    start = time.perf_counter()
    location, origin = source.location, source.label
    if source.kind == "gguf":
        cached, converted = converted_gguf(Path(source.location), default_cache_dir(cache_dir))
        location = str(cached)
        origin = f"{source.label} via {'new' if converted else 'cached'} safetensors copy {cached}"

    model = _load_causal_lm(location, name, torch_dtype, placement)
    if placement is not None and isinstance(placement["device_map"], dict):
        check_map_covers(model, placement["device_map"])
    tokenizer = load_tokenizer(location, name)
    if placement is None:
        model.to(torch_device)
        where = str(torch_device)
    else:
        where = f"device map {describe_map(getattr(model, 'hf_device_map', None))}"
    model.eval()
    model.requires_grad_(False)
    logger.info(
        "loaded %s (%s, %.1fM parameters, %s, %s, attention=%s) from %s in %.2f s",
        name,
        type(model).__name__,
        sum(p.numel() for p in model.parameters()) / 1e6,
        str(torch_dtype).removeprefix("torch."),
        where,
        getattr(model.config, "_attn_implementation", "?"),
        origin,
        time.perf_counter() - start,
    )
    return model, tokenizer


def load_model_kwargs(model_cfg: ModelConfig) -> dict[str, Any]:
    """The keyword arguments of :func:`load_model` (all but ``name``) that a
    :class:`~ppframework.config.ModelConfig` (``cfg.model``) sets: dtype, device, gguf_file, cache_dir,
    device_map, max_memory and offload_folder:
    ``load_model(cfg.model.name, **load_model_kwargs(cfg.model))``."""
    return model_cfg.model_dump(exclude={"name"})


def load_model_from_config(model_cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """:func:`load_model` with every setting of a :class:`~ppframework.config.ModelConfig` (``cfg.model``),
    device map included."""
    return load_model(model_cfg.name, **load_model_kwargs(model_cfg))
