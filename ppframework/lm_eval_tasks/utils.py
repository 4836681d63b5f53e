"""Functions of ppframework's offline lm-evaluation-harness tasks: local file formats -> the hub's fields,
and the prompts and scorers of the generation tasks (HumanEval, MBPP, XSum; bottom of the file).

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

from ppframework.config import GenerationConfig
from ppframework.errors import ConfigError
from ppframework.generation.tasks import GenerationItem, get_generation_task
from ppframework.harness import generation_settings
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


# --------------------------------------------------------------------------- generation tasks
#
# HumanEval, MBPP and XSum reuse ppframework's built-in generation tasks (ppframework.generation.tasks):
# the prompt is the built-in item's prompt, and scoring is the built-in ``score`` on one item (post-
# processing, the program, the sandbox, ROUGE), so both paths agree by construction. Under ``ppf eval``
# (``ppframework.harness.run_lm_eval``) the tokenizer, the prompt-length limit, the sandbox time limit
# and the code-execution opt-in come from ``ppframework.harness.generation_settings()``; used directly
# through ``simple_evaluate`` there are none: the plain XSum prompt, no cut, the default time limit.


def _generation_item(name: str, doc: dict[str, Any], with_tokenizer: bool = False) -> GenerationItem:
    task = get_generation_task(name)
    settings = generation_settings()
    if with_tokenizer and settings is not None:
        limit = settings.prompt_limit(task.max_new_tokens)
        return task._item(dict(doc), settings.tokenizer, limit)
    return task._item(dict(doc), None, None)


def _score(name: str, doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    task = get_generation_task(name)
    settings = generation_settings()
    if task.name != "xsum" and settings is not None and not settings.allow_code_execution:
        raise ConfigError(
            f"lm-eval {name}: scoring runs the generated code; set evaluation.lm_eval.allow_code_execution: "
            "true to allow it"
        )
    timeout_s = settings.timeout_s if settings is not None else GenerationConfig().timeout_s
    item = _generation_item(name, doc)
    score = task.score([item], [results[0]], workers=1, timeout_s=timeout_s)
    return {metric: float(value) for metric, value in score.metrics.items()}


def humaneval_prompt(doc: dict[str, Any]) -> str:
    """HumanEval: the built-in prompt (the ``prompt`` field, stripped)."""
    return _generation_item("humaneval", doc).prompt


def humaneval_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """HumanEval: pass@1 (1.0 or 0.0) of the completion, run with its tests in ppframework's sandbox."""
    return _score("humaneval", doc, results)


def mbpp_prompt(doc: dict[str, Any]) -> str:
    """MBPP: the built-in zero-shot prompt (the task text and its first test in a docstring)."""
    return _generation_item("mbpp", doc).prompt


def mbpp_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """MBPP: pass@1 (1.0 or 0.0) of the completion, run with every ``test_list`` assert in the sandbox."""
    return _score("mbpp", doc, results)


def xsum_prompt(doc: dict[str, Any]) -> str:
    """XSum: the built-in prompt; the chat form and the document cut only with ``ppf eval``'s tokenizer."""
    return _generation_item("xsum", doc, with_tokenizer=True).prompt


def xsum_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """XSum: ROUGE-1/2/L F1 of the completion's first line of text against ``summary``."""
    return _score("xsum", doc, results)
