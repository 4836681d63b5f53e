"""``benchmarks/speed.py`` end to end on the tiny model: the report has every documented field.

No timing assertions: this only checks that the benchmark runs and writes what it promises.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"

ROW_KEYS = {
    "variant",
    "method",
    "target_ratio",
    "layer_ratio",
    "static",
    "realised_ratio",
    "whole",
    "decoder",
    "tokens_per_s",
    "memory",
    "flops",
    "probe_flops_share",
    "probe_net_flops_share",
    "ideal_ratio_decoder",
    "ideal_ratio_whole",
    "ideal_ratio_decoder_with_probe",
    "realisation_decoder",
    "realisation_whole",
}
OVERHEAD = {"selection", "probe forward", "scoring and fusion", "gather", "history update", "total"}


def test_speed_benchmark_tiny_end_to_end(tmp_path: Path) -> None:
    command = [
        sys.executable,
        str(SCRIPT),
        "--workload",
        "tiny",
        "--ratios",
        "0.2",
        "0.4",
        "--repeats",
        "2",
        "--profile-forwards",
        "1",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "speed.json").read_text())
    markdown = (tmp_path / "speed.md").read_text()
    assert "| variant |" in markdown and "Targets:" in markdown
    settings = report["settings"]
    assert settings["workload"] == "tiny" and settings["batch"] == 4 and settings["seq"] == 64
    assert settings["device"] == "cpu" and settings["static"] == "wanda-sp"
    variants = [row["variant"] for row in report["rows"]]
    assert variants == ["dense", "pipeline ratio 0", "pp 20%", "wanda-sp 20%", "pp 40%", "wanda-sp 40%"]
    for row in report["rows"]:
        assert ROW_KEYS <= row.keys(), ROW_KEYS - row.keys()
        assert {"median_s", "ratio", "seconds"} <= row["whole"].keys()
        assert len(row["decoder"]["seconds"]) == 2
        assert row["memory"]["peak_bytes"] is None or row["memory"]["peak_bytes"] > 0
    rows = {row["variant"]: row for row in report["rows"]}
    assert rows["dense"]["whole"]["ratio"] == 1.0
    for name in ("pp 20%", "pp 40%"):
        pp = rows[name]
        assert OVERHEAD == set(pp["overhead_share_of_dense_decoder"])
        assert 0 < pp["ideal_ratio_decoder"] < 1 and pp["probe_flops_share"] > 0
        assert pp["flops"]["probe_reused"] > 0  # CPU: the probe's exact values are reused
    assert rows["wanda-sp 40%"]["static"] and "overhead_s" not in rows["wanda-sp 40%"]
