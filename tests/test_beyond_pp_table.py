"""``benchmarks/beyond_pp_table.py``: the share of the static-to-oracle gap, and rows from several folders."""

from __future__ import annotations

import json
import math

from benchmark_scripts import load_benchmark

table_module = load_benchmark("beyond_pp_table")


def test_gap_closed_by_hand() -> None:
    assert table_module.gap_closed(150.0, 160.0, 120.0) == 0.25
    assert table_module.gap_closed(110.0, 160.0, 120.0) == 1.25  # beyond the oracle
    assert table_module.gap_closed(170.0, 160.0, 120.0) == -0.25
    assert math.isnan(table_module.gap_closed(100.0, 100.0, 120.0))  # static below the oracle: no gap


def _folder(tmp_path, name: str, rows: list[dict]) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"rows": rows}))
    return str(folder)


def test_a_corpus_from_two_folders(tmp_path, monkeypatch, capsys) -> None:
    """Static and oracle rows from one run, new rows from another: the new rows get their share of the
    gap; a row in both keeps the first folder's value."""
    first = _folder(
        tmp_path,
        "statics",
        [
            {"method": "dense", "perplexity": 40.0},
            {"method": "full-batch 40%", "perplexity": 120.0},
            {"method": "flap-uniform 40%", "perplexity": 160.0, "static": True},
            {"method": "wanda-sp 40%", "perplexity": 190.0, "static": True},
            {"method": "pp 40%", "perplexity": 164.0},
        ],
    )
    second = _folder(
        tmp_path,
        "new",
        [{"method": "pp 40%", "perplexity": 999.0}, {"method": "pp-seq 40%", "perplexity": 130.0}],
    )
    monkeypatch.setattr("sys.argv", ["beyond_pp_table.py", f"wikitext2={first},{second}"])
    table_module.main()
    lines = capsys.readouterr().out.splitlines()
    assert "| pp-seq | 130.00 (+75%) |" in lines
    assert "| pp | 164.00 (-10%) |" in lines
    assert "| flap-uniform | 160.00 (+0%) |" in lines
