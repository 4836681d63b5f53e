"""PRR arithmetic, its edge cases and the baseline/method ratios."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from ppframework.metrics.efficiency import accuracy_prr, prr, prr_ratio, prr_ratios


def test_prr_arithmetic() -> None:
    # (16.8 - 6.0) / (1 - 0.6/1.0) = 10.8 / 0.4 = 27
    assert prr(16.8, 6.0, 0.6, 1.0) == pytest.approx(27.0)
    # (38.9 - 6.0) / (1 - 3.0/5.0) = 32.9 / 0.4 = 82.25
    assert prr(38.9, 6.0, 3.0, 5.0) == pytest.approx(82.25)
    # Accuracy drop: (64.0 - 56.6) / (1 - 0.5) = 14.8
    assert accuracy_prr(56.6, 64.0, 0.5, 1.0) == pytest.approx(14.8)
    # Faster and better than dense: negative, returned as is: (5.0 - 6.0) / 0.5 = -2
    assert prr(5.0, 6.0, 0.5, 1.0) == pytest.approx(-2.0)


def test_prr_not_faster() -> None:
    assert prr(7.0, 6.0, 1.0, 1.0) == math.inf
    assert prr(7.0, 6.0, 1.2, 1.0) == math.inf
    assert accuracy_prr(50.0, 60.0, 2.0, 1.0) == math.inf
    assert math.isnan(prr(6.0, 6.0, 1.0, 1.0))
    assert math.isnan(prr(5.0, 6.0, 1.5, 1.0))
    assert math.isnan(prr(math.nan, 6.0, 0.5, 1.0))
    with pytest.raises(ValueError, match="time_dense"):
        prr(7.0, 6.0, 0.5, 0.0)


def test_prr_ratio_conventions() -> None:
    assert prr_ratio(82.25, 27.0) == pytest.approx(82.25 / 27.0)
    assert prr_ratio(10.0, 0.0) == math.inf
    assert prr_ratio(0.0, 0.0) == 1.0
    assert prr_ratio(math.inf, 5.0) == math.inf
    assert prr_ratio(5.0, math.inf) == 0.0
    assert math.isnan(prr_ratio(math.inf, math.inf))
    assert math.isnan(prr_ratio(-1.0, 2.0))
    assert math.isnan(prr_ratio(2.0, math.nan))


@dataclass
class Row:
    method: str
    prr: float


def test_prr_ratios_mapping_and_records() -> None:
    prrs = {"pp": 27.0, "flap": 82.25, "wanda-sp": 94.5}
    ratios = prr_ratios(prrs, ["flap", "wanda-sp", "missing"])
    assert set(ratios) == {("pp", "flap"), ("wanda-sp", "flap"), ("pp", "wanda-sp"), ("flap", "wanda-sp")}
    assert ratios[("pp", "flap")] == pytest.approx(82.25 / 27.0)
    assert ratios[("pp", "wanda-sp")] == pytest.approx(3.5)
    assert ratios[("flap", "wanda-sp")] == pytest.approx(94.5 / 82.25)

    records = [{"method": "pp", "prr": 27.0}, Row("flap", 82.25), Row("slow", math.inf)]
    ratios = prr_ratios(records, ["flap"])
    assert ratios == {("pp", "flap"): pytest.approx(82.25 / 27.0), ("slow", "flap"): 0.0}
    with pytest.raises(ValueError, match="appears twice"):
        prr_ratios([Row("pp", 1.0), Row("pp", 2.0)], ["flap"])
