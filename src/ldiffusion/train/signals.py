"""Deferred stop on SIGINT (Ctrl-C) and SIGTERM: finish the running step, checkpoint it, then stop.

A signal that arrives inside an optimiser step would otherwise interrupt it half-way (weights or
optimiser moments partly updated), and the run could only keep its previous periodic checkpoint.
`StopRequest` records the signal instead; the loop polls `requested` after each finished step and
stops there with that step saved. A second signal stops at once (the previous checkpoint is kept).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Context manager that turns SIGINT/SIGTERM into a flag while it is active.

    Installs handlers only in the main thread (elsewhere Python forbids it; the flag then stays
    unset and signals keep their default effect) and leaves an ignored signal ignored. The previous
    handlers are restored on exit.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """True once a stop signal has arrived."""
        return self.signum is not None

    @property
    def name(self) -> str:
        """Name of the received signal ("SIGINT", ...) or "" when none arrived."""
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("%s received: finishing the current step and saving it (send it again to stop at "
                       "once, keeping the previous checkpoint)", signal.Signals(signum).name)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                old = signal.getsignal(sig)
                if old == signal.SIG_IGN:  # e.g. a background job: keep ignoring it
                    continue
                signal.signal(sig, self._handle)
                self._old[sig] = signal.SIG_DFL if old is None else old
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
