"""Prompt-conditioned generation: ``decision: sequence`` and ``prefill: dense``."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from prompt_helpers import calibrated_history as _history
from prompt_helpers import encode_left as _encode
from prompt_helpers import greedy_generate
from prompt_helpers import method_at as _method
from transformers import DynamicCache

from ppframework.config import PRESETS, MethodConfig
from ppframework.errors import ConfigError
from ppframework.pipeline import Pipeline
from ppframework.pipeline.dense_prefill import _select
from ppframework.strategies.probe import FullBatchProbe
from ppframework.testing.tiny import FAMILIES, tiny_model
from ppframework.types import BlockKind

PROMPTS = ["Hello there, how are", "A much longer prompt, to test left padding here", "Short"]
NEW = 8


def _pipeline(model, method: MethodConfig, history) -> Pipeline:
    return Pipeline(model, method, history=copy.deepcopy(history) if method.needs_calibration else None)


def _generate(model, enc, new: int = NEW, **kwargs):
    return greedy_generate(model, enc, new, **kwargs)


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    model = tiny_model(request.param).eval()
    return request.param, model, _history(model)


@pytest.mark.parametrize("prefill", ["pruned", "dense"])
def test_sequence_gives_each_row_what_its_prompt_alone_gives(family_model, prefill):
    """A left-padded batch under ``decision: sequence``: every row's masks are exactly those of its
    prompt generated alone (prompts one at a time, the history carried from one to the next), its
    greedy tokens are the same and its logits agree to float tolerance (the dense layers that are
    not pruned run the padded batch); the history ends the same."""
    family, model, history = family_model
    method = _method(decision="sequence", prefill=prefill)
    batched = _pipeline(model, method, history)
    with batched:
        out = _generate(model, _encode(PROMPTS))
    row_masks = batched.last_row_masks
    assert len(row_masks) == len(PROMPTS)
    alone = _pipeline(model, method, history)
    for row, prompt in enumerate(PROMPTS):
        with alone:
            single = _generate(model, _encode([prompt]))
        assert set(row_masks[row]) == set(alone.last_masks)
        for key, mask in alone.last_masks.items():
            assert torch.equal(row_masks[row][key].kept_units, mask.kept_units), (family, row, key)
        assert torch.equal(out.sequences[row, -NEW:], single.sequences[0, -NEW:]), (family, row)
        for step in range(NEW):
            torch.testing.assert_close(out.logits[step][row], single.logits[step][0], atol=2e-4, rtol=1e-4)
    for key in batched.history.blocks:
        torch.testing.assert_close(
            batched.history.blocks[key].sq_mean, alone.history.blocks[key].sq_mean, atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize("family", ["llama-gqa", "gemma3"])
@pytest.mark.parametrize("kernel", ["loop", "batched"])
def test_compensated_heads_per_row_equal_each_prompt_alone(family, kernel):
    """``pp-prompt-wanda-heads``: each row's attention masks carry its own compensation bias, and a batch
    under ``sequence`` (row loop or stacked rows) gives each row the tokens and logits of its prompt alone."""
    model = tiny_model(family).eval()
    history = _history(model)
    method = _method("pp-prompt-wanda-heads", sequence_decode=kernel)
    batched = _pipeline(model, method, history)
    with batched:
        out = _generate(model, _encode(PROMPTS))
    alone = _pipeline(model, method, history)
    for row, prompt in enumerate(PROMPTS):
        with alone:
            single = _generate(model, _encode([prompt]))
        for (layer, kind), mask in batched.last_row_masks[row].items():
            assert (mask.output_bias is not None) == (kind is BlockKind.ATTENTION), (row, layer, kind)
            torch.testing.assert_close(mask.output_bias, alone.last_masks[(layer, kind)].output_bias)
        assert torch.equal(out.sequences[row, -NEW:], single.sequences[0, -NEW:]), (family, kernel, row)
        for step in range(NEW):
            torch.testing.assert_close(out.logits[step][row], single.logits[step][0], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("prefill", ["pruned", "dense"])
def test_at_batch_one_sequence_is_batch(family_model, prefill):
    """One prompt: ``sequence`` takes exactly the path of ``batch`` (same masks, same bits)."""
    _, model, history = family_model
    enc = _encode(PROMPTS[1:2])
    results = {}
    for decision in ("batch", "sequence"):
        pipe = _pipeline(model, _method(decision=decision, prefill=prefill), history)
        with pipe:
            results[decision] = (_generate(model, enc), pipe.last_masks)
    (a, masks_a), (b, masks_b) = results["batch"], results["sequence"]
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits, strict=True))
    assert all(torch.equal(masks_a[k].kept_units, masks_b[k].kept_units) for k in masks_a)


@pytest.mark.parametrize("decision", ["batch", "sequence"])
def test_dense_prefill_leaves_the_prompt_logits_and_cache_bit_identical_to_dense(family_model, decision):
    _, model, history = family_model
    enc = _encode(PROMPTS)
    with torch.inference_mode():
        dense_cache = DynamicCache(config=model.config)
        dense = model(**enc, cache=dense_cache, use_cache=True).logits
        pipe = _pipeline(model, _method(decision=decision, prefill="dense"), history)
        cache = DynamicCache(config=model.config)
        with pipe:
            logits = model(**enc, cache=cache, use_cache=True).logits
    assert torch.equal(logits, dense)
    for ours, theirs in zip(cache.layers, dense_cache.layers, strict=True):
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
    decided = pipe.last_row_masks if decision == "sequence" else [pipe.last_masks]
    assert decided and all(len(m) == 2 * len(pipe.pruned_layers) for m in decided)
    # What ran is recorded: the prefill kept every unit (nothing removed), whatever was decided.
    assert pipe.realised_ratio() == 0.0
    assert any(m.n_kept < m.total_units for masks in decided for m in masks.values())


@pytest.mark.parametrize(
    "options",
    [
        {"decision": "sequence"},
        {"prefill": "dense"},
        {"decision": "sequence", "prefill": "dense"},
        {
            "decision": "sequence",
            "prefill": "dense",
            "history": {"init": "none"},
            "strategies": {
                "fuse_history": "none",
                "score_channels": {"name": "ppsp", "params": {"token_norm": True}},
            },
        },
        {
            "decision": "sequence",
            "prefill": "dense",
            "strategies": {"fuse_history": {"name": "fixed", "params": {"probe_weight": 0.9}}},
        },
    ],
    ids=["sequence", "dense-prefill", "both", "both-token-norm", "both-fixed-0.9"],
)
def test_nothing_pruned_generates_the_unmodified_model_tokens(family_model, options):
    """Ratio 0 and a ratio that keeps every unit (every stage still runs) give the model's tokens."""
    _, model, history = family_model
    enc = _encode(PROMPTS)
    reference = _generate(model, enc)
    for ratio in (0.0, 0.01):
        pipe = _pipeline(model, _method(pruning={"ratio": ratio, "skip_layers": []}, **options), history)
        with pipe:
            out = _generate(model, enc)
        assert torch.equal(out.sequences, reference.sequences), ratio
        for a, b in zip(out.logits, reference.logits, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_dense_prefill_decodes_on_the_masks_it_decided():
    """The decode steps after a dense prefill run on exactly the masks the prefill decided: replaying
    those masks through a pruned decode of the same dense cache gives the same logits."""
    model = tiny_model("llama-gqa").eval()
    history = _history(model)
    enc = _encode(PROMPTS[:1])
    pipe = _pipeline(model, _method(prefill="dense"), history)
    with pipe:
        out = _generate(model, enc)
    dense = _generate(model, enc)
    assert not all(torch.equal(a, b) for a, b in zip(out.logits[1:], dense.logits[1:], strict=True))
    torch.testing.assert_close(out.logits[0], dense.logits[0], atol=0, rtol=0)  # the prompt's own
    # The same decision, run through the masked reference on the same tokens: equal to float tolerance.
    masks = dict(pipe.last_masks)
    replay = _pipeline(model, _method(prefill="dense", strategies={"infer": {"name": "masked"}}), history)
    with replay, torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(**enc, cache=cache, use_cache=True)
        assert all(torch.equal(replay.last_masks[k].kept_units, masks[k].kept_units) for k in masks)
        ids = torch.cat([enc["input_ids"], out.sequences[:, enc["input_ids"].shape[1] :][:, :1]], dim=1)
        step = model(
            input_ids=ids[:, -1:],
            attention_mask=torch.ones_like(ids),
            cache=cache,
            use_cache=True,
        ).logits[:, -1]
    torch.testing.assert_close(step, out.logits[1], atol=1e-4, rtol=1e-4)


def test_beam_search_under_sequence_keeps_each_beam_on_its_prompts_masks():
    """Beam search reorders the cache's rows; each row's masks and weights follow it: a batch of two
    prompts gives each prompt the beams it gets alone."""
    model = tiny_model("llama-gqa").eval()
    history = _history(model)
    method = _method(decision="sequence", prefill="dense")
    kwargs = {"num_beams": 3, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 3}
    pipe = _pipeline(model, method, history)
    enc = _encode(PROMPTS[:2])
    with pipe, torch.inference_mode():
        both = model.generate(**enc, **kwargs)
    for row, prompt in enumerate(PROMPTS[:2]):
        alone = _pipeline(model, method, history)
        with alone, torch.inference_mode():
            single = model.generate(**_encode([prompt]), **kwargs)
        assert torch.equal(both[row, -6:], single[0, -6:])


def test_sequence_records_each_row_as_its_share_of_the_batch():
    """The realised ratio of a batch decided row by row is the mean of the rows' removed weights;
    FLOPs events are one per row and block, each a batch of one of the row's real length."""
    model = tiny_model("llama").eval()
    history = _history(model)
    pipe = _pipeline(model, _method(decision="sequence"), history)
    enc = _encode(PROMPTS)
    with pipe, torch.inference_mode():
        model(**enc)
    lengths = enc["attention_mask"].sum(dim=1).tolist()
    events = pipe.record.events
    assert sorted({(e.batch_size, e.seq_len) for e in events}) == sorted({(1, n) for n in lengths})
    assert len(events) == len(PROMPTS) * 2 * len(pipe.pruned_layers)
    removed = pipe.record.removed_params[0] / pipe.total_prunable_params()
    per_row = []
    for row_masks in pipe.last_row_masks:
        single = 0.0
        for (_, kind), mask in row_masks.items():
            per_unit, per_kv = pipe._params_per_unit(kind)
            single += (mask.total_units - mask.n_kept) * per_unit
            if mask.kept_kv_heads is not None:
                single += (pipe.adapter.geometry(kind).num_kv_heads - mask.kept_kv_heads.numel()) * per_kv
        per_row.append(single / pipe.total_prunable_params())
    assert removed == pytest.approx(sum(per_row) / len(per_row))


@settings(max_examples=8, deadline=None)
@given(order=st.permutations([0, 1, 2]))
def test_a_rows_decision_does_not_depend_on_its_batch_mates_without_history_updates(order):
    """With a frozen history, a row's masks under ``sequence`` are the same in any batch order."""
    model = _MODEL
    method = _method(decision="sequence", history={"init": "calibration", "update": "frozen"})
    prompts = [PROMPTS[i] for i in order]
    pipe = Pipeline(model, method, history=copy.deepcopy(_HISTORY))
    enc = _encode(prompts)
    positions = (enc["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)  # as generate passes them
    with pipe, torch.inference_mode():
        model(**enc, position_ids=positions)
    by_prompt = {prompts[row]: masks for row, masks in enumerate(pipe.last_row_masks)}
    reference = _REFERENCE_MASKS
    for prompt, masks in by_prompt.items():
        for key, mask in masks.items():
            assert torch.equal(mask.kept_units, reference[prompt][key].kept_units)


_MODEL = tiny_model("qwen3").eval()
_HISTORY = _history(_MODEL)


def _reference_masks() -> dict[str, dict]:
    method = _method(decision="sequence", history={"init": "calibration", "update": "frozen"})
    out = {}
    for prompt in PROMPTS:
        pipe = Pipeline(_MODEL, method, history=copy.deepcopy(_HISTORY))
        with pipe, torch.inference_mode():
            _MODEL(**_encode([prompt]))
        out[prompt] = dict(pipe.last_masks)
    return out


_REFERENCE_MASKS = _reference_masks()


def test_dense_prefill_with_dense_decode_is_refused():
    with pytest.raises(ConfigError, match="prefill: 'dense' with decode: 'dense'"):
        from ppframework.config import parse_run_config

        parse_run_config({"methods": [{"preset": "pp", "prefill": "dense", "decode": "dense"}]})
    with pytest.raises(ValueError, match="decision"):
        MethodConfig.model_validate({"preset": "pp", "decision": "row"})


def test_presets_for_generation():
    griffin, prompt = MethodConfig(preset="griffin"), MethodConfig(preset="pp-prompt")
    assert (prompt.decision, prompt.prefill, prompt.decode) == ("sequence", "dense", "frozen")
    assert prompt.strategies.select_probe.name == "full"
    assert PRESETS["pp"].get("decision", "batch") == "batch" and MethodConfig(preset="pp").prefill == "pruned"
    assert griffin.pruning.targets == ["mlp"] and griffin.prefill == "dense"
    assert BlockKind.MLP.value == "mlp"


@settings(max_examples=25, deadline=None)
@given(
    length=st.integers(1, 6),
    extra=st.integers(0, 5),
    channels=st.integers(1, 4),
    counts=st.booleans(),
)
def test_history_extend_fills_new_positions_with_the_mean_of_positions_one_onwards(
    length, extra, channels, counts
):
    from ppframework.history import BlockHistory, HistoryStore

    gen = torch.Generator().manual_seed(length * 31 + extra)
    sq = torch.rand(length, channels, generator=gen)
    mean = torch.randn(length, channels, generator=gen)
    block = BlockHistory(sq.clone(), mean.clone(), samples=7)
    if counts:
        block.counts = torch.full((length, channels), 9.0)
    store = HistoryStore({(0, BlockKind.MLP): block})
    store.extend(length + extra)
    assert store.max_positions == length + extra
    source = slice(1, None) if length > 1 else slice(0, 1)
    torch.testing.assert_close(block.sq_mean[:length], sq, rtol=0, atol=0)
    torch.testing.assert_close(block.mean[:length], mean, rtol=0, atol=0)
    for row in range(length, length + extra):
        torch.testing.assert_close(block.sq_mean[row], sq[source].mean(dim=0))
        torch.testing.assert_close(block.mean[row], mean[source].mean(dim=0))
    if counts:
        assert block.counts.shape == (length + extra, channels)
        assert (block.counts[length:] == 7.0).all() and (block.counts[:length] == 9.0).all()
    store.extend(1)  # never shrinks
    assert store.max_positions == length + extra


def test_sequence_frees_each_rows_pinned_weights_when_the_pipeline_detaches():
    """Bug: the beam-search wrapper put on the cache closed a reference cycle (cache -> wrapper ->
    cache, and -> decode state -> every row's pinned weights), so each generation's sliced weights
    stayed alive until the garbage collector ran (+2 GB per batch of 8 on SmolLM2). With the cycle
    gone they are freed as soon as the pipeline lets go, even while the caller keeps the cache."""
    import gc
    import weakref

    model = tiny_model("llama-gqa").eval()
    pipe = _pipeline(model, _method(decision="sequence"), _history(model))
    enabled = gc.isenabled()
    gc.disable()
    try:
        with pipe:
            out = _generate(model, _encode(PROMPTS))
            pins = pipe._decode.rows[0].pins
            weight = next(iter(next(iter(pins.values())).values()))[2]
            alive = weakref.ref(weight)
            del pins, weight
        assert out.past_key_values is not None  # the caller still holds the cache
        assert alive() is None
    finally:
        if enabled:
            gc.enable()


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 6), picks=st.data())
def test_probe_gather_skips_the_copy_only_when_every_entry_is_picked(size, picks):
    """The dense prefill's probe gather equals ``index_select`` for any sorted unique index, and is the
    activations themselves (no copy) exactly when the index picks every entry."""
    values = torch.randn(size, 3, 2)
    chosen = picks.draw(st.lists(st.integers(0, size - 1), unique=True, min_size=1))
    index = torch.tensor(sorted(chosen), dtype=torch.long)
    out = _select(values, 0, index)
    assert torch.equal(out, values.index_select(0, index))
    assert (out is values) == (len(chosen) == size)


@pytest.mark.parametrize("decision", ["batch", "sequence"])
def test_a_full_probe_skips_the_block_inputs_it_never_reads(family_model, decision, monkeypatch):
    """Under ``prefill: dense`` the ``full`` probe (``reads_block_input = False``) is passed zero-width
    residual and normed tensors, and the adapter never computes either; the masks, the tokens, the logits
    and the history are bit for bit those of a run that computes them (the attribute forced on)."""
    family, model, history = family_model
    method = _method(preset="pp-prompt", decision=decision)
    seen: list[tuple[int, ...]] = []
    calls = {"block_input": 0}

    def runs(reads: bool):
        monkeypatch.setattr(FullBatchProbe, "reads_block_input", reads)
        pipe = _pipeline(model, method, history)
        adapter_input = pipe.adapter.block_input

        def counted(*args, **kwargs):
            calls["block_input"] += 1
            return adapter_input(*args, **kwargs)

        select_probe = pipe.hooks.select_probe

        def spying(ctx, residual, normed, attention_mask):
            seen.append(tuple(normed.shape))
            return select_probe(ctx, residual, normed, attention_mask)

        monkeypatch.setattr(pipe.adapter, "block_input", counted)
        monkeypatch.setattr(pipe.hooks, "select_probe", spying)
        calls["block_input"] = 0
        seen.clear()
        with pipe, torch.inference_mode():  # a prefill alone: decode steps compute their own inputs
            model(**_encode(PROMPTS), cache=DynamicCache(config=model.config), use_cache=True)
        prefill_calls, prefill_shapes = calls["block_input"], list(seen)
        with pipe:
            out = _generate(model, _encode(PROMPTS))
        return out, pipe, prefill_calls, prefill_shapes

    skipped, skip_pipe, skip_calls, skip_shapes = runs(False)
    computed, full_pipe, full_calls, full_shapes = runs(True)
    assert skip_calls == 0 and full_calls > 0, family
    assert skip_shapes and all(shape[-1] == 0 for shape in skip_shapes)
    assert all(shape[-1] > 0 for shape in full_shapes)
    assert [s[:2] for s in skip_shapes] == [s[:2] for s in full_shapes]
    assert torch.equal(skipped.sequences, computed.sequences)
    assert all(torch.equal(a, b) for a, b in zip(skipped.logits, computed.logits, strict=True))
    ours = skip_pipe.last_row_masks if decision == "sequence" else [skip_pipe.last_masks]
    theirs = full_pipe.last_row_masks if decision == "sequence" else [full_pipe.last_masks]
    for mine, other in zip(ours, theirs, strict=True):
        assert set(mine) == set(other)
        assert all(torch.equal(mine[k].kept_units, other[k].kept_units) for k in mine)
    for key, block in full_pipe.history.blocks.items():
        assert torch.equal(skip_pipe.history.blocks[key].sq_mean, block.sq_mean), key
