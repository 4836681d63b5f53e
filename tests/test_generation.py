"""model.generate() with a pipeline attached: KV cache, decode policies, left padding, detaching."""

from __future__ import annotations

import pytest
import torch
from prompt_helpers import calibrated_history as _history
from prompt_helpers import encode_left, greedy_generate
from transformers import StoppingCriteria, StoppingCriteriaList

from ppframework.adapters import get_adapter
from ppframework.config import MethodConfig, parse_run_config
from ppframework.errors import ConfigError
from ppframework.hookspecs import hookimpl
from ppframework.pipeline import Pipeline
from ppframework.testing.tiny import FAMILIES, tiny_model, tiny_tokenizer
from ppframework.types import BlockKind

PROMPTS = ["Hello there, how are", "A much longer prompt, to test left padding here", "Short"]


def _encode(prompts: list[str] = PROMPTS) -> dict[str, torch.Tensor]:
    return encode_left(prompts)


def _pipeline(model: torch.nn.Module, preset: str = "pp", decode: str = "frozen", **pruning) -> Pipeline:
    method = MethodConfig.model_validate(
        {"preset": preset, "pruning": {"skip_layers": [0], **pruning}, "decode": decode}
    )
    history = _history(model) if method.needs_calibration else None
    return Pipeline(model, method, history=history)


def _generate(model: torch.nn.Module, enc: dict, new: int = 16, **kwargs):
    return greedy_generate(model, enc, new, **kwargs)


class ReplayMasks:
    """Wrapper around apply_mask that replaces every decision by a recorded one."""

    def __init__(self, masks):
        self.masks = masks

    @hookimpl(wrapper=True)
    def apply_mask(self, ctx, scores, ratio):
        yield
        return self.masks[(ctx.layer, ctx.kind)]


class ProbeRecorder:
    """Observer that keeps every probe's rows and positions."""

    def __init__(self):
        self.probes = []

    @hookimpl(wrapper=True)
    def select_probe(self, ctx, residual, normed, attention_mask):
        probe = yield
        self.probes.append((probe.batch_index.tolist(), probe.token_index.tolist()))
        return probe


class RaiseAfter(StoppingCriteria):
    """Stops generation by raising after ``steps`` calls (an interrupted generate)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, input_ids, scores, **kwargs):
        self.steps -= 1
        if self.steps <= 0:
            raise KeyboardInterrupt
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompts", [PROMPTS, PROMPTS[:1]], ids=["left-padded", "one-prompt"])
def test_nothing_pruned_generates_the_unmodified_model_tokens(family, prompts):
    """ratio 0, and a ratio so small that every unit is kept while every stage (probe, fusion, mask,
    sliced inference with the cache, the left-padding roll) still runs: the greedy tokens are the
    unmodified model's."""
    model = tiny_model(family).eval()
    enc = _encode(prompts)
    reference = _generate(model, enc)
    for ratio in (0.0, 0.01):
        pipe = _pipeline(model, "pp", ratio=ratio, skip_layers=[])
        with pipe:
            out = _generate(model, enc)
        assert torch.equal(out.sequences, reference.sequences), ratio
        for step, (a, b) in enumerate(zip(out.logits, reference.logits, strict=True)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"step {step}")
        if ratio:
            kept = pipe.record.kept_units
            assert kept and all(n == [get_adapter(model).geometry(k).units] for (_, k), n in kept.items())


@pytest.mark.parametrize(
    ("family", "gqa"),
    [
        ("llama", "query-only"),
        ("llama-gqa", "query-only"),
        ("llama-gqa", "group"),
        ("opt", "query-only"),
        ("qwen2.5", "query-only"),
        ("qwen3", "query-only"),
        ("qwen3", "group"),
        ("mistral-swa", "query-only"),
        ("mistral-swa", "group"),
        ("phi3", "query-only"),
        ("phi3", "group"),
        ("gemma3", "query-only"),
        ("gemma3", "group"),
    ],
)
def test_frozen_decode_equals_recomputing_the_whole_sequence_under_the_same_masks(family, gqa):
    model = tiny_model(family).eval()
    enc = _encode()
    pipe = _pipeline(model, "pp", ratio=0.5, gqa_policy=gqa)
    with pipe:
        out = _generate(model, enc, new=12)
    masks = dict(pipe.last_masks)
    assert len(masks) == 2 * len(pipe.pruned_layers)
    assert any(m.n_kept < m.total_units for m in masks.values())

    replay = _pipeline(model, "pp", ratio=0.5, gqa_policy=gqa)
    replay.plugin_manager.register(ReplayMasks(masks))
    sequences = out.sequences
    mask = (sequences != 3).long()
    mask[:, enc["input_ids"].shape[1] :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with replay, torch.inference_mode():
        logits = model(
            input_ids=sequences, attention_mask=mask, position_ids=positions, use_cache=False
        ).logits
    prompt_len = enc["input_ids"].shape[1]
    for step, step_logits in enumerate(out.logits):
        real = logits[:, prompt_len + step - 1]
        torch.testing.assert_close(step_logits, real, atol=2e-4, rtol=2e-4, msg=f"step {step}")


@pytest.mark.parametrize("family", ["llama-gqa", "qwen3", "mistral-swa", "phi3", "gemma3"])
@pytest.mark.parametrize("gqa", ["query-only", "group"])
def test_sliced_equals_masked_during_decoding(family, gqa):
    model = tiny_model(family).eval()
    enc = _encode()
    history = _history(model)
    outs = []
    for infer in ("sliced", "masked"):
        method = MethodConfig.model_validate(
            {
                "preset": "pp",
                "pruning": {"ratio": 0.5, "skip_layers": [0], "gqa_policy": gqa},
                "strategies": {"infer": infer},
            }
        )
        with Pipeline(model, method, history=history.clone()):
            outs.append(_generate(model, enc, new=12))
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for a, b in zip(outs[0].logits, outs[1].logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_group_policy_cache_holds_exactly_the_kept_key_value_heads():
    model = tiny_model("llama-gqa").eval()
    pipe = _pipeline(model, "no-history", ratio=0.5, gqa_policy="group")
    with pipe:
        out = _generate(model, _encode(), new=6)
    cache = out.past_key_values
    geometry = get_adapter(model).geometry(BlockKind.ATTENTION)
    for layer, cached in enumerate(cache.layers):
        if layer in pipe.pruned_layers:
            kept = pipe.last_masks[(layer, BlockKind.ATTENTION)].kept_kv_heads
            assert kept is not None and cached.keys.shape[1] == kept.numel() < geometry.num_kv_heads
        else:
            assert cached.keys.shape[1] == geometry.num_kv_heads


def test_left_padding_decides_like_right_padding():
    """Prefill of a left-padded batch (generate) = forward of the same rows right-padded: the same
    probe, masks, history update and real-token logits, because positions are position_ids, not columns."""
    model = tiny_model("llama-gqa").eval()
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    left = tok(PROMPTS, return_tensors="pt", padding=True)
    tok.padding_side = "right"
    right = tok(PROMPTS, return_tensors="pt", padding=True)
    history = _history(model)
    method = MethodConfig.model_validate({"preset": "pp", "pruning": {"ratio": 0.5, "skip_layers": [0]}})

    records = []
    for enc, generate in ((left, True), (right, False)):
        pipe = Pipeline(model, method, history=history.clone())
        recorder = ProbeRecorder()
        pipe.plugin_manager.register(recorder)
        with pipe, torch.inference_mode():
            if generate:
                out = model.generate(
                    **enc,
                    max_new_tokens=1,
                    do_sample=False,
                    pad_token_id=3,
                    return_dict_in_generate=True,
                    output_logits=True,
                )
                last = out.logits[0]
            else:
                logits = model(**enc, use_cache=False).logits
                lengths = enc["attention_mask"].sum(1) - 1
                last = logits[torch.arange(len(PROMPTS)), lengths]
        records.append((recorder.probes, dict(pipe.record.kept_units), pipe.history, last))
    (probes_l, kept_l, hist_l, last_l), (probes_r, kept_r, hist_r, last_r) = records
    assert probes_l == probes_r
    assert kept_l == kept_r
    for key, block in hist_l.blocks.items():
        torch.testing.assert_close(block.sq_mean, hist_r.blocks[key].sq_mean, atol=1e-6, rtol=1e-5)
        # positions past the longest prompt are padding for every row: never updated
        longest = int(left["attention_mask"].sum(1).max())
        assert torch.equal(block.sq_mean[longest:], history.blocks[key].sq_mean[longest:])
    torch.testing.assert_close(last_l, last_r, atol=1e-4, rtol=1e-4)


def test_each_generate_call_and_each_cacheless_forward_decides_anew():
    model = tiny_model("llama").eval()
    pipe = _pipeline(model, "pp", ratio=0.5)
    with pipe:
        _generate(model, _encode(PROMPTS[:2]), new=4)
        first = pipe._decode
        decisions = len(pipe.record.removed_params)
        _generate(model, _encode(PROMPTS[1:]), new=4)
        assert pipe._decode is not first
        assert len(pipe.record.removed_params) == decisions + 1  # one decision per generate: its prefill
        with torch.inference_mode():
            model(input_ids=_encode(PROMPTS[:1])["input_ids"], use_cache=False)
        assert pipe._decode is None
        assert len(pipe.record.removed_params) == decisions + 2
    assert not any(r.is_pinned for r in pipe._runners.values())


@pytest.mark.parametrize("when", ["after", "during"])
def test_detaching_after_or_during_generation_restores_the_model(when):
    model = tiny_model("llama-gqa").eval()
    enc = _encode()
    reference = _generate(model, enc, new=8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pipe = _pipeline(model, "pp", ratio=0.5, gqa_policy="group")
    if when == "after":
        with pipe:
            _generate(model, enc, new=8)
    else:
        with pytest.raises(KeyboardInterrupt), pipe:
            _generate(model, enc, new=8, stopping_criteria=StoppingCriteriaList([RaiseAfter(3)]))
    assert not any(r.is_pinned for r in pipe._runners.values())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(_generate(model, enc, new=8).sequences, reference.sequences)


class DetachAfter(StoppingCriteria):
    """Detaches ``pipe`` after ``steps`` calls and lets the generation go on."""

    def __init__(self, pipe: Pipeline, steps: int) -> None:
        self.pipe, self.steps = pipe, steps

    def __call__(self, input_ids, scores, **kwargs):
        self.steps -= 1
        if self.steps == 0:
            self.pipe.detach()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@pytest.mark.parametrize("gqa", ["query-only", "group"])
def test_detaching_while_generate_continues_the_cache_is_a_clear_error(gqa):
    model = tiny_model("llama-gqa").eval()
    enc = _encode()
    pipe = _pipeline(model, "pp", ratio=0.5, gqa_policy=gqa)
    with pipe, pytest.raises(RuntimeError, match=r"detached \(pipe.detach\(\)\) while a generation"):
        _generate(model, enc, new=8, stopping_criteria=StoppingCriteriaList([DetachAfter(pipe, 2)]))
    assert torch.equal(_generate(model, enc, new=8).sequences, _generate(model, enc, new=8).sequences)


@pytest.mark.parametrize("family", ["llama-gqa", "opt", "mistral-swa", "phi3", "gemma3"])
@pytest.mark.parametrize("gqa", ["query-only", "group"])
def test_dense_decode_prunes_the_prefill_only(family, gqa):
    model = tiny_model(family).eval()
    enc = _encode()
    pipe = _pipeline(model, "no-history", decode="dense", ratio=0.5, gqa_policy=gqa)
    calls = []
    for runner in pipe._runners.values():
        original = runner.pre_output

        def spy(*args, _original=original, **kwargs):
            calls.append(args[0].shape[1])
            return _original(*args, **kwargs)

        runner.pre_output = spy
    with pipe:
        out = _generate(model, enc, new=6)
    assert calls and set(calls) != {1}  # the pruned path ran on the prompt only ...
    assert 1 not in calls  # ... and never on a decode step
    geometry = get_adapter(model).geometry(BlockKind.ATTENTION)
    assert all(layer.keys.shape[1] == geometry.num_kv_heads for layer in out.past_key_values.layers)
    assert len(pipe.record.removed_params) == 1


def test_decode_steps_leave_the_history_alone():
    model = tiny_model("llama").eval()
    histories = []
    for new in (1, 12):  # max_new_tokens=1 runs the prefill only
        pipe = _pipeline(model, "pp", ratio=0.5)
        with pipe:
            _generate(model, _encode(), new=new)
        histories.append(pipe.history)
    for key, block in histories[1].blocks.items():
        if key[0] not in pipe.pruned_layers:
            continue
        assert block.updates == histories[0].blocks[key].updates == 1
        assert torch.equal(block.sq_mean, histories[0].blocks[key].sq_mean)


def test_beam_search_and_sampling_work_with_a_pipeline_attached():
    model = tiny_model("llama-gqa").eval()
    enc = _encode()
    with torch.inference_mode():
        beams = model.generate(**enc, num_beams=3, max_new_tokens=8, do_sample=False, pad_token_id=3)
    keep_all = _pipeline(model, "pp", ratio=0.01, skip_layers=[])
    with keep_all, torch.inference_mode():
        assert torch.equal(
            model.generate(**enc, num_beams=3, max_new_tokens=8, do_sample=False, pad_token_id=3), beams
        )
    pruned = _pipeline(model, "pp", ratio=0.5, gqa_policy="group")
    with pruned, torch.inference_mode():
        out = model.generate(**enc, num_beams=3, max_new_tokens=8, do_sample=False, pad_token_id=3)
        torch.manual_seed(0)
        sampled = model.generate(**enc, do_sample=True, top_k=5, max_new_tokens=8, pad_token_id=3)
    assert out.shape == beams.shape and sampled.shape == beams.shape


def test_continuing_a_cache_the_pipeline_did_not_fill_is_refused():
    model = tiny_model("llama").eval()
    enc = _encode()
    with torch.inference_mode():
        prefill = model(**enc, use_cache=True)
    pipe = _pipeline(model, "pp", ratio=0.5)
    step = torch.full((len(PROMPTS), 1), 5)
    mask = torch.cat([enc["attention_mask"], torch.ones_like(step)], dim=1)
    with pipe, torch.inference_mode(), pytest.raises(RuntimeError, match="did not fill"):
        model(input_ids=step, attention_mask=mask, past_key_values=prefill.past_key_values)


def test_static_cache_is_refused_with_a_clear_error():
    model = tiny_model("llama").eval()
    pipe = _pipeline(model, "pp", ratio=0.5)
    with pipe, pytest.raises(ValueError, match="static"):
        _generate(model, _encode(), new=2, cache_implementation="static")


def test_decode_setting_is_validated_and_named_in_presets():
    with pytest.raises(ConfigError, match=r"methods\[0\]\.decode"):
        parse_run_config({"methods": [{"preset": "pp", "decode": "frozn"}]})
    assert MethodConfig.model_validate({"preset": "flap"}).decode == "frozen"
    assert MethodConfig.model_validate({"preset": "pp", "decode": "dense"}).decode == "dense"


def test_a_prompt_longer_than_the_history_fails_before_any_layer_runs_under_beyond_refuse():
    model = tiny_model("llama").eval()
    method = MethodConfig.model_validate(
        {"preset": "pp", "pruning": {"ratio": 0.5, "skip_layers": [0]}, "history": {"beyond": "refuse"}}
    )
    pipe = Pipeline(model, method, history=_history(model, seq=16))
    long = {"input_ids": torch.randint(4, 90, (1, 40)), "attention_mask": torch.ones(1, 40, dtype=torch.long)}
    with pipe, pytest.raises(ValueError, match="exceeds the history's 16 positions"):
        _generate(model, long, new=2)
    assert pipe.history.max_positions == 16 and pipe.batch_index == -1


@pytest.mark.parametrize("preset", ["pp", "pp-prompt"])
def test_a_prompt_longer_than_the_history_extends_it_by_the_documented_rule(preset):
    """history.beyond: extend (the default): positions past the calibrated ones start from the mean of
    positions 1 onwards, then update like the rest; the first positions are the calibrated ones."""
    model = tiny_model("llama").eval()
    method = MethodConfig.model_validate({"preset": preset, "pruning": {"ratio": 0.5, "skip_layers": [0]}})
    history = _history(model, seq=16)
    before = {key: h.sq_mean.clone() for key, h in history.blocks.items()}
    pipe = Pipeline(model, method, history=history)
    long = {"input_ids": torch.randint(4, 90, (2, 40)), "attention_mask": torch.ones(2, 40, dtype=torch.long)}
    with pipe, torch.inference_mode():
        out = _generate(model, long, new=3)
    assert out.sequences.shape == (2, 43)
    assert pipe.history.max_positions == 40
    for key, hist in pipe.history.blocks.items():
        assert hist.sq_mean.shape[0] == 40 and torch.isfinite(hist.sq_mean).all()
        fill = before[key][1:].mean(dim=0).expand(24, -1)
        if key[0] in pipe.pruned_layers:  # the prefill updated every position, the new ones included
            rows = 2 if method.decision == "sequence" else 1  # one update per row under sequence
            assert hist.updates == rows and not torch.equal(hist.sq_mean[16:], fill)
        else:  # a skipped layer's history is extended by the rule and never updated
            assert hist.updates == 0 and torch.equal(hist.sq_mean[16:], fill)
