"""The measures without future tokens in ``ppf eval`` (``evaluation.fidelity``).

:mod:`ppframework.generation.fidelity` computes them for one model state; this module fits them
into ``ppf eval``'s protocol:

* before any weights load, :func:`check_fidelity` names every bad input (a prompt set without its
  data file, a corpus that is neither a known data set nor a file, two corpora shown under one name)
  and :func:`load_fidelity_texts` reads every corpus;
* once the tokenizer is there, :func:`plan_fidelity` builds the prompts (the first
  ``evaluation.fidelity.prompts`` of each prompt set, as the generation tasks build them) and the
  corpus windows (cut as ``ppf run`` cuts its windows);
* on the dense row :func:`add_dense_references` computes the dense greedy continuations once
  (batch 1, to the first EOS), shared by every method;
* :func:`measure_fidelity` scores one method (or dense against itself): every prompt set and every
  corpus through a fresh pipeline of its own, so no measurement depends on another's history updates.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ppframework import data as data_mod
from ppframework.config import RunConfig
from ppframework.errors import ConfigError
from ppframework.generation.fidelity import continuation_perplexity, dense_continuations, fidelity
from ppframework.generation.tasks import get_generation_task
from ppframework.pipeline import Pipeline

logger = logging.getLogger(__name__)

__all__ = [
    "FidelityPlan",
    "add_dense_references",
    "check_fidelity",
    "corpus_label",
    "corpus_names",
    "corpus_split",
    "fidelity_prompts",
    "load_fidelity_texts",
    "mean_top1",
    "measure_fidelity",
    "plan_fidelity",
]

_FIELD = "evaluation.fidelity"


def corpus_names(cfg: RunConfig) -> list[str]:
    """The corpora of continuation perplexity: ``evaluation.fidelity.corpora``, else ``data.name``."""
    corpora = cfg.evaluation.fidelity.corpora
    return list(corpora) if corpora is not None else [cfg.data.name]


def corpus_label(name: str) -> str:
    """How a corpus is keyed in results: a known data set's name, else the file's name."""
    return name if name in data_mod.KNOWN_DATASETS else Path(name).name


def corpus_split(name: str, cfg: RunConfig) -> str:
    """The split read for a corpus: C4's validation sample, ``data.split`` for the run's own text,
    WikiText-2's test split otherwise (a local file has no splits)."""
    if name == "c4":
        return "validation"
    return cfg.data.split if name == cfg.data.name else "test"


def _corpus_field(cfg: RunConfig, index: int) -> str:
    return f"{_FIELD}.corpora[{index}]" if cfg.evaluation.fidelity.corpora is not None else "data.name"


def check_fidelity(cfg: RunConfig) -> None:
    """Fail before the model loads on what the config alone shows wrong (each error names its field):
    a prompt set whose data file is missing, a corpus that is neither a known data set nor an existing
    file, two corpora with the same file name."""
    fid = cfg.evaluation.fidelity
    if not fid.enabled:
        return
    for i, name in enumerate(fid.prompt_sets):
        try:
            get_generation_task(name).data_file(cfg.data.data_dir)  # raises when the file is missing
        except ConfigError as exc:
            raise ConfigError(f"{_FIELD}.prompt_sets[{i}]: {exc}") from None
    labels: dict[str, str] = {}
    for i, name in enumerate(corpus_names(cfg)):
        if name not in data_mod.KNOWN_DATASETS and not Path(name).expanduser().is_file():
            raise ConfigError(
                f"{_corpus_field(cfg, i)}: {name!r} is neither a known corpus "
                f"({', '.join(data_mod.KNOWN_DATASETS)}) nor an existing text file"
            )
        label = corpus_label(name)
        if label in labels:
            raise ConfigError(
                f"{_corpus_field(cfg, i)}: {name!r} and {labels[label]!r} would both be reported as "
                f"{label!r}; rename one of the files"
            )
        labels[label] = name


def load_fidelity_texts(cfg: RunConfig, eval_text: str | None = None) -> dict[str, str]:
    """Every corpus's text by label (before the model loads; ``eval_text`` is ``data.name``'s, when
    already read). A corpus that cannot be read is an error naming its field."""
    if not cfg.evaluation.fidelity.enabled:
        return {}
    texts: dict[str, str] = {}
    for i, name in enumerate(corpus_names(cfg)):
        if name == cfg.data.name and eval_text is not None:
            texts[corpus_label(name)] = eval_text
            continue
        try:
            texts[corpus_label(name)] = data_mod.load_corpus_text(
                name, corpus_split(name, cfg), cfg.data.data_dir
            )
        except ConfigError as exc:
            raise ConfigError(f"{_corpus_field(cfg, i)}: {exc}") from None
    return texts


@dataclass
class FidelityPlan:
    """What every row of ``ppf eval`` is scored on: prompts, windows, and the dense references."""

    prompts: dict[str, list[list[int]]]
    windows: dict[str, torch.Tensor]
    pad_token_id: int
    batch_size: int
    """Prompts per decision (the last batch of a prompt set may be smaller)."""
    window_batch: int
    """Windows per decision (only whole batches are scored)."""
    prefix_len: int
    new_tokens: int
    references: dict[str, list[list[int]]] = field(default_factory=dict)
    """The dense greedy continuation of every prompt (:func:`add_dense_references`)."""

    def describe(self) -> dict[str, Any]:
        """The resolved settings, for results.json."""
        return {
            "prompts": {name: len(ids) for name, ids in self.prompts.items()},
            "new_tokens": self.new_tokens,
            "stop_at_eos": True,
            "batch_size": self.batch_size,
            "windows": {name: int(w.shape[0]) for name, w in self.windows.items()},
            "window_len": next((int(w.shape[1]) for w in self.windows.values()), None),
            "window_batch": self.window_batch,
            "prefix_len": self.prefix_len,
        }


def fitting_prompt_ids(
    name: str, data_dir: Any, tokenizer: Any, limit: int, fits: int, offset: int = 0
) -> list[list[int]]:
    """Token ids of ``limit`` prompts of generation task ``name`` from item ``offset`` on that fit
    ``fits`` tokens: XSum documents are cut to fit (as the generation tasks cut them), code prompts
    that do not fit are left out with a warning."""
    task = get_generation_task(name)
    items = task.load(data_dir, offset + limit, tokenizer, fits if name == "xsum" else None)[offset:]
    prompts = []
    for item in items:
        ids = list(tokenizer(item.prompt)["input_ids"])
        if len(ids) > fits:
            logger.warning("%s %s: %d prompt tokens exceed %d; left out", name, item.item_id, len(ids), fits)
            continue
        prompts.append(ids)
    return prompts


def fidelity_prompts(
    cfg: RunConfig, index: int, tokenizer: Any, model_positions: int | None
) -> list[list[int]]:
    """Token ids of the first ``evaluation.fidelity.prompts`` prompts of prompt set ``index`` that fit.

    A prompt must fit the history's positions (``calibration.seq_len``) and leave room for the new
    tokens within the model's positions: XSum documents are cut to fit (as the generation tasks cut
    them), code prompts that do not fit are left out with a warning. No prompt left is an error.
    """
    fid = cfg.evaluation.fidelity
    name = fid.prompt_sets[index]
    fits = cfg.calibration_seq_len
    if model_positions is not None:
        fits = min(fits, model_positions - fid.new_tokens)
    if fits < 2:
        raise ConfigError(
            f"{_FIELD}.new_tokens: {fid.new_tokens} new tokens leave no room for a prompt within the "
            f"model's {model_positions} positions"
        )
    prompts = fitting_prompt_ids(name, cfg.data.data_dir, tokenizer, fid.prompts, fits)
    if not prompts:
        raise ConfigError(
            f"{_FIELD}.prompt_sets[{index}]: no {name} prompt of the first {fid.prompts} fits {fits} tokens "
            "(calibration.seq_len, and the model's positions minus evaluation.fidelity.new_tokens)"
        )
    return prompts


def _windows(cfg: RunConfig, tokenizer: Any, label: str, text: str) -> torch.Tensor:
    d = cfg.data
    ids = data_mod.tokenize_text(text, tokenizer)
    try:
        windows = data_mod.make_windows(
            ids, d.seq_len, d.window_policy, cfg.seed, max_windows=cfg.evaluation.fidelity.windows
        )
    except ConfigError as exc:
        raise ConfigError(f"{_FIELD}.corpora ({label}): {exc}") from None
    return data_mod.start_with_bos(windows, tokenizer) if d.window_bos else windows


def plan_fidelity(
    cfg: RunConfig, tokenizer: Any, model_positions: int | None, texts: dict[str, str]
) -> FidelityPlan:
    """Prompts and windows of every prompt set and corpus, and the resolved batch sizes."""
    fid = cfg.evaluation.fidelity
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = {
        name: fidelity_prompts(cfg, i, tokenizer, model_positions) for i, name in enumerate(fid.prompt_sets)
    }
    windows = {label: _windows(cfg, tokenizer, label, text) for label, text in texts.items()}
    batch = fid.batch_size if fid.batch_size is not None else cfg.data.batch_size
    fewest = min((int(w.shape[0]) for w in windows.values()), default=batch)
    window_batch = min(batch, fewest)
    for label, w in windows.items():
        usable = w.shape[0] - w.shape[0] % window_batch
        if usable < w.shape[0]:
            logger.warning(
                "%s: %d windows, %d scored (whole batches of %d)", label, w.shape[0], usable, window_batch
            )
        windows[label] = w[:usable]
    return FidelityPlan(
        prompts=prompts,
        windows=windows,
        pad_token_id=int(pad if pad is not None else 0),
        batch_size=batch,
        window_batch=window_batch,
        prefix_len=fid.prefix_len if fid.prefix_len is not None else cfg.data.seq_len // 2,
        new_tokens=fid.new_tokens,
    )


def add_dense_references(model: nn.Module, plan: FidelityPlan, progress: bool = False) -> None:
    """The dense model's greedy continuation of every prompt (no pipeline attached), once."""
    for name, prompts in plan.prompts.items():
        if name not in plan.references:
            plan.references[name] = dense_continuations(
                model, prompts, plan.new_tokens, pad_token_id=plan.pad_token_id, progress=progress
            )


@contextmanager
def _fresh(make_pipeline: Callable[[], Pipeline | None]) -> Iterator[Pipeline | None]:
    """A fresh pipeline from ``make_pipeline`` (None: dense) for one measurement, released after it."""
    pipe = make_pipeline()
    try:
        yield pipe
    finally:
        if pipe is not None:
            pipe.release()


def measure_fidelity(
    model: nn.Module,
    plan: FidelityPlan,
    make_pipeline: Callable[[], Pipeline | None],
    *,
    label: str,
    progress: bool = False,
) -> dict[str, Any]:
    """One row's ``fidelity``: top-1 and KL per prompt set, continuation perplexity per corpus.

    ``make_pipeline`` gives a fresh, detached pipeline for each measurement (None: dense against
    itself). Returns ``{"prompt_sets": {name: ...}, "continuation_perplexity": {corpus: ...},
    "mean_top1": ...}`` (the summaries of :mod:`ppframework.generation.fidelity`).
    """
    if set(plan.references) != set(plan.prompts):
        raise RuntimeError("measure_fidelity: the dense references are missing (add_dense_references)")
    out: dict[str, Any] = {"prompt_sets": {}, "continuation_perplexity": {}, "mean_top1": None}
    decode_ratios: list[float] = []  # what each measurement's decode steps removed
    for name, prompts in plan.prompts.items():
        with _fresh(make_pipeline) as pipe:
            result = fidelity(
                model,
                pipe,
                prompts,
                plan.references[name],
                pad_token_id=plan.pad_token_id,
                batch_size=plan.batch_size,
                progress=progress,
                desc=f"fidelity {name} {label}",
            )
            if pipe is not None and pipe.decode_realised_ratio() is not None:
                decode_ratios.append(pipe.decode_realised_ratio())
        out["prompt_sets"][name] = result.to_json()
        logger.info("%s %s: top-1 %.4f, KL %.5f", label, name, result.top1, result.kl)
    for corpus, windows in plan.windows.items():
        with _fresh(make_pipeline) as pipe:
            cont = continuation_perplexity(
                model,
                pipe,
                windows,
                plan.prefix_len,
                batch_size=plan.window_batch,
                progress=progress,
                desc=f"continuation ppl {corpus} {label}",
            )
            if pipe is not None and pipe.decode_realised_ratio() is not None:
                decode_ratios.append(pipe.decode_realised_ratio())
        out["continuation_perplexity"][corpus] = cont.to_json()
        logger.info("%s %s: continuation perplexity %.3f", label, corpus, cont.perplexity)
    out["mean_top1"] = mean_top1(out)
    out["decode_realised_ratio"] = sum(decode_ratios) / len(decode_ratios) if decode_ratios else None
    return out


def mean_top1(row_fidelity: dict[str, Any] | None) -> float | None:
    """The unweighted mean of the prompt sets' top-1 agreements (None when none was measured)."""
    if not row_fidelity:
        return None
    values = [
        s["top1"]
        for s in (row_fidelity.get("prompt_sets") or {}).values()
        if s is not None and s.get("top1") is not None and math.isfinite(s["top1"])
    ]
    return sum(values) / len(values) if values else None
