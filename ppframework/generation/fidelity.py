"""Quality measures of generation that see no future tokens: fidelity to dense and continuation perplexity.

The perplexity protocol lets a dynamic method decide on the very window it is scored on (as the paper
does). Generation cannot: the prompt's prefill decides, and every new token runs under that decision.
Both measures here reproduce exactly that information flow, teacher-forced so that they need no
sampling and every method is scored on the same tokens.

A **decision forward** is a forward of the prompt (or window prefix) with an empty transformers
``DynamicCache`` while the pipeline is attached; a **decode step** continues that cache with more
tokens (here several at once), still attached, and runs under the frozen decision (``decode:
frozen`` reuses the prefill's masks; ``decode: dense`` runs the unpruned layers).

Fidelity to dense (:func:`fidelity`)
    For every prompt the dense model's greedy continuation of up to ``N`` tokens
    (:func:`dense_continuations`, ``model.generate`` without a pipeline, or any cached list). The
    method decides on the prompt alone and the continuation is teacher-forced under that decision.
    Continuation token ``j`` is predicted by the logits of the position before it: the prompt's last
    token (from the decision forward: under a pruned prefill, the pruned prompt forward) for ``j = 0``,
    continuation token ``j - 1`` (from the decode step) after. The dense logits come from the same two
    forwards without the pipeline. Per token: top-1 agreement (``argmax`` of the method's logits equals
    the dense greedy token) and ``KL(dense || method)`` of the next-token distributions (float32
    ``log_softmax``, nats). Means over all scored tokens and per prompt; padding is never scored.

Continuation perplexity (:func:`continuation_perplexity`)
    Windows of ``L`` tokens (:func:`ppframework.data.make_windows`). The method decides on the first
    ``prefix_len`` tokens of each window (their own predictions are not scored), then the rest is
    teacher-forced under that decision; ``exp`` of the mean next-token NLL of the ``L - prefix_len``
    remaining tokens (the first of them predicted by the prefix's last logits).

Batches: prompts are left-padded (pad columns have attention mask 0), positions are those
``generate`` uses (``cumsum(mask) - 1``, continuing after the prompt's real tokens), and the decode
step's attention mask covers the cached prompt columns and the new tokens. Continuations shorter than
the longest of a batch (a dense continuation that stopped at EOS) are right-padded and their padding
is not scored.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache

from ppframework.adapters import get_adapter
from ppframework.devices import input_device
from ppframework.errors import ConfigError
from ppframework.pipeline import Pipeline, _pipeline_forward

logger = logging.getLogger(__name__)

__all__ = [
    "ContinuationPerplexity",
    "FidelityResult",
    "PromptFidelity",
    "continuation_perplexity",
    "dense_continuations",
    "fidelity",
    "generation_positions",
    "left_pad",
    "teacher_forced_logits",
]


# --------------------------------------------------------------------------- batches


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``(B, max length)``, of token lists left-padded with
    ``pad_token_id`` (mask 0 on padding), as ``generate`` expects."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_token_id] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    return ids, mask


def generation_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """The ``position_ids`` ``generate`` gives a (left-)padded prompt: ``cumsum(mask) - 1`` on real
    tokens, 1 on padding (a value no real token depends on)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def _right_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, valid)`` ``(B, max length)`` of token lists right-padded (``valid`` False there)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [pad_token_id] * (width - len(r)) for r in rows], dtype=torch.long)
    valid = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows], dtype=torch.bool)
    return ids, valid


def _chunks(n: int, batch_size: int) -> Iterator[range]:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 (got {batch_size})")
    for start in range(0, n, batch_size):
        yield range(start, min(start + batch_size, n))


def _check_detached(model: torch.nn.Module) -> None:
    """Dense references must run the unmodified model: refuse when any pipeline is attached."""
    if any(_pipeline_forward(layer) is not None for layer in get_adapter(model).layers):
        raise RuntimeError(
            "a pipeline is attached to the model; the dense reference must run without one (leave "
            "`with pipe:` first)"
        )


def _cache_argument(model: torch.nn.Module) -> str:
    """The keyword the model's forward takes the cache by (``cache`` in recent transformers)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _attached(pipeline: Pipeline | None) -> AbstractContextManager[Any]:
    return nullcontext() if pipeline is None else pipeline


# --------------------------------------------------------------------------- teacher forcing


@torch.inference_mode()
def teacher_forced_logits(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    continuation: torch.Tensor,
    *,
    step_tokens: int | None = None,
) -> torch.Tensor:
    """Logits ``(B, N, V)`` predicting each of the ``N`` continuation tokens of a left-padded batch.

    One decision forward of the prompt with an empty ``DynamicCache`` (its last column's logits
    predict continuation token 0), then the first ``N - 1`` continuation tokens as decode steps that
    continue the cache: one forward of all of them (``step_tokens`` None) or forwards of
    ``step_tokens`` tokens each (1: token by token, as ``generate`` feeds them). Whatever pipeline is
    attached to ``model`` runs these forwards; nothing is attached here.
    """
    if prompt_ids.shape != prompt_mask.shape:
        raise ValueError(f"prompt ids {tuple(prompt_ids.shape)} and mask {tuple(prompt_mask.shape)} differ")
    if continuation.dim() != 2 or continuation.shape[0] != prompt_ids.shape[0] or continuation.shape[1] < 1:
        raise ValueError(
            f"continuation: expected (B={prompt_ids.shape[0]}, N >= 1), got {tuple(continuation.shape)}"
        )
    if step_tokens is not None and step_tokens < 1:
        raise ValueError(f"step_tokens must be None or >= 1 (got {step_tokens})")
    device = input_device(model)
    ids, mask = prompt_ids.to(device), prompt_mask.to(device)
    cont = continuation.to(device)
    cache = DynamicCache()
    by = _cache_argument(model)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=generation_positions(mask),
        use_cache=True,
        **{by: cache},
    )
    pieces = [out.logits[:, -1:].float()]
    fed = cont[:, :-1]
    real = mask.sum(dim=1, keepdim=True)
    step = fed.shape[1] if step_tokens is None else step_tokens
    ones = torch.ones(fed.shape, dtype=mask.dtype, device=device)
    for start in range(0, fed.shape[1], max(step, 1)):
        stop = min(start + step, fed.shape[1])
        offsets = torch.arange(start, stop, device=device)[None, :]
        out = model(
            input_ids=fed[:, start:stop],
            attention_mask=torch.cat([mask, ones[:, :stop]], dim=1),
            position_ids=real + offsets,
            use_cache=True,
            **{by: cache},
        )
        pieces.append(out.logits.float())
    return torch.cat(pieces, dim=1)


# --------------------------------------------------------------------------- dense continuations


@torch.inference_mode()
def dense_continuations(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    new_tokens: int,
    *,
    pad_token_id: int,
    batch_size: int = 1,
    stop_at_eos: bool = True,
    progress: bool = False,
) -> list[list[int]]:
    """The dense model's greedy continuation of each prompt (``model.generate``, no pipeline).

    Up to ``new_tokens`` tokens per prompt; with ``stop_at_eos`` a continuation ends with the first
    EOS token (included: predicting it is part of the continuation), otherwise it always has
    ``new_tokens`` tokens (EOS is then an ordinary greedy token). Batch size 1 (the default) makes
    each continuation independent of the others' lengths.
    """
    if new_tokens < 1:
        raise ConfigError(f"new_tokens must be >= 1 (got {new_tokens})")
    _check_detached(model)
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos_ids = set(eos if isinstance(eos, list | tuple) else [] if eos is None else [eos])
    device = input_device(model)
    options: dict[str, Any] = {"eos_token_id": None} if not stop_at_eos else {}
    out: list[list[int]] = []
    for rows in tqdm(list(_chunks(len(prompts), batch_size)), desc="dense", disable=not progress):
        ids, mask = left_pad([prompts[i] for i in rows], pad_token_id)
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad_token_id,
            **options,
        )
        for row in generated[:, ids.shape[1] :].tolist():
            keep = row
            if stop_at_eos:
                ends = [j for j, token in enumerate(row) if token in eos_ids]
                keep = row[: ends[0] + 1] if ends else row
            out.append(keep)
    return out


# --------------------------------------------------------------------------- fidelity


@dataclass
class PromptFidelity:
    """One prompt's scores: its scored continuation tokens, top-1 agreements and summed KL."""

    tokens: int
    agree: int
    kl_sum: float
    dense_agree: int = 0
    """Tokens where dense teacher forcing reproduces its own greedy token (see :class:`FidelityResult`)."""

    @property
    def top1(self) -> float:
        """Mean top-1 agreement with dense over this prompt's tokens."""
        return self.agree / self.tokens if self.tokens else math.nan

    @property
    def kl(self) -> float:
        """Mean KL(dense || method) per token (nats)."""
        return self.kl_sum / self.tokens if self.tokens else math.nan


@dataclass
class FidelityResult:
    """Fidelity to dense over a prompt set (token-weighted means, and per prompt in input order)."""

    prompts: list[PromptFidelity] = field(default_factory=list)
    dense_agree: int = 0
    """Tokens where the dense teacher-forced argmax equals the dense greedy token (a sanity check:
    batched or multi-token forwards may break near-ties differently from ``generate``)."""

    @property
    def tokens(self) -> int:
        """Continuation tokens scored."""
        return sum(p.tokens for p in self.prompts)

    @property
    def top1(self) -> float:
        """Mean top-1 agreement per token over every prompt's continuation."""
        return sum(p.agree for p in self.prompts) / self.tokens if self.tokens else math.nan

    @property
    def kl(self) -> float:
        """Mean KL(dense || method) per token (nats)."""
        return sum(p.kl_sum for p in self.prompts) / self.tokens if self.tokens else math.nan

    @property
    def dense_top1(self) -> float:
        """Share of tokens where dense teacher forcing reproduces its own greedy token."""
        return self.dense_agree / self.tokens if self.tokens else math.nan

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary: means, token count and per-prompt means."""
        return {
            "top1": self.top1,
            "kl": self.kl,
            "tokens": self.tokens,
            "dense_top1": self.dense_top1,
            "per_prompt": [{"tokens": p.tokens, "top1": p.top1, "kl": p.kl} for p in self.prompts],
        }


def _token_scores(
    dense: torch.Tensor, method: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: (method agreements, summed KL(dense || method), dense agreements) over valid tokens."""
    dense_logp = F.log_softmax(dense.float(), dim=-1)
    method_logp = F.log_softmax(method.float(), dim=-1)
    kl = (dense_logp.exp() * (dense_logp - method_logp)).sum(dim=-1)
    agree = (method.argmax(dim=-1) == targets) & valid
    dense_agree = (dense.argmax(dim=-1) == targets) & valid
    return agree.sum(dim=1), (kl * valid).sum(dim=1), dense_agree.sum(dim=1)


def fidelity(
    model: torch.nn.Module,
    pipeline: Pipeline | None,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    batch_size: int = 1,
    step_tokens: int | None = None,
    progress: bool = False,
    desc: str = "fidelity",
) -> FidelityResult:
    """Fidelity of ``pipeline``'s method to dense on ``continuations`` of ``prompts`` (module docstring).

    ``pipeline`` must be detached (it is attached here for the method's forwards only; None scores
    dense against itself). Prompts go in input order, ``batch_size`` at a time, left-padded; each
    batch is one decision. ``step_tokens`` as in :func:`teacher_forced_logits`.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    if any(len(c) == 0 for c in continuations):
        raise ValueError("every continuation needs at least one token")
    _check_detached(model)
    result = FidelityResult()
    for rows in tqdm(list(_chunks(len(prompts), batch_size)), desc=desc, disable=not progress, unit="batch"):
        ids, mask = left_pad([prompts[i] for i in rows], pad_token_id)
        targets, valid = _right_pad([continuations[i] for i in rows], pad_token_id)
        dense = teacher_forced_logits(model, ids, mask, targets, step_tokens=step_tokens)
        with _attached(pipeline):
            method = teacher_forced_logits(model, ids, mask, targets, step_tokens=step_tokens)
        agree, kl_sum, dense_agree = _token_scores(
            dense, method, targets.to(dense.device), valid.to(dense.device)
        )
        for row, (n, a, k) in enumerate(
            zip(valid.sum(dim=1).tolist(), agree.tolist(), kl_sum.tolist(), strict=True)
        ):
            own = int(dense_agree[row])
            scores = PromptFidelity(tokens=int(n), agree=int(a), kl_sum=float(k), dense_agree=own)
            result.prompts.append(scores)
            result.dense_agree += own
    logger.debug("%s: top-1 %.4f, KL %.5f over %d tokens", desc, result.top1, result.kl, result.tokens)
    return result


# --------------------------------------------------------------------------- continuation perplexity


@dataclass
class ContinuationPerplexity:
    """Perplexity of the tokens after each window's decision prefix."""

    nll_sum: float
    tokens: int
    windows: int
    prefix_len: int
    window_nll: list[float] = field(default_factory=list)
    """Each window's summed negative log-likelihood, in order (for paired comparisons by window)."""

    @property
    def perplexity(self) -> float:
        """``exp(nll_sum / tokens)``."""
        return math.exp(self.nll_sum / self.tokens) if self.tokens else math.nan

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "perplexity": self.perplexity,
            "nll_sum": self.nll_sum,
            "tokens": self.tokens,
            "windows": self.windows,
            "prefix_len": self.prefix_len,
            "window_nll": list(self.window_nll),
        }


def continuation_perplexity(
    model: torch.nn.Module,
    pipeline: Pipeline | None,
    windows: torch.Tensor,
    prefix_len: int,
    *,
    batch_size: int = 1,
    step_tokens: int | None = None,
    progress: bool = False,
    desc: str = "continuation perplexity",
) -> ContinuationPerplexity:
    """Perplexity of ``windows[:, prefix_len:]`` under the decision made on ``windows[:, :prefix_len]``.

    ``windows`` ``(W, L)`` (no padding), in order, ``batch_size`` at a time (the last batch may be
    smaller; pass a multiple of ``batch_size`` windows to keep every decision's batch size).
    ``pipeline`` is attached for the whole call (None: the dense model).
    """
    if windows.dim() != 2:
        raise ValueError(f"windows: expected (W, L), got {tuple(windows.shape)}")
    length = windows.shape[1]
    if not 1 <= prefix_len < length:
        raise ConfigError(
            f"prefix_len must be in [1, {length - 1}] for windows of {length} tokens (got {prefix_len})"
        )
    result = ContinuationPerplexity(0.0, 0, 0, prefix_len)
    ones = torch.ones(1, prefix_len, dtype=torch.long)
    with _attached(pipeline):
        for rows in tqdm(
            list(_chunks(windows.shape[0], batch_size)), desc=desc, disable=not progress, unit="batch"
        ):
            batch = windows[rows.start : rows.stop]
            prefix, rest = batch[:, :prefix_len], batch[:, prefix_len:]
            logits = teacher_forced_logits(
                model, prefix, ones.expand(batch.shape[0], -1), rest, step_tokens=step_tokens
            )
            targets = rest.to(logits.device)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
            per_window = nll.reshape(targets.shape).sum(dim=1)
            values = [float(value) for value in per_window]
            result.window_nll.extend(values)
            result.nll_sum += sum(values)
            result.tokens += targets.numel()
            result.windows += batch.shape[0]
    return result
