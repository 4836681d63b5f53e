"""Speed II: the decision path's faster forms compute exactly what the plain formulas do, and the
profilers (unsynchronised stage timing, operators by stage) report what they promise.

Results of ``pp`` must not change: every faster form is checked bit for bit against the expression
it replaces, and a whole pruned run against one with the plain formulas patched back in.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ppframework.adapters import attention_runner, get_adapter, probe_reuse
from ppframework.adapters.attention import (
    MIN_GROUPED_QUERY_POSITIONS,
    SDPA_GROUPED_QUERIES,
    additive_attention_bias,
    causal_attention,
    causal_attention_by_runs,
    kv_runs,
)
from ppframework.adapters.probe_reuse import MIN_EXACT_ROWS, ProbeReuse
from ppframework.adapters.rotary import apply_rotary, rotate_half
from ppframework.calibration import calibrate
from ppframework.config import MethodConfig
from ppframework.history import BlockHistory
from ppframework.hookspecs import hookimpl
from ppframework.metrics.op_profile import OUTSIDE, profile_ops_by_stage
from ppframework.metrics.stage_profile import RANGE_PREFIX, StageProfiler
from ppframework.pipeline import Pipeline
from ppframework.strategies import fusion, scoring
from ppframework.strategies.fusion import importance_scaled_fusion
from ppframework.strategies.scoring import probe_evidence
from ppframework.testing.sync import no_sync_in_layers
from ppframework.testing.tiny import tiny_model
from ppframework.types import BlockKind


def _plain_fusion(probe: torch.Tensor, history: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    rho = probe / (probe + history + eps)
    return (1.0 - rho) * history + rho * probe


def _plain_evidence(states: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    counts = valid.to(torch.float32).sum(dim=0)
    sums = states.float().square().masked_fill(~valid[:, :, None], 0.0).sum(dim=0)
    return sums / counts.clamp(min=1.0)[:, None], counts > 0


def _plain_ema(history: BlockHistory, stats, position_valid, channels, momentum) -> None:
    rows = history.sq_mean[: stats.shape[0]]
    current = rows if channels is None else rows.index_select(1, channels)
    blended = torch.lerp(stats.to(current.dtype), current, momentum)
    if position_valid is not None:
        blended = torch.where(position_valid[:, None], blended, current)
    if channels is None:
        rows.copy_(blended)
    else:
        rows.index_copy_(1, channels, blended)
    history.updates += 1


shapes = st.tuples(st.integers(1, 6), st.integers(1, 40), st.integers(1, 70))


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), eps=st.sampled_from([1e-6, 1e-3, 1.0]))
def test_importance_scaled_fusion_is_the_formula_bit_for_bit(shape, seed, eps):
    gen = torch.Generator().manual_seed(seed)
    _, positions, channels = shape
    probe = torch.rand(positions, channels, generator=gen) * 10.0 ** torch.randint(-4, 4, (1,), generator=gen)
    history = torch.rand(positions, channels, generator=gen)
    probe[0, 0] = 0.0  # rho 0 and both zero
    history[0, 0] = 0.0
    before = (probe.clone(), history.clone())
    got = importance_scaled_fusion(probe, history, eps)
    assert torch.equal(got, _plain_fusion(probe, history, eps))
    assert torch.equal(probe, before[0]) and torch.equal(history, before[1])  # inputs untouched


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), half=st.booleans())
def test_probe_evidence_without_padding_is_the_masked_mean_bit_for_bit(shape, seed, half):
    rows, positions, channels = shape
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(rows, positions, channels, generator=gen)
    states = states.half() if half else states
    valid = torch.ones(rows, positions, dtype=torch.bool)
    got, got_ok = probe_evidence(states, valid, all_real=True)
    want, want_ok = _plain_evidence(states, valid)
    assert got.dtype == torch.float32 and torch.equal(got, want) and torch.equal(got_ok, want_ok)


@settings(max_examples=30, deadline=None)
@given(
    shape=shapes,
    seed=st.integers(0, 2**31 - 1),
    momentum=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
    padded=st.booleans(),
    all_channels=st.booleans(),
)
def test_ema_update_is_the_plain_update_bit_for_bit(shape, seed, momentum, padded, all_channels):
    _, positions, channels = shape
    gen = torch.Generator().manual_seed(seed)
    start = torch.rand(positions + 3, channels, generator=gen)
    kept = (
        None
        if all_channels
        else torch.randperm(channels, generator=gen)[: max(1, channels // 2)].sort().values
    )
    width = channels if kept is None else int(kept.numel())
    stats = torch.rand(positions, width, generator=gen)
    valid = torch.rand(positions, generator=gen) > 0.3 if padded else None
    fast, plain = BlockHistory(start.clone()), BlockHistory(start.clone())
    fast.ema_update(stats, valid, kept, momentum)
    _plain_ema(plain, stats, valid, kept, momentum)
    assert torch.equal(fast.sq_mean, plain.sq_mean) and fast.updates == plain.updates == 1


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    heads=st.integers(1, 4),
    seq=st.integers(1, 9),
    half_width=st.integers(1, 8),
    rotary_share=st.sampled_from([1.0, 0.5]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    per_row=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_rotary_is_the_rotate_half_formula_bit_for_bit(
    batch, heads, seq, half_width, rotary_share, dtype, per_row, seed
):
    gen = torch.Generator().manual_seed(seed)
    width = 2 * half_width
    rot = max(2, int(width * rotary_share) // 2 * 2)
    x = torch.randn(batch, heads, seq, width, generator=gen).to(dtype)
    cos, sin = (torch.randn(batch if per_row else 1, seq, rot, generator=gen).to(dtype) for _ in range(2))
    c, s_ = cos.unsqueeze(1), sin.unsqueeze(1)
    head = x[..., :rot]
    want = head * c + rotate_half(head) * s_
    if rot < width:
        want = torch.cat((want, x[..., rot:]), dim=-1)
    assert torch.equal(apply_rotary(x, cos, sin), want)


class _Recorder:
    def __init__(self) -> None:
        self.kept: list[torch.Tensor] = []

    @hookimpl(wrapper=True)
    def apply_mask(self, ctx, scores, ratio):
        mask = yield
        self.kept.append(mask.kept_units.clone())
        return mask


def _calibrated_batches(family: str, seed: int, batch: int, seq: int):
    """A tiny model, its history from one 4 x ``seq`` batch, and three ``batch`` x ``seq`` batches."""
    torch.manual_seed(0)
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(seed)
    history = calibrate(
        model, get_adapter(model), [torch.randint(0, 200, (4, seq), generator=gen)], progress=False
    )
    return model, history, [torch.randint(0, 200, (batch, seq), generator=gen) for _ in range(3)]


def _pp_run(
    model, history, batches, ratio: float = 0.4, reuse: bool | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor], Pipeline]:
    method = MethodConfig.model_validate(
        {"preset": "pp", "pruning": {"ratio": ratio, "skip_layers": [0], "round_to": 1}}
    )
    pipe = Pipeline(model, method, history=history.clone())
    pipe.reuse_probe = reuse
    recorder = _Recorder()
    pipe.plugin_manager.register(recorder)
    logits = []
    with pipe, torch.no_grad():
        for ids in batches:
            logits.append(model(input_ids=ids, use_cache=False).logits)
    return logits, recorder.kept, pipe


@pytest.mark.parametrize("family", ["llama-gqa", "opt"])
def test_pp_results_are_unchanged_by_the_faster_decision_path(family, monkeypatch):
    """Decisions, logits and the updated history, bit for bit, against the plain formulas."""
    model, history, batches = _calibrated_batches(family, seed=3, batch=4, seq=24)
    fast = _pp_run(model, history, batches)
    monkeypatch.setattr(fusion, "importance_scaled_fusion", _plain_fusion)
    monkeypatch.setattr(
        scoring, "probe_evidence", lambda states, valid, all_real=False: _plain_evidence(states, valid)
    )
    monkeypatch.setattr(BlockHistory, "ema_update", _plain_ema)
    plain = _pp_run(model, history, batches)
    assert len(fast[1]) == len(plain[1]) > 0
    for a, b in zip(fast[1], plain[1], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(fast[0], plain[0], strict=True):
        assert torch.equal(a, b)
    for key, block in fast[2].history.blocks.items():
        assert torch.equal(block.sq_mean, plain[2].history.get(*key).sq_mean)


# ------------------------------------------------------------------------------- probe reuse
def _mlp_full_passes(kept, batch, seq, seed):
    gen = torch.Generator().manual_seed(seed)
    runner = get_adapter(tiny_model("llama")).runner(1, BlockKind.MLP)
    x = torch.randn(batch, seq, 64, generator=gen)
    kept_units = torch.randperm(128, generator=gen)[:kept].sort().values
    rows = torch.randperm(batch, generator=gen)[: max(1, batch // 3)].sort().values
    tokens = torch.randperm(seq, generator=gen)[: max(2, seq // 2)].sort().values
    with torch.no_grad():
        _, reuse = runner.probe_forward(x, rows, tokens, attention_mask=None, keep_for_reuse=True)
        reused = runner.pre_output(x, attention_mask=None, kept_units=kept_units, reuse=reuse)
        recomputed = runner.pre_output(x, attention_mask=None, kept_units=kept_units)
        return reused, recomputed, reuse.usable_for(x)


@settings(max_examples=40, deadline=None)
@given(
    kept=st.integers(1, 128),
    batch=st.integers(1, 5),
    seq=st.integers(2, 80),
    seed=st.integers(0, 2**31 - 1),
)
def test_mlp_reuse_equals_recomputing_bit_for_bit(kept, batch, seq, seed):
    """The full pass with the probe's gate/up projections copied in equals the one that recomputes
    them, bit for bit, at any kept width (a width off the vector size once broke this: copied
    activations had been computed on the probe's layout, where other elements take the scalar path)
    and any batch shape (products too small for the BLAS to compute every row alike are not split)."""
    reused, recomputed, _ = _mlp_full_passes(kept, batch, seq, seed)
    assert torch.equal(reused, recomputed)


@pytest.mark.parametrize("kept", [77, 100, 128])
def test_mlp_reuse_is_used_and_exact_at_sizes_the_blas_computes_alike(kept):
    reused, recomputed, used = _mlp_full_passes(kept, batch=5, seq=80, seed=3)
    assert used and torch.equal(reused, recomputed)


def test_reuse_is_skipped_for_products_too_small_to_be_exact():
    x = torch.zeros(4, 40, 8)
    probe = ProbeReuse.build(x, torch.tensor([1]), torch.arange(0, 40, 2), None)
    assert not probe.pieces_are_large(x)  # the probe itself: 1 row x 20 tokens
    x = torch.zeros(4, 80, 8)
    with torch.no_grad():  # (with autograd on the full pass never reuses)
        assert ProbeReuse.build(x, torch.tensor([1]), torch.arange(0, 80, 2), None).usable_for(x)
    tokens = torch.arange(0, 70)  # the probe row's other tokens: 10
    assert not ProbeReuse.build(x, torch.tensor([1]), tokens, None).pieces_are_large(x)
    assert ProbeReuse.build(x[:1], torch.tensor([0]), tokens, None).pieces_are_large(x[:1]) is False
    assert MIN_EXACT_ROWS >= 12


@pytest.mark.parametrize("family", ["llama-gqa", "phi3", "gemma3"])
def test_pp_with_probe_reuse_equals_pp_without_it_bit_for_bit(family, monkeypatch):
    """Kept units, logits and history of a pp run with the probe's values reused (the CPU default)
    against one that recomputes every token (the paper's way), at widths off the vector size."""
    model, history, batches = _calibrated_batches(family, seed=6, batch=5, seq=64)
    splits = []
    real = probe_reuse.fill_outside_probe
    monkeypatch.setattr(probe_reuse, "fill_outside_probe", lambda *a: splits.append(1) or real(*a))
    logits_a, kept_a, pipe_a = _pp_run(model, history, batches, ratio=0.37, reuse=True)
    assert splits, "the full pass did not reuse the probe"
    logits_b, kept_b, pipe_b = _pp_run(model, history, batches, ratio=0.37, reuse=False)
    assert any(k.numel() % 8 for k in kept_a)  # widths off the vector size are exercised
    assert all(torch.equal(a, b) for a, b in zip(kept_a, kept_b, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(logits_a, logits_b, strict=True))
    for key, block in pipe_a.history.blocks.items():
        assert torch.equal(block.sq_mean, pipe_b.history.get(*key).sq_mean)


# ------------------------------------------------------------------- grouped-query attention
def test_kv_runs_by_hand():
    assert kv_runs([0, 0, 0, 1, 1, 1, 2, 2, 2]) == ((0, 9, 0, 3),)  # uniform GQA: one call
    assert kv_runs([0, 0, 0, 1, 2, 2]) == ((0, 3, 0, 1), (3, 4, 1, 2), (4, 6, 2, 3))
    assert kv_runs([0, 1, 1, 2, 2]) == ((0, 1, 0, 1), (1, 5, 1, 3))
    assert kv_runs([0, 2]) == ((0, 1, 0, 1), (1, 2, 2, 3))  # key/value head 1 serves no query head
    assert kv_runs([0, 1, 2, 3]) == ((0, 4, 0, 4),)  # multi-head attention
    assert kv_runs([1, 0]) is None  # not ordered by key/value head: the caller copies instead


@settings(max_examples=200, deadline=None)
@given(counts=st.lists(st.integers(0, 4), min_size=1, max_size=8))
def test_kv_runs_cover_every_query_head_with_its_own_key_value_head(counts):
    kv_index = [kv for kv, n in enumerate(counts) for _ in range(n)]
    runs = kv_runs(kv_index)
    assert runs is not None
    assert [q for qs, qe, _, _ in runs for q in range(qs, qe)] == list(range(len(kv_index)))
    for qs, qe, ks, ke in runs:
        assert (qe - qs) % (ke - ks) == 0  # SDPA's grouped form: Hq a multiple of Hkv
        per_head = (qe - qs) // (ke - ks)
        assert [ks + (q - qs) // per_head for q in range(qs, qe)] == kv_index[qs:qe]
    for a, b in zip(runs, runs[1:], strict=False):  # maximal: neighbours could not be one call
        assert a[3] != b[2] or (a[1] - a[0]) // (a[3] - a[2]) != (b[1] - b[0]) // (b[3] - b[2])


@pytest.mark.skipif(not SDPA_GROUPED_QUERIES, reason="SDPA's enable_gqa needs PyTorch 2.5")
@settings(max_examples=30, deadline=None)
@given(
    counts=st.lists(st.integers(0, 3), min_size=1, max_size=4).filter(any),
    batch=st.integers(1, 3),
    seq=st.integers(MIN_GROUPED_QUERY_POSITIONS, 80),
    padded=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_grouped_query_attention_equals_copied_keys_bit_for_bit(counts, batch, seq, padded, dtype, seed):
    """The grouped form against the key/value copy per query head it replaces, with and without
    padding (as a mask or as its precomputed bias), on projection-layout (strided) tensors, from
    the sequence length the runner uses it at (below it, SDPA's per-head results can depend on the
    number of heads in the call)."""
    gen = torch.Generator().manual_seed(seed)
    kv_heads, dim = len(counts), 8
    kv_index = torch.tensor([kv for kv, n in enumerate(counts) for _ in range(n)])
    heads = kv_index.numel()

    def heads_view(n):
        flat = torch.randn(batch, seq, n * dim, generator=gen).to(dtype)
        return flat.view(batch, seq, n, dim).transpose(1, 2)

    q, k, v = heads_view(heads), heads_view(kv_heads), heads_view(kv_heads)
    mask = None
    if padded:
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, : int(torch.randint(0, seq, (1,), generator=gen))] = 0  # left padding in row 0
    expected = causal_attention(q, k.index_select(1, kv_index), v.index_select(1, kv_index), mask, None, 0.3)
    expected = expected.transpose(1, 2).reshape(batch, seq, heads * dim)
    runs = kv_runs(kv_index.tolist())
    assert torch.equal(causal_attention_by_runs(q, k, v, runs, mask, None, 0.3), expected)
    if mask is not None:
        bias = additive_attention_bias(mask, dtype)
        assert torch.equal(causal_attention_by_runs(q, k, v, runs, None, bias, 0.3), expected)


def _generate_and_score(model, history, prompt, mask):
    method = MethodConfig.model_validate(
        {"preset": "pp", "pruning": {"ratio": 0.4, "skip_layers": [0], "round_to": 1}}
    )
    pipe = Pipeline(model, method, history=history.clone())
    recorder = _Recorder()
    pipe.plugin_manager.register(recorder)
    with pipe, torch.no_grad():
        logits = model(input_ids=prompt, attention_mask=mask, use_cache=False).logits
        tokens = model.generate(
            input_ids=prompt, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0
        )
    return logits, tokens, recorder.kept, pipe


@pytest.mark.skipif(not SDPA_GROUPED_QUERIES, reason="SDPA's enable_gqa needs PyTorch 2.5")
@pytest.mark.parametrize("family", ["llama-gqa", "qwen3", "gemma3"])
def test_pp_results_are_unchanged_by_grouped_query_attention(family, monkeypatch):
    """Decisions, logits (padded batch), history and generated tokens, bit for bit, against the
    key/value copy per query head (the path before; still taken off CPU)."""
    torch.manual_seed(0)
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(4)
    history = calibrate(
        model, get_adapter(model), [torch.randint(0, 200, (4, 64), generator=gen)], progress=False
    )
    prompt = torch.randint(3, 200, (3, 40), generator=gen)
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0
    calls = []
    real = attention_runner.causal_attention_by_runs
    monkeypatch.setattr(attention_runner, "causal_attention_by_runs", lambda *a: calls.append(1) or real(*a))
    grouped = _generate_and_score(model, history, prompt, mask)
    assert calls, "the grouped form was not used"
    monkeypatch.setattr(attention_runner, "SDPA_GROUPED_QUERIES", False)
    copied = _generate_and_score(model, history, prompt, mask)
    assert torch.equal(grouped[0], copied[0]) and torch.equal(grouped[1], copied[1])
    assert len(grouped[2]) == len(copied[2]) > 0
    for a, b in zip(grouped[2], copied[2], strict=True):
        assert torch.equal(a, b)
    for key, block in grouped[3].history.blocks.items():
        assert torch.equal(block.sq_mean, copied[3].history.get(*key).sq_mean)


# ------------------------------------------------------------------------------------ profilers
def _tiny_pipe():
    model = tiny_model("llama-gqa")
    gen = torch.Generator().manual_seed(5)
    history = calibrate(
        model, get_adapter(model), [torch.randint(0, 200, (4, 24), generator=gen)], progress=False
    )
    method = MethodConfig.model_validate(
        {"preset": "pp", "pruning": {"ratio": 0.4, "skip_layers": [0], "round_to": 1}}
    )
    ids = torch.randint(0, 200, (4, 24), generator=gen)
    return model, Pipeline(model, method, history=history), ids


def test_stage_profiler_rejects_an_unknown_timing():
    with pytest.raises(ValueError, match="timing must be one of sync, events"):
        StageProfiler(timing="cuda-graphs")  # type: ignore[arg-type]


def test_event_timing_on_cpu_uses_the_host_clock():
    ticks = iter(range(100))
    profiler = StageProfiler("cpu", clock=lambda: float(next(ticks)), timing="events")
    assert not profiler.uses_events
    with profiler.stage("probe_forward"):
        pass
    with profiler.stage("probe_forward"):
        pass
    assert profiler.totals["probe_forward"] == 2.0 and profiler.calls["probe_forward"] == 2
    profiler.reset()
    assert profiler.per_forward(1) == {}


def test_annotating_profiler_opens_one_range_per_stage_call():
    model, pipe, ids = _tiny_pipe()
    profiler = StageProfiler("cpu", annotate=True).attach(pipe)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with pipe, torch.no_grad():
            model(input_ids=ids, use_cache=False)
    profiler.detach(pipe)
    ranges = [e.name[len(RANGE_PREFIX) :] for e in prof.events() if e.name.startswith(RANGE_PREFIX)]
    for stage, calls in profiler.calls.items():
        assert ranges.count(stage) == calls, stage
    assert ranges.count("probe_forward") == len(pipe._runners)


def test_operator_profile_charges_operators_to_their_stage():
    model, pipe, ids = _tiny_pipe()

    def forward() -> None:
        with pipe, torch.no_grad():
            model(input_ids=ids, use_cache=False)

    profile = profile_ops_by_stage(pipe, forward, forwards=2)
    assert pipe.profiler is None  # the annotator is gone
    totals = profile.stage_totals()
    assert list(totals)[:2] == ["select_probe", "probe_forward"] and OUTSIDE in totals
    probe_ops = profile.ops["probe_forward"]
    assert any(name in probe_ops for name in ("aten::mm", "aten::addmm", "aten::linear"))
    assert probe_ops[next(iter(probe_ops))].calls % 2 == 0  # summed over both forwards
    assert "aten::topk" in profile.ops["apply_mask"]
    assert all(host >= 0 and device == 0 for host, device in totals.values())
    markdown = profile.to_markdown(top=3, dense_s=1.0)
    assert "| **probe_forward** | (all) |" in markdown and "share of dense" in markdown
    assert profile.to_dict()["stages"]["probe_forward"]
    with pytest.raises(ValueError, match="forwards must be >= 1"):
        profile_ops_by_stage(pipe, forward, forwards=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_event_timing_does_not_synchronise_inside_pruned_layers():
    model, pipe, ids = _tiny_pipe()
    model.cuda()
    pipe = Pipeline(model, pipe.method, history=pipe.history.to(torch.device("cuda")))
    ids = ids.cuda()
    profiler = StageProfiler("cuda", timing="events").attach(pipe)
    layers = [get_adapter(model).layers[index] for index in pipe.pruned_layers]
    with no_sync_in_layers(layers), pipe, torch.no_grad():
        model(input_ids=ids, use_cache=False)
    profiler.detach(pipe)
    stages = profiler.per_forward(1)
    assert profiler.uses_events and stages["probe_forward"] > 0 and stages["infer"] > 0
    assert profiler.calls["probe_forward"] == sum(1 for key in pipe._runners if key[1] in BlockKind)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not SDPA_GROUPED_QUERIES, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grouped_query_attention_on_cuda_matches_the_copy(dtype):
    """The grouped form is used on CPU only (its speed on CUDA is unmeasured); this is the gate for
    turning it on there: it must give the copied keys/values' output bit for bit."""
    gen = torch.Generator().manual_seed(0)
    counts, batch, seq, dim = [2, 1, 3, 0, 2], 2, 200, 64
    kv_index = torch.tensor([kv for kv, n in enumerate(counts) for _ in range(n)], device="cuda")

    def heads_view(n):
        flat = torch.randn(batch, seq, n * dim, generator=gen).to("cuda", dtype)
        return flat.view(batch, seq, n, dim).transpose(1, 2)

    q, k, v = heads_view(kv_index.numel()), heads_view(len(counts)), heads_view(len(counts))
    copied_k, copied_v = k.index_select(1, kv_index), v.index_select(1, kv_index)
    expected = causal_attention(q, copied_k, copied_v, None, None, 0.125).transpose(1, 2)
    expected = expected.reshape(batch, seq, -1)
    runs = kv_runs(kv_index.tolist())
    assert torch.equal(causal_attention_by_runs(q, k, v, runs, None, None, 0.125), expected)
