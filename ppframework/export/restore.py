"""Restore a pipeline saved by ``Pipeline.save(DIR)``: :func:`load_pipeline`.

The folder's files are checked against its manifest, the model against the saved fingerprint (a
different model is refused, naming the blocks that differ), then the method, the history (bit for bit,
each tensor at its saved dtype), the random generator, the batch counter and a ``from_history``
allocator's structure are put back, so the restored pipeline decides exactly as the saved one would.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from ppframework.adapters import get_adapter
from ppframework.config import MethodConfig
from ppframework.export.errors import ExportError
from ppframework.export.folder import verify_folder
from ppframework.export.pipeline_state import (
    STATE_JSON,
    STATE_KIND,
    STATE_TENSORS,
    STATE_VERSION,
    block_fingerprints,
)
from ppframework.history import BlockHistory, HistoryStore
from ppframework.pipeline import Pipeline
from ppframework.registry import StrategyRegistry
from ppframework.types import BlockKind


def _history(tensors: dict, counters: dict | None) -> HistoryStore | None:
    if counters is None:
        return None
    blocks = {}
    for key, count in counters.items():
        layer, kind = key.split(".")
        blocks[(int(layer), BlockKind(kind))] = BlockHistory(
            sq_mean=tensors[f"{key}.sq_mean"],
            mean=tensors.get(f"{key}.mean"),
            updates=int(count["updates"]),
            samples=int(count["samples"]),
            counts=tensors.get(f"{key}.counts"),
        )
    return HistoryStore(blocks)


def load_pipeline(
    model: nn.Module, folder: str | Path, *, registry: StrategyRegistry | None = None
) -> Pipeline:
    """The pipeline saved in ``folder`` by ``Pipeline.save``, rebuilt on ``model`` (not attached).

    Raises :class:`~ppframework.export.errors.ExportError` for a missing, truncated or modified file
    and for a model other than the one the state was saved from (the differing blocks are named).
    """
    path = verify_folder(folder, STATE_KIND)
    info = json.loads((path / STATE_JSON).read_text())
    if info.get("format_version") != STATE_VERSION:
        raise ExportError(
            f"{str(path)!r}: saved in state format {info.get('format_version')}, not {STATE_VERSION}"
        )
    saved = info["fingerprint"]
    current = block_fingerprints(model, get_adapter(model).layers)
    differing = [
        block for block in sorted(set(saved) | set(current)) if saved.get(block) != current.get(block)
    ]
    if differing:
        shown = ", ".join(differing[:8]) + (f" and {len(differing) - 8} more" if len(differing) > 8 else "")
        raise ExportError(
            f"{str(path)!r}: saved from another model: {shown} differ; load it on the model it was saved "
            "from (same weights, dtype and config)"
        )
    tensors = load_file(str(path / STATE_TENSORS))
    method = MethodConfig.model_validate(info["method"])
    pipe = Pipeline(model, method, history=_history(tensors, info["history"]), registry=registry)
    pipe.generator.set_state(tensors["generator"])
    pipe.batch_index = int(info["batch_index"])
    structure = info.get("history_structure")
    if structure is not None:
        pipe.history_structure = {(int(layer), BlockKind(kind)): float(r) for layer, kind, r in structure}
    return pipe
