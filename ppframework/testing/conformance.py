"""Conformance checks for pruning strategies: property tests of the five stage contracts.

Every stage hook of :mod:`ppframework.hookspecs` has a contract (its docstring and the
dataclasses of :mod:`ppframework.types`). The checks here build random but valid inputs with
hypothesis (then a fixed set of corner cases, so those are covered on every run), call the
strategy's hook method the way pluggy would (keyword arguments, only those the method declares)
and assert the contract. A violation raises :class:`AssertionError` whose message names the
strategy and the rule; hypothesis adds the (shrunk) falsifying example, a corner case is named.

A plugin author reuses them from their own tests::

    from ppframework.testing import check_strategy

    def test_my_probe_conforms():
        check_strategy(MyProbe())

or checks every registered strategy (built-ins and installed plugins)::

    @pytest.mark.parametrize("info", registered_strategies(), ids=lambda i: f"{i.stage}:{i.name}")
    def test_conforms(info):
        check_strategy(info.build(), max_examples=10)

Every check also runs the pipeline's own output check of the stage (:mod:`ppframework.validation`,
rule "the pipeline's output checks accept the result"), so a strategy that conforms is never
rejected by the pipeline.

The checks need ``hypothesis`` (the ``test`` extra); it is imported when a check runs, so importing
this module does not need it. They run on the CPU with small tensors; :func:`check_infer` builds a
one-layer tiny LLaMA (grouped-query attention, rotary) and a one-layer tiny OPT once per process.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from ppframework.history import BlockHistory
from ppframework.hookspecs import STAGES
from ppframework.types import (
    AllocationContext,
    BlockContext,
    BlockGeometry,
    BlockInputs,
    BlockKind,
    BlockMask,
    BlockOutput,
    ChannelScores,
    Probe,
)
from ppframework.validation import (
    check_allocation,
    check_fused,
    check_mask,
    check_output,
    check_probe,
    check_scores,
)

if TYPE_CHECKING:
    from ppframework.registry import StrategyInfo, StrategyRegistry

__all__ = [
    "STAGE_CHECKS",
    "check_allocate",
    "check_apply_mask",
    "check_fuse_history",
    "check_infer",
    "check_score_channels",
    "check_select_probe",
    "check_strategy",
    "default_geometry",
    "make_context",
    "registered_strategies",
]

#: Padding layouts of the checks' attention masks (every row keeps >= 1 real token). ``*-short``:
#: every row is shorter than the batch, so the last (right) or first (left) position is padding
#: in every row.
PADDINGS: tuple[str, ...] = ("none", "right", "left", "right-short", "left-short")

_SEED = 2**31 - 1
_HEAD_COUNTS = (1, 2, 3, 4, 6, 8)
_TINY_FAMILIES = ("llama-gqa", "opt")
_ATOL = 1e-5
_RTOL = 1e-4


# --------------------------------------------------------------------------------------------
# contexts and geometries


def default_geometry(kind: BlockKind | str) -> BlockGeometry:
    """A small geometry of ``kind``: 4 query heads of width 8 over 2 key/value heads, or 32 channels."""
    kind = BlockKind(kind)
    if kind is BlockKind.ATTENTION:
        return BlockGeometry(kind, units=4, unit_width=8, num_kv_heads=2)
    return BlockGeometry(kind, units=32, unit_width=1)


def make_context(
    kind: BlockKind | str,
    geometry: BlockGeometry | None = None,
    *,
    layer: int = 0,
    batch_index: int = 0,
    seq_len: int | None = None,
    seed: int = 0,
    position_valid: torch.Tensor | None = None,
    collect_stats: bool = False,
    round_to: int = 1,
    gqa_policy: str = "query-only",
) -> BlockContext:
    """Build a :class:`~ppframework.types.BlockContext` as the pipeline would, for tests.

    Args:
        kind: the block kind (a :class:`~ppframework.types.BlockKind` or its value).
        geometry: the block's sizes; :func:`default_geometry` of ``kind`` when None.
        layer: decoder layer index.
        batch_index: index of the batch since the pipeline was built.
        seq_len: tokens per sequence; taken from ``position_valid`` when None (8 without either).
        seed: seed of the context's fresh CPU ``torch.Generator`` (same seed, same randomness).
        position_valid: (T,) True where some row is real text; all True when None.
        collect_stats: whether ``infer`` must report full-batch statistics.
        round_to: kept MLP width is rounded up to a multiple of this.
        gqa_policy: ``query-only`` or ``group``.

    Raises:
        ValueError: ``geometry`` is of another kind, or ``position_valid`` does not have ``seq_len`` rows.
    """
    kind = BlockKind(kind)
    geometry = default_geometry(kind) if geometry is None else geometry
    if geometry.kind is not kind:
        raise ValueError(f"geometry is for a {geometry.kind.value} block, not {kind.value}")
    if position_valid is None:
        seq_len = 8 if seq_len is None else seq_len
        position_valid = torch.ones(seq_len, dtype=torch.bool)
    else:
        position_valid = torch.as_tensor(position_valid).bool()
        if seq_len is None:
            seq_len = int(position_valid.shape[0])
        if tuple(position_valid.shape) != (seq_len,):
            raise ValueError(f"position_valid has shape {tuple(position_valid.shape)}, expected ({seq_len},)")
    return BlockContext(
        layer=layer,
        kind=kind,
        batch_index=batch_index,
        geometry=geometry,
        seq_len=seq_len,
        generator=torch.Generator().manual_seed(seed),
        round_to=round_to,
        gqa_policy=gqa_policy,
        position_valid=position_valid,
        collect_stats=collect_stats,
    )


def registered_strategies(
    stage: str | None = None, registry: StrategyRegistry | None = None
) -> list[StrategyInfo]:
    """Registered strategies (of one ``stage``, or all), by stage then name; for parametrisation.

    ``registry`` defaults to :func:`ppframework.registry.default_registry` (built-ins and the
    entry-point plugins allowed by ``PPF_LOAD_PLUGINS``).
    """
    if stage is not None and stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    if registry is None:
        from ppframework.registry import default_registry

        registry = default_registry()
    return [info for info in registry.all() if stage is None or info.stage == stage]


# --------------------------------------------------------------------------------------------
# the subject under test: structure, calls and failures


def _describe(strategy: Any, stage: str | None = None) -> str:
    cls = type(strategy)
    stage = stage or getattr(strategy, "stage", "?")
    return f"{stage} strategy {getattr(strategy, 'name', None)!r} ({cls.__module__}.{cls.__qualname__})"


def _fmt(value: Any) -> str:
    """A short description of a value for failure messages."""
    if isinstance(value, torch.Tensor):
        head = f"tensor(shape={tuple(value.shape)}, dtype={value.dtype}"
        if value.numel() <= 24:
            return f"{head}, values={value.detach().cpu().tolist()})"
        return head + ")"
    if isinstance(value, (list, tuple)) and len(value) > 24:
        return f"{type(value).__name__} of {len(value)}"
    return repr(value)


class _Subject:
    """A strategy under test: validates its structure once, calls its hook, reports violations."""

    def __init__(self, strategy: Any, stage: str) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        self.strategy = strategy
        self.stage = stage
        self.label = _describe(strategy, stage)
        self.argnames = self._validate_structure()

    def error(self, rule: str, detail: str = "") -> AssertionError:
        """The AssertionError reporting a violated ``rule``."""
        return AssertionError(f"{self.label} violates {rule!r}" + (f": {detail}" if detail else ""))

    def require(self, condition: bool, rule: str, detail: str | Callable[[], str] = "") -> None:
        """Raise the violation of ``rule`` unless ``condition``; ``detail`` may be a thunk."""
        if not condition:
            raise self.error(rule, detail() if callable(detail) else detail)

    def _validate_structure(self) -> tuple[str, ...]:
        import pluggy
        from pydantic import BaseModel

        from ppframework import hookspecs

        strategy = self.strategy
        self.require(not isinstance(strategy, type), "is checked as an instance", "pass an instance")
        name = getattr(strategy, "name", None)
        self.require(isinstance(name, str) and bool(name), "has a non-empty string `name`", f"name={name!r}")
        params = getattr(type(strategy), "Params", None)
        self.require(
            params is None or (isinstance(params, type) and issubclass(params, BaseModel)),
            "`Params` is a pydantic model",
            f"Params={params!r}",
        )
        self.require(
            callable(getattr(strategy, self.stage, None)),
            "has a method named after its stage",
            f"no callable {self.stage!r}",
        )
        pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        pm.add_hookspecs(hookspecs)
        try:
            pm.register(strategy, name="ppframework-conformance-subject")
        except Exception as exc:
            raise self.error("hook method matches the hookspec", f"pluggy refused it: {exc}") from exc
        impls = [impl for impl in getattr(pm.hook, self.stage).get_hookimpls() if impl.plugin is strategy]
        self.require(
            bool(impls), "the stage method is marked with @hookimpl", "pluggy would never call it (no marker)"
        )
        impl = impls[0]
        self.require(
            not (impl.hookwrapper or impl.wrapper),
            "the stage method is a plain @hookimpl",
            "it is a wrapper; the stage hook is firstresult and needs an answer",
        )
        return tuple(impl.argnames)

    def call(self, *, allow: tuple[type[Exception], ...] = (), **kwargs: Any) -> Any:
        """Call the hook method with the keyword arguments it declares (as pluggy does).

        Exceptions of the ``allow`` types propagate; any other exception is a violation.
        """
        method = getattr(self.strategy, self.stage)
        try:
            return method(**{name: kwargs[name] for name in self.argnames})
        except allow:
            raise
        except Exception as exc:
            raise self.error("the hook runs on valid inputs", f"raised {type(exc).__name__}: {exc}") from exc

    # -- common assertions ---------------------------------------------------------------------
    def require_index(self, value: Any, size: int, what: str) -> torch.Tensor:
        """``value`` is a 1-D torch.long tensor sorted strictly ascending, in ``[0, size)``."""
        self.require(
            isinstance(value, torch.Tensor) and value.dim() == 1 and value.dtype == torch.long,
            "index tensors are 1-D torch.long",
            lambda: f"{what} = {_fmt(value)}",
        )
        index = value.detach().cpu()
        self.require(
            bool((index[1:] > index[:-1]).all()),
            "indices are sorted strictly ascending (unique)",
            lambda: f"{what} = {_fmt(index)}",
        )
        self.require(
            index.numel() == 0 or (int(index.min()) >= 0 and int(index.max()) < size),
            "indices are in range",
            lambda: f"{what} = {_fmt(index)} with {size} available",
        )
        return index

    def require_shape(self, value: Any, shape: tuple[int, ...], rule: str, what: str) -> torch.Tensor:
        """``value`` is a tensor of ``shape``."""
        self.require(
            isinstance(value, torch.Tensor) and tuple(value.shape) == shape,
            rule,
            lambda: f"{what} = {_fmt(value)}, expected shape {shape}",
        )
        return value

    def require_finite(self, value: torch.Tensor, rule: str, what: str, nonnegative: bool = False) -> None:
        """``value`` is finite (and >= 0)."""
        self.require(bool(torch.isfinite(value).all()), rule, lambda: f"{what} = {_fmt(value)} is not finite")
        if nonnegative:
            self.require(bool((value >= 0).all()), rule, lambda: f"{what} = {_fmt(value)} has negatives")

    def require_accepted(self, check: Callable[..., Any], value: Any, *args: Any, **kwargs: Any) -> None:
        """The pipeline's own output check (:mod:`ppframework.validation`) accepts ``value``."""
        from ppframework.validation import StrategyOutputError

        try:
            check(value, self.strategy, *args, **kwargs)
        except StrategyOutputError as exc:
            raise self.error("the pipeline's output checks accept the result", str(exc)) from exc

    def require_unchanged(self, before: dict[str, Any], after: dict[str, Any], rule: str) -> None:
        """Every tensor (or value) in ``after`` equals its snapshot in ``before``."""
        for key, old in before.items():
            new = after[key]
            if old is None:
                same = new is None
            elif isinstance(old, torch.Tensor):
                same = (
                    isinstance(new, torch.Tensor)
                    and new.shape == old.shape
                    and new.dtype == old.dtype
                    and torch.equal(new, old)
                )
            else:
                same = new == old
            self.require(same, rule, lambda key=key: f"{key} changed")


def _snapshot(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in values.items()}


def _fields(obj: Any, prefix: str) -> dict[str, Any]:
    """The tensor-or-None fields of a dataclass, keyed ``prefix.field``."""
    if obj is None:
        return {}
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return {
        f"{prefix}.{name}": value
        for name, value in values.items()
        if value is None or isinstance(value, torch.Tensor)
    }


def _cloned(obj: Any) -> Any:
    """A copy of a dataclass with its tensor fields cloned."""
    tensors = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return dataclasses.replace(
        obj, **{k: v.clone() for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    )


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.equal(a.detach().cpu(), b.detach().cpu())
    return a == b


# --------------------------------------------------------------------------------------------
# hypothesis plumbing and input factories


def _hypothesis() -> Any:
    try:
        import hypothesis
    except ImportError as exc:  # pragma: no cover - hypothesis is part of the test extra
        raise ImportError(
            "the ppframework conformance checks need hypothesis: pip install 'ppframework[test]'"
        ) from exc
    return hypothesis


def _strategies() -> Any:
    return _hypothesis().strategies


def _find_assertion(exc: BaseException) -> AssertionError | None:
    if isinstance(exc, AssertionError):
        return exc
    for inner in getattr(exc, "exceptions", ()) or ():
        found = _find_assertion(inner)
        if found is not None:
            return found
    return None


def _run_examples(
    run_case: Callable[..., None],
    draw_case: Callable[[Any], dict[str, Any]],
    max_examples: int,
    fixed_cases: Iterable[dict[str, Any]] = (),
) -> None:
    """Run ``run_case(**draw_case(data))`` on ``max_examples`` hypothesis examples, then on every
    fixed corner case (so the corners are covered on every run); violations raise AssertionError."""
    if max_examples < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples}")
    hypothesis = _hypothesis()
    st = hypothesis.strategies

    def test(data: Any) -> None:
        run_case(**draw_case(data))

    wrapped = hypothesis.settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        report_multiple_bugs=False,
        phases=[phase for phase in hypothesis.Phase if phase.name != "explain"],
    )(hypothesis.given(data=st.data())(test))
    try:
        wrapped()
    except AssertionError:
        raise
    except Exception as exc:  # hypothesis' Flaky / multiple-failure groups wrapping a violation
        found = _find_assertion(exc)
        if found is None:
            raise
        raise AssertionError(f"{found} (hypothesis: {type(exc).__name__}: {exc})") from exc
    for case in fixed_cases:
        try:
            run_case(**case)
        except AssertionError as exc:
            shown = ", ".join(f"{key}={value!r}" for key, value in case.items())
            raise AssertionError(f"{exc} [corner case: {shown}]") from exc


def _padding_mask(gen: torch.Generator, batch: int, seq: int, padding: str) -> torch.Tensor:
    """(B, T) long mask laid out as one of :data:`PADDINGS`; every row keeps >= 1 real token."""
    if padding == "none":
        return torch.ones(batch, seq, dtype=torch.long)
    longest = max(seq - 1, 1) if padding.endswith("-short") else seq
    lengths = torch.randint(1, longest + 1, (batch,), generator=gen)
    positions = torch.arange(seq)[None, :]
    if padding.startswith("right"):
        return (positions < lengths[:, None]).long()
    if padding.startswith("left"):
        return (positions >= seq - lengths[:, None]).long()
    raise ValueError(f"unknown padding {padding!r}")


def _subset(gen: torch.Generator, candidates: torch.Tensor) -> torch.Tensor:
    """A random non-empty subset of 1-D ``candidates``, sorted."""
    n = int(candidates.numel())
    k = int(torch.randint(1, n + 1, (1,), generator=gen))
    return candidates[torch.randperm(n, generator=gen)[:k]].sort().values


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _draw_geometry(data: Any) -> BlockGeometry:
    st = _strategies()
    kind = data.draw(st.sampled_from(tuple(BlockKind)), label="kind")
    if kind is BlockKind.ATTENTION:
        heads = data.draw(st.sampled_from(_HEAD_COUNTS), label="heads")
        kv_heads = data.draw(st.sampled_from(_divisors(heads)), label="num_kv_heads")
        width = data.draw(st.integers(1, 8), label="head_dim")
        return BlockGeometry(kind, units=heads, unit_width=width, num_kv_heads=kv_heads)
    return BlockGeometry(kind, units=data.draw(st.integers(1, 48), label="mlp_units"), unit_width=1)


def _nonnegative(gen: torch.Generator, shape: tuple[int, ...], values: str) -> torch.Tensor:
    """Non-negative scores: ``random`` (continuous), ``ties`` (small integers) or ``zeros``."""
    if values == "zeros":
        return torch.zeros(shape)
    if values == "ties":
        return torch.randint(0, 3, shape, generator=gen).float()
    return torch.randn(shape, generator=gen).square()


def _activation_times_weight(activation: torch.Tensor | None, weight_term: torch.Tensor) -> torch.Tensor:
    """PPsp-like combine of the synthetic scores: ``a_c * w_c`` (``w_c`` alone without activation)."""
    return weight_term if activation is None else activation * weight_term


# --------------------------------------------------------------------------------------------
# select_probe


def _draw_probe_case(data: Any) -> dict[str, Any]:
    st = _strategies()
    return {
        "batch": data.draw(st.integers(1, 6), label="batch"),
        "seq": data.draw(st.integers(1, 16), label="seq_len"),
        "dim": data.draw(st.integers(1, 12), label="dim"),
        "padding": data.draw(st.sampled_from(PADDINGS), label="padding"),
        "values": data.draw(st.sampled_from(("random", "constant")), label="values"),
        "dtype": data.draw(st.sampled_from((torch.float32, torch.bfloat16)), label="dtype"),
        "kind": data.draw(st.sampled_from(tuple(BlockKind)), label="kind"),
        "batch_index": data.draw(st.integers(0, 3), label="batch_index"),
        "seed": data.draw(st.integers(0, _SEED), label="seed"),
    }


_PROBE_CORNERS: tuple[dict[str, Any], ...] = tuple(
    {
        "batch": batch,
        "seq": seq,
        "dim": 8,
        "padding": padding,
        "values": values,
        "dtype": dtype,
        "kind": kind,
        "batch_index": batch_index,
        "seed": 0,
    }
    for batch, seq, padding, values, dtype, kind, batch_index in (
        (1, 1, "none", "random", torch.float32, BlockKind.ATTENTION, 0),
        (1, 12, "right-short", "random", torch.float32, BlockKind.MLP, 1),
        (4, 12, "right-short", "random", torch.float32, BlockKind.ATTENTION, 0),
        (4, 12, "left-short", "random", torch.bfloat16, BlockKind.MLP, 2),
        (3, 16, "right", "constant", torch.float32, BlockKind.ATTENTION, 1),
        (6, 2, "left", "random", torch.bfloat16, BlockKind.ATTENTION, 0),
        (16, 16, "none", "random", torch.float32, BlockKind.MLP, 3),
    )
)


def _probe_case(
    subject: _Subject,
    *,
    batch: int,
    seq: int,
    dim: int,
    padding: str,
    values: str,
    dtype: torch.dtype,
    kind: BlockKind,
    batch_index: int,
    seed: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    mask = _padding_mask(gen, batch, seq, padding)
    real = mask.bool()
    if values == "constant":
        residual = torch.ones(batch, seq, dim)
    else:
        residual = torch.randn(batch, seq, dim, generator=gen)
        garbage = 30.0 * torch.randn(batch, seq, dim, generator=gen)  # padding: large, so leaks show
        residual = torch.where(real[..., None], residual, garbage)
    normed = residual * torch.rsqrt(residual.square().mean(dim=-1, keepdim=True) + 1e-6)
    inputs = {"residual": residual.to(dtype), "normed": normed.to(dtype), "attention_mask": mask}
    before = _snapshot(inputs)

    def ctx() -> BlockContext:
        return make_context(kind, batch_index=batch_index, seed=seed, position_valid=real.any(dim=0))

    probe = subject.call(ctx=ctx(), **inputs)
    subject.require_unchanged(before, inputs, "inputs are not modified")
    again = subject.call(ctx=ctx(), **_snapshot(before))
    if probe is None:
        subject.require(again is None, "deterministic: same inputs and seed give the same probe")
        return
    subject.require(isinstance(probe, Probe), "returns a Probe or None", lambda: f"got {probe!r}")
    rows = subject.require_index(probe.batch_index, batch, "batch_index")
    tokens = subject.require_index(probe.token_index, seq, "token_index")
    subject.require(
        rows.numel() >= 1 and tokens.numel() >= 1,
        "the probe is non-empty",
        lambda: f"batch_index={_fmt(rows)}, token_index={_fmt(tokens)}",
    )
    expected = real[rows][:, tokens]
    valid = probe.valid
    subject.require(
        isinstance(valid, torch.Tensor)
        and valid.dtype == torch.bool
        and tuple(valid.shape) == tuple(expected.shape),
        "valid is a bool (k_B, k_T) tensor",
        lambda: f"valid = {_fmt(valid)}, expected shape {tuple(expected.shape)}",
    )
    subject.require(
        torch.equal(valid.detach().cpu(), expected),
        "valid == attention_mask.bool()[batch_index][:, token_index]",
        lambda: f"valid = {_fmt(valid)}, expected {_fmt(expected)}",
    )
    subject.require(
        bool(real.any(dim=0)[tokens].all()),
        "never chooses a position that is padding in every row",
        lambda: f"token_index={_fmt(tokens)}, attention_mask={_fmt(mask)}",
    )
    subject.require(
        bool(real.any(dim=1)[rows].all()),
        "never chooses an all-padding row",
        lambda: f"batch_index={_fmt(rows)}, attention_mask={_fmt(mask)}",
    )
    subject.require_accepted(check_probe, probe, ctx(), batch, seq)
    subject.require(
        isinstance(again, Probe)
        and _same(again.batch_index, probe.batch_index)
        and _same(again.token_index, probe.token_index)
        and _same(again.valid, probe.valid),
        "deterministic: same inputs and seed give the same probe",
        lambda: f"first {probe!r}, then {again!r}",
    )


def check_select_probe(strategy: Any, *, max_examples: int = 20) -> None:
    """Check a ``select_probe`` strategy against the hook contract.

    Inputs: residual/normed (B, T, D) float32 or bfloat16 (padding entries are large garbage),
    attention masks without padding and with right or left padding, including batches where
    some positions are padding in every row (every row has a real token). Asserts: the result is
    None or a :class:`~ppframework.types.Probe` whose ``batch_index``/``token_index`` are non-empty
    1-D ``torch.long``, strictly ascending and in range; ``valid`` is the bool
    ``attention_mask.bool()[rows][:, tokens]``; no chosen position is padding in every row and no
    chosen row is all padding; the inputs are not modified; the same inputs and generator seed
    give the same probe.
    """
    subject = _Subject(strategy, "select_probe")
    _run_examples(functools.partial(_probe_case, subject), _draw_probe_case, max_examples, _PROBE_CORNERS)


# --------------------------------------------------------------------------------------------
# score_channels


def _check_scores_common(subject: _Subject, scores: Any, channels: int) -> None:
    subject.require(
        isinstance(scores, ChannelScores), "returns ChannelScores", lambda: f"got {type(scores).__name__}"
    )
    term = subject.require_shape(scores.weight_term, (channels,), "weight_term has shape (C,)", "weight_term")
    subject.require_finite(term, "weight_term is finite and >= 0", "weight_term", nonnegative=True)
    subject.require(callable(scores.combine), "combine is callable", lambda: f"combine = {scores.combine!r}")
    subject.require(
        scores.head_reduce in ("l2", "sum"),
        "head_reduce is 'l2' or 'sum'",
        lambda: f"head_reduce = {scores.head_reduce!r}",
    )
    subject.require(
        scores.statistic in ("sq_mean", "variance", "fluctuation"),
        "statistic is 'sq_mean', 'variance' or 'fluctuation'",
        lambda: f"statistic = {scores.statistic!r}",
    )


def _check_combine(subject: _Subject, scores: ChannelScores, channels: int, gen: torch.Generator) -> None:
    """``combine`` works on a non-negative activation (and on None, or raises ValueError)."""
    activation = torch.randn(channels, generator=gen).square()
    try:
        final = dataclasses.replace(scores, activation=activation).channel_scores()
    except Exception as exc:
        raise subject.error(
            "channel_scores() works once activation is set", f"raised {type(exc).__name__}: {exc}"
        ) from exc
    subject.require_shape(final, (channels,), "channel_scores() has shape (C,)", "channel_scores()")
    subject.require_finite(final, "channel_scores() is finite", "channel_scores()")
    try:
        bare = dataclasses.replace(scores, activation=None).channel_scores()
    except ValueError:
        return
    except Exception as exc:
        raise subject.error(
            "channel_scores() without activation returns scores or raises ValueError",
            f"raised {type(exc).__name__}: {exc}",
        ) from exc
    what = "channel_scores() (no activation)"
    subject.require_shape(bare, (channels,), "channel_scores() has shape (C,)", what)
    subject.require_finite(bare, "channel_scores() is finite", what)


def _draw_score_case(data: Any) -> dict[str, Any]:
    st = _strategies()
    return {
        "geometry": _draw_geometry(data),
        "hidden": data.draw(st.integers(1, 12), label="hidden"),
        "batch": data.draw(st.integers(1, 5), label="batch"),
        "seq": data.draw(st.integers(1, 12), label="seq_len"),
        "padding": data.draw(st.sampled_from(PADDINGS), label="padding"),
        "dtype": data.draw(st.sampled_from((torch.float32, torch.bfloat16)), label="dtype"),
        "with_probe": data.draw(st.booleans(), label="with_probe"),
        "seed": data.draw(st.integers(0, _SEED), label="seed"),
    }


_SCORE_CORNERS: tuple[dict[str, Any], ...] = tuple(
    {
        "geometry": geometry,
        "hidden": 16,
        "batch": 4,
        "seq": 10,
        "padding": padding,
        "dtype": dtype,
        "with_probe": with_probe,
        "seed": 0,
    }
    for geometry in (default_geometry(BlockKind.ATTENTION), default_geometry(BlockKind.MLP))
    for with_probe, padding, dtype in (
        (True, "right-short", torch.float32),
        (True, "left", torch.bfloat16),
        (False, "none", torch.float32),
    )
)


def _score_case(
    subject: _Subject,
    keep_alive: list[torch.Tensor],
    *,
    geometry: BlockGeometry,
    hidden: int,
    batch: int,
    seq: int,
    padding: str,
    dtype: torch.dtype,
    with_probe: bool,
    seed: int,
) -> None:
    channels = geometry.channels
    gen = torch.Generator().manual_seed(seed)
    mask = _padding_mask(gen, batch, seq, padding)
    real = mask.bool()
    weight = (0.2 * torch.randn(hidden, channels, generator=gen)).to(dtype)
    keep_alive.append(weight)
    probe: Probe | None = None
    states: torch.Tensor | None = None
    if with_probe:
        rows = _subset(gen, torch.arange(batch))
        tokens = _subset(gen, real.any(dim=0).nonzero().flatten())
        probe = Probe(batch_index=rows, token_index=tokens, valid=real[rows][:, tokens])
        states = torch.randn(rows.numel(), tokens.numel(), channels, generator=gen).to(dtype)
    inputs = {"probe": probe, "probe_states": states, "weight": weight}

    def current() -> dict[str, Any]:
        return {**_fields(probe, "probe"), "probe_states": states, "weight": weight}

    before = _snapshot(current())

    def ctx() -> BlockContext:
        return make_context(geometry.kind, geometry, seed=seed, position_valid=real.any(dim=0))

    try:
        scores = subject.call(ctx=ctx(), allow=(ValueError,) if probe is None else (), **inputs)
    except ValueError:
        subject.require_unchanged(before, current(), "inputs are not modified")
        return
    subject.require_unchanged(before, current(), "inputs are not modified")
    _check_scores_common(subject, scores, channels)
    if scores.out_weight is not None:
        subject.require_shape(
            scores.out_weight, (hidden, channels), "out_weight is None or (hidden, C)", "out_weight"
        )
    if scores.evidence is not None:
        n_pos = int(scores.evidence.shape[0]) if scores.evidence.dim() == 2 else -1
        if probe is not None:
            subject.require(
                n_pos == probe.token_index.numel(),
                "evidence has one row per probed position",
                lambda: f"evidence {_fmt(scores.evidence)} for {probe.token_index.numel()} positions",
            )
        evidence = subject.require_shape(
            scores.evidence, (n_pos, channels), "evidence has shape (n_pos, C)", "evidence"
        )
        subject.require_finite(evidence, "evidence is finite and >= 0", "evidence", nonnegative=True)
        positions = subject.require_shape(
            scores.positions, (n_pos,), "positions has shape (n_pos,)", "positions"
        )
        position_valid = subject.require_shape(
            scores.position_valid, (n_pos,), "position_valid has shape (n_pos,)", "position_valid"
        )
        if probe is not None:
            subject.require(
                _same(positions.long(), probe.token_index),
                "positions == probe.token_index",
                lambda: f"positions={_fmt(positions)}, token_index={_fmt(probe.token_index)}",
            )
            subject.require(
                _same(position_valid.bool(), probe.valid.any(dim=0)),
                "position_valid is False exactly where no probe row is real",
                lambda: f"position_valid={_fmt(position_valid)}, probe.valid={_fmt(probe.valid)}",
            )
    subject.require_accepted(check_scores, scores, ctx(), probe)
    _check_combine(subject, scores, channels, gen)
    again = subject.call(ctx=ctx(), **inputs)
    subject.require(
        isinstance(again, ChannelScores)
        and _same(again.weight_term, scores.weight_term)
        and _same(again.evidence, scores.evidence),
        "deterministic: scoring the same inputs again gives the same scores",
        lambda: f"weight_term {_fmt(scores.weight_term)}, then {_fmt(getattr(again, 'weight_term', None))}",
    )


def check_score_channels(strategy: Any, *, max_examples: int = 20) -> None:
    """Check a ``score_channels`` strategy against the hook contract.

    Inputs: a hand-made probe (random rows and real positions of a padded batch), probe states
    (k_B, k_T, C) and an output weight (hidden, C) in float32 or bfloat16, or no probe at all.
    Asserts: ChannelScores with ``weight_term`` (C,) finite >= 0, a callable ``combine``,
    ``head_reduce`` l2/sum and ``statistic`` sq_mean/variance; ``out_weight`` None or (hidden, C);
    evidence, when set, (n_pos, C) finite >= 0 with ``positions`` (n_pos,) and ``position_valid``
    (n_pos,), and with a probe n_pos = k_T, ``positions == probe.token_index`` and
    ``position_valid == probe.valid.any(0)``; ``channel_scores()`` with a non-negative activation is
    (C,) finite (without activation: (C,) finite or ValueError); the inputs are not modified;
    scoring the same inputs again gives the same scores. Without a probe the strategy may raise
    ValueError (it needs one); nowhere else. Weights stay alive during the check, as a model's
    do in the pipeline (so caches keyed on the weight's storage stay valid).
    """
    subject = _Subject(strategy, "score_channels")
    keep_alive: list[torch.Tensor] = []
    try:
        _run_examples(
            functools.partial(_score_case, subject, keep_alive),
            _draw_score_case,
            max_examples,
            _SCORE_CORNERS,
        )
    finally:
        keep_alive.clear()


# --------------------------------------------------------------------------------------------
# fuse_history


def _draw_fuse_case(data: Any) -> dict[str, Any]:
    st = _strategies()
    return {
        "geometry": _draw_geometry(data),
        "batch": data.draw(st.integers(1, 4), label="batch"),
        "seq": data.draw(st.integers(1, 12), label="seq_len"),
        "extra": data.draw(st.integers(0, 4), label="history_extra_positions"),
        "padding": data.draw(st.sampled_from(PADDINGS), label="padding"),
        "with_evidence": data.draw(st.booleans(), label="with_evidence"),
        "history_kind": data.draw(st.sampled_from(("none", "sq_mean", "sq_mean+mean")), label="history"),
        "statistic": data.draw(st.sampled_from(("sq_mean", "variance", "fluctuation")), label="statistic"),
        "compensation": data.draw(st.booleans(), label="bias_compensation"),
        "values": data.draw(st.sampled_from(("random", "ties", "zeros")), label="values"),
        "seed": data.draw(st.integers(0, _SEED), label="seed"),
    }


#: Every combination of evidence, history, statistic and bias compensation, once each.
_FUSE_CORNERS: tuple[dict[str, Any], ...] = tuple(
    {
        "geometry": default_geometry(BlockKind.ATTENTION),
        "batch": 3,
        "seq": 6,
        "extra": 2,
        "padding": "right-short",
        "with_evidence": evidence,
        "history_kind": history,
        "statistic": statistic,
        "compensation": compensation,
        "values": "random",
        "seed": 0,
    }
    for evidence in (True, False)
    for history in ("sq_mean", "sq_mean+mean", "none")
    for statistic in ("sq_mean", "variance", "fluctuation")
    for compensation in (False, True)
)


def _fuse_case(
    subject: _Subject,
    outcomes: dict[str, set[str]],
    *,
    geometry: BlockGeometry,
    batch: int,
    seq: int,
    extra: int,
    padding: str,
    with_evidence: bool,
    history_kind: str,
    statistic: str,
    compensation: bool,
    values: str,
    seed: int,
) -> None:
    """One fuse_history example; records ``ok`` or the ValueError under its combination."""
    channels = geometry.channels
    gen = torch.Generator().manual_seed(seed)
    real = _padding_mask(gen, batch, seq, padding).bool()
    position_valid = real.any(dim=0)
    scores = ChannelScores(
        weight_term=_nonnegative(gen, (channels,), values),
        combine=_activation_times_weight,
        metric="conformance",
        statistic=statistic,
        bias_compensation=compensation,
        out_weight=torch.randn(4, channels, generator=gen),
    )
    if with_evidence:
        tokens = _subset(gen, position_valid.nonzero().flatten())
        tokens_valid = torch.rand(tokens.numel(), generator=gen) < 0.8
        scores.evidence = _nonnegative(gen, (tokens.numel(), channels), values) * tokens_valid[:, None]
        scores.positions = tokens
        scores.position_valid = tokens_valid
    history: BlockHistory | None = None
    if history_kind != "none":
        mean = torch.randn(seq + extra, channels, generator=gen)
        spread = _nonnegative(gen, (seq + extra, channels), values)
        with_mean = history_kind == "sq_mean+mean"
        history = BlockHistory(
            sq_mean=mean.square() + spread if with_mean else spread,
            mean=mean if with_mean else None,
            updates=int(torch.randint(0, 5, (1,), generator=gen)),
            samples=int(torch.randint(0, 9, (1,), generator=gen)),
        )
    combo = (
        f"evidence={'yes' if with_evidence else 'no'}, history={history_kind}, "
        f"statistic={statistic}, bias_compensation={compensation}"
    )

    def history_state() -> dict[str, Any]:
        if history is None:
            return {}
        return {
            "history.sq_mean": history.sq_mean,
            "history.mean": history.mean,
            "history.updates": history.updates,
        }

    before = _snapshot(history_state())
    ctx = make_context(geometry.kind, geometry, seed=seed, position_valid=position_valid)
    try:
        fused = subject.call(ctx=ctx, scores=scores, history=history, allow=(ValueError,))
    except ValueError as exc:
        outcomes.setdefault(combo, set()).add(f"ValueError: {exc}")
        subject.require_unchanged(before, history_state(), "the history is not modified")
        return
    outcomes.setdefault(combo, set()).add("ok")
    subject.require_unchanged(before, history_state(), "the history is not modified")
    subject.require(
        isinstance(fused, ChannelScores), "returns ChannelScores", lambda: f"got {type(fused).__name__}"
    )
    subject.require_shape(fused.weight_term, (channels,), "weight_term keeps shape (C,)", "weight_term")
    if fused.activation is not None:
        activation = subject.require_shape(
            fused.activation, (channels,), "activation is None or (C,)", "activation"
        )
        subject.require_finite(activation, "activation is finite and >= 0", "activation", nonnegative=True)
    if compensation:
        subject.require(
            fused.channel_mean is not None,
            "channel_mean is set when bias compensation is asked",
            f"combination {combo}",
        )
    if fused.channel_mean is not None:
        channel_mean = subject.require_shape(
            fused.channel_mean, (channels,), "channel_mean has shape (C,)", "channel_mean"
        )
        subject.require_finite(channel_mean, "channel_mean is finite", "channel_mean")
    subject.require_accepted(check_fused, fused, ctx, defer=False)


def check_fuse_history(strategy: Any, *, max_examples: int = 20) -> None:
    """Check a ``fuse_history`` strategy against the hook contract.

    Inputs: PPsp-like ChannelScores (weight term, with or without probe evidence, statistic
    sq_mean or variance, with or without bias compensation) and a BlockHistory (``sq_mean``
    (Tmax, C) >= 0 with or without ``mean``) or None; random examples, then every combination once.
    Asserts: the history is not modified (tensors and ``updates``); the result is ChannelScores
    with ``weight_term`` (C,) and ``activation`` None or (C,) finite >= 0; ``channel_mean``,
    required when bias compensation is asked, (C,) finite. ValueError is accepted for
    combinations a strategy does not support, but at least one combination must succeed.
    """
    subject = _Subject(strategy, "fuse_history")
    outcomes: dict[str, set[str]] = {}
    _run_examples(
        functools.partial(_fuse_case, subject, outcomes), _draw_fuse_case, max_examples, _FUSE_CORNERS
    )
    subject.require(
        any("ok" in results for results in outcomes.values()),
        "fuses at least one supported combination of evidence and history",
        lambda: "; ".join(f"[{combo}] {sorted(results)[0]}" for combo, results in sorted(outcomes.items())),
    )


# --------------------------------------------------------------------------------------------
# apply_mask


def _check_mask(
    subject: _Subject, ctx: BlockContext, mask: Any, ratio: float, hidden: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    geo = ctx.geometry
    subject.require(isinstance(mask, BlockMask), "returns a BlockMask", lambda: f"got {type(mask).__name__}")
    kept = subject.require_index(mask.kept_units, geo.units, "kept_units")
    subject.require(
        mask.total_units == geo.units,
        "total_units == geometry.units",
        lambda: f"total_units={mask.total_units!r}, units={geo.units}",
    )
    subject.require(
        1 <= kept.numel() <= geo.units,
        "keeps at least one unit",
        lambda: f"kept {kept.numel()} of {geo.units} at ratio {ratio}",
    )
    if ratio == 0:
        subject.require(
            kept.numel() == geo.units,
            "ratio 0 keeps every unit",
            lambda: f"kept {_fmt(kept)} of {geo.units}",
        )
    if ctx.kind is BlockKind.MLP:
        subject.require(
            kept.numel() == geo.units or kept.numel() % ctx.round_to == 0,
            "kept MLP width is a multiple of ctx.round_to (or everything)",
            lambda: f"kept {kept.numel()} of {geo.units} with round_to={ctx.round_to}",
        )
        subject.require(
            mask.kept_kv_heads is None,
            "kept_kv_heads is None for MLP blocks",
            lambda: _fmt(mask.kept_kv_heads),
        )
    kv: torch.Tensor | None = None
    if ctx.kind is BlockKind.ATTENTION:
        n_kv = geo.num_kv_heads or geo.units
        if mask.kept_kv_heads is not None:
            kv = subject.require_index(mask.kept_kv_heads, n_kv, "kept_kv_heads")
            groups = torch.div(kept, geo.group_size, rounding_mode="floor")
            subject.require(
                bool(torch.isin(groups, kv).all()),
                "every kept query head's key/value head is kept",
                lambda: f"kept_units={_fmt(kept)}, kept_kv_heads={_fmt(kv)}, group_size={geo.group_size}",
            )
        if ratio == 0 and kv is not None:
            subject.require(
                kv.numel() == n_kv, "ratio 0 keeps every unit", lambda: f"kept_kv_heads={_fmt(kv)}"
            )
        if ctx.gqa_policy == "group" and geo.group_size > 1:
            groups = torch.div(kept, geo.group_size, rounding_mode="floor").unique()
            whole = (groups[:, None] * geo.group_size + torch.arange(geo.group_size)[None, :]).reshape(-1)
            subject.require(
                _same(whole, kept),
                "gqa_policy 'group' keeps whole key/value groups",
                lambda: f"kept_units={_fmt(kept)} with group_size={geo.group_size}",
            )
            if kv is not None:
                subject.require(
                    _same(groups, kv),
                    "gqa_policy 'group': kept_kv_heads are the kept groups",
                    lambda: f"kept_units={_fmt(kept)}, kept_kv_heads={_fmt(kv)}",
                )
    if mask.unit_scores is not None:
        subject.require_shape(
            mask.unit_scores, (geo.units,), "unit_scores is None or (units,)", "unit_scores"
        )
    if mask.output_bias is not None:
        bias = subject.require_shape(
            mask.output_bias, (hidden,), "output_bias is None or (hidden,)", "output_bias"
        )
        subject.require_finite(bias, "output_bias is finite", "output_bias")
    return kept, kv


def _draw_mask_case(data: Any) -> dict[str, Any]:
    st = _strategies()
    return {
        "geometry": _draw_geometry(data),
        "ratio": data.draw(
            st.one_of(st.just(0.0), st.floats(0.0, 0.9), st.sampled_from((0.25, 0.5, 0.9))), label="ratio"
        ),
        "round_to": data.draw(st.sampled_from((1, 2, 4, 8)), label="round_to"),
        "gqa_policy": data.draw(st.sampled_from(("query-only", "group")), label="gqa_policy"),
        "head_reduce": data.draw(st.sampled_from(("l2", "sum")), label="head_reduce"),
        "values": data.draw(st.sampled_from(("random", "ties", "zeros")), label="values"),
        "compensation": data.draw(st.booleans(), label="bias_compensation"),
        "hidden": data.draw(st.integers(1, 8), label="hidden"),
        "seq": data.draw(st.integers(1, 8), label="seq_len"),
        "seed": data.draw(st.integers(0, _SEED), label="seed"),
    }


_MASK_GEOMETRIES: tuple[BlockGeometry, ...] = (
    BlockGeometry(BlockKind.ATTENTION, units=4, unit_width=4, num_kv_heads=4),  # multi-head
    BlockGeometry(BlockKind.ATTENTION, units=8, unit_width=2, num_kv_heads=2),  # grouped-query
    BlockGeometry(BlockKind.ATTENTION, units=3, unit_width=2, num_kv_heads=1),  # multi-query
    BlockGeometry(BlockKind.MLP, units=20, unit_width=1),
    BlockGeometry(BlockKind.MLP, units=1, unit_width=1),
)

_MASK_CORNERS: tuple[dict[str, Any], ...] = tuple(
    {
        "geometry": geometry,
        "ratio": ratio,
        "round_to": 8 if geometry.kind is BlockKind.MLP and policy == "group" else 1,
        "gqa_policy": policy,
        "head_reduce": "l2" if ratio < 0.5 else "sum",
        "values": "ties" if ratio == 0.5 else "random",
        "compensation": ratio == 0.9,
        "hidden": 6,
        "seq": 5,
        "seed": 0,
    }
    for geometry in _MASK_GEOMETRIES
    for ratio in (0.0, 0.3, 0.5, 0.9)
    for policy in ("query-only", "group")
)


def _mask_case(
    subject: _Subject,
    *,
    geometry: BlockGeometry,
    ratio: float,
    round_to: int,
    gqa_policy: str,
    head_reduce: str,
    values: str,
    compensation: bool,
    hidden: int,
    seq: int,
    seed: int,
) -> None:
    channels = geometry.channels
    gen = torch.Generator().manual_seed(seed)
    scores = ChannelScores(
        weight_term=_nonnegative(gen, (channels,), values),
        combine=_activation_times_weight,
        head_reduce=head_reduce,
        activation=_nonnegative(gen, (channels,), values),
        metric="conformance",
        bias_compensation=compensation,
        channel_mean=torch.randn(channels, generator=gen) if compensation else None,
        out_weight=torch.randn(hidden, channels, generator=gen),
    )
    before = _snapshot(_fields(scores, "scores"))

    def ctx() -> BlockContext:
        return make_context(
            geometry.kind, geometry, seq_len=seq, seed=seed, round_to=round_to, gqa_policy=gqa_policy
        )

    context = ctx()
    mask = subject.call(ctx=context, scores=scores, ratio=ratio)
    subject.require_unchanged(before, _fields(scores, "scores"), "the scores are not modified")
    kept, _ = _check_mask(subject, context, mask, ratio, hidden)
    subject.require_accepted(check_mask, mask, context, hidden)
    again = subject.call(ctx=ctx(), scores=_cloned(scores), ratio=ratio)
    subject.require(
        isinstance(again, BlockMask)
        and _same(again.kept_units, mask.kept_units)
        and _same(again.kept_kv_heads, mask.kept_kv_heads)
        and _same(again.output_bias, mask.output_bias),
        "deterministic: same inputs and seed give the same mask",
        lambda: f"kept_units {_fmt(kept)}, then {_fmt(getattr(again, 'kept_units', None))}",
    )


def check_apply_mask(strategy: Any, *, max_examples: int = 20) -> None:
    """Check an ``apply_mask`` strategy against the hook contract.

    Inputs: attention geometries (1-8 heads; multi-head, grouped-query and multi-query) and MLP
    geometries, non-negative channel scores (continuous, tied or zero) with activation set, head
    reduction l2/sum, optional bias compensation, ratio in [0, 0.9], both GQA policies and several
    ``round_to``. Asserts: a BlockMask with ``kept_units`` 1-D long sorted unique in range,
    ``total_units == units``, 1 <= kept <= units, ratio 0 keeps everything, kept MLP width a
    multiple of ``round_to`` (or everything); ``kept_kv_heads`` None for MLP, else None or sorted
    unique in range and covering every kept head's group; under ``gqa_policy='group'`` whole
    groups; ``unit_scores`` None or (units,); ``output_bias`` None or (hidden,) finite; the scores
    are not modified; the same inputs and seed give the same mask.
    """
    subject = _Subject(strategy, "apply_mask")
    _run_examples(functools.partial(_mask_case, subject), _draw_mask_case, max_examples, _MASK_CORNERS)


# --------------------------------------------------------------------------------------------
# infer


@functools.cache
def _tiny_block_model(family: str) -> tuple[Any, Any]:
    """A one-layer tiny model of ``family`` (hidden 32) and its adapter, built once."""
    from ppframework.adapters import get_adapter
    from ppframework.testing.tiny import tiny_model

    if family == "opt":
        overrides = {"hidden_size": 32, "word_embed_proj_dim": 32, "ffn_dim": 48, "num_hidden_layers": 1}
    else:
        overrides = {"hidden_size": 32, "head_dim": 8, "intermediate_size": 48, "num_hidden_layers": 1}
    model = tiny_model(family, seed=0, **overrides)
    return model, get_adapter(model)


def _rotary(model: Any, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The model's rotary (cos, sin) of shape (B, T, d) at positions 0..T-1, or None."""
    rotary_emb = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary_emb is None:
        return None
    batch, seq = hidden.shape[:2]
    positions = torch.arange(seq)[None, :].expand(batch, seq)
    cos, sin = rotary_emb(hidden, positions)
    return cos, sin


def _random_block_mask(
    gen: torch.Generator, geometry: BlockGeometry, policy: str, hidden: int, with_bias: bool
) -> BlockMask:
    units = geometry.units
    kv: torch.Tensor | None = None
    if geometry.kind is BlockKind.ATTENTION and geometry.group_size > 1 and policy == "group":
        kv = _subset(gen, torch.arange(geometry.num_kv_heads))
        offsets = torch.arange(geometry.group_size)
        kept = (kv[:, None] * geometry.group_size + offsets[None, :]).reshape(-1)
    else:
        kept = _subset(gen, torch.arange(units))
        if geometry.kind is BlockKind.ATTENTION and geometry.group_size == 1 and policy == "group":
            kv = kept.clone()
    bias = 0.1 * torch.randn(hidden, generator=gen) if with_bias else None
    return BlockMask(kept_units=kept, total_units=units, kept_kv_heads=kv, output_bias=bias)


def _draw_infer_case(data: Any) -> dict[str, Any]:
    st = _strategies()
    return {
        "family": data.draw(st.sampled_from(_TINY_FAMILIES), label="family"),
        "kind": data.draw(st.sampled_from(tuple(BlockKind)), label="kind"),
        "batch": data.draw(st.integers(1, 3), label="batch"),
        "seq": data.draw(st.integers(1, 10), label="seq_len"),
        "padding": data.draw(st.sampled_from(PADDINGS), label="padding"),
        "keep_all": data.draw(st.booleans(), label="keep_all"),
        "policy": data.draw(st.sampled_from(("query-only", "group")), label="gqa_policy"),
        "with_bias": data.draw(st.booleans(), label="output_bias"),
        "collect": data.draw(st.booleans(), label="collect_stats"),
        "seed": data.draw(st.integers(0, _SEED), label="seed"),
    }


_INFER_CORNERS: tuple[dict[str, Any], ...] = tuple(
    {
        "family": family,
        "kind": kind,
        "batch": 3,
        "seq": 7,
        "padding": padding,
        "keep_all": keep_all,
        "policy": policy,
        "with_bias": with_bias,
        "collect": True,
        "seed": 0,
    }
    for family in _TINY_FAMILIES
    for kind in BlockKind
    for keep_all, padding, policy, with_bias in (
        (True, "right-short", "query-only", True),
        (True, "none", "query-only", False),
        (False, "left-short", "group", True),
        (False, "right", "query-only", False),
    )
)


def _infer_case(
    subject: _Subject,
    *,
    family: str,
    kind: BlockKind,
    batch: int,
    seq: int,
    padding: str,
    keep_all: bool,
    policy: str,
    with_bias: bool,
    collect: bool,
    seed: int,
) -> None:
    from ppframework.adapters.base import additive_attention_bias

    gen = torch.Generator().manual_seed(seed)
    model, adapter = _tiny_block_model(family)
    layer = adapter.layers[0]
    size = int(model.config.hidden_size)
    mask = _padding_mask(gen, batch, seq, padding)
    real = mask.bool()
    residual = torch.randn(batch, seq, size, generator=gen)
    attention = kind is BlockKind.ATTENTION
    with torch.no_grad():
        normed = adapter.block_input(layer, kind, residual)
        rotary = _rotary(model, residual) if attention else None
        attn_bias = additive_attention_bias(mask, normed.dtype) if attention else None
        reference = adapter.runner(0, kind)
        z_full = reference.pre_output(normed, attention_mask=mask, attn_bias=attn_bias, rotary=rotary)
        dense = reference.output(z_full)
    runner = adapter.runner(0, kind)
    geometry = runner.geometry
    if keep_all:
        bias = 0.1 * torch.randn(size, generator=gen) if with_bias else None
        block_mask = BlockMask(
            kept_units=torch.arange(geometry.units), total_units=geometry.units, output_bias=bias
        )
    else:
        block_mask = _random_block_mask(gen, geometry, policy, size, with_bias)
    inputs = BlockInputs(
        normed=normed, residual=residual, attention_mask=mask, attn_bias=attn_bias, rotary=rotary
    )

    def current() -> dict[str, Any]:
        weights = {f"weights.{name}": p for name, p in layer.named_parameters()}
        return {**_fields(inputs, "inputs"), **_fields(block_mask, "mask"), **weights}

    before = _snapshot(current())
    ctx = make_context(
        kind, geometry, seed=seed, position_valid=real.any(dim=0), collect_stats=collect, gqa_policy=policy
    )
    with torch.no_grad():
        out = subject.call(ctx=ctx, block=runner, inputs=inputs, mask=block_mask)
    subject.require_unchanged(before, current(), "the inputs, the mask and the weights are not modified")
    subject.require(
        isinstance(out, BlockOutput), "returns a BlockOutput", lambda: f"got {type(out).__name__}"
    )
    output = subject.require_shape(
        out.output, (batch, seq, size), "output has shape (B, T, hidden)", "output"
    )
    subject.require_finite(output, "output is finite", "output")
    if keep_all:
        expected = dense if block_mask.output_bias is None else dense + block_mask.output_bias
        subject.require(
            torch.allclose(output[real], expected[real], rtol=_RTOL, atol=_ATOL),
            "a keep-all mask reproduces the unpruned block (plus output_bias) on real tokens",
            lambda: f"max abs difference {_max_diff(output[real], expected[real]):.3g}",
        )
    subject.require_accepted(check_output, out, ctx, (batch, seq, size), block_mask)
    if not collect:
        return
    channels = runner.channels_of(block_mask.kept_units)
    sq_mean = subject.require_shape(
        out.sq_mean,
        (seq, int(channels.numel())),
        "with collect_stats sq_mean is (T, kept channels)",
        "sq_mean",
    )
    subject.require_finite(sq_mean, "sq_mean is finite and >= 0", "sq_mean", nonnegative=True)
    position_valid = subject.require_shape(
        out.position_valid, (seq,), "with collect_stats position_valid has shape (T,)", "position_valid"
    )
    subject.require(
        _same(position_valid.bool(), real.any(dim=0)),
        "position_valid is False exactly where every row is padding",
        lambda: f"position_valid={_fmt(position_valid)}, attention_mask={_fmt(mask)}",
    )
    kept_channels = out.kept_channels
    subject.require(
        (keep_all and kept_channels is None) or _same(kept_channels, channels),
        "kept_channels == block.channels_of(mask.kept_units) (or None with keep-all)",
        lambda: f"kept_channels={_fmt(kept_channels)}, expected {_fmt(channels)}",
    )
    if keep_all:
        valid = real.any(dim=0)
        squares = z_full.float().square() * real[:, :, None]
        expected_sq = squares.sum(dim=0) / real.sum(dim=0).clamp(min=1)[:, None]
        subject.require(
            torch.allclose(sq_mean.float()[valid], expected_sq[valid], rtol=_RTOL, atol=1e-6),
            "sq_mean is the mean over real rows of the squared output-projection input",
            lambda: f"max abs difference {_max_diff(sq_mean.float()[valid], expected_sq[valid]):.3g}",
        )


def check_infer(strategy: Any, *, max_examples: int = 20) -> None:
    """Check an ``infer`` strategy against the hook contract on a tiny random model.

    Inputs: the attention and MLP blocks of a one-layer tiny LLaMA (grouped-query attention,
    rotary) and a one-layer tiny OPT, hidden 32, batches with and without right/left padding,
    keep-all and random masks (query-only, whole-group and MHA key/value masks), with and
    without ``output_bias``. Asserts: a BlockOutput whose output is (B, T, hidden) and finite; with
    a keep-all mask it equals the unpruned block (plus ``output_bias``) on real tokens; with
    ``ctx.collect_stats`` ``sq_mean`` is (T, kept channels) finite >= 0 (the dense mean of the
    squared output-projection input over real rows at real positions with a keep-all mask),
    ``position_valid`` is (T,) and False exactly at all-padding positions, ``kept_channels`` equals
    ``block.channels_of(mask.kept_units)`` (or None with keep-all); the inputs, the mask and the
    model's weights are not modified.
    """
    subject = _Subject(strategy, "infer")
    _run_examples(functools.partial(_infer_case, subject), _draw_infer_case, max_examples, _INFER_CORNERS)


# --------------------------------------------------------------------------------------------
# allocate


def _draw_allocate_case(data: Any) -> dict[str, Any]:
    st = _strategies()
    heads = data.draw(st.sampled_from(_HEAD_COUNTS), label="heads")
    num_layers = data.draw(st.integers(1, 6), label="num_layers")
    pruned = data.draw(
        st.lists(st.integers(0, num_layers - 1), min_size=1, max_size=num_layers, unique=True),
        label="pruned_layers",
    )
    return {
        "num_layers": num_layers,
        "pruned": tuple(sorted(pruned)),
        "targets": data.draw(
            st.sampled_from(((BlockKind.ATTENTION, BlockKind.MLP), (BlockKind.ATTENTION,), (BlockKind.MLP,))),
            label="targets",
        ),
        "heads": heads,
        "kv_heads": data.draw(st.sampled_from(_divisors(heads)), label="num_kv_heads"),
        "head_dim": data.draw(st.integers(1, 8), label="head_dim"),
        "mlp_units": data.draw(st.integers(1, 48), label="mlp_units"),
        "layer_ratio": data.draw(st.sampled_from((0.0, 0.1, 0.25, 0.5, 0.9)), label="layer_ratio"),
        "seq_len": data.draw(st.integers(1, 64), label="seq_len"),
        "values": data.draw(st.sampled_from(("random", "ties", "zeros")), label="values"),
        "seed": data.draw(st.integers(0, _SEED), label="seed"),
    }


_ALLOCATE_CORNERS: tuple[dict[str, Any], ...] = tuple(
    {
        "num_layers": 4,
        "pruned": (1, 2, 3),
        "targets": (BlockKind.ATTENTION, BlockKind.MLP),
        "heads": 4,
        "kv_heads": kv,
        "head_dim": 8,
        "mlp_units": 32,
        "layer_ratio": ratio,
        "seq_len": 16,
        "values": values,
        "seed": 0,
    }
    for kv in (2, 4)
    for ratio in (0.0, 0.4, 0.9)
    for values in ("random", "zeros")
)


def _allocate_case(
    subject: _Subject,
    *,
    num_layers: int,
    pruned: tuple[int, ...],
    targets: tuple[BlockKind, ...],
    heads: int,
    kv_heads: int,
    head_dim: int,
    mlp_units: int,
    layer_ratio: float,
    seq_len: int,
    values: str,
    seed: int,
) -> None:
    """One allocate example: a plan, the blocks' scores when the strategy asks for them."""
    gen = torch.Generator().manual_seed(seed)
    geometries = {
        BlockKind.ATTENTION: BlockGeometry(BlockKind.ATTENTION, heads, head_dim, kv_heads),
        BlockKind.MLP: BlockGeometry(BlockKind.MLP, mlp_units, 1),
    }
    plan = AllocationContext(
        num_layers=num_layers,
        pruned_layers=pruned,
        targets=targets,
        geometries=geometries,
        hidden_size=16,
        mlp_matrices=3,
        layer_ratio=layer_ratio,
        seq_len=seq_len,
        kv_follow_query=kv_heads == heads,
    )
    scores: dict[tuple[int, BlockKind], ChannelScores] | None = None
    if getattr(subject.strategy, "needs_scores", False):
        scores = {}
        for layer, kind in plan.blocks:
            channels = geometries[kind].channels
            scores[(layer, kind)] = ChannelScores(
                weight_term=_nonnegative(gen, (channels,), values),
                combine=_activation_times_weight,
                activation=_nonnegative(gen, (channels,), values),
                metric="conformance",
                head_reduce="sum",
            )
    state = {} if scores is None else {f"{key}.activation": s.activation for key, s in scores.items()}
    before = _snapshot(state)
    ratios = subject.call(plan=plan, scores=scores, target=layer_ratio)
    subject.require_unchanged(before, state, "the scores are not modified")
    subject.require_accepted(check_allocation, ratios, plan)
    again = subject.call(plan=plan, scores=scores, target=layer_ratio)
    subject.require(
        again == ratios,
        "deterministic: the same plan and scores give the same ratios",
        f"{ratios} then {again}",
    )
    if layer_ratio == 0:
        subject.require(
            all(value == 0 for value in ratios.values()),
            "a per-layer ratio of 0 prunes nothing",
            lambda: f"ratios = {ratios}",
        )


def check_allocate(strategy: Any, *, max_examples: int = 20) -> None:
    """Check an ``allocate`` strategy against the hook contract.

    Inputs: random :class:`~ppframework.types.AllocationContext` plans (1-6 layers, any non-empty
    set of pruned layers, attention and/or MLP targets, grouped or multi-head attention, per-layer
    ratios 0 to 0.9) and, when the strategy's class sets ``needs_scores``, fused ChannelScores of
    every pruned block (random, tied or all-zero values); otherwise ``scores`` is None. Asserts:
    the pipeline's :func:`~ppframework.validation.check_allocation` accepts the answer (exactly the
    plan's blocks, each a finite ratio in [0, 1)); the scores are not modified; the answer is
    deterministic; a per-layer ratio of 0 gives every block 0.
    """
    subject = _Subject(strategy, "allocate")
    _run_examples(
        functools.partial(_allocate_case, subject), _draw_allocate_case, max_examples, _ALLOCATE_CORNERS
    )


# --------------------------------------------------------------------------------------------
# dispatch

#: Stage name -> its check (``check(strategy, *, max_examples)``).
STAGE_CHECKS: dict[str, Callable[..., None]] = {
    "allocate": check_allocate,
    "select_probe": check_select_probe,
    "score_channels": check_score_channels,
    "fuse_history": check_fuse_history,
    "apply_mask": check_apply_mask,
    "infer": check_infer,
}


def check_strategy(strategy: Any, *, max_examples: int = 20, stage: str | None = None) -> None:
    """Run the conformance check of the strategy's stage (``strategy.stage``, or ``stage``).

    ``strategy`` is an instance; a strategy class is instantiated without arguments and a
    registry :class:`~ppframework.registry.StrategyInfo` is built with default parameters.

    Raises:
        AssertionError: a contract violation, naming the strategy and the rule (hypothesis adds
            the falsifying example), or a strategy without a known ``stage``.
        ValueError: ``stage`` is given and is not one of :data:`ppframework.hookspecs.STAGES`.
    """
    from ppframework.registry import StrategyInfo

    if isinstance(strategy, StrategyInfo):
        strategy = strategy.build()
    elif isinstance(strategy, type):
        strategy = strategy()
    if stage is None:
        stage = getattr(strategy, "stage", None)
        if stage not in STAGE_CHECKS:
            raise AssertionError(
                f"{_describe(strategy)} violates 'declares a `stage` among {STAGES}': stage={stage!r}"
            )
    elif stage not in STAGE_CHECKS:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    STAGE_CHECKS[stage](strategy, max_examples=max_examples)
