"""Preemption signals: what SLURM and similar schedulers send before they kill a job (SIGTERM, SIGUSR1). While
:class:`PreemptionSignals` is entered they only record that they arrived, so the training loop can finish the
iteration under way and save its state (see :mod:`autoseg.training.loop`)."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

__all__ = ["PREEMPTION_SIGNALS", "PreemptionSignals"]

#: the signals that stop training with a checkpoint (those a platform lacks, e.g. SIGUSR1 on Windows, are skipped)
PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1")


class PreemptionSignals:
    """Context manager: while inside, :data:`PREEMPTION_SIGNALS` only record that they arrived (``received``);
    the previous handlers are restored on exit. Outside the main thread (where Python cannot set handlers) it
    installs nothing."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def installed(self) -> list[int]:
        """The signals handled now."""
        return list(self._previous)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum

    def __enter__(self) -> PreemptionSignals:
        if threading.current_thread() is threading.main_thread():
            for name in PREEMPTION_SIGNALS:
                if (sig := getattr(signal, name, None)) is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():  # None: a handler not set from Python; the default is closest
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}
