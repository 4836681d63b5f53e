"""``benchmarks/speed.py`` end to end on the tiny model: the report has every documented field, for
the whole-forward benchmark and for ``--generation``; the kept-weight bytes of a decode step by hand.

No timing assertions: this only checks that the benchmark runs and writes what it promises.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark

from ppframework.config import MethodConfig
from ppframework.pipeline import Pipeline
from ppframework.testing.tiny import tiny_model
from ppframework.types import BlockKind, BlockMask

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
        "--op-profile",
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
    assert "Operators by stage, pp 40%" in markdown and "| **probe_forward** | (all) |" in markdown
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
        stages = pp["op_profile"]["stages"]
        assert {"select_probe", "probe_forward", "score_channels", "infer", "outside"} <= stages.keys()
        assert any("mm" in op or "linear" in op for op in stages["probe_forward"])
    assert rows["wanda-sp 40%"]["static"] and "overhead_s" not in rows["wanda-sp 40%"]
    for name, static in (("pp 20%", "wanda-sp 20%"), ("pp 40%", "wanda-sp 40%")):
        paired = rows[name]["over_static_paired"]
        assert list(paired) == [static] and paired[static]["rounds"] == 2
        diffs = [
            (a - b) / rows["dense"]["decoder"]["median_s"]
            for a, b in zip(rows[name]["decoder"]["seconds"], rows[static]["decoder"]["seconds"], strict=True)
        ]
        assert paired[static]["median"] == pytest.approx(sum(diffs) / 2)
    assert "over_static_paired" not in rows["pipeline ratio 0"]
    assert "| pp 40% | wanda-sp 40% |" in markdown
    assert "measured directly over wanda-sp 40% (paired)" in markdown


GENERATION_ROW_KEYS = {
    "variant",
    "batch",
    "method",
    "target_ratio",
    "layer_ratio",
    "static",
    "decode_policy",
    "realised_ratio",
    "kept_units",
    "prefill",
    "decode",
    "generate",
    "decode_tokens_per_s",
    "decode_decoder_layers",
    "decode_step_median",
    "weight_bytes_per_step",
    "ideal_decode_speedup",
    "gain_fraction_of_ideal",
    "speedup_over_ideal",
    "kv_cache_bytes_per_step",
}


def test_generation_benchmark_tiny_end_to_end(tmp_path: Path) -> None:
    """``--generation`` on the tiny model (CPU): prefill and decode timed separately per batch size,
    finite positive ratios, a kept-bytes ideal of exactly 1 at ratio 0 and above 1 when pruning."""
    command = [
        sys.executable,
        str(SCRIPT),
        "--generation",
        "--workload",
        "tiny",
        "--ratios",
        "0",
        "0.4",
        "--gen-batches",
        "1",
        "2",
        "--prompt-len",
        "16",
        "--new-tokens",
        "6",
        "--warmup-new-tokens",
        "2",
        "--repeats",
        "2",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "speed.json").read_text())
    markdown = (tmp_path / "speed.md").read_text()
    assert "| variant | batch |" in markdown and "kept-bytes ideal" in markdown and "Target:" in markdown
    settings = report["settings"]
    assert settings["mode"] == "generation" and settings["workload"] == "tiny"
    assert settings["batches"] == [1, 2] and settings["new_tokens"] == 6 and settings["decode_steps"] == 5
    assert settings["decode"] == "frozen" and settings["static"] == "wanda-sp"
    keys = [(row["variant"], row["batch"]) for row in report["rows"]]
    variants = ["dense", "pp 0%", "wanda-sp 0%", "pp 40%", "wanda-sp 40%"]
    assert keys == [(v, b) for b in (1, 2) for v in variants]
    for row in report["rows"]:
        assert GENERATION_ROW_KEYS <= row.keys(), GENERATION_ROW_KEYS - row.keys()
        assert len(row["prefill"]["seconds"]) == 2 and len(row["decode"]["seconds"]) == 2
        assert row["decode"]["steps"] == 5
        assert [len(call) for call in row["decode_step_median"]["seconds"]] == [5, 5]
        for value in (
            row["prefill"]["ratio"],
            row["decode"]["speedup"],
            row["decode_tokens_per_s"],
            row["ideal_decode_speedup"],
            row["speedup_over_ideal"],
            row["generate"]["ratio"],
            row["decode_decoder_layers"]["speedup"],
            row["decode_decoder_layers"]["ideal_speedup"],
            row["decode_step_median"]["speedup"],
        ):
            assert math.isfinite(value) and value > 0, (row["variant"], value)
    rows = {(row["variant"], row["batch"]): row for row in report["rows"]}
    for batch in (1, 2):
        dense = rows[("dense", batch)]
        assert dense["prefill"]["ratio"] == 1.0 and dense["decode"]["speedup"] == 1.0
        for name in ("dense", "pp 0%", "wanda-sp 0%"):
            assert rows[(name, batch)]["ideal_decode_speedup"] == 1.0
            assert math.isnan(rows[(name, batch)]["gain_fraction_of_ideal"])
        for name in ("pp 40%", "wanda-sp 40%"):
            row = rows[(name, batch)]
            assert row["ideal_decode_speedup"] > 1.0 and 0 < row["realised_ratio"] < 1
            assert math.isfinite(row["gain_fraction_of_ideal"])
        # pp and wanda-sp keep the same number of units: the same ideal
        assert (
            rows[("pp 40%", batch)]["ideal_decode_speedup"]
            == rows[("wanda-sp 40%", batch)]["ideal_decode_speedup"]
        )
        overhead = rows[("pp 40%", batch)]["per_generate_overhead_vs_static"]["wanda-sp"]
        assert math.isfinite(overhead["seconds"]) and overhead["prefill_ratio"] > 0


def test_generation_benchmark_random_weight_path(tmp_path: Path) -> None:
    """The path ``gpu_check.sh`` runs with the 7B shape (a LLaMA built on ``meta`` and materialised with
    random weights, random-token prompts and calibration, no tokenizer), on CPU with the SmolLM2 shape
    cut to 2 layers."""
    command = [
        sys.executable,
        str(SCRIPT),
        "--generation",
        "--workload",
        "smollm2-shape",
        "--layers",
        "2",
        "--skip-layers",
        "0",
        "--ratios",
        "0.4",
        "--gen-batches",
        "2",
        "--prompt-len",
        "16",
        "--new-tokens",
        "4",
        "--warmup-new-tokens",
        "2",
        "--repeats",
        "1",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "speed.json").read_text())
    assert report["settings"]["prompts"] == "2 random-token prompts of 16 tokens"
    assert [row["variant"] for row in report["rows"]] == ["dense", "pp 40%", "wanda-sp 40%"]
    for row in report["rows"][1:]:
        assert row["ideal_decode_speedup"] > 1.0 and math.isfinite(row["decode"]["speedup"])


def _speed_module():
    return load_benchmark("speed", "ppf_speed_benchmark")


@pytest.mark.parametrize("tied", [False, True])
def test_kept_weight_bytes_by_hand(tied: bool) -> None:
    """The decode step's weight bytes on the tiny llama-gqa (hidden 64, 4 layers, 4 heads x 16, 2 kv
    heads, MLP 128, vocabulary 256), counted by hand; a tied LM head is read in full all the same."""
    speed = _speed_module()
    model = tiny_model("llama-gqa", tie_word_embeddings=tied)
    projections = 4 * (2 * 64 * 16 * (4 + 2) + 3 * 64 * 128)  # 147456
    method = MethodConfig.model_validate({"preset": "pp", "pruning": {"skip_layers": [0]}})
    assert projections == Pipeline(model, method).total_prunable_params()
    norms, head = 4 * 2 * 64 + 64, 256 * 64
    dense = speed.decode_weight_bytes(model, {}, batch=3)
    assert dense["projections"] == dense["projections_dense"] == 4 * projections
    assert dense["other"] == 4 * norms and dense["lm_head"] == 4 * head
    assert dense["embedding_rows"] == 4 * 3 * 64
    assert dense["total"] == 4 * (projections + norms + head + 3 * 64)
    masks = {
        (1, BlockKind.ATTENTION): BlockMask(torch.tensor([0, 3]), 4),
        (2, BlockKind.MLP): BlockMask(torch.arange(64), 128),
        (3, BlockKind.ATTENTION): BlockMask(torch.tensor([0, 1]), 4, kept_kv_heads=torch.tensor([0])),
    }
    pruned = speed.decode_weight_bytes(model, masks, batch=3)
    kept = projections - 2 * (2 * 64 * 16) - 64 * 3 * 64 - (2 * (2 * 64 * 16) + 2 * 64 * 16)
    assert pruned["projections"] == 4 * kept
    assert pruned["total"] == 4 * (kept + norms + head + 3 * 64)
    assert speed.kv_cache_bytes(model, {}, batch=2, prompt=10, steps=5) == 2 * 4 * 2 * 16 * 2 * 13 * 4
    assert speed.kv_cache_bytes(model, masks, 2, 10, 5) == 2 * (3 * 2 + 1) * 16 * 2 * 13 * 4


def test_ablation_variants_become_pp_methods_at_the_benchmark_settings(tmp_path: Path) -> None:
    """``--variants-from FILE --variants NAME``: the ablation's own merge on pp, with the benchmark's
    ratio, skipped layers and rounding; unknown names fail with the names the file has."""
    speed = _speed_module()
    args = speed.parse_args(
        ["--variants-from", "configs/beyond-pp.yaml", "--variants", "completion", "momentum-0.9"]
    )
    args.variants_from = str(Path(__file__).resolve().parents[1] / "configs" / "beyond-pp.yaml")
    overrides = speed.ablation_variants(args)
    assert list(overrides) == ["completion", "momentum-0.9"]
    completion = speed.variant(overrides["completion"], 0.4, [0, 1, 2], 8)
    assert completion.strategies.fuse_history.name == "completion"
    assert completion.pruning.ratio == 0.4 and completion.pruning.round_to == 8
    assert completion.pruning.skip_layers == [0, 1, 2]
    assert speed.variant(overrides["momentum-0.9"], 0.2, [0], 1).history.momentum == 0.9
    args.variants = ["pp"]
    with pytest.raises(SystemExit, match="pp would share a row label"):
        speed.ablation_variants(args)
    args.variants = ["no-such-variant"]
    with pytest.raises(SystemExit, match="no-such-variant not in .*it has pp, full-batch"):
        speed.ablation_variants(args)
    args.variants_from = None
    with pytest.raises(SystemExit, match="--variants-from"):
        speed.ablation_variants(args)


def _row(variant, seconds, *, static=False, ratio=0.4, realised=0.35):
    return {
        "variant": variant,
        "method": variant.split()[0],
        "static": static,
        "target_ratio": ratio,
        "realised_ratio": realised,
        "decoder": {"seconds": seconds},
    }


def test_paired_overhead_pairs_rounds_and_only_rows_with_the_same_kept_shapes() -> None:
    """Per-round differences (not a difference of medians), scaled by the dense decoder time; a
    static row at another ratio or with other kept shapes (another allocation) is not paired."""
    speed = _speed_module()
    rows = [
        _row("pp 40%", [1.10, 0.95, 1.30, 1.02]),
        _row("wanda-sp 40%", [1.00, 0.90, 1.20, 1.00], static=True),
        _row("flap 40%", [0.90, 0.90, 0.90, 0.90], static=True, realised=0.37),
        _row("wanda-sp 20%", [1.5, 1.5, 1.5, 1.5], static=True, ratio=0.2, realised=0.17),
    ]
    speed.add_paired_overhead(rows, dense_decoder_s=2.0)
    paired = rows[0]["over_static_paired"]
    assert list(paired) == ["wanda-sp 40%"]
    # differences 0.10, 0.05, 0.10, 0.02 over 2.0: sorted 0.01, 0.025, 0.05, 0.05
    assert paired["wanda-sp 40%"]["median"] == pytest.approx(0.0375)
    assert paired["wanda-sp 40%"]["q25"] == pytest.approx(0.02125)
    assert paired["wanda-sp 40%"]["q75"] == pytest.approx(0.05)
    assert paired["wanda-sp 40%"]["rounds"] == 4
    assert all("over_static_paired" not in r for r in rows[1:])


def test_generation_benchmark_times_dynamic_presets_with_per_row_weight_bytes(tmp_path: Path) -> None:
    """``--dynamic pp-prompt`` (decision: sequence): timed beside pp; at batch 1 the same kept-bytes
    ideal as pp's, at batch 2 each row's kept projections are read (two weight sets per step).
    ``--fresh-pins`` adds the same method with every call's pins in new tensors (the same decision)."""
    options = (
        "--generation --workload tiny --ratios 0.4 --dynamic pp-prompt --static none --gen-batches 1 2 "
        "--fresh-pins --prompt-len 16 --new-tokens 3 --warmup-new-tokens 2 --repeats 1 --threads 1"
    )
    command = [sys.executable, str(SCRIPT), *options.split(), "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {(r["variant"], r["batch"]): r for r in json.loads((tmp_path / "speed.json").read_text())["rows"]}
    assert rows[("pp-prompt 40%", 1)]["weight_sets_per_step"] == 1
    assert rows[("pp-prompt 40%", 2)]["weight_sets_per_step"] == 2
    assert rows[("pp 40%", 2)]["weight_sets_per_step"] == 1
    one, pp_one = rows[("pp-prompt 40%", 1)], rows[("pp 40%", 1)]
    assert one["ideal_decode_speedup"] == pytest.approx(pp_one["ideal_decode_speedup"])
    two, pp_two = rows[("pp-prompt 40%", 2)], rows[("pp 40%", 2)]
    assert two["ideal_decode_speedup"] < pp_two["ideal_decode_speedup"]
    assert two["realised_ratio"] == pytest.approx(pp_two["realised_ratio"])
    fresh = rows[("pp-prompt/fresh-pins 40%", 1)]
    assert fresh["kept_units"] == one["kept_units"] and "per_generate_overhead_vs_static" in fresh


def test_generation_benchmark_preset_shapes_keep_each_presets_own_pruning(tmp_path: Path) -> None:
    """``--preset-shapes``: GRIFFIN keeps its own pruning (every layer's MLP, no width rounding), so the
    timed kept shapes are those the quality runs prune; by default the benchmark's skipped layer 0 and
    rounding apply to every method."""
    options = (
        "--generation --workload tiny --ratios 0.2 --dynamic griffin --static none --gen-batches 1 "
        "--prompt-len 16 --new-tokens 3 --warmup-new-tokens 2 --repeats 1 --threads 1"
    )
    kept = {}
    for flag in ("", "--preset-shapes"):
        out = tmp_path / (flag or "default")
        command = [sys.executable, str(SCRIPT), *options.split(), *flag.split(), "--out", str(out)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads((out / "speed.json").read_text())
        row = next(r for r in report["rows"] if r["variant"] == "griffin 20%")
        kept[flag] = row["kept_units"]
        if flag:
            assert report["settings"]["skip_layers"] == "each preset's own"
    assert "0.mlp" not in kept[""] and "0.mlp" in kept["--preset-shapes"]
    assert not any(key.endswith("attention") for key in kept["--preset-shapes"])
