"""Export a static method's decision as a smaller model (:func:`export_pruned`) and load it back
(:func:`load_pruned`).

Two formats (docs/export.md):

- ``hf``: a standard Hugging Face checkpoint (``config.json`` with the pruned ``num_attention_heads``,
  ``num_key_value_heads``, ``head_dim`` and MLP width, safetensors, the tokenizer), loadable by plain
  ``transformers`` with no ppframework installed. Possible when every layer has the same widths, the
  family's config states ``head_dim`` on its own, and every compensation bias has a config switch.
- ``per-layer``: the original ``config.json``, the weights at their pruned shapes and
  ``ppf_layers.json`` (each layer's widths); :func:`load_pruned` builds the model from the folder alone.

``auto`` (the default) picks ``hf`` when it is possible and says why not otherwise.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from ppframework.config import MethodConfig
from ppframework.export.build import build_pruned_model
from ppframework.export.errors import ExportError
from ppframework.export.families import ExportFamily, export_family
from ppframework.export.folder import check_target, staged_folder, verify_folder
from ppframework.export.layer_removal import kept_layers, removed_layers_config, removed_layers_state
from ppframework.export.layout import PrunedLayout
from ppframework.export.slicing import KeptUnits, kept_units, plan_layout, sliced_state
from ppframework.models.tokenizer import load_tokenizer
from ppframework.pipeline import Pipeline
from ppframework.registry import default_registry

logger = logging.getLogger(__name__)

ExportFormat = Literal["auto", "hf", "per-layer"]
FORMATS: tuple[str, ...] = ("auto", "hf", "per-layer")
EXPORT_INFO = "ppf_export.json"
LAYERS_FILE = "ppf_layers.json"
EXPORT_KIND = "pruned-model"


@dataclass
class ExportResult:
    """What :func:`export_pruned` wrote."""

    path: Path
    format: str
    #: Why the per-layer format was used (None for ``hf``, or when it was asked for).
    reason: str | None
    layout: PrunedLayout
    bytes: int
    source_parameters: int
    parameters: int
    elapsed_s: float = 0.0
    failures: list[Any] = field(default_factory=list)


def hf_obstacle(family: ExportFamily, layout: PrunedLayout) -> str | None:
    """Why a standard checkpoint cannot describe ``layout`` (None: it can)."""
    if not family.head_dim_in_config:
        return f"the {family.name} config derives the head size from hidden_size / num_attention_heads"
    if not layout.uniform:
        shapes = sorted({layer.shape() for layer in layout.layers})
        shown = ", ".join(map(str, shapes[:3])) + (", ..." if len(shapes) > 3 else "")
        return f"the layers differ in (heads, key/value heads, MLP width): {len(shapes)} kinds ({shown})"
    if any(layer.attention_output_bias for layer in layout.layers) and family.attention_bias_key is None:
        return f"the {family.name} config has no switch for an attention output bias (bias compensation)"
    if any(layer.mlp_output_bias for layer in layout.layers) and family.mlp_bias_key is None:
        return f"the {family.name} config has no switch for an MLP output bias (bias compensation)"
    return None


def config_obstacle(config: Any) -> str | None:
    """Why transformers' own checks refuse a pruned config (None: they accept it).

    E.g. transformers 5 checks ``hidden_size % num_attention_heads == 0`` for LLaMA and Gemma 3 even
    when ``head_dim`` is stated, so keeping 3 of 4 heads of a 64-wide model needs the per-layer format.
    """
    try:
        config.validate()
    except Exception as exc:  # transformers raises its own validation errors (ValueError subclasses)
        cause = getattr(exc, "__cause__", None) or exc
        return f"transformers refuses the pruned config ({cause})"
    return None


def _hf_config(model: PreTrainedModel, family: ExportFamily, layout: PrunedLayout) -> Any:
    config = copy.deepcopy(model.config)
    first = layout.layers[0]
    config.num_attention_heads = first.num_attention_heads
    config.num_key_value_heads = first.num_key_value_heads
    config.head_dim = layout.head_dim
    setattr(config, family.mlp_width_key, first.intermediate_size)
    if any(layer.attention_output_bias for layer in layout.layers):
        setattr(config, str(family.attention_bias_key), True)
    if any(layer.mlp_output_bias for layer in layout.layers):
        setattr(config, str(family.mlp_bias_key), True)
    return config


def _refuse_dynamic(label: str, field_name: str) -> ExportError:
    return ExportError(
        f"{field_name}: method {label!r} is dynamic (it decides per batch), so there is no single smaller "
        "model to export; save its calibrated state with Pipeline.save(DIR) and restore it with "
        "ppframework.load_pipeline(model, DIR), or export a static method (wanda-sp, flap, static-ppsp)"
    )


def check_exportable(pipe: Pipeline) -> None:
    """Refuse a dynamic method (its decision changes per batch) naming ``Pipeline.save``."""
    if not pipe.is_static:
        raise _refuse_dynamic(pipe.method.label, "method")


def check_static_method(method: MethodConfig, field_name: str = "method") -> None:
    """:func:`check_exportable` from the config alone, before any model loads (the pipeline's rule: a
    probe strategy with ``dynamic = False`` and a history that is frozen or absent)."""
    probe = default_registry().build_method(method, field_name)["select_probe"]
    updates = method.history.init == "calibration" and method.history.update != "frozen"
    if getattr(probe, "dynamic", True) or updates:
        raise _refuse_dynamic(method.label, field_name)


def export_pruned(
    pipe: Pipeline,
    out: str | Path,
    *,
    tokenizer: Any = None,
    format: ExportFormat = "auto",
    max_shard_size: str | int = "5GB",
    field_name: str = "out",
) -> ExportResult:
    """Write ``pipe``'s static decision as a smaller model into the new folder ``out``.

    ``format``: ``auto`` (a standard checkpoint when possible, else per-layer), ``hf`` (refused with the
    reason when impossible) or ``per-layer``. ``tokenizer`` is saved beside the weights when given. The
    folder is written whole or not at all (see :func:`~ppframework.export.folder.staged_folder`).
    """
    start = time.perf_counter()
    if format not in FORMATS:
        raise ExportError(f"format: {format!r} is not one of {', '.join(FORMATS)}")
    check_exportable(pipe)
    check_target(out, field_name)
    model = pipe.model
    family = export_family(str(model.config.model_type))
    if pipe.removes_layers:
        chosen, obstacle, layout, pruned = _export_layer_removal(pipe, family, format)
    else:
        chosen, obstacle, layout, pruned = _export_sliced(pipe, family, format)
    info = {
        "format": chosen,
        "reason": obstacle if chosen == "per-layer" else None,
        "family": family.name,
        "method": pipe.method.model_dump(mode="json"),
        "label": pipe.method.label,
        "source": str(getattr(model.config, "_name_or_path", "")),
        "source_parameters": int(sum(p.numel() for p in model.parameters())),
        "parameters": int(sum(p.numel() for p in pruned.parameters())),
    }
    with staged_folder(out, field_name, EXPORT_KIND) as tmp:
        pruned.save_pretrained(tmp, max_shard_size=max_shard_size)
        if chosen == "per-layer":
            (tmp / LAYERS_FILE).write_text(json.dumps(layout.to_json(), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        else:
            logger.warning("no tokenizer given: the export holds the model only")
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2, default=str) + "\n")
        size = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
    path = Path(out).expanduser()
    logger.info("exported %s (%s format) to %s", pipe.method.label, chosen, path)
    return ExportResult(
        path=path,
        format=chosen,
        reason=info["reason"],
        layout=layout,
        bytes=size,
        source_parameters=info["source_parameters"],
        parameters=info["parameters"],
        elapsed_s=time.perf_counter() - start,
    )


def _export_sliced(
    pipe: Pipeline, family: ExportFamily, format: ExportFormat
) -> tuple[str, str | None, PrunedLayout, PreTrainedModel]:
    """(format chosen, why not hf, layout, model) for a decision that prunes inside blocks."""
    model, adapter = pipe.model, pipe.adapter
    kept: KeptUnits = kept_units(adapter, pipe.static_masks())
    shared, _ = plan_layout(adapter, kept, family, shared_kv=True)
    obstacle = hf_obstacle(family, shared)
    if obstacle is None:
        obstacle = config_obstacle(_hf_config(model, family, shared))
    if format == "hf" and obstacle is not None:
        raise ExportError(
            f"format: 'hf' is impossible here: {obstacle}; use format 'per-layer' (ppf export --format "
            "per-layer) or 'auto', and load it with ppframework.load_pruned(DIR)"
        )
    chosen = "hf" if format != "per-layer" and obstacle is None else "per-layer"
    layout, slots = plan_layout(adapter, kept, family, shared_kv=chosen == "hf")
    state = sliced_state(model, adapter, kept, slots, family)
    if chosen == "hf":
        return chosen, obstacle, layout, build_pruned_model(_hf_config(model, family, layout), state, family)
    return chosen, obstacle, layout, build_pruned_model(copy.deepcopy(model.config), state, family, layout)


def _export_layer_removal(
    pipe: Pipeline, family: ExportFamily, format: ExportFormat
) -> tuple[str, str | None, PrunedLayout, PreTrainedModel]:
    """(format chosen, None, layout, model) for a whole-layer removal: the kept layers renumbered, at
    their full widths, which a standard checkpoint describes (``per-layer`` writes the same model with
    ``ppf_layers.json`` beside it when asked for)."""
    model, adapter = pipe.model, pipe.adapter
    removed = pipe.layers_to_remove()
    config = removed_layers_config(model.config, removed)
    state = removed_layers_state(model, removed)
    full = kept_units(adapter, {})
    layout, _ = plan_layout(adapter, full, family, shared_kv=True)
    keep = kept_layers(adapter.num_layers, removed)
    layout = PrunedLayout(layout.family, layout.head_dim, tuple(layout.layers[index] for index in keep))
    chosen = "per-layer" if format == "per-layer" else "hf"
    logger.info("%s removes layers %s of %d", pipe.method.label, removed, adapter.num_layers)
    return chosen, None, layout, build_pruned_model(config, state, family, layout if chosen != "hf" else None)


def _read_state(folder: Path) -> dict[str, Any]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    state: dict[str, Any] = {}
    for shard in shards:
        if not (folder / shard).is_file():
            raise ExportError(f"{str(folder)!r}: shard {shard!r} is missing; export again")
        state.update(load_file(str(folder / shard)))
    return state


def load_pruned(folder: str | Path, *, tokenizer: bool = True) -> tuple[PreTrainedModel, Any]:
    """Load an export written by :func:`export_pruned`: (model, tokenizer or None), in eval mode.

    Every file is checked against the folder's manifest first (missing shard, truncated or modified
    file: :class:`~ppframework.export.errors.ExportError`). A ``per-layer`` export is built from the folder
    alone (its config, ``ppf_layers.json`` and weights); an ``hf`` one is read by ``from_pretrained``.
    """
    path = verify_folder(folder, EXPORT_KIND)
    info = json.loads((path / EXPORT_INFO).read_text())
    if info.get("format") == "hf":
        model = AutoModelForCausalLM.from_pretrained(str(path))
    else:
        try:
            layout = PrunedLayout.from_json(json.loads((path / LAYERS_FILE).read_text()))
        except (OSError, ValueError) as exc:
            raise ExportError(f"{str(path)!r}: {exc}") from None
        config = AutoConfig.from_pretrained(str(path))
        try:
            model = build_pruned_model(config, _read_state(path), export_family(config.model_type), layout)
        except ValueError as exc:
            raise ExportError(f"{str(path)!r}: {exc}") from None
    model.eval()
    tok = None
    if tokenizer and (path / "tokenizer_config.json").is_file():
        tok = load_tokenizer(str(path), str(path))
    return model, tok
