"""History update (spec step 7): EMA on kept channels at real positions; per-position statistics."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ppframework.history import BlockHistory, HistoryStore
from ppframework.strategies.inference import squared_mean_per_position
from ppframework.types import BlockKind

# --------------------------------------------------------------------------- EMA update


ema_case = st.fixed_dictionaries(
    {
        "max_len": st.integers(1, 20),
        "c": st.integers(1, 12),
        "seed": st.integers(0, 2**31 - 1),
        "momentum": st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0]) | st.floats(0.0, 1.0),
        "all_channels": st.booleans(),
        "dtype": st.sampled_from([torch.float32, torch.float64]),
        "p_valid": st.sampled_from([0.0, 0.5, 1.0]),
    }
)


@settings(max_examples=50, deadline=None)
@given(case=ema_case, data=st.data())
def test_ema_update_touches_only_kept_channels_at_valid_positions(case: dict, data: st.DataObject) -> None:
    gen = torch.Generator().manual_seed(case["seed"])
    max_len, c, m, dtype = case["max_len"], case["c"], case["momentum"], case["dtype"]
    seq = data.draw(st.integers(1, max_len))
    if case["all_channels"]:
        channels = None
        kept = list(range(c))
    else:
        n_kept = data.draw(st.integers(0, c))
        kept = sorted(torch.randperm(c, generator=gen)[:n_kept].tolist())
        channels = torch.tensor(kept, dtype=torch.long)
    hist0 = torch.rand(max_len, c, generator=gen, dtype=torch.float64).to(dtype) * 5
    stats = torch.rand(seq, len(kept), generator=gen, dtype=torch.float64).to(dtype) * 5
    position_valid = torch.rand(seq, generator=gen) < case["p_valid"]

    history = BlockHistory(sq_mean=hist0.clone(), updates=3)
    history.ema_update(stats, position_valid, channels, m)
    new = history.sq_mean

    assert new.shape == hist0.shape and new.dtype == dtype
    assert history.updates == 4
    touched = torch.zeros(max_len, c, dtype=torch.bool)
    for t in range(seq):
        if bool(position_valid[t]):
            touched[t, kept] = True
    # untouched entries are bit-identical (no decay of pruned channels, padding, or later positions)
    assert torch.equal(new[~touched], hist0[~touched])
    # touched entries: m * Hist + (1 - m) * stat
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for t in range(seq):
        if not bool(position_valid[t]):
            continue
        for j, ch in enumerate(kept):
            want = m * float(hist0[t, ch]) + (1 - m) * float(stats[t, j])
            assert float(new[t, ch]) == pytest.approx(want, rel=tol, abs=tol)


def test_ema_update_hand_example() -> None:
    hist = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], dtype=torch.float64)
    history = BlockHistory(sq_mean=hist.clone())
    stats = torch.tensor([[11.0, 13.0], [100.0, 100.0]], dtype=torch.float64)  # seq 2, channels {0, 2}
    history.ema_update(stats, torch.tensor([True, False]), torch.tensor([0, 2]), 0.9)
    want = hist.clone()
    want[0, 0] = 0.9 * 1.0 + 0.1 * 11.0  # 2.0
    want[0, 2] = 0.9 * 3.0 + 0.1 * 13.0  # 4.0
    assert torch.allclose(history.sq_mean, want, rtol=0, atol=1e-12)
    assert history.updates == 1


def test_ema_update_all_channels_when_channels_none() -> None:
    hist = torch.arange(8.0, dtype=torch.float64).view(4, 2)
    history = BlockHistory(sq_mean=hist.clone())
    stats = torch.full((3, 2), 10.0, dtype=torch.float64)
    history.ema_update(stats, torch.ones(3, dtype=torch.bool), None, 0.5)
    want = hist.clone()
    want[:3] = 0.5 * hist[:3] + 5.0
    assert torch.allclose(history.sq_mean, want, rtol=0, atol=1e-12)
    assert torch.equal(history.sq_mean[3], hist[3])


def test_ema_update_in_store_is_visible_through_get() -> None:
    store = HistoryStore({(3, BlockKind.MLP): BlockHistory(sq_mean=torch.zeros(4, 2))})
    store.get(3, BlockKind.MLP).ema_update(
        torch.ones(2, 1), torch.tensor([True, True]), torch.tensor([1]), 0.99
    )
    got = store.get(3, BlockKind.MLP).sq_mean
    assert got[:2, 1].tolist() == pytest.approx([0.01, 0.01])
    assert got[:, 0].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert got[2:, 1].tolist() == [0.0, 0.0]


# --------------------------------------------------------------------------- per-position statistics


def brute_sq_mean(z: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, t, c = z.shape
    out = torch.zeros(t, c, dtype=torch.float64)
    ok = torch.zeros(t, dtype=torch.bool)
    for pos in range(t):
        rows = [r for r in range(b) if bool(mask[r, pos])]
        if rows:
            ok[pos] = True
            out[pos] = sum(z[r, pos].double() ** 2 for r in rows) / len(rows)
    return out, ok


@settings(max_examples=50, deadline=None)
@given(
    b=st.integers(1, 6),
    t=st.integers(1, 12),
    c=st.integers(1, 10),
    seed=st.integers(0, 2**31 - 1),
    layout=st.sampled_from(["dense", "right", "random"]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_squared_mean_per_position_matches_brute_force(
    b: int, t: int, c: int, seed: int, layout: str, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(b, t, c, generator=gen).to(dtype)
    if layout == "dense":
        mask = torch.ones(b, t, dtype=torch.long)
    elif layout == "right":
        lengths = torch.randint(1, t + 1, (b,), generator=gen)
        mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    else:
        mask = (torch.rand(b, t, generator=gen) < 0.5).long()
    # padding carries large garbage that must not leak into the statistics
    z = torch.where(mask.bool()[..., None], z, torch.full((), 100.0, dtype=dtype))
    got, ok = squared_mean_per_position(z, mask)
    want, want_ok = brute_sq_mean(z, mask)
    assert got.dtype == torch.float32
    assert torch.equal(ok, want_ok)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)
    assert bool((got[~ok] == 0).all())


def test_squared_mean_per_position_hand_example() -> None:
    z = torch.tensor([[[1.0], [2.0], [9.0]], [[3.0], [50.0], [50.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    got, ok = squared_mean_per_position(z, mask)
    assert got.flatten().tolist() == pytest.approx([5.0, 4.0, 0.0])
    assert ok.tolist() == [True, True, False]


# --------------------------------------------------------------------------- store


def test_history_store_clone_copies_every_updated_tensor() -> None:
    a = BlockHistory(sq_mean=torch.rand(5, 3), mean=torch.rand(5, 3), updates=2)
    b = BlockHistory(sq_mean=torch.rand(5, 4), mean=None, updates=0)
    store = HistoryStore({(3, BlockKind.ATTENTION): a, (3, BlockKind.MLP): b})
    snapshot = {
        k: (h.sq_mean.clone(), None if h.mean is None else h.mean.clone(), h.updates)
        for k, h in store.blocks.items()
    }

    copy = store.clone()
    assert copy is not store and copy.blocks is not store.blocks
    assert set(copy.blocks) == set(store.blocks)
    for key, h in copy.blocks.items():
        orig = store.blocks[key]
        assert h is not orig
        assert torch.equal(h.sq_mean, orig.sq_mean) and h.updates == orig.updates
        assert h.sq_mean.data_ptr() != orig.sq_mean.data_ptr()
        if orig.mean is None:
            assert h.mean is None
        else:
            assert h.mean is orig.mean  # read-only calibration mean: shared, not copied

    # mutate the copy every way the pipeline could
    ca = copy.get(3, BlockKind.ATTENTION)
    ca.sq_mean.add_(1.0)
    ca.ema_update(torch.ones(2, 3), torch.tensor([True, True]), None, 0.5)
    copy.get(3, BlockKind.MLP).sq_mean[0, 0] = -1.0
    copy.blocks[(4, BlockKind.MLP)] = BlockHistory(sq_mean=torch.zeros(1, 1))

    for key, (sq, mean, updates) in snapshot.items():
        h = store.blocks[key]
        assert torch.equal(h.sq_mean, sq)
        assert (h.mean is None) == (mean is None)
        if mean is not None:
            assert torch.equal(h.mean, mean)
        assert h.updates == updates
    assert (4, BlockKind.MLP) not in store.blocks
    assert store.max_positions == 5


def test_squared_mean_per_position_ignores_non_finite_padding() -> None:
    z = torch.tensor([[[1.0, 2.0]], [[float("nan"), float("inf")]]])
    got, ok = squared_mean_per_position(z, torch.tensor([[1], [0]]))
    assert ok.tolist() == [True]
    assert got.tolist() == [[1.0, 4.0]]


def test_clone_copies_what_updates_write_and_shares_the_read_only_mean():
    from ppframework.history import BlockHistory, HistoryStore
    from ppframework.types import BlockKind

    store = HistoryStore({(0, BlockKind.MLP): BlockHistory(torch.ones(3, 2), torch.zeros(3, 2), samples=4)})
    copy = store.clone()
    block = copy.get(0, BlockKind.MLP)
    block.ema_update(torch.full((3, 2), 5.0), torch.ones(3, dtype=torch.bool), None, 0.5)
    block.running_mean_update(torch.full((3, 2), 5.0), torch.ones(3), None)
    original = store.get(0, BlockKind.MLP)
    assert torch.equal(original.sq_mean, torch.ones(3, 2)) and original.counts is None
    assert block.mean is original.mean and torch.equal(original.mean, torch.zeros(3, 2))
