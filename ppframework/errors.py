"""The one exception type users see for bad input."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration or input problem, raised before any heavy work.

    The message always names the offending field (for example ``methods[0].pruning.ratio``)
    and says how to fix it or lists the valid choices.
    """
