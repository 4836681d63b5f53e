"""The strategy under test: its structure, its hook called as pluggy would, its violations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ppframework.hookspecs import STAGES
from ppframework.testing.conformance.values import _fmt, _same


def _describe(strategy: Any, stage: str | None = None) -> str:
    cls = type(strategy)
    stage = stage or getattr(strategy, "stage", "?")
    return f"{stage} strategy {getattr(strategy, 'name', None)!r} ({cls.__module__}.{cls.__qualname__})"


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
    def require_repeated(
        self,
        again: Any,
        first: Any,
        cls: type,
        fields: tuple[str, ...],
        rule: str,
        detail: str | Callable[[], str] = "",
    ) -> None:
        """``again`` (the answer to the same call repeated) is a ``cls`` equal to ``first`` in each of
        ``fields`` (tensors equal on the CPU, Nones matching)."""
        self.require(
            isinstance(again, cls) and all(_same(getattr(again, f), getattr(first, f)) for f in fields),
            rule,
            detail,
        )

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
