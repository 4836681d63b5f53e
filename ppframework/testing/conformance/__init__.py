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
this package does not need it. They run on the CPU with small tensors; :func:`check_infer` builds a
one-layer tiny LLaMA (grouped-query attention, rotary) and a one-layer tiny OPT once per process.

One module per stage (:mod:`.allocate`, :mod:`.probe`, :mod:`.scoring`, :mod:`.fusion`,
:mod:`.masking`, :mod:`.inference`), on shared parts: :mod:`.fixtures` (geometries, contexts,
registered strategies), :mod:`.subject` (the strategy under test and its violations),
:mod:`.values` (describing, copying and comparing values), :mod:`.examples` (hypothesis examples
and corner cases) and :mod:`.inputs` (random inputs); :mod:`.dispatch` picks a strategy's check.
"""

from __future__ import annotations

from ppframework.testing.conformance.allocate import check_allocate
from ppframework.testing.conformance.dispatch import STAGE_CHECKS, check_strategy
from ppframework.testing.conformance.fixtures import default_geometry, make_context, registered_strategies
from ppframework.testing.conformance.fusion import check_fuse_history
from ppframework.testing.conformance.inference import check_infer
from ppframework.testing.conformance.inputs import PADDINGS as PADDINGS  # noqa: F401 (kept public)
from ppframework.testing.conformance.masking import check_apply_mask
from ppframework.testing.conformance.probe import check_select_probe
from ppframework.testing.conformance.scoring import check_score_channels

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
