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

from jobs.spec import SpecError
from stages.storage import join, reason, url_to_fs, write_atomic

LEASE = "_lease"  # <output>/_lease: {token, host, pid, renewed_at} of the invocation writing the output
RENEW_S = 20.0  # the holder rewrites its lease this often ...
EXPIRES_S = 90.0  # ... and a lease not renewed for this long is a dead invocation's (another host's clock)
SETTLE_S = 0.5  # two invocations that start together both write a lease: after this, the last one written wins

log = logging.getLogger(__name__)


class Lease:
    """The lease of one invocation on `output` (see held)."""

    def __init__(self, output: str, storage_options: dict | None):
        self.output = output
        self.fs, self.path = url_to_fs(join(output, LEASE), storage_options)
        self.token = uuid.uuid4().hex
        self.stopped = threading.Event()

    def read(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # a torn or foreign file: nobody's lease
            return None

    def renew(self) -> None:
        record = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "renewed_at": time.time()}
        write_atomic(self.fs, self.path, json.dumps(record).encode())

    def take(self) -> None:
        """Hold the lease, or raise a one-line SpecError naming the invocation that holds it."""
        other = self.read()
        if other is not None and alive(other):
            raise SpecError(busy(self.output, other))
        self.renew()
        time.sleep(SETTLE_S)
        now = self.read()
        if now is None or now.get("token") != self.token:
            raise SpecError(busy(self.output, now or {}))
        threading.Thread(target=self._keep, daemon=True, name="lease").start()

    def _keep(self) -> None:
        while not self.stopped.wait(RENEW_S):
            try:
                self.renew()
            except Exception as err:  # noqa: BLE001 - a store blip: the next renewal may pass (expiry is 4 renewals)
                log.warning("output %s: lease not renewed (%s)", self.output, reason(err))

    def give_back(self) -> None:
        self.stopped.set()
        with contextlib.suppress(Exception):  # a lease left behind expires, or is seen to be this dead process's
            if (self.read() or {}).get("token") == self.token:
                self.fs.rm(self.path)


def alive(record: dict) -> bool:
    """Whether a lease belongs to an invocation that may still be writing: this host's process still running,
    else renewed within EXPIRES_S."""
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        try:
            os.kill(record["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process: running
            pass
    return time.time() - float(record.get("renewed_at") or 0) < EXPIRES_S


def busy(output: str, record: dict) -> str:
    """The one-line refusal for an output another invocation holds."""
    age = time.time() - float(record.get("renewed_at") or time.time())
    return (f"output {output} is being written by another invocation (host {record.get('host', '?')}, pid "
            f"{record.get('pid', '?')}, lease renewed {age:.0f} s ago): two at once would make every row twice; wait for "
            f"it to end (if it was killed on another host, its lease expires {EXPIRES_S:.0f} s after)")


@contextlib.contextmanager
def held(output: str, storage_options: dict | None):
    """Hold the output's lease while the block runs (the block's writes are this invocation's alone)."""
    lease = Lease(output, storage_options)
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
