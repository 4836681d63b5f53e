"""Running a check: hypothesis examples, then fixed corner cases, reported as AssertionError."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

from ppframework.testing.conformance.subject import _Subject


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


def _run_stage(
    strategy: Any,
    stage: str,
    run_case: Callable[..., None],
    draw_case: Callable[[Any], dict[str, Any]],
    max_examples: int,
    fixed_cases: Iterable[dict[str, Any]],
    *state: Any,
) -> _Subject:
    """The body of every stage check: validate ``strategy`` as a ``stage`` strategy, then run
    ``run_case(subject, *state, **case)`` on the hypothesis examples and the fixed corner cases
    (:func:`_run_examples`); returns the subject for checks over all the cases."""
    subject = _Subject(strategy, stage)
    _run_examples(functools.partial(run_case, subject, *state), draw_case, max_examples, fixed_cases)
    return subject
