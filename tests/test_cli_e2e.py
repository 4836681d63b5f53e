"""End-to-end ``ppf`` command line: ``ppf run`` on tiny models and ``ppf strategies``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ppframework import cli
from ppframework.hookspecs import STAGES

FAMILIES = ("llama", "llama-gqa", "opt")
SEQ_LEN = 32
BATCH_SIZE = 4
MAX_BATCHES = 3
WARMUP_BATCHES = 1  # the default


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _write_config(tmp_path: Path, model_dir: Path, text_file: Path) -> Path:
    config: dict[str, Any] = {
        "model": {"name": str(model_dir), "device": "cpu"},
        "data": {
            "name": str(text_file),
            "seq_len": SEQ_LEN,
            "batch_size": BATCH_SIZE,
            "max_batches": MAX_BATCHES,
            "window_policy": "contiguous",
        },
        "calibration": {
            "dataset": str(text_file),
            "n_samples": 8,
            "batch_size": 4,
            "cache_dir": str(tmp_path / "calibration-cache"),
        },
        "methods": [
            {"preset": "pp", "pruning": {"ratio": 0.4, "skip_layers": [0]}},
            {"preset": "pp", "name": "pp-light", "pruning": {"ratio": 0.2}},
        ],
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _run(config: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str, dict[str, Any]]:
    code = cli.main(["run", str(config), "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    results = json.loads((out / "results.json").read_text())
    return captured.out, results


def _table_rows(stdout: str) -> dict[str, list[str]]:
    """Markdown table rows of the stdout, keyed by the method cell (header and rule excluded)."""
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("|") and not line.startswith("|---") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


@pytest.mark.parametrize("family", FAMILIES)
def test_run_dense_and_two_methods(
    family: str,
    tiny_model_dir: Any,
    tiny_text_file: Path,
    tmp_path: Path,
    isolated_cache: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model_dir = tiny_model_dir(family)
    config = _write_config(tmp_path, model_dir, tiny_text_file)
    out = tmp_path / "out"
    stdout, results = _run(config, out, capsys)

    # the markdown table on stdout
    assert (
        "| method | target ratio | per-layer ratio | realised ratio (decoder / model) | perplexity |"
        in stdout
    )
    assert "|---|" in stdout
    table = _table_rows(stdout)
    assert list(table) == ["dense", "pp 40%", "pp-light 20%"]
    assert all(len(cells) == 10 for cells in table.values())
    assert f"wrote {out / 'results.json'}" in stdout
    assert (out / "results.md").read_text().strip() in stdout

    # results.json rows
    rows = {row["method"]: row for row in results["rows"]}
    assert list(rows) == ["dense", "pp 40%", "pp-light 20%"]
    # over the whole model (embeddings included) the same removed weights are a smaller share
    assert 0 < rows["pp 40%"]["realised_ratio_model"] < rows["pp 40%"]["realised_ratio"]
    counts = results["settings"]["resolved"]["parameters"]
    assert counts["model"] == counts["decoder"] + counts["embeddings"] + counts["other"]
    for row in rows.values():
        assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1.0
        assert math.isfinite(row["time_ratio"]) and row["time_ratio"] > 0
        assert row["median_forward_s"] > 0
        assert len(row["batch_seconds"]) == MAX_BATCHES - WARMUP_BATCHES
    dense = rows["dense"]
    assert dense["realised_ratio"] == 0 and dense["target_ratio"] == 0 and dense["layer_ratio"] == 0
    assert dense["time_ratio"] == pytest.approx(1.0)
    assert rows["pp 40%"]["target_ratio"] == pytest.approx(0.4)
    assert rows["pp-light 20%"]["target_ratio"] == pytest.approx(0.2)
    for label in ("pp 40%", "pp-light 20%"):
        assert 0 < rows[label]["realised_ratio"] < 1
        assert rows[label]["layer_ratio"] > 0
    # pp 40% prunes 3 of 4 layers, pp-light 20% only 1 (default skip 0-2): it removes less
    assert rows["pp 40%"]["realised_ratio"] > rows["pp-light 20%"]["realised_ratio"]

    # settings: the resolved config, presets expanded
    settings = results["settings"]
    assert settings["model"]["name"] == str(model_dir)
    assert settings["data"] == {
        **settings["data"],
        "name": str(tiny_text_file),
        "seq_len": SEQ_LEN,
        "batch_size": BATCH_SIZE,
        "max_batches": MAX_BATCHES,
        "window_policy": "contiguous",
    }
    assert settings["calibration"]["n_samples"] == 8
    methods = settings["methods"]
    assert [m["name"] for m in methods] == ["pp", "pp-light"]
    assert methods[0]["pruning"]["skip_layers"] == [0]
    assert methods[1]["pruning"]["skip_layers"] == [0, 1, 2]
    assert methods[0]["strategies"]["select_probe"] == {
        "name": "residual",
        "params": {"seq_ratio": 0.5, "batch_ratio": 0.05},
    }
    assert methods[0]["history"]["momentum"] == 0.99
    resolved = settings["resolved"]
    assert resolved["n_batches"] == MAX_BATCHES
    assert resolved["scored_batches"] == MAX_BATCHES - WARMUP_BATCHES
    assert resolved["tokens_per_batch"] == SEQ_LEN * BATCH_SIZE
    assert resolved["device"] == "cpu" and resolved["dtype"] == "torch.float32"

    # calibration ran and was written to the configured cache
    calibration = results["calibration"]
    assert calibration["n_samples"] == 8 and calibration["seq_len"] == SEQ_LEN
    assert Path(calibration["cache_file"]).is_file()
    assert Path(calibration["cache_file"]).is_relative_to(tmp_path / "calibration-cache")


def test_second_run_reuses_calibration_cache(
    tiny_model_dir: Any,
    tiny_text_file: Path,
    tmp_path: Path,
    isolated_cache: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = _write_config(tmp_path, tiny_model_dir("llama"), tiny_text_file)
    _, first = _run(config, tmp_path / "out1", capsys)
    _, second = _run(config, tmp_path / "out2", capsys)
    assert second["calibration"]["from_cache"] is True
    assert second["calibration"]["cache_file"] == first["calibration"]["cache_file"]
    # the cached history is the same, so the same batches give the same perplexities
    for a, b in zip(first["rows"], second["rows"], strict=True):
        assert a["method"] == b["method"]
        assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-5)
        assert b["realised_ratio"] == pytest.approx(a["realised_ratio"])


def test_first_run_reports_fresh_calibration(
    tiny_model_dir: Any,
    tiny_text_file: Path,
    tmp_path: Path,
    isolated_cache: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = _write_config(tmp_path, tiny_model_dir("llama"), tiny_text_file)
    _, first = _run(config, tmp_path / "out", capsys)
    assert first["calibration"]["from_cache"] is False


def test_run_calibrates_once_without_cache(
    tiny_model_dir: Any,
    tiny_text_file: Path,
    tmp_path: Path,
    isolated_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import ppframework.calibration.orchestration as orchestration

    calls = []
    real = orchestration.calibrate

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(orchestration, "calibrate", counting)
    config = _write_config(tmp_path, tiny_model_dir("llama"), tiny_text_file)
    _, results = _run(config_with(config, "calibration.cache=false"), tmp_path / "out", capsys)
    assert results["calibration"]["from_cache"] is False
    assert len(calls) == 1  # both methods share one dense calibration


def config_with(config: Path, *overrides: str) -> Path:
    """A copy of ``config`` with ``--set``-style overrides applied."""
    from ppframework.config import apply_overrides

    data = apply_overrides(yaml.safe_load(config.read_text()), list(overrides))
    path = config.with_name(f"{config.stem}-override.yaml")
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _check_strategies_listing(text: str) -> None:
    lines = text.splitlines()
    headers = [line for line in lines if line.endswith(":") and not line.startswith(" ")]
    assert headers[: len(STAGES)] == [f"{stage}:" for stage in STAGES]

    def stage_lines(stage: str) -> list[str]:
        start = lines.index(f"{stage}:") + 1
        block = []
        for line in lines[start:]:
            if not line.startswith("  "):
                break
            block.append(line)
        return block

    expected = {
        "select_probe": "residual",
        "score_channels": "ppsp",
        "fuse_history": "importance-scaled",
        "apply_mask": "structured",
        "infer": "sliced",
    }
    for stage, name in expected.items():
        matching = [line for line in stage_lines(stage) if line.split()[0] == name]
        assert len(matching) == 1, (stage, name, stage_lines(stage))
        assert "built-in" in matching[0]


def test_strategies_command_lists_builtins(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["strategies"]) == 0
    _check_strategies_listing(capsys.readouterr().out)


def test_console_script_strategies() -> None:
    script = Path(sys.executable).parent / "ppf"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "ppframework.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command + ["strategies"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    _check_strategies_listing(result.stdout)
