"""Watching a running pass from a thread: the first check that fails stops the pass, which ends in one line."""

from __future__ import annotations

import os
import signal
import threading

from jobs.console import raise_interrupt
from jobs.spec import SpecError

# The pass waits in Ray Data's loop on the main thread: a signal handled there raises KeyboardInterrupt. Not SIGINT:
# a process a script starts in the background ignores SIGINT, and the stop would be lost.
STOP_SIGNAL = signal.SIGUSR1


class PassWatch:
    """Asks each check (an object whose `check()` gives a one-line error or None) every `poll_s` seconds while a
    pass runs (a context manager, entered on the main thread); the first error stops the pass, which then raises
    SpecError(error). A stop that crosses the pass's own end is dropped: the pass ran whole."""

    poll_s = 1.0

    def __init__(self, *checks):
        self.checks = checks
        self.error: str | None = None
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True, name="watch")
        self.handler = None

    def __enter__(self) -> PassWatch:
        if threading.current_thread() is threading.main_thread():  # else the watch only watches
            self.handler = signal.signal(STOP_SIGNAL, raise_interrupt)
        self.thread.start()
        return self

    def __exit__(self, kind, err, tb) -> None:
        try:
            with self.lock:
                self.stopped.set()
        except KeyboardInterrupt:  # the stop, after the pass ended by itself
            if self.error is None:
                raise
        finally:
            self.stopped.set()
            self.thread.join()
            if self.handler is not None:
                signal.signal(STOP_SIGNAL, self.handler)
        if kind is KeyboardInterrupt and self.error is not None:
            raise SpecError(self.error) from None

    def _watch(self) -> None:
        while not self.stopped.wait(self.poll_s):
            error = next((e for e in map(_asked, self.checks) if e is not None), None)
            if error is not None:
                with self.lock:
                    if not self.stopped.is_set():
                        self.error = error
                        if signal.getsignal(STOP_SIGNAL) is raise_interrupt:
                            os.kill(os.getpid(), STOP_SIGNAL)
                return


def _asked(check) -> str | None:
    try:
        return check.check()
    except Exception:  # noqa: BLE001 - the GCS busy, an actor restarting: the next poll asks again
        return None
