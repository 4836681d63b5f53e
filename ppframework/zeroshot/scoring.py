"""Log-likelihood scoring of (context, continuation) requests and multiple-choice accuracy.

Protocol (docs/evaluation.md, zero-shot section):

* Requests are made item by item, choice by choice (:func:`make_requests`), and batched in that order,
  ``batch_size`` requests a batch; the last batch may be smaller. No sorting by length.
* Tokenisation (:func:`encode_pair`): trailing whitespace of the context moves to the start of the
  continuation; ``context + continuation`` is encoded whole and the continuation tokens are the tail
  after the tokens of the context encoded alone. Special tokens the tokenizer puts *before* a text
  (a BOS) are kept at the start of the context; nothing is appended after the continuation.
* A row is the context tokens followed by the continuation tokens WITHOUT the last one (its logits
  would predict nothing), padded on the RIGHT with ``tokenizer.pad_token_id`` (or the EOS id);
  ``attention_mask`` is 1 on real tokens, 0 on padding. As in lm-evaluation-harness, a row keeps the
  last ``max_length`` of those tokens (``(context + continuation)[-(max_length + 1):][:-1]``); the
  continuation is kept whole. ``max_length=None`` truncates nothing.
* A request's score is the summed fp32 ``log_softmax`` log-probability of its continuation tokens,
  each given every token before it. ``acc`` picks the highest score; ``acc_norm`` (only for tasks whose
  stock harness task reports it) the highest score divided by the length in characters of the choice
  text without the one-space delimiter, as lm-evaluation-harness 0.4 does.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ppframework.devices import input_device
from ppframework.errors import ConfigError
from ppframework.zeroshot.tasks import MultipleChoiceItem, get_task, load_task

logger = logging.getLogger(__name__)

__all__ = [
    "Request",
    "ScoringBatch",
    "TaskResult",
    "average_accuracy",
    "build_batches",
    "continuation_length",
    "encode_pair",
    "evaluate_items",
    "evaluate_task",
    "evaluate_tasks",
    "make_requests",
    "score_requests",
]

_METRICS = ("acc", "acc_norm")


@dataclass(frozen=True)
class Request:
    """One (context, continuation) pair to score: choice ``choice_index`` of item ``item_index``."""

    item_index: int
    choice_index: int
    context: str
    continuation: str


@dataclass
class ScoringBatch:
    """A right-padded batch of requests.

    Attributes:
        input_ids: ``(B, T)`` LongTensor; row ``b`` is request ``request_indices[b]``'s tokens but the last
            continuation token, then padding.
        attention_mask: ``(B, T)`` LongTensor, 1 on real tokens and 0 on padding.
        logit_spans: per row, ``(start, end)``: the logits at positions ``start..end-1`` predict the
            continuation tokens (``end`` is the row's number of real tokens).
        targets: per row, the continuation token ids those logits are scored against.
        request_indices: the index of each row's request in the request list.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    logit_spans: list[tuple[int, int]]
    targets: list[list[int]]
    request_indices: list[int]


@dataclass(frozen=True)
class TaskResult:
    """Accuracy of one task: ``acc`` and ``acc_norm`` as fractions in [0, 1].

    ``acc_norm`` is None for tasks whose stock lm-evaluation-harness task does not report it (BoolQ,
    WinoGrande).
    """

    task: str
    n_items: int
    acc: float
    acc_norm: float | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for JSON reports)."""
        return asdict(self)


# --------------------------------------------------------------------------- requests and tokens


def make_requests(items: Sequence[MultipleChoiceItem]) -> list[Request]:
    """All requests of ``items`` in the documented order: item order, then choice order."""
    return [
        Request(item_index, choice_index, context, continuation)
        for item_index, item in enumerate(items)
        for choice_index, (context, continuation) in enumerate(item.pairs())
    ]


def _ids(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    from transformers import PreTrainedTokenizerBase

    kwargs: dict[str, Any] = {"add_special_tokens": add_special_tokens}
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        kwargs["verbose"] = False  # long passages: no "longer than the maximum length" warning
    return [int(i) for i in tokenizer(text, **kwargs)["input_ids"]]


def _special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text (e.g. ``[BOS]``), found on a probe text."""
    probe = "Hello world"
    with_special = _ids(tokenizer, probe, True)
    plain = _ids(tokenizer, probe, False)
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start]
    return []


def encode_pair(
    tokenizer: Any, context: str, continuation: str, prefix: Sequence[int] | None = None
) -> tuple[list[int], list[int]]:
    """Tokenise a request; return ``(context_ids, continuation_ids)``.

    Trailing whitespace of ``context`` moves to the front of ``continuation``. ``context + continuation``
    is encoded whole and the continuation ids are its tail after the ids of the context encoded alone.
    ``prefix`` (default: the special tokens the tokenizer adds before a text, such as BOS) starts the
    context; if the context is still empty, the BOS (else EOS) id is used so the first continuation
    token has something to condition on.

    Raises:
        ConfigError: the continuation has no tokens.
    """
    stripped = context.rstrip()
    if len(stripped) != len(context):
        continuation = context[len(stripped) :] + continuation
        context = stripped
    prefix = _special_prefix(tokenizer) if prefix is None else list(prefix)
    context_ids = _ids(tokenizer, context, False) if context else []
    whole_ids = _ids(tokenizer, context + continuation, False)
    continuation_ids = whole_ids[len(context_ids) :]
    context_ids = list(prefix) + context_ids
    if not context_ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ConfigError("zero-shot scoring: empty context and the tokenizer has neither BOS nor EOS.")
        context_ids = [int(start)]
    if not continuation_ids:
        raise ConfigError(f"zero-shot scoring: continuation {continuation!r} encodes to no tokens.")
    return context_ids, continuation_ids


def _pad_id(tokenizer: Any) -> int:
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pad is not None:
            return int(pad)
    return 0


def build_batches(
    encoded: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int,
    pad_token_id: int,
    max_length: int | None = None,
) -> list[ScoringBatch]:
    """Group encoded requests, in the given order, into right-padded batches of ``batch_size`` rows.

    Row ``b`` of a batch is ``(context_ids + continuation_ids)[:-1]`` (the last token is only a target),
    left-truncated to its last ``max_length`` tokens when longer (lm-evaluation-harness's rule), then
    ``pad_token_id`` up to the batch's longest row. The last batch holds the remaining requests and may
    be smaller.

    Raises:
        ConfigError: ``batch_size`` or ``max_length`` is not positive, or a continuation is longer than
            ``max_length`` tokens.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size: must be a positive number of requests, got {batch_size}.")
    if max_length is not None and max_length < 2:
        raise ConfigError(f"max_length: must be at least 2 tokens or None, got {max_length}.")
    batches = []
    for first in range(0, len(encoded), batch_size):
        rows, spans, targets = [], [], []
        for index in range(first, min(first + batch_size, len(encoded))):
            context_ids, continuation_ids = encoded[index]
            if max_length is not None and len(continuation_ids) > max_length:
                raise ConfigError(
                    f"max_length: request {index} has a continuation of {len(continuation_ids)} tokens, "
                    f"more than max_length={max_length}; raise max_length."
                )
            row = [*context_ids, *continuation_ids][:-1]
            if max_length is not None:
                row = row[-max_length:]
            rows.append(row)
            spans.append((len(row) - len(continuation_ids), len(row)))
            targets.append(list(continuation_ids))
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            input_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[b, : len(row)] = 1
        batches.append(
            ScoringBatch(input_ids, attention_mask, spans, targets, list(range(first, first + len(rows))))
        )
    return batches


# --------------------------------------------------------------------------- scoring


def _batch_scores(logits: torch.Tensor, batch: ScoringBatch) -> list[float]:
    scores = []
    for b, (start, end) in enumerate(batch.logit_spans):
        # logits at position p predict the token at p + 1
        log_probs = torch.log_softmax(logits[b, start:end].float(), dim=-1)
        targets = torch.tensor(batch.targets[b], dtype=torch.long, device=log_probs.device)
        scores.append(float(log_probs.gather(-1, targets.unsqueeze(-1)).sum()))
    return scores


def _as_pair(request: Request | tuple[str, str]) -> tuple[str, str]:
    if isinstance(request, Request):
        return request.context, request.continuation
    context, continuation = request
    return context, continuation


def score_requests(
    model: torch.nn.Module,
    tokenizer: Any,
    requests: Sequence[Request | tuple[str, str]],
    batch_size: int,
    max_length: int | None = None,
    progress: bool = True,
    desc: str = "zero-shot",
) -> list[float]:
    """Summed log-probability of each request's continuation given its context, in request order.

    Batches are built by :func:`build_batches` in request order; each runs as
    ``model(input_ids=..., attention_mask=..., use_cache=False)`` under ``torch.inference_mode`` on the
    model's input device (:func:`~ppframework.devices.input_device`). ``requests`` are
    :class:`Request` objects or ``(context, continuation)`` tuples.
    """
    prefix = _special_prefix(tokenizer)
    encoded = [encode_pair(tokenizer, *_as_pair(request), prefix=prefix) for request in requests]
    batches = build_batches(encoded, batch_size, _pad_id(tokenizer), max_length)
    device = input_device(model)
    scores: list[float] = []
    with torch.inference_mode():
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
            output = model(
                input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
                use_cache=False,
            )
            scores.extend(_batch_scores(output.logits, batch))
    return scores


def continuation_length(continuation: str) -> int:
    """The ``acc_norm`` divisor of a continuation, as lm-evaluation-harness 0.4 computes it.

    The harness divides by ``len(choice)``: the choice text in characters, without the one-space target
    delimiter it puts in front. Our continuations carry that space, so it is removed first (only one:
    a choice text that itself starts with a space keeps it).
    """
    return len(continuation.removeprefix(" "))


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties."""
    best = 0
    for index, value in enumerate(values):
        if value > values[best]:
            best = index
    return best


def evaluate_items(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[MultipleChoiceItem],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
    task: str | None = None,
    metrics: Sequence[str] | None = None,
) -> TaskResult:
    """Score ``items`` (see :func:`score_requests`) and return their ``acc`` and ``acc_norm``.

    ``metrics`` (default: the registered task's, else both) says whether ``acc_norm`` is reported; it is
    None when left out (the stock harness BoolQ and WinoGrande tasks report ``acc`` only).

    Raises:
        ConfigError: no items.
    """
    name = task if task is not None else (items[0].task if items else "?")
    if not items:
        raise ConfigError(f"zero-shot task {name!r}: no items to evaluate.")
    if metrics is None:
        try:
            metrics = get_task(name).metrics
        except ConfigError:  # an ad-hoc task name (tests, library use): report both
            metrics = _METRICS
    started = time.perf_counter()
    requests = make_requests(items)
    scores = score_requests(model, tokenizer, requests, batch_size, max_length, progress, desc=name)
    correct = correct_norm = 0
    position = 0
    for item in items:
        pairs = item.pairs()
        item_scores = scores[position : position + len(pairs)]
        position += len(pairs)
        lengths = [max(continuation_length(continuation), 1) for _, continuation in pairs]
        normed = [score / length for score, length in zip(item_scores, lengths, strict=True)]
        correct += int(_argmax(item_scores) == item.label)
        correct_norm += int(_argmax(normed) == item.label)
    result = TaskResult(
        task=name,
        n_items=len(items),
        acc=correct / len(items),
        acc_norm=correct_norm / len(items) if "acc_norm" in metrics else None,
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "zero-shot %s: %d items, acc=%.4f acc_norm=%s (batch_size=%d, max_length=%s, %.1f s)",
        name, result.n_items, result.acc,
        "-" if result.acc_norm is None else f"{result.acc_norm:.4f}", batch_size, max_length, result.seconds,
    )
    return result


def evaluate_task(
    model: torch.nn.Module,
    tokenizer: Any,
    task: str,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    data_dir: str | Path | None = None,
    max_length: int | None = None,
    progress: bool = True,
) -> TaskResult:
    """Load ``task`` (:func:`ppframework.zeroshot.tasks.load_task`, first ``limit`` items) and score it.

    ``seconds`` covers tokenisation and scoring, not loading.
    """
    spec = get_task(task)
    items = load_task(spec.name, limit=limit, data_dir=data_dir)
    return evaluate_items(
        model, tokenizer, items, batch_size=batch_size, max_length=max_length, progress=progress,
        task=spec.name,
    )


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    data_dir: str | Path | None = None,
    max_length: int | None = None,
    progress: bool = True,
) -> list[TaskResult]:
    """Run :func:`evaluate_task` on each of ``tasks`` in order (names are checked before any scoring)."""
    for task in tasks:
        get_task(task)
    return [
        evaluate_task(
            model, tokenizer, task, limit=limit, batch_size=batch_size, data_dir=data_dir,
            max_length=max_length, progress=progress,
        )
        for task in tasks
    ]


def average_accuracy(results: Sequence[TaskResult], metric: str = "acc") -> float:
    """Unweighted mean of ``metric`` (``"acc"`` or ``"acc_norm"``) over the tasks that report it.

    Raises:
        ConfigError: unknown metric, or no result reports it.
    """
    if metric not in _METRICS:
        raise ConfigError(f"metric: {metric!r} is unknown; choose one of {', '.join(_METRICS)}.")
    values = [float(v) for v in (getattr(result, metric) for result in results) if v is not None]
    if not values:
        raise ConfigError(f"average_accuracy: no task result reports {metric}.")
    return math.fsum(values) / len(values)
