"""Generation tasks for ``ppf eval``: HumanEval and MBPP (pass@1, run in a sandbox) and XSum (ROUGE).

* :mod:`~ppframework.generation.sandbox` runs generated programs in a limited child process;
* :mod:`~ppframework.generation.tasks` loads the tasks from the local data folder and scores them;
* :mod:`~ppframework.generation.runner` generates completions in batches, timing prefill and decode.
"""

from ppframework.generation.runner import GenerationRun, generate_completions
from ppframework.generation.sandbox import ExecutionResult, run_program, run_programs
from ppframework.generation.tasks import (
    GENERATION_TASKS,
    GenerationItem,
    GenerationTask,
    TaskScore,
    get_generation_task,
)

__all__ = [
    "GENERATION_TASKS",
    "ExecutionResult",
    "GenerationItem",
    "GenerationRun",
    "GenerationTask",
    "TaskScore",
    "generate_completions",
    "get_generation_task",
    "run_program",
    "run_programs",
]
