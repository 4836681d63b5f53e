"""The speed benchmark's command line: its options, and the run that writes ``speed.json`` and
``speed.md`` (``benchmarks/speed.py`` is the script that calls :func:`main`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .forward import run_forward
from .forward_report import format_markdown
from .generation import run_generation
from .generation_report import format_generation_markdown
from .output import write_report
from .run_info import log
from .workloads import DEFAULTS, DTYPES

#: the first line of ``speed.py``'s docstring, the ``--help`` description.
DESCRIPTION = "Speed benchmark: turn the pruning ratio into wall-clock savings."

#: where a run writes when ``--out`` is not given: ``benchmarks/results``.
RESULTS = Path(__file__).parent.parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv``; None: ``sys.argv``), with the ``--ratios`` and ``--repeats`` defaults of
    the chosen mode filled in."""
    parser = argparse.ArgumentParser(description=DESCRIPTION)
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
        "--sequence-decode",
        nargs="+",
        choices=("loop", "batched", "union"),
        default=["loop"],
        help="--generation: for each --dynamic preset with decision: sequence, time these sequence_decode "
        "kernels (loop = the preset's own; batched and union are timed as '<preset>/<kernel> <ratio>')",
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
    gen.add_argument(
        "--fresh-pins",
        action="store_true",
        help="also time each --dynamic preset with its decode pins gathered into fresh tensors on every "
        "call ('<preset>/fresh-pins <ratio>'; the default recycles one call's storage for the next)",
    )
    gen.add_argument(
        "--preset-shapes",
        action="store_true",
        help="every method keeps its preset's own skip_layers and round_to (the kept shapes ppf eval and "
        "prompt_conditioned.py prune, e.g. GRIFFIN's every layer); default: --skip-layers / --round-to",
    )
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
    """Run the benchmark the command line asks for and write ``speed.json`` and ``speed.md`` into
    ``--out`` (default ``benchmarks/results/<workload>-<device>[-generation]``)."""
    args = parse_args(argv)
    report = run_generation(args) if args.generation else run_forward(args)
    suffix = "-generation" if args.generation else ""
    out = Path(args.out or RESULTS / f"{args.workload}-{args.device.replace(':', '')}{suffix}")
    to_markdown = format_generation_markdown if args.generation else format_markdown
    write_report(out, "speed", report, to_markdown, json_default=str)
    log(f"wrote {out / 'speed.json'} and {out / 'speed.md'} ({report['elapsed_s']:.0f} s)")
    return 0
