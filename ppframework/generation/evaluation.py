"""The generation part of ``ppf eval``: load the configured tasks once, run them for one model state.

For each method (dense included) ``ppf eval`` calls :func:`run_generation_tasks` with the method's
pipeline attached: every task's prompts go through ``model.generate`` (greedy, left padding, fixed
order; see :mod:`ppframework.generation.runner`), the completions are scored (pass@1 in the code
sandbox, ROUGE for XSum) and prefill and decode are timed separately.

Prompt lengths are checked before any heavy work: a prompt is decided on in one prefill, so it must
fit the history's positions (``calibration.seq_len``) and leave room for the new tokens within the
model's positions. XSum documents are cut from their end to fit; a code prompt that does not fit is
an error naming the task, the item and the limit.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ppframework.config import GenerationConfig, GenerationTaskConfig, RunConfig
from ppframework.errors import ConfigError
from ppframework.generation.runner import generate_completions
from ppframework.generation.sandbox import check_sandbox
from ppframework.generation.tasks import GenerationItem, get_generation_task

logger = logging.getLogger(__name__)


@dataclass
class GenerationTaskResult:
    """One task's quality and speed for one method."""

    task: str
    metrics: dict[str, float]
    n_items: int
    prefill_s: float
    decode_s: float
    decode_tokens: int
    new_tokens: int
    decode_tokens_per_s: float
    max_new_tokens: int
    decode_tps_ratio: float | None = None  # method / dense, filled once dense is known
    records: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Everything but the per-item records (for results.json)."""
        return {k: v for k, v in self.__dict__.items() if k != "records"}


class CompletionLog:
    """Appends each completion to a JSON-lines file as soon as its batch finishes.

    An interrupted or crashing ``ppf eval`` then keeps every completion already made (unscored: the
    method, task, item and text). The file is emptied when the log is created; the report written
    later (partial or complete) replaces it with the scored records. A write that fails is logged
    once and the run goes on.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._failed = False
        self._append([], mode="w")

    def add(self, records: list[dict[str, Any]]) -> None:
        """Append ``records``, one JSON object per line, and flush them to the file."""
        self._append(records, mode="a")

    def _append(self, records: list[dict[str, Any]], mode: str) -> None:
        if self._failed:
            return
        try:
            # Opened per batch: a report written in between replaces the file (os.replace), and the
            # next batch must append to the new one.
            with open(self.path, mode, encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        except OSError as exc:
            self._failed = True
            logger.warning("could not write completions to %s as they finish: %s", self.path, exc)


CODE_TASKS: frozenset[str] = frozenset({"humaneval", "mbpp"})
"""Generation tasks scored by running the generated code (opt-in needed, see :func:`check_code_execution`)."""


def check_code_execution(cfg: RunConfig) -> None:
    """Refuse code tasks without the opt-in; with it, check that this machine can isolate programs.

    Both checks run before the model loads: a code task (HumanEval, MBPP) needs
    ``evaluation.generation.allow_code_execution: true`` and a working sandbox (Linux namespaces; the
    error says how to enable them). XSum needs neither.
    """
    gen = cfg.evaluation.generation
    if not gen.enabled:
        return
    code = [(i, t.name) for i, t in enumerate(gen.tasks) if t.name in CODE_TASKS]
    if not code:
        return
    if not gen.allow_code_execution:
        i, name = code[0]
        raise ConfigError(
            f"evaluation.generation.tasks[{i}]: {name!r} scores by running the generated code (in "
            "ppframework's sandbox); set evaluation.generation.allow_code_execution: true to allow it, or "
            "remove the code tasks (see docs/evaluation.md, Running generated code)"
        )
    check_sandbox()


def check_generation_data(cfg: RunConfig) -> None:
    """Fail before the model loads when a code task lacks its opt-in or sandbox, or a data file is
    missing or damaged (every record is read and checked: JSON, required fields and their types)."""
    gen = cfg.evaluation.generation
    if not gen.enabled:
        return
    check_code_execution(cfg)
    for i, task_cfg in enumerate(gen.tasks):
        task = get_generation_task(task_cfg.name)
        try:
            path = task.data_file(cfg.data.data_dir)
        except ConfigError as exc:
            raise ConfigError(f"evaluation.generation.tasks[{i}]: {exc}") from None
        if not path.is_file():
            raise ConfigError(
                f"evaluation.generation.tasks[{i}]: {task_cfg.name} needs {path}, which does not exist; "
                "set data.data_dir (or PPF_DATA_DIR) to the folder holding generation/"
            )
        try:  # every record, so a damaged file fails here and not after the model loads
            task.read_records(cfg.data.data_dir)
        except ConfigError as exc:
            raise ConfigError(f"evaluation.generation.tasks[{i}]: {exc}") from None


def _max_new_tokens(task_cfg: GenerationTaskConfig) -> int:
    return task_cfg.max_new_tokens or get_generation_task(task_cfg.name).max_new_tokens


def _limit(gen: GenerationConfig, task_cfg: GenerationTaskConfig) -> int | None:
    limits = [n for n in (gen.limit, task_cfg.limit) if n is not None]
    return min(limits) if limits else None


def load_generation_items(
    cfg: RunConfig, tokenizer: Any, model_positions: int | None
) -> dict[str, list[GenerationItem]]:
    """Every configured task's items, with prompt lengths checked against the history and the model."""
    gen = cfg.evaluation.generation
    history_positions = cfg.calibration_seq_len
    # A history extends past its positions unless a method says history.beyond: refuse.
    refuses = any(m.needs_calibration and m.history.beyond == "refuse" for m in cfg.methods)
    items: dict[str, list[GenerationItem]] = {}
    for i, task_cfg in enumerate(gen.tasks):
        task = get_generation_task(task_cfg.name)
        new = _max_new_tokens(task_cfg)
        # XSum documents are cut to the history's positions (every method sees the same prompt, and
        # the cost stays bounded); code prompts are never cut and need only fit where a method refuses.
        limit = history_positions if refuses or task_cfg.name == "xsum" else None
        if model_positions is not None:
            limit = model_positions - new if limit is None else min(limit, model_positions - new)
        limit = limit if limit is not None else 1 << 30
        if limit < 2:
            raise ConfigError(
                f"evaluation.generation.tasks[{i}].max_new_tokens: {new} new tokens leave no room for a "
                f"prompt within the model's {model_positions} positions"
            )
        loaded = task.load(
            cfg.data.data_dir,
            limit=_limit(gen, task_cfg),
            tokenizer=tokenizer,
            max_prompt_tokens=limit if task_cfg.name == "xsum" else None,
        )
        too_long = [it for it in loaded if it.reference.get("prompt_tokens", 0) > limit]
        if too_long:
            first = too_long[0]
            raise ConfigError(
                f"evaluation.generation.tasks[{i}]: {len(too_long)} {task_cfg.name} prompt(s) are longer "
                f"than {limit} tokens (e.g. {first.item_id}: {first.reference['prompt_tokens']}); the "
                "limit is the model's positions minus max_new_tokens, and calibration.seq_len (the "
                "history's positions) where a method sets history.beyond: refuse"
            )
        items[task_cfg.name] = loaded
    return items


def run_generation_tasks(
    model: Any,
    tokenizer: Any,
    items: dict[str, list[GenerationItem]],
    cfg: RunConfig,
    *,
    label: str,
    progress: bool = False,
    log: CompletionLog | None = None,
) -> dict[str, GenerationTaskResult]:
    """Generate and score every task's items with the model as it is now (a pipeline may be attached).

    With a ``log``, each batch's completions are appended to it as soon as they are made.
    """
    gen = cfg.evaluation.generation
    results: dict[str, GenerationTaskResult] = {}
    for task_cfg in gen.tasks:
        task = get_generation_task(task_cfg.name)
        task_items = items[task_cfg.name]
        new = _max_new_tokens(task_cfg)

        def keep(
            start: int, texts: list[str], name: str = task_cfg.name, its: list[GenerationItem] = task_items
        ) -> None:
            if log is not None:
                log.add(
                    [
                        {"method": label, "task": name, "item_id": its[start + j].item_id, "completion": t}
                        for j, t in enumerate(texts)
                    ]
                )

        run = generate_completions(
            model,
            tokenizer,
            [it.prompt for it in task_items],
            batch_size=gen.batch_size,
            max_new_tokens=new,
            stop=task.stop_strings,
            progress=progress,
            desc=f"{task_cfg.name} {label}",
            stop_after_text=task.stop_after_text,
            on_batch=keep if log is not None else None,
        )
        score = task.score(task_items, run.completions, workers=gen.workers, timeout_s=gen.timeout_s)
        records = [
            {"method": label, "task": task_cfg.name, "item_id": it.item_id, "completion": text, **extra}
            for it, text, extra in zip(task_items, run.completions, score.per_item, strict=True)
        ]
        results[task_cfg.name] = GenerationTaskResult(
            task=task_cfg.name,
            metrics=score.metrics,
            n_items=score.n_items,
            prefill_s=run.prefill_s,
            decode_s=run.decode_s,
            decode_tokens=run.decode_tokens,
            new_tokens=run.total_new_tokens,
            decode_tokens_per_s=run.decode_tokens_per_s,
            max_new_tokens=new,
            records=records,
        )
        logger.info("%s %s: %s", label, task_cfg.name, score.metrics)
    return results


def add_decode_ratios(rows: list[dict[str, GenerationTaskResult]]) -> None:
    """Fill each result's decode tokens/s ratio against the first row's (dense) on the same task."""
    if not rows:
        return
    dense = rows[0]
    for row in rows:
        for task, result in row.items():
            base = dense.get(task)
            if base is not None and base.decode_tokens_per_s > 0:
                result.decode_tps_ratio = result.decode_tokens_per_s / base.decode_tokens_per_s
