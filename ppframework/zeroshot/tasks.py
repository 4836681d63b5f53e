"""The seven zero-shot multiple-choice tasks of the paper: loaders and prompt builders.

Every task item becomes a :class:`MultipleChoiceItem`. Prompt forms follow docs/evaluation.md (the
lm-eval-harness forms); a continuation always starts with the single space that separates it from
its context:

==============  ===========================================  ======================================
task            context                                      continuations
==============  ===========================================  ======================================
boolq           ``{passage}\\nQuestion: {question}?\\nAnswer:``  ``" no"``, ``" yes"``
piqa            ``Question: {goal}\\nAnswer:``                 ``" {sol1}"``, ``" {sol2}"``
hellaswag       ``{ctx}`` (preprocessed)                     ``" {ending}"`` (preprocessed)
winogrande      sentence up to ``_`` + option (two contexts)  ``" " + rest after _`` (shared)
arc_easy        ``Question: {stem}\\nAnswer:``                 ``" {choice text}"``
arc_challenge   ``Question: {stem}\\nAnswer:``                 ``" {choice text}"``
openbookqa      ``{stem}``                                   ``" {choice text}"``
==============  ===========================================  ======================================

Data comes from a local folder laid out as ``<data_dir>/zeroshot/<task>/<file>.jsonl`` (the data folder
is found by :func:`ppframework.data.resolve_data_dir`), or else from the Hugging Face hub through
``datasets.load_dataset``. Both the local AI2/SuperGLUE file structures (see the data README) and the
hub structures are understood. A ``<file stem>-labels.lst`` file beside a ``.jsonl`` file (PIQA)
supplies labels, one per line, for records that carry none.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ppframework.data import resolve_data_dir
from ppframework.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "TASKS",
    "TASK_NAMES",
    "MultipleChoiceItem",
    "TaskSpec",
    "get_task",
    "hellaswag_preprocess",
    "load_task",
    "local_task_files",
]

ZEROSHOT_SUBDIR = "zeroshot"
"""Sub-folder of the data folder holding one folder per task."""

_OFFLINE_VALUES = ("1", "ON", "YES", "TRUE")


@dataclass(frozen=True)
class MultipleChoiceItem:
    """One multiple-choice question, as (context, continuation) pairs to score.

    Either one context shared by several continuations (most tasks), or several contexts sharing one
    continuation (WinoGrande's partial scoring). Choice ``i`` is the pair
    ``(contexts[i or 0], continuations[i or 0])``; ``label`` is the index of the correct choice.
    """

    task: str
    index: int
    contexts: list[str]
    continuations: list[str]
    label: int

    def __post_init__(self) -> None:
        n_ctx, n_cont = len(self.contexts), len(self.continuations)
        if n_ctx < 1 or n_cont < 1 or (n_ctx > 1 and n_cont > 1 and n_ctx != n_cont):
            raise ConfigError(
                f"{self.task} item {self.index}: needs one context and several continuations, or several "
                f"contexts and one continuation (got {n_ctx} contexts, {n_cont} continuations)."
            )
        if not 0 <= self.label < self.n_choices:
            raise ConfigError(
                f"{self.task} item {self.index}: label {self.label} is outside the {self.n_choices} choices."
            )

    @property
    def n_choices(self) -> int:
        """Number of choices."""
        return max(len(self.contexts), len(self.continuations))

    def pairs(self) -> list[tuple[str, str]]:
        """The ``(context, continuation)`` pair of every choice, in choice order."""
        return [
            (self.contexts[i if len(self.contexts) > 1 else 0],
             self.continuations[i if len(self.continuations) > 1 else 0])
            for i in range(self.n_choices)
        ]


Builder = Callable[[Mapping[str, Any], int], MultipleChoiceItem]


@dataclass(frozen=True)
class TaskSpec:
    """How to load one task and turn its records into :class:`MultipleChoiceItem` objects.

    Attributes:
        name: the task name (also its folder under ``<data_dir>/zeroshot``).
        build: ``build(record, index) -> MultipleChoiceItem``.
        default_split: the split evaluated by default (the lm-eval-harness choice).
        local_files: per split, candidate file names inside the task folder, tried in order (a generic
            ``<split>.jsonl`` is always tried last).
        hub_path, hub_name: the ``datasets.load_dataset`` path and configuration name.
        hub_splits: per split, the hub split name.
        metrics: what the stock lm-eval-harness task reports (BoolQ and WinoGrande: ``acc`` only), so
            the scorer reports exactly those.
    """

    name: str
    build: Builder
    default_split: str
    local_files: dict[str, tuple[str, ...]]
    hub_path: str
    hub_name: str | None = None
    hub_splits: dict[str, str] = field(default_factory=dict)
    metrics: tuple[str, ...] = ("acc", "acc_norm")

    def candidates(self, split: str) -> tuple[str, ...]:
        """Local file names that may hold ``split``, in the order they are tried."""
        names = self.local_files.get(split, ())
        generic = f"{split}.jsonl"
        return names if generic in names else (*names, generic)


# --------------------------------------------------------------------------- prompt builders


def _error(task: str, index: int, message: str) -> ConfigError:
    return ConfigError(f"{task} item {index}: {message}")


def _field(record: Mapping[str, Any], task: str, index: int, *names: str) -> Any:
    """The first of ``names`` present in ``record``."""
    for name in names:
        if name in record and record[name] is not None:
            return record[name]
    raise _error(task, index, f"missing field {' / '.join(repr(n) for n in names)} "
                              f"(fields present: {', '.join(sorted(record))}).")


def _label_value(record: Mapping[str, Any], task: str, index: int, *names: str) -> Any:
    return _field(record, task, index, *names, _LABEL_FROM_FILE)


_LABEL_FROM_FILE = "__label_from_file__"


def bool_label(value: Any) -> int:
    """BoolQ label: ``"true"``/``"false"`` strings, booleans or 0/1 -> 1 (yes) / 0 (no); ValueError else."""
    if isinstance(value, bool):
        return int(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return 1
    if text in ("false", "0", "no"):
        return 0
    raise ValueError(f"label {value!r} is not true/false")


def _parse_bool_label(value: Any, task: str, index: int) -> int:
    """:func:`bool_label`, with an error naming the task and item."""
    try:
        return bool_label(value)
    except ValueError as exc:
        raise _error(task, index, f"{exc}.") from None


def _parse_int_label(value: Any, task: str, index: int, offset: int = 0) -> int:
    try:
        return int(str(value).strip()) - offset
    except ValueError:
        raise _error(task, index, f"label {value!r} is not an integer.") from None


def _build_boolq(record: Mapping[str, Any], index: int) -> MultipleChoiceItem:
    task = "boolq"
    passage = _field(record, task, index, "passage")
    question = _field(record, task, index, "question")
    label = _parse_bool_label(_label_value(record, task, index, "label", "answer"), task, index)
    context = f"{passage}\nQuestion: {question}?\nAnswer:"
    return MultipleChoiceItem(task, index, [context], [" no", " yes"], label)


def _build_piqa(record: Mapping[str, Any], index: int) -> MultipleChoiceItem:
    task = "piqa"
    goal = _field(record, task, index, "goal")
    solutions = [_field(record, task, index, "sol1"), _field(record, task, index, "sol2")]
    label = _parse_int_label(_label_value(record, task, index, "label"), task, index)
    return MultipleChoiceItem(
        task, index, [f"Question: {goal}\nAnswer:"], [f" {s}" for s in solutions], label
    )


_TITLE_TAG = " [title]"
_BRACKET_TAG = re.compile(r"\[[^\]]*?\]")


def hellaswag_preprocess(text: str) -> str:
    """HellaSwag text clean-up in lm-eval-harness order.

    Strip the ends, turn ``" [title]"`` into ``". "``, delete every ``[...]`` tag (shortest match), then
    replace each pair of spaces by one space (a single left-to-right pass, as lm-eval-harness does).
    """
    text = text.strip().replace(_TITLE_TAG, ". ")
    text = _BRACKET_TAG.sub("", text)
    return text.replace("  ", " ")


def _build_hellaswag(record: Mapping[str, Any], index: int) -> MultipleChoiceItem:
    task = "hellaswag"
    if "ctx_a" in record and "ctx_b" in record:
        # Raw (hub) form: activity label, then ctx_a and the capitalised ctx_b.
        ctx = f"{record['ctx_a']} {str(record['ctx_b']).capitalize()}"
        activity = record.get("activity_label")
        if activity:
            ctx = f"{activity}: {ctx}"
    else:
        # Local (llama.cpp-derived) form: ``ctx`` already holds "activity label: ctx_a Ctx_b".
        ctx = _field(record, task, index, "ctx")
    endings = _field(record, task, index, "endings")
    label = _parse_int_label(_label_value(record, task, index, "label"), task, index)
    return MultipleChoiceItem(
        task,
        index,
        [hellaswag_preprocess(ctx)],
        [" " + hellaswag_preprocess(ending) for ending in endings],
        label,
    )


def _build_winogrande(record: Mapping[str, Any], index: int) -> MultipleChoiceItem:
    task = "winogrande"
    sentence = str(_field(record, task, index, "sentence"))
    blank = sentence.find("_")
    if blank < 0:
        raise _error(task, index, f"sentence has no '_' blank: {sentence!r}.")
    options = [_field(record, task, index, "option1"), _field(record, task, index, "option2")]
    label = _parse_int_label(_label_value(record, task, index, "answer", "label"), task, index, offset=1)
    contexts = [sentence[:blank] + str(option) for option in options]
    continuation = " " + sentence[blank + 1 :].strip()
    return MultipleChoiceItem(task, index, contexts, [continuation], label)


def _question_and_choices(
    record: Mapping[str, Any], task: str, index: int
) -> tuple[str, list[str], list[str]]:
    """(stem, choice texts, choice labels) from the AI2 jsonl form or the hub form."""
    question = _field(record, task, index, "question", "question_stem")
    if isinstance(question, Mapping):  # AI2 jsonl: question.stem, question.choices[{text, label}]
        stem = _field(question, task, index, "stem")
        choices = _field(question, task, index, "choices")
    else:  # hub: question (ARC) or question_stem (OpenBookQA), choices {text: [...], label: [...]}
        stem = record.get("question_stem", question)
        choices = _field(record, task, index, "choices")
    if isinstance(choices, Mapping):
        texts, labels = list(choices["text"]), list(choices["label"])
    else:
        texts = [choice["text"] for choice in choices]
        labels = [choice["label"] for choice in choices]
    return str(stem), [str(t) for t in texts], [str(lab).strip() for lab in labels]


def _answer_index(record: Mapping[str, Any], labels: list[str], task: str, index: int) -> int:
    key = str(_label_value(record, task, index, "answerKey")).strip()
    if key not in labels:
        raise _error(task, index, f"answerKey {key!r} is not among the choice labels {labels}.")
    return labels.index(key)


def _arc_builder(task: str) -> Builder:
    def build(record: Mapping[str, Any], index: int) -> MultipleChoiceItem:
        stem, texts, labels = _question_and_choices(record, task, index)
        label = _answer_index(record, labels, task, index)
        return MultipleChoiceItem(
            task, index, [f"Question: {stem}\nAnswer:"], [f" {t}" for t in texts], label
        )

    return build


def _build_openbookqa(record: Mapping[str, Any], index: int) -> MultipleChoiceItem:
    task = "openbookqa"
    stem, texts, labels = _question_and_choices(record, task, index)
    label = _answer_index(record, labels, task, index)
    return MultipleChoiceItem(task, index, [stem], [f" {t}" for t in texts], label)


# --------------------------------------------------------------------------- registry

TASKS: dict[str, TaskSpec] = {
    "boolq": TaskSpec(
        "boolq", _build_boolq, "validation",
        {"validation": ("val.jsonl", "validation.jsonl"), "train": ("train.jsonl",)},
        "aps/super_glue", "boolq", metrics=("acc",),
    ),
    "piqa": TaskSpec(
        "piqa", _build_piqa, "validation",
        {"validation": ("valid.jsonl", "validation.jsonl"), "train": ("train.jsonl",)},
        # The original "piqa"/"ybisk/piqa" is a loading script, unsupported by datasets>=4; this is
        # the parquet copy lm-eval-harness uses.
        "baber/piqa",
    ),
    "hellaswag": TaskSpec(
        "hellaswag", _build_hellaswag, "validation",
        {"validation": ("hellaswag_val.jsonl", "validation.jsonl"), "train": ("hellaswag_train.jsonl",)},
        "Rowan/hellaswag",
    ),
    "winogrande": TaskSpec(
        "winogrande", _build_winogrande, "validation",
        {"validation": ("dev.jsonl", "validation.jsonl"), "train": ("train_xl.jsonl", "train.jsonl")},
        "allenai/winogrande", "winogrande_xl", metrics=("acc",),
    ),
    "arc_easy": TaskSpec(
        "arc_easy", _arc_builder("arc_easy"), "test",
        {"test": ("ARC-Easy-Test.jsonl",), "validation": ("ARC-Easy-Dev.jsonl",),
         "train": ("ARC-Easy-Train.jsonl",)},
        "allenai/ai2_arc", "ARC-Easy",
    ),
    "arc_challenge": TaskSpec(
        "arc_challenge", _arc_builder("arc_challenge"), "test",
        {"test": ("ARC-Challenge-Test.jsonl",), "validation": ("ARC-Challenge-Dev.jsonl",),
         "train": ("ARC-Challenge-Train.jsonl",)},
        "allenai/ai2_arc", "ARC-Challenge",
    ),
    "openbookqa": TaskSpec(
        "openbookqa", _build_openbookqa, "test",
        {"test": ("test.jsonl",), "validation": ("dev.jsonl", "validation.jsonl"), "train": ("train.jsonl",)},
        "allenai/openbookqa", "main",
    ),
}
"""The task registry: name -> :class:`TaskSpec`."""

TASK_NAMES: tuple[str, ...] = tuple(TASKS)
"""The task names, in registry order."""


def get_task(name: str) -> TaskSpec:
    """Return the :class:`TaskSpec` of ``name`` (case-insensitive; ``-`` and ``_`` are the same).

    Raises:
        ConfigError: unknown task; the message lists the choices.
    """
    key = name.strip().lower().replace("-", "_")
    if key not in TASKS:
        raise ConfigError(f"zero-shot task {name!r} is unknown; choose among {', '.join(TASK_NAMES)}.")
    return TASKS[key]


# --------------------------------------------------------------------------- loading


def _task_folder(spec: TaskSpec, data_dir: str | Path | None) -> Path | None:
    root = resolve_data_dir(data_dir)
    return None if root is None else root / ZEROSHOT_SUBDIR / spec.name


def local_task_files(name: str, data_dir: str | Path | None = None) -> dict[str, Path]:
    """Discover the local files of task ``name``: split -> file, for every split with an existing file."""
    spec = get_task(name)
    folder = _task_folder(spec, data_dir)
    found: dict[str, Path] = {}
    if folder is None or not folder.is_dir():
        return found
    splits = dict.fromkeys((*spec.local_files, "validation", "test", "train"))
    for split in splits:
        for candidate in spec.candidates(split):
            if (folder / candidate).is_file():
                found[split] = folder / candidate
                break
    return found


def _read_jsonl(path: Path, task: str) -> list[dict[str, Any]]:
    records = []
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{task}: {path} line {number} is not valid JSON ({exc}).") from exc
            if not isinstance(record, dict):
                raise ConfigError(f"{task}: {path} line {number} is not a JSON object.")
            records.append(record)
    return records


def _attach_label_file(records: list[dict[str, Any]], path: Path, task: str) -> None:
    """Add the labels of ``<stem>-labels.lst`` beside ``path`` (if it exists) to the records."""
    labels_path = path.with_name(f"{path.stem}-labels.lst")
    if not labels_path.is_file():
        return
    labels = [line.strip() for line in labels_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) != len(records):
        raise ConfigError(
            f"{task}: {labels_path} has {len(labels)} labels but {path} has {len(records)} records."
        )
    for record, label in zip(records, labels, strict=True):
        record[_LABEL_FROM_FILE] = label


def _hub_offline() -> bool:
    return any(
        os.environ.get(var, "").strip().upper() in _OFFLINE_VALUES
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _hub_records(spec: TaskSpec, split: str, limit: int | None, looked_for: str) -> list[dict[str, Any]]:
    hub_split = spec.hub_splits.get(split, split)
    if _hub_offline():
        raise ConfigError(
            f"zero-shot task {spec.name!r}: no local file (looked for {looked_for}) and the Hugging Face "
            f"hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set); put the task's {split} file there "
            f"(set PPF_DATA_DIR or data_dir) or go online."
        )
    selection = hub_split if limit is None else f"{hub_split}[:{limit}]"
    logger.info(
        "zero-shot %s: no local file (looked for %s); loading %s%s split %s from the hub",
        spec.name, looked_for, spec.hub_path, f"/{spec.hub_name}" if spec.hub_name else "", selection,
    )
    try:
        import datasets

        rows = datasets.load_dataset(spec.hub_path, spec.hub_name, split=selection)
        return [dict(row) for row in rows]
    except Exception as exc:  # network, missing cache, unknown split: all mean "not available"
        raise ConfigError(
            f"zero-shot task {spec.name!r}: no local file (looked for {looked_for}) and loading "
            f"{spec.hub_path} ({spec.hub_name}, {selection}) from the hub failed "
            f"({type(exc).__name__}: {exc})."
        ) from exc


def load_task(
    name: str,
    *,
    limit: int | None = None,
    data_dir: str | Path | None = None,
    split: str | None = None,
) -> list[MultipleChoiceItem]:
    """Load task ``name`` as a list of :class:`MultipleChoiceItem`, in file order.

    Args:
        name: one of :data:`TASK_NAMES`.
        limit: keep only the first ``limit`` items (``None``: all).
        data_dir: the data folder (see :func:`ppframework.data.resolve_data_dir`); the task is read
            from ``<data folder>/zeroshot/<name>/``.
        split: the split; ``None`` means the task's default (validation; test for ARC and OpenBookQA).

    Raises:
        ConfigError: unknown task, bad ``limit``, malformed records, or data neither local nor on the hub
            (with ``HF_HUB_OFFLINE=1`` the message names the local path that was looked for).
    """
    spec = get_task(name)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit: must be a positive number of items or None (all), got {limit!r}.")
    split = spec.default_split if split is None else split
    folder = _task_folder(spec, data_dir)
    path = None
    if folder is not None:
        path = next((folder / c for c in spec.candidates(split) if (folder / c).is_file()), None)
    if path is not None:
        logger.info("zero-shot %s: loading %s split from %s", spec.name, split, path)
        records = _read_jsonl(path, spec.name)
        _attach_label_file(records, path, spec.name)
    else:
        if folder is None:
            looked_for = f"<data folder>/{ZEROSHOT_SUBDIR}/{spec.name}/ (no data folder found)"
        else:
            looked_for = f"{folder}/{{{','.join(spec.candidates(split))}}}"
        records = _hub_records(spec, split, limit, looked_for)
    if limit is not None:
        records = records[:limit]
    return [spec.build(record, index) for index, record in enumerate(records)]
