"""The quality-versus-speed plot writes a valid PNG."""

from __future__ import annotations

from pathlib import Path

import pytest

from ppframework.plotting import QualitySpeedPoint, plot_quality_vs_speed

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_writes_png(tmp_path: Path) -> None:
    rows = [
        {"method": "dense", "ratio": 0.0, "time_ratio": 1.0, "value": 6.0},
        {"method": "pp", "ratio": 0.2, "time_ratio": 0.85, "value": 8.1},
        {"method": "pp", "ratio": 0.4, "time_ratio": 0.7, "value": 16.8},
        QualitySpeedPoint("flap", 0.4, 0.6, 38.9),
    ]
    out = plot_quality_vs_speed(rows, tmp_path / "sub" / "plot.png", "perplexity", "test", log_y=True)
    data = out.read_bytes()
    assert out == tmp_path / "sub" / "plot.png"
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 1000


def test_bad_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="time_ratio"):
        plot_quality_vs_speed([{"method": "pp", "ratio": 0.2}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="no rows"):
        plot_quality_vs_speed([], tmp_path / "x.png")
