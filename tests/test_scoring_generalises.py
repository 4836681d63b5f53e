"""Issue 29: ``flap-ppcode`` (FLAP as the PP code computes it), output-aware weight terms and dynamic
Wanda (``wanda``, presets ``pp-gain`` / ``pp-wanda``).

``flap-ppcode`` is checked against a direct restatement of the PP code's formulas
(``Qi-Le1/Probe_Pruning src/model/llama_pp.py``: the per-position running baseline and fluctuation of
``update_global_metric_score_distribution``, ``get_compensate_bias``; ``pruning_module.py``:
``cal_*_calib_prune_metric``, ``sort_attn_metric``'s clamped head sums, ``sort_mlp_metric``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ppframework import cli
from ppframework.adapters import get_adapter
from ppframework.api import load_config
from ppframework.calibration import calibrate
from ppframework.calibration.ppcode_flap import PPCodeFlapState, ppcode_flap_statistics
from ppframework.config import MethodConfig
from ppframework.errors import ConfigError
from ppframework.pipeline import Pipeline
from ppframework.strategies.flap_ppcode import BASELINE, FLUCTUATION
from ppframework.strategies.masking import FP16_MAX, head_scores
from ppframework.strategies.scoring import PPspParams, PPspScore
from ppframework.strategies.wanda import WandaParams, WandaScore
from ppframework.testing.conformance.fixtures import make_context
from ppframework.testing.tiny import tiny_model
from ppframework.types import BlockGeometry, BlockKind, Probe


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _batches(rows: list[int], seq: int = 16, seed: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 200, (r, seq), generator=gen) for r in rows]


def _out_proj_inputs(model: torch.nn.Module, batches: list[torch.Tensor]) -> dict[Any, list[torch.Tensor]]:
    """Every batch's input of every output projection, (B, T, C) fp32."""
    adapter = get_adapter(model)
    seen: dict[Any, list[torch.Tensor]] = {}
    handles = []
    for layer in range(adapter.num_layers):
        for kind in BlockKind:

            def hook(module: Any, args: tuple, key: Any = (layer, kind)) -> None:
                seen.setdefault(key, []).append(args[0].detach().float().clone())

            handles.append(adapter.runner(layer, kind).out_proj.register_forward_pre_hook(hook))
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return seen


def _pp_code_statistics(inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The PP code's running FLAP update, per position, as written (fp32), then what scoring and the
    bias read from it: ``fluc_inp.sum(0)`` and ``baseline_inp.mean(0)``."""
    seq, channels = inputs[0].shape[1], inputs[0].shape[2]
    baseline = torch.zeros(seq, channels)
    fluc = torch.zeros(seq, channels)
    nsamples = torch.zeros(channels, dtype=torch.int32)
    for inp in inputs:
        batch_size = inp.shape[0]
        old_baseline_inp = baseline.clone()
        baseline *= nsamples / (nsamples + batch_size)
        baseline += torch.mean(inp, dim=0) / (nsamples + batch_size)
        if not torch.all(nsamples == 0):
            fluc *= (nsamples - 1) / (nsamples + batch_size - 1)
            fluc += torch.sum(
                (inp - torch.mean(baseline, dim=0).unsqueeze(0).unsqueeze(0))
                * (inp - torch.mean(old_baseline_inp, dim=0).unsqueeze(0).unsqueeze(0)),
                dim=0,
            ) / (nsamples + batch_size)
        nsamples += batch_size
    return fluc.sum(dim=0), baseline.mean(dim=0)


@pytest.mark.parametrize("family", ["llama", "gemma3", "opt"])
@pytest.mark.parametrize("rows", [[4, 4, 4], [5, 5, 2], [3]])
def test_statistics_equal_the_pp_code_recurrence(family: str, rows: list[int]) -> None:
    model = tiny_model(family)
    batches = _batches(rows)
    ours = ppcode_flap_statistics(model, get_adapter(model), batches, progress=False)
    inputs = _out_proj_inputs(model, batches)
    assert set(ours) == set(inputs)
    for key, per_batch in inputs.items():
        per_batch = [x.reshape(b.shape[0], -1, x.shape[-1]) for x, b in zip(per_batch, batches, strict=True)]
        fluc, baseline = _pp_code_statistics(per_batch)
        torch.testing.assert_close(ours[key][FLUCTUATION], fluc, rtol=2e-4, atol=1e-5)
        torch.testing.assert_close(ours[key][BASELINE], baseline, rtol=2e-5, atol=1e-6)


def test_baseline_is_the_calibration_mean_over_the_batch_size() -> None:
    """With equal batches the PP code's baseline is the calibration mean / B (the issue's factor)."""
    gen = torch.Generator().manual_seed(0)
    state = PPCodeFlapState()
    batches = [torch.randn(5, 7, 3, generator=gen) + 2.0 for _ in range(4)]
    for x in batches:
        state.update(x)
    mean = torch.cat(batches).mean(dim=(0, 1))
    torch.testing.assert_close(state.statistics()[BASELINE], mean / 5)


def _reference_masks(model: torch.nn.Module, batches: list[torch.Tensor], ratio: float) -> dict:
    """The PP code's static FLAP decision per block, restated: metric = fluc.sum(0) * sum_i W^2;
    heads by clamp(sum, 65504), the int(ratio * H) lowest pruned; MLP the int(ratio * D) lowest;
    bias = W @ (baseline.mean(0) with the kept channels zeroed)."""
    adapter = get_adapter(model)
    masks = {}
    for (layer, kind), per_batch in _out_proj_inputs(model, batches).items():
        if layer == 0:
            continue
        runner = adapter.runner(layer, kind)
        weight = runner.out_proj.weight.float()
        per_batch = [x.reshape(b.shape[0], -1, x.shape[-1]) for x, b in zip(per_batch, batches, strict=True)]
        fluc, baseline = _pp_code_statistics(per_batch)
        metric = fluc * torch.sum(torch.pow(weight, 2), dim=0)
        geo = runner.geometry
        if kind is BlockKind.ATTENTION:
            summed = torch.clamp(metric.reshape(geo.units, -1).sum(dim=-1), max=65504.0)
            order = torch.sort(summed, dim=0).indices
            kept = torch.sort(order[int(ratio * geo.units + 1e-9) :]).values
            channels = (kept[:, None] * geo.unit_width + torch.arange(geo.unit_width)).reshape(-1)
        else:
            order = torch.sort(metric, dim=0).indices
            kept = torch.sort(order[int(ratio * geo.units + 1e-9) :]).values
            channels = kept
        calib = baseline.clone()
        calib[channels] = 0
        masks[(layer, kind)] = (kept, torch.nn.functional.linear(calib, weight))
    return masks


@pytest.mark.parametrize("family", ["llama", "llama-gqa", "gemma3"])
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_flap_ppcode_kept_sets_and_biases_equal_the_pp_code(family: str, ratio: float) -> None:
    model = tiny_model(family)
    batches = _batches([4, 4, 4])
    adapter = get_adapter(model)
    history = calibrate(model, adapter, batches, progress=False)
    for key, stats in ppcode_flap_statistics(model, adapter, batches, progress=False).items():
        history.get(*key).channel_stats.update(stats)
    method = MethodConfig.model_validate(
        {
            "preset": "flap-ppcode",
            "pruning": {"ratio": ratio, "skip_layers": [0], "inflate_ratio": False, "round_to": 1},
            "strategies": {"allocate": "uniform"},  # the PP code's adaptive split assumes head_dim 128
        }
    )
    pipe = Pipeline(model, method, history=history.clone())
    with pipe, torch.no_grad():
        assert torch.isfinite(model(input_ids=batches[0], use_cache=False).logits).all()
    expected = _reference_masks(model, batches, ratio)
    assert set(pipe._static_masks) == set(expected)
    for key, (kept, bias) in expected.items():
        mask = pipe._static_masks[key]
        assert torch.equal(mask.kept_units, kept), key
        torch.testing.assert_close(mask.output_bias.float(), bias, rtol=1e-5, atol=1e-7)


def test_head_sums_clamp_at_the_fp16_maximum() -> None:
    channels = torch.tensor([4e4, 4e4, 1.0, 2.0, 7e4, 0.0])
    assert head_scores(channels, 2, "sum-fp16").tolist() == [FP16_MAX, 3.0, FP16_MAX]
    assert head_scores(channels, 2, "sum").tolist() == [8e4, 3.0, 7e4]


def _ctx(kind: BlockKind, hidden: int, channels: int, gain: torch.Tensor | None) -> Any:
    geo = (
        BlockGeometry(kind, units=channels // 2, unit_width=2)
        if kind is BlockKind.ATTENTION
        else (BlockGeometry(kind, units=channels, unit_width=1))
    )
    ctx = make_context(kind, geo, seed=0)
    ctx.output_gain = gain
    return ctx


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(list(BlockKind)), with_gain=st.booleans())
def test_output_gain_is_folded_into_the_weight_terms(seed: int, kind: BlockKind, with_gain: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    hidden, channels = 6, 8
    weight = torch.randn(hidden, channels, generator=gen)
    gain = torch.rand(hidden, generator=gen) * 100 if with_gain else None
    probe = Probe(torch.tensor([0, 2]), torch.tensor([1, 3, 4]), torch.ones(2, 3, dtype=torch.bool))
    states = torch.randn(2, 3, channels, generator=gen)
    ctx = _ctx(kind, hidden, channels, gain)
    folded = weight if gain is None else weight * gain[:, None]

    wanda = WandaScore(WandaParams(output_gain=True)).score_channels(
        ctx=ctx, probe=probe, probe_states=states, weight=weight
    )
    torch.testing.assert_close(wanda.weight_term, folded.abs().sum(dim=0))
    torch.testing.assert_close(wanda.evidence, states.square().mean(dim=0))
    a = torch.rand(channels, generator=gen)
    torch.testing.assert_close(wanda.combine(a, wanda.weight_term), a.sqrt() * folded.abs().sum(dim=0))

    ppsp = PPspScore(PPspParams(output_gain=True)).score_channels(
        ctx=ctx, probe=probe, probe_states=states, weight=weight
    )
    torch.testing.assert_close(ppsp.weight_term, folded.pow(4).sum(dim=0).sqrt())
    plain = PPspScore().score_channels(ctx=ctx, probe=probe, probe_states=states, weight=weight)
    torch.testing.assert_close(plain.weight_term, weight.pow(4).sum(dim=0).sqrt())  # pp never folds


def test_gemma3_reports_its_post_norm_gains_and_llama_none() -> None:
    gemma = tiny_model("gemma3")
    adapter = get_adapter(gemma)
    layer = adapter.layers[1]
    torch.testing.assert_close(
        adapter.output_gain(1, BlockKind.ATTENTION), 1.0 + layer.post_attention_layernorm.weight.float()
    )
    torch.testing.assert_close(
        adapter.output_gain(1, BlockKind.MLP), 1.0 + layer.post_feedforward_layernorm.weight.float()
    )
    assert get_adapter(tiny_model("llama")).output_gain(1, BlockKind.MLP) is None


def _logits(model: torch.nn.Module, preset: str, history: Any, batches: list[torch.Tensor]) -> torch.Tensor:
    method = MethodConfig.model_validate({"preset": preset, "pruning": {"ratio": 0.4, "skip_layers": [0]}})
    pipe = Pipeline(model, method, history=history.clone())
    with pipe, torch.no_grad():
        return torch.stack([model(input_ids=b, use_cache=False).logits for b in batches])


def test_pp_gain_is_pp_without_post_norms_and_differs_on_gemma3() -> None:
    batches = _batches([4, 4, 4], seq=24, seed=5)
    for family, same in (("llama", True), ("gemma3", False)):
        model = tiny_model(family)
        history = calibrate(model, get_adapter(model), batches, progress=False)
        pp, gain = _logits(model, "pp", history, batches), _logits(model, "pp-gain", history, batches)
        assert torch.equal(pp, gain) is same, family


def _wanda_method(**params: Any) -> MethodConfig:
    strategies = {"score_channels": {"name": "wanda", "params": {"head_reduce": "l2", **params}}}
    pruning = {"ratio": 0.4, "skip_layers": [0]}
    return MethodConfig.model_validate({"preset": "pp", "pruning": pruning, "strategies": strategies})


def _run_method(
    model: torch.nn.Module, method: MethodConfig, history: Any, batches: list[torch.Tensor]
) -> Any:
    pipe = Pipeline(model, method, history=history.clone())
    with pipe, torch.no_grad():
        return torch.stack([model(input_ids=b, use_cache=False).logits for b in batches]), pipe


@pytest.mark.parametrize("family", ["llama-gqa", "gemma3"])
def test_dynamic_wanda_compensation_sliced_equals_masked_and_adds_the_pruned_means(family: str) -> None:
    """Dynamic Wanda with FLAP's bias compensation: sliced == masked, every pruned block carries the bias
    ``W[:, pruned] @ mean[pruned]`` of its calibration means, the first block decides as without it,
    and the output changes; off, it is bit for bit the uncompensated metric."""
    model = tiny_model(family)
    batches = _batches([4, 4], seq=16, seed=9)
    history = calibrate(model, get_adapter(model), batches, progress=False)
    compensated = _wanda_method(bias_compensation=True)
    sliced, pipe = _run_method(model, compensated, history, batches)
    masked_method = compensated.model_copy(deep=True)
    masked_method.strategies.infer.name = "masked"
    masked, _ = _run_method(model, masked_method, history, batches)
    torch.testing.assert_close(sliced, masked, rtol=1e-4, atol=1e-4)
    plain, plain_pipe = _run_method(model, _wanda_method(), history, batches)
    default, _ = _run_method(model, _wanda_method(bias_compensation=False), history, batches)
    assert torch.equal(plain, default)
    first = (1, BlockKind.ATTENTION)
    assert torch.equal(plain_pipe.last_masks[first].kept_units, pipe.last_masks[first].kept_units)
    assert plain_pipe.last_masks[first].output_bias is None
    assert all(mask.output_bias is not None for mask in pipe.last_masks.values())
    assert not torch.allclose(sliced, plain)


def test_dynamic_wanda_compensation_means_from_the_probe() -> None:
    states = torch.tensor([[[1.0, 10.0], [3.0, 20.0]], [[5.0, 30.0], [100.0, 100.0]]])
    valid = torch.tensor([[True, True], [True, False]])
    probe = Probe(batch_index=torch.tensor([0, 1]), token_index=torch.tensor([0, 1]), valid=valid)
    ctx = make_context(BlockKind.MLP, BlockGeometry(BlockKind.MLP, units=2, unit_width=1), seq_len=2)
    params = WandaParams(bias_compensation=True, compensation_mean="probe")
    scores = WandaScore(params).score_channels(
        ctx=ctx, probe=probe, probe_states=states, weight=torch.ones(3, 2)
    )
    assert scores.bias_compensation and scores.channel_mean.tolist() == pytest.approx([3.0, 20.0])
    plain = WandaScore(WandaParams(bias_compensation=True)).score_channels(
        ctx=ctx, probe=probe, probe_states=states, weight=torch.ones(3, 2)
    )
    assert plain.channel_mean is None  # calibration means: the fusion stage attaches them


def test_dynamic_wanda_compensation_without_calibration_history_names_the_field() -> None:
    with pytest.raises(
        ValueError, match=r"score_channels.params.bias_compensation.*history.init 'calibration'"
    ):
        MethodConfig.model_validate(
            {
                "preset": "no-history",
                "strategies": {"score_channels": {"name": "wanda", "params": {"bias_compensation": True}}},
            }
        )


def test_flap_ppcode_refuses_a_probe_naming_the_field() -> None:
    with pytest.raises((ConfigError, ValueError), match="score_channels"):
        MethodConfig.model_validate(
            {
                "preset": "flap-ppcode",
                "strategies": {
                    "allocate": "uniform",
                    "select_probe": "residual",
                    "fuse_history": "importance-scaled",
                },
            }
        )


def test_ppf_run_new_presets_end_to_end(
    tmp_path: Path, tiny_model_dir: Any, tiny_text_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    methods = [
        {"preset": name, "pruning": {"ratio": 0.4, "skip_layers": [0]}}
        for name in ("flap", "flap-ppcode", "pp-gain", "pp-wanda")
    ]
    raw = {
        "model": {"name": str(tiny_model_dir("gemma3")), "device": "cpu"},
        "data": {"name": str(tiny_text_file), "seq_len": 32, "batch_size": 4, "max_batches": 3},
        "calibration": {
            "dataset": str(tiny_text_file),
            "n_samples": 8,
            "batch_size": 4,
            "cache_dir": str(tmp_path / "calibration-cache"),
        },
        "methods": methods,
    }
    load_config(raw)  # valid before any model loads
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    results = []
    for attempt in range(2):  # the second run reads the PP code's statistics from their cache file
        out = tmp_path / f"out{attempt}"
        code = cli.main(["run", str(config), "--out", str(out), "--no-progress"])
        assert code == 0, capsys.readouterr().err
        results.append({r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]})
    rows = results[0]
    for name in ("flap", "flap-ppcode", "pp-gain", "pp-wanda"):
        assert rows[f"{name} 40%"]["realised_ratio"] > 0.2, name
    assert rows["flap 40%"]["perplexity"] != rows["flap-ppcode 40%"]["perplexity"]
    again = {k: v["perplexity"] for k, v in results[1].items()}
    assert again == {k: v["perplexity"] for k, v in rows.items()}
    cached = list((tmp_path / "calibration-cache" / "calibration").glob("stats-flap-ppcode-*.safetensors"))
    assert len(cached) == 1


def test_frontier_reports_prr_against_both_flaps() -> None:
    from ppframework.config import FrontierConfig
    from ppframework.evaluate import EvalRow, add_efficiency
    from ppframework.evaluate.frontier import analyse_frontier, format_frontier

    def row(name: str, ratio: float, t: float, ppl: float, static: bool = False) -> EvalRow:
        return EvalRow(f"{name} {ratio:.0%}", ratio, perplexity=ppl, time_ratio=t, static=static)

    rows = [
        EvalRow("dense", 0.0, perplexity=10.0),
        *(row("pp", r, t, p) for r, t, p in ((0.2, 0.85, 14.0), (0.4, 0.70, 20.0))),
        *(row("flap", r, t, p, True) for r, t, p in ((0.2, 0.80, 16.0), (0.4, 0.62, 40.0))),
        *(row("flap-ppcode", r, t, p, True) for r, t, p in ((0.2, 0.80, 15.0), (0.4, 0.62, 30.0))),
        *(row("wanda-sp", r, t, p, True) for r, t, p in ((0.2, 0.80, 13.0), (0.4, 0.62, 25.0))),
    ]
    add_efficiency(rows, [r.method for r in rows if r.static])
    frontier = FrontierConfig(methods=["pp", "flap", "flap-ppcode", "wanda-sp"], ratios=[0.2, 0.4])
    report = analyse_frontier(rows, frontier)
    assert report.baseline == "wanda-sp"  # the best static at 40%; both FLAPs still get a column
    pp = report.reference["pp"]["flap_prr_ratios"]
    assert pp["flap"] == pytest.approx((30.0 / 0.38) / (10.0 / 0.3))
    assert pp["flap-ppcode"] == pytest.approx((20.0 / 0.38) / (10.0 / 0.3))
    text = "\n".join(format_frontier(report))
    assert "PRR_flap / PRR | PRR_flap-ppcode / PRR |" in text
    line = next(t for t in text.splitlines() if t.startswith("| pp |"))
    assert f"| {pp['flap']:.2f} | {pp['flap-ppcode']:.2f} |" in line
    json.dumps(report.to_json())


def test_flap_ppcode_without_its_statistics_says_how_to_get_them() -> None:
    model = tiny_model("llama")
    batches = _batches([4, 4])
    history = calibrate(model, get_adapter(model), batches, progress=False)  # no PP-code pass
    method = MethodConfig.model_validate({"preset": "flap-ppcode", "pruning": {"skip_layers": [0]}})
    pipe = Pipeline(model, method, history=history)
    with pytest.raises(ValueError, match="build_pipeline"):
        with pipe, torch.no_grad():
            model(input_ids=batches[0], use_cache=False)
