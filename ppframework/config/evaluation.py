"""The ``evaluation`` section: what ``ppf eval`` measures besides perplexity (zero-shot, lm-eval,
runtime, generation, fidelity) and the efficiency frontier it reports."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ppframework.config.base import StrictModel, refuse_repeats
from ppframework.config.frontier import FrontierConfig

ZEROSHOT_TASKS: tuple[str, ...] = (
    "boolq",
    "piqa",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
)
"""The seven zero-shot tasks of the paper (the default of ``zeroshot.tasks`` and ``lm_eval.tasks``)."""


def _allow_code_execution(how: str) -> Any:
    """The ``allow_code_execution`` field (off by default), its description ending with ``(how)``."""
    return Field(
        False,
        description="let code tasks (humaneval, mbpp) run the generated programs in ppframework's sandbox "
        f"({how})",
    )


class ZeroShotConfig(StrictModel):
    """Zero-shot multiple choice (``ppf eval``): lm-eval-harness prompt forms, acc and acc_norm."""

    enabled: bool = True
    tasks: list[str] = Field(default_factory=lambda: list(ZEROSHOT_TASKS))
    limit: int | None = Field(None, ge=1, description="first N items per task (None = all)")
    batch_size: int = Field(8, ge=1, description="requests per batch (fixed order, right padding)")
    max_length: int | None = Field(
        None,
        ge=2,
        description="left-truncate longer requests to this many input tokens (default: the model's "
        "context, or calibration.seq_len for every row when a method has a calibrated history)",
    )


class LmEvalConfig(StrictModel):
    """lm-evaluation-harness tasks (``ppf eval``, extra ``ppframework[lm-eval]``) on dense and each method.

    The seven paper tasks read the local data folder (task configs in ``ppframework/lm_eval_tasks``);
    any other name is a stock harness task (needs the hub or its cache).
    """

    enabled: bool = False
    tasks: list[str] = Field(default_factory=lambda: list(ZEROSHOT_TASKS))
    limit: int | None = Field(
        None, ge=1, description="first N documents per task (None = all; --limit sets it)"
    )
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples (None = the task's default)")
    batch_size: int = Field(8, ge=1, description="requests per forward (fixed; 'auto' is not allowed)")
    max_length: int | None = Field(
        None, ge=2, description="HFLM max_length (default: as evaluation.zeroshot.max_length)"
    )
    include_path: str | None = Field(None, description="extra folder of harness task YAMLs")
    local_data: bool = Field(
        True, description="run the seven paper tasks from the data folder (False: the stock hub tasks)"
    )
    seed: int = Field(1234, description="the harness's random/numpy/torch/few-shot seed")
    allow_code_execution: bool = _allow_code_execution("the harness's confirm_run_unsafe_code")

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("list at least one task")
        refuse_repeats(value, "task(s)")
        return value


class RuntimeConfig(StrictModel):
    """Interleaved dense/method timing (``ppf eval``) on the first evaluation batch."""

    enabled: bool = True
    repeats: int = Field(5, ge=1, description="timed dense/method pairs (order alternates A B, B A)")
    warmup: int = Field(1, ge=0, description="untimed forwards of each before timing")


GENERATION_TASK_NAMES: tuple[str, ...] = ("humaneval", "mbpp", "xsum")
"""The generation tasks ``ppf eval`` knows (the default of ``generation.tasks``)."""


class GenerationTaskConfig(StrictModel):
    """One generation task of ``ppf eval`` and how much of it to run."""

    name: Literal["humaneval", "mbpp", "xsum"]
    limit: int | None = Field(None, ge=1, description="first N items (None = all; --limit caps it too)")
    max_new_tokens: int | None = Field(None, ge=1, description="default: the task's (256 code, 64 XSum)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data


class GenerationConfig(StrictModel):
    """Generation tasks of ``ppf eval`` (HumanEval, MBPP: pass@1; XSum: ROUGE) through model.generate()."""

    enabled: bool = False
    tasks: list[GenerationTaskConfig] = Field(
        default_factory=lambda: [GenerationTaskConfig(name=n) for n in GENERATION_TASK_NAMES]
    )
    limit: int | None = Field(None, ge=1, description="cap on items per task (set by --limit)")
    batch_size: int = Field(8, ge=1, description="prompts per generate call (input order, left padding)")
    timeout_s: float = Field(10.0, gt=0, description="time limit of each generated program (code tasks)")
    workers: int = Field(2, ge=1, description="programs run in parallel (code tasks)")
    allow_code_execution: bool = _allow_code_execution(
        "Linux namespaces; docs/evaluation.md, Running generated code"
    )

    @field_validator("tasks")
    @classmethod
    def _unique(cls, value: list[GenerationTaskConfig]) -> list[GenerationTaskConfig]:
        refuse_repeats([t.name for t in value], "task(s)")
        return value


class FidelityConfig(StrictModel):
    """Quality measures without future tokens in ``ppf eval`` (docs/evaluation.md, "Measures without
    future tokens"): fidelity to dense on prompt sets, continuation perplexity on corpora."""

    enabled: bool = False
    prompt_sets: list[Literal["xsum", "humaneval", "mbpp"]] = Field(
        default_factory=lambda: ["xsum", "humaneval", "mbpp"],
        description="prompt sets for fidelity to dense (built as the generation tasks build their prompts)",
    )
    prompts: int = Field(16, ge=1, description="prompts per prompt set (the first N that fit)")
    new_tokens: int = Field(32, ge=1, description="dense greedy continuation tokens per prompt")
    corpora: list[str] | None = Field(
        None,
        description="corpora for continuation perplexity (wikitext2, c4 or a local text file); None = "
        "data.name",
    )
    windows: int = Field(16, ge=1, description="windows of data.seq_len tokens per corpus")
    prefix_len: int | None = Field(
        None, ge=1, description="tokens of each window the method decides on (default data.seq_len // 2)"
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        description="prompts or windows per decision (default data.batch_size, at most windows)",
    )

    @field_validator("prompt_sets")
    @classmethod
    def _prompt_sets(cls, value: list[str]) -> list[str]:
        refuse_repeats(value, "prompt set(s)")
        return value

    @field_validator("corpora")
    @classmethod
    def _corpora(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            refuse_repeats(value, "corpus/corpora")
        return value


class EvaluationConfig(StrictModel):
    """What ``ppf eval`` measures besides perplexity, and the efficiency comparison."""

    perplexity: bool = True
    zeroshot: ZeroShotConfig = Field(default_factory=ZeroShotConfig)
    lm_eval: LmEvalConfig = Field(default_factory=LmEvalConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    frontier: FrontierConfig = Field(default_factory=FrontierConfig)
    fidelity: FidelityConfig = Field(default_factory=FidelityConfig)
    baselines: list[str] | None = Field(
        None,
        description="method labels (e.g. 'flap 40%') to compare PRR against; None = every static method",
    )
    plot: bool = True
