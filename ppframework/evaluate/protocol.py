"""``ppf eval``'s protocol: what is checked, loaded and measured, in which order (docs/evaluation.md).

For dense and every configured method, on one loaded model: WikiText-2 perplexity (with the
warm-up batch), zero-shot accuracy on the seven tasks, interleaved dense/method runtime (whole
forward and decoder layers alone), analytic FLOPs from the shapes each batch used, peak memory,
and the efficiency metric PRR with its ratio against every baseline of the run; optionally generation
tasks and the measures without future tokens (``evaluation.fidelity``: fidelity to dense, continuation
perplexity; :mod:`ppframework.generation.fidelity_eval`). Each measurement
starts the method from a fresh copy of the calibration history, so results do not depend on the
order in which they are taken.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ppframework.api import build_pipeline, calibration_history
from ppframework.config import RunConfig
from ppframework.devices import input_device
from ppframework.errors import ConfigError
from ppframework.evaluate.efficiency import add_efficiency, default_baselines
from ppframework.evaluate.frontier import analyse_frontier
from ppframework.evaluate.report import EvalReport
from ppframework.evaluate.rows import EvalRow
from ppframework.evaluate.timing import make_layers, time_against_dense
from ppframework.evaluate.writing import generations_file, write_eval_report
from ppframework.generation.evaluation import (
    CompletionLog,
    GenerationTaskResult,
    add_decode_ratios,
    check_generation_data,
    load_generation_items,
    run_generation_tasks,
)
from ppframework.generation.fidelity_eval import (
    FidelityPlan,
    add_dense_references,
    check_fidelity,
    load_fidelity_texts,
    measure_fidelity,
    plan_fidelity,
)
from ppframework.harness import LmEvalPlan, plan_lm_eval, run_lm_eval
from ppframework.history import HistoryStore
from ppframework.metrics.memory import PeakMemory
from ppframework.metrics.noise import speedup_unresolved
from ppframework.metrics.perplexity import evaluate_perplexity
from ppframework.models import load_model, load_model_kwargs
from ppframework.outputs import results_stem
from ppframework.pipeline import Pipeline
from ppframework.preflight import preflight
from ppframework.runner import environment, eval_batches, pipeline_flops, resolved_settings
from ppframework.zeroshot import evaluate_tasks, get_task

logger = logging.getLogger(__name__)


def check_tasks(cfg: RunConfig) -> None:
    """Fail before any model loads if a zero-shot task name is unknown, a request length does not fit
    the calibrated history, or a baseline is not a method (lm-eval tasks: :func:`plan_lm_eval`)."""
    zs = cfg.evaluation.zeroshot
    if zs.enabled:
        for i, name in enumerate(zs.tasks):
            try:
                get_task(name)
            except ConfigError as exc:
                raise ConfigError(f"evaluation.zeroshot.tasks[{i}]: {exc}") from None
    if any(m.needs_calibration and m.history.beyond == "refuse" for m in cfg.methods):
        lengths = {
            "evaluation.zeroshot.max_length": zs.max_length if zs.enabled else None,
            "evaluation.lm_eval.max_length": cfg.evaluation.lm_eval.max_length
            if cfg.evaluation.lm_eval.enabled else None,
        }
        for name, value in lengths.items():
            if value is not None and value > cfg.calibration_seq_len:
                raise ConfigError(
                    f"{name}: {value} tokens exceed calibration.seq_len ({cfg.calibration_seq_len}), the "
                    "positions of the calibrated history, and a method sets history.beyond: refuse. Lower "
                    "it, raise calibration.seq_len or set history.beyond: extend"
                )
    labels = [m.label for m in cfg.methods]
    for name in cfg.evaluation.baselines or []:
        if name not in labels:
            raise ConfigError(
                f"evaluation.baselines: {name!r} is not one of the run's methods ({', '.join(labels)})"
            )


def request_max_length(cfg: RunConfig, explicit: int | None, model_positions: int | None) -> int | None:
    """The longest input a zero-shot request may have (longer ones lose tokens from the left).

    ``explicit`` when set; else ``calibration.seq_len`` when a method of the run has a calibrated
    history (its positions end there and a pruned forward cannot be longer), used for every row,
    dense included, so all rows score the same tokens; else the model's context
    (``max_position_embeddings``; None = no limit), as lm-evaluation-harness does.
    """
    if explicit is not None:
        return explicit
    if any(m.needs_calibration for m in cfg.methods):
        return cfg.calibration_seq_len
    return model_positions


def _zeroshot(
    model: nn.Module, tokenizer: Any, cfg: RunConfig, progress: bool, max_length: int | None = None
) -> dict[str, dict[str, float | None]]:
    zs = cfg.evaluation.zeroshot
    results = evaluate_tasks(
        model,
        tokenizer,
        zs.tasks,
        limit=zs.limit,
        batch_size=zs.batch_size,
        data_dir=cfg.data.data_dir,
        max_length=max_length,
        progress=progress,
    )
    return {r.task: {"acc": r.acc, "acc_norm": r.acc_norm, "n_items": r.n_items} for r in results}


def _mean(accuracy: dict[str, dict[str, Any]], metric: str) -> float | None:
    """Mean of ``metric`` over the tasks that report it (acc_norm: not BoolQ, WinoGrande)."""
    values = [v[metric] for v in accuracy.values() if v.get(metric) is not None]
    return sum(values) / len(values) if values else None


def evaluate(cfg: RunConfig, *, progress: bool | None = None) -> EvalReport:
    """Run the whole evaluation of ``cfg`` (see the module docstring) and return the report."""
    progress = cfg.progress if progress is None else progress
    start = time.perf_counter()
    check_tasks(cfg)
    check_generation_data(cfg)
    check_fidelity(cfg)
    zs = cfg.evaluation.zeroshot
    longest_request = request_max_length(cfg, zs.max_length, None) if zs.enabled else None
    lm_plan: LmEvalPlan | None = plan_lm_eval(cfg) if cfg.evaluation.lm_eval.enabled else None
    try:
        checked = preflight(cfg, zeroshot_length=longest_request)
        fid_texts = load_fidelity_texts(cfg, checked.text)
        return _evaluate(cfg, progress, start, checked, lm_plan, fid_texts)
    finally:
        if lm_plan is not None:
            lm_plan.close()


def _evaluate(
    cfg: RunConfig,
    progress: bool,
    start: float,
    checked: Any,
    lm_plan: LmEvalPlan | None,
    fid_texts: dict[str, str] | None = None,
) -> EvalReport:
    """:func:`evaluate` after the checks: load the model and measure every method."""
    zs = cfg.evaluation.zeroshot
    text = checked.text
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model.name, **load_model_kwargs(cfg.model))
    ev = cfg.evaluation
    gen_items = (
        load_generation_items(cfg, tokenizer, getattr(model.config, "max_position_embeddings", None))
        if ev.generation.enabled
        else {}
    )
    # Each completion goes to the partial report's generations file as it is made, so an interrupted
    # run keeps them; the reports written later replace the file with the scored records.
    gen_log = (
        CompletionLog(Path(cfg.out_dir) / generations_file(results_stem(cfg.out_dir, complete=False)))
        if cfg.out_dir and ev.generation.enabled
        else None
    )
    batches = eval_batches(cfg, tokenizer, text, checked.eval_ids)
    positions = getattr(model.config, "max_position_embeddings", None)
    fid_plan: FidelityPlan | None = (
        plan_fidelity(cfg, tokenizer, positions, fid_texts or {}) if ev.fidelity.enabled else None
    )
    zs_max_length = request_max_length(cfg, zs.max_length, positions)
    le_max_length = request_max_length(cfg, ev.lm_eval.max_length or zs.max_length, positions)
    lm_eval_info: dict[str, Any] = {}

    def settings_now() -> dict[str, Any]:
        settings = resolved_settings(cfg, model, batches)
        settings["resolved"]["zeroshot_max_length"] = zs_max_length if zs.enabled else None
        settings["resolved"]["lm_eval"] = lm_eval_info or None
        settings["resolved"]["fidelity"] = fid_plan.describe() if fid_plan is not None else None
        return settings
    warmup = cfg.data.warmup_batches
    device = input_device(model)
    calibration: HistoryStore | None = None
    calibration_info: dict[str, Any] | None = None

    def make_pipe(index: int) -> Pipeline:
        nonlocal calibration, calibration_info
        method = cfg.methods[index]
        history = None
        if method.needs_calibration:
            if calibration is None:
                calibration, calibration_info = calibration_history(model, tokenizer, cfg, progress)
            history = calibration.clone()
        return build_pipeline(model, cfg, method_index=index, tokenizer=tokenizer, history=history)

    def save_partial(rows: list[EvalRow], gen_results: list[dict[str, GenerationTaskResult]]) -> None:
        """Write what has finished so far (no plots), so a crash later loses no finished method."""
        partial = [replace(r) for r in rows]
        records = _attach_generation(partial, gen_results)
        report = EvalReport(
            partial,
            settings_now(),
            calibration_info,
            environment(model),
            time.perf_counter() - start,
            [],
            generations=records,
            complete=False,
        )
        try:
            write_eval_report(report, cfg.out_dir, plots=False)
        except OSError as exc:
            logger.warning("could not write partial results to %s: %s", cfg.out_dir, exc)

    rows: list[EvalRow] = []
    gen_results: list[dict[str, GenerationTaskResult]] = []
    layers = make_layers(model)
    for index in [-1, *range(len(cfg.methods))]:
        dense = index < 0
        label = "dense" if dense else cfg.methods[index].label
        row = EvalRow(method=label, target_ratio=0.0 if dense else cfg.methods[index].pruning.ratio)
        if dense:
            row.realised_ratio = row.realised_ratio_model = 0.0
            if ev.runtime.enabled:  # the reference the methods' ratios are taken against
                row.time_ratio, row.time_ratio_spread, row.decoder_time_ratio = 1.0, 0.0, 1.0
        logger.info("evaluating %s", label)
        pipe = None if dense else make_pipe(index)
        if pipe is not None:
            row.layer_ratio, row.static = pipe.layer_ratio, pipe.is_static
            row.dense_prefill = pipe.dense_prefill and not pipe.is_dense
        if ev.perplexity:
            with PeakMemory(device) as memory, pipe if pipe is not None else nullcontext():
                result = evaluate_perplexity(
                    model,
                    batches,
                    warmup_batches=warmup,
                    progress=progress,
                    desc=label,
                    warmup_policy=cfg.data.warmup_policy,
                    untracked=pipe.untracked if pipe is not None else nullcontext,
                )
            row.perplexity = result.perplexity
            row.median_forward_s = result.median_seconds
            row.peak_memory_bytes = memory.peak_bytes
            if pipe is not None:
                row.realised_ratio = pipe.realised_ratio(warmup)
                row.realised_ratio_model = pipe.realised_ratio_model(warmup)
                row.flops = pipeline_flops(pipe, warmup).to_dict()
        if ev.zeroshot.enabled:
            zs_pipe = None if dense else make_pipe(index)
            with zs_pipe if zs_pipe is not None else nullcontext():
                row.accuracy = _zeroshot(model, tokenizer, cfg, progress, zs_max_length)
            row.mean_acc = _mean(row.accuracy, "acc")
            row.mean_acc_norm = _mean(row.accuracy, "acc_norm")
        if lm_plan is not None:
            le_pipe = None if dense else make_pipe(index)
            with le_pipe if le_pipe is not None else nullcontext():
                lm_run = run_lm_eval(
                    model, tokenizer, lm_plan, ev.lm_eval, max_length=le_max_length, label=label
                )
            if le_pipe is not None:
                le_pipe.release()
            row.lm_eval, row.lm_eval_mean_acc = lm_run.tasks, lm_run.mean_acc
            row.lm_eval_batches = lm_run.batches
            lm_eval_info = lm_plan.describe() | lm_run.settings
        if ev.generation.enabled:
            gen_pipe = None if dense else make_pipe(index)
            with gen_pipe if gen_pipe is not None else nullcontext():
                gen_results.append(
                    run_generation_tasks(
                        model, tokenizer, gen_items, cfg, label=label, progress=progress, log=gen_log
                    )
                )
            if gen_pipe is not None:
                row.decode_realised_ratio = gen_pipe.decode_realised_ratio()
                if not ev.perplexity:  # the realised ratio of the prefills' decisions
                    row.realised_ratio = gen_pipe.realised_ratio()
                    row.realised_ratio_model = gen_pipe.realised_ratio_model()
                gen_pipe.release()
        if fid_plan is not None:
            if dense:
                add_dense_references(model, fid_plan, progress)
            row.fidelity = measure_fidelity(
                model,
                fid_plan,
                (lambda: None) if dense else partial(make_pipe, index),
                label=label,
                progress=progress,
            )
            if row.decode_realised_ratio is None and not dense:
                row.decode_realised_ratio = row.fidelity.get("decode_realised_ratio")
        if ev.runtime.enabled and not dense:
            timing_pipe = make_pipe(index)
            timing = time_against_dense(
                model,
                layers,
                timing_pipe,
                batches[min(warmup, len(batches) - 1)],
                ev.runtime.repeats,
                ev.runtime.warmup,
                progress,
                f"runtime {label}",
            )
            timing_pipe.release()
            row.time_ratio = timing.time_ratio
            row.time_ratio_spread = timing.spread
            pairs = timing.pair_ratios
            row.time_ratio_q25, row.time_ratio_q75 = pairs.q25, pairs.q75
            row.runtime_unresolved = speedup_unresolved(row.time_ratio, row.time_ratio_spread)
            row.decoder_time_ratio = timing.decoder_time_ratio
            row.tokens_per_s = timing.tokens_per_s
            if rows and rows[0].tokens_per_s is None:
                rows[0].tokens_per_s = timing.dense_tokens_per_s
        if pipe is not None:
            pipe.release()
        rows.append(row)
        if cfg.out_dir and index < len(cfg.methods) - 1:
            save_partial(rows, gen_results)

    static = {r.method: r.static for r in rows}
    baselines = list(ev.baselines) if ev.baselines is not None else default_baselines(cfg.methods, static)
    add_efficiency(rows, baselines)
    records = _attach_generation(rows, gen_results)
    settings = settings_now()
    frontier = analyse_frontier(rows, ev.frontier) if ev.frontier.enabled and ev.perplexity else None
    return EvalReport(
        rows,
        settings,
        calibration_info,
        environment(model),
        time.perf_counter() - start,
        baselines,
        generations=records,
        frontier=frontier,
    )


def _attach_generation(rows: list[EvalRow], gen_results: list[dict[str, GenerationTaskResult]]) -> list[dict]:
    """Put each row's generation summaries (decode ratios against dense included) on it; return every
    completion record."""
    add_decode_ratios(gen_results)
    records: list[dict[str, Any]] = []
    for row, results in zip(rows, gen_results, strict=False):
        row.generation = {task: result.summary() for task, result in results.items()}
        records += [record for result in results.values() for record in result.records]
    return records
