"""Ray Data's retry settings for a run (transient store failures, actor deaths) and the one-line error when a
store stays down."""

from __future__ import annotations

import contextlib
import errno
import re
import ssl

from jobs.spec import SpecError
from stages.storage import S3_PROTOCOLS, TRANSIENT_ERRORS, causes, reason, transient, unreachable

MAP_RETRIES = 3  # a task failing with a transient store error runs again up to this often (backoff ≤ 32 s)
ACTOR_INIT_DEATHS = 3  # consecutive stage actors that may die loading their models before the run fails
REFUSED_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)  # no retry fixes these


def configure_ray_data() -> None:
    """Retry tasks that fail on a transient store error (after botocore's own retries), and model loads."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.retried_map_errors = list(TRANSIENT_ERRORS)
    context.max_map_retries = MAP_RETRIES
    context.retried_io_errors = list(dict.fromkeys([*context.retried_io_errors, *TRANSIENT_ERRORS]))
    context.actor_init_retry_on_errors = True  # a model load that fails is tried again in the same actor …
    context.max_consecutive_actor_init_deaths = ACTOR_INIT_DEATHS  # … and a dead actor replaced, this often
    # Ray 2.60's datasource-v2 Parquet reader spends ~40 ms a file or row group here (1000 manifest parts or a
    # 1M-row prompt file of 1000 row groups: 30-60 s); the v1 reader takes 4-9 s on the same (bench-scale).
    context.use_datasource_v2 = False


def storage_failure(err: BaseException, output: str) -> str | None:
    """A one-line error for a run that ended on a store that stayed unreachable through every retry, or on an error
    no retry fixes (a full disk, a refused permission or credentials); None when `err` is something else."""
    if not transient(err):
        if (refused := refused_for_good(err)) is None:
            return None
        return (f"output {output}: stopped on an error no retry fixes ({refused}); the rows finished so far are "
                f"kept: fix it (space, permissions, credentials), then run the same command again")
    cause = next((e for e in causes(err) if any(p in f"{type(e).__name__}: {e}" for p in TRANSIENT_ERRORS)), err)
    return (f"output {output}: the object store stayed unreachable through every retry ({_last_line(cause)}); "
            f"the rows finished so far are kept: run the same command again to continue")


def refused_for_good(err: BaseException) -> str | None:
    """Why a read or write failed for good, where it did: a full disk or quota, a read-only or refused path (an
    OSError in this process, or its text in a Ray task's error), or a store's 403; else None. Asked only of
    errors that are not transient (an SSL error is an OSError of errno 1, EPERM: not this)."""
    for e in causes(err):
        if isinstance(e, ssl.SSLError):
            return None
        if isinstance(e, OSError) and e.errno in REFUSED_ERRNOS:
            return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
        text = f"{type(e).__name__}: {e}"
        found = re.search(r"\[Errno (\d+)\] ([^:\n]+)(?:: '([^'\n]+)')?", text)
        if found and int(found.group(1)) in REFUSED_ERRNOS:
            return f"{found.group(2)}: {found.group(3)}" if found.group(3) else found.group(2)
        if isinstance(e, PermissionError) and e.errno is None or "PermissionError: Access Denied" in text:
            return "the store refused a request (403: credentials expired, wrong, or without the permission)"
    return None


def _last_line(err: BaseException) -> str:
    """The exception's own message (the last line of a wrapped Ray error), one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    ours = [line for line in lines if any(p in line for p in TRANSIENT_ERRORS)]
    return (ours[-1] if ours else reason(err))[:300]


@contextlib.contextmanager
def storage_errors_named(output: str):
    """Turn a run that ended on an unreachable store into a one-line SpecError naming the output."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - only store failures are translated; the rest is re-raised
        message = storage_failure(err, output)
        if message is None:
            raise
        raise SpecError(message) from None


RUN_OPTIONS = "--storage-options (the run's own job.yaml is read through them)"  # report, evaluate, decode


def check_reachable(uris: dict[str, str | None], storage_options: dict | None,
                    given_in: str = "the storage options") -> None:
    """One quick request to each object store the command names (the first URI of each): a store that cannot be
    connected to (a mistyped endpoint_url, a store not started) is one line in seconds, before anything else;
    `given_in`: where the user gives the options (a run's own job.yaml is read through them)."""
    probed = set()
    for name, uri in uris.items():
        protocol = (uri or "").split("://")[0]
        if protocol not in S3_PROTOCOLS or protocol in probed:
            continue
        probed.add(protocol)
        if (why := unreachable(uri, storage_options)) is not None:
            raise SpecError(f"{name} {uri}: cannot connect to the object store ({why}); check the endpoint_url in "
                            f"{given_in} (client_kwargs) and that the store is up")


@contextlib.contextmanager
def run_folder_read(command: str, run: str):
    """A run folder that cannot be read (a store not reached, refused credentials) is one line naming it."""
    try:
        yield
    except SpecError:
        raise
    except Exception as err:  # noqa: BLE001 - only reads of the run folder happen inside
        raise SpecError(f"{command}: cannot read {run} ({reason(err)}); an object store's endpoint and credentials "
                        f"come from --storage-options or the environment") from None
