"""Ctrl-C and SIGTERM during training: finish the step, save a checkpoint, exit with 128 + the signal number."""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from kdcore.errors import KDUserError

log = logging.getLogger(__name__)


class TrainingInterrupted(KDUserError):
    """Ctrl-C (SIGINT) or SIGTERM: a checkpoint was saved; the exit code is 128 + the signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """SIGINT/SIGTERM ask the loop to stop after the current step (then it checkpoints and exits).

    The handler only sets a flag, so a step is never cut in half (an optimiser
    update interrupted midway would leave weights and moments inconsistent). A
    second signal restores the default handler and interrupts at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002 - signal handler signature
        if self.received is not None:  # the second one: stop now
            self.__exit__()
            raise KeyboardInterrupt
        self.received = signum
        log.warning("%s received: stopping after this step and saving a checkpoint (send it again to stop at "
                    "once, without one).", signal.Signals(signum).name)

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
