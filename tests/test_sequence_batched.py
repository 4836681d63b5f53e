"""``sequence_decode``: the decode steps of ``decision: sequence`` on a batch of several rows, run one
row at a time (``loop``), all rows on their own stacked weights (``batched``) or all rows on the union of
their kept units (``union``); and the decode steps' realised ratio."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from prompt_helpers import calibrated_history as _history
from prompt_helpers import encode_left as _encode
from prompt_helpers import greedy_generate
from prompt_helpers import method_at as _method

from ppframework.adapters import get_adapter
from ppframework.adapters.batched_rows import stack_block
from ppframework.pipeline import Pipeline
from ppframework.pipeline.rows import union_masks
from ppframework.testing.tiny import tiny_model
from ppframework.types import BlockKind, BlockMask

PROMPTS = [
    "Hello there, how are",
    "A much longer prompt, to test left padding here",
    "Short",
    "The quick brown fox jumps",
]
NEW = 6
#: GQA (llama-gqa, qwen2), MHA (llama), fused projections (phi3), OPT, q/k norms + windows (gemma3),
#: sliding window shorter than the prompts (mistral-swa).
KERNEL_FAMILIES = ["llama", "llama-gqa", "qwen2", "phi3", "opt", "gemma3", "mistral-swa"]


def _generate(model, enc, new: int = NEW, **kwargs):
    return greedy_generate(model, enc, new, **kwargs)


def _run(model, history, prompts, **fields):
    """Generate under ``fields``; the pipeline comes back with ``one_pass_layers`` (decode-step layers
    run in one pass) and ``last_state`` (the decode state of the last generate call) set."""
    method = _method(**fields)
    pipe = Pipeline(model, method, history=copy.deepcopy(history) if method.needs_calibration else None)
    _spy(pipe)
    with pipe:
        out = _generate(model, _encode(prompts))
    return out, pipe


def _spy(pipe: Pipeline) -> None:
    pipe.one_pass_layers = 0
    step = pipe._one_pass_step

    def spied(call, hidden):
        pipe.last_state = call.batch.decode
        out = step(call, hidden)
        pipe.one_pass_layers += out is not None
        return out

    pipe._one_pass_step = spied


@pytest.fixture(scope="module", params=KERNEL_FAMILIES)
def family_model(request):
    model = tiny_model(request.param).eval()
    return request.param, model, _history(model)


@pytest.mark.parametrize("prefill", ["pruned", "dense"])
def test_batched_decode_steps_equal_the_row_loop(family_model, prefill):
    """Every row on its own stacked weights in one pass gives the row loop's tokens, and its logits to
    fp32 tolerance, at every decode step; the prefill (and so every mask) is the same."""
    family, model, history = family_model
    loop, _ = _run(model, history, PROMPTS, decision="sequence", prefill=prefill)
    batched, pipe = _run(
        model, history, PROMPTS, decision="sequence", prefill=prefill, sequence_decode="batched"
    )
    assert torch.equal(loop.sequences, batched.sequences), family
    for step in range(NEW):
        torch.testing.assert_close(batched.logits[step], loop.logits[step], atol=1e-4, rtol=1e-4)
    assert pipe.last_state.fallback is None and pipe.last_state.stacked, family
    assert pipe.one_pass_layers == (NEW - 1) * len(pipe.pruned_layers)  # every decode step, every layer


@pytest.mark.parametrize("family", ["llama-gqa", "opt"])
def test_batched_at_batch_one_is_the_existing_path(family):
    """At batch 1 ``sequence_decode`` changes nothing: the same bits as the default."""
    model = tiny_model(family).eval()
    history = _history(model)
    a, _ = _run(model, history, PROMPTS[1:2], decision="sequence", prefill="dense")
    b, _ = _run(model, history, PROMPTS[1:2], decision="sequence", prefill="dense", sequence_decode="batched")
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits, strict=True))


def test_batched_with_group_gqa_policy_and_mlp_only_targets():
    """``gqa_policy: group`` (the cache still keeps every key/value head under ``sequence``) and a
    method pruning the MLP only (attention runs dense in the same pass) equal the loop."""
    model = tiny_model("llama-gqa").eval()
    history = _history(model)
    for fields in (
        {"pruning": {"gqa_policy": "group"}},
        {"preset": "griffin", "pruning": {"skip_layers": []}},
    ):
        loop, _ = _run(model, history, PROMPTS, decision="sequence", prefill="dense", **copy.deepcopy(fields))
        batched, pipe = _run(
            model, history, PROMPTS, decision="sequence", prefill="dense", sequence_decode="batched", **fields
        )
        assert pipe.one_pass_layers > 0 and pipe.last_state.fallback is None
        assert torch.equal(loop.sequences, batched.sequences), fields
        for step in range(NEW):
            torch.testing.assert_close(batched.logits[step], loop.logits[step], atol=1e-4, rtol=1e-4)


def test_batched_falls_back_to_the_loop_when_rows_keep_different_counts(caplog):
    """Rows keeping different numbers of units cannot stack: the loop runs (same tokens, logged once)."""
    model = tiny_model("llama").eval()
    history = _history(model)
    loop, _ = _run(model, history, PROMPTS, decision="sequence", prefill="dense")
    method = _method(decision="sequence", prefill="dense", sequence_decode="batched")
    pipe = Pipeline(model, method, history=copy.deepcopy(history))
    _spy(pipe)
    original = pipe._remember

    def uneven(index, kind, mask, cache):  # row 0 keeps one unit fewer in every block
        if pipe._row == 0 and mask.n_kept > 1:
            mask = BlockMask(kept_units=mask.kept_units[1:], total_units=mask.total_units)
        original(index, kind, mask, cache)

    pipe._remember = uneven
    with caplog.at_level(logging.INFO, logger="ppframework"), pipe:
        _generate(model, _encode(PROMPTS))
        _generate(model, _encode(PROMPTS))
    said = [r for r in caplog.records if "falls back" in r.getMessage()]
    assert len(said) == 1 and "different numbers of units" in said[0].getMessage()
    assert pipe.one_pass_layers == 0 and not pipe.last_state.stacked


def test_batched_falls_back_above_the_memory_limit():
    """Above ``max_stacked_bytes`` nothing is stacked: the rows run one by one, same tokens."""
    model = tiny_model("qwen2").eval()
    history = _history(model)
    loop, _ = _run(model, history, PROMPTS, decision="sequence", prefill="dense")
    method = _method(decision="sequence", prefill="dense", sequence_decode="batched")
    pipe = Pipeline(model, method, history=copy.deepcopy(history))
    pipe.max_stacked_bytes = 1024
    _spy(pipe)
    with pipe:
        out = _generate(model, _encode(PROMPTS))
    assert "max_stacked_bytes" in (pipe.last_state.fallback or "") and pipe.one_pass_layers == 0
    assert torch.equal(out.sequences, loop.sequences)


def test_batched_under_beam_search_follows_the_reordered_rows():
    """Beam search reorders the rows: the stacked weights are rebuilt for the new order (same beams as
    the loop)."""
    model = tiny_model("llama-gqa").eval()
    history = _history(model)
    kwargs = {"num_beams": 3, "max_new_tokens": 5, "do_sample": False, "pad_token_id": 3}
    results = {}
    for mode in ("loop", "batched"):
        method = _method(decision="sequence", prefill="dense", sequence_decode=mode)
        pipe = Pipeline(model, method, history=copy.deepcopy(history))
        with pipe, torch.inference_mode():
            results[mode] = model.generate(**_encode(PROMPTS[:2]), **kwargs)
    assert torch.equal(results["loop"], results["batched"])


def test_stack_block_refuses_rows_with_different_counts():
    model = tiny_model("llama").eval()
    runner = get_adapter(model).runner(1, BlockKind.MLP)
    a = BlockMask(kept_units=torch.tensor([0, 1, 2]), total_units=128)
    b = BlockMask(kept_units=torch.tensor([0, 5]), total_units=128)
    assert stack_block(runner, [a, b]) is None
    stacked = stack_block(runner, [a, a])
    assert stacked is not None and stacked.first.shape == (2, 6, 64) and stacked.out.shape == (2, 64, 3)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.integers(0, 15), min_size=1, max_size=16, unique=True), min_size=1, max_size=5))
def test_union_masks_hold_every_rows_units_and_nothing_else(rows):
    """The union of the rows' kept units: sorted, every row's units in it, no unit no row kept."""
    key = (1, BlockKind.MLP)
    masks = [{key: BlockMask(kept_units=torch.tensor(sorted(r)), total_units=16)} for r in rows]
    union = union_masks(masks)
    assert not isinstance(union, str)
    kept = union[key].kept_units.tolist()
    assert kept == sorted(set().union(*map(set, rows)))
    assert union[key].total_units == 16


@pytest.mark.parametrize("family", ["llama-gqa", "phi3", "opt"])
def test_union_decode_runs_one_pass_on_the_union_and_equals_a_union_mask_run(family):
    """Under ``union`` every row's masks are its own at the prefill (the prompt's logits are the loop's)
    and the decode steps run on the union of the rows' kept units: the tokens equal a single row run
    alone whose decision is replaced by the union (checked for row 0)."""
    model = tiny_model(family).eval()
    history = _history(model)
    loop, _ = _run(model, history, PROMPTS, decision="sequence", prefill="dense")
    union, pipe = _run(model, history, PROMPTS, decision="sequence", prefill="dense", sequence_decode="union")
    torch.testing.assert_close(union.logits[0], loop.logits[0], atol=0, rtol=0)  # the dense prefill's
    state = pipe.last_state
    assert state.union is not None and state.fallback is None and pipe.one_pass_layers > 0
    for key, mask in state.union.masks.items():
        own = [set(row.masks[key].kept_units.tolist()) for row in state.rows]
        assert set(mask.kept_units.tolist()) == set().union(*own)
    # Row 0 alone, decoding on the union's masks, gives row 0's tokens.
    single = Pipeline(model, _method(decision="sequence", prefill="dense"), history=copy.deepcopy(history))
    union_of = state.union.masks
    original = single._remember

    def to_union(index, kind, mask, cache):
        original(index, kind, union_of[(index, kind)], cache)

    single._remember = to_union
    with single:
        alone = _generate(model, _encode(PROMPTS[:1]))
    assert torch.equal(alone.sequences[0, -NEW:], union.sequences[0, -NEW:])
    for step in range(1, NEW):
        torch.testing.assert_close(union.logits[step][0], alone.logits[step][0], atol=2e-4, rtol=1e-4)


def test_union_with_everything_kept_is_the_unmodified_model():
    """Ratio 0 under every ``sequence_decode``: the unmodified model's tokens."""
    model = tiny_model("llama-gqa").eval()
    dense = _generate(model, _encode(PROMPTS))
    for mode in ("batched", "union"):
        out, _ = _run(model, None, PROMPTS, decision="sequence", sequence_decode=mode, pruning={"ratio": 0.0})
        assert torch.equal(out.sequences, dense.sequences)


def test_sequence_decode_needs_decision_sequence_and_frozen_decode():
    with pytest.raises(ValueError, match="sequence_decode"):
        _method(sequence_decode="batched")
    with pytest.raises(ValueError, match="sequence_decode"):
        _method(decision="sequence", decode="dense", sequence_decode="union")
    assert _method(decision="sequence", sequence_decode="union").sequence_decode == "union"


def test_decode_realised_ratio_counts_the_decode_steps_masks():
    """``prefill: dense`` records 0 for its prompts (they run dense) and, per generate call, the share
    of prunable weights its decode steps remove: each row's masks averaged (loop, batched), the
    union's (union); a batch-decision method's decode ratio equals its prefill's realised ratio."""
    model = tiny_model("llama-gqa").eval()
    history = _history(model)
    ratios = {}
    for mode in ("loop", "batched", "union"):
        _, pipe = _run(model, history, PROMPTS, decision="sequence", prefill="dense", sequence_decode=mode)
        assert pipe.realised_ratio() == 0.0
        ratios[mode] = pipe.decode_realised_ratio()
        total = pipe.total_prunable_params()
        rows = pipe.last_row_masks
        expected = sum(pipe.removed_by_masks(r) for r in rows) / len(rows) / total
        if mode == "union":
            expected = pipe.removed_by_masks(union_masks(rows)) / total
        assert ratios[mode] == pytest.approx(expected)
    assert ratios["loop"] == pytest.approx(ratios["batched"])
    assert 0 < ratios["union"] <= ratios["loop"]
    _, pipe = _run(model, history, PROMPTS)
    assert pipe.decode_realised_ratio() == pytest.approx(pipe.realised_ratio())


def test_tables_say_dense_prefill_and_show_the_decode_steps_ratio():
    """``ppf run`` / ``ppf eval`` perplexity tables show "dense prefill" instead of a 0 for a method whose
    prompts run unpruned; ``ppf generate`` shows the prompt's and the decode steps' realised ratios."""
    from ppframework.evaluate.rows import EvalRow
    from ppframework.evaluate.tables import _realised_cell as eval_cell
    from ppframework.generation.compare import GenerateReport, GenerateRow, format_generate_table
    from ppframework.runner.report import _realised_cell as run_cell
    from ppframework.runner.results import MethodResult

    row = EvalRow("pp-prompt 20%", 0.2, realised_ratio=0.0, realised_ratio_model=0.0, dense_prefill=True)
    assert eval_cell(row) == "dense prefill"
    assert (
        eval_cell(EvalRow("pp 20%", 0.2, realised_ratio=0.166, realised_ratio_model=0.1)) == "0.166 / 0.100"
    )
    result = MethodResult("pp-prompt 20%", 0.2, 0.22, 0.0, 20.0, 0.1, 1.0, dense_prefill=True)
    assert run_cell(result) == "dense prefill"
    result.dense_prefill = False
    assert run_cell(result) == "0.000 / 0.000"
    rows = [
        GenerateRow("dense", "frozen", ["a"], [4], 0.1, 0.2, 20.0, 1.0, 1.0, 0.0, 0.0),
        GenerateRow("pp-prompt 20%", "frozen", ["b"], [4], 0.1, 0.2, 20.0, 1.0, 1.0, 0.0, 0.1661, True),
    ]
    settings = {"model": {"name": "tiny"}, "resolved": {"device": "cpu"}}
    table = format_generate_table(GenerateReport(["p"], 4, rows, settings, {}, 1.0))
    assert "| pp-prompt 20% | frozen | dense / 0.166 |" in table
    assert "| dense | frozen | 0.000 / 0.000 |" in table


def test_ppf_generate_reports_the_decode_steps_ratio(tmp_path, tiny_model_dir, tiny_text_file):
    """End to end on a tiny model: ``ppf generate`` with ``pp-prompt`` under every ``sequence_decode``
    gives the loop's completions for ``batched``, and each row records its prompt's ratio (0: dense)
    and its decode steps' ratio (> 0)."""
    import json

    import yaml

    from ppframework import cli

    method = {"preset": "pp-prompt", "pruning": {"ratio": 0.4, "skip_layers": [0]}}
    config = {
        "model": {"name": str(tiny_model_dir("llama-gqa")), "device": "cpu"},
        "data": {"name": str(tiny_text_file), "seq_len": 32, "batch_size": 4, "max_batches": 3},
        "calibration": {
            "dataset": str(tiny_text_file),
            "n_samples": 8,
            "batch_size": 4,
            "seq_len": 128,
            "cache_dir": str(tmp_path / "cache"),
        },
        "methods": [
            {**method, "name": "loop"},
            {**method, "name": "batched", "sequence_decode": "batched"},
            {**method, "name": "union", "sequence_decode": "union"},
        ],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    prompts = ["--prompt", "Hello there", "--prompt", "The castle on the island", "--prompt", "Go"]
    assert (
        cli.main(
            ["generate", str(path), *prompts, "--max-new-tokens", "5", "--no-progress", "--out", str(out)]
        )
        == 0
    )
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["batched 40%"]["completions"] == rows["loop 40%"]["completions"]
    for name in ("loop 40%", "batched 40%", "union 40%"):
        assert rows[name]["realised_ratio"] == 0.0 and rows[name]["dense_prefill"] is True
        assert rows[name]["decode_realised_ratio"] > 0
    assert rows["union 40%"]["decode_realised_ratio"] <= rows["loop 40%"]["decode_realised_ratio"]
    assert rows["dense"]["decode_realised_ratio"] == 0.0
    assert "| loop 40% | frozen | dense / " in (out / "results.md").read_text()
