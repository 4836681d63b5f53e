"""``ppf eval``: the whole protocol end to end on a tiny model, its report files, and the
efficiency bookkeeping."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

import ppframework.evaluate
import ppframework.models
from ppframework import cli
from ppframework.api import load_config
from ppframework.errors import ConfigError
from ppframework.evaluate import EvalRow, add_efficiency, check_tasks
from ppframework.metrics.efficiency import prr

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TASKS = ["boolq", "winogrande", "arc_easy", "openbookqa"]  # short continuations for the char-level tokenizer


def eval_config(tmp_path: Path, model_dir: Path, text_file: Path, **evaluation: Any) -> dict[str, Any]:
    return {
        "model": {"name": str(model_dir), "device": "cpu"},
        "data": {
            "name": str(text_file),
            "seq_len": 32,
            "batch_size": 4,
            "max_batches": 3,
            "window_policy": "contiguous",
        },
        "calibration": {
            "dataset": str(text_file),
            "n_samples": 8,
            "batch_size": 4,
            "seq_len": 100,
            "cache_dir": str(tmp_path / "cache"),
        },
        "methods": [
            {"preset": "pp", "pruning": {"ratio": 0.4, "skip_layers": [0]}},
            {"preset": "flap", "pruning": {"ratio": 0.4, "skip_layers": [0]}},
        ],
        "evaluation": {"zeroshot": {"limit": 2, "batch_size": 4, "tasks": TASKS}, "runtime": {"repeats": 2}}
        | evaluation,
    }


def test_ppf_eval_end_to_end(tmp_path, tiny_model_dir, tiny_text_file, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump(eval_config(tmp_path, tiny_model_dir("llama-gqa"), tiny_text_file)))
    out = tmp_path / "out"
    assert cli.main(["eval", str(config), "--out", str(out), "--no-progress", "--limit", "3"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "results.json").read_text())
    rows = {row["method"]: row for row in report["rows"]}
    assert list(rows) == ["dense", "pp 40%", "flap 40%"]
    assert report["baselines"] == ["flap 40%"]  # static methods are the default baselines
    assert report["settings"]["evaluation"]["zeroshot"]["limit"] == 3
    dense, pp, flap = rows["dense"], rows["pp 40%"], rows["flap 40%"]
    for row in rows.values():
        assert set(row["accuracy"]) == set(TASKS)
        assert all(v["n_items"] == 3 for v in row["accuracy"].values())
        assert math.isclose(row["mean_acc"], sum(v["acc"] for v in row["accuracy"].values()) / len(TASKS))
        assert row["perplexity"] > 1 and row["peak_memory_bytes"] > 0
    assert pp["flops"]["probe_share"] > 0 and flap["flops"]["probe_share"] == 0
    assert pp["ideal_time_ratio"] < 1 and flap["static"] and not pp["static"]
    expected_prr = prr(pp["perplexity"], dense["perplexity"], pp["time_ratio"], 1.0)
    if pp["prr"] is None:  # results.json is strict JSON: NaN/inf are written as null
        assert not math.isfinite(expected_prr)
    else:
        assert pp["prr"] == pytest.approx(expected_prr)
    assert set(pp["prr_ratios"]) <= {"flap 40%"}
    with (out / "results.csv").open() as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [r["method"] for r in csv_rows] == list(rows) and "acc_boolq" in csv_rows[0]
    for name in ("perplexity_vs_runtime.png", "accuracy_vs_runtime.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    markdown = (out / "results.md").read_text()
    assert "| flap 40% (static) |" in markdown and "first 3 items per task" in markdown
    assert "| method | boolq | winogrande | arc_easy | openbookqa | mean |" in printed


def test_unknown_task_fails_before_the_model_loads(tmp_path, monkeypatch):
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("model loaded")

    monkeypatch.setattr(ppframework.evaluate.protocol, "load_model", forbidden)
    monkeypatch.setattr(ppframework.models.loading, "load_model", forbidden)
    cfg = load_config({"evaluation": {"zeroshot": {"tasks": ["boolq", "mmlu"]}}})
    with pytest.raises(ConfigError, match=r"evaluation.zeroshot.tasks\[1\].*mmlu"):
        ppframework.evaluate.evaluate(cfg, progress=False)


def test_baselines_must_name_methods_of_the_run():
    cfg = load_config({"methods": [{"preset": "pp"}], "evaluation": {"baselines": ["flap 40%"]}})
    with pytest.raises(ConfigError, match="evaluation.baselines: 'flap 40%' is not one of"):
        check_tasks(cfg)


def test_efficiency_against_same_ratio_baselines_by_hand():
    rows = [
        EvalRow("dense", 0.0, perplexity=10.0, mean_acc=0.60),
        EvalRow("pp 40%", 0.4, perplexity=16.0, mean_acc=0.55, time_ratio=0.75),
        EvalRow("flap 40%", 0.4, perplexity=30.0, mean_acc=0.50, time_ratio=0.6, static=True),
        EvalRow("flap 20%", 0.2, perplexity=12.0, mean_acc=0.58, time_ratio=0.9, static=True),
    ]
    add_efficiency(rows, ["flap 40%", "flap 20%"])
    pp, flap40, flap20 = rows[1], rows[2], rows[3]
    assert math.isclose(pp.prr, 6.0 / 0.25) and math.isclose(flap40.prr, 20.0 / 0.4)
    assert math.isclose(flap20.prr, 2.0 / 0.1)
    assert math.isclose(pp.accuracy_prr, 0.05 / 0.25) and math.isclose(flap40.accuracy_prr, 0.10 / 0.4)
    assert pp.prr_ratios == pytest.approx({"flap 40%": 50.0 / 24.0})  # 20% baseline not compared
    assert pp.accuracy_prr_ratios == pytest.approx({"flap 40%": 0.25 / 0.2})
    assert flap40.prr_ratios == {} and flap20.prr_ratios == {}
