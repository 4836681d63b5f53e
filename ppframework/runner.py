"""``ppf run``: dense vs each configured method on the same batches, in one process."""

from __future__ import annotations

import csv
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ppframework import data as data_mod
from ppframework.api import build_pipeline, calibration_history, load_eval_text
from ppframework.config import RunConfig
from ppframework.history import HistoryStore
from ppframework.metrics.flops import FlopsCounter, FlopsReport
from ppframework.metrics.perplexity import PerplexityResult, evaluate_perplexity
from ppframework.models import load_model
from ppframework.pipeline import Pipeline

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


@dataclass
class RunReport:
    """Everything ``ppf run`` measured, with the settings that produced it."""

    rows: list[MethodResult]
    settings: dict[str, Any]
    calibration: dict[str, Any] | None
    environment: dict[str, Any]
    elapsed_s: float

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {
            "rows": [asdict(r) for r in self.rows],
            "settings": self.settings,
            "calibration": self.calibration,
            "environment": self.environment,
            "elapsed_s": self.elapsed_s,
        }


def eval_batches(cfg: RunConfig, tokenizer: Any, text: str | None = None) -> list[torch.Tensor]:
    """The evaluation windows of ``cfg.data`` cut into fixed-size batches."""
    d = cfg.data
    if text is None:
        text = data_mod.load_corpus_text(d.name, d.split, d.data_dir)
    ids = data_mod.tokenize_text(text, tokenizer)
    windows = data_mod.make_windows(ids, d.seq_len, d.window_policy, cfg.seed)
    batches = data_mod.batched(windows, d.batch_size)
    return batches[: d.max_batches] if d.max_batches else batches


def _row(
    label: str,
    ratio: float,
    layer_ratio: float,
    realised: float,
    result: PerplexityResult,
    dense: PerplexityResult,
    flops: FlopsReport | None = None,
    static: bool = False,
) -> MethodResult:
    dense_s = dense.median_seconds
    return MethodResult(
        method=label,
        target_ratio=ratio,
        layer_ratio=layer_ratio,
        realised_ratio=realised,
        perplexity=result.perplexity,
        median_forward_s=result.median_seconds,
        time_ratio=result.median_seconds / dense_s if dense_s else float("nan"),
        batch_seconds=result.batch_seconds,
        delta_perplexity=result.perplexity - dense.perplexity,
        probe_flops_share=flops.probe_share if flops else 0.0,
        ideal_time_ratio=flops.ideal_ratio_whole if flops else 1.0,
        static=static,
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


def run(cfg: RunConfig, *, progress: bool | None = None) -> RunReport:
    """Evaluate dense and every method of ``cfg`` on the same batches; see :class:`RunReport`."""
    progress = cfg.progress if progress is None else progress
    start = time.perf_counter()
    text = load_eval_text(cfg)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(
        cfg.model.name,
        dtype=cfg.model.dtype,
        device=cfg.model.device,
        gguf_file=cfg.model.gguf_file,
        cache_dir=cfg.model.cache_dir,
    )
    batches = eval_batches(cfg, tokenizer, text)
    warmup = cfg.data.warmup_batches
    dense = evaluate_perplexity(model, batches, warmup_batches=warmup, progress=progress, desc="dense")
    rows = [_row("dense", 0.0, 0.0, 0.0, dense, dense)]
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
            result = evaluate_perplexity(
                model, batches, warmup_batches=warmup, progress=progress, desc=method.label
            )
        flops = pipeline_flops(pipe, warmup) if not pipe.is_dense else None
        rows.append(
            _row(
                method.label,
                method.pruning.ratio,
                pipe.layer_ratio,
                pipe.realised_ratio(warmup),
                result,
                dense,
                flops,
                pipe.is_static,
            )
        )
    settings = resolved_settings(cfg, model, batches)
    return RunReport(rows, settings, calibration_info, environment(model), time.perf_counter() - start)


def resolved_settings(cfg: RunConfig, model: torch.nn.Module, batches: list[torch.Tensor]) -> dict[str, Any]:
    """The config as run, plus what it resolved to (device, dtype, batch counts, data folder)."""
    param = next(model.parameters())
    settings = cfg.model_dump(mode="json")
    settings["resolved"] = {
        "device": str(param.device),
        "dtype": str(param.dtype),
        "n_batches": len(batches),
        "scored_batches": len(batches) - cfg.data.warmup_batches,
        "tokens_per_batch": int(batches[0].numel()),
        "data_dir": str(data_mod.resolve_data_dir(cfg.data.data_dir)),
    }
    return settings


def environment(model: torch.nn.Module) -> dict[str, Any]:
    """Software and hardware the figures were measured on."""
    device = next(model.parameters()).device
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
        f"seq_len {d['seq_len']}, batch {d['batch_size']}, {d['window_policy']} windows, "
        f"{r['scored_batches']} scored batch(es) after {d['warmup_batches']} warm-up (not scored); "
        f"calibration {c['dataset']} x {c['n_samples']} windows; seed {s['seed']}",
        "",
        "| method | target ratio | per-layer ratio | realised ratio | perplexity | Δ ppl vs dense "
        "| forward s (median) | time ratio | FLOPs-ideal ratio | probe FLOPs share |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report.rows:
        kind = " (static)" if row.static else ""
        lines.append(
            f"| {row.method}{kind} | {row.target_ratio:.2f} | {row.layer_ratio:.2f} "
            f"| {row.realised_ratio:.3f} | {row.perplexity:.3f} | {row.delta_perplexity:+.3f} "
            f"| {row.median_forward_s:.3f} "
            f"| {row.time_ratio:.3f} | {row.ideal_time_ratio:.3f} | {row.probe_flops_share:.2%} |"
        )
    if s.get("note"):
        lines += ["", f"note: {s['note']}"]
    lines += [
        "",
        "realised ratio = fraction of all decoder attention+MLP projection weights removed, mean over "
        "scored batches (skipped layers and dense key/value heads included in the total). "
        "time ratio = median forward time / dense's, whole model incl. the unpruned LM head, timed "
        "sequentially in this process. FLOPs-ideal ratio = (pruned + probe + LM head FLOPs) / dense "
        "FLOPs of the whole forward; probe FLOPs share = probe FLOPs / dense decoder FLOPs.",
    ]
    return "\n".join(lines)


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
)


def write_csv(report: RunReport, path: str | Path) -> Path:
    """One row per method with :data:`CSV_COLUMNS`."""
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in report.rows:
            writer.writerow(asdict(row))
    return path


def write_report(report: RunReport, out_dir: str | Path) -> Path:
    """Write ``results.json``, ``results.csv`` and ``results.md`` into ``out_dir``; return the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(report.to_json(), indent=2))
    write_csv(report, out / "results.csv")
    (out / "results.md").write_text(format_table(report) + "\n")
    return path
