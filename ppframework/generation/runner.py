"""Batched greedy generation with any Hugging Face causal LM, prefill and decode timed separately.

Order: prompts are processed in input order, in consecutive chunks of ``batch_size`` (the last one may
be smaller); completions come back in input order. Each chunk is left-padded by hand (the tokenizer is
not modified) with the tokenizer's pad token, or its EOS token when it has none, and generated with
``model.generate(do_sample=False, use_cache=True, stop_strings=stop)`` under ``torch.inference_mode()``.

Decoding: the text of a row's new tokens (padding and special tokens skipped) is taken as
``decode(prompt + new)[len(decode(prompt)):]`` when that prefix matches, else ``decode(new)``; this keeps
the leading space/indentation that SentencePiece tokenizers drop when new tokens are decoded alone.
The text is then cut at the first stop string (``generate`` stops a row at a stop string but keeps it).
With ``stop_after_text`` (XSum) leading whitespace is dropped first and stop strings count only after
some text (:class:`StopAfterText`), so a completion that starts on a new line is not cut to nothing.

Timing: a forward pre-hook and a forward hook on the model record each forward's wall time (with a
CUDA synchronize on CUDA) and input length. The first forward of each ``generate`` call is the
prefill; the others are decode steps. New tokens are counted per row up to its first EOS (counted)
or pad token (not counted), so the padding after a finished row is not counted; with pad == EOS, a
row stopped by a stop string counts one padding token too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from ppframework.devices import input_device
from ppframework.errors import ConfigError
from ppframework.generation.tasks import cut_at_stop

logger = logging.getLogger(__name__)

__all__ = ["GenerationRun", "generate_completions"]


@dataclass
class GenerationRun:
    """Completions plus per-batch timing and token counts of one :func:`generate_completions` call."""

    completions: list[str]
    batch_sizes: list[int] = field(default_factory=list)
    prefill_seconds: list[float] = field(default_factory=list)
    decode_seconds: list[float] = field(default_factory=list)
    decode_steps: list[int] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)
    """Real new tokens generated per prompt (input order)."""
    prompt_tokens: list[int] = field(default_factory=list)
    """Prompt length in tokens per prompt (input order)."""

    @property
    def prefill_s(self) -> float:
        """Total prefill seconds."""
        return sum(self.prefill_seconds)

    @property
    def decode_s(self) -> float:
        """Total decode seconds."""
        return sum(self.decode_seconds)

    @property
    def total_new_tokens(self) -> int:
        """All real new tokens."""
        return sum(self.new_tokens)

    @property
    def decode_tokens(self) -> int:
        """New tokens produced by decode steps: all but the first of each row (that one is prefill's)."""
        return sum(max(n - 1, 0) for n in self.new_tokens)

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode tokens per decode second (0 when nothing was decoded)."""
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens per prefill second (0 when no prefill was timed)."""
        return sum(self.prompt_tokens) / self.prefill_s if self.prefill_s > 0 else 0.0


class _ForwardTimer:
    """Forward hooks recording (seconds, input length) of every forward call of ``model``."""

    def __init__(self, model: torch.nn.Module, cuda: bool) -> None:
        self.cuda = cuda
        self.calls: list[tuple[float, int]] = []
        self._start = 0.0
        self._length = 0
        self._handles = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(self._post, with_kwargs=True),
        ]

    def _pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        self._length = int(ids.shape[1]) if ids is not None else 0
        if self.cuda:
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def _post(self, module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.calls.append((time.perf_counter() - self._start, self._length))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _decode_new(tokenizer: Any, prompt_ids: list[int], new_ids: list[int]) -> str:
    alone = tokenizer.decode(new_ids, skip_special_tokens=True)
    if not prompt_ids:
        return alone
    head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    whole = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
    return whole[len(head) :] if whole.startswith(head) else alone


class StopAfterText(StoppingCriteria):
    """Stops each row once its new text, leading whitespace ignored, contains a stop string.

    ``generate(stop_strings=...)`` would stop a row on a stop string among its very first tokens
    (a summary that starts on a new line); this one only counts stop strings after some text.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_width: int) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width :], skip_special_tokens=True)
        done = [any(s in text.lstrip() for s in self.stop) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def generate_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    batch_size: int,
    max_new_tokens: int,
    stop: Sequence[str],
    progress: bool = False,
    desc: str = "generate",
    stop_after_text: bool = False,
    on_batch: Callable[[int, list[str]], None] | None = None,
) -> GenerationRun:
    """Greedily complete ``prompts`` in chunks of ``batch_size`` (input order) and time each phase.

    ``on_batch(start, completions)``, when given, is called as each chunk finishes with the index of
    its first prompt and its completions (so a caller can keep them should a later chunk fail).

    Raises:
        ConfigError: a bad batch size or token budget, an empty prompt, or a prompt whose token length
            plus ``max_new_tokens`` exceeds the model's ``max_position_embeddings``, before generating.
    """
    if batch_size < 1:
        raise ConfigError(f"generation batch_size must be >= 1 (got {batch_size}).")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1 (got {max_new_tokens}).")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ConfigError("the tokenizer has neither a pad nor an EOS token; generation needs one.")
    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    limit = getattr(model.config, "max_position_embeddings", None)
    encoded: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ConfigError(f"prompt {i} is empty; every generation prompt needs text.")
        ids = list(tokenizer(prompt)["input_ids"])
        if limit is not None and len(ids) + max_new_tokens > limit:
            raise ConfigError(
                f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds the "
                f"model's max_position_embeddings={limit} (prompts may have at most "
                f"{limit - max_new_tokens} tokens)."
            )
        encoded.append(ids)

    device = input_device(model)
    run = GenerationRun(completions=[], prompt_tokens=[len(ids) for ids in encoded])
    timer = _ForwardTimer(model, cuda=device.type == "cuda")
    starts = range(0, len(encoded), batch_size)
    try:
        for start in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
            chunk = encoded[start : start + batch_size]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
            timer.calls.clear()
            if stop_after_text and stop:
                criterion = StopAfterText(tokenizer, stop, width)
                stopping = {"stopping_criteria": StoppingCriteriaList([criterion])}
            else:
                stopping = {"stop_strings": list(stop) or None, "tokenizer": tokenizer}
            with torch.inference_mode():
                out = model.generate(
                    input_ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=pad_id,
                    **stopping,
                )
            calls = list(timer.calls)
            run.batch_sizes.append(len(chunk))
            run.prefill_seconds.append(calls[0][0] if calls else 0.0)
            run.decode_seconds.append(sum(t for t, _ in calls[1:]))
            run.decode_steps.append(max(len(calls) - 1, 0))
            for ids, row in zip(chunk, out[:, width:].tolist(), strict=True):
                n = len(row)
                for j, tok in enumerate(row):
                    if tok in eos_ids:
                        n = j + 1
                        break
                    if tok == pad_id:
                        n = j
                        break
                run.new_tokens.append(n)
                text = _decode_new(tokenizer, ids, row[:n])
                run.completions.append(cut_at_stop(text.lstrip() if stop_after_text else text, stop))
            if on_batch is not None:
                on_batch(start, run.completions[start:])
    finally:
        timer.remove()
    logger.debug(
        "generated %d completions: prefill %.3f s, decode %.3f s (%.1f tok/s)",
        len(run.completions),
        run.prefill_s,
        run.decode_s,
        run.decode_tokens_per_s,
    )
    return run
