"""GGUF -> Hugging Face conversion, cached: where the ppframework cache is, and the dequantised copies in it.

GGUF weights are dequantised by transformers (about 20 s for SmolLM2-135M) and the float32 result is
cached as safetensors under ``<cache>/models/<stem>-<key>`` (``<cache>`` is the ``cache_dir`` argument,
else ``$PPF_CACHE_DIR``, else ``~/.cache/ppframework``), so later loads take well under a second. The
cache is written into a temporary sibling directory and renamed into place, so an interrupted conversion
never leaves a partial cache behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ppframework.models.errors import ModelError
from ppframework.models.presets import INSTALL_OFFLINE

__all__ = ["cache_complete", "converted_gguf", "default_cache_dir", "gguf_cache_dir"]

logger = logging.getLogger("ppframework.models")  # one logger for the package, as before its split

_CACHE_ENV = "PPF_CACHE_DIR"
_CACHE_MARKER = "ppframework_cache.json"
_CACHE_FORMAT = 1
_STALE_TMP_SECONDS = 3600.0


def default_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The ppframework cache root: ``cache_dir``, else ``$PPF_CACHE_DIR``, else ``~/.cache/ppframework``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(_CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "ppframework"


def gguf_cache_dir(gguf_path: Path, cache_root: Path) -> Path:
    """The cache directory of ``gguf_path``'s converted copy (keyed by its size, mtime and transformers)."""
    stat = gguf_path.stat()
    payload = json.dumps([stat.st_size, stat.st_mtime_ns, transformers.__version__, _CACHE_FORMAT])
    key = hashlib.sha256(payload.encode()).hexdigest()[:12]
    return cache_root / "models" / f"{gguf_path.stem}-{key}"


def cache_complete(directory: Path) -> bool:
    """Whether ``directory`` holds a finished conversion (its marker and ``config.json``)."""
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
            f"install them with `{INSTALL_OFFLINE}`"
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


def converted_gguf(gguf_path: Path, cache_root: Path) -> tuple[Path, bool]:
    """Return ``(cache directory, converted_now)``, converting ``gguf_path`` if it is not cached yet."""
    final = gguf_cache_dir(gguf_path, cache_root)
    if cache_complete(final):
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
            if not cache_complete(final):  # not a concurrent writer winning the race
                raise
            logger.info("another process cached %s first; using its copy", final)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - start)
    return final, True
