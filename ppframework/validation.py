"""Checks of what strategies return, run by the pipeline at the hook boundary.

Every stage hook's answer is checked right after the hook returns, before anything uses it, so a
strategy that breaks its stage's contract fails with a :class:`StrategyOutputError` naming the
stage, the strategy and what is wrong, instead of an ``AttributeError`` or an indexing error deep
inside torch (or, worse, a run that finishes with nonsense such as a negative realised ratio).

The checks never change a result. Type, shape and dtype checks read tensor metadata only; value
checks (indices sorted, unique and in range; the scores' weight term, the fused activation and
``infer``'s output and statistics finite) are vectorised, one reduction each, and read back as one
boolean. On CUDA that read-back is a host-device synchronisation, so the pipeline pays at most two
per dynamic block: one for the probe (its indices are used by the probe forward) and one for the
mask, which also carries the weight term's and the fused activation's finiteness checks and the
previous block's ``infer`` check (:func:`check_scores`, :func:`check_fused` and
:func:`check_output` return them as :class:`Pending` checks instead of synchronising; what is still
pending when a forward ends is read back with the next forward's own). A non-finite value is
blamed on the stage that returned it, not on a later stage it flows into. Static methods are checked
once, when they decide (their ``infer`` per block, read back per forward).
``Pipeline.validate_outputs = False`` turns the checks off.

:mod:`ppframework.testing.conformance` runs the same functions, so a strategy that passes the
conformance suite is never rejected by the pipeline.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ppframework.errors import ConfigError
from ppframework.types import (
    AllocationContext,
    BlockContext,
    BlockKind,
    BlockMask,
    BlockOutput,
    ChannelScores,
    Probe,
)

if TYPE_CHECKING:
    from ppframework.adapters import ModelAdapter
    from ppframework.history import HistoryStore

__all__ = [
    "Pending",
    "StrategyOutputError",
    "check_allocation",
    "check_fused",
    "check_history",
    "check_mask",
    "check_output",
    "check_probe",
    "check_scores",
    "read_pending",
]

_SHOWN = 8  # values quoted in an error message


class StrategyOutputError(RuntimeError):
    """A strategy returned something its stage's contract does not allow.

    Attributes:
        stage: the stage hook (``select_probe``, ``score_channels``, ...).
        strategy: the strategy's registered name.
        problem: what was returned (``kept_units with repeated values [3, 3]``).
        rule: what the stage requires.
        where: the block (``layer 3, mlp block``), or "" outside a pipeline.
    """

    def __init__(self, stage: str, strategy: str, problem: str, rule: str, where: str = "") -> None:
        self.stage = stage
        self.strategy = strategy
        self.problem = problem
        self.rule = rule
        self.where = where
        at = f"; at {where}" if where else ""
        super().__init__(f"{stage} strategy {strategy!r} returned {problem}; {rule}{at}")


def _name(strategy: Any) -> str:
    """The registered name of a strategy instance (or the string itself)."""
    if isinstance(strategy, str):
        return strategy
    return str(getattr(strategy, "name", type(strategy).__name__))


def _where(ctx: BlockContext | None) -> str:
    if ctx is None:
        return ""
    kind = ctx.kind.value if isinstance(ctx.kind, BlockKind) else str(ctx.kind)
    return f"layer {ctx.layer}, {kind} block"


def _short(values: list[Any]) -> str:
    """``[1, 2, 3]`` (at most ``_SHOWN`` values, then how many there are)."""
    more = f", ... ({len(values)} values)" if len(values) > _SHOWN else ""
    return "[" + ", ".join(map(str, values[:_SHOWN])) + more + "]"


def _type_name(value: Any) -> str:
    return "None" if value is None else f"a {type(value).__name__}"


def _shape(value: torch.Tensor) -> tuple[int, ...]:
    return tuple(value.shape)


class _Checker:
    """Raises :class:`StrategyOutputError` for one stage, strategy and block."""

    __slots__ = ("ctx", "stage", "strategy")

    def __init__(self, stage: str, strategy: Any, ctx: BlockContext | None) -> None:
        self.stage = stage
        self.strategy = strategy
        self.ctx = ctx

    def fail(self, problem: str, rule: str) -> StrategyOutputError:
        return StrategyOutputError(self.stage, _name(self.strategy), problem, rule, _where(self.ctx))

    def instance(self, value: Any, cls: type, expected: str) -> None:
        if not isinstance(value, cls):
            raise self.fail(_type_name(value), f"expected {expected}")

    def tensor(self, value: Any, what: str, shape: tuple[int, ...] | None, rule: str) -> torch.Tensor:
        """``value`` is a tensor (of ``shape`` when given; -1 matches any size)."""
        if not isinstance(value, torch.Tensor):
            raise self.fail(f"{what} of type {type(value).__name__}", rule)
        if shape is not None:
            got = _shape(value)
            if len(got) != len(shape) or any(e not in (-1, g) for e, g in zip(shape, got, strict=True)):
                raise self.fail(f"{what} with shape {got}", rule)
        return value

    def index(self, value: Any, what: str, size: int, rule: str, nonempty: bool = True) -> torch.Tensor:
        """Metadata of an index tensor: a 1-D torch.long tensor (non-empty)."""
        if not isinstance(value, torch.Tensor):
            raise self.fail(f"{what} of type {type(value).__name__}", rule)
        if value.dim() != 1:
            raise self.fail(f"{what} with shape {_shape(value)} ({value.dim()}-D)", rule)
        if value.dtype != torch.long:
            raise self.fail(f"{what} of dtype {value.dtype}", rule)
        if nonempty and value.numel() == 0:
            raise self.fail(f"an empty {what}", rule)
        return value

    def index_values(self, value: torch.Tensor, what: str, size: int, rule: str) -> None:
        """Slow path, after a failed value check: describe what is wrong with ``value``."""
        values = value.detach().cpu().tolist()
        bad = [v for v in values if v < 0 or v >= size]
        if bad:
            raise self.fail(f"{what} with out-of-range values {_short(bad)}", rule)
        counts = Counter(values)
        repeated = sorted(v for v in values if counts[v] > 1)
        if repeated:
            raise self.fail(f"{what} with repeated values {_short(repeated)}", rule)
        if any(b <= a for a, b in zip(values, values[1:], strict=False)):
            raise self.fail(f"{what} not sorted ascending: {_short(values)}", rule)


def _index_ok(index: torch.Tensor, size: int) -> torch.Tensor | bool:
    """Sorted strictly ascending (so unique) and in ``[0, size)``, as one 0-d bool (no sync)."""
    n = index.numel()
    if n == 0:
        return True
    if index.device.type == "cpu":  # no sync to avoid: numpy is several times faster on small arrays
        a = index.detach().numpy()
        return bool(a[0] >= 0 and a[-1] < size and (n == 1 or (a[1:] > a[:-1]).all()))
    ok = (index[0] >= 0) & (index[-1] < size)
    if n > 1:
        ok = ok & (index[1:] > index[:-1]).all()
    return ok


def _both(a: torch.Tensor | bool, b: torch.Tensor | bool) -> torch.Tensor | bool:
    """``a and b`` for checks that are 0-d bool tensors or plain bools (no sync)."""
    if isinstance(a, bool):
        return b if a else False
    if isinstance(b, bool):
        return a if b else False
    return a & b


def _index_rule(what: str, size: int, unit: str = "indices") -> str:
    return f"{what} must be a non-empty 1-D torch.long tensor of sorted, unique {unit} in [0, {size})"


def _true(flag: torch.Tensor | bool) -> bool:
    """Read a check back (the one host-device synchronisation of a check on CUDA)."""
    return flag if isinstance(flag, bool) else bool(flag)


def _finite_now(values: torch.Tensor) -> bool:
    """Whether every value of ``values`` is finite, read back now (numpy on small CPU float arrays)."""
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        return bool(np.isfinite(values.detach().numpy()).all())
    return bool(torch.isfinite(values).all())


def _finite_flag(values: torch.Tensor) -> torch.Tensor:
    """Every value of ``values`` finite, as a 0-d bool left on the device (one reduction, no sync).

    A float32 sum is non-finite when some value is (NaN and infinities propagate) and otherwise
    finite unless the values come within a factor of the element count of float32's limit (about
    3e38; half-precision values cannot), and it reads the tensor once without an elementwise mask as
    large as the tensor.
    """
    if not values.is_floating_point():
        return torch.ones((), dtype=torch.bool, device=values.device)
    total = values.sum(dtype=torch.float64 if values.dtype == torch.float64 else torch.float32)
    return torch.isfinite(total)


def _non_finite_at(values: torch.Tensor) -> list[Any]:
    """Slow path, after a failed check: where ``values`` is not finite (flat index for 1-D, else tuples)."""
    bad = (~torch.isfinite(values)).nonzero()
    if values.dim() <= 1:
        return bad.flatten().tolist()
    return [tuple(row) for row in bad.tolist()]


@dataclass
class Pending:
    """A value check left on the device, to be read back with a later check (one sync, not two).

    ``ok`` is a 0-d bool tensor; ``raise_error`` raises the described error (called only when
    ``ok`` is False).
    """

    ok: torch.Tensor
    raise_error: Callable[[], None]


def _finite_check(
    check: _Checker,
    values: torch.Tensor,
    problem: str,
    rule: str,
    where: str,
    defer: bool,
    large: bool = False,
) -> Pending | None:
    """``values`` finite: checked now (raising), or returned as a :class:`Pending` check with ``defer``.

    ``large`` tensors (a block's output) are reduced with one float32 sum (:func:`_finite_flag`);
    small ones (per channel) with ``isfinite(...).all()``.
    """

    def raise_error() -> None:
        at = _short(_non_finite_at(values))
        raise check.fail(f"{problem} with non-finite values at {where} {at}", rule)

    if defer:
        flag = _finite_flag(values) if large else torch.isfinite(values).all()
        return Pending(flag, raise_error)
    finite = bool(_finite_flag(values)) if large else _finite_now(values)
    if not finite:
        raise_error()
    return None


def read_pending(pending: Pending | Iterable[Pending | None] | None) -> None:
    """Read back ``pending`` checks (one synchronisation for all) and raise the first failed one's error."""
    items = [pending] if isinstance(pending, Pending) else [p for p in (pending or ()) if p is not None]
    if not items:
        return
    ok: torch.Tensor | bool = True
    for item in items:
        ok = _both(item.ok, ok)
    if _true(ok):
        return
    for item in items:
        if not bool(item.ok):
            item.raise_error()


# ------------------------------------------------------------------------------------------
# select_probe


def check_probe(probe: Any, strategy: Any, ctx: BlockContext | None, batch: int, seq: int) -> None:
    """Check ``select_probe``'s answer for a (``batch``, ``seq``) batch.

    None (no probe) or a :class:`~ppframework.types.Probe` whose ``batch_index`` (k_B,) and
    ``token_index`` (k_T,) are non-empty 1-D ``torch.long``, sorted, unique and in range of B and
    T, and whose ``valid`` is a (k_B, k_T) bool tensor.

    Raises:
        StrategyOutputError: naming the stage, the strategy and the violation.
    """
    if probe is None:
        return
    check = _Checker("select_probe", strategy, ctx)
    check.instance(probe, Probe, "a ppframework.types.Probe or None")
    rows_rule = _index_rule("batch_index", batch, "row indices")
    tokens_rule = _index_rule("token_index", seq, "positions")
    rows = check.index(probe.batch_index, "batch_index", batch, rows_rule)
    tokens = check.index(probe.token_index, "token_index", seq, tokens_rule)
    valid_rule = f"valid must be a bool tensor of shape (k_B, k_T) = ({rows.numel()}, {tokens.numel()})"
    valid = check.tensor(probe.valid, "valid", (rows.numel(), tokens.numel()), valid_rule)
    if valid.dtype != torch.bool:
        raise check.fail(f"valid of dtype {valid.dtype}", valid_rule)
    if not _true(_both(_index_ok(rows, batch), _index_ok(tokens, seq))):
        check.index_values(rows, "batch_index", batch, rows_rule)
        check.index_values(tokens, "token_index", seq, tokens_rule)


# ------------------------------------------------------------------------------------------
# score_channels and fuse_history


def _check_common_scores(check: _Checker, scores: Any, channels: int) -> ChannelScores:
    check.instance(scores, ChannelScores, "a ppframework.types.ChannelScores")
    check.tensor(
        scores.weight_term, "weight_term", (channels,), f"weight_term must have shape (C,) = ({channels},)"
    )
    return scores


def check_scores(
    scores: Any, strategy: Any, ctx: BlockContext, probe: Probe | None = None, defer: bool | None = False
) -> Pending | None:
    """Check ``score_channels``'s answer for a block of ``ctx.geometry.channels`` channels.

    A :class:`~ppframework.types.ChannelScores` with a finite ``weight_term`` (C,); when
    ``evidence`` is set it is (n_pos, C), ``positions`` (n_pos,) sorted, unique positions in
    ``[0, ctx.seq_len)`` and ``position_valid`` None or (n_pos,). Positions that are the probe's own
    (already checked) ``token_index`` tensor are not read again.

    The weight term's finiteness check reads its values: with ``defer`` (None: when it is not on the
    CPU) it is returned as a :class:`Pending` check for :func:`check_mask` to read back with its own.

    Raises:
        StrategyOutputError: naming the stage, the strategy and the violation.
    """
    check = _Checker("score_channels", strategy, ctx)
    channels = ctx.geometry.channels
    _check_common_scores(check, scores, channels)
    weight = scores.weight_term
    if defer is None:
        defer = weight.device.type != "cpu"
    rule = f"weight_term must be a finite tensor of shape (C,) = ({channels},)"
    pending = _finite_check(check, weight, "a weight_term", rule, "channels", defer)
    evidence = scores.evidence
    if evidence is None:
        return pending
    rule = f"evidence must have shape (n_pos, C) with C = {channels}"
    check.tensor(evidence, "evidence", (-1, channels), rule)
    n_pos = int(evidence.shape[0])
    seq = ctx.seq_len
    rule = _index_rule("positions", seq, "positions") + f", one per evidence row ({n_pos})"
    positions = check.index(scores.positions, "positions", seq, rule, nonempty=False)
    if positions.numel() != n_pos:
        raise check.fail(f"positions of shape {_shape(positions)} for {n_pos} evidence rows", rule)
    if scores.position_valid is not None:
        check.tensor(
            scores.position_valid, "position_valid", (n_pos,), f"position_valid must be None or ({n_pos},)"
        )
    if probe is not None and positions is probe.token_index:
        return pending  # checked with the probe
    if not _true(_index_ok(positions, seq)):
        check.index_values(positions, "positions", seq, rule)
    return pending


def check_fused(scores: Any, strategy: Any, ctx: BlockContext, defer: bool | None = None) -> Pending | None:
    """Check ``fuse_history``'s answer for a block of ``ctx.geometry.channels`` channels.

    A :class:`~ppframework.types.ChannelScores` with ``weight_term`` (C,), ``activation`` None or
    (C,) and finite, and ``channel_mean`` (C,) (required when ``bias_compensation`` is set).

    The finiteness check reads the activation's values. With ``defer`` (default: when the
    activation is not on the CPU) it is returned as a :class:`Pending` check for
    :func:`check_mask` to read back with its own, instead of synchronising here.

    Raises:
        StrategyOutputError: naming the stage, the strategy and the violation.
    """
    check = _Checker("fuse_history", strategy, ctx)
    channels = ctx.geometry.channels
    _check_common_scores(check, scores, channels)
    if scores.channel_mean is not None:
        check.tensor(
            scores.channel_mean, "channel_mean", (channels,), f"channel_mean must be None or ({channels},)"
        )
    elif scores.bias_compensation:
        raise check.fail(
            "no channel_mean although bias_compensation is set",
            "fuse_history must set channel_mean (C,) (the history's mean input) when the metric asks for "
            "bias compensation, or raise ValueError when it cannot",
        )
    activation = scores.activation
    if activation is None:
        return None
    rule = f"activation must be None or a finite tensor of shape (C,) = ({channels},)"
    check.tensor(activation, "activation", (channels,), rule)
    if defer is None:
        defer = activation.device.type != "cpu"
    return _finite_check(check, activation, "an activation", rule, "channels", defer)


# ------------------------------------------------------------------------------------------
# apply_mask


def check_mask(
    mask: Any,
    strategy: Any,
    ctx: BlockContext,
    hidden: int | None = None,
    pending: Pending | Iterable[Pending | None] | None = None,
) -> None:
    """Check ``apply_mask``'s answer for the block ``ctx`` describes.

    A :class:`~ppframework.types.BlockMask` with ``total_units == geometry.units``; ``kept_units``
    a 1-D ``torch.long`` tensor of sorted, unique units in ``[0, units)``, at least one; for MLP
    blocks ``kept_kv_heads`` None; for attention ``kept_kv_heads`` None or sorted, unique key/value
    heads in ``[0, num_kv_heads)`` that include the key/value head of every kept query head;
    ``output_bias`` None or (``hidden``,). ``pending`` checks (from :func:`check_scores`,
    :func:`check_fused` and the previous block's :func:`check_output`) are read back together with
    this one: one synchronisation on CUDA.

    Raises:
        StrategyOutputError: naming the stage (the pending check's own for a failed one, the
            earliest first), the strategy and the violation.
    """
    pendings = [pending] if isinstance(pending, Pending) else [p for p in (pending or ()) if p is not None]
    check = _Checker("apply_mask", strategy, ctx)
    check.instance(mask, BlockMask, "a ppframework.types.BlockMask")
    geo = ctx.geometry
    units = geo.units
    what = "query heads" if ctx.kind is BlockKind.ATTENTION else "channels"
    rule = _index_rule("kept_units", units, what) + " (at least 1 kept, at most all)"
    kept = check.index(mask.kept_units, "kept_units", units, rule)
    if mask.total_units != units:
        raise check.fail(
            f"total_units={mask.total_units!r}", f"total_units must be the block's units ({units})"
        )
    kv = mask.kept_kv_heads
    ok = _index_ok(kept, units)
    kv_rule = ""
    if kv is not None:
        if ctx.kind is not BlockKind.ATTENTION:
            raise check.fail("kept_kv_heads for an MLP block", "kept_kv_heads must be None for MLP blocks")
        n_kv = geo.num_kv_heads or units
        kv_rule = _index_rule("kept_kv_heads", n_kv, "key/value heads") + (
            f" including the key/value head (unit // {geo.group_size}) of every kept query head"
        )
        check.index(kv, "kept_kv_heads", n_kv, kv_rule)
        if kv is not kept:
            groups = kept if geo.group_size == 1 else torch.div(kept, geo.group_size, rounding_mode="floor")
            ok = _both(_both(ok, _index_ok(kv, n_kv)), torch.isin(groups, kv).all())
    if mask.output_bias is not None:
        shape = (hidden,) if hidden is not None else (-1,)
        check.tensor(
            mask.output_bias, "output_bias", shape, f"output_bias must be None or (hidden,) = {shape}"
        )
    for item in pendings:
        ok = _both(item.ok, ok)
    if _true(ok):
        return
    read_pending(pendings)  # an earlier stage's failure first
    check.index_values(kept, "kept_units", units, rule)
    if kv is not None:
        check.index_values(kv, "kept_kv_heads", geo.num_kv_heads or units, kv_rule)
        groups = torch.div(kept, geo.group_size, rounding_mode="floor")
        missing = sorted(set(groups.tolist()) - set(kv.tolist()))
        raise check.fail(
            f"kept_kv_heads {_short(kv.tolist())} missing key/value heads {_short(missing)}", kv_rule
        )


# ------------------------------------------------------------------------------------------
# infer


def check_output(
    out: Any,
    strategy: Any,
    ctx: BlockContext,
    shape: tuple[int, ...] | torch.Size,
    mask: BlockMask | None = None,
    defer: bool | None = False,
) -> Pending | None:
    """Check ``infer``'s answer for a block whose input has ``shape`` (B, T, D).

    A :class:`~ppframework.types.BlockOutput` whose ``output`` has the block input's shape and is
    finite; with ``ctx.collect_stats``, a finite ``sq_mean`` (T, n) where n is
    ``kept_channels.numel()`` (or every channel when ``kept_channels`` is None; with a ``mask``,
    ``n_kept * unit_width``), ``kept_channels`` None or 1-D ``torch.long``, and ``position_valid``
    None or (T,).

    The finiteness check (one reduction over the output, one over ``sq_mean``) reads values: with
    ``defer`` (None: when the output is not on the CPU) it is returned as a :class:`Pending` check
    for a later :func:`check_mask` (or :func:`read_pending`) to read back.

    Raises:
        StrategyOutputError: naming the stage, the strategy and the violation.
    """
    check = _Checker("infer", strategy, ctx)
    check.instance(out, BlockOutput, "a ppframework.types.BlockOutput")
    shape = tuple(shape)
    rule = f"output must be a finite tensor of the block input's shape {shape}"
    output = check.tensor(out.output, "output", shape, rule)
    if defer is None:
        defer = output.device.type != "cpu"
    pending = _finite_check(check, output, "an output", rule, "(row, position, feature)", defer, large=True)
    if not ctx.collect_stats:
        return pending
    geo = ctx.geometry
    seq = shape[1]
    channels = geo.channels
    kept = out.kept_channels
    if kept is not None:
        expected = None if mask is None else mask.n_kept * geo.unit_width
        rule = "kept_channels must be None (all) or a 1-D torch.long tensor of the kept channels" + (
            f" ({expected} for {mask.n_kept} kept units)" if expected is not None else ""
        )
        check.index(kept, "kept_channels", channels, rule, nonempty=False)
        if expected is not None and kept.numel() != expected:
            raise check.fail(f"kept_channels with {kept.numel()} channels", rule)
        channels = int(kept.numel())
    rule = (
        f"with ctx.collect_stats, sq_mean must be (T, kept channels) = ({seq}, {channels}): the full-batch "
        "statistics that update the history"
    )
    if out.sq_mean is None:
        raise check.fail("no sq_mean although ctx.collect_stats is set", rule)
    sq_mean = check.tensor(out.sq_mean, "sq_mean", (seq, channels), rule)
    if out.position_valid is not None:
        check.tensor(out.position_valid, "position_valid", (seq,), f"position_valid must be None or ({seq},)")
    stats = _finite_check(check, sq_mean, "a sq_mean", rule, "(position, channel)", defer, large=True)
    if pending is None or stats is None:
        return pending or stats
    output_pending = pending
    return Pending(output_pending.ok & stats.ok, lambda: read_pending([output_pending, stats]))


# ------------------------------------------------------------------------------------------
# allocate


_RATIO_TYPES = "a Python float or int, a numpy floating/integer scalar or a 0-d tensor"


def _as_ratio(value: Any) -> float | None:
    """``value`` as a Python float when it is a real number of an accepted type (:data:`_RATIO_TYPES`,
    not a bool), else None."""
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, int | float | np.integer | np.floating):
        return float(value)
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        if value.dtype != torch.bool and not value.is_complex():
            return float(value.item())
    return None


def _describe_ratio(value: Any) -> str:
    shape = getattr(value, "shape", None)
    shown = f" with shape {tuple(shape)}" if shape is not None and tuple(shape) != () else ""
    return f"{type(value).__name__}{shown}"


def check_allocation(ratios: Any, strategy: Any, plan: AllocationContext) -> dict[Any, float]:
    """``allocate`` returned a dict with exactly ``plan.blocks`` as keys and, for each, a finite
    ratio in ``[0, 1)``: a real number (:data:`_RATIO_TYPES`; not a bool).

    Returns:
        The ratios as Python floats (numpy scalars and 0-d tensors converted), in the same order.
    """
    check = _Checker("allocate", strategy, None)
    rule = (
        "allocate must return {(layer, kind): ratio} for every pruned block (plan.blocks) and no other, "
        f"each ratio a finite number in [0, 1): {_RATIO_TYPES}"
    )
    if not isinstance(ratios, dict):
        raise check.fail(_type_name(ratios), rule)
    expected = set(plan.blocks)
    missing = sorted(expected - set(ratios), key=str)
    extra = sorted(set(ratios) - expected, key=str)
    if missing:
        raise check.fail(f"no ratio for the blocks {_short(missing)}", rule)
    if extra:
        raise check.fail(f"ratios for blocks that are not pruned {_short(extra)}", rule)
    converted = {key: _as_ratio(value) for key, value in ratios.items()}
    wrong = [(key, ratios[key]) for key, value in converted.items() if value is None]
    if wrong:
        key, value = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise check.fail(f"a ratio of type {_describe_ratio(value)} for the block {key}{more}", rule)
    bad = [(key, value) for key, value in converted.items() if not (math.isfinite(value) and 0 <= value < 1)]
    if bad:
        raise check.fail(f"ratios outside [0, 1) {_short(bad)}", rule)
    return converted  # type: ignore[return-value]  # no None left


# ------------------------------------------------------------------------------------------
# history


def check_history(
    history: HistoryStore,
    adapter: ModelAdapter,
    layers: Iterable[int] = (),
    kinds: Iterable[BlockKind] = tuple(BlockKind),
) -> None:
    """Check that ``history`` was built for ``adapter``'s model.

    Every block's layer index is in range and its ``sq_mean`` is (positions, channels of that
    kind), with ``mean`` and ``counts`` (when set) of the same shape; every block of ``layers`` x
    ``kinds`` (the pruned blocks of a method that needs a history) is present.

    Raises:
        ConfigError: naming each block that does not match and how.
    """
    n_layers = adapter.num_layers
    channels = {kind: adapter.geometry(kind).channels for kind in BlockKind}
    problems: list[str] = []
    for (layer, kind), block in sorted(
        history.blocks.items(), key=lambda item: (item[0][0], item[0][1].value)
    ):
        name = f"(layer {layer}, {BlockKind(kind).value})"
        if not 0 <= layer < n_layers:
            problems.append(f"{name}: layer index out of range for a {n_layers}-layer model")
            continue
        sq_mean = block.sq_mean
        want = channels[BlockKind(kind)]
        if sq_mean.dim() != 2 or sq_mean.shape[1] != want:
            problems.append(
                f"{name}: sq_mean has shape {_shape(sq_mean)}, the model's {BlockKind(kind).value} blocks "
                f"have {want} channels (expected (positions, {want}))"
            )
            continue
        for field in ("mean", "counts"):
            value = getattr(block, field)
            if value is not None and value.shape != sq_mean.shape:
                problems.append(f"{name}: {field} has shape {_shape(value)}, sq_mean {_shape(sq_mean)}")
    missing = [
        f"(layer {layer}, {kind.value})"
        for layer in sorted(layers)
        for kind in BlockKind
        if kind in kinds and (layer, kind) not in history.blocks
    ]
    if missing:
        problems.append(f"no history for the pruned blocks {_short(missing)}")
    if problems:
        shown = problems[:_SHOWN] + (
            [f"... and {len(problems) - _SHOWN} more"] if len(problems) > _SHOWN else []
        )
        raise ConfigError(
            f"history: it does not match this model ({n_layers} layers, attention "
            f"{channels[BlockKind.ATTENTION]} / mlp {channels[BlockKind.MLP]} channels):\n  "
            + "\n  ".join(shown)
            + "\nBuild the history for this model (ppframework.build_pipeline calibrates it) "
            "or pass history=None."
        )
