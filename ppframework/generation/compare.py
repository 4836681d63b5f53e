"""``ppf generate``: dense and every configured method complete the same prompts, side by side.

Each method runs ``model.generate`` (greedy, one left-padded batch of all the prompts) with its
pipeline attached: the prefill decides the masks, decode steps follow the method's ``decode`` policy.
The report holds each method's text, the tokens it generated, its prefill seconds and its decode
tokens per second, with the ratio to dense measured in the same process.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ppframework.api import build_pipeline, calibration_history
from ppframework.config import RunConfig
from ppframework.devices import input_device
from ppframework.errors import ConfigError
from ppframework.generation.runner import generate_completions
from ppframework.history import HistoryStore
from ppframework.models import load_model, load_model_kwargs
from ppframework.runner import environment

logger = logging.getLogger(__name__)


@dataclass
class GenerateRow:
    """One method's completions and speed."""

    method: str
    decode: str
    completions: list[str]
    new_tokens: list[int]
    prefill_s: float
    decode_s: float
    decode_tokens_per_s: float
    decode_tps_ratio: float | None = None
    prefill_ratio: float | None = None
    realised_ratio: float = 0.0
    #: the share of prunable weights the decode steps removed (None: no decode step; dense: 0).
    decode_realised_ratio: float | None = None
    #: ``prefill: dense``: the prompt runs unpruned (its realised ratio is 0 by construction).
    dense_prefill: bool = False


@dataclass
class GenerateReport:
    """What ``ppf generate`` measured, with its settings."""

    prompts: list[str]
    max_new_tokens: int
    rows: list[GenerateRow]
    settings: dict[str, Any]
    environment: dict[str, Any]
    elapsed_s: float
    failures: list[Any] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {
            "prompts": self.prompts,
            "max_new_tokens": self.max_new_tokens,
            "rows": [asdict(r) for r in self.rows],
            "settings": self.settings,
            "environment": self.environment,
            "elapsed_s": self.elapsed_s,
        }


def check_prompts(prompts: list[str], max_new_tokens: int) -> None:
    """The command-line checks that need no model: at least one prompt, each UTF-8 text and not
    empty, a token budget."""
    if not prompts:
        raise ConfigError("--prompt: give at least one prompt (repeat --prompt for a batch)")
    for i, prompt in enumerate(prompts):
        try:  # bytes that are not UTF-8 reach argv as lone surrogates, which no tokenizer takes
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ConfigError(
                f"--prompt: prompt {i + 1} is not valid UTF-8 text (undecodable byte at character "
                f"{exc.start + 1}); pass the prompt in UTF-8 (check the terminal's or script's encoding)"
            ) from None
        if not prompt.strip():
            raise ConfigError(f"--prompt: prompt {i + 1} is empty; give some text to continue")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: must be >= 1 (got {max_new_tokens})")


def check_prompt_lengths(
    cfg: RunConfig, tokenizer: Any, prompts: list[str], max_new_tokens: int, model_positions: int | None
) -> None:
    """Every prompt fits the model's positions with the new tokens, and a pruning method's history."""
    refuses = any(m.needs_calibration and m.history.beyond == "refuse" for m in cfg.methods)
    history = cfg.calibration_seq_len if refuses else None
    for i, prompt in enumerate(prompts):
        n = len(tokenizer(prompt)["input_ids"])
        if model_positions is not None and n + max_new_tokens > model_positions:
            raise ConfigError(
                f"--prompt: prompt {i + 1} has {n} tokens; with --max-new-tokens {max_new_tokens} it exceeds "
                f"the model's {model_positions} positions"
            )
        if history is not None and n > history:
            raise ConfigError(
                f"--prompt: prompt {i + 1} has {n} tokens, more than the history's {history} positions "
                "(the prefill decides per position) and a method sets history.beyond: refuse; raise "
                "calibration.seq_len or set history.beyond: extend"
            )


def compare_generation(
    cfg: RunConfig, prompts: list[str], max_new_tokens: int = 64, *, progress: bool | None = None
) -> GenerateReport:
    """Dense and every method of ``cfg`` complete ``prompts``; see the module docstring."""
    from ppframework.models import load_tokenizer_only
    from ppframework.preflight import model_facts

    progress = cfg.progress if progress is None else progress
    check_prompts(prompts, max_new_tokens)
    start = time.perf_counter()
    facts = model_facts(cfg)
    if facts.directory is not None:  # checked before the weights load, from config.json and tokenizer
        tokenizer = load_tokenizer_only(facts.directory, cfg.model.name)
        check_prompt_lengths(cfg, tokenizer, prompts, max_new_tokens, facts.max_positions)
    model, tokenizer = load_model(cfg.model.name, **load_model_kwargs(cfg.model))
    if facts.directory is None:  # not readable before the load (e.g. a preset not converted yet)
        check_prompt_lengths(
            cfg, tokenizer, prompts, max_new_tokens, getattr(model.config, "max_position_embeddings", None)
        )

    def run(label: str) -> Any:
        return generate_completions(
            model,
            tokenizer,
            prompts,
            batch_size=len(prompts),
            max_new_tokens=max_new_tokens,
            stop=[],
            progress=progress,
            desc=label,
        )

    generate_completions(model, tokenizer, prompts[:1], batch_size=1, max_new_tokens=2, stop=[])  # warm-up
    dense = run("dense")
    rows = [
        GenerateRow(
            "dense",
            "-",
            dense.completions,
            dense.new_tokens,
            dense.prefill_s,
            dense.decode_s,
            dense.decode_tokens_per_s,
            1.0,
            1.0,
            0.0,
            0.0,
        )
    ]
    calibration: HistoryStore | None = None
    calibration_info: dict[str, Any] | None = None
    for index, method in enumerate(cfg.methods):
        history = None
        if method.needs_calibration:
            if calibration is None:
                calibration, calibration_info = calibration_history(model, tokenizer, cfg, progress)
            history = calibration.clone()
        pipe = build_pipeline(model, cfg, method_index=index, tokenizer=tokenizer, history=history)
        with pipe:
            result = run(method.label)
        rows.append(
            GenerateRow(
                method.label,
                method.decode,
                result.completions,
                result.new_tokens,
                result.prefill_s,
                result.decode_s,
                result.decode_tokens_per_s,
                result.decode_tokens_per_s / dense.decode_tokens_per_s if dense.decode_tokens_per_s else None,
                result.prefill_s / dense.prefill_s if dense.prefill_s else None,
                pipe.realised_ratio() if not pipe.is_dense else 0.0,
                0.0 if pipe.is_dense else pipe.decode_realised_ratio(),
                pipe.dense_prefill and not pipe.is_dense,
            )
        )
        pipe.release()
    settings = cfg.model_dump(mode="json")
    settings["calibration_info"] = calibration_info
    settings["resolved"] = {"device": str(input_device(model)), "greedy": True}
    return GenerateReport(
        prompts, max_new_tokens, rows, settings, environment(model), time.perf_counter() - start
    )


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_generate_table(report: GenerateReport) -> str:
    """The completions per prompt, then one speed row per method (markdown)."""
    s = report.settings
    lines = [
        f"model {s['model']['name']} ({s['resolved']['device']}); {len(report.prompts)} prompt(s) in one "
        f"left-padded batch; greedy, at most {report.max_new_tokens} new tokens",
    ]
    for i, prompt in enumerate(report.prompts):
        lines += ["", f"### prompt {i + 1}", "", "```", prompt, "```"]
        for row in report.rows:
            lines += [
                "",
                f"**{row.method}** ({row.new_tokens[i]} tokens):",
                "",
                "```",
                row.completions[i],
                "```",
            ]
    lines += [
        "",
        "| method | decode | realised ratio (prefill / decode steps) | tokens generated | prefill s (ratio) "
        "| decode tok/s (ratio) |",
        "|---|---|---|---|---|---|",
    ]
    for row in report.rows:
        lines.append(
            f"| {row.method} | {row.decode} "
            f"| {'dense' if row.dense_prefill else format(row.realised_ratio, '.3f')} "
            f"/ {_fmt(row.decode_realised_ratio, '.3f')} | {sum(row.new_tokens)} "
            f"| {row.prefill_s:.3f} ({_fmt(row.prefill_ratio, '.3f')}) "
            f"| {row.decode_tokens_per_s:.1f} ({_fmt(row.decode_tps_ratio, '.3f')}) |"
        )
    lines += [
        "",
        "realised ratio = share of the decoder's prunable projection weights removed in the prompt forward "
        "(dense: a prefill: dense method runs it unpruned) / in the decode steps; "
        "prefill s = the prompt forward, the method's decision included; decode tok/s = tokens after each "
        "row's first / decode seconds; ratios = method / dense, measured in this process (one run each: "
        "short prompts are noisy; benchmarks/speed.py --generation times them interleaved).",
    ]
    return "\n".join(lines)
