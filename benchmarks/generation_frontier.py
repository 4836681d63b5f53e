"""The generation frontier: fidelity to dense against measured decode speed, one curve per method.

Joins two measurements made apart (quality runs tolerate a loaded machine, timing does not):

* quality: ``benchmarks/prompt_conditioned.py``'s ``results.json`` (mean top-1 agreement with dense
  over its prompt sets, each method deciding from the prompt alone), batch ``--batch`` rows;
* speed: ``benchmarks/speed.py --generation``'s ``speed.json`` (decode steps timed interleaved with
  dense in one process; use ``--preset-shapes`` there so the timed kept shapes are the ones the quality
  run pruned).

A point is drawn only where both were measured for the same preset and ratio; the rest are listed as
not measured, never placed at a default. x = decode time relative to dense (median of the per-round
ratios of the interleaved repeats, quartiles as error bars, hollow where that spread is at least the
speed-up); a speed-up above the decode step's kept-weight-bytes ideal is flagged, not reported.

    python benchmarks/generation_frontier.py --quality runs/gen-frontier-fidelity/results.json \\
        --speed runs/gen-frontier-speed/speed.json --out benchmarks/results/<folder>
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from ppframework.outputs import atomic_write_text, write_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``--help`` lists every option)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quality", required=True, help="prompt_conditioned.py results.json")
    parser.add_argument("--speed", required=True, help="speed.py --generation speed.json")
    parser.add_argument("--batch", type=int, default=1, help="batch size of the rows to join (default 1)")
    parser.add_argument("--out", required=True, help="folder for frontier.md, frontier.json and the plot")
    parser.add_argument("--title", default=None, help="plot title")
    return parser.parse_args(argv)


def _load(path: str, what: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"--{what}: {path} does not exist")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise SystemExit(f"--{what}: {path} is not JSON ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise SystemExit(f"--{what}: {path} has no 'rows' list; expected the {what} benchmark's output")
    return data


def _key(label: str, ratio: float) -> tuple[str, float]:
    """(method name, ratio) of a row labelled ``"<name> <ratio>%"`` (``pp-seq 20%``: ``pp-seq``, not its
    preset ``pp``), so named variants of one preset stay apart."""
    name = label.rsplit(" ", 1)[0] if label.endswith("%") else label
    return name, round(float(ratio), 4)


def mean_top1(fidelity: dict[str, Any] | None) -> float | None:
    """The unweighted mean over prompt sets of top-1 agreement (None: no fidelity was measured)."""
    if not fidelity:
        return None
    values = [entry["top1"] for entry in fidelity.values() if isinstance(entry, dict) and "top1" in entry]
    return sum(values) / len(values) if values else None


def quality_points(report: dict[str, Any], batch: int) -> dict[tuple[str, float], dict[str, Any]]:
    """(method name, ratio) -> the quality row's mean top-1 and per-set top-1, at ``batch``."""
    points: dict[tuple[str, float], dict[str, Any]] = {}
    for row in report["rows"]:
        if row.get("batch_size") != batch:
            continue
        value = mean_top1(row.get("fidelity"))
        if value is None:
            continue
        sets = {name: entry["top1"] for name, entry in row["fidelity"].items()}
        points[_key(row["method"], row["ratio"])] = {"label": row["method"], "mean_top1": value, "top1": sets}
    return points


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def speed_points(report: dict[str, Any], batch: int) -> dict[tuple[str, float], dict[str, Any]]:
    """(method name, ratio) -> decode time relative to dense (median and quartiles of the per-round ratios of
    the interleaved repeats), the speed-up, the kept-bytes ideal, at ``batch``."""
    rows = [r for r in report["rows"] if r.get("batch") == batch]
    dense = next((r for r in rows if r["variant"] == "dense"), None)
    if dense is None:
        raise SystemExit(f"--speed: no dense row at batch {batch}; run speed.py --gen-batches {batch}")
    base = dense["decode"]["seconds"]
    points: dict[tuple[str, float], dict[str, Any]] = {}
    for row in rows:
        if row["variant"] == "dense" or "/" in row["variant"]:  # "/": another sequence_decode kernel
            continue
        seconds = row["decode"]["seconds"]
        ratios = [m / d for m, d in zip(seconds, base, strict=False)]
        q25, q75 = _quartiles(ratios)
        ideal = float(row["ideal_decode_speedup"])
        speedup = float(row["decode"]["speedup"])
        points[_key(row["variant"], row["target_ratio"])] = {
            "label": row["variant"],
            "time_ratio": statistics.median(ratios),
            "time_q25": q25,
            "time_q75": q75,
            "decode_speedup": speedup,
            "ideal_speedup": ideal,
            "above_ideal": speedup > ideal,
            "realised_ratio": row.get("realised_ratio"),
        }
    return points


def join(
    quality: dict[tuple[str, float], dict[str, Any]], speed: dict[tuple[str, float], dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[str]]:
    """The frontier rows (both measured, sorted by method then ratio) and what was measured on one side
    only."""
    rows, missing = [], []
    for key in sorted(set(quality) | set(speed)):
        name, ratio = key
        if name == "dense":
            continue
        q, s = quality.get(key), speed.get(key)
        if q is None or s is None:
            missing.append(f"{name} {ratio:g}: no {'quality' if q is None else 'speed'} row")
            continue
        rows.append({"method": name, "ratio": ratio, **s, "mean_top1": q["mean_top1"], "top1": q["top1"]})
    return rows, missing


def markdown(rows: list[dict[str, Any]], missing: list[str], settings: dict[str, Any]) -> str:
    """The frontier table and its notes."""
    sets = sorted({name for row in rows for name in row["top1"]})
    head = "| method | ratio | realised | decode time / dense (IQR) | decode speed-up | kept-bytes ideal |"
    head += "".join(f" top-1 {name} |" for name in sets) + " mean top-1 |"
    lines = [
        f"Generation frontier, batch {settings['batch']}: quality from `{settings['quality']}`, decode speed "
        f"from `{settings['speed']}` ({settings['speed_settings']}).",
        "",
        head,
        "|" + "---|" * (7 + len(sets)),
    ]
    for row in rows:
        speedup = "above the ideal: not reported" if row["above_ideal"] else f"{row['decode_speedup']:.3f}"
        noisy = " (noise)" if row["time_q75"] - row["time_q25"] >= abs(1.0 - row["time_ratio"]) else ""
        realised = f"{row['realised_ratio']:.3f}" if row.get("realised_ratio") is not None else "-"
        cells = [
            row["method"],
            f"{row['ratio']:g}",
            realised,
            f"{row['time_ratio']:.3f} ({row['time_q25']:.3f}-{row['time_q75']:.3f}){noisy}",
            speedup,
            f"{row['ideal_speedup']:.3f}",
            *(f"{row['top1'][name]:.3f}" if name in row["top1"] else "-" for name in sets),
            f"{row['mean_top1']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "realised = share of the decoder's prunable projection weights a decode step skips; decode time / "
        "dense = median over the interleaved rounds of (method decode s / dense decode s), quartiles in "
        "brackets, (noise) where that spread is at least the speed-up; kept-bytes ideal = the decode "
        "step's weight bytes, dense / method.",
    ]
    if missing:
        lines += ["", "Not measured on both sides (no point drawn): " + "; ".join(missing) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Join, write ``frontier.json``, ``frontier.md`` and ``generation_frontier.png`` into ``--out``."""
    args = parse_args(argv)
    quality_report, speed_report = _load(args.quality, "quality"), _load(args.speed, "speed")
    quality = quality_points(quality_report, args.batch)
    speed = speed_points(speed_report, args.batch)
    rows, missing = join(quality, speed)
    if not rows:
        raise SystemExit(
            f"no (method, ratio) at batch {args.batch} was measured in both files; quality has "
            f"{sorted(quality)}, speed has {sorted(speed)}"
        )
    s = speed_report.get("settings", {})
    settings = {
        "batch": args.batch,
        "quality": args.quality,
        "speed": args.speed,
        "speed_settings": f"{s.get('new_tokens')} new tokens after {s.get('prompt_len')}-token prompts, "
        f"{s.get('repeats')} interleaved repeats, {s.get('threads')} threads, {s.get('device')}",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "frontier.json", {"settings": settings, "rows": rows, "not_measured": missing})
    atomic_write_text(out / "frontier.md", markdown(rows, missing, settings))
    from ppframework.plotting import plot_fidelity_vs_runtime

    points = [{"method": "dense", "ratio": 0.0, "time_ratio": 1.0, "value": 1.0}]
    for row in rows:
        if row["above_ideal"]:
            continue  # beats its physical limit: flagged in the table, not drawn
        unresolved = row["time_q75"] - row["time_q25"] >= abs(1.0 - row["time_ratio"])
        points.append(
            {
                "method": row["method"],
                "ratio": row["ratio"],
                "time_ratio": row["time_ratio"],
                "time_q25": row["time_q25"],
                "time_q75": row["time_q75"],
                "unresolved": unresolved,
                "value": row["mean_top1"],
            }
        )
    title = args.title or f"fidelity to dense vs decode time, batch {args.batch}"
    plot_fidelity_vs_runtime(points, out / "generation_frontier.png", title=title)
    print(f"wrote {out / 'frontier.md'} (+ frontier.json, generation_frontier.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
