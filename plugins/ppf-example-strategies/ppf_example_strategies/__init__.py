"""Example ppframework plugin: the ``variance`` probe and the ``ppsp-l1`` scoring metric.

ppframework finds this module through the ``ppframework`` entry-point group (see this
distribution's ``pyproject.toml``) and calls :func:`ppf_register_strategies` once per process.
"""

from __future__ import annotations

from collections.abc import Callable

from ppframework.hookspecs import hookimpl

from ppf_example_strategies.probe import VarianceProbe, VarianceProbeParams, select_variance_probe
from ppf_example_strategies.scoring import PPspL1Score, ppsp_l1_weight_term

__all__ = [
    "PPspL1Score",
    "VarianceProbe",
    "VarianceProbeParams",
    "ppf_register_strategies",
    "ppsp_l1_weight_term",
    "select_variance_probe",
]

__version__ = "0.1.0"


@hookimpl
def ppf_register_strategies(register: Callable[[type], None]) -> None:
    """Register this plugin's strategies with ppframework."""
    register(VarianceProbe)
    register(PPspL1Score)
