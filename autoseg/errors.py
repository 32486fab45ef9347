"""Errors raised by autoseg.

Every error names the object (file, case, option), the problem and the fix. The CLI prints the message
and exits non-zero without a traceback (``--debug`` shows it).
"""

from __future__ import annotations


class AutosegError(Exception):
    """Base class of every error autoseg raises on purpose."""


class DatasetError(AutosegError, ValueError):
    """The dataset folder or its dataset.json is malformed."""


class DatasetIntegrityError(DatasetError):
    """The integrity check found problems; ``report`` holds all of them."""

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report


class ImageReadError(AutosegError, OSError):
    """An image file cannot be read (missing, truncated, unsupported)."""


class ImageWriteError(AutosegError, OSError):
    """An image file cannot be written."""


class PlanningError(AutosegError, ValueError):
    """The planner cannot derive a configuration from the fingerprint."""


class FileFormatError(AutosegError, ValueError):
    """A JSON object (fingerprint, plans, ...) is malformed or of an unknown version."""


class TrainingConfigError(AutosegError, ValueError):
    """Training settings, labels or regions are inconsistent (losses, augmentation)."""
