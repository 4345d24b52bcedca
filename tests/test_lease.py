"""One invocation at a time on an output: a second one is refused in one line before it writes anything."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import write_prompts

from jobs import lease
from jobs.preflight import generate_job
from jobs.spec import SpecError, spec_from_dict
from stages import columns as C


def spec_at(tmp_path, **extra):
    prompts = write_prompts(tmp_path / "p.parquet", [{C.PROMPT: "a"}, {C.PROMPT: "b"}])
    return spec_from_dict({"prompts": prompts, "output": str(tmp_path / "out"),
                           "generation": {"height": 128, "width": 128, "prior_steps": 2, "decoder_steps": 2}, **extra})


def write_lease(tmp_path, **record):
    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / lease.LEASE).write_text(json.dumps({"token": "other", **record}))


def within(seconds: float, condition) -> bool:
    """Whether `condition()` holds within `seconds` (polled)."""
    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_an_output_being_written_is_refused_before_any_write(tmp_path, monkeypatch):
    """Two runs at once on one output (a job submitted twice) would each make every row: the manifest would hold
    each row twice, for good. Refused before Ray is joined (on a cluster scaled to zero, a wait for its GPUs)."""
    import jobs.passes

    def connect(*args):
        raise AssertionError("joined Ray before refusing")

    spec = spec_at(tmp_path)
    monkeypatch.setattr(jobs.passes, "connect", connect)
    with lease.held(spec.output, {}):  # another invocation, in this (running) process
        with pytest.raises(SpecError, match=r"^output .* is being written by another invocation \(host "):
            generate_job(spec)
        with pytest.raises(SpecError, match="being written by another invocation"):
            generate_job(spec, overwrite=True)
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [lease.LEASE]  # no job.yaml: untouched
    assert not (tmp_path / "out" / lease.LEASE).exists()  # given back


def test_the_lease_of_an_invocation_that_died_is_taken_over(tmp_path):
    """A killed run's lease does not block its resume: this host's dead process at once, another host's once
    it has not been renewed for EXPIRES_S."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    spec = spec_at(tmp_path)
    write_lease(tmp_path, host=socket.gethostname(), pid=int(dead.stdout), renewed_at=time.time())
    with lease.held(spec.output, {}):
        pass
    write_lease(tmp_path, host="elsewhere", pid=1, renewed_at=time.time() - lease.EXPIRES_S - 1)
    with lease.held(spec.output, {}):
        pass
    (tmp_path / "out" / lease.LEASE).write_text("")  # a creation cut short, long ago: expired
    os.utime(tmp_path / "out" / lease.LEASE, (time.time() - lease.EXPIRES_S - 1,) * 2)
    with lease.held(spec.output, {}):
        pass
    write_lease(tmp_path, host="elsewhere", pid=1, renewed_at=time.time() - 5)
    with pytest.raises(SpecError, match=r"host elsewhere, pid 1, lease renewed \d+ s ago"):
        with lease.held(spec.output, {}):
            pass
    write_lease(tmp_path, host="elsewhere", pid=1, renewed_at=time.time() - lease.EXPIRES_S + 5)  # missed renewals
    with pytest.raises(SpecError, match="being written by another invocation"):
        with lease.held(spec.output, {}):
            pass


def test_a_lease_from_another_container_on_this_host_is_not_judged_by_its_pid(tmp_path):
    """Containers share a hostname, not pids: a pid not running here may run in the lease's own pid namespace,
    so a lease renewed just now from there still refuses a second invocation."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_lease(tmp_path, host=socket.gethostname(), pids=(lease.pid_namespace() or 0) + 1, pid=int(dead.stdout),
                renewed_at=time.time())
    with pytest.raises(SpecError, match="being written by another invocation"):
        with lease.held(str(tmp_path / "out"), {}):
            pass


def test_of_two_invocations_starting_together_one_goes_on(tmp_path, monkeypatch):
    """Both find no lease and create theirs: the store lets one create it (exclusively), the other stops."""
    seen, outcomes, first = threading.Barrier(2), [], set()
    read = lease.Lease.read

    def read_together(self):  # both read "no lease" before either writes
        record = read(self)
        if self.token not in first:
            first.add(self.token)
            seen.wait(timeout=10)
        return record
    monkeypatch.setattr(lease.Lease, "read", read_together)

    refused = threading.Event()

    def start():
        try:
            with lease.held(str(tmp_path / "out"), {}):
                outcomes.append("held")
                refused.wait(timeout=10)  # held until the other has tried, however slow its thread
        except SpecError as err:
            outcomes.append(str(err))
            refused.set()
    threads = [threading.Thread(target=start) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes, key=len)[0] == "held" and "another invocation" in sorted(outcomes, key=len)[1], outcomes


def test_of_two_invocations_taking_over_a_dead_lease_together_one_goes_on(tmp_path, monkeypatch):
    """Both find another host's expired lease; one deletes it and creates its own, the other (which saw the dead
    lease too) deletes that and creates its own: the settle re-read leaves one holding it, the other refused."""
    monkeypatch.setattr(lease, "SETTLE_S", 2.0)  # the second's delete and create land within it
    write_lease(tmp_path, host="elsewhere", pid=1, renewed_at=time.time() - lease.EXPIRES_S - 1)
    both_read, created, reads = threading.Barrier(2), threading.Event(), {}
    read, create = lease.Lease.read, lease.Lease.create

    def read_in_order(self):  # both see the dead lease twice; "late" deletes only once "early" has created
        record = read(self)
        reads[self.token] = reads.get(self.token, 0) + 1
        if reads[self.token] == 2:
            both_read.wait(timeout=10)
            if threading.current_thread().name == "late":
                created.wait(timeout=10)
        return record

    def create_and_say(self):
        made = create(self)
        created.set()
        return made
    monkeypatch.setattr(lease.Lease, "read", read_in_order)
    monkeypatch.setattr(lease.Lease, "create", create_and_say)
    outcomes, tried = [], threading.Barrier(2)

    def start():
        try:
            with lease.held(str(tmp_path / "out"), {}):
                outcomes.append("held")
                tried.wait(timeout=10)  # held until the other has tried
        except SpecError as err:
            outcomes.append(str(err))
            tried.wait(timeout=10)
    threads = [threading.Thread(target=start, name=name) for name in ("early", "late")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("held") == 1, outcomes
    assert any("another invocation" in outcome for outcome in outcomes), outcomes


def test_a_renewal_under_way_does_not_outlive_the_lease(tmp_path, monkeypatch):
    """The lease is given back after its last renewal ends: not written again after it is deleted."""
    monkeypatch.setattr(lease, "RENEW_S", 0.05)
    renew = lease.Lease.renew
    monkeypatch.setattr(lease.Lease, "renew", lambda self: (time.sleep(0.3), renew(self)))
    with lease.held(str(tmp_path / "out"), {}):
        time.sleep(0.1)  # a renewal is under way
    time.sleep(0.5)
    assert not (tmp_path / "out" / lease.LEASE).exists()


def test_an_invocation_whose_lease_was_taken_ends_in_an_error(tmp_path, monkeypatch):
    """Renewals failed past the expiry and another invocation took the output: both wrote it, which is said."""
    monkeypatch.setattr(lease, "RENEW_S", 0.05)
    with pytest.raises(SpecError, match=r"^output .*: another invocation \(host elsewhere, pid 7\) took this "
                                        r"invocation's lease .* may hold rows twice"):
        with lease.held(str(tmp_path / "out"), {}) as held:
            write_lease(tmp_path, host="elsewhere", pid=7, renewed_at=time.time())
            within(10, lambda: held.lost is not None)  # the next renewal finds it (a loaded machine: later)
    assert json.loads((tmp_path / "out" / lease.LEASE).read_text())["token"] == "other"  # the other's: kept


def test_a_lease_is_renewed_while_held(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "RENEW_S", 0.05)
    with lease.held(str(tmp_path / "out"), {}):
        first = json.loads((tmp_path / "out" / lease.LEASE).read_text())["renewed_at"]
        assert within(10, lambda: json.loads((tmp_path / "out" / lease.LEASE).read_text())["renewed_at"] > first)


def test_overwrite_keeps_the_lease_while_it_deletes(tmp_path):
    """--overwrite deletes the old run under its own lease: another invocation starting meanwhile is refused."""
    from jobs.resume import check_continuation

    spec = spec_at(tmp_path)
    (tmp_path / "out" / "images" / "ab").mkdir(parents=True)
    (tmp_path / "out" / "images" / "ab" / "ab1.png").write_bytes(b"x")
    (tmp_path / "out" / "job.yaml").write_text("prompts: x\n")
    with lease.held(spec.output, {}):
        check_continuation(spec, overwrite=True)
        assert [p.name for p in (tmp_path / "out").iterdir()] == [lease.LEASE]
        with pytest.raises(SpecError, match="being written by another invocation"):
            generate_job(spec)


def test_the_lease_on_an_object_store(s3_server):
    """On S3 the lease is created exclusively (If-None-Match): a second invocation is refused, a dead one's
    lease (another host, expired) is taken over, and the lease is gone once given back."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("leases")
    out = "s3://leases/run"
    with lease.held(out, s3_server):
        with pytest.raises(SpecError, match="being written by another invocation"):
            with lease.held(out, s3_server):
                pass
    fs.invalidate_cache()
    assert not fs.exists("leases/run/_lease")
    fs.pipe("leases/run/_lease", json.dumps({"token": "t", "host": "elsewhere", "pid": 1,
                                             "renewed_at": time.time() - lease.EXPIRES_S - 1}).encode())
    with lease.held(out, s3_server) as taken:
        assert json.loads(fs.cat("leases/run/_lease"))["token"] == taken.token


def test_a_lease_is_created_exclusively(tmp_path, s3_server, monkeypatch):
    """Two invocations that both found no lease: the store lets only the first create it (on S3, the store itself
    refuses the second PUT; locally O_EXCL: fsspec's own local "create" checks, then writes, which the
    threaded test above catches about one time in eight)."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    if not fs.exists("leases"):
        fs.mkdir("leases")
    monkeypatch.setattr(lease.Lease, "read", lambda self: None)  # each finds no lease
    for out, options in ((str(tmp_path / "out"), {}), ("s3://leases/exclusive", s3_server)):
        with lease.held(out, options):
            with pytest.raises(SpecError, match="being written by another invocation"):
                with lease.held(out, options):
                    pass


def test_a_create_whose_answer_was_lost_holds_the_lease(s3_server, monkeypatch):
    """The store saved the lease but its answer was lost, and the client's retried create met the lease: this
    invocation's own, so it goes on (it was refused as "written by another invocation": itself)."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    if not fs.exists("leases"):
        fs.mkdir("leases")
    create = lease.Lease.create

    def saved_then_refused(self):
        create(self)
        raise FileExistsError(self.path)  # what the retried PUT's 412 becomes
    monkeypatch.setattr(lease.Lease, "create", saved_then_refused)
    with lease.held("s3://leases/lost-answer", s3_server) as taken:
        fs.invalidate_cache()
        assert json.loads(fs.cat("leases/lost-answer/_lease"))["token"] == taken.token
    with pytest.raises(SpecError, match="being written by another invocation"):  # another's lease: still refused
        fs.pipe("leases/lost-answer/_lease", json.dumps({"token": "t", "host": socket.gethostname(), "pid": os.getpid(),
                                                         "renewed_at": time.time()}).encode())
        with lease.held("s3://leases/lost-answer", s3_server):
            pass
