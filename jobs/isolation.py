"""Row isolation in the stage actors: a row that fails (an exception on it, or an actor that dies on it again
and again) gets an `error` in its manifest entry; its batch-mates and the run go on. A stage actor that cannot
load its models is reported: a warning when other actors served the stage, else a one-line error."""

from __future__ import annotations

import numpy as np
import ray

from jobs.spec import SpecError
from stages import columns as C
from stages.storage import causes, reason, transient

# An actor (OOM-killed, say) may die this often while one row runs alone in it; the row then fails. Ray Data
# restarts the actor and retries its task each time (max_restarts=-1, max_task_retries=-1).
MAX_DEATHS = 2
# A stage whose first this many rows all failed (none made) stops the pass: a cause every row shares (a broken
# checkpoint, a GPU out of memory at this micro-batch) would otherwise fail every row of the table, one by one.
FAIL_FAST_ROWS = 64
# … or whose actors died this often, none made (each row that kills its actor costs up to 1 + MAX_DEATHS restarts,
# each a model load: 64 such rows would take hours at full size).
FAIL_FAST_DEATHS = 8
RERUN_ADVICE = ("the rows written so far are kept: once the cause is fixed under the same spec, run the same command "
                "(the rows not made yet), then again with --retry-failed (the failed ones); a fix that changes the "
                "model, its dtype or a micro_batch needs a new output (or --overwrite)")
DECODE_ADVICE = ("fix the cause and decode into a new output (or again with --overwrite): a resumed decode keeps a "
                 "failed row's entry")


def isolating(cls, tally=None, stage: str = ""):
    """`cls` (a stage's callable class) that runs only the rows without an error yet; when the batch raises,
    or when an earlier try of it died with the actor (seen through `tally`, if given), it runs the rows one
    at a time, so only a failing row gets the error. A row's result does not depend on its batch-mates (the
    stages pad every model call to a fixed micro-batch), so running it alone makes the same bits."""
    stage = stage or cls.__name__

    def __init__(self, *args, **kwargs):
        try:
            cls.__init__(self, *args, **kwargs)
        except Exception as err:
            if tally is not None:  # before Ray Data replaces this actor, or ends the run
                ray.get(tally.load_failed.remote(stage, cls.__name__, _node(), _one_line(err)))
            raise
        if tally is not None:
            tally.loaded.remote(stage, ray.get_runtime_context().get_node_id())

    def __call__(self, batch):
        ids = [str(i) for i in batch[C.ROW_ID]]
        node = ray.get_runtime_context().get_node_id()
        retried = tally is not None and max(ray.get(tally.begin.remote(stage, ids, node)), default=0) > 1
        try:
            return _run(self, cls, batch, stage, tally, alone=retried)
        finally:
            if tally is not None:
                tally.end.remote(stage, ids)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__call__": __call__, "__doc__": cls.__doc__})


def load_error(err: BaseException, failed: dict[str, dict]) -> SpecError | None:
    """The one-line error for a pass that ended because a stage's actors could not load its models (Ray Data
    gives up after `max_consecutive_actor_init_deaths` in a row); None for any other failure. `failed`:
    Tally.failed_loads()."""
    if not failed or not any(isinstance(e, ray.exceptions.ActorDiedError) for e in causes(err)):
        return None
    text = str(err)
    stages = [s for s, f in failed.items() if f"({f['class']})" in text] or list(failed)
    return SpecError(f"{_stages(stages)}: the model could not be loaded ({_where(failed, stages)}); the rows "
                     f"finished so far are kept: fix the cause and run the same command again")


def load_warnings(failed: dict[str, dict]) -> list[str]:
    """One line per stage whose model failed to load on some node while its other actors served it."""
    return [f"warning: {_stages([s])}: the model could not be loaded on {_where(failed, [s])} (the stage's "
            f"other actors served it)" for s in failed]


def _stages(stages: list[str]) -> str:
    return ", ".join(f"stages.{s}" for s in stages)


def _where(failed: dict[str, dict], stages: list[str]) -> str:
    return "; ".join(f"node {node}: {why}" for s in stages for node, why in failed[s]["nodes"].items())


def _node() -> str:
    context = ray.get_runtime_context()
    return f"{context.get_node_id()[:8]} at {ray.util.get_node_ip_address()}"


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def _run(self, cls, batch, stage, tally, alone: bool):
    n = len(batch[C.ROW_ID])
    todo = [i for i, error in enumerate(batch[C.ERROR]) if not error]
    parts, failed = [], {}
    if todo and not alone:
        try:
            if len(todo) == n:
                return cls.__call__(self, batch)
            parts.append((np.asarray(todo), cls.__call__(self, _rows(batch, todo))))
            todo = []
        except Exception as err:  # noqa: BLE001 - a row's failure: find the row below
            if transient(err):
                raise  # Ray Data retries the task (DataContext.retried_map_errors)
    for i in todo:
        row_id = str(batch[C.ROW_ID][i])
        if tally is not None and ray.get(tally.alone.remote(stage, row_id)) > MAX_DEATHS:
            failed[i] = f"{stage}: the stage's actor died {MAX_DEATHS} times running this row alone (out of memory?)"
            continue
        try:
            parts.append((np.asarray([i]), cls.__call__(self, _rows(batch, [i]))))
        except Exception as err:  # noqa: BLE001 - this row's own failure becomes its error
            if transient(err):
                raise
            failed[i] = f"{stage}: {type(err).__name__}: {reason(err)}"
        if tally is not None:
            tally.ran.remote(stage, row_id)
    return merge(batch, parts, failed, self.blank())


def _rows(batch: dict[str, np.ndarray], idx) -> dict[str, np.ndarray]:
    return {k: v[np.asarray(idx)] for k, v in batch.items()}


def merge(batch: dict[str, np.ndarray], parts: list, failed: dict[int, str], blank: dict) -> dict[str, np.ndarray]:
    """The batch's rows in order: each from the part that ran it, else the input with `blank` values for the
    stage's outputs (None in `blank`: a column the stage drops); `failed` rows get their error."""
    n = len(batch[C.ROW_ID])
    template = parts[0][1] if parts else None
    if template is not None:
        columns = list(template)
    else:
        columns = [c for c in dict.fromkeys([*batch, *blank]) if not (c in blank and blank[c] is None)]
    source: list = [None] * n
    for idx, out in parts:
        for j, i in enumerate(idx):
            source[i] = (out, j)
    merged = {}
    for column in columns:
        values = []
        for i in range(n):
            if source[i] is not None:
                values.append(source[i][0][column][source[i][1]])
            elif column in batch:
                values.append(batch[column][i])
            else:
                like = template[column][0] if template is not None else None
                values.append(np.zeros_like(like) if isinstance(like, np.ndarray) else blank[column])
        like = template[column] if template is not None else batch.get(column)
        merged[column] = _column(values, like)
    merged[C.ERROR] = np.asarray([failed.get(i) or merged[C.ERROR][i] for i in range(n)], dtype=object)
    return merged


def _column(values: list, like: np.ndarray | None) -> np.ndarray:
    """One column from per-row values: a tensor column when every value is an array of one shape and dtype,
    an object column of arrays when they differ, else the dtype of `like`."""
    if values and all(isinstance(v, np.ndarray) for v in values):
        if len({(v.shape, v.dtype) for v in values}) == 1:
            return np.stack(values)
        column = np.empty(len(values), dtype=object)
        for k, v in enumerate(values):
            column[k] = v
        return column
    return np.asarray(values, dtype=like.dtype if like is not None and like.ndim == 1 else object)


def _count(nodes: set) -> str:
    return f"{len(nodes)} node{'s' * (len(nodes) != 1)}"


class FailureWatch:
    """A check for PassWatch while a pass runs: a stage whose first FAIL_FAST_ROWS rows all failed, none made, with
    failed rows on every node that hosts one of its actors, stops the pass, which then ends in one line naming the
    stage, its first error and `advice`; so does one whose actors died FAIL_FAST_DEATHS times, none made, on every
    such node. A node whose rows fail (or whose actors die) beside one that has not failed yet does not stop it (a
    broken GPU: the other nodes make the rows), nor does a stage that made a row before (a restarted Tally counts
    anew)."""

    def __init__(self, tally, advice: str):
        self.tally, self.advice, self.working = tally, advice, set()

    def check(self) -> str | None:
        for stage, (made, failed, first, failing, hosts, deaths, dying) in ray.get(
                self.tally.stage_outcomes.remote(), timeout=10).items():
            if made:
                self.working.add(stage)
            if stage in self.working:
                continue
            stop = "the run stopped rather than fail every row"
            if failed >= FAIL_FAST_ROWS and failing >= hosts:
                return f"stages.{stage}: its first {failed} rows all failed, none made, on {_count(failing)} " \
                       f"(first: {first}); {stop}: {self.advice}"
            if deaths >= FAIL_FAST_DEATHS and dying >= hosts:
                return f"stages.{stage}: its actors died {deaths} times running its first rows, none made, on " \
                       f"{_count(dying)} (out of memory?); {stop}: {self.advice}"
        return None
