"""Test helpers for ppframework and its plugins.

:mod:`ppframework.testing.conformance` holds the reusable strategy conformance checks (re-exported
here, with its ``__all__``); :mod:`ppframework.testing.tiny` builds tiny random models and
:mod:`ppframework.testing.sync` checks that CUDA layers never synchronise (import them explicitly).
Importing this package imports neither pytest nor hypothesis (the checks import hypothesis when
they run).
"""

from ppframework.testing.conformance import *  # noqa: F403 (the conformance suite's public names)
from ppframework.testing.conformance import __all__ as __all__
