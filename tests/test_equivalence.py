"""Equivalences: the pruned path against the unmodified model and a masked reference."""

from __future__ import annotations

import pytest
import torch

from ppframework.adapters import get_adapter
from ppframework.config import MethodConfig
from ppframework.hookspecs import hookimpl
from ppframework.pipeline import Pipeline
from ppframework.testing.tiny import FAMILIES as TINY_FAMILIES
from ppframework.testing.tiny import tiny_model
from ppframework.types import BlockKind

FAMILIES = list(TINY_FAMILIES)


def method(ratio: float, infer: str = "sliced", **pruning) -> MethodConfig:
    return MethodConfig.model_validate(
        {
            "preset": "pp",
            "pruning": {"ratio": ratio, "skip_layers": [], **pruning},
            "strategies": {"infer": {"name": infer}},
            "history": {"init": "none"},
        }
    )


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: the pipeline's attention (an additive bias) and the model's
    own (its mask) split their float32 sums differently over threads, which moved one qwen2.5 logit
    by 1.4e-5 with 2 threads; the comparison is about the math, not the thread split."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def right_padded_mask(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=gen)
    lengths[0] = seq
    return (torch.arange(seq)[None, :] < lengths[:, None]).long()


@pytest.mark.parametrize("family", FAMILIES)
def test_everything_kept_reproduces_the_unmodified_logits(family):
    model = tiny_model(family)
    ids = torch.randint(0, 200, (3, 24), generator=torch.Generator().manual_seed(1))
    reference = logits(model, ids)
    # ratio 0.01 prunes no head and (after rounding) no channel, yet runs every stage.
    pipe = Pipeline(model, method(0.01))
    assert not pipe.is_dense
    with pipe:
        pruned = logits(model, ids)
    assert pipe.realised_ratio() == 0.0
    torch.testing.assert_close(pruned, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_everything_kept_with_padding_matches_on_real_tokens(family, one_thread):
    model = tiny_model(family)
    ids = torch.randint(0, 200, (4, 20), generator=torch.Generator().manual_seed(2))
    mask = right_padded_mask(4, 20)
    reference = logits(model, ids, mask)
    with Pipeline(model, method(0.01)):
        pruned = logits(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(pruned[real], reference[real], rtol=1e-5, atol=1e-5)


def test_dense_preset_does_not_touch_the_model():
    model = tiny_model("llama")
    pipe = Pipeline(model, MethodConfig(preset="dense"))
    assert pipe.is_dense
    with pipe:
        assert all("forward" not in layer.__dict__ for layer in get_adapter(model).layers)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padded", [False, True])
def test_sliced_inference_equals_masked_reference(family, padded):
    model = tiny_model(family)
    ids = torch.randint(0, 200, (4, 20), generator=torch.Generator().manual_seed(3))
    mask = right_padded_mask(4, 20) if padded else None
    with Pipeline(model, method(0.5)) as pipe:
        sliced = logits(model, ids, mask)
    with Pipeline(model, method(0.5, infer="masked")):
        masked = logits(model, ids, mask)
    assert pipe.realised_ratio() > 0.2
    real = mask.bool() if mask is not None else torch.ones(4, 20, dtype=torch.bool)
    torch.testing.assert_close(sliced[real], masked[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2"])
def test_group_policy_sliced_equals_masked(family):
    model = tiny_model(family)
    ids = torch.randint(0, 200, (4, 16), generator=torch.Generator().manual_seed(4))
    with Pipeline(model, method(0.5, gqa_policy="group")) as pipe:
        sliced = logits(model, ids)
    with Pipeline(model, method(0.5, infer="masked", gqa_policy="group")):
        masked = logits(model, ids)
    kept = pipe.record.kept_units[(0, BlockKind.ATTENTION)][0]
    assert kept == 2  # 4 heads in 2 groups; half the groups go
    torch.testing.assert_close(sliced, masked, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_attach_detach_leaves_the_model_unchanged(family):
    model = tiny_model(family)
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(5))
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before = logits(model, ids)
    with Pipeline(model, method(0.5)):
        during = logits(model, ids)
    after = logits(model, ids)
    assert not torch.allclose(during, before)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before_state[key]), key
    assert all("forward" not in layer.__dict__ for layer in get_adapter(model).layers)
    assert all(not module._forward_pre_hooks for module in model.modules())


@pytest.mark.parametrize("family", ["llama", "llama-gqa", "qwen2"])
def test_probe_forward_equals_the_blocks_own_attention_on_the_subset(family):
    """The probe attends only among probe tokens at their true rotary positions: that is the
    unmodified HF attention run on the sub-sequence with position_ids = the probed positions."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    layer = adapter.layers[1]
    x = torch.randn(3, 12, model.config.hidden_size, generator=torch.Generator().manual_seed(6))
    rows = torch.tensor([0, 2])
    tokens = torch.tensor([0, 3, 4, 9, 11])
    positions = torch.arange(12)[None]
    cos, sin = model.model.rotary_emb(x, positions)
    probe_x = x[rows][:, tokens]
    runner = adapter.runner(1, BlockKind.ATTENTION)
    states, _ = runner.probe_forward(
        x, rows, tokens, attention_mask=torch.ones(2, 5, dtype=torch.long), rotary=(cos, sin)
    )
    sub_cos, sub_sin = model.model.rotary_emb(probe_x, tokens[None])
    captured = {}
    hook = layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: captured.setdefault("z", a[0]))
    with torch.no_grad():
        layer.self_attn(hidden_states=probe_x, attention_mask=None, position_embeddings=(sub_cos, sub_sin))
    hook.remove()
    torch.testing.assert_close(states, captured["z"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_probe_forward_equals_the_blocks_own_mlp_on_the_subset(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    runner = adapter.runner(2, BlockKind.MLP)
    x = torch.randn(2, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(7))
    captured = {}
    hook = runner.out_proj.register_forward_pre_hook(lambda m, a: captured.setdefault("z", a[0]))
    with torch.no_grad():
        if family == "opt":
            runner.out_proj(runner.layer.activation_fn(runner.layer.fc1(x)))
        else:
            runner.mlp(x)
    hook.remove()
    states = runner.pre_output(x, attention_mask=torch.ones(2, 7, dtype=torch.long))
    torch.testing.assert_close(states, captured["z"].reshape(states.shape), rtol=1e-6, atol=1e-6)


def test_skipped_layers_are_never_pruned():
    model = tiny_model("llama")
    layers = get_adapter(model).layers
    with Pipeline(model, method(0.3, skip_layers=[0, 2])) as pipe:
        logits(model, torch.randint(0, 200, (2, 16)))
        assert "forward" not in layers[0].__dict__ and "forward" in layers[1].__dict__
    pruned_layers = {layer for layer, _ in pipe.record.kept_units}
    assert pruned_layers == {1, 3}
    assert pipe.layer_ratio == 0.6  # round(4 / (4 - 2) * 0.3, 2)


class MaskRecorder:
    """An observer: a new-style pluggy wrapper around apply_mask that keeps every decision."""

    def __init__(self):
        self.masks = []

    @hookimpl(wrapper=True)
    def apply_mask(self, ctx, scores, ratio):
        mask = yield
        self.masks.append((ctx.layer, ctx.kind, mask.kept_units.clone()))
        return mask


def test_magnitude_scoring_decides_from_weights_alone():
    model = tiny_model("llama")
    cfg = method(0.5)
    cfg.strategies.score_channels.name = "magnitude"
    pipe = Pipeline(model, cfg)
    recorder = MaskRecorder()
    pipe.plugin_manager.register(recorder)
    with pipe:
        for seed in (8, 9):
            logits(model, torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(seed)))
    weight = get_adapter(model).runner(1, BlockKind.MLP).out_proj.weight
    expected = weight.abs().sum(dim=0).topk(64).indices.sort().values
    layer1_mlp = [kept for layer, kind, kept in recorder.masks if layer == 1 and kind is BlockKind.MLP]
    assert len(layer1_mlp) == 2
    for kept in layer1_mlp:
        torch.testing.assert_close(kept, expected)


def test_two_pipelines_cannot_attach_to_one_model_at_once():
    model = tiny_model("llama")
    with Pipeline(model, method(0.5)):
        with pytest.raises(RuntimeError, match="already attached"):
            Pipeline(model, method(0.3)).attach()
