"""One pass that checks a whole run before any weights load.

:func:`preflight` is called by :func:`ppframework.runner.run` (``ppf run`` and ``ppf ablate``) and
:func:`ppframework.evaluate.evaluate` (``ppf eval``) before ``load_model``. It checks everything that
can be known from the config, the model's ``config.json`` (and weight file headers) and the data
files, and raises :class:`~ppframework.errors.ConfigError` naming the field:

* the output folder (``--out``) can be written; the calibration cache folder can be written (if not,
  a warning: the run continues without caching); a GGUF model's conversion cache can be written;
* the evaluation text and the calibration data can be read;
* the model's ``config.json`` is a JSON mapping of a supported family, and its ``.safetensors``
  files are complete;
* for every method (named ``methods[i]``, or ``variants.<name> at {grid point}`` in an ablation):
  ``pruning.skip_layers`` within the layer count, not every layer skipped, the per-layer ratio
  after inflation below 1, and ``pruning.round_to`` not rounding the kept MLP width up to the whole
  width (``intermediate_size``), which would leave every MLP unpruned;
* ``data.seq_len`` and the calibration window fit the model's ``max_position_embeddings``;
* with the tokenizer (read without the weights): the text gives enough windows for one scored batch
  after the warm-up, and some calibration document is longer than a calibration window.

What cannot be known without loading weights (a hub model not in the local cache, a GGUF file not
converted yet) is logged at INFO level and checked when the model loads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ppframework import data as data_mod
from ppframework.config import RunConfig
from ppframework.errors import ConfigError
from ppframework.outputs import check_out_dir, folder_problem

logger = logging.getLogger(__name__)

__all__ = ["ModelFacts", "PreflightResult", "check_methods", "model_facts", "preflight"]


@dataclass
class ModelFacts:
    """What the model's ``config.json`` says (None where unknown before the weights load)."""

    config_file: Path | None = None
    model_type: str | None = None
    num_layers: int | None = None
    max_positions: int | None = None
    mlp_units: int | None = None
    directory: Path | None = None
    note: str = ""
    conversion_dir: Path | None = None


@dataclass
class PreflightResult:
    """What the checks read, for the run to reuse: the evaluation text, its token ids (when the
    tokenizer could be read without the weights) and the model facts."""

    text: str
    model: ModelFacts
    eval_ids: torch.Tensor | None = None
    skipped: list[str] = field(default_factory=list)


def _int(config: dict[str, Any], source: Path, *keys: str) -> int | None:
    """The first of ``keys`` set in ``config`` (None when none is, or all are null).

    Raises :class:`ConfigError` naming ``source`` and the field when the value is not a positive
    whole number (a float such as ``2048.0`` counts as one).
    """
    for key in keys:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(
                f"{source}: {key} must be a positive whole number, got {value!r}; fix the model's "
                "config.json (or use an intact copy of the model)"
            )
        return value
    return None


def _mlp_width(config: dict[str, Any]) -> int | None:
    """The MLP width every layer shares (``intermediate_size`` or OPT's ``ffn_dim``), or None when it
    is absent or not one positive whole number (e.g. a per-layer list); only advisory checks use it."""
    for key in ("intermediate_size", "ffn_dim"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def model_facts(cfg: RunConfig) -> ModelFacts:
    """Read ``cfg.model``'s ``config.json`` (and check its weight file headers) without loading weights."""
    from ppframework.adapters import supported_model_types
    from ppframework.models import check_safetensors_file, find_model_files, read_model_config

    files = find_model_files(cfg.model.name, cfg.model.gguf_file, cfg.model.cache_dir)
    if files.config_file is None:
        return ModelFacts(note=files.note, conversion_dir=files.conversion_dir)
    config = read_model_config(files.config_file)
    model_type = config.get("model_type")
    if model_type not in supported_model_types():
        raise ConfigError(
            f"model.name: model family {model_type!r} (model_type in {files.config_file}) is not supported; "
            f"supported model types: {', '.join(supported_model_types())}."
        )
    if files.directory is not None:
        for weights in sorted(files.directory.glob("*.safetensors")):
            check_safetensors_file(weights)
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    merged = {**text_config, **config}
    return ModelFacts(
        config_file=files.config_file,
        model_type=model_type,
        num_layers=_int(merged, files.config_file, "num_hidden_layers", "n_layer", "num_layers"),
        max_positions=_int(merged, files.config_file, "max_position_embeddings", "n_positions"),
        mlp_units=_mlp_width(merged),
        directory=files.directory,
    )


def check_methods(
    cfg: RunConfig,
    num_layers: int,
    method_fields: Sequence[str] | None = None,
    mlp_units: int | None = None,
) -> None:
    """Skip layers against ``num_layers``, per-layer ratios after inflation and (when ``mlp_units``,
    the MLP width, is known) ``pruning.round_to`` against that width, for every method."""
    from ppframework.pipeline import inflated_ratio
    from ppframework.strategies.masking import pruned_count, rounded_keep

    for index, method in enumerate(cfg.methods):
        where = method_fields[index] if method_fields else f"methods[{index}]"
        pruning = method.pruning
        bad = [i for i in pruning.skip_layers if i >= num_layers]
        if bad:
            raise ConfigError(
                f"{where}.pruning.skip_layers: {bad} out of range for a {num_layers}-layer model "
                f"(layers 0..{num_layers - 1})"
            )
        if pruning.ratio == 0:
            continue
        skipped = len(pruning.skip_layers)
        if skipped >= num_layers:
            raise ConfigError(
                f"{where}.pruning.skip_layers: every one of the {num_layers} layers is skipped, so nothing "
                "can be pruned; skip fewer layers"
            )
        layer_ratio = inflated_ratio(pruning.ratio, num_layers, skipped, pruning.inflate_ratio)
        if layer_ratio >= 1.0:
            raise ConfigError(
                f"{where}.pruning.ratio: {pruning.ratio} inflates to a per-layer ratio of {layer_ratio} >= 1 "
                f"with {skipped} of {num_layers} layers skipped; lower the ratio, skip fewer layers "
                "(pruning.skip_layers) or set pruning.inflate_ratio false"
            )
        if mlp_units is None or "mlp" not in pruning.targets or pruning.round_to <= 1:
            continue
        uniform = method.strategies.allocate.name == "uniform"
        would_prune = pruned_count(mlp_units, layer_ratio) > 0
        rounded_away = rounded_keep(mlp_units, layer_ratio, pruning.round_to) >= mlp_units
        if pruning.round_to >= mlp_units or (uniform and would_prune and rounded_away):
            raise ConfigError(
                f"{where}.pruning.round_to: {pruning.round_to} rounds the kept MLP width of every layer "
                f"up to all {mlp_units} units (per-layer ratio {layer_ratio}), so no MLP would be pruned; "
                "lower pruning.round_to"
            )


def _check_positions(cfg: RunConfig, facts: ModelFacts, zeroshot_length: int | None) -> None:
    limit = facts.max_positions
    if limit is None:
        return
    source = f"max_position_embeddings in {facts.config_file}"
    if cfg.data.seq_len > limit:
        raise ConfigError(
            f"data.seq_len: {cfg.data.seq_len} tokens exceed the model's {limit} positions ({source}); "
            f"set data.seq_len <= {limit}"
        )
    if any(m.needs_calibration for m in cfg.methods) and cfg.calibration_seq_len > limit:
        raise ConfigError(
            f"calibration.seq_len: {cfg.calibration_seq_len} tokens exceed the model's {limit} positions "
            f"({source}); set calibration.seq_len <= {limit}"
        )
    if zeroshot_length is not None and zeroshot_length > limit:
        raise ConfigError(
            f"evaluation.zeroshot.max_length: {zeroshot_length} tokens exceed the model's {limit} positions "
            f"({source}); set evaluation.zeroshot.max_length (or calibration.seq_len) <= {limit}"
        )


def _check_windows(cfg: RunConfig, tokenizer: Any, text: str) -> torch.Tensor:
    d = cfg.data
    ids = data_mod.tokenize_text(text, tokenizer)
    n_tokens = int(ids.numel())
    n_windows = n_tokens // d.seq_len
    n_batches = n_windows // d.batch_size
    usable = min(n_batches, d.max_batches) if d.max_batches else n_batches
    if usable <= d.warmup_batches:
        raise ConfigError(
            f"data: {d.name!r} has {n_tokens} tokens, {n_windows} window(s) of data.seq_len={d.seq_len}, "
            f"{n_batches} full batch(es) of data.batch_size={d.batch_size}; with data.warmup_batches="
            f"{d.warmup_batches} (not scored) no batch is left to score; lower data.seq_len, "
            "data.batch_size or data.warmup_batches, or use a longer text (data.name)"
        )
    return ids


def _check_calibration_documents(cfg: RunConfig, tokenizer: Any, documents: list[str]) -> None:
    seq = cfg.calibration_seq_len
    if not documents:
        raise ConfigError(f"calibration.dataset: {cfg.calibration.dataset!r} has no documents")
    longest = 0
    for document in sorted(documents, key=len, reverse=True):
        n = int(data_mod._encode(tokenizer, document, add_special_tokens=True).numel())
        if n > seq:
            return
        longest = max(longest, n)
        if len(document) * 4 + 4 <= seq:  # no shorter document can exceed seq tokens (<= 4 per character)
            break
    raise ConfigError(
        f"calibration.seq_len: no document of calibration.dataset {cfg.calibration.dataset!r} has more than "
        f"{seq} tokens (the longest has {longest}); lower calibration.seq_len (it defaults to "
        "data.seq_len) or use a data set with longer documents"
    )


def _check_caches(cfg: RunConfig, facts: ModelFacts) -> None:
    from ppframework.calibration import default_cache_dir as calibration_cache_root

    if facts.conversion_dir is not None:
        problem = folder_problem(facts.conversion_dir.parent)
        if problem:
            field_name = "model.cache_dir" if cfg.model.cache_dir else "PPF_CACHE_DIR"
            raise ConfigError(
                f"{field_name}: the GGUF model is converted once into {facts.conversion_dir.parent}, but "
                f"{problem}; set model.cache_dir (or PPF_CACHE_DIR) to a writable folder"
            )
    if cfg.calibration.cache and any(m.needs_calibration for m in cfg.methods):
        root = Path(cfg.calibration.cache_dir) if cfg.calibration.cache_dir else calibration_cache_root()
        problem = folder_problem(root / "calibration")
        if problem:
            logger.warning(
                "calibration cache folder %s cannot be written (%s); the calibration will be computed and "
                "not cached (set calibration.cache_dir or PPF_CACHE_DIR to a writable folder, or "
                "calibration.cache=false)",
                root / "calibration",
                problem,
            )


def preflight(
    cfg: RunConfig,
    *,
    method_fields: Sequence[str] | None = None,
    zeroshot_length: int | None = None,
    check_output: bool = True,
) -> PreflightResult:
    """Check the whole run of ``cfg`` before any weights load (see the module docstring).

    Args:
        cfg: the validated run config.
        method_fields: how to name each method in messages (default ``methods[i]``; an ablation
            passes ``variants.<name> at {grid point}``).
        zeroshot_length: the longest zero-shot request ``ppf eval`` will run, if any.
        check_output: check that ``cfg.out_dir`` (when set) can be written.

    Returns:
        the evaluation text and what is known about the model.

    Raises:
        ConfigError: the first problem found, naming the field (or file) and the fix.
    """
    if method_fields is not None and len(method_fields) != len(cfg.methods):
        raise ValueError("method_fields must name every method")
    if check_output and cfg.out_dir:
        check_out_dir(cfg.out_dir, "--out")
    data_mod.resolve_data_dir(cfg.data.data_dir)
    documents: list[str] | None = None
    text = data_mod.load_corpus_text(cfg.data.name, cfg.data.split, cfg.data.data_dir)
    if any(m.needs_calibration for m in cfg.methods):
        try:
            cal = cfg.calibration
            documents = data_mod.load_documents(cal.dataset, cal.split, cfg.data.data_dir)
        except ConfigError as exc:
            raise ConfigError(
                f"calibration.dataset: {cfg.calibration.dataset!r} cannot be read: {exc}"
            ) from None
    facts = model_facts(cfg)
    skipped: list[str] = []
    if facts.num_layers is not None:
        check_methods(cfg, facts.num_layers, method_fields, facts.mlp_units)
    else:
        skipped.append("skip layers and per-layer ratios against the layer count")
    _check_positions(cfg, facts, zeroshot_length)
    if facts.max_positions is None:
        skipped.append("window lengths against the model's positions")
    _check_caches(cfg, facts)
    eval_ids = None
    if facts.directory is not None:
        from ppframework.models import load_tokenizer_only

        tokenizer = load_tokenizer_only(facts.directory, cfg.model.name)
        eval_ids = _check_windows(cfg, tokenizer, text)
        if documents is not None:
            _check_calibration_documents(cfg, tokenizer, documents)
    else:
        skipped.append("window and calibration document counts (they need the tokenizer)")
    if skipped:
        logger.info(
            "preflight: %s; deferred until the model loads: %s",
            facts.note or "the model's config.json cannot be read without loading it",
            "; ".join(skipped),
        )
    return PreflightResult(text=text, model=facts, eval_ids=eval_ids, skipped=skipped)
