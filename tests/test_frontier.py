"""The efficiency frontier: config expansion, interpolation at equal runtime, verdicts, end to end."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from ppframework import cli
from ppframework.api import load_config
from ppframework.config import FrontierConfig
from ppframework.errors import ConfigError
from ppframework.evaluate import EvalRow, add_efficiency
from ppframework.evaluate.frontier import (
    FrontierPoint,
    analyse_frontier,
    compare_curves,
    format_frontier,
    interpolate,
)


def test_frontier_generates_every_method_at_every_ratio():
    cfg = load_config(
        {
            "evaluation": {
                "frontier": {
                    "methods": ["pp", {"preset": "flap", "name": "flap-r1", "pruning": {"round_to": 1}}],
                    "ratios": [0.4, 0.2],
                }
            }
        }
    )
    assert [m.label for m in cfg.methods] == ["pp 20%", "pp 40%", "flap-r1 20%", "flap-r1 40%"]
    assert cfg.methods[2].pruning.round_to == 1 and cfg.methods[3].pruning.ratio == 0.4
    assert cfg.evaluation.frontier.ratios == [0.2, 0.4]


@pytest.mark.parametrize(
    ("frontier", "extra", "message"),
    [
        ({"methods": ["pp"]}, {"methods": [{"preset": "pp"}]}, "give either `methods` or"),
        ({"methods": ["pp"], "ratios": [1.5]}, {}, r"evaluation.frontier.ratios: values \[1.5\] outside"),
        ({"methods": ["pp"], "ratios": [0.2], "reference_ratio": 0.4}, {}, "reference_ratio: 0.4 is not one"),
        ({"methods": ["pp", "nope"]}, {}, r"evaluation.frontier.methods\[1\] \('nope'\): unknown preset"),
    ],
)
def test_frontier_config_errors_name_the_field(frontier, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config({"evaluation": {"frontier": frontier}, **extra})


def _curve(*points: tuple[float, float]) -> list[FrontierPoint]:
    return [FrontierPoint(ratio=0.1 * (i + 1), time_ratio=t, perplexity=p) for i, (t, p) in enumerate(points)]


def test_interpolation_is_log_linear_and_never_extrapolates():
    curve = _curve((0.6, 100.0), (0.8, 10.0))
    assert interpolate(curve, 0.7) == pytest.approx(math.sqrt(1000.0))  # geometric mean half-way
    assert interpolate(curve, 0.6) == 100.0 and interpolate(curve, 0.8) == 10.0
    assert interpolate(curve, 0.59) is None and interpolate(curve, 0.81) is None
    assert interpolate([], 0.7) is None


@given(
    times=st.lists(st.floats(0.1, 2.0), min_size=1, max_size=6, unique=True),
    ppls=st.lists(st.floats(1.0, 1e4), min_size=6, max_size=6),
    where=st.floats(0.0, 1.0),
)
def test_interpolated_value_lies_between_the_neighbours(times, ppls, where):
    curve = sorted(
        (FrontierPoint(0.1, t, p) for t, p in zip(times, ppls, strict=False)), key=lambda p: p.time_ratio
    )
    t = curve[0].time_ratio + where * (curve[-1].time_ratio - curve[0].time_ratio)
    value = interpolate(curve, t)
    assert value is not None
    shared = [p.perplexity for p in curve if math.isclose(p.time_ratio, t, abs_tol=1e-12)]
    if shared:  # points within 1e-12 of t share its time ratio: the lowest perplexity, as documented
        assert value == min(shared)
        return
    left = max((p for p in curve if p.time_ratio <= t), key=lambda p: p.time_ratio)
    right = min((p for p in curve if p.time_ratio >= t), key=lambda p: p.time_ratio)
    lo, hi = sorted((left.perplexity, right.perplexity))
    assert lo * (1 - 1e-9) <= value <= hi * (1 + 1e-9)


def test_compare_curves_by_hand():
    method = _curve((0.6, 30.0), (0.8, 12.0))
    base = _curve((0.5, 80.0), (0.7, 25.0), (0.9, 11.0))
    result = compare_curves("pp", method, "flap", base)
    # common range 0.6-0.8; runtimes 0.6, 0.7 (base point) and 0.8
    assert [t for t, _, _ in result.at] == [0.6, 0.7, 0.8]
    base_at_06 = math.exp(0.5 * math.log(80.0) + 0.5 * math.log(25.0))
    assert result.at[0][2] == pytest.approx(base_at_06)  # ~44.7 > 30: method lower
    assert result.at[1][1] == pytest.approx(math.sqrt(30.0 * 12.0))  # ~19.0 < 25
    assert result.at[2][2] == pytest.approx(math.sqrt(25.0 * 11.0))  # ~16.6 > 12
    assert result.below_everywhere is True and result.below_count == 3
    worse = compare_curves("x", _curve((0.6, 60.0), (0.8, 12.0)), "flap", base)
    # 60 > 44.7 at 0.6; sqrt(60 * 12) = 26.8 > 25 at 0.7; 12 < 16.6 at 0.8
    assert worse.below_everywhere is False and worse.below_count == 1
    apart = compare_curves("y", _curve((0.2, 60.0), (0.3, 50.0)), "flap", base)
    assert apart.below_everywhere is None and apart.at == []


def _rows() -> list[EvalRow]:
    def row(name, ratio, t, ppl, static=False, noisy=False):
        return EvalRow(
            f"{name} {ratio:.0%}",
            ratio,
            perplexity=ppl,
            time_ratio=t,
            static=static,
            runtime_unresolved=noisy,
        )

    return [
        EvalRow("dense", 0.0, perplexity=10.0),
        row("pp", 0.2, 0.85, 14.0),
        row("pp", 0.4, 0.70, 20.0),
        row("flap", 0.2, 0.80, 16.0, static=True),
        row("flap", 0.4, 0.62, 40.0, static=True),
        row("wanda-sp", 0.2, 0.80, 18.0, static=True),
        row("wanda-sp", 0.4, 0.62, 60.0, static=True, noisy=True),
        row("full-batch", 0.2, 1.05, 12.0),
        row("full-batch", 0.4, 0.95, 15.0),
    ]


def test_analyse_frontier_picks_the_best_static_baseline_and_reports_prr():
    rows = _rows()
    add_efficiency(rows, ["flap 40%", "wanda-sp 40%", "flap 20%", "wanda-sp 20%"])
    frontier = FrontierConfig(methods=["pp", "flap", "wanda-sp", "full-batch"], ratios=[0.2, 0.4])
    report = analyse_frontier(rows, frontier)
    assert report.baseline == "flap"  # 40 < 60 at 40%
    assert [p.time_ratio for p in report.curves["pp"]] == [0.70, 0.85]
    pp = report.comparisons["pp"]
    assert pp.below_everywhere is True  # at 0.70 and 0.80 pp's interpolated ppl is below flap's
    assert report.reference["pp"]["prr"] == pytest.approx(10.0 / 0.3)
    assert report.reference["pp"]["prr_ratio"] == pytest.approx((30.0 / 0.38) / (10.0 / 0.3))
    assert report.reference["wanda-sp"]["unresolved"] is True
    assert report.comparisons["full-batch"].below_everywhere is None  # no common runtime range
    text = "\n".join(format_frontier(report))
    assert "Baseline: **flap**" in text and "full-batch (oracle)" in text
    assert "| pp | 0.700-0.850 | yes (2 of 2 runtimes) |" in text
    assert "\u26a0 noise" in text  # wanda-sp's figures at 40% rest on an unresolved runtime
    json.dumps(report.to_json())


def test_explicit_baseline_and_missing_static():
    rows = _rows()
    frontier = FrontierConfig(methods=["pp", "wanda-sp"], ratios=[0.2, 0.4], baseline="wanda-sp")
    assert analyse_frontier(rows, frontier).baseline == "wanda-sp"
    none = analyse_frontier(rows, FrontierConfig(methods=["pp", "full-batch"], ratios=[0.2, 0.4]))
    assert none.baseline is None and "no static method" in none.baseline_reason
    assert "no baseline to compare with" in "\n".join(format_frontier(none))


def test_ppf_eval_frontier_end_to_end(tmp_path, tiny_model_dir, tiny_text_file, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = {
        "model": {"name": str(tiny_model_dir("llama")), "device": "cpu"},
        "data": {"name": str(tiny_text_file), "seq_len": 32, "batch_size": 4, "max_batches": 3},
        "calibration": {
            "dataset": str(tiny_text_file),
            "n_samples": 8,
            "batch_size": 4,
            "cache_dir": str(tmp_path / "cache"),
        },
        "methods": [],
        "evaluation": {
            "zeroshot": {"enabled": False},
            "runtime": {"repeats": 2},
            "frontier": {
                "methods": [
                    {"preset": "pp", "pruning": {"skip_layers": [0]}},
                    {"preset": "wanda-sp", "pruning": {"skip_layers": [0]}},
                ],
                "ratios": [0.2, 0.4],
            },
        },
    }
    path = tmp_path / "frontier.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert cli.main(["eval", str(path), "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in report["rows"]] == [
        "dense",
        "pp 20%",
        "pp 40%",
        "wanda-sp 20%",
        "wanda-sp 40%",
    ]
    frontier = report["frontier"]
    assert frontier["baseline"] == "wanda-sp" and set(frontier["curves"]) == {"pp", "wanda-sp"}
    assert len(frontier["curves"]["pp"]) == 2
    assert all(p["time_q25"] is not None for p in frontier["curves"]["pp"])
    assert "### Efficiency frontier" in (out / "results.md").read_text()
    assert (out / "perplexity_vs_runtime.png").exists()
