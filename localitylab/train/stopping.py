"""Stopping a run on request: SIGINT (Ctrl-C) or SIGTERM (a scheduler's pre-emption) ask the
loop to finish the current step, write a checkpoint and exit; `resume` then continues
exactly where it stopped. A second Ctrl-C stops at once (the previous checkpoint stays).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

from localitylab.errors import RunStopped

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
__all__ = ["EXIT_CODES", "RunStopped", "StopRequests"]


class StopRequests:
    """Context manager that turns SIGINT/SIGTERM into a flag the loop reads between steps."""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signal, 1)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.signal = signal.Signals(signum)

    def __enter__(self) -> "StopRequests":
        # Signal handlers can only be installed from the main thread (not in a worker thread
        # of a notebook or a test runner); there the run simply has no graceful stop.
        if threading.current_thread() is threading.main_thread():
            for sig in EXIT_CODES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
