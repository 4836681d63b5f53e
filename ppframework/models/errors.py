"""The error raised when a model cannot be loaded as configured."""

from __future__ import annotations

from ppframework.errors import ConfigError

__all__ = ["ModelError"]


class ModelError(ConfigError):
    """A model cannot be loaded as configured; the message names the ``model.*`` field and the fix.

    A :class:`~ppframework.errors.ConfigError`, hence a :class:`ValueError`.
    """
