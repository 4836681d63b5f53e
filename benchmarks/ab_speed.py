"""Before/after speed of ``pp`` in one process: an older checkout of the package against this one.

The machine's run-to-run noise (a few percent on a shared CPU) is as large as the changes a speed
pass makes, so two separate ``speed.py`` runs cannot tell them apart. This script imports an older
checkout of ``ppframework`` under another name (its ``.py`` files copied with ``ppframework``
renamed), builds the same model once, and times, interleaved in one process, the dense model, the
older ``pp`` and this ``pp`` at each ratio, and a static baseline's older and current sliced pass. It
also checks that both make the same decisions: after the timed rounds (the same batches in the same
order) every block's kept units, the history and the logits of one more forward must be
bit-identical (the static pair: the logits). Each current row also gets the per-round difference
from its older twin (rounds are interleaved, so a slow spell hits both alike).

Example (``git worktree add /tmp/before <rev>`` first)::

    python benchmarks/ab_speed.py --before-src /tmp/before --ratios 0.2 0.4 0.6 --out DIR

Writes ``ab_speed.json`` and ``ab_speed.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import re
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speedbench.methods import method  # noqa: E402
from speedbench.output import write_report  # noqa: E402
from speedbench.stats import paired_difference  # noqa: E402
from speedbench.workloads import build_model  # noqa: E402

from ppframework.adapters import get_adapter  # noqa: E402
from ppframework.calibration import calibrate  # noqa: E402
from ppframework.metrics.runtime import DecoderTimer, TimingStats, time_interleaved  # noqa: E402
from ppframework.metrics.stage_profile import StageProfiler  # noqa: E402
from ppframework.pipeline import Pipeline  # noqa: E402

ALIAS = "ppframework_before"


def import_renamed(source: Path, alias: str = ALIAS) -> ModuleType:
    """Import the ``ppframework`` package of checkout ``source`` as ``alias`` (a renamed copy in a
    temporary folder; every ``ppframework`` in its ``.py`` files becomes ``alias``)."""
    package = source / "ppframework"
    if not (package / "__init__.py").is_file():
        raise SystemExit(f"--before-src: {source} has no ppframework/__init__.py; give a checkout's root")
    root = Path(tempfile.mkdtemp(prefix="ab-speed-"))
    atexit.register(shutil.rmtree, root, True)  # the renamed copy goes when the process ends
    shutil.copytree(package, root / alias)
    word = re.compile(r"\bppframework\b")
    for path in (root / alias).rglob("*.py"):
        path.write_text(word.sub(alias, path.read_text()))
    sys.path.insert(0, str(root))
    return importlib.import_module(alias)


def stage_shares(profiler: Any, forwards: int, dense_s: float) -> dict[str, float]:
    """The overhead groups of a stage profiler, as shares of the dense decoder time."""
    return {group: seconds / dense_s for group, seconds in profiler.overhead(forwards).items()}


def same_decisions(before: Any, after: Pipeline) -> list[str]:
    """Blocks whose last kept units or history differ between the two pipelines."""
    differ = []
    old_masks = {(layer, kind.value): mask for (layer, kind), mask in before.last_masks.items()}
    old_history = {(layer, kind.value): h for (layer, kind), h in before.history.blocks.items()}
    if old_masks.keys() != {(layer, kind.value) for layer, kind in after.last_masks}:
        return ["the blocks decided"]
    for (layer, kind), mask in after.last_masks.items():
        if not torch.equal(old_masks[(layer, kind.value)].kept_units, mask.kept_units):
            differ.append(f"kept units of layer {layer} {kind.value}")
        if not torch.equal(old_history[(layer, kind.value)].sq_mean, after.history.get(layer, kind).sq_mean):
            differ.append(f"history of layer {layer} {kind.value}")
    return differ


def run(args: argparse.Namespace) -> dict[str, Any]:
    old = import_renamed(Path(args.before_src).resolve())
    old_pipeline = importlib.import_module(f"{ALIAS}.pipeline")
    old_calibration = importlib.import_module(f"{ALIAS}.calibration")
    old_adapters = importlib.import_module(f"{ALIAS}.adapters")
    old_config = importlib.import_module(f"{ALIAS}.config")
    old_profile = importlib.import_module(f"{ALIAS}.metrics.stage_profile")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    args.workload, args.dtype = "smollm2", "float32"  # speed.py's offline SmolLM2, --layers honoured
    model, _ = build_model(args, torch.device("cpu"), torch.float32)
    adapter = get_adapter(model)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, int(model.config.vocab_size), (args.batch, args.seq), generator=gen)
    calib = [torch.randint(0, int(model.config.vocab_size), (args.batch, args.seq), generator=gen)]
    history = calibrate(model, adapter, calib, progress=False)
    old_history = old_calibration.calibrate(model, old_adapters.get_adapter(model), calib, progress=False)
    skip = [0, 1, 2]
    pipes: dict[str, Any] = {"dense": None}
    pairs = []
    static_pairs = []
    for ratio in args.ratios:
        new_method = method("pp", ratio, skip, 8)
        old_method = old_config.MethodConfig.model_validate(for_older(old_config.MethodConfig, new_method))
        before = old_pipeline.Pipeline(model, old_method, history=old_history.clone())
        after = Pipeline(model, new_method, history=history.clone())
        pipes[f"pp {ratio:.0%} before"], pipes[f"pp {ratio:.0%} after"] = before, after
        pairs.append((ratio, before, after))
        if args.static != "none":  # the sliced full pass alone, before and after
            static = method(args.static, ratio, skip, 8)
            old_static = old_config.MethodConfig.model_validate(for_older(old_config.MethodConfig, static))
            label = f"{args.static} {ratio:.0%}"
            pipes[f"{label} before"] = old_pipeline.Pipeline(model, old_static, history=old_history)
            pipes[f"{label} after"] = Pipeline(model, static, history=history)
            static_pairs.append(label)
    timers = {name: DecoderTimer(adapter.layers, torch.device("cpu")) for name in pipes}

    def forward(name: str):
        pipe, timer = pipes[name], timers[name]

        def call() -> Any:
            with pipe if pipe is not None else nullcontext(), timer:
                return model(input_ids=ids, use_cache=False).logits

        return call

    with torch.inference_mode():
        whole = time_interleaved(
            {n: forward(n) for n in pipes}, repeats=args.repeats, warmup=args.warmup, tokens=ids.numel()
        )
        decoder = {n: TimingStats(n, t.seconds[args.warmup :]) for n, t in timers.items()}
        checks = {}
        for ratio, before, after in pairs:
            differ = same_decisions(before, after)
            logits_same = torch.equal(forward(f"pp {ratio:.0%} before")(), forward(f"pp {ratio:.0%} after")())
            checks[f"{ratio:.0%}"] = {"differences": differ, "logits_identical": logits_same}
        for label in static_pairs:
            logits_same = torch.equal(forward(f"{label} before")(), forward(f"{label} after")())
            checks[label] = {"differences": [], "logits_identical": logits_same}
        dense_s = decoder["dense"].median
        profiles = {}
        for ratio, before, after in pairs:
            for label, pipe, cls in (
                ("before", before, old_profile.StageProfiler),
                ("after", after, StageProfiler),
            ):
                profiler = cls(torch.device("cpu")).attach(pipe)
                for _ in range(args.profile_forwards):
                    forward(f"pp {ratio:.0%} {label}")()
                profiler.detach(pipe)
                profiles[f"pp {ratio:.0%} {label}"] = stage_shares(profiler, args.profile_forwards, dense_s)
    rows = []
    for name in pipes:
        rows.append(
            {
                "variant": name,
                "decoder_median_s": decoder[name].median,
                "decoder_seconds": decoder[name].seconds,
                "decoder_iqr_share": decoder[name].iqr / decoder[name].median,
                "decoder_ratio": decoder[name].median / dense_s,
                "whole_median_s": whole[name].median,
                "whole_ratio": whole[name].median / whole["dense"].median,
                "overhead_shares": profiles.get(name),
            }
        )
        if name.endswith(" after"):  # per round, after minus before, over the dense decoder median
            before = decoder[name.removesuffix(" after") + " before"].seconds
            rows[-1]["after_minus_before"] = paired_difference(decoder[name].seconds, before, dense_s)
    return {
        "settings": {
            "before_src": str(args.before_src),
            "before_version": getattr(old, "__version__", "?"),
            "batch": args.batch,
            "seq": args.seq,
            "ratios": args.ratios,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "profile_forwards": args.profile_forwards,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "rows": rows,
        "identical": checks,
        "elapsed_s": time.perf_counter() - start,
    }


def to_markdown(report: dict[str, Any]) -> str:
    """The report's tables."""
    s = report["settings"]
    lines = [
        "# Before / after, one process: SmolLM2-135M, CPU fp32",
        "",
        f"batch {s['batch']} x {s['seq']}, {s['threads']} thread(s), {s['repeats']} interleaved repeats "
        f"after {s['warmup']} warm-up round(s); before = `{s['before_src']}`; torch {s['torch']}.",
        "",
        "| variant | decoder s | IQR / median | decoder ratio | whole ratio | PP overhead (share of dense "
        "decoder) | after - before, paired per round (median, quartiles; share of dense decoder) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        shares = row["overhead_shares"]
        overhead = "-" if not shares else f"{shares['total']:.2%}"
        paired = row.get("after_minus_before")
        change = "-"
        if paired:
            change = f"{paired['median']:+.2%} ({paired['q25']:+.2%} .. {paired['q75']:+.2%})"
        lines.append(
            f"| {row['variant']} | {row['decoder_median_s']:.4f} | {row['decoder_iqr_share']:.1%} "
            f"| {row['decoder_ratio']:.3f} "
            f"| {row['whole_ratio']:.3f} | {overhead} | {change} |"
        )
    groups = ["selection", "probe forward", "scoring and fusion", "gather", "history update", "total"]
    lines += ["", "| variant | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    for row in report["rows"]:
        if row["overhead_shares"]:
            lines.append(
                f"| {row['variant']} | "
                + " | ".join(f"{row['overhead_shares'][g]:.2%}" for g in groups)
                + " |"
            )
    lines += [
        "",
        "Same decisions (kept units and history of every block after the timed rounds, logits of one more "
        "forward):",
    ]
    for ratio, check in report["identical"].items():
        ok = not check["differences"] and check["logits_identical"]
        detail = (
            ""
            if ok
            else f": {', '.join(check['differences'][:5])}; logits identical {check['logits_identical']}"
        )
        name = ratio if not ratio[0].isdigit() else f"pp {ratio}"
        lines.append(f"- {name}: {'identical' if ok else 'DIFFERENT'}{detail}")
    return "\n".join(lines)


def for_older(older: Any, config: Any) -> dict[str, Any]:
    """``config`` (a pydantic model of this checkout) as data the older checkout's model class
    ``older`` accepts: fields the older one does not have are left out when they hold this checkout's
    default (an option added since, not in use); any other value is an error (the older checkout
    cannot run that method, so the comparison would not be like for like)."""
    data: dict[str, Any] = {}
    for name, value in config:
        field = older.model_fields.get(name)
        if field is None:
            default = type(config).model_fields[name].get_default(call_default_factory=True)
            if value != default:
                raise SystemExit(
                    f"ab_speed: the older checkout has no {name!r}; this method sets it to {value!r}"
                )
            continue
        inner = getattr(field.annotation, "model_fields", None)
        data[name] = (
            for_older(field.annotation, value)
            if inner is not None and hasattr(type(value), "model_fields")
            else (value.model_dump(mode="json") if hasattr(value, "model_dump") else value)
        )
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before-src", required=True, help="root of the older checkout")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    parser.add_argument("--static", default="wanda-sp", help="a static baseline preset, or none")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--profile-forwards", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None, help="keep only this many decoder layers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    report = run(args)
    write_report(Path(args.out), "ab_speed", report, to_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
