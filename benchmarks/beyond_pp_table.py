"""The Beyond-PP table: perplexity of each variant of ``configs/beyond-pp.yaml`` on several corpora,
and the share of the static-to-oracle gap it closes.

``python benchmarks/beyond_pp_table.py wikitext2=runs/beyond-pp-wikitext2 c4=runs/beyond-pp-c4
xsum=runs/beyond-pp-xsum`` prints a markdown table. Each folder is an ``ppf ablate --out`` folder;
its ``results.json`` is read (or, while a run is unfinished, its stored points). A corpus may name
several folders, comma-separated (``wikitext2=runs/a,runs/b``: new rows beside the static ones of an
earlier run on the same windows); a method measured in two of them keeps its first folder's value.

gap closed = (static - method) / (static - full-batch), with ``static`` the better of the static
rows (``static-ppsp`` and any other row marked static) at that ratio and corpus.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

ORACLE = "full-batch"


def load_rows(folder: Path) -> list[dict[str, Any]]:
    """The rows of an ablation output folder (results.json, else its stored points)."""
    results = folder / "results.json"
    if results.exists():
        return list(json.loads(results.read_text())["rows"])
    return [json.loads(path.read_text())["row"] for path in sorted((folder / "points").glob("*.json"))]


def split_label(method: str) -> tuple[str, float | None]:
    """``"pp 40%"`` -> (``"pp"``, 0.4); ``"dense"`` -> (``"dense"``, None)."""
    name, _, ratio = method.rpartition(" ")
    if ratio.endswith("%"):
        return name, float(ratio[:-1]) / 100
    return method, None


def gap_closed(value: float, static: float, oracle: float) -> float:
    """Share of the static-to-oracle perplexity gap that ``value`` closes (NaN without a gap)."""
    gap = static - oracle
    return (static - value) / gap if gap > 0 else math.nan


def table(corpora: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: a row per variant, per corpus and ratio the perplexity and the gap closed."""
    values: dict[tuple[str, str, float], float] = {}
    statics: dict[tuple[str, float], float] = {}
    names: list[str] = []
    ratios: set[float] = set()
    for corpus, rows in corpora.items():
        for row in rows:
            name, ratio = split_label(row["method"])
            if ratio is None or row.get("perplexity") is None:
                continue
            ratios.add(ratio)
            if name not in names:
                names.append(name)
            values.setdefault((corpus, name, ratio), float(row["perplexity"]))
            if row.get("static"):
                key = (corpus, ratio)
                statics[key] = min(statics.get(key, math.inf), float(row["perplexity"]))
    order = sorted(ratios)
    header = ["variant"] + [f"{c} {r:.0%}" for r in order for c in corpora]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        cells = [name]
        for ratio in order:
            for corpus in corpora:
                value = values.get((corpus, name, ratio))
                if value is None:
                    cells.append("-")
                    continue
                oracle = values.get((corpus, ORACLE, ratio))
                static = statics.get((corpus, ratio))
                share = (
                    gap_closed(value, static, oracle)
                    if oracle is not None and static is not None and name != ORACLE
                    else math.nan
                )
                cells.append(f"{value:.2f}" + ("" if math.isnan(share) else f" ({share:+.0%})"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpora", nargs="+", help="NAME=FOLDER[,FOLDER...], one per corpus")
    args = parser.parse_args()
    corpora = {}
    for item in args.corpora:
        name, _, folder = item.partition("=")
        if not folder:
            raise SystemExit(f"{item!r}: give NAME=FOLDER[,FOLDER...]")
        corpora[name] = [row for part in folder.split(",") for row in load_rows(Path(part))]
    print(table(corpora))


if __name__ == "__main__":
    main()
