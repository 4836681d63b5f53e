"""``benchmarks/paired_bootstrap.py``: the paired interval by hand, and bad input named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from benchmark_scripts import load_benchmark


def _module() -> Any:
    return load_benchmark("paired_bootstrap")


def test_constant_differences_give_a_point_interval() -> None:
    mean, low, high = _module().paired_interval([0.25] * 7, resamples=200, confidence=0.9, seed=1)
    assert mean == low == high == pytest.approx(0.25)


def test_pairs_only_the_items_both_answered(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = [{"method": "a", "task": "xsum", "item_id": i, "rougeL": 0.5 + 0.1 * (i % 2)} for i in range(6)]
    lines += [{"method": "b", "task": "xsum", "item_id": i, "rougeL": 0.4 + 0.1 * (i % 2)} for i in range(4)]
    path = tmp_path / "generations.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    module = _module()
    assert module.main([str(path), "--pair", "a", "b", "--metrics", "rougeL", "--resamples", "500"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row == "| a | b | rougeL | 4 | +0.1000 | +0.1000 .. +0.1000 | yes |"  # items 0-3, each +0.1
    with pytest.raises(SystemExit, match="--pair: no items for c"):
        module.main([str(path), "--pair", "a", "c"])
    with pytest.raises(SystemExit, match="--metrics: 'rouge9' is missing"):
        module.main([str(path), "--pair", "a", "b", "--metrics", "rouge9"])
    with pytest.raises(SystemExit, match="generations: .* does not exist"):
        module.main([str(tmp_path / "none.jsonl"), "--pair", "a", "b"])
