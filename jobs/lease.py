"""One invocation at a time on an output: a lease object in it, renewed while the invocation writes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid

from fsspec.implementations.local import LocalFileSystem

from jobs.spec import SpecError
from stages.output import modified_at
from stages.storage import join, reason, url_to_fs, write_atomic

LEASE = "_lease"  # <output>/_lease: {token, host, pids, pid, renewed_at} of the invocation writing the output
RENEW_S = 20.0  # the holder rewrites its lease this often ...
EXPIRES_S = 90.0  # ... and a lease not renewed for this long is a dead invocation's (another host's clock)
# A lease is created exclusively (S3's If-None-Match, a local O_EXCL): of two invocations that start together one
# creates it, the other is refused. Taking over a dead invocation's lease (delete, create) and stores without
# exclusive creation also read it back after this long, or 3 times the write's duration if that is longer.
SETTLE_S = 0.5

log = logging.getLogger(__name__)


class Lease:
    """The lease of one invocation on `output` (see held)."""

    def __init__(self, output: str, storage_options: dict | None, why: str = "two at once would make every row twice",
                 lost: str = "its manifest may hold rows twice: once that one ends, run with --overwrite"):
        self.output, self.why, self.lost_why = output, why, lost  # for the refusal, and for a lease lost
        self.fs, self.path = url_to_fs(join(output, LEASE), storage_options)
        self.token = uuid.uuid4().hex
        self.stopped = threading.Event()
        self.keeper: threading.Thread | None = None
        self.lost: dict | None = None  # the record found in place of ours at a renewal

    def read(self) -> dict | None:
        """The lease's record; None without one. A file that is not a record (a creation cut short) counts as
        renewed when it was last written: it expires like any other."""
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {"host": "?", "renewed_at": modified_at(self.fs.info(self.path))}

    def record(self) -> bytes:
        return json.dumps({"token": self.token, "host": socket.gethostname(), "pids": pid_namespace(),
                           "pid": os.getpid(), "renewed_at": time.time()}).encode()

    def renew(self) -> None:
        write_atomic(self.fs, self.path, self.record())

    def create(self) -> bool:
        """Write the lease where there is none; False on a store that cannot create exclusively (then written)."""
        if isinstance(self.fs, LocalFileSystem):  # fsspec's local "create" is exists-then-write: not exclusive
            self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
            with os.fdopen(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), "wb") as f:
                f.write(self.record())
            return True
        try:
            self.fs.pipe_file(self.path, self.record(), mode="create")
            return True
        except (TypeError, NotImplementedError):  # no `mode` on this store
            self.renew()
            return False

    def refuse_if_held(self) -> dict | None:
        """The lease's record where its invocation is gone (None without one); a one-line SpecError naming the
        invocation where it may still be writing."""
        other = self.read()
        if other is not None and alive(other):
            raise SpecError(busy(self.output, other, self.why))
        return other

    def take(self) -> None:
        """Hold the lease, or raise a one-line SpecError naming the invocation that holds it."""
        other = self.refuse_if_held()
        if other is not None and (self.read() or {}).get("token") == other.get("token"):
            self.fs.rm(self.path)  # a dead invocation's
        started = time.monotonic()
        try:
            exclusive = self.create()
        except FileExistsError:  # another invocation created it since it was read, or this one did: the store
            now = self.read() or {}  # saved the create but its answer was lost, and the retried create met it
            if now.get("token") != self.token:
                raise SpecError(busy(self.output, now, self.why)) from None
            exclusive = True
        if other is not None or not exclusive:  # another taker may have deleted and created in between
            time.sleep(max(SETTLE_S, 3 * (time.monotonic() - started)))
            now = self.read()
            if now is None or now.get("token") != self.token:
                raise SpecError(busy(self.output, now or {}, self.why))
        self.keeper = threading.Thread(target=self._keep, daemon=True, name="lease")
        self.keeper.start()

    def _keep(self) -> None:
        while not self.stopped.wait(RENEW_S):
            try:
                now = self.read()
                if now is not None and now.get("token") != self.token:  # taken while renewals failed
                    self.lost = now
                    log.error(taken(self.output, now, self.lost_why))
                    return
                self.renew()
            except Exception as err:  # noqa: BLE001 - a store blip: the next renewal may pass (expiry is 4 renewals)
                log.warning("output %s: lease not renewed (%s)", self.output, reason(err))

    def give_back(self) -> None:
        self.stopped.set()
        if self.keeper is not None:
            self.keeper.join()  # a renewal under way would write the lease again after it is deleted
        with contextlib.suppress(Exception):  # a lease left behind expires, or is seen to be this dead process's
            if (self.read() or {}).get("token") == self.token:
                self.fs.rm(self.path)


def alive(record: dict) -> bool:
    """Whether a lease belongs to an invocation that may still be writing: this host's process still running,
    else renewed within EXPIRES_S."""
    same_pids = record.get("pids", pid_namespace()) == pid_namespace()  # containers share hostnames, not pids
    if record.get("host") == socket.gethostname() and same_pids and isinstance(record.get("pid"), int):
        try:
            os.kill(record["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process: running
            pass
    return time.time() - float(record.get("renewed_at") or 0) < EXPIRES_S


def pid_namespace() -> int | None:
    """This process's pid namespace (containers on one host with one hostname each have their own), if known."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def busy(output: str, record: dict, why: str) -> str:
    """The one-line refusal for an output another invocation holds."""
    age = time.time() - float(record.get("renewed_at") or time.time())
    return (f"output {output} is being written by another invocation (host {record.get('host', '?')}, pid "
            f"{record.get('pid', '?')}, lease renewed {age:.0f} s ago): {why}; wait for "
            f"it to end (if it was killed on another host, its lease expires {EXPIRES_S:.0f} s after)")


def taken(output: str, record: dict, lost: str) -> str:
    """The one-line error of an invocation whose lease another one took (its renewals failed past EXPIRES_S)."""
    return (f"output {output}: another invocation (host {record.get('host', '?')}, pid {record.get('pid', '?')}) "
            f"took this invocation's lease after its renewals failed for {EXPIRES_S:.0f} s; both wrote the output, "
            f"so {lost}")


def refuse_if_held(output: str, storage_options: dict | None, **why) -> None:
    """The refusal `held` gives, early and read-only (before Ray starts): another invocation holds the output."""
    Lease(output, storage_options, **why).refuse_if_held()


@contextlib.contextmanager
def held(output: str, storage_options: dict | None, **why):
    """Hold the output's lease while the block runs (the block's writes are this invocation's alone)."""
    lease = Lease(output, storage_options, **why)
    try:
        lease.take()
    except SpecError:
        raise
    except Exception as err:  # noqa: BLE001 - permissions, a file in the way, a missing bucket: one line
        raise SpecError(f"output {output}: cannot write there ({reason(err)})") from None
    try:
        yield lease
    finally:
        lease.give_back()
    if lease.lost is not None:  # the block's writes may have mixed with another invocation's
        raise SpecError(taken(output, lease.lost, lease.lost_why))
