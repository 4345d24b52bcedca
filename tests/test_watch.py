"""A watch stops a running pass with its one-line error, in a process that ignores SIGINT too."""

import signal
import threading
import time

import pytest

from jobs.spec import SpecError
from jobs.watch import PassWatch


class Stops:
    """A check that fails at its `after`-th poll."""

    def __init__(self, after: int):
        self.polls, self.after = 0, after

    def check(self):
        self.polls += 1
        if self.polls == 2:
            raise RuntimeError("the GCS busy")  # asked again at the next poll
        return "stages.decoder: why it stopped" if self.polls >= self.after else None


@pytest.fixture(autouse=True)
def fast(monkeypatch):
    monkeypatch.setattr(PassWatch, "poll_s", 0.05)


@pytest.fixture
def sigint_ignored():
    """As in a process a script starts in the background (`cmd &` in sh): SIGINT never reaches it."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGINT, before)


def test_a_failed_check_stops_the_pass_in_one_line(sigint_ignored):
    started = time.time()
    with pytest.raises(SpecError, match="^stages.decoder: why it stopped$"):
        with PassWatch(Stops(after=4)):
            time.sleep(30)  # the pass, waiting
    assert time.time() - started < 10


def test_a_pass_that_ends_first_is_not_stopped_and_the_handler_is_put_back():
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # not an earlier test's leftover, which may be the watch's own
    before, check = signal.getsignal(signal.SIGUSR1), Stops(after=10**6)
    with PassWatch(check) as watch:
        time.sleep(0.3)
    assert watch.error is None and check.polls >= 3 and signal.getsignal(signal.SIGUSR1) is before


class FailsOnceStopped:
    """A check whose error comes only after the pass ended (its poll crossed the end)."""

    def __init__(self):
        self.watch = None

    def check(self):
        self.watch.stopped.wait(5)
        return "stages.prior: too late"


def test_an_error_found_after_the_pass_ended_stops_nothing():
    check = FailsOnceStopped()
    with PassWatch(check) as watch:
        check.watch = watch
        time.sleep(0.2)  # the check's poll is waiting for the end
    assert watch.error is None


def test_the_pass_own_outcome_wins_where_no_stop_was_sent():
    """An error kept by a stop that crossed the pass's end: a pass that ended whole still ends whole, and one that
    raised its own error raises that error."""
    with PassWatch() as watch:
        watch.error = "stages.decoder: kept"
    with pytest.raises(ValueError, match="its own"):
        with PassWatch() as watch:
            watch.error = "stages.decoder: kept"
            raise ValueError("its own")


class CtrlC:
    """A lock whose taking is interrupted: a Ctrl-C (or the watch's stop) landing as the pass ends."""

    def __enter__(self):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        return False


def test_a_ctrl_c_as_the_pass_ends_is_kept_unless_it_is_the_watch_stop():
    with pytest.raises(KeyboardInterrupt):
        with PassWatch() as watch:
            watch.lock = CtrlC()
    with PassWatch() as watch:  # the watch's own stop, after the pass ran whole: dropped
        watch.lock, watch.error = CtrlC(), "stages.decoder: late"


def test_a_watch_off_the_main_thread_only_watches():
    """No signal handler of its own there: a failed check is kept as the error, and no signal is sent (Python's
    default for SIGUSR1 would end the process)."""
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    errors = []

    def run():
        with PassWatch(Stops(after=3)) as watch:
            time.sleep(0.5)
        errors.append(watch.error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert errors == ["stages.decoder: why it stopped"] and signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
