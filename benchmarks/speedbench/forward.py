"""The whole-forward speed benchmark: interleaved timed forwards of the unmodified model, the ratio-0
pipeline, ``pp`` (and its probe-token, ``--dynamic`` and ablation variants) and the static baselines at
each ratio, with peak memory, PP's per-batch stage profile, the optional operator profile and the
FLOPs-implied ideal of each variant; :func:`run_forward` returns the report
(:mod:`speedbench.forward_report` writes its tables)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

from ppframework.adapters import get_adapter
from ppframework.calibration import calibrate
from ppframework.metrics.flops import FlopsCounter
from ppframework.metrics.memory import PeakMemory
from ppframework.metrics.op_profile import OpProfile, profile_ops_by_stage
from ppframework.metrics.runtime import DecoderTimer, TimingStats, time_interleaved
from ppframework.metrics.stage_profile import StageProfiler
from ppframework.pipeline import Pipeline
from ppframework.runner import pipeline_flops

from .costs import reused_flops
from .methods import ablation_variants, method, statics, variant
from .run_info import log, runtime_settings, workload_settings
from .stats import add_paired_overhead, realisation, safe_ratio
from .workloads import DEFAULTS, build_model, setup


def run_forward(args: argparse.Namespace) -> dict[str, Any]:
    """Run the whole-forward benchmark described by ``args``; returns the JSON report."""
    _, _, batch, seq = DEFAULTS[args.workload]
    args.batch = args.batch or batch
    args.seq = args.seq or seq
    device, dtype, round_to, skip = setup(args)
    variants = ablation_variants(args)  # checked before any heavy work

    start = time.perf_counter()
    model, description = build_model(args, device, dtype)
    adapter = get_adapter(model)
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(device)
    calib = [
        torch.randint(0, vocab, (args.batch, args.seq), generator=gen) for _ in range(args.calib_batches)
    ]
    history = calibrate(model, adapter, calib, progress=False)
    setup_s = time.perf_counter() - start
    log(f"model ready ({description}, {args.device}, {args.dtype}) and calibrated in {setup_s:.1f} s")

    pipes: dict[str, Pipeline | None] = {"dense": None}
    pipes["pipeline ratio 0"] = Pipeline(model, method("pp", 0.0, skip, round_to))
    for ratio in args.ratios:
        pipes[f"pp {ratio:.0%}"] = Pipeline(
            model, method("pp", ratio, skip, round_to), history=history.clone()
        )
        for seq_ratio in args.probe_seq_ratios:
            pipes[f"pp probe-tokens {seq_ratio:g} {ratio:.0%}"] = Pipeline(
                model, method("pp", ratio, skip, round_to, seq_ratio), history=history.clone()
            )
        for dynamic in args.dynamic:
            pipes[f"{dynamic} {ratio:.0%}"] = Pipeline(
                model, method(dynamic, ratio, skip, round_to), history=history.clone()
            )
        for name, override in variants.items():
            pipes[f"{name} {ratio:.0%}"] = Pipeline(
                model, variant(override, ratio, skip, round_to), history=history.clone()
            )
        for static in statics(args):
            static_method = method(static, ratio, skip, round_to)
            hist = history if static_method.needs_calibration else None  # frozen: shared, never updated
            pipes[f"{static} {ratio:.0%}"] = Pipeline(model, static_method, history=hist)
    if args.reuse_probe != "auto":
        for pipe in pipes.values():
            if pipe is not None:
                pipe.reuse_probe = args.reuse_probe == "on"

    timers = {name: DecoderTimer(adapter.layers, device) for name in pipes}

    def forward(name: str) -> Callable[[], None]:
        pipe, timer = pipes[name], timers[name]

        def call() -> None:
            with pipe if pipe is not None else nullcontext(), timer:
                model(input_ids=ids, use_cache=False)

        return call

    tokens = args.batch * args.seq
    with torch.inference_mode():
        stats = time_interleaved(
            {name: forward(name) for name in pipes},
            repeats=args.repeats,
            warmup=args.warmup,
            device=device,
            tokens=tokens,
        )
        decoder = {
            name: TimingStats(name, timer.seconds[args.warmup :], tokens=tokens)
            for name, timer in timers.items()
        }
        log("timed: " + ", ".join(f"{n} {s.median:.3f}s" for n, s in stats.items()))
        memory = {}
        for name in pipes:
            with PeakMemory(device) as mem:
                forward(name)()
            memory[name] = mem.as_dict()
        profiles: dict[str, dict[str, dict[str, float]]] = {}
        for name, pipe in pipes.items():
            if pipe is None or pipe.is_dense or pipe.is_static:
                continue  # static methods do no per-batch work
            profiler = StageProfiler(device, timing=args.profile_timing).attach(pipe)
            for _ in range(args.profile_forwards):
                forward(name)()
            profiler.detach(pipe)
            profiles[name] = {
                "stages": profiler.per_forward(args.profile_forwards),
                "overhead": profiler.overhead(args.profile_forwards),
            }
        op_profiles: dict[str, OpProfile] = {}
        if args.op_profile:
            for name, pipe in pipes.items():
                if pipe is not None and not pipe.is_dense and not pipe.is_static:
                    op_profiles[name] = profile_ops_by_stage(pipe, forward(name), args.op_profile)

    counter = FlopsCounter.from_adapter(adapter)
    dense_decoder_flops = counter.dense_decoder_flops(args.batch, args.seq)
    lm_head_flops = counter.lm_head_flops(args.batch, args.seq)
    dense_whole = stats["dense"].median
    dense_decoder = decoder["dense"].median
    rows = []
    for name, pipe in pipes.items():
        whole_ratio = safe_ratio(stats[name].median, dense_whole)
        decoder_ratio = safe_ratio(decoder[name].median, dense_decoder)
        row: dict[str, Any] = {
            "variant": name,
            "method": "unmodified model" if pipe is None else (pipe.method.name or "pp"),
            "target_ratio": 0.0 if pipe is None else pipe.method.pruning.ratio,
            "layer_ratio": 0.0 if pipe is None else pipe.layer_ratio,
            "static": bool(pipe is not None and pipe.is_static),
            "whole": {**stats[name].to_dict(), "ratio": whole_ratio},
            "decoder": {**decoder[name].to_dict(), "ratio": decoder_ratio},
            "tokens_per_s": stats[name].tokens_per_s(),
            "memory": memory[name],
        }
        if pipe is None or pipe.is_dense:
            pruned, probe, reused, realised = dense_decoder_flops, 0, 0, 0.0
        else:
            report = pipeline_flops(pipe, skip_batches=1)
            batches = max(report.batches, 1)
            pruned, probe = report.pruned / batches, report.probe / batches
            reused = reused_flops(pipe, 1) / batches
            realised = pipe.realised_ratio(1)
        ideal_decoder = pruned / dense_decoder_flops
        ideal_whole = (pruned + lm_head_flops) / (dense_decoder_flops + lm_head_flops)
        row.update(
            realised_ratio=realised,
            flops={
                "dense_decoder": dense_decoder_flops,
                "lm_head": lm_head_flops,
                "pruned_decoder": pruned,
                "probe": probe,
                "probe_reused": reused,
            },
            probe_flops_share=probe / dense_decoder_flops,
            probe_net_flops_share=(probe - reused) / dense_decoder_flops,
            ideal_ratio_decoder=ideal_decoder,
            ideal_ratio_whole=ideal_whole,
            ideal_ratio_decoder_with_probe=(pruned + probe - reused) / dense_decoder_flops,
            realisation_decoder=realisation(decoder_ratio, ideal_decoder),
            realisation_whole=realisation(whole_ratio, ideal_whole),
        )
        if name in profiles:
            prof = profiles[name]
            row["stages_s"] = prof["stages"]
            row["overhead_s"] = prof["overhead"]
            row["overhead_share_of_dense_decoder"] = {
                group: seconds / dense_decoder for group, seconds in prof["overhead"].items()
            }
            # The full pass skips what it reuses from the probe; valued at the dense decoder's speed.
            row["overhead_share_net_of_reuse"] = (
                row["overhead_share_of_dense_decoder"]["total"] - reused / dense_decoder_flops
            )
            row["gather_buffer_bytes"] = pipe.buffers.nbytes if pipe is not None else 0
        if name in op_profiles:
            row["op_profile"] = op_profiles[name].to_dict()
            row["op_profile_markdown"] = op_profiles[name].to_markdown(top=6, dense_s=dense_decoder)
        rows.append(row)
    add_paired_overhead(rows, dense_decoder)

    settings = {
        **workload_settings(args, description, model, device),
        "batch": args.batch,
        "seq": args.seq,
        "ratios": args.ratios,
        "static": ", ".join(args.static),
        "skip_layers": skip,
        "round_to": round_to,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "profile_forwards": args.profile_forwards,
        "profile_timing": args.profile_timing,
        "op_profile_forwards": args.op_profile,
        "calibration": (
            f"{args.calib_batches} random-token batch(es) of {args.batch} x {args.seq} (speed only)"
        ),
        "reuse_probe": args.reuse_probe,
        **runtime_settings(args),
    }
    return {"settings": settings, "rows": rows, "elapsed_s": time.perf_counter() - start}
