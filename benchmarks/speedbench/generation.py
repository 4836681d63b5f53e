"""The generation speed benchmark (``--generation``): ``model.generate`` timed for dense, ``pp``, the
``--dynamic`` presets and the static baselines, interleaved at each batch size, with prefill and
decode apart, the decode step's kept-weight (bytes) ideal and each dynamic method's per-generate
overhead over the static baseline at its ratio; :func:`run_generation` returns the report
(:mod:`speedbench.generation_report` writes its tables)."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from ppframework.adapters import get_adapter
from ppframework.calibration import calibrate
from ppframework.config import MethodConfig
from ppframework.history import HistoryStore
from ppframework.metrics.runtime import DecoderTimer, TimingStats, time_interleaved
from ppframework.metrics.timing import synchronize
from ppframework.pipeline import Pipeline
from ppframework.pipeline.rows import union_masks
from ppframework.types import BlockKind, BlockMask

from .costs import BYTE_PARTS, decode_weight_bytes, kv_cache_bytes
from .methods import method, statics
from .run_info import log, runtime_settings, workload_settings
from .stats import gain_fraction, safe_ratio
from .workloads import build_model_and_tokenizer, setup


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


def pad_id(model: nn.Module, tokenizer: Any) -> int:
    """The token ``generate`` pads with: the tokenizer's, the generation config's or the model config's
    pad (else end-of-sequence) id, the first of a list; 0 when none has one."""
    for source in (tokenizer, getattr(model, "generation_config", None), model.config):
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(source, attr, None) if source is not None else None
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    return 0


SEQUENCE_KERNELS = ("loop", "batched", "union")


def sequence_kernels(args: argparse.Namespace, dynamic: MethodConfig) -> list[str]:
    """The ``sequence_decode`` kernels to time for a dynamic preset: its own, plus ``--sequence-decode``
    where it decides per sequence (``decision: sequence``, frozen decode)."""
    own = dynamic.sequence_decode
    if dynamic.decision != "sequence" or dynamic.decode != "frozen":
        return [own]
    wanted = getattr(args, "sequence_decode", None) or [own]
    return [own, *(k for k in wanted if k != own)] if own in wanted else list(wanted)


def run_generation(args: argparse.Namespace) -> dict[str, Any]:
    """Time ``model.generate`` (prefill and decode separately) for dense and every method; the report."""
    from transformers.utils import logging as hf_logging

    from ppframework.generation.runner import _ForwardTimer

    hf_logging.set_verbosity_error()  # generate's per-call notices
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
    own = bool(getattr(args, "preset_shapes", False))
    for ratio in args.ratios:
        pp = method("pp", ratio, skip, round_to, decode=args.decode, own_shapes=own)
        pipes[f"pp {ratio:.0%}"] = Pipeline(model, pp, history=history.clone())
        for dynamic in args.dynamic:  # e.g. pp-prompt: its own decision and prefill settings
            dyn = method(dynamic, ratio, skip, round_to, decode=args.decode, own_shapes=own)
            for kernel in sequence_kernels(args, dyn):
                variant = (
                    dyn
                    if kernel == dyn.sequence_decode
                    else dyn.model_copy(update={"sequence_decode": kernel})
                )
                label = dynamic if kernel == dyn.sequence_decode else f"{dynamic}/{kernel}"
                pipes[f"{label} {ratio:.0%}"] = Pipeline(
                    model, variant, history=history.clone() if dyn.needs_calibration else None
                )
            if getattr(args, "fresh_pins", False):  # the same method, every call's pins in new tensors
                fresh = Pipeline(model, dyn, history=history.clone() if dyn.needs_calibration else None)
                fresh.recycle_pins = False
                pipes[f"{dynamic}/fresh-pins {ratio:.0%}"] = fresh
        for static in statics(args):
            static_method = method(static, ratio, skip, round_to, decode=args.decode, own_shapes=own)
            hist = history if static_method.needs_calibration else None
            pipes[f"{static} {ratio:.0%}"] = Pipeline(model, static_method, history=hist)

    pad = pad_id(model, tokenizer)
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
            if per_row and pipe is not None and pipe.method.sequence_decode == "union":
                joined = union_masks(per_row)  # one pass on the union: read once per step
                masks, per_row = ({}, None) if isinstance(joined, str) else (joined, None)
                weights = decode_weight_bytes(model, masks, batch)
            if per_row:  # each row reads its own kept projections; the rest is read once per step
                rows_bytes = [decode_weight_bytes(model, m, batch)["projections"] for m in per_row]
                weights["projections"] = sum(rows_bytes)
                weights["total"] = sum(v for k, v in weights.items() if k in BYTE_PARTS)
            rows_read = len(per_row) if per_row else 1
            ideal = dense_bytes["total"] / weights["total"]
            speedup = safe_ratio(reference["decode"], decode.median)
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
                    "prefill": {
                        **prefill.to_dict(),
                        "ratio": safe_ratio(prefill.median, reference["prefill"]),
                    },
                    "decode": {
                        **decode.to_dict(),
                        "steps": steps,
                        "speedup": speedup,
                    },
                    "decode_decoder_layers": {
                        **layers_only.to_dict(),
                        "speedup": safe_ratio(reference["decoder"], layers_only.median),
                        "ideal_speedup": weights["projections_dense"] / weights["projections"],
                    },
                    "generate": {**whole.to_dict(), "ratio": safe_ratio(whole.median, reference["generate"])},
                    "decode_tokens_per_s": decode.tokens_per_s(),
                    "decode_step_median": {
                        "median_s": step,
                        "tokens_per_s": batch / step,
                        "speedup": safe_ratio(reference["step"], step),
                        "gain_fraction_of_ideal": gain_fraction(safe_ratio(reference["step"], step), ideal),
                        "seconds": [r["decode_step_s"] for r in recs],
                    },
                    "weight_bytes_per_step": weights,
                    "ideal_decode_speedup": ideal,
                    "gain_fraction_of_ideal": gain_fraction(speedup, ideal),
                    "speedup_over_ideal": speedup / ideal,
                    "kv_cache_bytes_per_step": kv_cache_bytes(model, masks, batch, args.prompt_len, steps),
                }
            )
    by_key = {(row["variant"], row["batch"]): row for row in rows}
    dynamic_names = (
        "pp",
        *args.dynamic,
        *(f"{d}/{k}" for d in args.dynamic for k in (*SEQUENCE_KERNELS, "fresh-pins")),
    )
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
                "prefill_ratio": safe_ratio(row["prefill"]["median_s"], other["prefill"]["median_s"]),
                "share_of_dense_prefill": extra / dense["prefill"]["median_s"],
                "share_of_dense_generate": extra / dense_generate,
            }
        row["per_generate_overhead_vs_static"] = overhead

    settings = {
        "mode": "generation",
        **workload_settings(args, description, model, device),
        "batches": args.gen_batches,
        "prompt_len": args.prompt_len,
        "prompts": prompt_source,
        "new_tokens": new_tokens,
        "decode_steps": steps,
        "decode": args.decode or "frozen",
        "ratios": args.ratios,
        "static": ", ".join(statics(args)) or "none",
        "skip_layers": "each preset's own" if own else skip,
        "round_to": "each preset's own" if own else round_to,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "warmup_new_tokens": args.warmup_new_tokens,
        "calibration": calibration,
        **runtime_settings(args),
    }
    return {"settings": settings, "rows": rows, "elapsed_s": time.perf_counter() - start}
