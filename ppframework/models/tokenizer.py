"""Loading a model's tokenizer from a local directory (verbatim where marked), with a pad token."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ppframework.models.errors import ModelError

__all__ = ["VERBATIM_TOKENIZER_KEY", "load_tokenizer", "load_tokenizer_only"]

logger = logging.getLogger("ppframework.models")  # one logger for the package, as before its split

#: Key in ``tokenizer_config.json`` marking a tokenizer that must be loaded verbatim from its
#: ``tokenizer.json`` (``ppframework.testing.tiny`` writes it). Without it AutoTokenizer may swap in a
#: model-type specific class (e.g. Qwen2Tokenizer for ``model_type == "qwen2"``) that rebuilds the
#: pipeline and mangles a non-BPE vocabulary.
VERBATIM_TOKENIZER_KEY = "ppframework_tokenizer"


def load_tokenizer(location: str, name: str) -> PreTrainedTokenizerBase:
    """The tokenizer at ``location`` (a directory or hub id), given the eos token as pad token when it has
    none; :class:`ModelError` naming ``model.name`` when there is no usable one."""
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


def load_tokenizer_only(directory: Path, name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a local model directory (as :func:`~ppframework.models.load_model` loads it),
    without weights."""
    return load_tokenizer(str(directory), name)
