"""Runtime under noise: per-pair spreads, unresolved comparisons, and how reports flag them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ppframework import cli
from ppframework.evaluate import EvalRow, RuntimeResult, add_efficiency, noise_note
from ppframework.evaluate.tables import _prr_cell, _ratios, _time_cell
from ppframework.metrics.noise import NOISE_ADVICE, ratio_spread, speedup_unresolved
from ppframework.plotting import QualitySpeedPoint, _x_error, plot_quality_vs_speed

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_ratio_spread_by_hand():
    # pair ratios 0.5, 1.0, 1.5, 2.0 -> inclusive quartiles 0.875, 1.25, 1.625
    spread = ratio_spread([1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0])
    assert spread.pairs == 4
    assert spread.median == pytest.approx(1.25)
    assert (spread.q25, spread.q75) == pytest.approx((0.875, 1.625))
    assert spread.iqr == pytest.approx(0.75)


def test_ratio_spread_edge_cases():
    one = ratio_spread([3.0], [4.0])
    assert (one.median, one.q25, one.q75, one.iqr) == (0.75, 0.75, 0.75, 0.0)
    assert math.isnan(ratio_spread([], []).median)
    with pytest.raises(ValueError, match="2 method times for 1 dense"):
        ratio_spread([1.0, 2.0], [1.0])


def test_the_reported_case_is_flagged():
    # the report: pp 40% at a time ratio of 1.372 with an IQR of 0.628 on a busy 2-core machine
    assert speedup_unresolved(1.372, 0.628)
    assert not speedup_unresolved(0.70, 0.05)  # a clear 30% speed-up
    assert not speedup_unresolved(1.30, 0.05)  # a clear slow-down is real, not noise
    assert speedup_unresolved(0.97, 0.04)  # 3% claimed, 4% spread
    assert speedup_unresolved(math.nan, 0.01)


@given(
    ratio=st.floats(0.05, 3.0),
    iqr=st.floats(0.0, 2.0),
)
def test_unresolved_exactly_when_spread_covers_the_difference(ratio, iqr):
    assert speedup_unresolved(ratio, iqr) == (iqr >= abs(1.0 - ratio))


def test_runtime_result_spread_matches_pairs():
    result = RuntimeResult(method_s=[1.0, 2.0, 3.0, 4.0], dense_s=[2.0] * 4)
    assert result.spread == pytest.approx(0.75)
    assert result.pair_ratios.q25 == pytest.approx(0.875)
    assert RuntimeResult(method_s=[1.0], dense_s=[2.0]).spread == 0.0


def _rows() -> list[EvalRow]:
    noisy = EvalRow(
        "pp 40%", 0.4, perplexity=16.0, time_ratio=1.372, time_ratio_spread=0.628, runtime_unresolved=True
    )
    clear = EvalRow("flap 40%", 0.4, perplexity=30.0, time_ratio=0.6, time_ratio_spread=0.02, static=True)
    return [EvalRow("dense", 0.0, perplexity=10.0), noisy, clear]


def test_table_withholds_figures_built_on_noise():
    rows = _rows()
    add_efficiency(rows, ["flap 40%"])
    dense, noisy, clear = rows
    by_label = {r.method: r for r in rows}
    assert math.isinf(noisy.prr)  # the raw value stays in the row (results.json)
    assert _prr_cell(noisy, noisy.prr) == "\u26a0 noise"  # not "inf"
    assert _ratios(noisy.prr_ratios, noisy, by_label) == "vs flap 40%: \u26a0 noise"  # not "0.00"
    assert _time_cell(noisy) == "1.372 (0.628) \u26a0"
    assert _prr_cell(clear, clear.prr) == "50.000"
    assert _time_cell(clear) == "0.600 (0.020)"
    note = "\n".join(noise_note(rows))
    assert "pp 40%: time ratio 1.372, IQR 0.628" in note and NOISE_ADVICE in note
    assert "flap 40%" not in note
    assert noise_note([dense, clear]) == []


def test_a_real_slowdown_reads_not_faster():
    rows = [
        EvalRow("dense", 0.0, perplexity=10.0),
        EvalRow("x 40%", 0.4, perplexity=12.0, time_ratio=1.3, time_ratio_spread=0.01),
        EvalRow("flap 40%", 0.4, perplexity=30.0, time_ratio=0.6, static=True),
    ]
    add_efficiency(rows, ["flap 40%"])
    slow = rows[1]
    assert _prr_cell(slow, slow.prr) == "not faster"
    assert _ratios(slow.prr_ratios, slow, {r.method: r for r in rows}) == "vs flap 40%: not faster"


def test_baseline_noise_flags_the_comparison():
    rows = [
        EvalRow("dense", 0.0, perplexity=10.0),
        EvalRow("pp 40%", 0.4, perplexity=16.0, time_ratio=0.7, time_ratio_spread=0.01),
        EvalRow(
            "flap 40%",
            0.4,
            perplexity=30.0,
            time_ratio=0.95,
            time_ratio_spread=0.2,
            static=True,
            runtime_unresolved=True,
        ),
    ]
    add_efficiency(rows, ["flap 40%"])
    pp = rows[1]
    assert _prr_cell(pp, pp.prr) == "20.000"  # pp's own figure is resolved
    assert _ratios(pp.prr_ratios, pp, {r.method: r for r in rows}) == "vs flap 40%: \u26a0 noise"


def test_plot_error_bars_and_hollow_points(tmp_path: Path):
    points = [
        QualitySpeedPoint("dense", 0.0, 1.0, 10.0),
        QualitySpeedPoint("pp", 0.4, 0.8, 16.0, time_q25=0.7, time_q75=0.95),
        QualitySpeedPoint("pp", 0.2, 1.1, 12.0, time_q25=0.9, time_q75=1.5, unresolved=True),
    ]
    # x = 1 - time_ratio: the slower quartile extends to the left
    assert _x_error(points[1:2]) == [[pytest.approx(0.15)], [pytest.approx(0.1)]]
    assert _x_error([QualitySpeedPoint("pp", 0.4, 0.8, 16.0)]) is None
    rows = [
        {
            "method": p.method,
            "ratio": p.ratio,
            "time_ratio": p.time_ratio,
            "value": p.value,
            "time_q25": p.time_q25,
            "time_q75": p.time_q75,
            "unresolved": p.unresolved,
        }
        for p in points
    ]
    out = plot_quality_vs_speed(rows, tmp_path / "p.png")
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_threads_option(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        assert cli.main(["--threads", "1", "presets"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert cli.main(["--threads", "0", "presets"]) == 2
