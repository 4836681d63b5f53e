"""``benchmarks/fidelity_bootstrap.py``: paired intervals of prompt_conditioned.py's measures."""

from __future__ import annotations

import json
import math

import pytest

from tests.benchmark_scripts import load_benchmark

boot = load_benchmark("fidelity_bootstrap")


def row(method: str, sets: dict[str, list[tuple[float, float, int]]], windows: list[float] | None = None):
    """A prompt_conditioned.py row with per-prompt (top-1, KL, tokens) and per-window NLLs."""
    fidelity = {}
    for name, prompts in sets.items():
        tokens = sum(t for *_, t in prompts)
        fidelity[name] = {
            "top1": sum(a * t for a, _, t in prompts) / tokens,
            "kl": sum(k * t for _, k, t in prompts) / tokens,
            "tokens": tokens,
            "per_prompt": [{"top1": a, "kl": k, "tokens": t} for a, k, t in prompts],
        }
    ppl = {}
    if windows is not None:
        tokens = 10 * len(windows)
        ppl["c4"] = {
            "perplexity": math.exp(sum(windows) / tokens),
            "nll_sum": sum(windows),
            "tokens": tokens,
            "windows": len(windows),
            "window_nll": windows,
        }
    return {"method": method, "batch_size": 1, "fidelity": fidelity, "continuation_perplexity": ppl}


def write(tmp_path, rows):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"settings": {}, "rows": rows}))
    return str(path)


def test_the_mean_is_the_unweighted_mean_of_the_sets_token_weighted_values(tmp_path):
    a = row("a", {"x": [(1.0, 0.0, 30), (0.0, 2.0, 10)], "y": [(0.5, 1.0, 8)]})
    b = row("b", {"x": [(0.5, 1.0, 30), (0.5, 1.0, 10)], "y": [(0.5, 1.0, 8)]})
    lines = boot.compare_fidelity(a, b, 200, 0.95, 0)
    top1, kl = lines
    # set x: a 30/40 = 0.75, set y 0.5 -> mean 0.625; b 0.5
    assert top1["a"] == pytest.approx(0.625) and top1["b"] == pytest.approx(0.5)
    assert top1["effect"] == pytest.approx(0.125)
    assert kl["a"] == pytest.approx((20 / 40 + 1.0) / 2) and kl["b"] == pytest.approx(1.0)


def test_a_consistent_lead_is_resolved_and_a_coin_flip_is_not(tmp_path):
    prompts = 12
    lead_a = row("a", {"x": [(0.8, 0.1, 32)] * prompts}, [20.0] * 8)
    lead_b = row("b", {"x": [(0.6, 0.3, 32)] * prompts}, [22.0] * 8)
    top1, kl = boot.compare_fidelity(lead_a, lead_b, 500, 0.95, 0)
    assert top1["resolved"] and top1["low"] > 0 and kl["resolved"] and kl["high"] < 0
    (ppl,), skipped = boot.compare_continuation(lead_a, lead_b, 500, 0.95, 0)
    assert not skipped and ppl["resolved"] and ppl["high"] < 1
    assert ppl["effect"] == pytest.approx(math.exp(-2.0 / 10))
    mixed_a = row("a", {"x": [(0.9, 0.1, 32), (0.5, 0.1, 32)] * 6}, [20.0, 24.0] * 4)
    mixed_b = row("b", {"x": [(0.5, 0.1, 32), (0.9, 0.1, 32)] * 6}, [24.0, 20.0] * 4)
    top1, _ = boot.compare_fidelity(mixed_a, mixed_b, 500, 0.95, 0)
    assert top1["effect"] == pytest.approx(0.0) and not top1["resolved"]
    (ppl,), _ = boot.compare_continuation(mixed_a, mixed_b, 500, 0.95, 0)
    assert ppl["effect"] == pytest.approx(1.0) and ppl["low"] < 1 < ppl["high"]


def test_rows_without_window_nll_are_named_not_guessed():
    a = row("a", {"x": [(0.8, 0.1, 32)] * 3}, [20.0] * 4)
    b = row("b", {"x": [(0.6, 0.3, 32)] * 3}, [22.0] * 4)
    del b["continuation_perplexity"]["c4"]["window_nll"]
    lines, skipped = boot.compare_continuation(a, b, 200, 0.95, 0)
    assert lines == [] and skipped == ["c4 (no per-window NLL in these rows; rerun them)"]


def test_main_writes_the_table_and_refuses_bad_input(tmp_path, capsys):
    path = write(
        tmp_path,
        [
            row("a 20%", {"x": [(0.8, 0.1, 32)] * 4}, [20.0] * 4),
            row("b 20%", {"x": [(0.6, 0.3, 32)] * 4}, [22.0] * 4),
        ],
    )
    out = tmp_path / "table.md"
    assert boot.main([path, "--pair", "a 20%", "b 20%", "--resamples", "200", "--out", str(out)]) == 0
    table = out.read_text()
    assert "| results.json | a 20% | b 20% | mean top-1 | 4 prompts (x) |" in table
    assert "cont. ppl c4" in table and table == capsys.readouterr().out
    with pytest.raises(SystemExit, match="(?s)no pair was found.*no row at batch 1 for c 20%"):
        boot.main([path, "--pair", "a 20%", "c 20%"])
    with pytest.raises(SystemExit, match="--confidence"):
        boot.main([path, "--pair", "a 20%", "b 20%", "--confidence", "1.5"])
    with pytest.raises(SystemExit, match="does not exist"):
        boot.main([str(tmp_path / "missing.json"), "--pair", "a", "b"])
    other = write(tmp_path, [row("a", {"x": [(0.8, 0.1, 32)]}), row("b", {"x": [(0.6, 0.3, 31)]})])
    with pytest.raises(SystemExit, match="different prompts"):
        boot.main([other, "--pair", "a", "b", "--resamples", "200"])


def test_files_measuring_the_same_items_merge_and_others_never_pair(tmp_path, capsys):
    settings = {"model": "m", "prompts": 4, "windows": 4, "prefix_len": 5}
    prompts = tmp_path / "prompts.json"
    held_out = tmp_path / "held-out.json"
    other = tmp_path / "other.json"
    a_sets, b_sets = {"x": [(0.8, 0.1, 32)] * 4}, {"x": [(0.6, 0.3, 32)] * 4}
    prompts.write_text(json.dumps({"settings": settings, "rows": [row("a", a_sets), row("b", b_sets)]}))
    held_out.write_text(
        json.dumps({"settings": settings, "rows": [row("a", {}, [20.0] * 4), row("b", {}, [22.0] * 4)]})
    )
    other.write_text(
        json.dumps({"settings": {**settings, "prompts": 8}, "rows": [row("a", a_sets), row("c", b_sets)]})
    )
    groups = boot.merged_rows([str(prompts), str(held_out), str(other)])
    assert [files for files, _ in groups] == ["prompts.json + held-out.json", "other.json"]
    merged = groups[0][1][("a", 1)]
    assert set(merged["fidelity"]) == {"x"} and set(merged["continuation_perplexity"]) == {"c4"}
    assert boot.main([str(prompts), str(held_out), str(other), "--pair", "a", "b", "--resamples", "200"]) == 0
    out = capsys.readouterr().out
    assert "| prompts.json + held-out.json | a | b | mean top-1 |" in out
    assert "| prompts.json + held-out.json | a | b | cont. ppl c4 |" in out
    assert "other.json: no row at batch 1 for b" in out
