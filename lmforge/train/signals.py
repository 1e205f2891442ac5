"""SIGINT and SIGTERM during training: noted rather than obeyed at once, so that the loop
(lmforge.train.loop) can finish its step, save a checkpoint and stop cleanly."""

from __future__ import annotations

import signal
import threading


class StopSignals:
    """While active, SIGINT and SIGTERM only set `received` (the signal's name) and `signum`.
    The first one puts the previous handler back, so a second Ctrl-C stops at once. Outside the
    main thread, where Python cannot install handlers, it does nothing."""

    NAMES = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.received: str | None = None
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                num = getattr(signal, name)
                self._previous[num] = signal.signal(num, self._note)
        return self

    def _note(self, signum, frame) -> None:
        self.received, self.signum = signal.Signals(signum).name, signum
        self._restore(signum)

    def _restore(self, num: int) -> None:
        previous = self._previous.get(num)
        signal.signal(num, previous if previous is not None else signal.SIG_DFL)

    def __exit__(self, *exc) -> None:
        for num in list(self._previous):
            self._restore(num)
        self._previous = {}
