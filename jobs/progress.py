"""Progress: each stage actor reports the rows it finished; the driver prints one line per stage."""

from __future__ import annotations

import sys
import threading
import time

import ray

from stages import columns as C

POLL_S = 1.0  # how often the driver asks for the counts
LOG_EVERY_S = 30.0  # not a terminal (a log file, CI): one block of lines this often, and one at the end
FOLDED = "folded"  # the tally's count of input rows folded into an identical row (made once)
FOLDED_OTHER_VALUES = "folded_other_values"  # … of them whose own columns hold other values than the row kept


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class Tally:
    """Rows finished per stage, as the stage actors report them (one number per stage), and the tries of the
    rows in flight (nothing per finished row): a batch tried again after its actor died is seen. Restarted when
    its process dies (the run goes on; its progress counts start again)."""

    def __init__(self):
        self.rows: dict[str, int] = {}
        self.tries: dict[tuple[str, str], int] = {}  # (stage, row id) → tries of the batch holding it
        self.trying: dict[tuple[str, str], str] = {}  # … → the node of its latest try
        self.alone_tries: dict[tuple[str, str], int] = {}  # … → tries of the row run alone
        self.loads: dict[str, dict] = {}  # stage → its class name and {node: why} where its models failed to load
        self.first: dict[str, str] = {}  # a count's first example (a prompt), for its warning
        # stage → [rows made, failed, first error, nodes failing rows, nodes hosting, actor deaths, nodes of deaths]
        self.outcomes: dict[str, list] = {}

    def begin(self, stage: str, ids: list[str], node: str = "") -> list[int]:
        """Count a try of a batch on `node`; the tries so far of each of its rows. A row tried before and not
        ended means the actor of that try died (on the node of that try)."""
        died_on = next((self.trying.get((stage, i), "") for i in ids if (stage, i) in self.tries), None)
        if died_on is not None:
            seen = self._outcome(stage)
            seen[5] += 1
            seen[6].add(died_on)
        for i in ids:
            self.tries[stage, i] = self.tries.get((stage, i), 0) + 1
            self.trying[stage, i] = node
        return [self.tries[stage, i] for i in ids]

    def alone(self, stage: str, row_id: str) -> int:
        """Count a try of one row run alone; its tries so far."""
        self.alone_tries[stage, row_id] = self.alone_tries.get((stage, row_id), 0) + 1
        return self.alone_tries[stage, row_id]

    def ran(self, stage: str, row_id: str) -> None:
        """A row run alone came back."""
        self.alone_tries.pop((stage, row_id), None)

    def end(self, stage: str, ids: list[str]) -> None:
        """A batch came back (done or raised): forget its rows' tries."""
        for i in ids:
            self.tries.pop((stage, i), None)
            self.trying.pop((stage, i), None)
            self.alone_tries.pop((stage, i), None)

    def load_failed(self, stage: str, cls: str, node: str, why: str) -> None:
        """A stage actor on `node` could not load its models (the latest reason per node is kept)."""
        self.loads.setdefault(stage, {"class": cls, "nodes": {}})["nodes"][node] = why

    def failed_loads(self) -> dict[str, dict]:
        return self.loads

    def add(self, stage: str, rows: int) -> None:
        self.rows[stage] = self.rows.get(stage, 0) + rows

    def counts(self) -> dict[str, int]:
        return self.rows

    def outcome(self, stage: str, made: int, failed: int, error: str | None, node: str) -> None:
        """A batch's rows that `stage` made and failed on `node` (rows that came failed are neither), its first
        error."""
        seen = self._outcome(stage)
        seen[0], seen[1], seen[2] = seen[0] + made, seen[1] + failed, seen[2] or error
        if failed:
            seen[3].add(node)

    def loaded(self, stage: str, node: str) -> None:
        """An actor of `stage` loaded its models on `node`."""
        self._outcome(stage)[4].add(node)

    def _outcome(self, stage: str) -> list:
        return self.outcomes.setdefault(stage, [0, 0, None, set(), set(), 0, set()])

    def stage_outcomes(self) -> dict[str, list]:
        return self.outcomes

    def example(self, kind: str, text: str) -> None:
        """Keep the first example reported for count `kind`."""
        self.first.setdefault(kind, text)

    def examples(self) -> dict[str, str]:
        return self.first


def reporting(cls, tally, stage: str):
    """`cls` (a stage's callable class) that also reports the rows of every batch it finishes to `tally`;
    same name, so Ray Data's operators keep theirs."""

    def __call__(self, batch):
        came_failed = {str(i) for i, error in zip(batch[C.ROW_ID], batch[C.ERROR]) if error}
        out = cls.__call__(self, batch)
        tally.add.remote(stage, len(out[C.ROW_ID]))
        errors = [e for i, e in zip(out[C.ROW_ID], out[C.ERROR]) if e and str(i) not in came_failed]
        tally.outcome.remote(stage, len(out[C.ROW_ID]) - len(came_failed) - len(errors), len(errors),
                             errors[0] if errors else None, ray.get_runtime_context().get_node_id())
        return out

    return type(cls.__name__, (cls,), {"__call__": __call__, "__doc__": cls.__doc__})


class _Rate:
    """A stage's images/s between its first finished rows (start-up is not throughput) and its latest."""

    def __init__(self):
        self.first: tuple[float, int] | None = None

    def __call__(self, now: float, rows: int) -> float | None:
        if self.first is None and rows or self.first is not None and rows < self.first[1]:
            self.first = (now, rows)  # the first rows, or the counts restarted with a restarted Tally
        if self.first is None or rows == self.first[1] or now <= self.first[0]:
            return None
        return (rows - self.first[1]) / (now - self.first[0])


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """One line per stage (rows done / total, images/s, ETA) while a pipeline runs: redrawn in place on a
    terminal, printed every LOG_EVERY_S otherwise, and once more when the pass ends."""

    def __init__(self, tally, stages: list[str], total: int, stream=None):
        self.tally, self.stages, self.total = tally, stages, total
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.rates = {stage: _Rate() for stage in stages}
        self.rows = dict.fromkeys(stages, 0)
        self.folded, self.finished = 0, False
        self.speed: dict[str, float | None] = dict.fromkeys(stages)
        self.changed: dict[str, float] = {}  # when each stage's count last moved
        self.drawn: list[str] = []  # the lines last drawn
        self.started = time.time()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="progress", daemon=True)

    def __enter__(self) -> "Progress":
        self.thread.start()
        return self

    def __exit__(self, error, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._poll()
        self.finished = error is None  # every row of the pass is through (fewer than counted: copies folded)
        if self.tty or self.lines() != self.drawn:  # a log gets the closing state once
            self._draw()

    def lines(self) -> list[str]:
        """The current line of each stage."""
        out = []
        for stage in self.stages:
            done, rate = self.rows[stage], self.speed[stage]
            total = done if self.finished else max(self.total - self.folded, done)
            since = self.changed.get(stage, time.time()) - self.started
            # until measured, and once done: over the pass (a last burst of batches is no throughput)
            shown = done / max(since, 1e-9) if done >= total or not rate else rate
            speed = f"{shown:.2f} images/s" if shown else "-- images/s"
            eta = "done" if done >= total else f"ETA {_clock((total - done) / rate)}" if rate else "ETA --"
            out.append(f"{stage:<8} {done}/{total} rows  {speed}  {eta}")
        return out

    def _poll(self) -> None:
        try:
            counts = ray.get(self.tally.counts.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - a slow or lost count only delays the line, never the job
            return
        now, self.folded = time.time(), counts.get(FOLDED, 0)
        for stage in self.stages:
            if counts.get(stage, 0) != self.rows[stage]:
                self.rows[stage], self.changed[stage] = counts.get(stage, 0), now
            self.speed[stage] = self.rates[stage](self.changed.get(stage, now), self.rows[stage])

    def _draw(self) -> None:
        lines = self.lines()
        if self.tty:
            up = f"\x1b[{len(lines)}F" if self.drawn else ""
            self.stream.write(up + "".join(f"\x1b[2K{line}\n" for line in lines))
        else:
            self.stream.write("".join(f"{line}\n" for line in lines))
        self.stream.flush()
        self.drawn = lines

    def _loop(self) -> None:
        last = time.time()
        while not self.stop.wait(POLL_S):
            self._poll()
            if self.tty or time.time() - last >= LOG_EVERY_S:
                self._draw()
                last = time.time()
