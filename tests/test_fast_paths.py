"""Every fast path of the pruned forward against the simple reference.

The fast paths (gather buffers, fused q/k/v and gate/up gathers, reuse of the probe's exact per-token
values, the no-padding shortcuts that avoid host-device synchronisation, one-pass statistics) must
not change results: sliced == masked (dense with pruned channels zeroed) == reference, for the
logits, the decisions and the history. CPU always; the ``gpu`` versions run where CUDA is available.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ppframework.adapters import get_adapter, probe_reuse
from ppframework.adapters.base import (
    BlockRunner,
    GatherBuffers,
    ProbeReuse,
    causal_attention,
    fill_outside_probe,
    gather_weight,
)
from ppframework.calibration import calibrate
from ppframework.config import MethodConfig
from ppframework.hookspecs import hookimpl
from ppframework.metrics.stage_profile import OVERHEAD_GROUPS, StageProfiler
from ppframework.pipeline import Pipeline
from ppframework.strategies.inference import squared_mean_per_position, squared_sum_over_rows
from ppframework.strategies.probe import select_residual_probe
from ppframework.testing.sync import no_sync_in_layers
from ppframework.testing.tiny import tiny_model
from ppframework.types import BlockKind

CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
)
DEVICES = ["cpu", CUDA]
FAMILIES = ["llama", "llama-gqa", "qwen2", "mistral", "opt"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is fastest and keeps a busy machine's thread pool out of the way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class MaskRecorder:
    """Keeps every kept-unit decision, per block."""

    def __init__(self) -> None:
        self.masks: dict[tuple[int, BlockKind], list[torch.Tensor]] = {}

    @hookimpl(wrapper=True)
    def apply_mask(self, ctx, scores, ratio):
        mask = yield
        self.masks.setdefault((ctx.layer, ctx.kind), []).append(mask.kept_units.cpu().clone())
        return mask


def pp_method(ratio: float = 0.5, infer: str = "sliced", **pruning) -> MethodConfig:
    return MethodConfig.model_validate(
        {
            "preset": "pp",
            "pruning": {"ratio": ratio, "skip_layers": [0], "inflate_ratio": False, "round_to": 1, **pruning},
            "strategies": {"infer": {"name": infer}},
        }
    )


def right_padded(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=gen)
    lengths[0] = seq
    return (torch.arange(seq)[None, :] < lengths[:, None]).long()


def run_batches(model, method, history, batches, mask=None, reuse=None, grad=False):
    """Logits of every batch through a fresh pipeline; returns (logits, pipeline, recorder)."""
    pipe = Pipeline(model, method, history=history.clone() if history is not None else None)
    pipe.reuse_probe = reuse
    recorder = MaskRecorder()
    pipe.plugin_manager.register(recorder)
    out = []
    context = torch.enable_grad() if grad else torch.no_grad()
    with pipe, context:
        for ids in batches:
            out.append(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.detach())
    return out, pipe, recorder


@pytest.fixture(autouse=True)
def _split_small_products(monkeypatch):
    """The tiny batches here would split into products too small for reuse to be bit-exact, and the
    pipeline would then not reuse at all; these tests check reuse's logic (with a tolerance), so
    they let it split them (the exact sizes are tested in test_speed_ii.py)."""
    monkeypatch.setattr(probe_reuse, "MIN_EXACT_ROWS", 1)


def _setup(family: str, device: str, seq: int = 24, batch: int = 4, n_batches: int = 3):
    model = tiny_model(family).to(device)
    gen = torch.Generator().manual_seed(11)
    calib = [torch.randint(0, 200, (4, seq), generator=gen)]
    history = calibrate(model, get_adapter(model), calib, progress=False).clone()
    batches = [torch.randint(0, 200, (batch, seq), generator=gen).to(device) for _ in range(n_batches)]
    return model, history, batches


def _assert_same_runs(a, b, real: torch.Tensor | None, tol: float) -> None:
    logits_a, pipe_a, rec_a = a
    logits_b, pipe_b, rec_b = b
    for la, lb in zip(logits_a, logits_b, strict=True):
        if real is not None:
            la, lb = la[real], lb[real]
        torch.testing.assert_close(la, lb, rtol=tol, atol=tol)
    assert rec_a.masks.keys() == rec_b.masks.keys()
    for key, masks in rec_a.masks.items():
        for ma, mb in zip(masks, rec_b.masks[key], strict=True):
            assert torch.equal(ma, mb), key
    for key, hist in pipe_a.history.blocks.items():
        torch.testing.assert_close(hist.sq_mean, pipe_b.history.get(*key).sq_mean, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padded", [False, True])
def test_sliced_fast_paths_equal_masked_reference(device, family, padded):
    """Sliced with probe reuse, sliced without it, and the masked reference agree on logits,
    decisions and the EMA-updated history over several batches."""
    model, history, batches = _setup(family, device)
    mask = right_padded(4, 24).to(device) if padded else None
    real = mask.bool() if mask is not None else None
    reuse = run_batches(model, pp_method(), history, batches, mask, reuse=True)
    plain = run_batches(model, pp_method(), history, batches, mask, reuse=False)
    masked = run_batches(model, pp_method(infer="masked"), history, batches, mask)
    assert reuse[1].realised_ratio() > 0.2
    _assert_same_runs(reuse, plain, real, 1e-4)
    _assert_same_runs(reuse, masked, real, 1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["llama-gqa", "qwen2"])
def test_group_policy_and_rounding_fast_paths(device, family):
    model, history, batches = _setup(family, device)
    method = pp_method(0.5, gqa_policy="group", round_to=8)
    reuse = run_batches(model, method, history, batches, reuse=True)
    masked_method = pp_method(0.5, infer="masked", gqa_policy="group", round_to=8)
    masked = run_batches(model, masked_method, history, batches)
    _assert_same_runs(reuse, masked, None, 1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_everything_kept_with_every_fast_path_reproduces_the_model(device, family):
    model, history, batches = _setup(family, device, n_batches=1)
    with torch.no_grad():
        reference = model(input_ids=batches[0], use_cache=False).logits
    # ratio 0.01 prunes nothing (after rounding) yet runs every stage, the reuse path included.
    logits, pipe, _ = run_batches(model, pp_method(0.01, round_to=8), history, batches, reuse=True)
    assert not pipe.is_dense and pipe.realised_ratio() == 0.0
    torch.testing.assert_close(logits[0], reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama-gqa", "opt"])
def test_with_autograd_on_no_buffer_is_shared(family):
    """With autograd on, gathers allocate (a saved weight must never be overwritten); results agree."""
    model, history, batches = _setup(family, "cpu", n_batches=2)
    no_grad = run_batches(model, pp_method(), history, batches, reuse=True)
    grad = run_batches(model, pp_method(), history, batches, reuse=True, grad=True)
    _assert_same_runs(no_grad, grad, None, 1e-5)
    assert grad[1].buffers.nbytes == 0 and no_grad[1].buffers.nbytes > 0


def test_static_baseline_still_pins_and_matches_per_batch_gathers(monkeypatch):
    model, history, batches = _setup("llama-gqa", "cpu")
    pruning = {"ratio": 0.5, "skip_layers": [0]}
    method = MethodConfig.model_validate({"preset": "wanda-sp", "pruning": pruning})
    pinned = run_batches(model, method, history, batches)
    monkeypatch.setattr(BlockRunner, "pin_weights", lambda self: None)
    per_batch = run_batches(model, method, history, batches)
    assert all(r._pinned for r in pinned[1]._runners.values())
    assert per_batch[1].buffers.nbytes > 0
    for a, b in zip(pinned[0], per_batch[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- the pieces


def _random_linears(seed: int) -> list[nn.Linear]:
    """Three 6 -> 5 linears with seeded random weights, the middle one without a bias."""
    gen = torch.Generator().manual_seed(seed)
    linears = [nn.Linear(6, 5, bias=b) for b in (True, False, True)]
    for lin in linears:
        lin.weight.data = torch.randn(5, 6, generator=gen)
        if lin.bias is not None:
            lin.bias.data = torch.randn(5, generator=gen)
    return linears


def test_gather_into_buffers_equals_gather_weight():
    linears = _random_linears(seed=0)
    rows = [torch.tensor([0, 3]), None, torch.tensor([1, 2, 4])]
    runner = get_adapter(tiny_model("llama")).runner(0, BlockKind.MLP)
    runner.buffers = GatherBuffers()
    with torch.no_grad():
        weight, bias = runner.gather("test.fused", tuple(linears), tuple(rows))
        parts = [gather_weight(lin, r) for lin, r in zip(linears, rows, strict=True)]
        want_w = torch.cat([w for w, _ in parts])
        want_b = torch.cat([b if b is not None else torch.zeros(w.shape[0]) for w, b in parts])
        assert torch.equal(weight, want_w) and torch.equal(bias, want_b)
        cols = torch.tensor([1, 5])
        weight, bias = runner.gather("test.cols", (linears[0],), None, cols)
        assert torch.equal(weight, linears[0].weight[:, cols]) and bias is linears[0].bias
        again, _ = runner.gather("test.cols", (linears[0],), None, torch.tensor([0, 2]))
        assert again.data_ptr() == weight.data_ptr()  # the same buffer, refilled
    assert runner.buffers.nbytes > 0


def test_pinned_gather_fills_its_own_tensor_with_the_part_by_part_values():
    """Pinned weights are gathered straight into one tensor per role (no per-part copies then a
    concatenation): the same values as gathering part by part, each pin in memory of its own (a pinned
    weight outlives the decision forward, so it must never share the per-batch buffers), and with
    autograd on the part-by-part gather that records it."""
    linears = _random_linears(seed=3)
    rows = (torch.tensor([0, 3]), None, torch.tensor([1, 2, 4]))
    cols = torch.tensor([0, 2, 5])
    runner = get_adapter(tiny_model("llama")).runner(0, BlockKind.MLP)
    runner.buffers = GatherBuffers()
    cases = {"rows": (tuple(linears), rows, None), "rows+cols": (tuple(linears), rows, cols)}
    cases["cols"] = ((linears[0],), (None,), cols)
    for grad in (False, True):
        runner.unpin_weights()
        runner.pin_weights()
        with torch.set_grad_enabled(grad):
            got = {role: runner.gather(role, lins, r, c) for role, (lins, r, c) in cases.items()}
            for role, (lins, r, c) in cases.items():
                parts = [gather_weight(lin, ri, c) for lin, ri in zip(lins, r, strict=True)]
                want_w = torch.cat([w for w, _ in parts])
                weight, bias = got[role]
                assert torch.equal(weight, want_w), role
                assert weight.requires_grad == grad, role
                if role == "cols":
                    assert bias is lins[0].bias  # columns only: the full bias, shared
                else:
                    want_b = torch.cat([b if b is not None else torch.zeros(w.shape[0]) for w, b in parts])
                    assert torch.equal(bias, want_b), role
        pointers = {w.data_ptr() for w, _ in got.values()}
        assert len(pointers) == len(cases) and runner.buffers.nbytes == 0  # own tensors, no shared buffer


def test_fill_outside_probe_equals_computing_every_token():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 9, 4, generator=gen)
    weight = torch.randn(40, 4, generator=gen)  # wide enough to be split (MIN_EXACT_COLUMNS)

    def compute(x2d, out2d):
        torch.mm(x2d, weight.t(), out=out2d)

    want = x @ weight.t()
    for rows, tokens in (([0, 3], [1, 2, 8]), ([4], list(range(9))), ([1, 2], [0])):
        r, t = torch.tensor(rows), torch.tensor(tokens)
        probe_values = want[r][:, t].clone()
        reuse = ProbeReuse.build(x, r, t, None)
        out = fill_outside_probe(x, torch.full_like(want, float("nan")), compute, reuse, probe_values)
        torch.testing.assert_close(out, want)  # products this small may differ in the last bit
        with torch.no_grad():  # (this module lets small products split; see the fixture)
            assert reuse.usable_for(x) and not reuse.usable_for(x.clone())
        assert not reuse.usable_for(x)  # autograd on: the full pass computes everything


def test_no_padding_probe_path_chooses_what_the_general_path_chooses():
    gen = torch.Generator().manual_seed(2)
    ones = torch.ones(6, 40, dtype=torch.long)
    for seq_ratio, batch_ratio in ((0.5, 0.05), (0.1, 0.5), (0.05, 1.0)):
        residual = torch.randn(6, 40, 16, generator=gen)
        fast = select_residual_probe(residual, ones, seq_ratio, batch_ratio, has_padding=False)
        general = select_residual_probe(residual, ones, seq_ratio, batch_ratio)
        assert torch.equal(fast.batch_index, general.batch_index)
        assert torch.equal(fast.token_index, general.token_index)
        assert torch.equal(fast.valid, general.valid)


def test_one_pass_statistics_equal_the_plain_formula():
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(7, 11, 5, generator=gen)
    want = z.square().mean(dim=0)
    mask = torch.ones(7, 11, dtype=torch.long)
    torch.testing.assert_close(squared_sum_over_rows(z) / 7, want)
    for padded in (None, False):
        stats, valid = squared_mean_per_position(z, mask, padded)
        torch.testing.assert_close(stats, want)
        assert bool(valid.all())
    half = squared_sum_over_rows(z.half())
    torch.testing.assert_close(half, z.half().float().square().sum(dim=0))


@pytest.mark.parametrize("device", DEVICES)
def test_causal_attention_without_a_mask_is_the_all_real_case(device):
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, 8, 4, generator=gen).to(device) for _ in range(3))
    ones = torch.ones(2, 8, dtype=torch.long, device=device)
    torch.testing.assert_close(
        causal_attention(q, k, v, None, None, 0.5), causal_attention(q, k, v, ones, None, 0.5)
    )


def test_stage_profiler_times_every_stage_and_detaches():
    model, history, batches = _setup("llama-gqa", "cpu", n_batches=2)
    pipe = Pipeline(model, pp_method(), history=history.clone())
    assert pipe.profiler is None and all(r.profiler is None for r in pipe._runners.values())
    profiler = StageProfiler().attach(pipe)
    with pipe, torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    blocks = len(pipe._runners)
    for stage in ("select_probe", "probe_forward", "score_channels", "fuse_history", "apply_mask", "infer"):
        assert profiler.calls[stage] == 2 * blocks, stage
    assert profiler.calls["statistics"] == 2 * blocks and profiler.calls["history_update"] == 2 * blocks
    assert profiler.calls["gather"] == 2 * 2 * blocks  # pre-output weights and output projection
    overhead = profiler.overhead(2)
    assert set(overhead) == {*OVERHEAD_GROUPS, "total"} and overhead["total"] > 0
    profiler.detach(pipe)
    assert pipe.profiler is None and all(r.profiler is None for r in pipe._runners.values())
    assert not pipe.plugin_manager.is_registered(profiler)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "llama-gqa"])
def test_no_host_device_synchronisation_inside_a_pruned_layer(family):
    """Inside every pruned layer, CUDA sync debug mode 'error' raises on any synchronisation."""
    model, history, batches = _setup(family, "cuda", n_batches=2)
    pipe = Pipeline(model, pp_method(), history=history.clone())
    layers = [get_adapter(model).layers[index] for index in pipe.pruned_layers]
    with no_sync_in_layers(layers), pipe, torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    assert pipe.realised_ratio() > 0.2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_half_precision_sliced_matches_masked_on_cuda():
    model, history, batches = _setup("llama-gqa", "cuda", n_batches=2)
    model.half()
    sliced = run_batches(model, pp_method(), history, batches)
    masked = run_batches(model, pp_method(infer="masked"), history, batches)
    for a, b in zip(sliced[0], masked[0], strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("reuse", [True, False])
def test_probe_reuse_runs_where_enabled(monkeypatch, reuse):
    calls = []
    original = probe_reuse.fill_outside_probe

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(probe_reuse, "fill_outside_probe", counting)
    model, history, batches = _setup("llama-gqa", "cpu", n_batches=1)
    _, pipe, _ = run_batches(model, pp_method(), history, batches, reuse=reuse)
    assert len(calls) == (len(pipe._runners) if reuse else 0)  # attention q/k/v and the MLP, each block


def test_ema_update_without_position_mask_is_the_all_valid_update():
    from ppframework.history import BlockHistory

    gen = torch.Generator().manual_seed(5)
    hist = torch.rand(12, 6, generator=gen)
    stats = torch.rand(9, 4, generator=gen)
    channels = torch.tensor([0, 2, 3, 5])
    a, b = BlockHistory(sq_mean=hist.clone()), BlockHistory(sq_mean=hist.clone())
    a.ema_update(stats, None, channels, 0.9)
    b.ema_update(stats, torch.ones(9, dtype=torch.bool), channels, 0.9)
    assert torch.equal(a.sq_mean, b.sq_mean) and a.updates == b.updates == 1
