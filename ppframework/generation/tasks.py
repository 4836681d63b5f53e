"""The generation tasks of ``ppf eval``: HumanEval, MBPP (pass@1) and XSum (ROUGE-1/2/L F1).

Data comes only from the local data folder (found by :func:`ppframework.data.resolve_data_dir`); nothing
is downloaded. Files (see the data folder's README):

==========  ==========================================  ===========================================
task        file under ``<data_dir>``                   prompt
==========  ==========================================  ===========================================
humaneval   ``generation/humaneval/HumanEval.jsonl.gz``  the ``prompt`` field (signature + docstring),
                                                        stripped (bigcode's default ``humaneval``)
mbpp        ``generation/mbpp/test.jsonl``               a docstring: text and first test (below)
xsum        ``generation/xsum/test.jsonl``               :func:`xsum_prompt`: the chat form of
                                                        :data:`XSUM_INSTRUCTION` when the tokenizer
                                                        has a chat template, else
                                                        :data:`XSUM_TEMPLATE`
==========  ==========================================  ===========================================

The MBPP prompt is bigcode-evaluation-harness's zero-shot (InCoder-style) form
``'\"\"\"\\n' + text + '\\n' + test_list[0] + '\\n\"\"\"\\n'``, i.e. the task text and its first
test inside a triple-quoted string (docs/evaluation.md: "the task text and its first test").

Stop strings and their sources:

* HumanEval: ``["\\nclass", "\\ndef", "\\n#", "\\n@", "\\nprint", "\\nif", "\\n```"]``, the stop words of
  bigcode-evaluation-harness's ``humaneval`` task without its StarCoder-only ``<file_sep>``; a
  superset of the Codex paper's ``["\\nclass", "\\ndef", "\\n#", "\\nif", "\\nprint"]``. They match
  only at column 0, so the function body (indented) is never cut.
* MBPP: ``["\\nclass", "\\nassert", '\\n\"\"\"', "\\nprint", "\\nif", "\\n<|/", "\\n```"]``, exactly
  bigcode-evaluation-harness's ``mbpp`` task.
* XSum: ``["\\n"]`` (one-sentence summary), completion stripped.

Programs run in :mod:`ppframework.generation.sandbox`:

* HumanEval: ``prompt + completion + "\\n" + test + "\\ncheck(<entry_point>)\\n"``.
* MBPP: ``prompt + completion + "\\n" + test_setup_code + "\\n" + "\\n".join(test_list)`` with CRLF
  turned into LF. The setup code comes *after* the completion: in the test split only task 367 has
  one and it builds ``Node`` objects, a class the solution defines.

pass@1 is the fraction of items whose single (greedy) completion passes. XSum uses Google's
``rouge-score`` (``RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)``), F1 averaged over
items, in [0, 1].

Prompt length: when ``load`` gets a ``tokenizer``, every item's reference holds ``prompt_tokens`` (the
tokenized prompt length, special tokens included) so the caller can check it against its limits;
code prompts are never cut. For XSum with ``max_prompt_tokens`` the *document* is cut from its end so
that the whole prompt fits; ``reference["truncated"]`` records whether it was.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import zlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ppframework.data import resolve_data_dir
from ppframework.errors import ConfigError
from ppframework.generation.sandbox import run_programs

logger = logging.getLogger(__name__)

__all__ = [
    "GENERATION_TASKS",
    "XSUM_INSTRUCTION",
    "XSUM_TEMPLATE",
    "GenerationItem",
    "GenerationTask",
    "HumanEvalTask",
    "MBPPTask",
    "TaskScore",
    "XSumTask",
    "cut_at_stop",
    "get_generation_task",
]

GENERATION_TASKS: tuple[str, ...] = ("humaneval", "mbpp", "xsum")
"""Names understood by :func:`get_generation_task`."""

XSUM_TEMPLATE = "Article: {document}\n\nSummarize the article above in one sentence.\nSummary:"
"""XSum prompt form for tokenizers without a chat template (the model continues after ``Summary:``)."""

XSUM_INSTRUCTION = "Summarize the following article in one sentence.\n\nArticle: {document}"
"""XSum request for instruction-tuned models: the user turn of the tokenizer's chat template (with the
generation prompt), since such a model answers a plain ``Summary:`` continuation with an end-of-turn."""


def xsum_prompt(document: str, tokenizer: Any = None) -> str:
    """The XSum prompt for ``document``: the chat form when ``tokenizer`` has a chat template."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": XSUM_INSTRUCTION.format(document=document)}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return XSUM_TEMPLATE.format(document=document)


@dataclass(frozen=True)
class GenerationItem:
    """One prompt to complete; ``reference`` holds what scoring needs (tests, summary, ...)."""

    task: str
    item_id: str
    prompt: str
    reference: dict[str, Any]


@dataclass
class TaskScore:
    """A task's metrics (name -> value) over ``n_items`` items, and one record per item."""

    task: str
    metrics: dict[str, float]
    n_items: int
    per_item: list[dict[str, Any]] = field(default_factory=list)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Return ``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        if s:
            pos = text.find(s)
            if 0 <= pos < cut:
                cut = pos
    return text[:cut]


def _count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Every record of a JSON-lines file (gzipped when it ends in ``.gz``) with its line number.

    Raises :class:`ConfigError` naming the file (and the line) when it cannot be read, is damaged
    or cut short, or a line is not a JSON object.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    records: list[tuple[int, dict[str, Any]]] = []
    lineno = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigError(
                        f"{path}: line {lineno} is not valid JSON ({exc.msg}); the file is damaged: "
                        "replace it with an intact copy"
                    ) from None
                if not isinstance(record, dict):
                    raise ConfigError(
                        f"{path}: line {lineno} holds a {type(record).__name__}, not a JSON object; "
                        "replace the file with an intact copy"
                    )
                records.append((lineno, record))
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
        raise ConfigError(
            f"{path} is damaged or cut short (reading stopped after line {lineno}: {exc}); replace it "
            "with an intact copy"
        ) from None
    return records


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


class GenerationTask(ABC):
    """A generation benchmark: local data, prompt form, stop strings, post-processing and scoring."""

    name: ClassVar[str]
    metric_names: ClassVar[tuple[str, ...]]
    max_new_tokens: ClassVar[int]
    stop: ClassVar[tuple[str, ...]]
    relative_path: ClassVar[str]
    #: Stop strings count only after the first non-whitespace text (a summary may start on a new line).
    stop_after_text: ClassVar[bool] = False

    #: Fields every record needs, with their type (checked by :meth:`read_records`).
    required: ClassVar[dict[str, type | tuple[type, ...]]] = {}
    #: The record field that names an item in error messages.
    id_field: ClassVar[str] = "task_id"

    @property
    def stop_strings(self) -> list[str]:
        """The stop strings as a fresh list (for ``generate(stop_strings=...)``)."""
        return list(self.stop)

    def data_file(self, data_dir: str | Path | None = None) -> Path:
        """The task's file in the data folder; ConfigError if the folder or the file is missing."""
        root = resolve_data_dir(data_dir)
        if root is None:
            raise ConfigError(
                f"{self.name}: no data folder found (set data.data_dir or PPF_DATA_DIR); the task reads "
                f"<data_dir>/{self.relative_path} and never downloads."
            )
        path = root / self.relative_path
        if not path.is_file():
            raise ConfigError(
                f"{self.name}: data file {str(path)!r} does not exist; put the file there or point "
                f"data.data_dir / PPF_DATA_DIR at a folder holding {self.relative_path}."
            )
        return path

    def read_records(self, data_dir: str | Path | None = None) -> list[dict[str, Any]]:
        """Read and check every record of the task's file (cheap: no tokenizer, no model).

        Raises :class:`ConfigError` naming the file, the line (and item) and the fix when the file
        is damaged, a line is not JSON, or a record lacks a field or holds one of the wrong type.
        """
        path = self.data_file(data_dir)
        records = _read_jsonl(path)
        for lineno, record in records:
            item = record.get(self.id_field)
            where = f"{path}: line {lineno}" + (f" (item {item!r})" if item is not None else "")
            for key, kind in self.required.items():
                if key not in record:
                    raise ConfigError(
                        f"{where} has no {key!r}; every {self.name} record needs "
                        f"{', '.join(self.required)}: replace the file with an intact copy"
                    )
                if not isinstance(record[key], kind) or isinstance(record[key], bool):
                    raise ConfigError(
                        f"{where}: {key!r} is a {type(record[key]).__name__}, not the expected "
                        f"{_kind_name(kind)}; replace the file with an intact copy"
                    )
            self._check_record(record, where)
        if not records:
            raise ConfigError(f"{path} holds no records; replace it with an intact copy")
        return [record for _, record in records]

    def _check_record(self, record: dict[str, Any], where: str) -> None:
        """Task-specific checks beyond :attr:`required` (none by default)."""
        return None

    def load(
        self,
        data_dir: str | Path | None = None,
        limit: int | None = None,
        tokenizer: Any = None,
        max_prompt_tokens: int | None = None,
    ) -> list[GenerationItem]:
        """Read the first ``limit`` items (all if None) from the local data folder.

        With a ``tokenizer``, each reference gets ``prompt_tokens``; see the module docstring for
        ``max_prompt_tokens`` (XSum only cuts; code prompts are reported, never cut).
        """
        if limit is not None and limit < 1:
            raise ConfigError(f"{self.name}: limit must be a positive number of items (got {limit}).")
        if max_prompt_tokens is not None and tokenizer is None:
            raise ConfigError(f"{self.name}: max_prompt_tokens needs a tokenizer to count tokens.")
        records = self.read_records(data_dir)
        items = [self._item(r, tokenizer, max_prompt_tokens) for r in records[:limit]]
        logger.debug("loaded %d %s items", len(items), self.name)
        return items

    @abstractmethod
    def _item(self, record: dict[str, Any], tokenizer: Any, max_prompt_tokens: int | None) -> GenerationItem:
        """Build one item from one data record."""

    def postprocess(self, item: GenerationItem, completion: str) -> str:
        """Cut a raw completion at the first stop string (idempotent)."""
        return cut_at_stop(completion, self.stop)

    def score(
        self,
        items: Sequence[GenerationItem],
        completions: Sequence[str],
        *,
        workers: int = 2,
        timeout_s: float = 10.0,
    ) -> TaskScore:
        """Score raw completions (``postprocess`` is applied here) against the items' references
        (``workers``/``timeout_s``: the sandbox's, for tasks that run programs)."""
        if len(items) != len(completions):
            raise ValueError(f"{self.name}: {len(items)} items but {len(completions)} completions")
        outputs = [self.postprocess(it, c) for it, c in zip(items, completions, strict=True)]
        return self._score(items, outputs, workers, timeout_s)

    @abstractmethod
    def _score(
        self, items: Sequence[GenerationItem], outputs: list[str], workers: int, timeout_s: float
    ) -> TaskScore:
        """Score post-processed ``outputs``, one per item."""


class _CodeTask(GenerationTask):
    """pass@1 of greedy completions, each program run in the sandbox."""

    metric_names = ("pass@1",)

    @abstractmethod
    def program(self, item: GenerationItem, completion: str) -> str:
        """The whole test program for a post-processed completion."""

    def _score(
        self, items: Sequence[GenerationItem], outputs: list[str], workers: int, timeout_s: float
    ) -> TaskScore:
        """Run every item's program; pass@1 = fraction passed (NaN for no items)."""
        programs = [self.program(it, out) for it, out in zip(items, outputs, strict=True)]
        results = run_programs(programs, workers=workers, timeout_s=timeout_s)
        per_item = [
            {"item_id": it.item_id, "passed": r.passed, "status": r.status, "detail": r.detail}
            for it, r in zip(items, results, strict=True)
        ]
        passed = sum(r.passed for r in results)
        value = passed / len(results) if results else math.nan
        return TaskScore(self.name, {"pass@1": value}, len(items), per_item)


class HumanEvalTask(_CodeTask):
    """HumanEval (164 problems): complete the function from its signature and docstring."""

    name = "humaneval"
    max_new_tokens = 256
    stop = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```")
    relative_path = "generation/humaneval/HumanEval.jsonl.gz"
    required = {"task_id": str, "prompt": str, "entry_point": str, "test": str, "canonical_solution": str}

    def _item(self, record: dict[str, Any], tokenizer: Any, max_prompt_tokens: int | None) -> GenerationItem:
        ref: dict[str, Any] = {k: record[k] for k in ("task_id", "entry_point", "test", "canonical_solution")}
        # Stripped, as bigcode-evaluation-harness's default `humaneval` task does: a prompt ending in
        # "\n" makes the model start the body with a lone indentation token it rarely predicts (a
        # token-boundary artefact), and it starts a new top-level statement (a stop string) instead.
        prompt = record["prompt"].strip()
        if tokenizer is not None:
            ref["prompt_tokens"] = _count_tokens(tokenizer, prompt)
        return GenerationItem(self.name, record["task_id"], prompt, ref)

    def program(self, item: GenerationItem, completion: str) -> str:
        """``prompt + completion``, the tests and ``check(entry_point)``."""
        ref = item.reference
        return f"{item.prompt}{completion}\n{ref['test']}\ncheck({ref['entry_point']})\n"


def _lf(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


class MBPPTask(_CodeTask):
    """MBPP test split (tasks 11-510), zero-shot: the task text and its first test in a docstring."""

    name = "mbpp"
    max_new_tokens = 256
    stop = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```")
    relative_path = "generation/mbpp/test.jsonl"
    required = {"task_id": (int, str), "text": str, "code": str, "test_list": list}

    def _check_record(self, record: dict[str, Any], where: str) -> None:
        """``test_list`` must hold at least one test (the prompt shows the first), all strings."""
        tests = record["test_list"]
        if not tests or not all(isinstance(t, str) for t in tests):
            raise ConfigError(
                f"{where}: 'test_list' must be a non-empty list of strings; replace the file with an "
                "intact copy"
            )

    def _item(self, record: dict[str, Any], tokenizer: Any, max_prompt_tokens: int | None) -> GenerationItem:
        tests = [_lf(t) for t in record["test_list"]]
        text = _lf(record["text"])
        prompt = f'"""\n{text}\n{tests[0]}\n"""\n'
        ref: dict[str, Any] = {
            "task_id": record["task_id"],
            "code": _lf(record["code"]),
            "test_list": tests,
            "test_setup_code": _lf(record.get("test_setup_code") or ""),
            "challenge_test_list": [_lf(t) for t in record.get("challenge_test_list") or []],
        }
        if tokenizer is not None:
            ref["prompt_tokens"] = _count_tokens(tokenizer, prompt)
        return GenerationItem(self.name, str(record["task_id"]), prompt, ref)

    def program(self, item: GenerationItem, completion: str) -> str:
        """``prompt + completion``, then the setup code and all ``test_list`` asserts."""
        ref = item.reference
        tests = "\n".join(ref["test_list"])
        return f"{item.prompt}{completion}\n{ref['test_setup_code']}\n{tests}\n"


class XSumTask(GenerationTask):
    """XSum (first N of the 1,000 stored test items): one-sentence summary, ROUGE-1/2/L F1."""

    name = "xsum"
    metric_names = ("rouge1", "rouge2", "rougeL")
    max_new_tokens = 64
    stop = ("\n",)
    relative_path = "generation/xsum/test.jsonl"
    required = {"id": (int, str), "document": str, "summary": str}
    id_field = "id"
    stop_after_text = True  # after "Summary:" the model often starts with a newline

    def _item(self, record: dict[str, Any], tokenizer: Any, max_prompt_tokens: int | None) -> GenerationItem:
        document = record["document"].strip()
        prompt = xsum_prompt(document, tokenizer)
        truncated = False
        n_tokens = _count_tokens(tokenizer, prompt) if tokenizer is not None else None
        if max_prompt_tokens is not None and n_tokens is not None and n_tokens > max_prompt_tokens:
            document = self._fit_document(record, document, tokenizer, max_prompt_tokens)
            prompt = xsum_prompt(document, tokenizer)
            n_tokens = _count_tokens(tokenizer, prompt)
            truncated = True
        ref: dict[str, Any] = {"id": str(record["id"]), "summary": record["summary"], "truncated": truncated}
        if n_tokens is not None:
            ref["prompt_tokens"] = n_tokens
        return GenerationItem(self.name, str(record["id"]), prompt, ref)

    def _fit_document(self, record: dict[str, Any], document: str, tokenizer: Any, limit: int) -> str:
        """Keep the longest token prefix of ``document`` whose prompt fits ``limit`` tokens."""
        overhead = _count_tokens(tokenizer, xsum_prompt("", tokenizer))
        if overhead > limit:
            raise ConfigError(
                f"xsum item {record['id']}: the instruction alone takes {overhead} tokens, more than "
                f"max_prompt_tokens={limit}."
            )
        if getattr(tokenizer, "is_fast", False):
            enc = tokenizer(document, add_special_tokens=False, return_offsets_mapping=True)
            ends = [end for _, end in enc["offset_mapping"]]

            def prefix(n: int) -> str:
                return document[: ends[n - 1]] if n > 0 else ""
        else:
            ids = tokenizer(document, add_special_tokens=False)["input_ids"]
            ends = ids

            def prefix(n: int) -> str:
                return tokenizer.decode(ids[:n], skip_special_tokens=True)

        lo, hi = 0, len(ends)  # binary search for the largest n whose prompt fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _count_tokens(tokenizer, xsum_prompt(prefix(mid).rstrip(), tokenizer)) <= limit:
                lo = mid
            else:
                hi = mid - 1
        return prefix(lo).rstrip()

    def postprocess(self, item: GenerationItem, completion: str) -> str:
        """The first line of text (leading blank lines skipped), stripped."""
        return cut_at_stop(completion.lstrip(), self.stop).strip()

    def _score(
        self, items: Sequence[GenerationItem], outputs: list[str], workers: int, timeout_s: float
    ) -> TaskScore:
        """Mean ROUGE-1/2/L F1 (stemming on) against ``summary``; ``workers``/``timeout_s`` unused."""
        try:
            from rouge_score import rouge_scorer
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConfigError(
                "xsum needs the rouge-score package: pip install 'ppframework[generation]'"
            ) from exc
        scorer = rouge_scorer.RougeScorer(list(self.metric_names), use_stemmer=True)
        per_item: list[dict[str, Any]] = []
        totals = dict.fromkeys(self.metric_names, 0.0)
        for item, summary in zip(items, outputs, strict=True):
            scores = scorer.score(item.reference["summary"], summary)
            row: dict[str, Any] = {"item_id": item.item_id, "summary": summary}
            for name in self.metric_names:
                row[name] = scores[name].fmeasure
                totals[name] += scores[name].fmeasure
            per_item.append(row)
        n = len(items)
        metrics = {k: (v / n if n else math.nan) for k, v in totals.items()}
        return TaskScore(self.name, metrics, n, per_item)


_TASKS: dict[str, type[GenerationTask]] = {"humaneval": HumanEvalTask, "mbpp": MBPPTask, "xsum": XSumTask}


def get_generation_task(name: str) -> GenerationTask:
    """Return a task by name (one of :data:`GENERATION_TASKS`); ConfigError listing them otherwise."""
    cls = _TASKS.get(str(name).strip().lower())
    if cls is None:
        raise ConfigError(f"unknown generation task {name!r}; choose one of {', '.join(GENERATION_TASKS)}.")
    return cls()
