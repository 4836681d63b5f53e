"""Tiny, randomly initialised causal LMs and a character tokenizer for tests and examples.

Nothing here downloads anything: configs are built in code, weights are drawn from a seeded RNG and the
tokenizer is assembled with the ``tokenizers`` library from a fixed character vocabulary, so every call
with the same arguments gives bit-identical results in any process.

Families (see :data:`FAMILIES`):

==============  ====================================================================================
``llama``       LLaMA, multi-head attention (4 query heads, 4 key/value heads), SiLU-gated MLP
``llama-gqa``   LLaMA with grouped-query attention (4 query heads, 2 key/value heads)
``qwen2``       Qwen2 (GQA 4/2, bias on the q/k/v projections)
``mistral``     Mistral (GQA 4/2, no sliding window)
``opt``         OPT (pre-LayerNorm, ReLU MLP, biases everywhere, learned positions, tied embeddings)
``qwen2.5``     Qwen2.5 (``qwen2`` model type: GQA 4/2, q/k/v biases, tied embeddings, rope theta 1e6)
``qwen3``       Qwen3 (GQA 4/2, per-head RMSNorm on queries and keys before rotary, no biases)
``mistral-swa`` Mistral with a sliding window of 8 tokens, shorter than the test sequences
``phi3``        Phi-3 (GQA 4/2, fused ``qkv_proj`` and ``gate_up_proj``)
``gemma3``      Gemma 3 text (4 query heads, 1 key/value head, q/k norms, local layers with a window
                of 8 interleaved with global ones, scaled embeddings, pre- and post-norms around each
                block, ``query_pre_attn_scalar`` 24, tied embeddings)
==============  ====================================================================================

All have hidden size 64, 4 layers, head_dim 16, vocabulary 256 and 256 positions; the MLP is 128 wide
(LLaMA-like families) or 256 wide (OPT).
"""

from __future__ import annotations

import logging
import string
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from ppframework.models import VERBATIM_TOKENIZER_KEY

__all__ = [
    "FAMILIES",
    "TINY_SLIDING_WINDOW",
    "TINY_SPECIAL_TOKENS",
    "TINY_VOCAB_SIZE",
    "save_tiny_model",
    "tiny_config",
    "tiny_model",
    "tiny_tokenizer",
]

logger = logging.getLogger(__name__)

#: Families understood by :func:`tiny_config` / :func:`tiny_model`.
FAMILIES: tuple[str, ...] = (
    "llama",
    "llama-gqa",
    "qwen2",
    "mistral",
    "opt",
    "qwen2.5",
    "qwen3",
    "mistral-swa",
    "phi3",
    "gemma3",
)

#: Sliding window of the tiny ``mistral-swa`` family and of ``gemma3``'s local layers.
TINY_SLIDING_WINDOW = 8

#: Special tokens of :func:`tiny_tokenizer`, in id order (``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<pad>``=3).
TINY_SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>")
_UNK_ID, _BOS_ID, _EOS_ID, _PAD_ID = range(4)

#: Vocabulary size of the tiny models (the tokenizer uses the first ~100 ids).
TINY_VOCAB_SIZE = 256

# Printable ASCII (letters, digits, punctuation, space) plus tab, newline and carriage return.
_CHARS: tuple[str, ...] = tuple(
    dict.fromkeys(string.ascii_letters + string.digits + string.punctuation + " \t\n\r")
)

_HIDDEN = 64
_HEADS = 4
_HEAD_DIM = _HIDDEN // _HEADS
_LAYERS = 4
_MAX_POSITIONS = 256

_TOKEN_IDS: dict[str, int] = {"bos_token_id": _BOS_ID, "eos_token_id": _EOS_ID, "pad_token_id": _PAD_ID}

_LLAMA_COMMON: dict[str, Any] = {
    "vocab_size": TINY_VOCAB_SIZE,
    "hidden_size": _HIDDEN,
    "intermediate_size": 128,
    "num_hidden_layers": _LAYERS,
    "num_attention_heads": _HEADS,
    "max_position_embeddings": _MAX_POSITIONS,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    **_TOKEN_IDS,
}

_FAMILY_SPECS: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    "llama": (LlamaConfig, {**_LLAMA_COMMON, "num_key_value_heads": 4, "head_dim": _HEAD_DIM}),
    "llama-gqa": (LlamaConfig, {**_LLAMA_COMMON, "num_key_value_heads": 2, "head_dim": _HEAD_DIM}),
    # Qwen2 derives head_dim = hidden_size / num_attention_heads = 16 and always has q/k/v biases.
    "qwen2": (Qwen2Config, {**_LLAMA_COMMON, "num_key_value_heads": 2, "use_sliding_window": False}),
    "mistral": (
        MistralConfig,
        {**_LLAMA_COMMON, "num_key_value_heads": 2, "head_dim": _HEAD_DIM, "sliding_window": None},
    ),
    "opt": (
        OPTConfig,
        {
            "vocab_size": TINY_VOCAB_SIZE,
            "hidden_size": _HIDDEN,
            "word_embed_proj_dim": _HIDDEN,
            "ffn_dim": 256,
            "num_hidden_layers": _LAYERS,
            "num_attention_heads": _HEADS,
            "max_position_embeddings": _MAX_POSITIONS,
            "do_layer_norm_before": True,
            "activation_function": "relu",
            "enable_bias": True,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            **_TOKEN_IDS,
        },
    ),
    "qwen2.5": (
        Qwen2Config,
        {
            **_LLAMA_COMMON,
            "num_key_value_heads": 2,
            "use_sliding_window": False,
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
        },
    ),
    "qwen3": (
        Qwen3Config,
        {**_LLAMA_COMMON, "num_key_value_heads": 2, "head_dim": _HEAD_DIM, "use_sliding_window": False},
    ),
    "mistral-swa": (
        MistralConfig,
        {
            **_LLAMA_COMMON,
            "num_key_value_heads": 2,
            "head_dim": _HEAD_DIM,
            "sliding_window": TINY_SLIDING_WINDOW,
        },
    ),
    "phi3": (
        Phi3Config,
        {**_LLAMA_COMMON, "num_key_value_heads": 2, "sliding_window": None, "resid_pdrop": 0.0},
    ),
    "gemma3": (
        Gemma3TextConfig,
        {
            **_LLAMA_COMMON,
            "num_key_value_heads": 1,
            "head_dim": _HEAD_DIM,
            "sliding_window": TINY_SLIDING_WINDOW,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            "query_pre_attn_scalar": 24,
            "tie_word_embeddings": True,
        },
    ),
}


def _check_family(family: str) -> None:
    if family not in _FAMILY_SPECS:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {', '.join(FAMILIES)}")


def tiny_config(family: str, **overrides: Any) -> PretrainedConfig:
    """Return the config of a tiny model of ``family`` (one of :data:`FAMILIES`).

    ``overrides`` are passed to the config constructor and win over the defaults, e.g.
    ``tiny_config("llama", num_hidden_layers=2)``. The attention implementation is ``sdpa``.

    Raises:
        ValueError: unknown family, or a ``vocab_size`` override smaller than the tiny tokenizer.
    """
    _check_family(family)
    cls, defaults = _FAMILY_SPECS[family]
    kwargs = {**defaults, **overrides}
    vocab_size = int(kwargs.get("vocab_size", TINY_VOCAB_SIZE))
    needed = len(TINY_SPECIAL_TOKENS) + len(_CHARS)
    if vocab_size < needed:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tiny tokenizer's {needed} tokens")
    config = cls(**kwargs)
    config._attn_implementation = "sdpa"
    return config


def _redraw_weights(model: nn.Module, generator: torch.Generator) -> None:
    """Replace the default (very small) init with larger, channel-heterogeneous weights.

    Linear weights get std 0.15 with a log-normal scale per output row, so channel and head
    magnitudes differ (structured pruning scores are then meaningful); embeddings std 0.5; norm
    weights ~ 1 +/- 0.2 (Gemma's, which scale by 1 + weight: 0 +/- 0.2); biases std 0.05. Tied
    parameters are drawn once.
    """
    seen: set[int] = set()

    def fresh(param: torch.Tensor) -> bool:
        key = id(param)
        if key in seen:
            return False
        seen.add(key)
        return True

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float32)

    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            bias = getattr(module, "bias", None)
            if isinstance(module, nn.Embedding):
                if fresh(module.weight):
                    module.weight.copy_(randn(*module.weight.shape) * 0.5)
            elif isinstance(module, nn.Linear):
                if fresh(module.weight):
                    out_features, in_features = module.weight.shape
                    row_scale = torch.exp(0.5 * randn(out_features, 1))
                    module.weight.copy_(randn(out_features, in_features) * 0.15 * row_scale)
            elif "Norm" in type(module).__name__ and isinstance(weight, nn.Parameter) and weight.dim() == 1:
                if fresh(weight):
                    # Gemma's RMSNorm scales by (1 + weight): its weights centre on 0, not 1.
                    centre = 0.0 if type(module).__name__.startswith("Gemma") else 1.0
                    weight.copy_(centre + 0.2 * randn(*weight.shape))
            else:
                continue
            if isinstance(bias, nn.Parameter) and fresh(bias):
                bias.copy_(randn(*bias.shape) * 0.05)


def tiny_model(family: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """Build a randomly initialised tiny causal LM of ``family`` in float32 and eval mode.

    The weights depend only on ``family``, ``seed`` and ``overrides`` (the global torch RNG state is
    left untouched). ``overrides`` go to :func:`tiny_config`.
    """
    config = tiny_config(family, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed)
        _redraw_weights(model, generator)
    model.tie_weights()
    model.eval()
    logger.debug("built tiny %s model (seed=%d, %d parameters)", family, seed, model.num_parameters())
    return model


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Return a character-level tokenizer matching the tiny models' vocabulary (no download).

    One token per character of printable ASCII plus tab/newline/carriage return; any other character
    becomes ``<unk>``. Special tokens: ``<unk>``=0, ``<s>``=1 (BOS, added at the start of every
    encoded text), ``</s>``=2 (EOS), ``<pad>``=3. Decoding concatenates characters.
    """
    vocab = {tok: i for i, tok in enumerate((*TINY_SPECIAL_TOKENS, *_CHARS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # [\s\S] matches any character, newlines included: every character is its own pre-token.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s>:1 $B:1",
        special_tokens=[("<s>", _BOS_ID)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=_MAX_POSITIONS,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        # Tells ppframework.models.load_model to load tokenizer.json verbatim (AutoTokenizer would pick
        # Qwen2Tokenizer for the qwen2 family and drop spaces/newlines from this character vocabulary).
        **{VERBATIM_TOKENIZER_KEY: "tiny-char"},
    )


def save_tiny_model(path: str | Path, family: str, seed: int = 0, **overrides: Any) -> Path:
    """Save a tiny model and the tiny tokenizer to ``path`` (created if needed) and return it.

    The directory loads with ``ppframework.models.load_model(str(path))`` or any
    ``from_pretrained``.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tiny_model(family, seed=seed, **overrides).save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    logger.debug("saved tiny %s model (seed=%d) to %s", family, seed, out)
    return out
