"""``benchmarks/decode_cost_model.py``: the per-step cost fit and the reachable share of the ideal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

MODEL = load_benchmark("decode_cost_model")


def _row(
    variant: str, n_bytes: float, step: float, dense_step: float = 11.0, dense_bytes: float = 100.0
) -> dict:
    return {
        "variant": variant,
        "batch": 1,
        "weight_bytes_per_step": {"total": n_bytes},
        "decode_step_median": {"median_s": step, "speedup": dense_step / step},
        "ideal_decode_speedup": dense_bytes / n_bytes,
    }


def _report() -> dict:
    # pruned steps: 2 s fixed + bytes / (10 bytes/s); dense: 1 s fixed + 100 / 10
    return {
        "settings": {"mode": "generation"},
        "rows": [
            _row("dense", 100.0, 11.0),
            _row("a 20%", 80.0, 10.0),
            _row("b 40%", 60.0, 8.0),
            _row("c 40%", 60.0, 8.0),
        ],
    }


def test_fit_and_ceiling_by_hand() -> None:
    dense, pruned = MODEL.read_points(_report(), batch=1)
    model = MODEL.fit(dense, pruned)
    assert model.fixed_s == pytest.approx(2.0)
    assert model.bandwidth == pytest.approx(10.0)
    assert model.dense_fixed_s == pytest.approx(1.0)
    assert model.rms_residual_s == pytest.approx(0.0, abs=1e-12)
    # at 60 bytes: 11 / (1 + 6) = 1.5714 against the ideal 100 / 60 = 1.6667
    assert model.ceiling(60.0) == pytest.approx((11.0 / 7.0) / (100.0 / 60.0))
    table = MODEL.to_markdown(model, dense, pruned, "x")
    assert "| b 40% | 0 | 8000.00 (8000.00) | 1.667 | 1.375 | 0.825 | 0.943 |" in table


def test_cli_writes_both_files(tmp_path: Path) -> None:
    source = tmp_path / "speed.json"
    source.write_text(json.dumps(_report()))
    assert MODEL.main([str(source), "--out", str(tmp_path / "out")]) == 0
    payload = json.loads((tmp_path / "out" / "decode_cost_model.json").read_text())
    assert payload["fixed_s"] == pytest.approx(2.0) and len(payload["rows"]) == 3
    assert (tmp_path / "out" / "decode_cost_model.md").is_file()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["rows"].pop(0), "no dense row"),
        (lambda r: r["rows"].pop(3), None),  # still two byte counts: fine
        (lambda r: [r["rows"].pop(1)] and r["rows"].pop(1), "two or more kept-byte counts"),
        (lambda r: r["settings"].update(mode="forward"), "settings.mode"),
    ],
)
def test_bad_reports_name_the_problem(tmp_path: Path, change, message) -> None:
    report = _report()
    change(report)
    source = tmp_path / "speed.json"
    source.write_text(json.dumps(report))
    if message is None:
        assert MODEL.main([str(source), "--out", str(tmp_path)]) == 0
        return
    with pytest.raises(SystemExit, match=message):
        MODEL.main([str(source), "--out", str(tmp_path)])


def test_a_batch_without_rows_is_named(tmp_path: Path) -> None:
    source = tmp_path / "speed.json"
    source.write_text(json.dumps(_report()))
    with pytest.raises(SystemExit, match="--batch: no rows at batch 8"):
        MODEL.main([str(source), "--batch", "8"])
