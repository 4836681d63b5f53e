"""Functions of ppframework's offline lm-evaluation-harness tasks: local file formats -> the hub's fields.

The task YAMLs next to this file include the stock harness YAMLs and only change where the data
comes from; these functions turn the local copies (see ``../shared/data/README.md``) into the fields
the stock prompts, targets and choices read. The harness imports this file by path (``!function
utils.<name>``) from the folder the YAMLs are written to at run time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
from lm_eval.tasks.hellaswag.utils import preprocess as hellaswag_preprocess

from ppframework.zeroshot.tasks import bool_label


def _boolq_doc(doc: dict[str, Any]) -> dict[str, Any]:
    return {"label": bool_label(doc["label"])}


def boolq_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """BoolQ: the local SuperGLUE copy's string labels become the hub's 0 (no) / 1 (yes)."""
    return dataset.map(_boolq_doc, remove_columns=["label"])


def load_piqa(data_file: str, labels_file: str, **_: Any) -> datasets.DatasetDict:
    """PIQA: ``valid.jsonl`` (goal, sol1, sol2) joined with ``valid-labels.lst`` (one 0/1 a line).

    Extra keyword arguments (the task's metadata, which the harness passes too) are ignored.
    """
    with Path(data_file).open(encoding="utf-8-sig") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    lines = Path(labels_file).read_text(encoding="utf-8").splitlines()
    labels = [line.strip() for line in lines if line.strip()]
    if len(labels) != len(records):
        raise ValueError(f"piqa: {labels_file} has {len(labels)} labels, {data_file} {len(records)} records")
    rows = [
        {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(label)}
        for r, label in zip(records, labels, strict=True)
    ]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


def _hellaswag_doc(doc: dict[str, Any]) -> dict[str, Any]:
    return {
        "query": hellaswag_preprocess(doc["ctx"]),
        "choices": [hellaswag_preprocess(ending) for ending in doc["endings"]],
        "gold": int(doc["label"]),
    }


def hellaswag_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """HellaSwag: the local ``ctx`` (already "activity label: ctx_a ctx_b") with the harness's own clean-up.

    The stock task builds ``activity_label + ": " + ctx_a + " " + ctx_b.capitalize()``; the local copy
    has no separate ``ctx_b``, so its first letter keeps the copy's case.
    """
    return dataset.map(_hellaswag_doc)


def _choices(question: dict[str, Any]) -> dict[str, list[str]]:
    choices = question["choices"]
    return {"text": [str(c["text"]) for c in choices], "label": [str(c["label"]).strip() for c in choices]}


def _arc_doc(doc: dict[str, Any]) -> dict[str, Any]:
    return {
        "question": doc["question"]["stem"],
        "choices": _choices(doc["question"]),
        "answerKey": str(doc["answerKey"]).strip(),
    }


def arc_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """ARC: AI2 jsonl (question.stem, question.choices[{text, label}]) -> question, choices{text, label}."""
    return dataset.map(_arc_doc, remove_columns=["question", "answerKey"])


def _openbookqa_doc(doc: dict[str, Any]) -> dict[str, Any]:
    return {
        "question_stem": doc["question"]["stem"],
        "choices": _choices(doc["question"]),
        "answerKey": str(doc["answerKey"]).strip(),
    }


def openbookqa_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """OpenBookQA: AI2 jsonl (question.stem, question.choices) -> question_stem, choices{text, label}."""
    return dataset.map(_openbookqa_doc, remove_columns=["question", "answerKey"])
