"""Compare frontier curves taken from several ``ppf eval`` runs at equal measured runtime.

Each run's points are timed against dense in interleaved pairs inside that run, so a point's time
ratio is comparable across runs of the same protocol on the same machine up to the machine's noise
(about +-5% here); the comparison says which run each curve came from. For every method of
``--methods`` and every baseline of ``--baselines``: the perplexity of both at each measured runtime
in their common range (log-linear interpolation along each curve, as ``ppf eval``'s frontier does) and
how many of those runtimes the method is lower at.

    python benchmarks/frontier_compare.py \\
        --run benchmarks/results/smollm2-cpu-frontier/results.json pp static-ppsp flap-uniform wanda-sp \\
        --run benchmarks/results/smollm2-cpu-broader-baselines/frontier/results.json taylor shortgpt \\
        --methods taylor shortgpt --baselines pp static-ppsp flap-uniform wanda-sp
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ppframework.evaluate.frontier import FrontierPoint, compare_curves


def read_curves(path: Path, methods: list[str]) -> dict[str, list[FrontierPoint]]:
    """The frontier curve (sorted by time ratio) of each of ``methods`` in a ``results.json``."""
    curves: dict[str, list[FrontierPoint]] = {}
    for row in json.loads(path.read_text())["rows"]:
        name = row["method"].split(" ")[0]
        if name in methods and row.get("time_ratio") is not None and row.get("perplexity") is not None:
            curves.setdefault(name, []).append(
                FrontierPoint(
                    ratio=row["target_ratio"],
                    time_ratio=row["time_ratio"],
                    perplexity=row["perplexity"],
                    time_q25=row.get("time_ratio_q25"),
                    time_q75=row.get("time_ratio_q75"),
                    unresolved=bool(row.get("runtime_unresolved")),
                )
            )
    missing = sorted(set(methods) - set(curves))
    if missing:
        raise SystemExit(f"--run {path}: no timed rows for {', '.join(missing)}")
    return {name: sorted(points, key=lambda p: p.time_ratio) for name, points in curves.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run",
        nargs="+",
        action="append",
        required=True,
        metavar=("RESULTS_JSON", "METHOD"),
        help="a results.json and the methods to take from it (repeatable)",
    )
    parser.add_argument("--methods", nargs="+", required=True, help="methods to compare")
    parser.add_argument("--baselines", nargs="+", required=True, help="methods to compare them against")
    parser.add_argument("--out", type=Path, default=None, help="write the tables to this markdown file")
    args = parser.parse_args(argv)
    curves: dict[str, list[FrontierPoint]] = {}
    source: dict[str, str] = {}
    for path, *methods in args.run:
        for name, curve in read_curves(Path(path), methods).items():
            curves[name], source[name] = curve, path
    for name in (*args.methods, *args.baselines):
        if name not in curves:
            raise SystemExit(f"{name}: not taken from any --run")
    lines = [
        "| method | baseline | lower at | runtimes (time ratio: method / baseline perplexity) |",
        "|---|---|---|---|",
    ]
    for method in args.methods:
        for baseline in args.baselines:
            comparison = compare_curves(method, curves[method], baseline, curves[baseline])
            cells = ", ".join(f"{t:.3f}: {m:.1f} / {b:.1f}" for t, m, b in comparison.at)
            lines.append(
                f"| {method} | {baseline} | {comparison.below_count} of {len(comparison.at)} | {cells} |"
            )
    lines.append("")
    lines += [f"- {name}: {source[name]}" for name in sorted(curves)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
