"""``ppf run``: dense vs each configured method on the same batches, in one process.

The whole run is checked first (:func:`ppframework.preflight.preflight`), before the model loads.
With ``cfg.out_dir`` set, the folder is locked for the run and the results so far are written
(atomically) after dense and after every method, so an interrupted run keeps its finished rows. A
method that raises is recorded as a failed row (:attr:`MethodResult.error`) and the others still run.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import platform
import time
from contextlib import nullcontext
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ppframework import data as data_mod
from ppframework.adapters import get_adapter
from ppframework.api import build_pipeline, calibration_history
from ppframework.config import RunConfig
from ppframework.devices import input_device
from ppframework.errors import ConfigError
from ppframework.history import HistoryStore
from ppframework.metrics.flops import FlopsCounter, FlopsReport
from ppframework.metrics.perplexity import PerplexityResult, evaluate_perplexity
from ppframework.models import load_model, load_model_kwargs
from ppframework.outputs import (
    atomic_write_text,
    hold_out_dir,
    remove_partial_results,
    results_stem,
    write_json,
)
from ppframework.pipeline import Pipeline
from ppframework.preflight import preflight
from ppframework.sweep.points import PointKeys, PointStore, sweep_summary

logger = logging.getLogger(__name__)


@dataclass
class MethodResult:
    """One row of the results table."""

    method: str
    target_ratio: float
    layer_ratio: float
    realised_ratio: float
    perplexity: float
    median_forward_s: float
    time_ratio: float
    batch_seconds: list[float] = field(default_factory=list)
    delta_perplexity: float = 0.0
    probe_flops_share: float = 0.0
    ideal_time_ratio: float = 1.0
    static: bool = False
    error: str | None = None
    """Why the method failed (its measurements are then NaN, ``null`` in results.json), or None."""
    min_block_ratio: float = 0.0
    """The smallest ratio ``allocate`` gave a pruned block (``layer_ratio`` under ``uniform``)."""
    max_block_ratio: float = 0.0
    """The largest ratio ``allocate`` gave a pruned block."""
    realised_ratio_model: float = 0.0
    """The removed weights as a fraction of the whole model's parameters (embeddings included)."""

    @property
    def time_below_ideal(self) -> bool:
        """The single sequential timing came out below the FLOPs-ideal ratio: not physically a
        speed-up the pruning can give, so it is noise (flagged ``(!)`` in the table)."""
        t, ideal = self.time_ratio, self.ideal_time_ratio
        return not self.error and math.isfinite(t) and math.isfinite(ideal) and t < ideal

    @classmethod
    def failed(cls, label: str, ratio: float, error: str) -> MethodResult:
        """The row of a method that raised ``error``."""
        nan = float("nan")
        return cls(
            label, ratio, nan, nan, nan, nan, nan, delta_perplexity=nan, ideal_time_ratio=nan, error=error
        )


@dataclass
class RunReport:
    """Everything ``ppf run`` measured, with the settings that produced it.

    ``complete`` is False in the partial reports written while the run is still going.
    """

    rows: list[MethodResult]
    settings: dict[str, Any]
    calibration: dict[str, Any] | None
    environment: dict[str, Any]
    elapsed_s: float
    complete: bool = True
    sweep: dict[str, Any] | None = None
    """How the points ran: the launcher, the point store and which points were reused from it."""

    @property
    def failures(self) -> list[MethodResult]:
        """The rows of methods that failed."""
        return [row for row in self.rows if row.error]

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (non-finite numbers are written as ``null`` by :func:`write_report`)."""
        return {
            "rows": [{**asdict(r), "time_below_ideal": r.time_below_ideal} for r in self.rows],
            "settings": self.settings,
            "calibration": self.calibration,
            "environment": self.environment,
            "elapsed_s": self.elapsed_s,
            "complete": self.complete,
            "failed": [row.method for row in self.failures],
            "sweep": self.sweep,
        }


def eval_batches(
    cfg: RunConfig, tokenizer: Any, text: str | None = None, ids: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """The evaluation windows of ``cfg.data`` cut into fixed-size batches (``ids``: the text's
    token ids when already tokenised, e.g. by the preflight check)."""
    d = cfg.data
    if ids is None:
        if text is None:
            text = data_mod.load_corpus_text(d.name, d.split, d.data_dir)
        ids = data_mod.tokenize_text(text, tokenizer)
    windows = data_mod.make_windows(ids, d.seq_len, d.window_policy, cfg.seed)
    if d.window_bos:
        windows = data_mod.start_with_bos(windows, tokenizer)
    batches = data_mod.batched(windows, d.batch_size)
    return batches[: d.max_batches] if d.max_batches else batches


def _row(
    label: str,
    ratio: float,
    layer_ratio: float,
    realised: float,
    result: PerplexityResult,
    dense_perplexity: float,
    dense_seconds: float,
    flops: FlopsReport | None = None,
    static: bool = False,
    block_ratios: dict[Any, float] | None = None,
    realised_model: float = 0.0,
) -> MethodResult:
    ratios = list((block_ratios or {}).values()) or [layer_ratio]
    return MethodResult(
        method=label,
        target_ratio=ratio,
        layer_ratio=layer_ratio,
        realised_ratio=realised,
        perplexity=result.perplexity,
        median_forward_s=result.median_seconds,
        time_ratio=result.median_seconds / dense_seconds if dense_seconds else float("nan"),
        batch_seconds=result.batch_seconds,
        delta_perplexity=result.perplexity - dense_perplexity,
        probe_flops_share=flops.probe_share if flops else 0.0,
        ideal_time_ratio=flops.ideal_ratio_whole if flops else 1.0,
        static=static,
        min_block_ratio=min(ratios),
        max_block_ratio=max(ratios),
        realised_ratio_model=realised_model,
    )


def pipeline_flops(pipe: Pipeline, skip_batches: int = 0) -> FlopsReport:
    """Decoder, probe and LM-head FLOPs of the batches ``pipe`` ran (after ``skip_batches``),
    counted from the shapes it actually used."""
    counter = FlopsCounter.from_adapter(pipe.adapter)
    current = None
    for event in pipe.record.events:
        if event.batch < skip_batches:
            continue
        if event.batch != current:
            counter.begin_batch(event.batch_size, event.seq_len)
            current = event.batch
        counter.add_block(
            event.kind,
            event.batch_size,
            event.seq_len,
            event.kept_units,
            event.kept_kv_heads,
            event.probe_rows,
            event.probe_tokens,
            layer=event.layer,
        )
    return counter.report()


def run(
    cfg: RunConfig,
    *,
    progress: bool | None = None,
    method_fields: list[str] | None = None,
    extra_settings: dict[str, Any] | None = None,
    store: PointStore | None = None,
    rerun: bool = False,
) -> RunReport:
    """Evaluate dense and every method of ``cfg`` on the same batches; see :class:`RunReport`.

    Args:
        cfg: the validated run config; with ``cfg.out_dir`` the folder is locked during the run and
            partial results are written into it after every method.
        progress: show progress bars (default ``cfg.progress``).
        method_fields: how to name each method in error messages (an ablation passes
            ``variants.<name> ...``; default ``methods[i]``).
        extra_settings: merged into the report's settings (e.g. the ablation's points).
        store: where every finished point (dense and each method) is kept under the key of its
            resolved settings (:mod:`ppframework.sweep.points`); points already there are reused
            instead of run again (``ppf ablate`` resumes this way).
        rerun: with ``store``, run every point again (and overwrite its stored result).

    A method that raises does not stop the run: its row carries the error (see
    :attr:`RunReport.failures`). Configuration problems raise :class:`ConfigError` before the model loads.
    """
    progress = cfg.progress if progress is None else progress
    start = time.perf_counter()
    if store is not None:
        store.check_folder()
    checked = preflight(cfg, method_fields=method_fields)
    with hold_out_dir(cfg.out_dir) if cfg.out_dir else nullcontext():
        session = RunSession(cfg, progress=progress, text=checked.text, ids=checked.eval_ids)
        return _run(cfg, session, start, extra_settings or {}, store, rerun)


class RunSession:
    """One run config's model, tokenizer, batches and shared calibration, each loaded on first use.

    ``ppf run`` / ``ppf ablate`` use one in-process session; under ``--launcher ray`` every worker
    holds one (:mod:`ppframework.sweep.ray_launcher`), so both evaluate a point with the same code.
    """

    def __init__(
        self,
        cfg: RunConfig,
        *,
        progress: bool = False,
        text: str | None = None,
        ids: torch.Tensor | None = None,
    ) -> None:
        self.cfg = cfg
        self.progress = progress
        self._text, self._ids = text, ids
        self.model: Any = None
        self.tokenizer: Any = None
        self.batches: list[torch.Tensor] = []
        self._calibration: HistoryStore | None = None
        self.calibration_info: dict[str, Any] | None = None
        self._calibration_error: str | None = None

    def load(self) -> None:
        """Load the model, the tokenizer and the evaluation batches (once)."""
        if self.model is not None:
            return
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.model, self.tokenizer = load_model(cfg.model.name, **load_model_kwargs(cfg.model))
        self.batches = eval_batches(cfg, self.tokenizer, self._text, self._ids)
        self._text = self._ids = None

    def dense(self) -> tuple[MethodResult, dict[str, Any], dict[str, Any]]:
        """The dense row, the resolved settings (``resolved`` of :func:`resolved_settings`) and the
        environment."""
        self.load()
        cfg = self.cfg
        result = evaluate_perplexity(
            self.model,
            self.batches,
            warmup_batches=cfg.data.warmup_batches,
            progress=self.progress,
            desc="dense",
            warmup_policy=cfg.data.warmup_policy,
        )
        row = _row("dense", 0.0, 0.0, 0.0, result, result.perplexity, result.median_seconds)
        resolved = resolved_settings(cfg, self.model, self.batches)["resolved"]
        return row, resolved, environment(self.model)

    def calibration(self) -> tuple[HistoryStore, dict[str, Any]]:
        """The shared dense calibration history (computed or read from the cache once) and its info."""
        if self._calibration_error is not None:
            raise RuntimeError(f"the shared calibration failed: {self._calibration_error}")
        if self._calibration is None:
            self.load()
            try:
                self._calibration, self.calibration_info = calibration_history(
                    self.model, self.tokenizer, self.cfg, self.progress
                )
            except Exception as exc:
                self._calibration_error = f"{type(exc).__name__}: {exc}"
                raise
        assert self.calibration_info is not None
        return self._calibration, self.calibration_info

    def use_calibration(self, store: HistoryStore, info: dict[str, Any]) -> None:
        """Use ``store`` (computed elsewhere, e.g. by another worker) as the shared calibration."""
        self._calibration, self.calibration_info, self._calibration_error = store, info, None

    def method(self, index: int, dense: MethodResult) -> MethodResult:
        """The row of ``cfg.methods[index]``, timed against ``dense``; a failure becomes a failed row."""
        cfg = self.cfg
        method = cfg.methods[index]
        warmup = cfg.data.warmup_batches
        try:
            self.load()
            history = self.calibration()[0].clone() if method.needs_calibration else None
            pipe = build_pipeline(
                self.model, cfg, method_index=index, tokenizer=self.tokenizer, history=history
            )
            with pipe:
                result = evaluate_perplexity(
                    self.model,
                    self.batches,
                    warmup_batches=warmup,
                    progress=self.progress,
                    desc=method.label,
                    warmup_policy=cfg.data.warmup_policy,
                    untracked=pipe.untracked,
                )
            flops = pipeline_flops(pipe, warmup) if not pipe.is_dense else None
            return _row(
                method.label,
                method.pruning.ratio,
                pipe.layer_ratio,
                pipe.realised_ratio(warmup),
                result,
                dense.perplexity,
                dense.median_forward_s,
                flops,
                pipe.is_static,
                pipe.block_ratios,
                pipe.realised_ratio_model(warmup),
            )
        except Exception as exc:  # one method's failure must not lose the others' results
            message = describe_error(exc)
            logger.error("method %s failed: %s", method.label, message)
            logger.info("traceback of %s's failure", method.label, exc_info=True)
            return MethodResult.failed(method.label, method.pruning.ratio, message)


def _run(
    cfg: RunConfig,
    session: RunSession,
    start: float,
    extra_settings: dict[str, Any],
    store: PointStore | None,
    rerun: bool,
) -> RunReport:
    keys = PointKeys.of(cfg)
    reuse = store is not None and not rerun
    stored_dense = load_dense(store, keys.dense) if reuse and store else None
    if stored_dense is not None:
        dense, resolved, env = stored_dense
        logger.info("dense: reusing the stored result %s", keys.dense)
    else:
        dense, resolved, env = session.dense()
        if store is not None:
            save_dense(store, keys, dense, resolved, env)
    rows = [dense]
    resumed: list[str] = ["dense"] if stored_dense is not None else []
    settings = {**cfg.model_dump(mode="json"), "resolved": resolved, **extra_settings}
    stored_calibration: dict[str, Any] | None = None

    def report(complete: bool) -> RunReport:
        elapsed = time.perf_counter() - start
        calibration = session.calibration_info or stored_calibration
        sweep = sweep_summary("local", store, resumed)
        return RunReport(list(rows), settings, calibration, env, elapsed, complete, sweep)

    def save_partial() -> None:
        if cfg.out_dir:
            try_write_report(report(complete=False), cfg.out_dir)

    save_partial()
    for index, method in enumerate(cfg.methods):
        stored = load_method(store, keys.methods[index]) if reuse and store else None
        if stored is not None:
            row, calibration_info = stored
            stored_calibration = stored_calibration or calibration_info
            resumed.append(method.label)
            logger.info("%s: reusing the stored result %s", method.label, keys.methods[index])
        else:
            row = session.method(index, dense)
            if store is not None:
                info = session.calibration_info if method.needs_calibration else None
                save_method(store, keys, index, row, info)
        rows.append(row)
        save_partial()
    final = report(complete=True)
    if cfg.out_dir:
        try_write_report(final, cfg.out_dir)
    return final


def try_write_report(report: RunReport, out_dir: str | Path) -> None:
    """:func:`write_report`, logging instead of raising when the folder cannot be written (the run
    goes on; the command line reports the final write's failure itself)."""
    try:
        write_report(report, out_dir)
    except OSError as exc:
        what = "the results" if report.complete else "partial results"
        logger.warning("could not write %s to %s: %s", what, out_dir, exc)


def describe_error(exc: BaseException, limit: int | None = None) -> str:
    """``Type: message`` of ``exc`` on one line (whitespace collapsed), cut to ``limit`` characters of
    message when given (a failed row's error)."""
    text = " ".join(str(exc).split())
    if limit is not None:
        text = text[:limit]
    return f"{type(exc).__name__}: {text}"


def save_dense(
    store: PointStore, keys: PointKeys, row: MethodResult, resolved: dict[str, Any], env: dict[str, Any]
) -> None:
    """Store the dense point with what a resumed run needs to rebuild its report."""
    record = {"row": asdict(row), "resolved": resolved, "environment": env}
    store.try_save(keys.dense, record, keys.settings[keys.dense])


def load_dense(
    store: PointStore, key: str
) -> tuple[MethodResult, dict[str, Any], dict[str, Any]] | None:
    """The stored dense row, resolved settings and environment, or None (damaged records: logged)."""
    record = store.load(key)
    if record is None:
        return None
    try:
        row = _row_from_json(record["row"])
        for name in ("resolved", "environment"):
            if not isinstance(record.get(name), dict):
                raise DamagedRecord(name, f"expected a mapping, got {_shown(record.get(name))}")
    except DamagedRecord as exc:
        logger.warning("stored point %s is damaged (%s); running the point again", store.path(key), exc)
        return None
    return row, dict(record["resolved"]), dict(record["environment"])


def save_method(
    store: PointStore, keys: PointKeys, index: int, row: MethodResult, calibration: dict[str, Any] | None
) -> None:
    """Store method ``index``'s row (failed rows too: they show in the table, and are run again)."""
    key = keys.methods[index]
    store.try_save(key, {"row": asdict(row), "calibration": calibration}, keys.settings[key])


def load_method(store: PointStore, key: str) -> tuple[MethodResult, dict[str, Any] | None] | None:
    """A stored successful method row and its calibration info, or None."""
    record = store.load(key)
    if record is None:
        return None
    try:
        row = _row_from_json(record["row"])
        calibration = record.get("calibration")
        if calibration is not None and not isinstance(calibration, dict):
            raise DamagedRecord("calibration", f"expected a mapping or null, got {_shown(calibration)}")
    except DamagedRecord as exc:
        logger.warning("stored point %s is damaged (%s); running the point again", store.path(key), exc)
        return None
    return row, calibration


class DamagedRecord(ValueError):
    """A stored point's field does not hold what :class:`MethodResult` needs there."""

    def __init__(self, field_name: str, problem: str) -> None:
        self.field = field_name
        super().__init__(f"{field_name}: {problem}")


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_ROW_CHECKS: dict[str, tuple[Any, str]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "str | None": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "float": (lambda v: v is None or _is_number(v), "a number or null"),
    "list[float]": (
        lambda v: isinstance(v, list) and all(x is None or _is_number(x) for x in v),
        "a list of numbers",
    ),
}
"""What a stored row's field may hold, by the field's annotation in :class:`MethodResult`."""


def _row_from_json(data: Any) -> MethodResult:
    """A :class:`MethodResult` read back from JSON (``null`` numbers become NaN again), checked field
    by field.

    Raises:
        DamagedRecord: naming the first field (``row.<name>``) that is missing, unknown or of the
            wrong type.
    """
    if not isinstance(data, dict):
        raise DamagedRecord("row", f"expected a mapping, got {_shown(data)}")
    known = {f.name: f for f in fields(MethodResult)}
    for name in data:
        if name not in known:
            raise DamagedRecord(f"row.{name}", "not a field of a result row")
    values: dict[str, Any] = {}
    for name, spec in known.items():
        if name not in data:
            if spec.default is MISSING and spec.default_factory is MISSING:
                raise DamagedRecord(f"row.{name}", "missing")
            continue
        value = data[name]
        accepts, expected = _ROW_CHECKS[str(spec.type)]
        if not accepts(value):
            raise DamagedRecord(f"row.{name}", f"expected {expected}, got {_shown(value)}")
        if spec.type == "float":
            value = float("nan") if value is None else float(value)
        elif spec.type == "list[float]":
            value = [float("nan") if x is None else float(x) for x in value]
        values[name] = value
    return MethodResult(**values)


def window_bos_phrase(data: dict[str, Any]) -> str:
    """What ``data.window_bos`` does to each window, for settings lines (empty when off)."""
    return " (each BOS + seq_len - 1 text tokens)" if data.get("window_bos") else ""


def warmup_phrase(data: dict[str, Any]) -> str:
    """How the warm-up ran, for settings lines (``data`` is the dumped ``data`` section)."""
    n = data["warmup_batches"]
    if data.get("warmup_policy") == "untracked":
        return f"{n} untracked warm-up batch(es) (history unchanged; those batches scored again after)"
    return f"{n} warm-up batch(es) (not scored)"


def scored_batches(cfg: RunConfig, n_batches: int) -> int:
    """Batches that count in the perplexity under ``data.warmup_policy``."""
    return n_batches if cfg.data.warmup_policy == "untracked" else n_batches - cfg.data.warmup_batches


def resolved_settings(cfg: RunConfig, model: torch.nn.Module, batches: list[torch.Tensor]) -> dict[str, Any]:
    """The config as run, plus what it resolved to (device, dtype, batch counts, data folder)."""
    param = next(model.parameters())
    settings = cfg.model_dump(mode="json")
    settings["resolved"] = {
        "device": str(input_device(model)),
        "dtype": str(param.dtype),
        "n_batches": len(batches),
        "scored_batches": scored_batches(cfg, len(batches)),
        "tokens_per_batch": int(batches[0].numel()),
        "data_dir": str(data_mod.resolve_data_dir(cfg.data.data_dir)),
        "parameters": _parameter_counts(model),
    }
    return settings


def _parameter_counts(model: torch.nn.Module) -> dict[str, int] | None:
    try:
        return get_adapter(model).parameter_counts()
    except ConfigError:  # an unsupported family: the methods will say so
        return None


def _parameter_split(resolved: dict[str, Any]) -> str:
    """``decoder 106.2M, embeddings 28.3M, other 0.0M of 134.5M parameters`` (from resolved settings)."""
    counts = resolved.get("parameters")
    if not counts:
        return "parameter counts not recorded"
    parts = ", ".join(f"{k} {counts[k] / 1e6:.1f}M" for k in ("decoder", "embeddings", "other"))
    return f"{parts} of {counts['model'] / 1e6:.1f}M parameters"


def environment(model: torch.nn.Module) -> dict[str, Any]:
    """Software and hardware the figures were measured on."""
    device = input_device(model)
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def format_table(report: RunReport) -> str:
    """The results as a markdown table, with the settings line that produced them."""
    s = report.settings
    r, d, c = s["resolved"], s["data"], s["calibration"]
    lines = [
        f"model {s['model']['name']} ({r['dtype']}, {r['device']}); data {d['name']}/{d['split']}, "
        f"seq_len {d['seq_len']}, batch {d['batch_size']}, "
        f"{d['window_policy']} windows{window_bos_phrase(d)}, "
        f"{r['scored_batches']} scored batch(es) after {warmup_phrase(d)}; "
        f"calibration {c['dataset']} x {c['n_samples']} windows; seed {s['seed']}",
        "",
        "| method | target ratio | per-layer ratio | realised ratio (decoder / model) | perplexity "
        "| Δ ppl vs dense | forward s (median) | time ratio (1 sequential pass) | FLOPs-ideal ratio "
        "| probe FLOPs share |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report.rows:
        kind = " (static)" if row.static else ""
        if row.error:
            lines.append(f"| {row.method} | {row.target_ratio:.2f} | - | - | FAILED | - | - | - | - | - |")
            continue
        lines.append(
            f"| {row.method}{kind} | {row.target_ratio:.2f} | {_layer_ratio_cell(row)} "
            f"| {row.realised_ratio:.3f} / {row.realised_ratio_model:.3f} | {row.perplexity:.3f} "
            f"| {row.delta_perplexity:+.3f} "
            f"| {row.median_forward_s:.3f} "
            f"| {row.time_ratio:.3f}{' (!)' if row.time_below_ideal else ''} | {row.ideal_time_ratio:.3f} "
            f"| {row.probe_flops_share:.2%} |"
        )
    for row in report.failures:
        lines += ["", f"FAILED {row.method}: {row.error}"]
    lines += [
        "",
        "time ratio (1 sequential pass): every method was timed once, one after another, with no spread; "
        "not a speed-up measurement (`ppf eval` times interleaved dense/method pairs with their IQR).",
    ]
    if any(row.time_below_ideal for row in report.rows):
        lines.append("(!) below the FLOPs ideal: noise, not a result.")
    if not report.complete:
        lines += ["", "(partial results: the run has not finished)"]
    if s.get("note"):
        lines += ["", f"note: {s['note']}"]
    lines += [
        "",
        "per-layer ratio = the ratio each pruned block is given (min-max when the allocation gives "
        "blocks different ratios, as adaptive FLAP does). "
        "realised ratio = fraction of all decoder attention+MLP projection weights removed, mean over "
        "scored batches (skipped layers and dense key/value heads included in the total); / model = the "
        "same weights as a fraction of every parameter of the model, embeddings included "
        f"({_parameter_split(r)}). "
        "time ratio = median forward time / dense's, whole model incl. the unpruned LM head, timed "
        "sequentially in this process. FLOPs-ideal ratio = (pruned + probe + LM head FLOPs) / dense "
        "FLOPs of the whole forward; probe FLOPs share = probe FLOPs / dense decoder FLOPs.",
    ]
    return "\n".join(lines)


def _layer_ratio_cell(row: MethodResult) -> str:
    """``0.44``, or ``0.21-0.74`` when the blocks were given different ratios."""
    low, high = row.min_block_ratio, row.max_block_ratio
    if math.isfinite(low) and math.isfinite(high) and high - low > 1e-9:
        return f"{low:.2f}-{high:.2f}"
    return f"{row.layer_ratio:.2f}"


CSV_COLUMNS: tuple[str, ...] = (
    "method",
    "target_ratio",
    "layer_ratio",
    "realised_ratio",
    "perplexity",
    "delta_perplexity",
    "median_forward_s",
    "time_ratio",
    "ideal_time_ratio",
    "probe_flops_share",
    "static",
    "error",
    "min_block_ratio",
    "max_block_ratio",
    "realised_ratio_model",
)


def _csv_value(value: Any) -> Any:
    return "" if isinstance(value, float) and not math.isfinite(value) else value


def write_csv(report: RunReport, path: str | Path) -> Path:
    """One row per method with :data:`CSV_COLUMNS` (non-finite numbers left empty), written atomically."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in report.rows:
        writer.writerow({key: _csv_value(value) for key, value in asdict(row).items()})
    return atomic_write_text(path, buffer.getvalue())


def write_report(report: RunReport, out_dir: str | Path) -> Path:
    """Write ``results.json`` (strict JSON: NaN/inf as null), ``results.csv`` and ``results.md`` into
    ``out_dir``, each atomically; return the JSON path.

    A partial report never replaces complete results: while ``results.json`` holds a finished run it
    goes to ``results.partial.*`` beside them instead (:func:`ppframework.outputs.results_stem`), and
    a complete report removes those.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = results_stem(out, report.complete)
    path = write_json(out / f"{stem}.json", report.to_json())
    write_csv(report, out / f"{stem}.csv")
    atomic_write_text(out / f"{stem}.md", format_table(report) + "\n")
    if report.complete:
        remove_partial_results(out)
    return path
