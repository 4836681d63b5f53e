"""LLaMA-like decoder layers: LLaMA 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM (grouped-query attention included).

The shared runners (:mod:`~ppframework.adapters.attention_runner`, :mod:`~ppframework.adapters.mlp_runner`)
already cover what these families add on top of LLaMA: per-head q/k RMSNorms (Qwen3), sliding-window
attention (Mistral, Qwen2/3 ``layer_types``: each layer's own window, on the probe's true positions,
the full pass and decode steps), q/k/v biases (Qwen2) and partial rotary (Phi-3 style configs). This
adapter adds the rotary tables the model passes to its layers and the layer types it can run.
"""

from __future__ import annotations

from typing import Any

import torch

from ppframework.adapters.decoder import DecoderAdapter
from ppframework.errors import ConfigError


class LlamaLikeAdapter(DecoderAdapter):
    """Pre-norm decoder layers with RMSNorm, rotary attention (GQA aware) and a gated MLP.

    Covers LLaMA 2/3, Mistral (sliding window included), Qwen2/Qwen2.5 (``qwen2``), Qwen3 (per-head
    q/k norms) and SmolLM. Subclasses (Phi-3, Gemma 3) change the runners or the norms around blocks.
    """

    family = "llama"
    model_types: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "smollm", "smollm2")

    def rotary(self, layer_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        rotary = layer_kwargs.get("position_embeddings")
        if rotary is None:
            raise ConfigError(
                "model: the LLaMA-like layers were called without `position_embeddings`; this "
                "transformers version is not supported (use transformers >= 5)."
            )
        return rotary

    def check_supported(self, seq_len: int) -> None:
        cfg = self.config
        types = set(getattr(cfg, "layer_types", None) or ())
        unknown = sorted(types - {"full_attention", "sliding_attention"})
        if unknown:
            raise ConfigError(
                f"model.name: layer types {unknown} (config.layer_types) are not supported; the pruned "
                "path runs full and sliding-window attention layers only."
            )
