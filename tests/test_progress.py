"""Progress: stage actors report finished rows to a tally; the driver prints one line per stage."""

import io
import time

import numpy as np
import pytest

from jobs.progress import Progress, Tally, _Rate, reporting
from stages import columns as C


class Echo:
    """A stage that returns its batch."""

    def __call__(self, batch):
        return batch


class Terminal(io.StringIO):
    def isatty(self):
        return True


class FailsItsFirstRow:
    """A stage that fails the first row of each batch (one that came failed keeps its error)."""

    def __call__(self, batch):
        errors = batch[C.ERROR].copy()
        errors[0] = errors[0] or "boom"
        return {**batch, C.ERROR: errors}


def batch(n, errors=None):
    return {C.ROW_ID: np.asarray([f"r{i}" for i in range(n)], dtype=object),
            C.ERROR: np.asarray(errors or [""] * n, dtype=object)}


def test_stages_report_their_rows_and_keep_their_name(ray_cluster):
    tally = Tally.remote()
    stage = reporting(Echo, tally, "text")
    assert stage.__name__ == "Echo" and issubclass(stage, Echo)  # Ray Data names the operator MapBatches(Echo)
    instance = stage()
    instance(batch(3))
    instance(batch(2))
    assert ray_cluster.get(tally.counts.remote()) == {"text": 5}


def test_stages_report_the_rows_they_made_and_failed(ray_cluster):
    """What stops a run whose every row fails (jobs.isolation.FailureWatch): a row that came failed from an
    earlier stage is neither made nor failed here."""
    tally = Tally.remote()
    instance = reporting(FailsItsFirstRow, tally, "decoder")()
    instance(batch(3))
    instance(batch(2, ["prior: came failed", ""]))
    node = ray_cluster.get_runtime_context().get_node_id()  # where the stage ran: here
    assert ray_cluster.get(tally.stage_outcomes.remote()) == {"decoder": [3, 1, "boom", {node}, set(), 0, set()]}  # no load
    # seen, no death


def test_closing_lines_of_a_pass(ray_cluster):
    tally, log = Tally.remote(), io.StringIO()
    with Progress(tally, ["text", "decoder"], total=4, stream=log):
        ray_cluster.get(tally.add.remote("text", 4))
        ray_cluster.get(tally.add.remote("decoder", 1))
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "\x1b" not in log.getvalue()  # not a terminal: plain lines
    assert lines[0].startswith("text     4/4 rows  ") and lines[0].endswith(" images/s  done")
    # a pass that ended cleanly made every row it had: fewer than counted ahead (copies of done rows) is done
    assert lines[1].startswith("decoder  1/1 rows  ") and lines[1].endswith(" images/s  done")


def test_lines_show_rate_and_eta_and_redraw_in_place_on_a_terminal():
    screen = Terminal()
    progress = Progress(None, ["prior"], total=100, stream=screen)
    progress.rows["prior"], progress.speed["prior"] = 40, 2.0
    assert progress.lines() == ["prior    40/100 rows  2.00 images/s  ETA 0:30"]
    progress.rows["prior"], progress.speed["prior"] = 100, 9.0  # the last batches came in a burst
    progress.started, progress.changed["prior"] = 1000.0, 1040.0  # done 40 s into the pass
    assert progress.lines() == ["prior    100/100 rows  2.50 images/s  done"]  # over the pass, not the burst
    progress._draw()
    progress._draw()
    first, second = screen.getvalue().split("\n")[:2]
    assert first == "\x1b[2Kprior    100/100 rows  2.50 images/s  done"
    assert second.startswith("\x1b[1F\x1b[2Kprior")  # the second draw goes back up over the first


def test_folded_rows_leave_the_total_and_a_pass_that_failed_does_not_say_done():
    log = io.StringIO()
    progress = Progress(None, ["decoder"], total=10, stream=log)  # no tally: its counts stay as set here
    progress.rows["decoder"], progress.folded = 2, 3  # 3 copies of other rows: never made
    assert progress.lines()[0].startswith("decoder  2/7 rows")
    with pytest.raises(RuntimeError):
        with progress:
            progress.rows["decoder"] = 4
            raise RuntimeError("the pass failed")
    assert log.getvalue().startswith("decoder  4/7 rows") and "done" not in log.getvalue()


def test_rate_is_measured_from_the_first_finished_rows():
    rate = _Rate()
    assert rate(10.0, 0) is None
    assert rate(12.0, 8) is None  # the first batch: start-up, not throughput
    assert rate(16.0, 16) == 2.0
    assert rate(20.0, 40) == 4.0
    assert rate(24.0, 4) is None  # a restarted Tally's counts start again: no negative rate, measured anew
    assert rate(26.0, 12) == 4.0


def test_a_log_gets_the_closing_state_once(ray_cluster):
    tally, log = Tally.remote(), io.StringIO()
    progress = Progress(tally, ["text"], total=2, stream=log)
    with progress:
        ray_cluster.get(tally.add.remote("text", 2))
        progress._poll()
        progress._draw()  # as the loop does every LOG_EVERY_S, just before the pass ends
    assert log.getvalue().count("text     2/2 rows") == 1


def test_a_tally_whose_process_died_is_restarted(ray_cluster):
    """The one Tally of a pass dies (an OOM kill): the stages' calls go to a new one instead of ending the run."""
    tally = Tally.remote()
    ray_cluster.get(tally.add.remote("text", 5))
    ray_cluster.kill(tally, no_restart=False)  # as its process dying does
    deadline = time.time() + 60
    while ray_cluster.get(tally.counts.remote(), timeout=60) and time.time() < deadline:
        time.sleep(0.1)  # the kill is asynchronous: the old process may answer a call or two before it is gone
    assert ray_cluster.get(tally.counts.remote(), timeout=60) == {}  # a new Tally
    assert ray_cluster.get(tally.begin.remote("prior", ["a", "b"]), timeout=60) == [1, 1]  # no history: first tries
    ray_cluster.get(tally.add.remote("text", 2))
    assert ray_cluster.get(tally.counts.remote()) == {"text": 2}
