"""Errors that carry the offending file and a reason a user can act on."""

from __future__ import annotations

from pathlib import Path


class HistosearchError(Exception):
    """Base class: a bad input, reported as one line naming the file and the reason; the
    command line exits with `exit_code` (2 for a malformed request, as a usage error)."""

    exit_code = 1

    def __init__(self, path: str | Path | None, reason: str) -> None:
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


class SlideReadError(HistosearchError):
    """The file is missing, corrupt, truncated or of an unsupported kind."""


class MagnificationError(HistosearchError):
    """The slide lacks resolution metadata, or a magnification beyond the scan was asked for."""


class UnknownResolutionError(MagnificationError):
    """The slide records neither microns per pixel nor objective power, and none was given."""


class NoTissueError(HistosearchError):
    """No tile of the grid holds enough tissue."""


class StainError(HistosearchError):
    """Stain normalisation cannot be fitted or applied to the given image."""
