"""Speed benchmark: turn the pruning ratio into wall-clock savings.

Times, interleaved in one process after warm-up, the unmodified model, the pipeline at ratio 0,
Probe Pruning (``pp`` preset) and one static baseline at each ratio, and reports for each variant:
median forward time (whole model and decoder layers alone), ratio to dense, the FLOPs-implied ideal
ratio, the realisation ``(1 - measured ratio) / (1 - ideal ratio)``, PP's per-batch overhead by
stage as a share of the dense decoder time, tokens per second and peak memory. Writes
``speed.json`` and ``speed.md`` into ``--out``. See ``benchmarks/README.md``.

``--generation`` times ``model.generate`` instead (greedy, KV cache, a fixed number of new tokens):
prefill seconds and decode tokens per second, separately, at each ``--gen-batches`` size, for dense,
``pp`` and the static baselines, interleaved; with the decode step's kept-weight (bytes) ideal
speed-up and the share of it measured, and PP's per-generate overhead (its prefill against the
static baseline's at the same ratio).

Workloads (``--workload``):

* ``smollm2``: SmolLM2-135M-Instruct, offline (``ppframework.models.load_model("smollm2-135m")``);
  default CPU, float32, batch 8 x 512.
* ``smollm2-shape``: the same shapes with random weights (no model file needed).
* ``1b``: a LLaMA-shaped model with random weights, hidden 2048, 16 layers, 32 query heads,
  8 key/value heads (head_dim 64), MLP 8192, vocabulary 32000 (LLaMA-3.2-1B's shape with a
  LLaMA-2 vocabulary); default CPU float32, batch 2 x 512 (it fits a CPU run).
* ``7b``: LLaMA-2-7B's shape with random weights, hidden 4096, 32 layers, 32 heads (no GQA),
  MLP 11008, vocabulary 32000; default CUDA float16 at the paper's batch 20 x 1024.
* ``tiny``: the tiny test model (``llama-gqa``), batch 4 x 64, for smoke tests.

Random weights are drawn directly on the target device and dtype (built on the ``meta`` device,
then ``to_empty`` and filled with N(0, 0.02); norms 1). The calibration history comes from a few
random-token batches: it only has to exist for speed (pruning *decisions* on random data are not
meaningful, their *shapes* are what is timed).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ppframework.adapters import get_adapter
from ppframework.calibration import calibrate
from ppframework.config import MethodConfig
from ppframework.history import HistoryStore
from ppframework.metrics.flops import FlopsCounter
from ppframework.metrics.memory import PeakMemory
from ppframework.metrics.op_profile import OpProfile, profile_ops_by_stage
from ppframework.metrics.runtime import DecoderTimer, TimingStats, time_interleaved
from ppframework.metrics.stage_profile import OVERHEAD_GROUPS, StageProfiler
from ppframework.metrics.timing import synchronize
from ppframework.pipeline import BlockEvent, Pipeline
from ppframework.runner import pipeline_flops
from ppframework.types import BlockKind, BlockMask

SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-shape": {
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
    "1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "intermediate_size": 8192,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    "7b": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 128,
        "intermediate_size": 11008,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
}

#: (device, dtype, batch, seq) per workload when not given on the command line.
DEFAULTS: dict[str, tuple[str, str, int, int]] = {
    "smollm2": ("cpu", "float32", 8, 512),
    "smollm2-shape": ("cpu", "float32", 8, 512),
    "1b": ("cpu", "float32", 2, 512),
    "7b": ("cuda", "float16", 20, 1024),
    "tiny": ("cpu", "float32", 4, 64),
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------------ models
def random_llama(
    shape: dict[str, Any], device: torch.device, dtype: torch.dtype, seq: int, seed: int, layers: int | None
) -> nn.Module:
    """A LLaMA model of ``shape`` with N(0, 0.02) weights built directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(shape)
    if layers is not None:
        kwargs["num_hidden_layers"] = layers
    config = LlamaConfig(**kwargs, max_position_embeddings=max(seq, 2048), rms_norm_eps=1e-5)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to(dtype)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.fill_(1.0)  # RMSNorm weights
            else:
                param.normal_(0.0, 0.02, generator=generator)
        rotary = model.model.rotary_emb
        model.model.rotary_emb = type(rotary)(config=config).to(device)  # its buffers were on meta
    model.eval().requires_grad_(False)
    return model


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, str]:
    """The workload's model and a one-line description of it."""
    model, description, _ = build_model_and_tokenizer(args, device, dtype)
    return model, description


def build_model_and_tokenizer(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[nn.Module, str, Any]:
    """The workload's model, a one-line description of it and its tokenizer (None: random weights)."""
    if args.workload == "smollm2":
        from ppframework.models import load_model

        model, tokenizer = load_model("smollm2-135m", dtype=args.dtype, device=str(device))
        if args.layers is not None:
            model.model.layers = model.model.layers[: args.layers]
            model.config.num_hidden_layers = args.layers
        return model, "SmolLM2-135M-Instruct (offline GGUF, dequantised)", tokenizer
    if args.workload == "tiny":
        from ppframework.testing.tiny import tiny_model

        model = tiny_model("llama-gqa", seed=args.seed).to(device=device, dtype=dtype)
        return model, "tiny llama-gqa", None
    shape = SHAPES[args.workload]
    model = random_llama(shape, device, dtype, args.seq, args.seed, args.layers)
    return model, f"{args.workload}-shaped LLaMA, random weights", None


def model_shape(model: nn.Module) -> dict[str, Any]:
    """The shape fields of the model's config (for the report)."""
    cfg = model.config
    keys = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
        "vocab_size",
    )
    return {k: getattr(cfg, k, None) for k in keys}


# ------------------------------------------------------------------------------------------ methods
def method(
    preset: str,
    ratio: float,
    skip_layers: list[int],
    round_to: int,
    probe_seq_ratio: float | None = None,
    decode: str | None = None,
) -> MethodConfig:
    """A preset at ``ratio`` with the benchmark's skipped layers and width rounding; a
    ``probe_seq_ratio`` replaces the residual probe's fraction of positions (a named, result-changing
    option, never the ``pp`` default); ``decode`` sets the decode policy of ``generate`` (None: the
    preset's, ``frozen``)."""
    pruning = {"ratio": ratio, "skip_layers": skip_layers, "round_to": round_to}
    data: dict[str, Any] = {"preset": preset, "pruning": pruning}
    if decode is not None:
        data["decode"] = decode
    if probe_seq_ratio is not None:
        data["name"] = f"pp probe-tokens {probe_seq_ratio:g}"
        params = {"seq_ratio": probe_seq_ratio, "batch_ratio": 0.05}
        data["strategies"] = {"select_probe": {"name": "residual", "params": params}}
    return MethodConfig.model_validate(data)


def ablation_variants(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--variants`` of the ablation file ``--variants-from`` (name -> override), checked."""
    if not args.variants:
        return {}
    if not args.variants_from:
        raise SystemExit("--variants: name the ablation file they come from with --variants-from FILE")
    from ppframework.config import read_config_file

    known = read_config_file(args.variants_from).get("variants") or {}
    missing = [name for name in args.variants if name not in known]
    if missing:
        raise SystemExit(
            f"--variants: {', '.join(missing)} not in {args.variants_from} (it has {', '.join(known)})"
        )
    taken = {"pp", *args.dynamic, *statics(args)} & set(args.variants)
    if taken:
        raise SystemExit(
            f"--variants: {', '.join(sorted(taken))} would share a row label with a variant timed anyway "
            "(pp, --dynamic, --static); leave it out"
        )
    return {name: known[name] for name in args.variants}


def variant(override: Any, ratio: float, skip_layers: list[int], round_to: int) -> MethodConfig:
    """An ablation file's variant on ``pp`` at ``ratio`` with the benchmark's skipped layers and width
    rounding (the ablation's own merge rule, :func:`ppframework.ablation.variant_method`)."""
    from ppframework.ablation import variant_method

    base = {"preset": "pp", "pruning": {"ratio": ratio, "skip_layers": skip_layers, "round_to": round_to}}
    raw = variant_method(base, override)
    raw.setdefault("pruning", {}).update(ratio=ratio, skip_layers=skip_layers, round_to=round_to)
    return MethodConfig.model_validate(raw)


def reused_flops(pipe: Pipeline, skip_batches: int) -> int:
    """FLOPs the full pass did not redo because the probe's exact per-token values were reused."""
    adapter = pipe.adapter
    hidden = int(adapter.config.hidden_size)
    attention = adapter.geometry(BlockKind.ATTENTION)
    total = 0
    event: BlockEvent
    for event in pipe.record.events:
        if event.batch < skip_batches or event.probe_rows == 0:
            continue
        tokens = event.probe_rows * event.probe_tokens
        if event.kind is BlockKind.MLP:
            total += 2 * tokens * hidden * event.kept_units * (adapter.mlp_matrices - 1)
        else:
            width = (event.kept_units + 2 * event.kept_kv_heads) * attention.unit_width
            total += 2 * tokens * hidden * width
    return total


def statics(args: argparse.Namespace) -> list[str]:
    """The static baseline presets of ``--static`` (``none``: no baseline)."""
    return [name for name in args.static if name != "none"]


def _timing_words(settings: dict[str, Any]) -> str:
    """How the stage profile was timed, for the table's caption."""
    if not str(settings["device"]).startswith("cuda"):
        return "host clock"
    if settings.get("profile_timing", "sync") == "events":
        return "CUDA events, unsynchronised"
    return "synchronised per stage"


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _gain_fraction(speedup: float, ideal: float) -> float:
    """``(speedup - 1) / (ideal - 1)``: the share of the ideal speed gain measured (NaN: no ideal gain)."""
    return (speedup - 1.0) / (ideal - 1.0) if ideal > 1.0 else float("nan")


def _realisation(measured: float, ideal: float) -> float:
    return (1.0 - measured) / (1.0 - ideal) if ideal < 1.0 else float("nan")


# ------------------------------------------------------------------------------------------ run
def paired_difference(slower: list[float], faster: list[float], scale: float) -> dict[str, float]:
    """Median and quartiles of ``(slower[r] - faster[r]) / scale`` over the rounds ``r`` that timed
    both (interleaved rounds: a slow spell of the machine hits both calls of a round alike)."""
    diffs = [(a - b) / scale for a, b in zip(slower, faster, strict=True)]
    if not diffs:
        return {"median": float("nan"), "q25": float("nan"), "q75": float("nan"), "rounds": 0}
    q25, q50, q75 = (
        statistics.quantiles(diffs, n=4, method="inclusive") if len(diffs) > 1 else (diffs[0],) * 3
    )
    return {"median": q50, "q25": q25, "q75": q75, "rounds": len(diffs)}


def add_paired_overhead(rows: list[dict[str, Any]], dense_decoder_s: float) -> None:
    """Give every dynamic row its decoder time over each static row with the very same kept shapes
    (same target and realised ratio), paired per round, as shares of the dense decoder time.

    Both run the same sliced full pass, so the difference is what the dynamic method adds per
    batch, net of what its full pass reuses: the direct measure of PP's overhead (the stage
    profile's total minus the reused FLOPs is an estimate of the same thing).
    """
    static_rows = [r for r in rows if r["static"]]
    for row in rows:
        if row["static"] or row["target_ratio"] == 0:  # dense and the ratio-0 pipeline: nothing to pair
            continue
        paired = {}
        for static in static_rows:
            same_shapes = (
                static["target_ratio"] == row["target_ratio"]
                and abs(static["realised_ratio"] - row["realised_ratio"]) < 1e-9
            )
            if same_shapes:
                paired[static["variant"]] = paired_difference(
                    row["decoder"]["seconds"], static["decoder"]["seconds"], dense_decoder_s
                )
        if paired:
            row["over_static_paired"] = paired


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, int, list[int]]:
    """Device, dtype, round_to and skip layers of a run (defaults by device and workload); sets the
    thread count and the seed."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    round_to = args.round_to if args.round_to is not None else (64 if device.type == "cuda" else 8)
    skip = (
        args.skip_layers if args.skip_layers is not None else ([0] if args.workload == "tiny" else [0, 1, 2])
    )
    torch.manual_seed(args.seed)
    return device, dtype, round_to, skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by ``args``; returns the JSON report."""
    device_name, dtype_name, batch, seq = DEFAULTS[args.workload]
    args.device = args.device or device_name
    args.dtype = args.dtype or dtype_name
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
        whole_ratio = _ratio(stats[name].median, dense_whole)
        decoder_ratio = _ratio(decoder[name].median, dense_decoder)
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
            realisation_decoder=_realisation(decoder_ratio, ideal_decoder),
            realisation_whole=_realisation(whole_ratio, ideal_whole),
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
        "workload": args.workload,
        "model": description,
        "shape": model_shape(model),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "dtype": args.dtype,
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
        "threads": torch.get_num_threads(),
        "seed": args.seed,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    return {"settings": settings, "rows": rows, "elapsed_s": time.perf_counter() - start}


# ------------------------------------------------------------------------------------------ generation
def generation_prompts(
    args: argparse.Namespace, tokenizer: Any, vocab: int, device: torch.device
) -> tuple[torch.Tensor, str]:
    """``max(--gen-batches)`` prompts of ``--prompt-len`` tokens, the same for every method: the first
    consecutive windows of the WikiText-2 test text (workloads with a tokenizer), else random tokens.
    Batch ``B`` uses the first ``B`` of them."""
    n, seq = max(args.gen_batches), args.prompt_len
    if tokenizer is not None:
        from ppframework import data as data_mod

        text = data_mod.load_corpus_text("wikitext2", "test", args.data_dir)
        windows = data_mod.make_windows(data_mod.tokenize_text(text, tokenizer), seq, "contiguous")
        if windows.shape[0] < n:
            raise SystemExit(f"WikiText-2 test has only {windows.shape[0]} windows of {seq} tokens")
        source = f"the first {n} consecutive {seq}-token windows of WikiText-2 test"
        return windows[:n].to(device), source
    gen = torch.Generator().manual_seed(args.seed + 1)
    windows = torch.randint(0, vocab, (n, seq), generator=gen)
    return windows.to(device), f"{n} random-token prompts of {seq} tokens"


def generation_history(
    args: argparse.Namespace, model: nn.Module, tokenizer: Any, vocab: int
) -> tuple[HistoryStore, str]:
    """The calibration history: C4 validation windows for a real model (through the library's cached
    calibration, ``seq_len`` >= the prompt length), random tokens for a random-weight one."""
    seq = max(args.calib_seq or args.prompt_len, args.prompt_len)
    if tokenizer is not None:
        from ppframework.api import calibration_history
        from ppframework.config import RunConfig

        cfg = RunConfig.model_validate(
            {
                "model": {"name": "smollm2-135m"},
                "data": {"name": "wikitext2", "seq_len": args.prompt_len, "data_dir": args.data_dir},
                "calibration": {"dataset": "c4", "n_samples": args.calib_samples, "seq_len": seq},
            }
        )
        store, info = calibration_history(model, tokenizer, cfg, progress=False)
        cached = " (from the on-disk cache)" if info["from_cache"] else ""
        return store, f"{args.calib_samples} C4 validation windows of {seq} tokens, seed 0{cached}"
    batch = max(args.gen_batches)
    gen = torch.Generator().manual_seed(args.seed)
    calib = [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(args.calib_batches)]
    store = calibrate(model, get_adapter(model), calib, progress=False)
    return store, f"{args.calib_batches} random-token batch(es) of {batch} x {seq} (speed only)"


def projection_params(
    adapter: Any, kind: BlockKind, kept_units: int | None = None, kept_kv_heads: int | None = None
) -> int:
    """Weights of one block's projections (biases excluded) when ``kept_units`` query heads / channels
    and ``kept_kv_heads`` key/value heads are kept (None: all)."""
    hidden = int(adapter.config.hidden_size)
    geo = adapter.geometry(kind)
    units = geo.units if kept_units is None else kept_units
    if kind is BlockKind.ATTENTION:
        kv = geo.num_kv_heads if kept_kv_heads is None else kept_kv_heads
        return 2 * hidden * geo.unit_width * (units + kv)  # q + o per query head, k + v per kv head
    return adapter.mlp_matrices * hidden * units


_BYTE_PARTS = ("projections", "lm_head", "embedding_rows", "other")


def decode_weight_bytes(
    model: nn.Module, masks: dict[tuple[int, BlockKind], BlockMask], batch: int
) -> dict[str, int]:
    """Bytes of weights one decode step of ``batch`` rows reads under ``masks`` (empty: dense).

    ``projections``: every decoder layer's attention and MLP projection weights, of the kept units
    only where a mask applies (skipped layers and unmasked blocks in full); ``lm_head``: the output
    projection, read in full (the embedding matrix itself when tied); ``embedding_rows``: the ``batch``
    rows the embedding lookup reads; ``other``: every other parameter (norms, biases, ...) in full.
    """
    adapter = get_adapter(model)
    itemsize = next(model.parameters()).element_size()
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_params = 0 if head is None else sum(p.numel() for p in head.parameters())
    tied = head is not None and head.weight.data_ptr() == embedding.data_ptr()
    unique = sum(p.numel() for p in model.parameters())  # tied tensors counted once
    dense_projections = adapter.num_layers * sum(projection_params(adapter, kind) for kind in BlockKind)
    other = (
        unique - embedding.numel() - (head_params - (embedding.numel() if tied else 0)) - dense_projections
    )
    kept = 0
    for index in range(adapter.num_layers):
        for kind in BlockKind:
            mask = masks.get((index, kind))
            if mask is None:
                kept += projection_params(adapter, kind)
            else:
                kv = None if mask.kept_kv_heads is None else int(mask.kept_kv_heads.numel())
                kept += projection_params(adapter, kind, mask.n_kept, kv)
    parts = {
        "projections": kept * itemsize,
        "projections_dense": dense_projections * itemsize,
        "lm_head": head_params * itemsize,
        "embedding_rows": batch * int(embedding.shape[1]) * itemsize,
        "other": other * itemsize,
    }
    parts["total"] = parts["projections"] + parts["lm_head"] + parts["embedding_rows"] + parts["other"]
    return parts


def kv_cache_bytes(
    model: nn.Module, masks: dict[tuple[int, BlockKind], BlockMask], batch: int, prompt: int, steps: int
) -> int:
    """Mean bytes of cached keys and values the attention reads per decode step (``steps`` steps after a
    ``prompt``-token prefill; the key/value heads each layer caches). Informational, not in the ideal."""
    adapter = get_adapter(model)
    geo = adapter.geometry(BlockKind.ATTENTION)
    itemsize = next(model.parameters()).element_size()
    heads = 0
    for index in range(adapter.num_layers):
        mask = masks.get((index, BlockKind.ATTENTION))
        cached = mask.kept_kv_heads if mask is not None else None
        heads += geo.num_kv_heads if cached is None else int(cached.numel())
    context = prompt + (steps + 1) / 2  # mean keys per step (the step's own token included)
    return int(2 * heads * geo.unit_width * batch * context * itemsize)


def _pad_id(model: nn.Module, tokenizer: Any) -> int:
    for source in (tokenizer, getattr(model, "generation_config", None), model.config):
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(source, attr, None) if source is not None else None
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    return 0


def run_generation(args: argparse.Namespace) -> dict[str, Any]:
    """Time ``model.generate`` (prefill and decode separately) for dense and every method; the report."""
    from transformers.utils import logging as hf_logging

    from ppframework.generation.runner import _ForwardTimer

    hf_logging.set_verbosity_error()  # generate's per-call notices
    device_name, dtype_name, _, _ = DEFAULTS[args.workload]
    args.device = args.device or device_name
    args.dtype = args.dtype or dtype_name
    args.seq = args.prompt_len  # random-weight models: max_position_embeddings >= max(seq, 2048)
    device, dtype, round_to, skip = setup(args)

    start = time.perf_counter()
    model, description, tokenizer = build_model_and_tokenizer(args, device, dtype)
    vocab = int(model.config.vocab_size)
    prompts, prompt_source = generation_prompts(args, tokenizer, vocab, device)
    history, calibration = generation_history(args, model, tokenizer, vocab)
    setup_s = time.perf_counter() - start
    log(f"model ready ({description}, {args.device}, {args.dtype}) and calibrated in {setup_s:.1f} s")

    pipes: dict[str, Pipeline | None] = {"dense": None}
    for ratio in args.ratios:
        pp = method("pp", ratio, skip, round_to, decode=args.decode)
        pipes[f"pp {ratio:.0%}"] = Pipeline(model, pp, history=history.clone())
        for dynamic in args.dynamic:  # e.g. pp-prompt: its own decision and prefill settings
            dyn = method(dynamic, ratio, skip, round_to, decode=args.decode)
            pipes[f"{dynamic} {ratio:.0%}"] = Pipeline(
                model, dyn, history=history.clone() if dyn.needs_calibration else None
            )
        for static in statics(args):
            static_method = method(static, ratio, skip, round_to, decode=args.decode)
            hist = history if static_method.needs_calibration else None
            pipes[f"{static} {ratio:.0%}"] = Pipeline(model, static_method, history=hist)

    pad = _pad_id(model, tokenizer)
    new_tokens = args.new_tokens
    timer = _ForwardTimer(model, cuda=device.type == "cuda")
    records: dict[tuple[str, int], list[dict[str, float]]] = {}
    masks_seen: dict[tuple[str, int], dict[tuple[int, BlockKind], BlockMask]] = {}
    row_masks_seen: dict[tuple[str, int], list[dict[tuple[int, BlockKind], BlockMask]]] = {}

    layers = get_adapter(model).layers

    def generate(name: str, batch: int, tokens: int, keep: bool) -> Callable[[], None]:
        pipe = pipes[name]
        ids = prompts[:batch]
        attention = torch.ones_like(ids)

        def call() -> None:
            timer.calls.clear()
            decoder = DecoderTimer(layers, device)
            synchronize(device)
            begin = time.perf_counter()
            with pipe if pipe is not None else nullcontext(), decoder, torch.inference_mode():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=attention,
                    max_new_tokens=tokens,
                    min_new_tokens=tokens,
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=pad,
                )
            synchronize(device)
            total = time.perf_counter() - begin
            calls = list(timer.calls)
            if out.shape[1] != ids.shape[1] + tokens or len(calls) != tokens:
                raise RuntimeError(
                    f"{name}: {out.shape[1] - ids.shape[1]} new tokens in {len(calls)} forwards, "
                    f"expected {tokens} and {tokens}"
                )
            if keep:
                records.setdefault((name, batch), []).append(
                    {
                        "prefill_s": calls[0][0],
                        "decode_s": sum(seconds for seconds, _ in calls[1:]),
                        "decode_decoder_s": sum(decoder.seconds[1:]),
                        "decode_step_s": [seconds for seconds, _ in calls[1:]],
                        "decode_steps": len(calls) - 1,
                        "generate_s": total,
                    }
                )
            if pipe is not None:
                masks_seen[(name, batch)] = dict(pipe.last_masks)
                if pipe.last_row_masks:  # decision: sequence, every row on its own weights
                    row_masks_seen[(name, batch)] = [dict(m) for m in pipe.last_row_masks]

        return call

    for batch in args.gen_batches:
        for _ in range(args.warmup):
            for name in pipes:
                generate(name, batch, args.warmup_new_tokens, keep=False)()
        time_interleaved(
            {name: generate(name, batch, new_tokens, keep=True) for name in pipes},
            repeats=args.repeats,
            warmup=0,
            device=device,
        )
        log(
            f"batch {batch}: "
            + ", ".join(
                f"{name} {statistics.median(r['decode_s'] for r in records[(name, batch)]):.2f}s"
                for name in pipes
            )
        )
    timer.remove()

    steps = new_tokens - 1
    rows: list[dict[str, Any]] = []
    for batch in args.gen_batches:
        dense_bytes = decode_weight_bytes(model, {}, batch)
        reference: dict[str, float] = {}
        for name, pipe in pipes.items():
            recs = records[(name, batch)]
            prefill = TimingStats(name, [r["prefill_s"] for r in recs])
            decode = TimingStats(name, [r["decode_s"] for r in recs], tokens=batch * steps)
            layers_only = TimingStats(name, [r["decode_decoder_s"] for r in recs])
            whole = TimingStats(name, [r["generate_s"] for r in recs])
            step = statistics.median(t for r in recs for t in r["decode_step_s"])
            if pipe is None:
                reference = {
                    "step": step,
                    "prefill": prefill.median,
                    "decode": decode.median,
                    "decoder": layers_only.median,
                    "generate": whole.median,
                }
            frozen = pipe is not None and not pipe.is_dense and pipe.method.decode == "frozen"
            masks = masks_seen.get((name, batch), {}) if frozen else {}
            weights = decode_weight_bytes(model, masks, batch)
            per_row = row_masks_seen.get((name, batch)) if frozen else None
            if per_row:  # each row reads its own kept projections; the rest is read once per step
                rows_bytes = [decode_weight_bytes(model, m, batch)["projections"] for m in per_row]
                weights["projections"] = sum(rows_bytes)
                weights["total"] = sum(v for k, v in weights.items() if k in _BYTE_PARTS)
            rows_read = len(per_row) if per_row else 1
            ideal = dense_bytes["total"] / weights["total"]
            speedup = _ratio(reference["decode"], decode.median)
            rows.append(
                {
                    "variant": name,
                    "batch": batch,
                    "method": "unmodified model" if pipe is None else (pipe.method.name or "pp"),
                    "target_ratio": 0.0 if pipe is None else pipe.method.pruning.ratio,
                    "layer_ratio": 0.0 if pipe is None else pipe.layer_ratio,
                    "static": bool(pipe is not None and pipe.is_static),
                    "decode_policy": "dense model" if pipe is None else pipe.method.decode,
                    "realised_ratio": 1.0
                    - weights["projections"] / (rows_read * weights["projections_dense"]),
                    "weight_sets_per_step": rows_read,
                    "kept_units": {
                        f"{index}.{kind.value}": mask.n_kept
                        for (index, kind), mask in sorted(
                            masks.items(), key=lambda item: (item[0][0], item[0][1].value)
                        )
                    },
                    "prefill": {**prefill.to_dict(), "ratio": _ratio(prefill.median, reference["prefill"])},
                    "decode": {
                        **decode.to_dict(),
                        "steps": steps,
                        "speedup": speedup,
                    },
                    "decode_decoder_layers": {
                        **layers_only.to_dict(),
                        "speedup": _ratio(reference["decoder"], layers_only.median),
                        "ideal_speedup": weights["projections_dense"] / weights["projections"],
                    },
                    "generate": {**whole.to_dict(), "ratio": _ratio(whole.median, reference["generate"])},
                    "decode_tokens_per_s": decode.tokens_per_s(),
                    "decode_step_median": {
                        "median_s": step,
                        "tokens_per_s": batch / step,
                        "speedup": _ratio(reference["step"], step),
                        "gain_fraction_of_ideal": _gain_fraction(_ratio(reference["step"], step), ideal),
                        "seconds": [r["decode_step_s"] for r in recs],
                    },
                    "weight_bytes_per_step": weights,
                    "ideal_decode_speedup": ideal,
                    "gain_fraction_of_ideal": _gain_fraction(speedup, ideal),
                    "speedup_over_ideal": speedup / ideal,
                    "kv_cache_bytes_per_step": kv_cache_bytes(model, masks, batch, args.prompt_len, steps),
                }
            )
    by_key = {(row["variant"], row["batch"]): row for row in rows}
    dynamic_names = ("pp", *args.dynamic)
    for row in rows:
        name, _, label = row["variant"].rpartition(" ")
        if name not in dynamic_names:
            continue
        batch = row["batch"]
        dense = by_key[("dense", batch)]
        dense_generate = dense["prefill"]["median_s"] + dense["decode"]["median_s"]
        overhead = {}
        for static in statics(args):
            other = by_key.get((f"{static} {label}", batch))
            if other is None:
                continue
            extra = row["prefill"]["median_s"] - other["prefill"]["median_s"]
            overhead[static] = {
                "seconds": extra,
                "prefill_ratio": _ratio(row["prefill"]["median_s"], other["prefill"]["median_s"]),
                "share_of_dense_prefill": extra / dense["prefill"]["median_s"],
                "share_of_dense_generate": extra / dense_generate,
            }
        row["per_generate_overhead_vs_static"] = overhead

    settings = {
        "mode": "generation",
        "workload": args.workload,
        "model": description,
        "shape": model_shape(model),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "dtype": args.dtype,
        "batches": args.gen_batches,
        "prompt_len": args.prompt_len,
        "prompts": prompt_source,
        "new_tokens": new_tokens,
        "decode_steps": steps,
        "decode": args.decode or "frozen",
        "ratios": args.ratios,
        "static": ", ".join(statics(args)) or "none",
        "skip_layers": skip,
        "round_to": round_to,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "warmup_new_tokens": args.warmup_new_tokens,
        "calibration": calibration,
        "threads": torch.get_num_threads(),
        "seed": args.seed,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    return {"settings": settings, "rows": rows, "elapsed_s": time.perf_counter() - start}


# ------------------------------------------------------------------------------------------ report
def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt(value: float, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _bytes(n: int | None) -> str:
    from ppframework.metrics.memory import format_bytes

    return format_bytes(n)


def format_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: settings line, main table, PP overhead table, targets."""
    s = report["settings"]
    shape = s["shape"]
    lines = [
        f"# Speed: {s['model']}",
        "",
        f"{s['workload']} (hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
        f"{shape['num_attention_heads']} heads / {shape['num_key_value_heads']} kv, MLP "
        f"{shape['intermediate_size']}, vocab {shape['vocab_size']}); {s['device']} ({s['device_name']}), "
        f"{s['dtype']}, batch {s['batch']} x {s['seq']} tokens, {s['threads']} thread(s); skip layers "
        f"{s['skip_layers']}, round_to {s['round_to']}; {s['repeats']} interleaved repeats after "
        f"{s['warmup']} warm-up round(s); calibration: {s['calibration']}; probe reuse: {s['reuse_probe']}; "
        f"torch {s['torch']}.",
        "",
        "| variant | realised | whole s | whole ratio | decoder s | decoder ratio | ideal (decoder) "
        "| realisation (decoder) | realisation (whole) | probe FLOPs (net) | PP overhead (net) | tokens/s "
        "| peak memory |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        share = row.get("overhead_share_of_dense_decoder", {}).get("total")
        net = row.get("overhead_share_net_of_reuse")
        overhead = "-" if share is None else f"{share:.2%} ({net:.2%})"
        label = row["variant"] + (" (static)" if row["static"] else "")
        lines.append(
            f"| {label} | {row['realised_ratio']:.3f} | {row['whole']['median_s']:.4f} "
            f"| {row['whole']['ratio']:.3f} | {row['decoder']['median_s']:.4f} "
            f"| {row['decoder']['ratio']:.3f} "
            f"| {row['ideal_ratio_decoder']:.3f} | {_fmt(row['realisation_decoder'], '.3f')} "
            f"| {_fmt(row['realisation_whole'], '.3f')} "
            f"| {row['probe_flops_share']:.2%} ({row['probe_net_flops_share']:.2%}) "
            f"| {overhead} | {row['tokens_per_s']:.0f} "
            f"| {_bytes(row['memory']['peak_bytes'])} |"
        )
    groups = list(OVERHEAD_GROUPS) + ["total"]
    lines += [
        "",
        "PP's per-batch overhead by stage, as a share of the dense decoder time "
        f"(from {s['profile_forwards']} separate profiled forward(s); {_timing_words(s)}):",
        "",
        "| variant | " + " | ".join(groups) + " |",
        "|---|" + "---|" * len(groups),
    ]
    for row in report["rows"]:
        shares = row.get("overhead_share_of_dense_decoder")
        if shares:
            lines.append(f"| {row['variant']} | " + " | ".join(f"{shares[g]:.2%}" for g in groups) + " |")
    paired = [
        (row, static, d) for row in report["rows"] for static, d in row.get("over_static_paired", {}).items()
    ]
    if paired:
        lines += [
            "",
            "PP's overhead measured directly: the decoder time over a static baseline with the very same "
            "kept shapes, paired per interleaved round, as a share of the dense decoder time (what the "
            "dynamic method adds per batch net of its reuse, per-batch gathers included):",
            "",
            "| variant | over | median | quartiles | rounds |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {row['variant']} | {static} | {d['median']:.2%} | {d['q25']:.2%} .. {d['q75']:.2%} "
            f"| {d['rounds']} |"
            for row, static, d in paired
        ]
    lines += ["", *target_lines(report)]
    for row in report["rows"]:
        if row.get("op_profile_markdown"):
            lines += [
                "",
                f"Operators by stage, {row['variant']} ({s['op_profile_forwards']} forward(s) under the "
                "PyTorch profiler, self time per forward, top operators of each stage; *outside*: the "
                "model's own work around the stages: norms, unpruned layers, embedding, LM head):",
                "",
                row["op_profile_markdown"],
            ]
    lines += [
        "",
        "Columns: *realised* = fraction of decoder projection weights removed; *ratio* = median time / the "
        "unmodified model's (whole forward incl. LM head, or decoder layers alone); *ideal (decoder)* = "
        "pruned decoder FLOPs / dense (probe excluded: what the kept shapes promise); *realisation* = "
        "(1 - measured ratio) / (1 - ideal ratio); *probe FLOPs* = probe / dense decoder FLOPs (net: minus "
        "the FLOPs the full pass reuses from the probe); *PP overhead* = selection + probe forward + "
        "scoring/fusion/masking + gather + history update (statistics and EMA), per forward, / dense "
        "decoder time (net: minus the reused FLOPs valued at the dense decoder's speed, an estimate); "
        "peak memory: CUDA allocator peak, or process peak RSS on CPU.",
    ]
    return "\n".join(lines)


def target_lines(report: dict[str, Any]) -> list[str]:
    """The targets (Speed II), checked against this report (informational, never asserted).

    Both devices: the ratio-0 pipeline within 2% of the unmodified model and PP's per-batch overhead
    at most 3% of the dense decoder time net of the reused probe work (judged on the paired difference
    over a static baseline with the same kept shapes when the run has one; the stage profile's
    estimate otherwise); pp 40% decoder realisation
    >= 0.90 on CPU, >= 0.85 on CUDA; on CUDA also the static baseline's realisation >= 0.92. A last
    line flags a run whose own controls (the ratio-0 pipeline, a static baseline above its ideal)
    are off by more than the margins the targets need.
    """
    rows = {r["variant"]: r for r in report["rows"]}
    cuda = report["settings"]["device"].startswith("cuda")
    out = ["Targets:"]
    zero = rows.get("pipeline ratio 0")
    noise: list[str] = []
    if zero:
        whole, dec = zero["whole"]["ratio"], zero["decoder"]["ratio"]
        out.append(
            "- ratio-0 pipeline within 2% of the unmodified model: "
            f"whole {whole:.3f} ({_ok(whole <= 1.02)}), decoder {dec:.3f} ({_ok(dec <= 1.02)})"
        )
        noise += [f"ratio-0 decoder {dec:.3f}"] if abs(dec - 1.0) > 0.02 else []
    for row in report["rows"]:
        if row["static"] and row["realisation_decoder"] > 1.02:
            noise.append(f"{row['variant']} realises {row['realisation_decoder']:.3f} of its ideal")
    pp40 = rows.get("pp 40%")
    if not pp40:
        return [*out, "- (no pp 40% row: run with --ratios including 0.4 for the pp targets)"]
    real, floor = pp40["realisation_decoder"], 0.85 if cuda else 0.90
    out.append(f"- pp 40% decoder realisation >= {floor:.2f}: {_fmt(real, '.3f')} ({_ok(real >= floor)})")
    for row in report["rows"]:
        if cuda and row["static"] and row["target_ratio"] == 0.4:
            static = row["realisation_decoder"]
            verdict = _ok(static >= 0.92)
            out.append(f"- {row['variant']} realisation >= 0.92: {_fmt(static, '.3f')} ({verdict})")
    shares = pp40.get("overhead_share_of_dense_decoder")
    if shares is not None:
        probe, total, net = shares["probe forward"], shares["total"], pp40["overhead_share_net_of_reuse"]
        out.append(
            f"- pp 40% probe: {pp40['probe_flops_share']:.2%} of dense decoder FLOPs "
            f"({pp40['probe_net_flops_share']:.2%} net of reuse), {probe:.2%} of dense decoder time"
        )
        paired = pp40.get("over_static_paired", {})
        for static, d in paired.items():
            out.append(
                f"- pp 40% per-batch overhead <= 3% of dense decoder time net of the reused probe work, "
                f"measured directly over {static} (paired): {d['median']:.2%}, quartiles "
                f"{d['q25']:.2%} .. {d['q75']:.2%} ({_ok(d['median'] <= 0.03)})"
            )
        verdict = "" if paired else f" ({_ok(net <= 0.03)})"
        out.append(
            f"- pp 40% per-batch overhead from the stage profile: {total:.2%} as measured, {net:.2%} "
            f"minus the reused FLOPs at the dense decoder's average speed{verdict} (an estimate that "
            "overstates the saving: splitting the products around the probe costs part of it, see "
            "benchmarks/block_reuse.py; the paired figure is the measurement)"
        )
    if noise:
        out.append(
            "- this run's controls are off by more than the targets' margins ("
            + "; ".join(noise)
            + "): read its ratios as noisy, and compare versions in one process (benchmarks/ab_speed.py)"
        )
    return out


def format_generation_markdown(report: dict[str, Any]) -> str:
    """The generation report as markdown: settings, main table, per-generate overhead, targets."""
    s = report["settings"]
    shape = s["shape"]
    lines = [
        f"# Generation speed: {s['model']}",
        "",
        f"{s['workload']} (hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
        f"{shape['num_attention_heads']} heads / {shape['num_key_value_heads']} kv, MLP "
        f"{shape['intermediate_size']}, vocab {shape['vocab_size']}); {s['device']} ({s['device_name']}), "
        f"{s['dtype']}, {s['threads']} thread(s). `model.generate`, greedy, {s['new_tokens']} new tokens "
        f"(min = max, no stop strings: 1 prefill + {s['decode_steps']} decode steps for every method), "
        f"KV cache, decode policy `{s['decode']}`; prompts: {s['prompts']} (batch B uses the first B); "
        f"batches {s['batches']}; skip layers {s['skip_layers']}, round_to {s['round_to']}; calibration: "
        f"{s['calibration']}; {s['repeats']} interleaved repeats after {s['warmup']} warm-up round(s) of "
        f"{s['warmup_new_tokens']} new tokens; torch {s['torch']}.",
        "",
        "| variant | batch | realised | prefill s | prefill ratio | decode tokens/s | decode speed-up "
        "| kept-bytes ideal | gain / ideal gain | speed-up / ideal "
        "| step-median speed-up (gain / ideal gain) | decoder layers: speed-up / ideal "
        "| KV read / dense weights |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        label = row["variant"] + (" (static)" if row["static"] else "")
        dense_bytes = row["weight_bytes_per_step"]["total"] * row["ideal_decode_speedup"]
        layers, steps = row["decode_decoder_layers"], row["decode_step_median"]
        lines.append(
            f"| {label} | {row['batch']} | {row['realised_ratio']:.3f} | {row['prefill']['median_s']:.4f} "
            f"| {row['prefill']['ratio']:.3f} | {row['decode_tokens_per_s']:.1f} "
            f"| {row['decode']['speedup']:.3f} | {row['ideal_decode_speedup']:.3f} "
            f"| {_fmt(row['gain_fraction_of_ideal'], '.2f')} | {row['speedup_over_ideal']:.3f} "
            f"| {steps['speedup']:.3f} ({_fmt(steps['gain_fraction_of_ideal'], '.2f')}) "
            f"| {layers['speedup']:.3f} / {layers['ideal_speedup']:.3f} "
            f"| {row['kv_cache_bytes_per_step'] / dense_bytes:.1%} |"
        )
    overhead_rows = [
        (row, static, o)
        for row in report["rows"]
        for static, o in row.get("per_generate_overhead_vs_static", {}).items()
    ]
    if overhead_rows:
        lines += [
            "",
            "The pipeline's per-generate overhead: a dynamic method's prefill (probe, scoring, fusion, "
            "masking, the one gather of the sliced weights its decode steps reuse, history update; under "
            "prefill: dense the prompt runs dense and the gather moves to the first decode step) against "
            "the static baseline's at the same ratio (decided once, sliced weights kept):",
            "",
            "| variant | batch | vs | pp prefill s | static prefill s | extra s | prefill ratio "
            "| share of dense prefill | share of dense generate |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        rows = {(r["variant"], r["batch"]): r for r in report["rows"]}
        for row, static, o in overhead_rows:
            other = rows[(f"{static} {row['variant'].rpartition(' ')[2]}", row["batch"])]
            lines.append(
                f"| {row['variant']} | {row['batch']} | {static} | {row['prefill']['median_s']:.4f} "
                f"| {other['prefill']['median_s']:.4f} | {o['seconds']:+.4f} | {o['prefill_ratio']:.3f} "
                f"| {o['share_of_dense_prefill']:+.1%} | {o['share_of_dense_generate']:+.2%} |"
            )
    lines += ["", *generation_target_lines(report)]
    lines += [
        "",
        "Columns: *realised* = fraction of decoder projection weights the decode steps skip (the prefill's "
        "masks); *prefill s* = median seconds of the prompt forward (probe, decision, gather included), "
        "*prefill ratio* = / dense's; *decode tokens/s* = batch x decode steps / median decode seconds "
        "(model forwards only, from forward hooks); *decode speed-up* = method tokens/s / dense tokens/s "
        "(> 1 = faster); *kept-bytes ideal* = weight bytes a dense decode step reads / those the method's "
        "step reads (decoder projections of the kept units, plus what every step reads in full: the LM "
        "head (the tied embedding matrix), norms and other parameters, and the batch's embedding rows); "
        "*gain / ideal gain* = (speed-up - 1) / (ideal - 1); *speed-up / ideal* = speed-up / ideal; "
        "*step-median speed-up* = dense's median decode-step seconds (pooled over every step of every "
        "repeat) / the method's: robust to bursts of load from other processes, which a whole-call sum "
        "is not; "
        "*decoder layers*: the decode steps' time inside the decoder layers alone (first layer's entry to "
        "last layer's exit), dense's / the method's, next to the projections-only bytes ideal; *KV "
        "read / dense weights* = mean cached key/value bytes a decode step attends over, / the dense "
        "step's weight bytes (not in the ideal).",
    ]
    return "\n".join(lines)


def generation_target_lines(report: dict[str, Any]) -> list[str]:
    """The issue's generation target, per pruned row: decode with frozen masks reaches >= 0.9 of the
    kept-weight (bytes) ideal gain (informational, never asserted)."""
    out = ["Target: decode tokens/s gain >= 0.9 of the kept-weight (bytes) ideal gain:"]
    for row in report["rows"]:
        fraction = row["gain_fraction_of_ideal"]
        if math.isnan(fraction):
            continue
        step = row["decode_step_median"]["gain_fraction_of_ideal"]
        out.append(
            f"- {row['variant']}, batch {row['batch']}: speed-up {row['decode']['speedup']:.3f} vs ideal "
            f"{row['ideal_decode_speedup']:.3f}, {_fmt(fraction, '.2f')} of the ideal gain "
            f"({_ok(fraction >= 0.9)}); step median: speed-up {row['decode_step_median']['speedup']:.3f}, "
            f"{_fmt(step, '.2f')} of the ideal gain ({_ok(step >= 0.9)})"
        )
    return out


def _ok(flag: bool) -> str:
    return "met" if flag else "NOT met"


def log(message: str) -> None:
    """Progress on stderr."""
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=sorted(DEFAULTS), default="smollm2")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: per workload)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: per workload")
    parser.add_argument("--batch", type=int, default=None, help="sequences per batch (default: per workload)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: per workload)")
    parser.add_argument(
        "--generation",
        action="store_true",
        help="time model.generate (prefill and decode separately) instead of whole-sequence forwards",
    )
    parser.add_argument(
        "--ratios", type=float, nargs="+", default=None, help="default 0.2 0.4 0.6 (--generation: 0.2 0.4)"
    )
    parser.add_argument(
        "--static", nargs="+", default=["wanda-sp"], help="static baseline preset(s), or 'none'"
    )
    parser.add_argument(
        "--dynamic",
        nargs="*",
        default=[],
        help="other dynamic presets to time beside pp (e.g. pp-energy), with the same calibration history",
    )
    parser.add_argument(
        "--probe-seq-ratios",
        type=float,
        nargs="*",
        default=[],
        help="extra pp variants probing this fraction of positions instead of 0.5 (changes results)",
    )
    parser.add_argument(
        "--variants-from", default=None, help="an ablation file (ppf ablate) whose --variants to time"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[],
        help="variants of --variants-from, each on pp at every ratio (e.g. completion)",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed interleaved rounds (default 5; --generation: 3)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument(
        "--profile-forwards", type=int, default=2, help="profiled forwards per pruned variant"
    )
    parser.add_argument(
        "--profile-timing",
        choices=("events", "sync"),
        default="events",
        help="stage timing on CUDA: events (unsynchronised, default) or sync (synchronise per stage)",
    )
    parser.add_argument(
        "--op-profile",
        type=int,
        default=0,
        help="also profile this many forwards per pruned variant under the PyTorch profiler and report "
        "the operators of each stage (default 0: off)",
    )
    parser.add_argument("--calib-batches", type=int, default=2, help="random-token calibration batches")
    parser.add_argument("--layers", type=int, default=None, help="keep only this many decoder layers")
    parser.add_argument("--skip-layers", type=int, nargs="*", default=None, help="default 0 1 2 (tiny: 0)")
    parser.add_argument("--round-to", type=int, default=None, help="kept MLP width multiple (64 CUDA, 8 CPU)")
    parser.add_argument("--reuse-probe", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    gen = parser.add_argument_group("--generation")
    gen.add_argument("--gen-batches", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    gen.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per row (default 128)")
    gen.add_argument("--new-tokens", type=int, default=128, help="new tokens, min = max (default 128)")
    gen.add_argument(
        "--warmup-new-tokens", type=int, default=16, help="new tokens of each warm-up generate (default 16)"
    )
    gen.add_argument(
        "--decode", choices=("frozen", "dense"), default=None, help="decode policy (default frozen)"
    )
    gen.add_argument(
        "--calib-samples", type=int, default=32, help="C4 calibration windows (smollm2; default 32)"
    )
    gen.add_argument("--calib-seq", type=int, default=None, help="calibration tokens (default: --prompt-len)")
    gen.add_argument("--data-dir", default=None, help="WikiText-2 / C4 folder (default: the library's)")
    parser.add_argument(
        "--out", default=None, help="output folder (default benchmarks/results/<workload>-<device>)"
    )
    args = parser.parse_args(argv)
    if args.ratios is None:
        args.ratios = [0.2, 0.4] if args.generation else [0.2, 0.4, 0.6]
    if args.repeats is None:
        args.repeats = 3 if args.generation else 5
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run_generation(args) if args.generation else run(args)
    suffix = "-generation" if args.generation else ""
    out = Path(
        args.out
        or Path(__file__).parent / "results" / f"{args.workload}-{args.device.replace(':', '')}{suffix}"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(report, indent=2, default=str))
    markdown = format_generation_markdown(report) if args.generation else format_markdown(report)
    (out / "speed.md").write_text(markdown + "\n")
    print(markdown)
    log(f"wrote {out / 'speed.json'} and {out / 'speed.md'} ({report['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
