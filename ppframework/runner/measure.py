"""A method's row from what its run measured: its perplexity, its timing and the FLOPs its pipeline ran."""

from __future__ import annotations

from typing import Any

from ppframework.metrics.flops import FlopsCounter, FlopsReport
from ppframework.metrics.perplexity import PerplexityResult
from ppframework.pipeline import Pipeline
from ppframework.pipeline.record import BlockEvent
from ppframework.runner.results import MethodResult


def method_row(
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
    """The results-table row of ``label`` from its perplexity ``result``, against dense's perplexity and
    median forward time."""
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
    counted from the shapes it actually used.

    Under ``decision: sequence`` every row of a batch ran its pruned layers alone (its events carry
    their ``row``), so each row is counted as its own ``1 x length`` forward: its pruned blocks at
    their kept shapes, its probe, and the layers it did not report (the unpruned ones) dense."""
    groups: dict[tuple[int, int | None], list[BlockEvent]] = {}
    for event in pipe.record.events:
        if event.batch >= skip_batches:
            groups.setdefault((event.batch, event.row), []).append(event)
    counter = FlopsCounter.from_adapter(pipe.adapter)
    for events in groups.values():
        counter.begin_batch(events[0].batch_size, events[0].seq_len)
        for event in events:
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
