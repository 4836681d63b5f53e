"""``benchmarks/generation_frontier.py``: fidelity joined with interleaved decode speed, by hand.

The join keeps a point only where both sides were measured for the same method name and ratio, the
x value is the median of the per-round time ratios with their quartiles, a speed-up above the
kept-bytes ideal is flagged and not drawn, and bad input is refused with the option named.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from benchmark_scripts import load_benchmark


def _module() -> Any:
    return load_benchmark("generation_frontier")


def _quality_row(label: str, preset: str, ratio: float, top1: tuple[float, float], batch: int = 1) -> dict:
    fidelity = {"xsum": {"top1": top1[0], "kl": 0.1}, "mbpp": {"top1": top1[1], "kl": 0.2}}
    return {"method": label, "preset": preset, "ratio": ratio, "batch_size": batch, "fidelity": fidelity}


def _speed_row(variant: str, ratio: float, seconds: list[float], speedup: float, ideal: float) -> dict:
    return {
        "variant": variant,
        "batch": 1,
        "method": variant.rsplit(" ", 1)[0],
        "target_ratio": ratio,
        "realised_ratio": ratio * 0.9,
        "decode": {"seconds": seconds, "speedup": speedup},
        "ideal_decode_speedup": ideal,
    }


def _files(tmp_path: Path) -> tuple[Path, Path]:
    quality = {
        "rows": [
            _quality_row("dense 0%", "dense", 0.0, (1.0, 1.0)),
            _quality_row("pp-prompt 20%", "pp-prompt", 0.2, (0.8, 0.6)),
            _quality_row("pp-seq 20%", "pp", 0.2, (0.5, 0.5)),  # a named variant of pp: its own name
            _quality_row("pp-prompt 40%", "pp-prompt", 0.4, (0.6, 0.4)),
            _quality_row("pp-prompt 40%", "pp-prompt", 0.4, (0.1, 0.1), batch=8),  # other batch: ignored
            _quality_row("griffin 27%", "griffin", 0.27, (0.9, 0.7)),
        ]
    }
    speed = {
        "settings": {"new_tokens": 8, "prompt_len": 16, "repeats": 4, "threads": 1, "device": "cpu"},
        "rows": [
            _speed_row("dense", 0.0, [2.0, 2.0, 4.0, 2.0], 1.0, 1.0),
            _speed_row("pp-prompt 20%", 0.2, [1.8, 1.6, 4.0, 2.0], 1.1, 1.2),
            _speed_row("pp-prompt/batched 20%", 0.2, [1.0, 1.0, 1.0, 1.0], 2.0, 1.2),  # not the preset
            _speed_row("pp-prompt 40%", 0.4, [1.0, 1.0, 2.0, 1.0], 2.0, 1.5),  # beats its ideal
            _speed_row("wanda-sp 40%", 0.4, [1.6, 1.6, 3.2, 1.6], 1.25, 1.5),
        ],
    }
    qpath, spath = tmp_path / "quality.json", tmp_path / "speed.json"
    qpath.write_text(json.dumps(quality))
    spath.write_text(json.dumps(speed))
    return qpath, spath


def test_join_by_hand(tmp_path: Path) -> None:
    module = _module()
    qpath, spath = _files(tmp_path)
    out = tmp_path / "out"
    assert module.main(["--quality", str(qpath), "--speed", str(spath), "--out", str(out)]) == 0
    report = json.loads((out / "frontier.json").read_text())
    rows = {(r["method"], r["ratio"]): r for r in report["rows"]}
    assert set(rows) == {("pp-prompt", 0.2), ("pp-prompt", 0.4)}
    twenty = rows[("pp-prompt", 0.2)]
    # per-round ratios 0.9, 0.8, 1.0, 1.0: median 0.95, inclusive quartiles 0.875 and 1.0
    assert twenty["time_ratio"] == pytest.approx(0.95)
    assert (twenty["time_q25"], twenty["time_q75"]) == pytest.approx((0.875, 1.0))
    assert twenty["mean_top1"] == pytest.approx(0.7) and not twenty["above_ideal"]
    assert rows[("pp-prompt", 0.4)]["above_ideal"]  # 2.0 > 1.5: flagged
    assert sorted(report["not_measured"]) == [
        "griffin 0.27: no speed row",
        "pp-seq 0.2: no speed row",
        "wanda-sp 0.4: no quality row",
    ]
    text = (out / "frontier.md").read_text()
    assert "above the ideal: not reported" in text
    assert (
        "| pp-prompt | 0.2 | 0.180 | 0.950 (0.875-1.000) (noise) | 1.100 | 1.200 | 0.600 | 0.800 | 0.700 |"
        in text
    )
    assert (out / "generation_frontier.png").stat().st_size > 0


def test_bad_inputs_name_the_option(tmp_path: Path) -> None:
    module = _module()
    qpath, spath = _files(tmp_path)
    with pytest.raises(SystemExit, match="--quality: .* does not exist"):
        module.main(["--quality", str(tmp_path / "nope.json"), "--speed", str(spath), "--out", str(tmp_path)])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"settings": {}}))
    with pytest.raises(SystemExit, match="--speed: .* has no 'rows' list"):
        module.main(["--quality", str(qpath), "--speed", str(bad), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="no dense row at batch 8"):
        module.main(["--quality", str(qpath), "--speed", str(spath), "--batch", "8", "--out", str(tmp_path)])
