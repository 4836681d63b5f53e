"""The error every export, save and load problem raises."""

from __future__ import annotations

from ppframework.errors import ConfigError


class ExportError(ConfigError):
    """An export or a saved pipeline that cannot be written or read; the message names the field or
    file and says what to do (the ``ppf`` command prints it and exits with status 2)."""
