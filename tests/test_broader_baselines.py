"""LLM-Pruner-style Taylor importance (``taylor``) and ShortGPT layer removal (``shortgpt``).

Taylor: the gradient pass against central finite differences of the loss on a float64 tiny model,
and the reductions against their definitions. Layer removal: ratio 0 is the untouched model; a removed
layer is exactly a model built without it, in a plain forward and under ``generate()`` with the
key/value cache; block influence against the model's own hidden states.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.llama import modeling_llama

from ppframework import cli
from ppframework.adapters import get_adapter
from ppframework.api import build_pipeline, load_config
from ppframework.calibration import taylor
from ppframework.calibration.influence import block_influence
from ppframework.calibration.taylor import channel_saliences, coupled_weights, next_token_loss
from ppframework.errors import ConfigError
from ppframework.strategies.layer_removal import lowest_influence_layers
from ppframework.testing.tiny import tiny_model, tiny_tokenizer
from ppframework.types import BlockKind


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _batches(seed: int = 0, n: int = 2, rows: int = 2, seq: int = 12) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 100, (rows, seq), generator=gen) for _ in range(n)]


def _loss(model: torch.nn.Module, batch: torch.Tensor) -> float:
    with torch.no_grad():
        return float(next_token_loss(model(input_ids=batch, use_cache=False).logits, batch))


def _finite_difference(
    model: torch.nn.Module, batch: torch.Tensor, weight: torch.Tensor, index: tuple
) -> float:
    """Central difference of the batch's mean loss in one weight entry (float64 model)."""
    eps = 1e-5
    original = float(weight[index])
    with torch.no_grad():
        weight[index] = original + eps
        up = _loss(model, batch)
        weight[index] = original - eps
        down = _loss(model, batch)
        weight[index] = original
    return (up - down) / (2 * eps)


# ----------------------------------------------------------------------------- Taylor


def _rms_norm_in_input_dtype(self: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    scale = torch.rsqrt(hidden.square().mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * (hidden * scale)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_taylor_gradients_equal_finite_differences(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # LLaMA's RMSNorm computes in float32 whatever the input; keep float64 so differences are exact
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_in_input_dtype)
    model = tiny_model(family).double()
    adapter = get_adapter(model)
    batches = _batches()
    layer = 1
    coupled = {kind: coupled_weights(adapter, layer, kind) for kind in BlockKind}
    params = [p for pairs in coupled.values() for p, _ in pairs]
    moments = taylor.gradient_moments(model, params, batches, progress=False)
    gen = torch.Generator().manual_seed(7)
    for pairs in coupled.values():
        for weight, _ in pairs:  # one random entry of every coupled weight
            index = tuple(int(torch.randint(n, (1,), generator=gen)) for n in weight.shape)
            grads = [_finite_difference(model, b, weight.data, index) for b in batches]
            g, f = moments[id(weight)][0][index], moments[id(weight)][1][index]
            assert float(g) == pytest.approx(sum(grads) / len(grads), rel=1e-5, abs=1e-9)
            assert float(f) == pytest.approx(sum(x * x for x in grads) / len(grads), rel=1e-5, abs=1e-12)
    # the model is left as it was: no gradients kept, requires_grad restored
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    # and the statistics are the reductions of exactly these moments
    stats = taylor.taylor_statistics(model, adapter, batches, layers=[layer], progress=False)
    for kind, pairs in coupled.items():
        head_dim = adapter.geometry(kind).unit_width if kind is BlockKind.ATTENTION else 1
        expected = channel_saliences(
            pairs, [moments[id(p)][0] for p, _ in pairs], [moments[id(p)][1] for p, _ in pairs], head_dim
        )
        for name, tensor in expected.items():
            torch.testing.assert_close(stats[(layer, kind)][name], tensor)
    # first-order element-wise by hand: sum of |w * G| over a channel's rows (gate/up, fc1) and column
    by_hand = sum(
        (w.detach() * moments[id(w)][0]).abs().sum(dim=1 - axis) for w, axis in coupled[BlockKind.MLP]
    )
    torch.testing.assert_close(stats[(layer, BlockKind.MLP)]["taylor:first:element"], by_hand.float())


def test_coupled_weights_follow_what_pruning_removes() -> None:
    mha, gqa, opt = (get_adapter(tiny_model(f)) for f in ("llama", "llama-gqa", "opt"))
    names = lambda adapter, kind: [tuple(w.shape) for w, _ in coupled_weights(adapter, 0, kind)]  # noqa: E731
    assert len(names(mha, BlockKind.ATTENTION)) == 4  # q, k, v rows + o column: k/v follow the head
    assert len(names(gqa, BlockKind.ATTENTION)) == 2  # q rows + o column: k/v heads stay dense
    assert (
        len(names(mha, BlockKind.MLP)) == 3 and len(names(opt, BlockKind.MLP)) == 2
    )  # gate/up/down; fc1/fc2
    with pytest.raises(ValueError, match="fuses them"):
        coupled_weights(get_adapter(tiny_model("phi3")), 0, BlockKind.ATTENTION)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 4), st.sampled_from([1, 4]))
def test_taylor_reductions_match_their_definitions(seed: int, units: int, head_dim: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    channels, hidden = units * head_dim, 5
    weights = [
        (torch.randn(channels, hidden, generator=gen), 0),
        (torch.randn(hidden, channels, generator=gen), 1),
    ]
    grads = [torch.randn(w.shape, generator=gen) for w, _ in weights]
    fishers = [torch.rand(w.shape, generator=gen) for w, _ in weights]
    out = channel_saliences(weights, grads, fishers, head_dim)
    signed = (weights[0][0] * grads[0]).sum(dim=1) + (weights[1][0] * grads[1]).sum(dim=0)
    element = (weights[0][0] * grads[0]).abs().sum(dim=1) + (weights[1][0] * grads[1]).abs().sum(dim=0)
    torch.testing.assert_close(out["taylor:first:element"], element)
    heads = out["taylor:first:vector"].view(units, head_dim).sum(dim=1)
    torch.testing.assert_close(heads, signed.view(units, head_dim).sum(dim=1).abs())  # |sum over the group|
    assert bool((out["taylor:first:element"].view(units, head_dim).sum(dim=1) >= heads - 1e-5).all())
    assert bool((out["taylor:second:element"] >= 0).all())


# ----------------------------------------------------------------------------- layer removal


def test_block_influence_is_one_minus_cosine_of_hidden_states() -> None:
    model = tiny_model("llama")
    batches = _batches(seed=3)
    influence = block_influence(model, get_adapter(model), batches, progress=False)
    with torch.no_grad():
        states = [model(input_ids=b, output_hidden_states=True).hidden_states for b in batches]
    for i in range(len(influence) - 1):  # the last entry of hidden_states is after the final norm
        cos = torch.cat(
            [torch.nn.functional.cosine_similarity(s[i], s[i + 1], dim=-1).flatten() for s in states]
        )
        assert float(influence[i]) == pytest.approx(float(1 - cos.mean()), abs=1e-5)


def test_lowest_influence_layers_counts_floor_of_ratio() -> None:
    influence = torch.tensor([0.9, 0.1, 0.5, 0.2, 0.05, 0.7])
    assert lowest_influence_layers(influence, 0.0, 6, range(6)) == []
    assert lowest_influence_layers(influence, 0.34, 6, range(6)) == [1, 4]
    assert lowest_influence_layers(influence, 0.5, 6, [0, 2, 3, 5]) == [2, 3, 5]
    with pytest.raises(ValueError, match="skip_layers"):
        lowest_influence_layers(influence, 0.5, 6, [0, 1])


def _run_config(
    tmp_path: Path, model_dir: Path, text_file: Path, methods: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "model": {"name": str(model_dir), "device": "cpu"},
        "data": {"name": str(text_file), "seq_len": 32, "batch_size": 4, "max_batches": 3},
        "calibration": {
            "dataset": str(text_file),
            "n_samples": 8,
            "batch_size": 4,
            "cache_dir": str(tmp_path / "calibration-cache"),
        },
        "methods": methods,
    }


def _without_layers(model: torch.nn.Module, removed: list[int]) -> torch.nn.Module:
    """A copy of ``model`` with decoder layers ``removed`` deleted and its config adjusted."""
    smaller = copy.deepcopy(model)
    keep = [i for i in range(len(smaller.model.layers)) if i not in removed]
    smaller.model.layers = torch.nn.ModuleList([smaller.model.layers[i] for i in keep])
    for new_index, layer in enumerate(smaller.model.layers):
        layer.self_attn.layer_idx = new_index
    smaller.config.num_hidden_layers = len(keep)
    if getattr(smaller.config, "layer_types", None):
        smaller.config.layer_types = [smaller.config.layer_types[i] for i in keep]
    return smaller


@pytest.mark.parametrize("family", ["llama-gqa", "qwen3"])
def test_removal_equals_a_model_built_without_those_layers(
    family: str, tmp_path: Path, tiny_text_file: Path
) -> None:
    model, tok = tiny_model(family), tiny_tokenizer()
    raw = _run_config(tmp_path, tmp_path, tiny_text_file, [{"preset": "shortgpt", "pruning": {"ratio": 0.5}}])
    cfg = load_config(raw)
    pipe = build_pipeline(model, cfg, tokenizer=tok, progress=False)
    prompts = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(prompts)
    mask[1, :3] = 0  # left padding in the second row
    with pipe:
        removed = list(pipe.removed_layers)
        logits = model(input_ids=prompts, attention_mask=mask).logits
        generated = model.generate(
            input_ids=prompts,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=3,
        )
    assert len(removed) == 2 and pipe.realised_ratio() == pytest.approx(0.5)
    reference = _without_layers(model, removed)
    torch.testing.assert_close(logits, reference(input_ids=prompts, attention_mask=mask).logits)
    expected = reference.generate(
        input_ids=prompts,
        attention_mask=mask,
        max_new_tokens=6,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=3,
    )
    assert torch.equal(generated.sequences, expected.sequences)
    for ours, theirs in zip(generated.scores, expected.scores, strict=True):
        torch.testing.assert_close(ours, theirs)
    # detaching restores the model: its own forwards, the dense logits
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    with pytest.raises(ConfigError, match="removes whole layers"):  # no per-block masks
        pipe.static_masks()


@pytest.mark.parametrize(
    ("family", "form"), [("llama-gqa", "auto"), ("gemma3", "auto"), ("opt", "per-layer")]
)
def test_an_exported_removal_is_the_model_without_those_layers(
    family: str, form: str, tmp_path: Path, tiny_text_file: Path
) -> None:
    """The export drops the removed layers (renumbering the rest, Gemma's layer_types with them): its
    logits and its generate() with the key/value cache equal the attached pipeline's."""
    from ppframework.export import export_pruned, load_pruned

    model, tok = tiny_model(family), tiny_tokenizer()
    raw = _run_config(tmp_path, tmp_path, tiny_text_file, [{"preset": "shortgpt", "pruning": {"ratio": 0.5}}])
    pipe = build_pipeline(model, load_config(raw), tokenizer=tok, progress=False)
    result = export_pruned(pipe, tmp_path / "exported", tokenizer=tok, format=form)
    assert result.format == ("hf" if form == "auto" else "per-layer") and result.reason is None
    exported, _ = load_pruned(result.path)
    removed = pipe.layers_to_remove()
    num_layers = model.config.num_hidden_layers
    assert len(removed) == num_layers // 2 and exported.config.num_hidden_layers == num_layers - len(removed)
    types = getattr(model.config, "layer_types", None)
    if types:
        assert exported.config.layer_types == [t for i, t in enumerate(types) if i not in removed]
        assert len(set(exported.config.layer_types)) > 1 or len(set(types)) == 1
    prompts = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(7))
    settings_ = {
        "max_new_tokens": 6,
        "do_sample": False,
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    with pipe, torch.no_grad():
        logits = model(input_ids=prompts).logits
        generated = model.generate(input_ids=prompts, pad_token_id=3, **settings_)
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=prompts).logits, logits)
        again = exported.generate(input_ids=prompts, pad_token_id=3, **settings_)
        assert not torch.allclose(model(input_ids=prompts).logits, logits)  # the removal changed the output
    assert torch.equal(again.sequences, generated.sequences)
    assert result.parameters < result.source_parameters


def test_ppf_export_writes_a_removal(tmp_path: Path, tiny_model_dir: Any, tiny_text_file: Path) -> None:
    from ppframework.export import load_pruned

    raw = _run_config(
        tmp_path, tiny_model_dir("llama"), tiny_text_file, [{"preset": "shortgpt", "pruning": {"ratio": 0.5}}]
    )
    config = tmp_path / "export.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert cli.main(["export", str(config), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    exported, tokenizer = load_pruned(tmp_path / "out")
    assert exported.config.num_hidden_layers == 2 and tokenizer is not None


def test_removal_at_ratio_zero_is_the_unmodified_model(tmp_path: Path, tiny_text_file: Path) -> None:
    model, tok = tiny_model("llama"), tiny_tokenizer()
    raw = _run_config(tmp_path, tmp_path, tiny_text_file, [{"preset": "shortgpt", "pruning": {"ratio": 0.0}}])
    pipe = build_pipeline(model, load_config(raw), tokenizer=tok, progress=False)
    ids = torch.randint(4, 100, (2, 10), generator=torch.Generator().manual_seed(2))
    dense = model(input_ids=ids).logits
    with pipe:
        assert pipe.is_dense and all("forward" not in layer.__dict__ for layer in model.model.layers)
        assert torch.equal(model(input_ids=ids).logits, dense)


def test_ppf_run_taylor_and_shortgpt_end_to_end(
    tmp_path: Path, tiny_model_dir: Any, tiny_text_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    methods = [
        {"preset": "taylor", "pruning": {"ratio": 0.4, "skip_layers": [0]}},
        {
            "preset": "taylor",
            "name": "taylor-mix-vector",
            "pruning": {"ratio": 0.4, "skip_layers": [0]},
            "strategies": {
                "score_channels": {"name": "taylor", "params": {"order": "mix", "reduce": "vector"}}
            },
        },
        {"preset": "shortgpt", "pruning": {"ratio": 0.5}},
    ]
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_run_config(tmp_path, tiny_model_dir("llama"), tiny_text_file, methods)))
    for attempt in range(2):  # the second run reads both statistics from their cache files
        out = tmp_path / f"out{attempt}"
        code = cli.main(["run", str(config), "--out", str(out), "--no-progress"])
        assert code == 0, capsys.readouterr().err
        rows = {row["method"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
        assert rows["shortgpt 50%"]["realised_ratio"] == pytest.approx(0.5)
        assert rows["taylor 40%"]["realised_ratio"] > 0.3
        if attempt == 0:
            first = rows
    assert {k: v["perplexity"] for k, v in rows.items()} == {k: v["perplexity"] for k, v in first.items()}
    cached = sorted(
        p.name.split("-")[1]
        for p in (tmp_path / "calibration-cache" / "calibration").glob("stats-*.safetensors")
    )
    assert cached == ["block", "taylor"]
