"""Ablation files: expansion, merge rules, errors before any model loads, and ``ppf ablate``
end to end on a tiny model."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

import ppframework.models
import ppframework.runner
import ppframework.runner.session
from ppframework import cli
from ppframework.ablation import load_ablation
from ppframework.config import PRESETS, MethodConfig
from ppframework.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(ppframework.runner.session, "load_model", forbidden)
    monkeypatch.setattr(ppframework.models.loading, "load_model", forbidden)


def ablation(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "base": {"method": {"preset": "pp", "pruning": {"skip_layers": [0]}}},
        "variants": {"pp": {}, "random-probe": {"strategies": {"select_probe": "random"}}, "flap": "flap"},
        "grid": {"pruning.ratio": [0.2, 0.4]},
    }
    data.update(changes)
    return data


def test_grid_times_variants_in_grid_major_order():
    plan = load_ablation(ablation())
    labels = [p.method.label for p in plan.points]
    assert labels == ["pp 20%", "random-probe 20%", "flap 20%", "pp 40%", "random-probe 40%", "flap 40%"]
    assert [m.label for m in plan.run.methods] == labels
    assert plan.points[4].grid == {"pruning.ratio": 0.4}


def test_variant_overrides_merge_onto_the_base_method():
    plan = load_ablation(ablation())
    random_probe = plan.points[1].method
    assert random_probe.strategies.select_probe.name == "random"
    assert random_probe.strategies.select_probe.params == {}  # residual's params are not carried over
    assert random_probe.strategies.score_channels.name == "ppsp"
    assert random_probe.pruning.skip_layers == [0]
    assert random_probe.history.update == "ema"


def test_preset_variant_keeps_only_the_base_pruning():
    flap = load_ablation(ablation()).points[2].method
    assert flap.strategies.score_channels.name == "flap"
    assert flap.strategies.score_channels.params == {"bias_compensation": True}
    assert flap.history.update == "frozen" and flap.strategies.select_probe.name == "none"
    assert flap.pruning.skip_layers == [0] and flap.pruning.ratio == 0.2


def test_non_ratio_grid_keys_name_the_point():
    plan = load_ablation(ablation(grid={"pruning.round_to": [1, 8]}, variants={"pp": {}}))
    assert [p.method.name for p in plan.points] == ["pp [round_to=1]", "pp [round_to=8]"]
    assert [p.method.pruning.round_to for p in plan.points] == [1, 8]


@pytest.mark.parametrize(
    ("variants", "expected"),
    [
        ({"typo": {"strategies": {"select_probe": "residul"}}}, "variants.typo.strategies.select_probe.name"),
        ({"bad-ratio": {"pruning": {"round_to": 0}}}, "variants.bad-ratio"),
        ({"grid-clash": {"pruning": {"ratio": 0.3}}}, "grid also sets pruning.ratio"),
        ({"no-probe-no-fusion": {"strategies": {"select_probe": "none", "fuse_history": "none"}}}, "'none'"),
        ({"fixed-static": {"strategies": {"fuse_history": "fixed"}, "history": {"init": "none"}}}, "fixed"),
        ({"flap-probe": {"strategies": {"score_channels": "flap"}}}, "flap"),
        ({"bad-param": {"strategies": {"select_probe": {"name": "random", "params": {"k": 3}}}}}, "params.k"),
        ({"unknown": {"pruning": {"raito": 0.3}}}, "variants.unknown"),
        ({"nope": "not-a-preset"}, "unknown preset"),
    ],
)
def test_invalid_variants_fail_at_load_naming_the_variant(variants, expected, no_model_load):
    with pytest.raises(ConfigError) as info:
        load_ablation(ablation(variants=variants))
    message = str(info.value)
    assert f"variants.{next(iter(variants))}" in message and expected in message


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"variants": {}}, "variants"),
        ({"grid": {"pruning.ratio": []}}, "no values"),
        ({"grid": {"pruning.ratio": [0.2, 0.2]}}, "duplicate method labels"),
        ({"extra": 1}, "extra"),
        ({"base": {"methods": [{"preset": "pp"}]}}, "base.methods"),
    ],
)
def test_malformed_ablation_files_are_refused(changes, expected):
    with pytest.raises(ConfigError, match=expected):
        load_ablation(ablation(**changes))


def test_the_shipped_paper_ablation_has_every_variant_at_both_ratios():
    plan = load_ablation(REPO / "configs" / "ablation-paper.yaml")
    variants = {p.variant for p in plan.points}
    # The paper's perplexity table: presets with a dense prefill prune decode steps only (a perplexity
    # window is one decision forward, so it runs dense); they are measured by generation measures.
    expected = {name for name in PRESETS if name != "dense" and PRESETS[name].get("prefill") != "dense"}
    assert variants == expected
    ratios = {(p.variant, p.method.pruning.ratio) for p in plan.points}
    assert ratios == {(v, r) for v in expected for r in (0.2, 0.4)}
    for point in plan.points:  # each variant resolves to its preset's strategies
        preset = MethodConfig(preset=point.variant, pruning={"ratio": point.method.pruning.ratio})
        assert point.method.strategies == preset.strategies
        assert point.method.history == preset.history


def test_ppf_ablate_end_to_end(tmp_path: Path, tiny_model_dir, tiny_text_file: Path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = yaml.safe_load((REPO / "configs" / "ablation-paper.yaml").read_text())
    data["base"]["model"] = {"name": str(tiny_model_dir("llama-gqa")), "device": "cpu"}
    data["base"]["data"] = {
        "name": str(tiny_text_file),
        "seq_len": 32,
        "batch_size": 4,
        "max_batches": 3,
        "window_policy": "contiguous",
    }
    data["base"]["calibration"] = {
        "dataset": str(tiny_text_file),
        "n_samples": 8,
        "batch_size": 4,
        "cache_dir": str(tmp_path / "cache"),
    }
    data["base"]["method"] = {"preset": "pp", "pruning": {"skip_layers": [0]}}
    config = tmp_path / "ablate.yaml"
    config.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    code = cli.main(["ablate", str(config), "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    methods = [row["method"] for row in report["rows"]]
    assert methods[0] == "dense" and len(methods) == 45  # 22 variants at 2 ratios
    assert len(report["settings"]["ablation"]["points"]) == 44
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["method"] for r in rows] == methods
    by_name = {r["method"]: r for r in report["rows"]}
    assert by_name["full-batch 40%"]["probe_flops_share"] > by_name["pp 40%"]["probe_flops_share"] > 0
    assert by_name["wanda-sp 40%"]["static"] and by_name["wanda-sp 40%"]["probe_flops_share"] == 0
    assert by_name["pp 40%"]["ideal_time_ratio"] < by_name["pp 20%"]["ideal_time_ratio"] < 1
    # per sequence, every row pays its own probe (one row of the batch of 4 for pp)
    assert by_name["pp-seq 40%"]["probe_flops_share"] > 3 * by_name["pp 40%"]["probe_flops_share"]
    for row in report["rows"][1:]:  # shortgpt removes floor(0.2 * 4) = 0 of the tiny model's 4 layers at 20%
        assert row["realised_ratio"] > 0 or row["method"] == "shortgpt 20%"
        assert abs(row["delta_perplexity"] - (row["perplexity"] - report["rows"][0]["perplexity"])) < 1e-9
    assert by_name["shortgpt 40%"]["realised_ratio"] == pytest.approx(0.25)  # one layer of four
    assert "| flap 40% (static) |" in printed and (out / "results.md").read_text().startswith("model ")


def test_an_ablation_names_the_example_plugins_strategies(
    tmp_path: Path, tiny_model_dir, tiny_text_file: Path, capsys, monkeypatch
):
    pytest.importorskip("ppf_example_strategies", reason="pip install -e plugins/ppf-example-strategies")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = yaml.safe_load((REPO / "configs" / "ablation-example-plugin.yaml").read_text())
    data["base"]["model"] = {"name": str(tiny_model_dir("llama")), "device": "cpu"}
    data["base"]["data"] = {"name": str(tiny_text_file), "seq_len": 32, "batch_size": 4, "max_batches": 2}
    data["base"]["calibration"] = {"dataset": str(tiny_text_file), "n_samples": 4, "cache_dir": str(tmp_path)}
    data["base"]["method"]["pruning"] = {"skip_layers": [0]}
    config = tmp_path / "plugin.yaml"
    config.write_text(yaml.safe_dump(data))
    plan = load_ablation(config)
    by_variant = {p.variant: p.method for p in plan.points}
    assert by_variant["variance-probe"].strategies.select_probe.name == "variance"
    assert by_variant["ppsp-l1"].strategies.score_channels.name == "ppsp-l1"
    assert cli.main(["ablate", str(config), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for label in ("variance-probe 40%", "ppsp-l1 40%"):
        assert f"| {label} |" in printed
