"""``ppf run``: dense vs each configured method on the same batches, in one process.

The whole run is checked first (:func:`ppframework.preflight.preflight`), before the model loads.
With ``cfg.out_dir`` set, the folder is locked for the run and the results so far are written
(atomically) after dense and after every method, so an interrupted run keeps its finished rows. A
method that raises is recorded as a failed row (:attr:`MethodResult.error`) and the others still run.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from typing import Any

import torch

from ppframework.api import build_pipeline, calibration_history
from ppframework.config import RunConfig
from ppframework.history import HistoryStore
from ppframework.metrics.perplexity import evaluate_perplexity
from ppframework.models import load_model, load_model_kwargs
from ppframework.outputs import hold_out_dir
from ppframework.preflight import preflight
from ppframework.runner.measure import method_row, pipeline_flops
from ppframework.runner.points import (
    PointKeys,
    PointStore,
    load_dense,
    load_method,
    save_dense,
    save_method,
    sweep_summary,
)
from ppframework.runner.report import try_write_report
from ppframework.runner.results import MethodResult, RunReport
from ppframework.runner.settings import environment, eval_batches, resolved_settings

logger = logging.getLogger(__name__)


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
            resolved settings (:mod:`ppframework.runner.points`); points already there are reused
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
        row = method_row("dense", 0.0, 0.0, 0.0, result, result.perplexity, result.median_seconds)
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
            row = method_row(
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
            row.dense_prefill = pipe.dense_prefill and not pipe.is_dense
            return row
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



def describe_error(exc: BaseException, limit: int | None = None) -> str:
    """``Type: message`` of ``exc`` on one line (whitespace collapsed), cut to ``limit`` characters of
    message when given (a failed row's error)."""
    text = " ".join(str(exc).split())
    if limit is not None:
        text = text[:limit]
    return f"{type(exc).__name__}: {text}"


