"""The speed benchmark's workloads: the model each ``--workload`` names and the run settings it implies.

``smollm2`` loads the offline SmolLM2-135M-Instruct, ``tiny`` the tiny test model; the shaped
workloads (``smollm2-shape``, ``1b``, ``7b``) build a LLaMA with random weights directly on the target
device and dtype (see :func:`random_llama`). :func:`setup` turns a workload and the command line into
the device, dtype, width rounding and skipped layers of a run.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-shape": {
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
    "1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "intermediate_size": 8192,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    "7b": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 128,
        "intermediate_size": 11008,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
}

#: (device, dtype, batch, seq) per workload when not given on the command line.
DEFAULTS: dict[str, tuple[str, str, int, int]] = {
    "smollm2": ("cpu", "float32", 8, 512),
    "smollm2-shape": ("cpu", "float32", 8, 512),
    "1b": ("cpu", "float32", 2, 512),
    "7b": ("cuda", "float16", 20, 1024),
    "tiny": ("cpu", "float32", 4, 64),
}

#: ``--dtype`` names and their torch dtypes.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def random_llama(
    shape: dict[str, Any], device: torch.device, dtype: torch.dtype, seq: int, seed: int, layers: int | None
) -> nn.Module:
    """A LLaMA model of ``shape`` with N(0, 0.02) weights built directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(shape)
    if layers is not None:
        kwargs["num_hidden_layers"] = layers
    config = LlamaConfig(**kwargs, max_position_embeddings=max(seq, 2048), rms_norm_eps=1e-5)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to(dtype)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.fill_(1.0)  # RMSNorm weights
            else:
                param.normal_(0.0, 0.02, generator=generator)
        rotary = model.model.rotary_emb
        model.model.rotary_emb = type(rotary)(config=config).to(device)  # its buffers were on meta
    model.eval().requires_grad_(False)
    return model


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, str]:
    """The workload's model and a one-line description of it."""
    model, description, _ = build_model_and_tokenizer(args, device, dtype)
    return model, description


def build_model_and_tokenizer(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[nn.Module, str, Any]:
    """The workload's model, a one-line description of it and its tokenizer (None: random weights)."""
    if args.workload == "smollm2":
        from ppframework.models import load_model

        model, tokenizer = load_model("smollm2-135m", dtype=args.dtype, device=str(device))
        if args.layers is not None:
            model.model.layers = model.model.layers[: args.layers]
            model.config.num_hidden_layers = args.layers
        return model, "SmolLM2-135M-Instruct (offline GGUF, dequantised)", tokenizer
    if args.workload == "tiny":
        from ppframework.testing.tiny import tiny_model

        model = tiny_model("llama-gqa", seed=args.seed).to(device=device, dtype=dtype)
        return model, "tiny llama-gqa", None
    shape = SHAPES[args.workload]
    model = random_llama(shape, device, dtype, args.seq, args.seed, args.layers)
    return model, f"{args.workload}-shaped LLaMA, random weights", None


def model_shape(model: nn.Module) -> dict[str, Any]:
    """The shape fields of the model's config (for the report)."""
    cfg = model.config
    keys = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
        "vocab_size",
    )
    return {k: getattr(cfg, k, None) for k in keys}


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, int, list[int]]:
    """Device, dtype, round_to and skip layers of a run (defaults by device and workload); fills
    ``args.device`` and ``args.dtype`` from the workload's defaults where not given, sets the thread
    count and the seed."""
    device_name, dtype_name, _, _ = DEFAULTS[args.workload]
    args.device = args.device or device_name
    args.dtype = args.dtype or dtype_name
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    round_to = args.round_to if args.round_to is not None else (64 if device.type == "cuda" else 8)
    skip = (
        args.skip_layers if args.skip_layers is not None else ([0] if args.workload == "tiny" else [0, 1, 2])
    )
    torch.manual_seed(args.seed)
    return device, dtype, round_to, skip
