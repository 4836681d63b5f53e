"""Every configuration shipped in ``configs/`` validates (a run config, or an ablation plan)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import ppframework as ppf
from ppframework.ablation import load_ablation

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs() -> None:
    assert len(CONFIGS) > 10


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_validates(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    if "base" in data or "variants" in data:
        plan = load_ablation(path)
        assert plan is not None
    else:
        cfg = ppf.load_config(path)
        assert cfg.methods
