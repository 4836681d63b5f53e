"""What ``Pipeline.save(DIR)`` writes: a dynamic (or any) method's state, so it is calibrated once.

The folder holds ``pipeline.json`` (the resolved method, the batch counter, the structure a
``from_history`` allocator decided, each history block's counters, and the model's fingerprint: one
SHA-256 per decoder block, plus the config and the weights outside the layers) and
``state.safetensors`` (every history tensor at its own dtype, and the random generator's state), listed
with their hashes in ``ppf_manifest.json``. :func:`~ppframework.export.restore.load_pipeline` restores it.

Importing this module makes it ``Pipeline.save``'s writer (:data:`Pipeline.state_writer`): the
pipeline sits below the export package and so does not import it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ppframework.devices import named_parameters_materialised
from ppframework.export.folder import staged_folder
from ppframework.history import HistoryStore
from ppframework.pipeline import Pipeline

STATE_KIND = "pipeline-state"
STATE_VERSION = 1
STATE_JSON = "pipeline.json"
STATE_TENSORS = "state.safetensors"


def block_fingerprints(model: nn.Module, layers: nn.ModuleList) -> dict[str, str]:
    """SHA-256 (16 hex digits) of the exact bytes of each block's weights: ``layer I attention`` (the
    layer's ``*attn*`` parameters), ``layer I mlp`` (the rest of the layer: MLP and norms), ``outside
    the layers`` (embeddings, final norm, head) and ``config``."""
    layer_of = {id(layer): index for index, layer in enumerate(layers)}
    owners: dict[str, str] = {}
    for name, module in model.named_modules():
        if id(module) in layer_of:
            owners[name + "."] = f"layer {layer_of[id(module)]}"
    digests: dict[str, Any] = {}
    for name, param in named_parameters_materialised(model):
        prefix = next((p for p in owners if name.startswith(p)), None)
        if prefix is None:
            block = "outside the layers"
        else:
            part = "attention" if "attn" in name[len(prefix) :].split(".")[0] else "mlp"
            block = f"{owners[prefix]} {part}"
        digest = digests.setdefault(block, hashlib.sha256())
        tensor = param.detach().to("cpu").contiguous()
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    result = {block: digest.hexdigest()[:16] for block, digest in digests.items()}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        text = json.dumps(
            {
                k: v
                for k, v in config.to_dict().items()
                if not k.startswith("_") and k != "transformers_version"
            },
            sort_keys=True,
            default=str,
        )
        result["config"] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return result


def history_tensors(history: HistoryStore | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The history's tensors by name (``layer.kind.field``) and its counters by block."""
    tensors: dict[str, torch.Tensor] = {}
    counters: dict[str, Any] = {}
    if history is None:
        return tensors, counters
    for (layer, kind), block in history.blocks.items():
        key = f"{layer}.{kind.value}"
        for field in ("sq_mean", "mean", "counts"):
            value = getattr(block, field)
            if value is not None:
                tensors[f"{key}.{field}"] = value.detach().to("cpu").contiguous()
        counters[key] = {"updates": block.updates, "samples": block.samples}
    return tensors, counters


def save_pipeline_state(pipe: Pipeline, out: str | Path) -> Path:
    """Write ``pipe``'s method, history, generator state and model fingerprint into the new folder ``out``.

    ``out`` must not exist or be an empty folder; nothing is left behind on failure.
    """
    tensors, counters = history_tensors(pipe.history)
    tensors["generator"] = pipe.generator.get_state()
    structure = pipe.history_structure
    info = {
        "format_version": STATE_VERSION,
        "method": pipe.method.model_dump(mode="json"),
        "label": pipe.method.label,
        "batch_index": pipe.batch_index,
        "history": None if pipe.history is None else counters,
        "history_structure": None
        if structure is None
        else [[layer, kind.value, ratio] for (layer, kind), ratio in sorted(structure.items())],
        "fingerprint": block_fingerprints(pipe.model, pipe.adapter.layers),
    }
    with staged_folder(out, "Pipeline.save: folder", STATE_KIND) as tmp:
        save_file(tensors, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(info, indent=2) + "\n")
    return Path(out).expanduser()


Pipeline.state_writer = save_pipeline_state
