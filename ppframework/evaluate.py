"""``ppf eval``: the paper's protocol as one command (docs/evaluation.md).

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

import csv
import io
import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ppframework.api import build_pipeline, calibration_history
from ppframework.config import MethodConfig, RunConfig
from ppframework.devices import input_device
from ppframework.errors import ConfigError
from ppframework.formatting import format_number as _fmt
from ppframework.frontier import FrontierReport, analyse_frontier, format_frontier
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
    mean_top1,
    measure_fidelity,
    plan_fidelity,
)
from ppframework.harness import LmEvalPlan, plan_lm_eval, run_lm_eval
from ppframework.history import HistoryStore
from ppframework.metrics.efficiency import accuracy_prr, prr, prr_ratio
from ppframework.metrics.memory import PeakMemory, format_bytes
from ppframework.metrics.noise import NOISE_ADVICE, RatioSpread, ratio_spread, speedup_unresolved
from ppframework.metrics.perplexity import evaluate_perplexity
from ppframework.metrics.runtime import DecoderTimer
from ppframework.metrics.timing import timed
from ppframework.models import load_model, load_model_kwargs
from ppframework.outputs import (
    atomic_path,
    atomic_write_text,
    remove_partial_results,
    results_stem,
    write_json,
)
from ppframework.pipeline import Pipeline
from ppframework.preflight import preflight
from ppframework.runner import (
    environment,
    eval_batches,
    pipeline_flops,
    resolved_settings,
    warmup_phrase,
    window_bos_phrase,
)
from ppframework.zeroshot import evaluate_tasks, get_task

logger = logging.getLogger(__name__)


@dataclass
class RuntimeResult:
    """Interleaved timing of one method against dense on the same batch."""

    method_s: list[float] = field(default_factory=list)
    dense_s: list[float] = field(default_factory=list)
    method_decoder_s: list[float] = field(default_factory=list)
    dense_decoder_s: list[float] = field(default_factory=list)
    tokens: int = 0

    @staticmethod
    def _median(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    @property
    def time_ratio(self) -> float:
        """Median method time / median dense time, whole forward."""
        return self._median(self.method_s) / self._median(self.dense_s)

    @property
    def decoder_time_ratio(self) -> float:
        """The same for the decoder layers alone (the LM head is never pruned)."""
        return self._median(self.method_decoder_s) / self._median(self.dense_decoder_s)

    @property
    def pair_ratios(self) -> RatioSpread:
        """Median and quartiles of the per-pair ratios (method / dense of the same pair)."""
        return ratio_spread(self.method_s, self.dense_s)

    @property
    def spread(self) -> float:
        """Interquartile range of the per-pair ratios (0 for fewer than two pairs)."""
        return self.pair_ratios.iqr if len(self.method_s) >= 2 else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Tokens per second of the method (whole forward, median)."""
        return self.tokens / self._median(self.method_s)

    @property
    def dense_tokens_per_s(self) -> float:
        """Tokens per second of dense in the same pairs."""
        return self.tokens / self._median(self.dense_s)


@dataclass
class EvalRow:
    """Everything measured for one method (dense included)."""

    method: str
    target_ratio: float
    layer_ratio: float = 0.0
    #: None when nothing that records decisions ran (perplexity and generation off); dense: 0.
    realised_ratio: float | None = None
    #: the removed weights as a fraction of every parameter of the model (embeddings included).
    realised_ratio_model: float | None = None
    static: bool = False
    perplexity: float | None = None
    accuracy: dict[str, dict[str, float | None]] = field(default_factory=dict)
    mean_acc: float | None = None
    mean_acc_norm: float | None = None
    #: lm-evaluation-harness metrics per task (``acc``, ``acc_norm``, their stderr, ``n_items``, ...).
    lm_eval: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: mean ``acc`` over the harness tasks that report it.
    lm_eval_mean_acc: float | None = None
    #: the forwards the harness ran (rows and width of each, a digest of every row length).
    lm_eval_batches: dict[str, Any] = field(default_factory=dict)
    #: None when not measured (``evaluation.runtime.enabled: false``): shown as ``-``, ``null`` in
    #: results.json, no plot point; dense's is 1 when the runtime was measured.
    time_ratio: float | None = None
    #: interquartile range of the per-pair time ratios (method / dense of one interleaved pair).
    time_ratio_spread: float | None = None
    #: first and third quartile of the per-pair time ratios (the error bar of the runtime axis).
    time_ratio_q25: float | None = None
    time_ratio_q75: float | None = None
    #: True when the spread is at least the runtime reduction it reports (metrics/noise.py): the
    #: time ratio, PRR and PRR ratios of this row are then flagged, not presented as a finding.
    runtime_unresolved: bool = False
    decoder_time_ratio: float | None = None
    median_forward_s: float | None = None
    tokens_per_s: float | None = None
    flops: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: int | None = None
    prr: float | None = None
    accuracy_prr: float | None = None
    prr_ratios: dict[str, float] = field(default_factory=dict)
    accuracy_prr_ratios: dict[str, float] = field(default_factory=dict)
    generation: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: ``evaluation.fidelity``: top-1 and KL per prompt set, continuation perplexity per corpus and the
    #: mean top-1 (:func:`ppframework.generation.fidelity_eval.measure_fidelity`); None when not measured.
    fidelity: dict[str, Any] | None = None

    @property
    def ideal_time_ratio(self) -> float | None:
        """FLOPs-implied ratio of the whole forward (pruned + probe + LM head over dense); 1 for dense,
        None when the FLOPs were not counted (perplexity off)."""
        if "ideal_ratio_whole" in self.flops:
            return float(self.flops["ideal_ratio_whole"])
        return 1.0 if self.method == "dense" else None


@dataclass
class EvalReport:
    """The rows, the settings that produced them, and where the plots went."""

    rows: list[EvalRow]
    settings: dict[str, Any]
    calibration: dict[str, Any] | None
    environment: dict[str, Any]
    elapsed_s: float
    baselines: list[str]
    plots: list[str] = field(default_factory=list)
    #: False in the partial reports written after each method while the evaluation is still going.
    complete: bool = True
    #: One record per generated completion (method, task, item, text, score), for generations.jsonl.
    generations: list[dict[str, Any]] = field(default_factory=list)
    #: The efficiency frontier (``evaluation.frontier``), when it ran.
    frontier: FrontierReport | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (derived ratios included)."""
        rows = []
        for row in self.rows:
            item = asdict(row)
            item["ideal_time_ratio"] = row.ideal_time_ratio
            rows.append(item)
        return {
            "rows": rows,
            "baselines": self.baselines,
            "settings": self.settings,
            "calibration": self.calibration,
            "environment": self.environment,
            "elapsed_s": self.elapsed_s,
            "plots": self.plots,
            "complete": self.complete,
            "frontier": self.frontier.to_json() if self.frontier is not None else None,
        }


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


def default_baselines(methods: list[MethodConfig], static: dict[str, bool]) -> list[str]:
    """Every static method of the run (by label)."""
    return [m.label for m in methods if static.get(m.label)]


def time_against_dense(
    model: nn.Module,
    layers: nn.ModuleList,
    pipe: Pipeline,
    batch: torch.Tensor,
    repeats: int,
    warmup: int,
    progress: bool = False,
    desc: str = "runtime",
) -> RuntimeResult:
    """Interleaved timing: dense and ``pipe`` alternate (A B, B A, ...) on the same batch.

    Attaching/detaching happens outside the timed region; each timed call is synchronised on
    CUDA. ``warmup`` untimed calls of each come first.
    """
    device = input_device(model)
    ids = batch.to(device)
    result = RuntimeResult(tokens=int(ids.numel()))

    def forward() -> Any:
        return model(input_ids=ids, use_cache=False)

    def one(pruned: bool, record: bool) -> None:
        if pruned:
            pipe.attach()
        else:
            pipe.detach()
        with DecoderTimer(layers, device) as timer:
            _, seconds = timed(forward, device)
        if record:
            (result.method_s if pruned else result.dense_s).append(seconds)
            decoder = timer.seconds[-1] if timer.seconds else float("nan")
            (result.method_decoder_s if pruned else result.dense_decoder_s).append(decoder)

    with torch.inference_mode():
        for _ in range(warmup):
            one(False, False)
            one(True, False)
        for r in tqdm(range(repeats), desc=desc, unit="pair", disable=not progress):
            order = (False, True) if r % 2 == 0 else (True, False)
            for pruned in order:
                one(pruned, True)
    pipe.detach()
    return result


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


def make_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of ``model`` (through its adapter)."""
    from ppframework.adapters import get_adapter

    return get_adapter(model).layers


def add_efficiency(rows: list[EvalRow], baselines: list[str]) -> None:
    """Fill PRR (perplexity and accuracy) and the ratios ``PRR_baseline / PRR_method``.

    Ratios are taken against every baseline of the run that has the same target ratio as the
    method (the paper compares PP 40% with FLAP 40%).
    """
    dense = rows[0]
    accuracy = accuracy_source(rows)
    for row in rows[1:]:
        if row.time_ratio is None:  # runtime not measured: no PRR
            continue
        if row.perplexity is not None and dense.perplexity is not None:
            row.prr = prr(row.perplexity, dense.perplexity, row.time_ratio, 1.0)
        if accuracy is not None and getattr(row, accuracy) is not None:
            row.accuracy_prr = accuracy_prr(
                getattr(row, accuracy), getattr(dense, accuracy), row.time_ratio, 1.0
            )
    by_label = {r.method: r for r in rows}
    for row in rows[1:]:
        for name in baselines:
            base = by_label.get(name)
            if base is None or base is row or not math.isclose(base.target_ratio, row.target_ratio):
                continue
            if row.prr is not None and base.prr is not None:
                row.prr_ratios[name] = prr_ratio(base.prr, row.prr)
            if row.accuracy_prr is not None and base.accuracy_prr is not None:
                row.accuracy_prr_ratios[name] = prr_ratio(base.accuracy_prr, row.accuracy_prr)


def accuracy_source(rows: list[EvalRow]) -> str | None:
    """The mean accuracy the accuracy PRR and plot use: the built-in scorer's ``mean_acc`` when it ran,
    else the harness's ``lm_eval_mean_acc``; None when dense has neither."""
    if not rows:
        return None
    for name in ("mean_acc", "lm_eval_mean_acc"):
        if getattr(rows[0], name) is not None:
            return name
    return None




def _ratios(
    ratios: dict[str, float], row: EvalRow | None = None, by_label: dict[str, EvalRow] | None = None
) -> str:
    """``vs <baseline>: <PRR ratio>`` cells; a comparison built on an unresolved runtime (the row's or
    the baseline's) reads ``noise``, one where the method is not faster ``not faster``."""
    by_label = by_label or {}
    cells = []
    for name, value in ratios.items():
        base = by_label.get(name)
        if row is not None and (row.runtime_unresolved or (base is not None and base.runtime_unresolved)):
            cells.append(f"vs {name}: {_NOISE_MARK} noise")
        elif row is not None and row.time_ratio is not None and row.time_ratio >= 1.0:
            cells.append(f"vs {name}: not faster")
        else:
            cells.append(f"vs {name}: {_fmt(value, '.2f')}")
    return "; ".join(cells) or "-"


_NOISE_MARK = "\u26a0"


def _prr_cell(row: EvalRow, value: float | None) -> str:
    """A PRR, or why there is none: ``noise`` (spread >= the speed-up), ``not faster``."""
    if value is None:
        return "-"
    if row.runtime_unresolved:
        return f"{_NOISE_MARK} noise"
    if row.time_ratio is not None and row.time_ratio >= 1.0:
        return "not faster"
    return _fmt(value)


def _time_cell(row: EvalRow) -> str:
    """``ratio (IQR)``, flagged when unresolved; ``-`` when the runtime was not measured."""
    if row.time_ratio is None:
        return "-"
    cell = f"{row.time_ratio:.3f} ({_fmt(row.time_ratio_spread)})"
    return cell + f" {_NOISE_MARK}" if row.runtime_unresolved else cell


def noise_note(rows: list[EvalRow]) -> list[str]:
    """Markdown lines naming every row whose runtime comparison is unresolved, with advice."""
    flagged = [r for r in rows if r.runtime_unresolved]
    if not flagged:
        return []
    items = "; ".join(
        f"{r.method}: time ratio {r.time_ratio:.3f}, IQR {r.time_ratio_spread:.3f} vs a difference of "
        f"{abs(1.0 - r.time_ratio):.3f} from dense"
        for r in flagged
    )
    return ["", f"{_NOISE_MARK} unresolved runtime ({items}): {NOISE_ADVICE}. Their PRR and PRR ratios are "
            "withheld here (results.json keeps the raw values with runtime_unresolved = true)."]


def settings_block(report: EvalReport) -> str:
    """One paragraph with every setting the figures depend on."""
    s = report.settings
    r, d, c, ev = s["resolved"], s["data"], s["calibration"], s["evaluation"]
    zs, rt = ev["zeroshot"], ev["runtime"]
    parts = [
        f"model {s['model']['name']} ({r['dtype']}, {r['device']})",
        f"perplexity: {d['name']}/{d['split']}, seq_len {d['seq_len']}, batch {d['batch_size']}, "
        f"{d['window_policy']} windows{window_bos_phrase(d)}, {r['scored_batches']} scored batch(es) after "
        f"{warmup_phrase(d)}",
        f"calibration {c['dataset']} x {c['n_samples']} windows",
        f"seed {s['seed']}",
    ]
    if zs["enabled"]:
        limit = f"first {zs['limit']} items per task" if zs["limit"] else "all items"
        max_len = r.get("zeroshot_max_length")
        parts.append(
            f"zero-shot: {len(zs['tasks'])} tasks, {limit}, batch {zs['batch_size']}, item order, "
            f"inputs up to {max_len if max_len else 'any number of'} tokens"
        )
    le, le_run = ev.get("lm_eval", {}), r.get("lm_eval")
    if le.get("enabled") and le_run:
        limit = f"first {le['limit']} docs per task" if le["limit"] else "all docs"
        shots = "task default" if le["num_fewshot"] is None else le["num_fewshot"]
        parts.append(
            f"lm-eval {le_run['version']}: {len(le['tasks'])} tasks ({len(le_run['local_tasks'])} from local "
            f"files), {limit}, few-shot {shots}, batch {le['batch_size']} over the length-sorted requests of "
            f"all tasks, inputs up to {le_run['max_length']} tokens"
        )
    if rt["enabled"]:
        parts.append(
            f"runtime: {rt['repeats']} interleaved dense/method pairs after {rt['warmup']} warm-up, "
            f"on one {d['batch_size']} x {d['seq_len']} batch"
        )
    return "; ".join(parts)


def format_eval_table(report: EvalReport) -> str:
    """The results as markdown: main table, per-task accuracy, notes."""
    lines = [
        settings_block(report),
        "",
        "| method | ratio | realised (decoder / model) | perplexity | mean acc | mean acc_norm "
        "| time ratio (IQR) | decoder time ratio | FLOPs-ideal ratio | probe FLOPs | tokens/s | peak memory "
        "| PRR | PRR_base / PRR | acc PRR_base / PRR |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_label = {r.method: r for r in report.rows}
    for row in report.rows:
        name = row.method + (" (static)" if row.static else "")
        probe = _fmt(row.flops.get("probe_share"), ".2%") if row.flops else "-"
        lines.append(
            f"| {name} | {row.target_ratio:.2f} "
            f"| {_fmt(row.realised_ratio)} / {_fmt(row.realised_ratio_model)} "
            f"| {_fmt(row.perplexity)} "
            f"| {_fmt(row.mean_acc, '.4f')} | {_fmt(row.mean_acc_norm, '.4f')} "
            f"| {_time_cell(row)} | {_fmt(row.decoder_time_ratio)} "
            f"| {_fmt(row.ideal_time_ratio)} | {probe} | {_fmt(row.tokens_per_s, '.1f')} "
            f"| {format_bytes(row.peak_memory_bytes)} | {_prr_cell(row, row.prr)} "
            f"| {_ratios(row.prr_ratios, row, by_label)} "
            f"| {_ratios(row.accuracy_prr_ratios, row, by_label)} |"
        )
    lines += noise_note(report.rows)
    tasks = list(report.rows[0].accuracy)
    if tasks:
        lines += ["", "| method | " + " | ".join(tasks) + " | mean |", "|---|" + "---|" * (len(tasks) + 1)]
        for row in report.rows:
            cells = [
                f"{row.accuracy[t]['acc']:.4f} / {_fmt(row.accuracy[t]['acc_norm'], '.4f')}" for t in tasks
            ]
            mean = f"{_fmt(row.mean_acc, '.4f')} / {_fmt(row.mean_acc_norm, '.4f')}"
            lines.append(f"| {row.method} | " + " | ".join(cells) + f" | {mean} |")
        lines += [
            "",
            "built-in scorer: cells are acc / acc_norm, as the stock lm-evaluation-harness tasks define them "
            "(acc_norm divides by the choice's length in characters; BoolQ and WinoGrande report acc only, "
            "so mean acc_norm averages the other tasks)."
            + (_HELLASWAG_NOTE if "hellaswag" in tasks else ""),
        ]
    if report.frontier is not None:
        lines += format_frontier(report.frontier)
    lines += lm_eval_table(report)
    lines += generation_table(report)
    lines += fidelity_table(report)
    lines += [
        "",
        "realised = fraction of the decoder's prunable projection weights removed / the same weights as a "
        "fraction of every parameter of the model, embeddings included. "
        "time ratio = median method forward / median dense forward over interleaved pairs on the same batch "
        "(whole model, LM head included); decoder time ratio = the same for the decoder layers alone. "
        "FLOPs-ideal ratio = (pruned + probe + LM head) / dense FLOPs of the whole forward. "
        "PRR = (ppl - ppl_dense) / (1 - time ratio), lower is better; PRR_base / PRR > 1 means the method "
        "loses less quality per unit of runtime saved than that baseline (same target ratio). "
        "peak memory: CUDA max allocated, or the process's peak RSS on CPU (a lifetime high-water mark).",
    ]
    if report.plots:
        lines += ["", "plots: " + ", ".join(report.plots)]
    if not report.complete:
        lines += ["", "(partial results: the evaluation has not finished; PRR and plots come at the end)"]
    return "\n".join(lines)


_HELLASWAG_NOTE = (
    " HellaSwag: the local copy lacks ctx_a/ctx_b/activity_label, so its prompts keep the copy's lower-case "
    "start of ctx_b where the stock task capitalises it; not comparable digit for digit with hub numbers."
)


_LM_EVAL_SCORES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("acc", "acc_norm"), "acc / acc_norm"),
    (("pass@1",), "pass@1"),
    (("rouge1", "rouge2", "rougeL"), "R-1 / R-2 / R-L"),
)
"""Score families of lm-eval tasks: the metrics a cell shows (when the task reports the first) and their
header; other tasks show every metric the harness reports."""


def _lm_eval_scores(metrics: dict[str, Any]) -> tuple[list[str], str]:
    """The metric names of one lm-eval task's cell and their header label."""
    for names, label in _LM_EVAL_SCORES:
        if names[0] in metrics:
            return [n for n in names if n in metrics], label
    other = [k for k in metrics if k != "n_items" and "_stderr" not in k]
    return other, " / ".join(other)


def _lm_eval_header(task: str, rows: list[EvalRow]) -> str:
    """``task`` (acc tasks), or ``task`` and its metrics (``humaneval pass@1``, ``xsum R-1 / R-2 / R-L``)."""
    metrics = next((r.lm_eval[task] for r in rows if r.lm_eval.get(task)), {})
    names, label = _lm_eval_scores(metrics)
    return task if not names or names[0] == "acc" else f"{task} {label}"


def _lm_eval_cell(metrics: dict[str, Any]) -> str:
    names, _ = _lm_eval_scores(metrics)
    if not names:
        return "-"
    cell = " / ".join(_fmt(metrics[n], ".4f") for n in names)
    if names[0] == "pass@1" and "n_items" in metrics:
        cell += f" ({metrics['n_items']})"
    return cell


def lm_eval_table(report: EvalReport) -> list[str]:
    """Markdown lines of the lm-evaluation-harness tasks (none when they did not run).

    Each cell shows the task's score family: acc / acc_norm (acc alone where the task has no acc_norm),
    pass@1 with the number of items (HumanEval, MBPP), ROUGE-1 / 2 / L F1 (XSum), or every metric the
    harness reports for any other task; mean acc averages the tasks that report acc.
    """
    tasks = list(report.rows[0].lm_eval) if report.rows else []
    if not tasks:
        return []
    headers = [_lm_eval_header(t, report.rows) for t in tasks]
    lines = [
        "",
        "| method (lm-eval) | " + " | ".join(headers) + " | mean acc | forwards |",
        "|---|" + "---|" * (len(tasks) + 2),
    ]
    for row in report.rows:
        cells = [_lm_eval_cell(row.lm_eval.get(task, {})) for task in tasks]
        forwards = row.lm_eval_batches.get("forwards", "-")
        mean = _fmt(row.lm_eval_mean_acc, ".4f")
        lines.append(f"| {row.method} | " + " | ".join(cells) + f" | {mean} | {forwards} |")
    le_run = report.settings.get("resolved", {}).get("lm_eval") or {}
    local = sorted(le_run.get("local_tasks", {}))
    generative = [t for t in tasks if t in ("humaneval", "mbpp", "xsum") and t in local]
    lines += [
        "",
        f"lm-evaluation-harness {le_run.get('version', '?')} (HFLM around the live model, pipeline "
        "attached): cells are acc / acc_norm where the task reports acc_norm; mean acc over the tasks that "
        f"report acc. Local-file tasks: {', '.join(local) or 'none'}; the others are stock hub tasks. The "
        "harness batches the length-sorted requests of all tasks together, so a dynamic method decides "
        "on other batches than in the built-in scorer (docs/evaluation.md)."
        + (_HELLASWAG_NOTE if "hellaswag" in local else "")
        + (_LM_EVAL_GENERATION_NOTE if generative else ""),
    ]
    return lines


_LM_EVAL_GENERATION_NOTE = (
    " Generation tasks (greedy generate_until, model.generate()): pass@1 = share of items whose completion "
    "passes its tests in ppframework's sandbox (n items in brackets), ROUGE F1 with stemming; prompts, "
    "post-processing and scoring are the built-in generation tasks', but the harness batches the prompts "
    "sorted by length (docs/evaluation.md); forwards counts log-likelihood forwards only."
)


def _main_metric(task: str) -> str:
    return "rougeL" if task == "xsum" else "pass@1"


def generation_table(report: EvalReport) -> list[str]:
    """Markdown lines of the generation tasks (none when they did not run)."""
    tasks = list(report.rows[0].generation) if report.rows else []
    if not tasks:
        return []
    header = "| method | " + " | ".join(
        f"{t} {'R-1 / R-2 / R-L' if t == 'xsum' else 'pass@1'} | {t} decode tok/s (ratio) | {t} prefill s"
        for t in tasks
    )
    lines = ["", header + " |", "|---|" + "---|---|---|" * len(tasks)]
    for row in report.rows:
        cells = []
        for task in tasks:
            g = row.generation.get(task)
            if g is None:
                cells += ["-", "-", "-"]
                continue
            m = g["metrics"]
            quality = (
                f"{m['rouge1']:.4f} / {m['rouge2']:.4f} / {m['rougeL']:.4f}"
                if task == "xsum"
                else f"{_fmt(m.get('pass@1'), '.4f')} ({g['n_items']})"
            )
            tps = f"{_fmt(g['decode_tokens_per_s'], '.1f')} ({_fmt(g['decode_tps_ratio'], '.3f')})"
            cells += [quality, tps, _fmt(g["prefill_s"], ".2f")]
        lines.append(f"| {row.method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "generation: greedy model.generate() with the KV cache, prompts in input order, left padding, batch "
        f"{report.settings['evaluation']['generation']['batch_size']}; pass@1 = share of items whose program "
        "passes its tests in the sandbox (n items in brackets); ROUGE F1 with stemming. decode tok/s = new "
        "tokens after each row's first / decode seconds, ratio = method / dense on the same task (batches "
        "end when their last row stops, so it depends on the lengths generated); prefill s = total prompt "
        "forwards, the method's decision included.",
    ]
    return lines


def fidelity_table(report: EvalReport) -> list[str]:
    """Markdown lines of the measures without future tokens (none when they did not run): top-1 and KL
    per prompt set, their mean top-1, continuation perplexity per corpus."""
    measured = [r.fidelity for r in report.rows if r.fidelity is not None]
    if not measured:
        return []
    sets = list(dict.fromkeys(name for f in measured for name in f["prompt_sets"]))
    corpora = list(dict.fromkeys(name for f in measured for name in f["continuation_perplexity"]))
    header = (
        [f"{name} top-1 / KL" for name in sets]
        + (["mean top-1"] if sets else [])
        + [f"{name} cont. ppl" for name in corpora]
    )
    lines = ["", "| method | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for row in report.rows:
        fid = row.fidelity or {}
        cells = []
        for name in sets:
            scores = (fid.get("prompt_sets") or {}).get(name)
            cells.append(
                "-" if scores is None else f"{_fmt(scores['top1'], '.4f')} / {_fmt(scores['kl'], '.5f')}"
            )
        if sets:
            cells.append(_fmt(mean_top1(fid), ".4f"))
        for name in corpora:
            ppl = (fid.get("continuation_perplexity") or {}).get(name)
            cells.append("-" if ppl is None else _fmt(ppl["perplexity"], ".3f"))
        lines.append(f"| {row.method} | " + " | ".join(cells) + " |")
    plan = report.settings.get("resolved", {}).get("fidelity") or {}
    prompts = ", ".join(f"{n} {k}" for n, k in (plan.get("prompts") or {}).items()) or "none"
    batch, new_tokens = plan.get("batch_size", "?"), plan.get("new_tokens", "?")
    lines += [
        "",
        "measures without future tokens (docs/evaluation.md): the method decides on the prompt alone (a "
        f"batch of {batch} left-padded prompts per decision; prompts: {prompts}) and the dense model's "
        f"greedy continuation (up to {new_tokens} tokens, to the first EOS) is teacher-forced under that "
        "decision; top-1 = share of tokens where the method's argmax is the dense token, KL = mean "
        "KL(dense || method) per token in nats; mean top-1 averages the prompt sets. "
        f"cont. ppl: windows of {plan.get('window_len', '?')} tokens, {plan.get('window_batch', '?')} per "
        f"decision made on the first {plan.get('prefix_len', '?')}, perplexity of the rest.",
    ]
    return lines


EVAL_CSV_COLUMNS: tuple[str, ...] = (
    "method",
    "target_ratio",
    "realised_ratio",
    "realised_ratio_model",
    "static",
    "perplexity",
    "mean_acc",
    "mean_acc_norm",
    "time_ratio",
    "time_ratio_spread",
    "time_ratio_q25",
    "time_ratio_q75",
    "runtime_unresolved",
    "decoder_time_ratio",
    "ideal_time_ratio",
    "probe_flops_share",
    "tokens_per_s",
    "peak_memory_bytes",
    "prr",
    "accuracy_prr",
    "lm_eval_mean_acc",
)


def _csv_row(row: EvalRow) -> dict[str, Any]:
    out = {k: v for k, v in asdict(row).items() if k in EVAL_CSV_COLUMNS}
    out["ideal_time_ratio"] = row.ideal_time_ratio
    unmeasured = 0.0 if row.method == "dense" else None  # dense probes nothing; a method: not counted
    out["probe_flops_share"] = row.flops.get("probe_share") if row.flops else unmeasured
    for task, values in row.accuracy.items():
        out[f"acc_{task}"] = values["acc"]
        if values.get("acc_norm") is not None:
            out[f"acc_norm_{task}"] = values["acc_norm"]
    for task, metrics in row.lm_eval.items():
        for metric, value in metrics.items():
            out[f"lm_eval_{task}_{metric}"] = value
    for name, value in row.prr_ratios.items():
        out[f"prr_ratio_vs_{name}"] = value
    for task, g in row.generation.items():
        for metric, value in g["metrics"].items():
            out[f"gen_{task}_{metric}"] = value
        for key in ("decode_tokens_per_s", "decode_tps_ratio", "prefill_s", "n_items"):
            out[f"gen_{task}_{key}"] = g[key]
    if row.fidelity is not None:
        out["fid_mean_top1"] = mean_top1(row.fidelity)
        for name, scores in row.fidelity["prompt_sets"].items():
            out[f"fid_{name}_top1"] = None if scores is None else scores["top1"]
            out[f"fid_{name}_kl"] = None if scores is None else scores["kl"]
        for name, ppl in row.fidelity["continuation_perplexity"].items():
            out[f"cont_ppl_{name}"] = None if ppl is None else ppl["perplexity"]
    return out


def generations_file(stem: str) -> str:
    """The name of the completions file beside ``<stem>.json``."""
    return "generations.jsonl" if stem == "results" else f"{stem}.generations.jsonl"


def write_eval_report(
    report: EvalReport, out_dir: str | Path, plot: Callable[..., Path] | None = None, plots: bool = True
) -> Path:
    """Write results.json (strict JSON: NaN/inf as null), results.csv, results.md and the PNG plots
    into ``out_dir``, each file atomically (a temporary file in the folder, then ``os.replace``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = results_stem(out, report.complete)  # a partial report never replaces complete results
    if plots and report.settings["evaluation"]["plot"]:
        report.plots = write_plots(report, out, plot)
    path = write_json(out / f"{stem}.json", report.to_json())
    rows = [_csv_row(r) for r in report.rows]
    columns = list(EVAL_CSV_COLUMNS) + sorted({k for r in rows for k in r} - set(EVAL_CSV_COLUMNS))
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / f"{stem}.csv", buffer.getvalue())
    atomic_write_text(out / f"{stem}.md", format_eval_table(report) + "\n")
    if report.generations:
        lines = [json.dumps(record, ensure_ascii=False) for record in report.generations]
        atomic_write_text(out / generations_file(stem), "\n".join(lines) + "\n")
    if report.complete:
        remove_partial_results(out)
    return path


def _runtime_point(row: EvalRow, method: str, value: float | None) -> dict[str, Any]:
    """A plot point on the measured-runtime axis, with its spread and noise flag."""
    return {
        "method": method,
        "ratio": row.target_ratio,
        "time_ratio": row.time_ratio,
        "value": value,
        "time_q25": row.time_ratio_q25,
        "time_q75": row.time_ratio_q75,
        "unresolved": row.runtime_unresolved,
    }


def write_plots(report: EvalReport, out: Path, plot: Callable[..., Path] | None = None) -> list[str]:
    """Perplexity (and mean accuracy) against runtime reduction, one marker per method and ratio."""
    if plot is None:
        from ppframework.plotting import plot_quality_vs_speed as plot
    written = []

    def draw(points: list[dict[str, Any]], name: str, *args: Any, **kwargs: Any) -> Path:
        target = out / name
        with atomic_path(target) as tmp:  # a crash mid-plot never leaves a broken PNG behind
            plot(points, tmp, *args, **kwargs)
        return target

    def family(row: EvalRow) -> str:
        return row.method.rsplit(" ", 1)[0] if row.method != "dense" else "dense"

    timed = [r for r in report.rows if r.time_ratio is not None]  # an unmeasured runtime has no point
    if len(timed) > 1 and all(r.perplexity is not None for r in timed):
        points = [_runtime_point(r, family(r), r.perplexity) for r in timed]
        path = draw(points, "perplexity_vs_runtime.png", "perplexity", "perplexity vs runtime", log_y=True)
        written.append(str(path))
    accuracy = accuracy_source(report.rows)
    if accuracy is not None and len(timed) > 1 and all(getattr(r, accuracy) is not None for r in timed):
        points = [_runtime_point(r, family(r), getattr(r, accuracy)) for r in timed]
        ylabel = "mean zero-shot accuracy" + (" (lm-eval)" if accuracy == "lm_eval_mean_acc" else "")
        path = draw(points, "accuracy_vs_runtime.png", ylabel, "accuracy vs runtime")
        written.append(str(path))
    for task in report.rows[0].generation if report.rows else {}:
        metric = _main_metric(task)
        points = []
        for r in report.rows:
            g = r.generation.get(task)
            if g is None or not g.get("decode_tps_ratio"):
                continue
            points.append(
                {
                    "method": family(r),
                    "ratio": r.target_ratio,
                    "time_ratio": 1.0 / g["decode_tps_ratio"],
                    "value": g["metrics"][metric],
                }
            )
        if len(points) == len(report.rows):
            path = draw(points, f"{task}_vs_decode_runtime.png", f"{task} {metric}", f"{task} vs decode time")
            written.append(str(path))
    # The generation frontier: a row without a measured time (or without fidelity) has no point.
    faithful = [r for r in timed if mean_top1(r.fidelity) is not None]
    if len(faithful) > 1 and faithful[0].method == "dense":
        from ppframework.plotting import plot_fidelity_vs_runtime

        points = [_runtime_point(r, family(r), mean_top1(r.fidelity)) for r in faithful]
        target = out / "fidelity_vs_runtime.png"
        with atomic_path(target) as tmp:
            plot_fidelity_vs_runtime(points, tmp)
        written.append(str(target))
    return written
