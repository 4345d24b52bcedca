"""Watching a running pass from a thread: the first check that fails stops the pass, which ends in one line."""

from __future__ import annotations

import os
import signal
import threading

from jobs.spec import SpecError

# The pass waits in Ray Data's loop on the main thread: a signal handled there raises KeyboardInterrupt. Not SIGINT:
# a process a script starts in the background ignores SIGINT, and the stop would be lost.
STOP_SIGNAL = signal.SIGUSR1


def _interrupt(signum, frame):
    raise KeyboardInterrupt


class PassWatch:
    """Calls `check()` every `poll_s` seconds while a pass runs (a context manager, entered on the main thread);
    the first message it returns stops the pass, which then raises SpecError(message). A stop that crosses the
    pass's own end is dropped: the pass ran whole."""

    poll_s = 1.0

    def __init__(self):
        self.error: str | None = None
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True, name=type(self).__name__)
        self.handler = None

    def check(self) -> str | None:
        """The one-line error that stops the pass, else None (an exception: asked again at the next poll)."""
        raise NotImplementedError

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # else the watch only watches
            self.handler = signal.signal(STOP_SIGNAL, _interrupt)
        self.thread.start()
        return self

    def __exit__(self, kind, err, tb) -> None:
        try:
            with self.lock:
                self.stopped.set()
        except KeyboardInterrupt:  # this watch's stop, after the pass ended by itself
            if self.error is None:
                raise
        self.thread.join()
        if self.handler is not None:
            signal.signal(STOP_SIGNAL, self.handler)
        if kind is KeyboardInterrupt and self.error is not None:
            raise SpecError(self.error) from None

    def _watch(self) -> None:
        while not self.stopped.wait(self.poll_s):
            try:
                error = self.check()
            except Exception:  # noqa: BLE001 - the GCS busy, an actor restarting: the next poll asks again
                continue
            if error is not None:
                with self.lock:
                    if not self.stopped.is_set():
                        self.error = error
                        if signal.getsignal(STOP_SIGNAL) is _interrupt:
                            os.kill(os.getpid(), STOP_SIGNAL)
                return
