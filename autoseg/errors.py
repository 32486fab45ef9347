"""Errors raised by autoseg.

Every error names the object (file, case, option), the problem and the fix. The CLI prints the message
and exits non-zero without a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import errno


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


class DicomSeriesError(ImageReadError):
    """A DICOM series folder cannot be read as one regular volume (gantry tilt, missing or unevenly spaced slices,
    mixed orientations, several series and none chosen)."""


class ImageWriteError(AutosegError, OSError):
    """An image file cannot be written."""


class PlanningError(AutosegError, ValueError):
    """The planner cannot derive a configuration from the fingerprint."""


class FileFormatError(AutosegError, ValueError):
    """A JSON object (fingerprint, plans, ...) is malformed or of an unknown version."""


class TrainingConfigError(AutosegError, ValueError):
    """Training settings, labels or regions are inconsistent (losses, augmentation)."""


class EvaluationError(AutosegError, ValueError):
    """Predictions and references cannot be evaluated together (missing, mismatched, bad options)."""


class EnsembleError(AutosegError, ValueError):
    """Prediction folders cannot be ensembled (missing cases, different label layouts or shapes)."""


class SelectionError(AutosegError, ValueError):
    """``find-best`` cannot run (no trained configuration, no references, an unknown metric)."""


class BundleError(AutosegError, ValueError):
    """A bundle cannot be written, is incomplete, or was modified after export."""


class CascadeInputError(AutosegError, FileNotFoundError):
    """The first stage's predictions needed by a cascade stage are missing."""


class SplitsError(AutosegError, ValueError):
    """Cross-validation splits cannot be made, or a splits file is malformed."""


class TrainingError(AutosegError, RuntimeError):
    """Training cannot start or continue (the message says why and what to do)."""


class TrainingInterrupted(AutosegError, RuntimeError):
    """Training stopped on a preemption signal (SIGTERM, or SIGUSR1 as SLURM's ``--signal`` sends) after saving
    its full state in ``checkpoint_latest.pt``; rerunning with ``--resume`` continues exactly where it stopped.

    The CLI exits with :attr:`exit_code` (75, ``EX_TEMPFAIL`` of sysexits.h: "temporary failure, retry"), so a job
    script can tell "requeue me" apart from a failure.

    Attributes:
        signal: the number of the signal received (None on a DDP process that stopped because another one was
            signalled).
        checkpoint: the checkpoint written (None on processes other than rank 0, which write nothing).
        epoch: the epoch the run will continue.
        iteration: the training iterations of that epoch already done.
    """

    exit_code = 75

    def __init__(self, message: str, *, signal: int | None = None, checkpoint: object = None, epoch: int = 0,
                 iteration: int = 0) -> None:
        super().__init__(message)
        self.signal, self.checkpoint, self.epoch, self.iteration = signal, checkpoint, epoch, iteration


class ReportError(AutosegError, ValueError):
    """The report cannot be made (no such work folder, a bad option)."""


class PredictionInputError(AutosegError, ValueError):
    """The images given to ``predict`` are missing, unreadable or do not fit the model."""


class ModelImportError(AutosegError, ValueError):
    """A model of another framework cannot be imported (unsupported architecture, unsafe or malformed files)."""


class ModelNotFoundError(AutosegError, FileNotFoundError):
    """No trained fold where the predictor looked."""


class InferenceError(AutosegError, ValueError):
    """Prediction cannot run with the given image, network or options."""


class OnnxBackendError(AutosegError, RuntimeError):
    """An ONNX export failed, is inconsistent with its checkpoint, or ONNX Runtime cannot run it."""


class OnnxUnavailableError(OnnxBackendError, ImportError):
    """A package the ONNX backend needs (onnx, onnxruntime, onnxscript) is not installed."""


class MissingChannelError(AutosegError, ValueError):
    """The channels declared absent do not fit the image (unknown index, or every channel absent)."""


class WorkerError(AutosegError, RuntimeError):
    """A worker failed on one item; the message holds the item and the worker's traceback."""


class PluginError(AutosegError, ValueError):
    """An unknown plugin, a bad plugin parameter, a broken third-party plugin or a missing plugin state."""



class FederationError(AutosegError, RuntimeError):
    """Federated planning or training cannot go on (sites that disagree, too few sites, a bad address)."""


class MissingDependencyError(AutosegError, ImportError):
    """An optional package a part needs is not installed; the message names the pip command."""


_OS_FIXES = {
    errno.ENOSPC: ("the disk is full", "free space there (or point --workdir/-o at a larger disk) and rerun; "
                   "finished files are kept and the rerun continues where it stopped"),
    errno.EDQUOT: ("the disk quota is exhausted", "free space or raise the quota and rerun; finished files are kept"),
    errno.EFBIG: ("the file exceeds the allowed file size", "raise the limit (ulimit -f) or write to another file "
                  "system, then rerun; finished files are kept"),
    errno.EROFS: ("the file system is read-only", "choose a writable folder with --workdir/-o"),
    errno.EACCES: ("permission denied", "choose a folder you may write to (--workdir/-o), or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a folder you may write to (--workdir/-o), or fix its permissions"),
}


def describe_os_error(err: OSError) -> str | None:
    """A one-line message naming the file, the problem and the fix for the operating-system errors a user
    can fix (disk full, quota, read-only file system, permissions); ``None`` for any other error."""
    if err.errno not in _OS_FIXES:
        return None
    problem, fix = _OS_FIXES[err.errno]
    where = err.filename or "an output file"
    if err.filename2:
        where = f"{where} -> {err.filename2}"
    return f"{where}: cannot write: {problem} ({err.strerror or err}). Fix: {fix}."
