"""Zero-shot multiple-choice evaluation of the paper's seven tasks (docs/evaluation.md).

:mod:`ppframework.zeroshot.tasks` loads BoolQ, PIQA, HellaSwag, WinoGrande, ARC-easy, ARC-challenge and
OpenBookQA as :class:`MultipleChoiceItem` objects in lm-eval-harness prompt form;
:mod:`ppframework.zeroshot.scoring` scores them by summed continuation log-probability and reports
``acc`` and ``acc_norm``.
"""

from __future__ import annotations

from ppframework.zeroshot.scoring import (
    Request,
    ScoringBatch,
    TaskResult,
    average_accuracy,
    build_batches,
    continuation_length,
    encode_pair,
    evaluate_items,
    evaluate_task,
    evaluate_tasks,
    make_requests,
    score_requests,
)
from ppframework.zeroshot.tasks import (
    TASK_NAMES,
    TASKS,
    MultipleChoiceItem,
    TaskSpec,
    get_task,
    hellaswag_preprocess,
    load_task,
    local_task_files,
)

__all__ = [
    "TASKS",
    "TASK_NAMES",
    "MultipleChoiceItem",
    "Request",
    "ScoringBatch",
    "TaskResult",
    "TaskSpec",
    "average_accuracy",
    "build_batches",
    "continuation_length",
    "encode_pair",
    "evaluate_items",
    "evaluate_task",
    "evaluate_tasks",
    "get_task",
    "hellaswag_preprocess",
    "load_task",
    "local_task_files",
    "make_requests",
    "score_requests",
]
