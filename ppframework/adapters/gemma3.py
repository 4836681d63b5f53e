"""Gemma 3 text decoder layers (``Gemma3ForCausalLM``, model type ``gemma3_text``).

LLaMA-like attention and gated MLP (the shared runners: q/k norms, each layer's own sliding window
from ``config.layer_types``, ``query_pre_attn_scalar`` scaling via the module's ``scaling``), with a
pre-norm *and* a post-norm around each block::

    h = h + post_attention_layernorm(o_proj(attn(input_layernorm(h))))
    h = h + post_feedforward_layernorm(down_proj(mlp(pre_feedforward_layernorm(h))))

Pruning acts on the inputs of ``o_proj``/``down_proj`` (the runners' pre-output); the post-norms run
on the block output in :meth:`~ppframework.adapters.decoder.DecoderAdapter.block_residual`. The scaled
embeddings and the final logit soft-capping live outside the decoder layers and run unchanged.
``attn_logit_softcapping`` is kept in Gemma 3 configs but transformers' Gemma 3 attention never
applies it (unlike Gemma 2), so the runners do not either: the pruned path computes what the model
computes.
"""

from __future__ import annotations

import torch

from ppframework.adapters.llama import LlamaLikeAdapter
from ppframework.errors import ConfigError
from ppframework.types import BlockKind


class Gemma3Adapter(LlamaLikeAdapter):
    """Gemma 3 text models: pre/post norms around blocks, interleaved local and global layers."""

    family = "gemma3"
    model_types = ("gemma3_text",)
    pre_norms = ("input_layernorm", "pre_feedforward_layernorm")
    post_norms = ("post_attention_layernorm", "post_feedforward_layernorm")

    def output_gain(self, layer_index: int, kind: BlockKind) -> torch.Tensor:
        """The post-norm's gain ``1 + weight`` (transformers' ``Gemma3RMSNorm`` multiplies the normalised
        block output by it; the normalisation itself is one scalar per token), fp32."""
        norm = getattr(self.layers[layer_index], self.post_norms[kind is BlockKind.MLP])
        return 1.0 + norm.weight.detach().float()

    def check_supported(self, seq_len: int) -> None:
        if getattr(self.config, "use_bidirectional_attention", False):
            raise ConfigError(
                "model.name: Gemma 3 with use_bidirectional_attention (an encoder-style variant) is not "
                "supported; the pruned path runs causal attention."
            )
        super().check_supported(seq_len)
