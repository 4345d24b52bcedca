"""A watch stops a running pass with its one-line error, in a process that ignores SIGINT too."""

import signal
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
    before, check = signal.getsignal(signal.SIGUSR1), Stops(after=10**6)
    with PassWatch(check) as watch:
        time.sleep(0.3)
    assert watch.error is None and check.polls >= 3 and signal.getsignal(signal.SIGUSR1) is before
