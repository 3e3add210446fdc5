"""The one exception type users see.

Every error a user can cause (bad path, corrupt file, wrong geometry, bad config) is raised as
:class:`MedsynthError` with a one-line message that names the offending file or value and says
what would be valid. The CLI prints ``error: <message>`` and exits non-zero without a traceback
(unless ``--debug``); anything else escaping is a bug in medsynth.
"""

from __future__ import annotations

from pathlib import Path


class MedsynthError(Exception):
    """A user-facing error with an actionable one-line message.

    Args:
        message: what is wrong and what would be valid.
        path: the offending file or folder, if any; it is prefixed to the message.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.problem = message
        text = f"{self.path}: {message}" if self.path is not None else message
        super().__init__(text)


class InputError(MedsynthError):
    """A file or folder that cannot be read or trusted (missing, corrupt, wrong shape, ...)."""


class GeometryError(InputError):
    """Geometry that cannot be trusted: missing slices, uneven spacing, grids that differ."""


class ConfigError(MedsynthError):
    """An invalid option, config value or dataset description."""
