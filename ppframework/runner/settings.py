"""What a run scores and on what: its evaluation batches, its resolved settings and the environment."""

from __future__ import annotations

import platform
from typing import Any

import torch

from ppframework import data as data_mod
from ppframework.adapters import get_adapter
from ppframework.config import RunConfig
from ppframework.devices import input_device
from ppframework.errors import ConfigError


def eval_batches(
    cfg: RunConfig, tokenizer: Any, text: str | None = None, ids: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """The evaluation windows of ``cfg.data`` cut into fixed-size batches (``ids``: the text's
    token ids when already tokenised, e.g. by the preflight check)."""
    d = cfg.data
    if ids is None:
        if text is None:
            text = data_mod.load_corpus_text(d.name, d.split, d.data_dir)
        ids = data_mod.tokenize_text(text, tokenizer)
    windows = data_mod.make_windows(ids, d.seq_len, d.window_policy, cfg.seed)
    if d.window_bos:
        windows = data_mod.start_with_bos(windows, tokenizer)
    batches = data_mod.batched(windows, d.batch_size)
    return batches[: d.max_batches] if d.max_batches else batches



def scored_batches(cfg: RunConfig, n_batches: int) -> int:
    """Batches that count in the perplexity under ``data.warmup_policy``."""
    return n_batches if cfg.data.warmup_policy == "untracked" else n_batches - cfg.data.warmup_batches


def resolved_settings(cfg: RunConfig, model: torch.nn.Module, batches: list[torch.Tensor]) -> dict[str, Any]:
    """The config as run, plus what it resolved to (device, dtype, batch counts, data folder)."""
    param = next(model.parameters())
    settings = cfg.model_dump(mode="json")
    settings["resolved"] = {
        "device": str(input_device(model)),
        "dtype": str(param.dtype),
        "n_batches": len(batches),
        "scored_batches": scored_batches(cfg, len(batches)),
        "tokens_per_batch": int(batches[0].numel()),
        "data_dir": str(data_mod.resolve_data_dir(cfg.data.data_dir)),
        "parameters": _parameter_counts(model),
    }
    return settings


def _parameter_counts(model: torch.nn.Module) -> dict[str, int] | None:
    try:
        return get_adapter(model).parameter_counts()
    except ConfigError:  # an unsupported family: the methods will say so
        return None


def environment(model: torch.nn.Module) -> dict[str, Any]:
    """Software and hardware the figures were measured on."""
    device = input_device(model)
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
