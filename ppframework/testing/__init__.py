"""Test helpers for ppframework and its plugins.

:mod:`ppframework.testing.conformance` holds the reusable strategy conformance checks (re-exported
here); :mod:`ppframework.testing.tiny` builds tiny random models and :mod:`ppframework.testing.sync`
checks that CUDA layers never synchronise (import them explicitly). Importing this package imports
neither pytest nor hypothesis (the checks import hypothesis when they run).
"""

from ppframework.testing.conformance import (
    STAGE_CHECKS,
    check_allocate,
    check_apply_mask,
    check_fuse_history,
    check_infer,
    check_score_channels,
    check_select_probe,
    check_strategy,
    default_geometry,
    make_context,
    registered_strategies,
)

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
