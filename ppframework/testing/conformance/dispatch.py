"""Choosing a strategy's check by its stage: :data:`STAGE_CHECKS` and :func:`check_strategy`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ppframework.hookspecs import STAGES
from ppframework.testing.conformance.allocate import check_allocate
from ppframework.testing.conformance.fusion import check_fuse_history
from ppframework.testing.conformance.inference import check_infer
from ppframework.testing.conformance.masking import check_apply_mask
from ppframework.testing.conformance.probe import check_select_probe
from ppframework.testing.conformance.scoring import check_score_channels
from ppframework.testing.conformance.subject import _describe

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
