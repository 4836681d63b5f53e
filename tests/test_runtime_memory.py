"""Interleaved timing, timing statistics, DecoderTimer hooks and PeakMemory."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ppframework.metrics.memory import PeakMemory, current_rss_bytes, format_bytes
from ppframework.metrics.runtime import DecoderTimer, TimingStats, ratio_to, round_order, time_interleaved
from ppframework.testing.tiny import tiny_model


class FakeClock:
    """A clock that only moves when a fake callable says it took some time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_interleaving_order_rotates_and_alternates_direction() -> None:
    log: list[str] = []
    fns = {name: (lambda name=name: log.append(name)) for name in "abc"}
    stats = time_interleaved(fns, repeats=6, warmup=1)
    assert log == list("abc" + "abc" + "cba" + "bca" + "acb" + "cab" + "bac")
    assert list(stats) == ["a", "b", "c"]
    assert all(len(s.seconds) == 6 for s in stats.values())


@given(st.integers(min_value=1, max_value=7), st.integers(min_value=0, max_value=30))
def test_round_order_balances_neighbours(count: int, first_round: int) -> None:
    """Every round runs each variant once; in any two consecutive rounds starting at an even round,
    every pair of variants runs in both orders (the paired overhead's order effects cancel), and
    over ``2 * count`` rounds every variant runs first."""
    names = [f"v{i}" for i in range(count)]
    start = first_round - first_round % 2
    rounds = [round_order(names, r) for r in range(start, start + 2 * count)]
    assert all(sorted(order) == sorted(names) for order in rounds)
    for even, odd in zip(rounds[::2], rounds[1::2], strict=True):
        assert odd == even[::-1]
    assert {order[0] for order in rounds} == set(names)


def test_stats_with_fake_clock() -> None:
    clock = FakeClock()

    def taking(durations: list[float]) -> Callable[[], None]:
        it: Iterator[float] = iter(durations)

        def fn() -> None:
            clock.now += next(it)

        return fn

    # One warm-up call each (the first duration) is not recorded.
    fns = {
        "dense": taking([99.0, 4.0, 1.0, 3.0, 10.0, 2.0]),
        "pruned": taking([99.0, 2.0, 2.0, 2.0, 2.0, 2.0]),
    }
    stats = time_interleaved(fns, repeats=5, warmup=1, tokens=6, clock=clock)
    dense = stats["dense"]
    assert dense.seconds == [4.0, 1.0, 3.0, 10.0, 2.0]
    assert dense.median == 3.0
    assert (dense.q25, dense.q75, dense.iqr) == (2.0, 4.0, 2.0)
    assert dense.min == 1.0
    assert dense.tokens_per_s() == 2.0
    assert dense.tokens_per_s(12) == 4.0
    assert ratio_to(stats, "dense") == {"dense": 1.0, "pruned": pytest.approx(2.0 / 3.0)}
    assert dense.to_dict()["median_s"] == 3.0
    single = TimingStats("one", [0.5])
    assert (single.median, single.iqr) == (0.5, 0.0)
    with pytest.raises(ValueError, match="tokens"):
        single.tokens_per_s()
    with pytest.raises(KeyError):
        ratio_to(stats, "missing")


def test_real_sleep() -> None:
    stats = time_interleaved(
        {"short": lambda: time.sleep(0.001), "long": lambda: time.sleep(0.004)}, repeats=3, warmup=0
    )
    assert stats["short"].min >= 0.001
    assert stats["long"].min >= 0.004


def test_decoder_timer_fires_with_instance_forward_replacement() -> None:
    model = tiny_model("llama", num_hidden_layers=2)
    layers = model.model.layers
    calls: list[int] = []
    for index, layer in enumerate(layers):
        original = layer.forward

        def replaced(*args: Any, _original: Any = original, _index: int = index, **kwargs: Any) -> Any:
            calls.append(_index)
            return _original(*args, **kwargs)

        layer.forward = replaced  # instance-level replacement, as the pipeline does
    ids = torch.randint(4, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), DecoderTimer(layers) as timer:
        model(input_ids=ids, use_cache=False)
        model(input_ids=ids, use_cache=False)
    assert calls == [0, 1, 0, 1]
    assert len(timer.seconds) == 2
    assert all(s > 0 for s in timer.seconds)
    assert timer.total == pytest.approx(sum(timer.seconds))
    assert timer.stats(tokens=16).tokens_per_s() > 0
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    assert len(timer.seconds) == 2  # hooks removed on exit
    assert not layers[0]._forward_pre_hooks and not layers[-1]._forward_hooks


def test_peak_memory_cpu() -> None:
    with PeakMemory() as mem:
        block = torch.ones(4 * 1024 * 1024)  # 16 MiB
        block.add_(1)
    assert mem.peak_bytes is not None and mem.peak_bytes > 0
    assert mem.peak_rss_bytes == mem.peak_bytes
    if current_rss_bytes() is not None:  # Linux
        assert mem.rss_before_bytes is not None and mem.rss_before_bytes > 0
        assert isinstance(mem.rss_delta_bytes, int)
    assert mem.increase_bytes is None
    assert mem.as_dict()["device"] == "cpu"
    del block


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_cuda() -> None:
    with PeakMemory("cuda") as mem:
        block = torch.ones(1024 * 1024, device="cuda")
    assert mem.increase_bytes is not None and mem.increase_bytes >= 4 * 1024 * 1024
    del block


def test_format_bytes() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(3 * 1024**3) == "3.00 GiB"
    assert format_bytes(-2048) == "-2.00 KiB"
    assert format_bytes(None) == "n/a"
