"""Why a pruned decode step misses the kept-bytes ideal: a per-step cost model fitted to measured steps.

A decode step at batch 1 reads every kept weight once, so its time is modelled as
``step = fixed + bytes / bandwidth``: ``fixed`` is what does not shrink with the weights (operator
dispatch, norms, rotary, attention over the cache, the sampler), ``bandwidth`` the rate the weights
stream at. The fit is an ordinary least-squares line through the pruned rows of one
``speed.py --generation`` run (``speed.json``: median step time against the kept-weight bytes per
step, every method and ratio of one batch size). Dense's own fixed cost is what is left of its
measured step after its bytes at the fitted bandwidth.

If every method paid dense's fixed cost, the best decode speed-up at ``bytes`` would be
``dense_step / (dense_fixed + bytes / bandwidth)``; dividing by the kept-bytes ideal
(``dense_bytes / bytes``) gives the share of the ideal a method can reach at all on that machine.
The table puts each row's measured share beside that ceiling.

Example::

    python benchmarks/decode_cost_model.py \\
        benchmarks/results/smollm2-cpu-prompt-conditioned/generation-frontier/speed.json --out DIR

Writes ``decode_cost_model.md`` and ``.json`` into ``--out`` (default: beside the input).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class StepPoint:
    """One variant's median decode step and the weight bytes it reads per step."""

    variant: str
    bytes: float
    step_s: float
    ideal: float
    speedup: float


@dataclass(frozen=True)
class CostModel:
    """``step_s = fixed_s + bytes / bandwidth`` fitted to the pruned rows, and dense's own fixed cost."""

    fixed_s: float
    bandwidth: float
    dense_fixed_s: float
    dense_step_s: float
    dense_bytes: float
    rms_residual_s: float
    points: int

    def predicted(self, n_bytes: float) -> float:
        """The fitted step time at ``n_bytes``."""
        return self.fixed_s + n_bytes / self.bandwidth

    def ceiling(self, n_bytes: float) -> float:
        """Share of the kept-bytes ideal reachable at ``n_bytes`` with dense's fixed cost per step."""
        speedup = self.dense_step_s / (self.dense_fixed_s + n_bytes / self.bandwidth)
        return speedup / (self.dense_bytes / n_bytes)


def read_points(report: dict[str, Any], batch: int) -> tuple[StepPoint, list[StepPoint]]:
    """(dense, pruned rows) of one batch size of a ``speed.py --generation`` report."""
    rows = [r for r in report.get("rows", []) if r.get("batch") == batch]
    if not rows:
        batches = sorted({r.get("batch") for r in report.get("rows", [])})
        raise SystemExit(f"--batch: no rows at batch {batch}; the report has batches {batches}")
    points = [
        StepPoint(
            variant=r["variant"],
            bytes=float(r["weight_bytes_per_step"]["total"]),
            step_s=float(r["decode_step_median"]["median_s"]),
            ideal=float(r["ideal_decode_speedup"]),
            speedup=float(r["decode_step_median"]["speedup"]),
        )
        for r in rows
    ]
    dense = [p for p in points if p.variant == "dense"]
    if not dense:
        raise SystemExit("the report has no dense row at this batch size; it is the reference")
    pruned = [p for p in points if p.variant != "dense" and p.ideal > 1.0]
    if len({p.bytes for p in pruned}) < 2:
        raise SystemExit("the fit needs pruned rows at two or more kept-byte counts (several ratios)")
    return dense[0], pruned


def fit(dense: StepPoint, pruned: list[StepPoint]) -> CostModel:
    """Least-squares ``step = fixed + bytes / bandwidth`` through ``pruned``; dense's fixed cost."""
    n = len(pruned)
    mean_x = sum(p.bytes for p in pruned) / n
    mean_y = sum(p.step_s for p in pruned) / n
    sxx = sum((p.bytes - mean_x) ** 2 for p in pruned)
    sxy = sum((p.bytes - mean_x) * (p.step_s - mean_y) for p in pruned)
    slope = sxy / sxx
    if slope <= 0:
        raise SystemExit("step time does not grow with the bytes read in this report; no bandwidth to fit")
    fixed = mean_y - slope * mean_x
    residual = (sum((p.step_s - fixed - slope * p.bytes) ** 2 for p in pruned) / n) ** 0.5
    return CostModel(
        fixed_s=fixed,
        bandwidth=1.0 / slope,
        dense_fixed_s=dense.step_s - slope * dense.bytes,
        dense_step_s=dense.step_s,
        dense_bytes=dense.bytes,
        rms_residual_s=residual,
        points=n,
    )


def to_markdown(model: CostModel, dense: StepPoint, pruned: list[StepPoint], source: str) -> str:
    """The fit, then one row per pruned variant: measured and reachable share of the ideal."""
    lines = [
        f"# Decode step cost model ({source})",
        "",
        f"Fit over {model.points} pruned rows: step = {model.fixed_s * 1e3:.2f} ms + bytes / "
        f"{model.bandwidth / 1e9:.1f} GB/s (RMS residual {model.rms_residual_s * 1e3:.2f} ms). Dense: "
        f"{dense.step_s * 1e3:.2f} ms per step, {dense.bytes / 1e6:.0f} MB, so its fixed cost is "
        f"{model.dense_fixed_s * 1e3:.2f} ms ({model.dense_fixed_s / dense.step_s:.0%} of its step).",
        "",
        "| variant | MB per step | step ms (fit) | kept-bytes ideal | speed-up (step median) "
        "| measured / ideal | reachable / ideal with dense's fixed cost |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in sorted(pruned, key=lambda p: (p.bytes, p.variant), reverse=True):
        lines.append(
            f"| {p.variant} | {p.bytes / 1e6:.0f} "
            f"| {p.step_s * 1e3:.2f} ({model.predicted(p.bytes) * 1e3:.2f}) | {p.ideal:.3f} "
            f"| {p.speedup:.3f} | {p.speedup / p.ideal:.3f} | {model.ceiling(p.bytes):.3f} |"
        )
    lines += [
        "",
        "reachable / ideal = dense step / (dense's fixed cost + bytes / fitted bandwidth), over the ideal: "
        "what a method whose only extra cost is the weights it reads could reach. A measured share below "
        "it is fixed cost the pruned path adds over dense's (the fitted fixed cost minus dense's).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("speed_json", type=Path, help="a speed.py --generation speed.json")
    parser.add_argument("--batch", type=int, default=1, help="which batch size's rows (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: beside the input)")
    args = parser.parse_args(argv)
    if not args.speed_json.is_file():
        raise SystemExit(
            f"speed_json: {args.speed_json} is not a file; give a speed.py --generation speed.json"
        )
    report = json.loads(args.speed_json.read_text())
    if report.get("settings", {}).get("mode") != "generation":
        raise SystemExit(f"speed_json: {args.speed_json} is not a --generation report (settings.mode)")
    dense, pruned = read_points(report, args.batch)
    model = fit(dense, pruned)
    out = args.out or args.speed_json.parent
    out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(model, dense, pruned, str(args.speed_json))
    (out / "decode_cost_model.md").write_text(markdown)
    payload = {
        "source": str(args.speed_json),
        "batch": args.batch,
        "fixed_s": model.fixed_s,
        "bandwidth_bytes_per_s": model.bandwidth,
        "dense_fixed_s": model.dense_fixed_s,
        "rms_residual_s": model.rms_residual_s,
        "rows": [
            {
                "variant": p.variant,
                "bytes": p.bytes,
                "step_s": p.step_s,
                "ideal": p.ideal,
                "speedup": p.speedup,
                "reachable_share_of_ideal": model.ceiling(p.bytes),
            }
            for p in pruned
        ],
    }
    (out / "decode_cost_model.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
