"""Fault injection: a flaky object store, a killed actor, a poison row, a kill between a shard and its entry;
after each, every row is in the manifest exactly once."""

import faulthandler
import io
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
import webdataset as wds
from conftest import make_batch, write_prompts
from faults import FlakyProxy
from PIL import Image

from jobs.generate import run
from jobs.isolation import MAX_DEATHS, isolating
from jobs.passes import stage_pool
from jobs.placement import placement
from jobs.progress import Tally
from jobs.spec import SpecError, spec_from_dict
from jobs.watch import PassWatch
from stages import columns as C
from stages import output
from stages.decoder import DecoderStage
from stages.prior import PriorStage
from stages.storage import transient, url_to_fs
from stages.text import TextEncoder

SMALL = {"height": 128, "width": 128, "prior_steps": 2, "decoder_steps": 2}


def small_job(prompts: str, output: str, **extra) -> dict:
    return {"prompts": prompts, "output": output, "generation": SMALL,
            "stages": {name: {"batch_size": 4} for name in ("text", "prior", "decoder")}, **extra}


def once_each(rows: list[dict], n: int) -> None:
    ids = [r[C.ROW_ID] for r in rows]
    assert len(ids) == n and len(set(ids)) == n, f"{len(ids)} entries, {len(set(ids))} distinct, {n} rows"


@pytest.fixture
def flaky(s3_server):
    """A proxy in front of the S3 server, its storage options, and a client that bypasses it."""
    port = int(s3_server["client_kwargs"]["endpoint_url"].rsplit(":", 1)[1])
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request lines
    proxy = FlakyProxy(port)
    options = {**s3_server, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{proxy.port}"}}
    direct = s3fs.S3FileSystem(**s3_server)
    if not direct.exists("faults"):
        direct.mkdir("faults")
    yield proxy, options, direct
    proxy.close()


def when_rows_land(fs, folder: str, action, timeout: float = 300) -> threading.Thread:
    """Run `action` in the background once the first manifest part appears under `folder`."""
    def watch():
        deadline = time.time() + timeout
        while time.time() < deadline:
            fs.invalidate_cache()
            if fs.exists(folder) and fs.ls(folder):
                return action()
            time.sleep(0.1)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


OUTAGE_S = float(os.environ.get("WUERSTCHEN_TEST_OUTAGE", 10))  # seconds; 10 and 60 ride out (1-4 min a run)
HANG_S = 600  # far beyond a ridden-out outage: a hang ends the test process with every thread's stack


def test_object_store_outage_mid_run_loses_no_row(tmp_path, ray_cluster, flaky):
    proxy, options, direct = flaky
    prompts = write_prompts(tmp_path / "p.parquet", [{C.PROMPT: f"p{i}", C.SEED: i} for i in range(40)])
    spec = spec_from_dict({**small_job(prompts, "s3://faults/outage"), "storage_options": options})

    began = []

    def outages():
        began.append(time.time())
        proxy.outage(OUTAGE_S)  # refused and reset connections (WUERSTCHEN_TEST_OUTAGE=60: for a minute) …
        time.sleep(OUTAGE_S + 0.5)
        proxy.slow_down(3)  # … then 503 SlowDown
    watcher = when_rows_land(direct, "faults/outage/manifest", outages)
    faulthandler.dump_traceback_later(HANG_S + 8 * OUTAGE_S, exit=True)  # a hang fails CI with stacks, not idles it
    try:
        summary = run(spec)
        ended = time.time()
    finally:
        faulthandler.cancel_dump_traceback_later()
    watcher.join()
    assert summary.rows == 40 and summary.failed == 0
    assert began and began[0] < ended - OUTAGE_S, (began, ended)  # the outage came mid-run, and the run outlived it
    direct.invalidate_cache()
    rows = pq.read_table("faults/outage/manifest", filesystem=direct).to_pylist()
    once_each(rows, 40)
    for row in rows:  # every image whole
        assert Image.open(io.BytesIO(direct.cat_file(row[C.IMAGE_URI]))).size == (128, 128)


def test_store_down_for_good_ends_in_one_line_naming_the_output(tmp_path, ray_cluster, flaky):
    proxy, options, direct = flaky
    prompts = write_prompts(tmp_path / "p.parquet", [{C.PROMPT: f"p{i}", C.SEED: i} for i in range(12)])
    quick = {**options, "config_kwargs": {"retries": {"total_max_attempts": 2}}}  # the job's own value wins
    spec = spec_from_dict({**small_job(prompts, "s3://faults/down"), "storage_options": quick})
    watcher = when_rows_land(direct, "faults/down/manifest", lambda: proxy.outage(300))
    started = time.time()
    with pytest.raises(SpecError) as err:
        run(spec)
    watcher.join()
    message = str(err.value)
    assert message.startswith("output s3://faults/down: the object store stayed unreachable") and "\n" not in message
    assert "Could not connect to the endpoint URL" in message and time.time() - started < 240


def test_a_store_that_stops_answering_mid_request_ends_the_write_in_bounded_time():
    """A store that takes a PUT's connection and never answers (a connection dropped without a reset, as the
    flaky proxy sometimes leaves one): the write ends in the store's read timeout, which Ray retries, instead of
    waiting forever for the store's `100 Continue` (aiohttp arms no timeout for it)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(silent.accept()) for _ in range(64)], daemon=True).start()
    options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{silent.getsockname()[1]}"},
               "config_kwargs": {"read_timeout": 1, "retries": {"total_max_attempts": 1}}}
    fs, _ = url_to_fs("s3://silent/x.png", options)
    outcome = []

    def put():
        try:
            fs.pipe_file("silent/x.png", b"png" * 1000)
        except Exception as err:  # noqa: BLE001 - the outcome is asserted below
            outcome.append(err)
    writer = threading.Thread(target=put, daemon=True)
    writer.start()
    writer.join(60)
    assert not writer.is_alive(), "the write still waits on a store that never answers"
    assert held and outcome and transient(outcome[0]), outcome


def stage_processes(name: str) -> list[int]:
    """Pids of this test's own Ray actor processes running stage class `name` (Ray titles them by their class):
    descendants of this process only, never another Ray's on the machine."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and name in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return [pid for pid in pids if pid != os.getpid() and _descends_from(pid, os.getpid())]


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # the parent's pid
        except (OSError, ValueError, IndexError):
            return False
        if pid == ancestor:
            return True
    return False


def test_actor_killed_by_pid_mid_run_loses_and_doubles_no_row(tmp_path, ray_cluster):
    prompts = write_prompts(tmp_path / "p.parquet", [{C.PROMPT: f"p{i}", C.SEED: i} for i in range(24)])
    spec = spec_from_dict(small_job(prompts, str(tmp_path / "out")))
    killed = []

    def kill():
        for pid in stage_processes("DecoderStage"):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    watcher = when_rows_land(_Local(), str(tmp_path / "out" / "manifest"), kill)
    summary = run(spec)
    watcher.join()
    assert killed, "no Stage B/A actor process was found to kill"
    assert summary.rows == 24 and summary.failed == 0
    once_each(pq.read_table(tmp_path / "out" / "manifest").to_pylist(), 24)


class _Local:
    """The two calls `when_rows_land` makes, on the local disk."""

    def invalidate_cache(self):
        pass

    def exists(self, path):
        return Path(path).exists()

    def ls(self, path):
        return [p for p in Path(path).iterdir() if p.suffix == ".parquet"]


def test_a_failing_row_gets_an_error_and_its_batch_mates_the_same_bits(model_cache):
    stages = [isolating(cls)(*args) for cls, args in ((TextEncoder, ("tiny", "tiny")), (PriorStage, ("tiny",)),
                                                      (DecoderStage, ("tiny",)))]
    rows = [{C.PROMPT: f"a row {i}", C.SEED: i} for i in range(5)]

    def make(batch):
        for stage in stages:
            batch = stage(batch)
        return batch
    clean = make(make_batch(rows))
    poisoned = make(make_batch(rows[:2] + [{C.PROMPT: "poison", C.DECODER_STEPS: -2}] + rows[2:]))
    assert list(poisoned[C.ERROR][:2]) + list(poisoned[C.ERROR][3:]) == [""] * 5
    assert poisoned[C.ERROR][2].startswith("DecoderStage: RuntimeError")
    for k, i in enumerate([0, 1, 3, 4, 5]):
        assert np.array_equal(poisoned[C.IMAGE][i], clean[C.IMAGE][k])  # not changed by the failed row


def test_a_stage_whose_first_rows_all_fail_stops_the_run_in_one_line(tmp_path, ray_cluster, model_cache,
                                                                     monkeypatch, capsys):
    """A broken checkpoint (a NaN in the VQGAN's weights) fails every row: the run stops after the first
    FAIL_FAST_ROWS, naming the stage and the error, instead of failing the whole table row by row. A retry of
    failed rows is not stopped: its rows failed before, and it says how many failed again."""
    import shutil

    import torch
    import yaml
    from safetensors.torch import load_file, save_file

    from jobs import isolation
    from jobs.cli import main

    monkeypatch.setattr(isolation, "FAIL_FAST_ROWS", 8)
    monkeypatch.setattr(PassWatch, "poll_s", 0.2)
    shutil.copytree(model_cache / "decoder", tmp_path / "broken")
    weights = tmp_path / "broken" / "vqgan" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["out_block.0.weight"] = torch.full_like(tensors["out_block.0.weight"], float("nan"))  # decoding's last
    save_file(tensors, weights)
    rows = 160
    prompts = write_prompts(tmp_path / "p.parquet", [{C.PROMPT: f"p{i}", C.SEED: i} for i in range(rows)])
    model = {"prior": str(model_cache / "prior"), "decoder": str(tmp_path / "broken")}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(small_job(prompts, str(tmp_path / "out"), model=model)))
    assert main(["generate", str(tmp_path / "job.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(r"error: stages\.decoder: its first \d+ rows all failed, none made, on 1 node \(first: Stage "
                    r"B/A produced NaN or inf.*\); the run stopped rather than fail every row: the rows written so far "
                    r"are kept: .* --retry-failed", err), err
    manifest = tmp_path / "out" / "manifest"  # none yet where the stop came before the first write
    entries = pq.read_table(manifest).to_pylist() if any(manifest.glob("*.parquet")) else []
    assert len(entries) < rows and all(e[C.ERROR] for e in entries)  # stopped early; what was written is kept
    once_each(entries, len(entries))

    assert main(["generate", str(tmp_path / "job.yaml"), "--retry-failed"]) == 1  # its rows fail again: not stopped
    assert "none made" not in capsys.readouterr().err


def test_failures_on_one_node_of_several_do_not_stop_the_run(ray_cluster):
    """A broken GPU on one node: the stage's actors on other nodes make its rows, so its failures alone never stop
    the run; failures on every node hosting an actor, none made, do; one row made (before a Tally restart too)
    means the stage works."""
    from jobs import isolation

    tally = Tally.remote()
    watch = isolation.FailureWatch(tally, "advice")
    for node in ("node-a", "node-b"):
        ray_cluster.get(tally.loaded.remote("decoder", node))
    ray_cluster.get(tally.outcome.remote("decoder", 0, 100, "boom", "node-a"))
    assert watch.check() is None
    ray_cluster.get(tally.outcome.remote("decoder", 0, 10, "bang", "node-b"))
    assert watch.check() == ("stages.decoder: its first 110 rows all failed, none made, on 2 nodes (first: boom); "
                             "the run stopped rather than fail every row: advice")
    ray_cluster.get(tally.outcome.remote("decoder", 1, 0, None, "node-c"))
    assert watch.check() is None
    restarted = Tally.remote()  # its counts start again
    watch.tally = restarted
    ray_cluster.get(restarted.outcome.remote("decoder", 0, 100, "boom", "node-a"))
    assert watch.check() is None


def test_a_stage_whose_actors_keep_dying_stops_before_its_rows_are_tried_one_by_one(ray_cluster):
    """Every row kills its actor (an OOM at any batch size): each costs MAX_DEATHS restarts, each a model load, so
    the run stops after FAIL_FAST_DEATHS deaths with none made, on every node hosting the stage (a death counts
    where the try that died ran, not where it is tried again); a node dying beside a working one does not."""
    from jobs import isolation

    tally = Tally.remote()
    watch = isolation.FailureWatch(tally, "advice")
    for node in ("node-a", "node-b"):
        ray_cluster.get(tally.loaded.remote("decoder", node))
    for n in range(isolation.FAIL_FAST_DEATHS + 1):  # row r0 dies on node-a each time; tried again on node-b
        ray_cluster.get(tally.begin.remote("decoder", ["r0", "r1"], "node-a" if n < isolation.FAIL_FAST_DEATHS
                                           else "node-b"))
    assert watch.check() is None  # node-b has not failed yet
    ray_cluster.get(tally.begin.remote("decoder", ["r0", "r1"], "node-a"))  # the try on node-b died too
    assert watch.check() == (f"stages.decoder: its actors died {isolation.FAIL_FAST_DEATHS + 1} times running its "
                             "first rows, none made, on 2 nodes (out of memory?); the run stopped rather than fail "
                             "every row: advice")
    ray_cluster.get(tally.end.remote("decoder", ["r0", "r1"]))
    ray_cluster.get(tally.begin.remote("decoder", ["r0", "r1"], "node-a"))  # ended, then tried anew: no death
    assert ray_cluster.get(tally.stage_outcomes.remote())["decoder"][5] == isolation.FAIL_FAST_DEATHS + 1
    ray_cluster.get(tally.outcome.remote("decoder", 1, 0, None, "node-a"))
    assert watch.check() is None  # the stage works

    mixed = Tally.remote()  # one node fails rows, the other's actor died once: neither rule holds on both nodes
    watch = isolation.FailureWatch(mixed, "advice")
    for node in ("node-a", "node-b"):
        ray_cluster.get(mixed.loaded.remote("decoder", node))
    ray_cluster.get(mixed.outcome.remote("decoder", 0, isolation.FAIL_FAST_ROWS, "boom", "node-a"))
    for node in ("node-b", "node-a"):
        ray_cluster.get(mixed.begin.remote("decoder", ["r0"], node))  # r0's actor died on node-b
    assert watch.check() is None
    for _ in range(isolation.FAIL_FAST_DEATHS):
        ray_cluster.get(mixed.begin.remote("decoder", ["r0"], "node-a"))  # … then again and again on node-a
    assert watch.check() is not None and "actors died" in watch.check()  # deaths on both nodes now


def test_poison_row_in_a_resumed_run_is_isolated(tmp_path, ray_cluster):
    prompts = write_prompts(tmp_path / "p.parquet", [{C.PROMPT: f"p{i}", C.SEED: i} for i in range(6)])
    spec = spec_from_dict(small_job(prompts, str(tmp_path / "out")))
    run(spec)
    out = tmp_path / "out"
    first = {r[C.ROW_ID]: Path(r[C.IMAGE_URI]).read_bytes() for r in pq.read_table(out / "manifest").to_pylist()}
    for part in (out / "manifest").glob("*.parquet"):
        part.unlink()  # as if killed after Stage C: the rerun decodes the stored embeddings
    (out / output.EMBEDDINGS / output.CLOSED).unlink()  # a killed pass never marks its end
    part = sorted((out / "embeddings").glob("*.parquet"))[0]
    table = pq.read_table(part)
    rows = table.to_pylist()
    poison = rows[0][C.ROW_ID]
    rows[0][C.IMAGE_EMBEDDINGS] = rows[0][C.IMAGE_EMBEDDINGS][9:]  # a stored row with 15 channels, not 16
    rows[0][C.EMBEDDING_SHAPE] = [15] + rows[0][C.EMBEDDING_SHAPE][1:]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), part)

    summary = run(spec)
    manifest = pq.read_table(out / "manifest").to_pylist()
    once_each(manifest, 6)
    assert summary.failed == 1
    assert (summary.new, summary.made) == (6, 5) and "5 made, 1 failed in" in str(summary)  # a failure is not made
    for row in manifest:
        if row[C.ROW_ID] == poison:
            assert row[C.ERROR].startswith("decoder: ") and row[C.IMAGE_URI] is None
        else:
            assert row[C.ERROR] is None and Path(row[C.IMAGE_URI]).read_bytes() == first[row[C.ROW_ID]]


def test_shard_written_before_a_kill_is_not_left_beside_its_rewrite(tmp_path, ray_cluster):
    prompts = write_prompts(tmp_path / "p.parquet", [{C.PROMPT: f"p{i}", C.SEED: i} for i in range(7)])
    job = {**small_job(prompts, str(tmp_path / "out")), "output_format": "webdataset", "shard_size": 3}
    run(spec_from_dict(job))
    out = tmp_path / "out"
    parts = sorted((out / "manifest").glob("*.parquet"))
    kept = pq.read_table(parts[1:]).column(C.SHARD).to_pylist() if len(parts) > 1 else []
    parts[0].unlink()  # killed after a shard was written, before its manifest entries
    (out / output.EMBEDDINGS / output.CLOSED).unlink()  # a killed pass never marks its end
    (out / "shards" / ".leftover.tar.tmp-0123").write_bytes(b"partial")  # and a temporary file left behind
    (out / "manifest" / ".leftover.parquet.tmp-0123").write_bytes(b"partial")
    summary = run(spec_from_dict({**job, "shard_size": 2}))  # the rows regrouped: other shard names
    assert summary.rows == 7
    manifest = pq.read_table(out / "manifest").to_pylist()
    once_each(manifest, 7)
    keys = [s["__key__"] for s in wds.WebDataset(sorted(map(str, (out / "shards").glob("*"))), shardshuffle=False)]
    assert sorted(keys) == sorted(r[C.ROW_ID] for r in manifest)  # each sample once, in a shard the manifest names
    assert {str(p) for p in (out / "shards").iterdir()} == {r[C.SHARD] for r in manifest}
    assert {p.stem for p in (out / output.SHARD_STATS).iterdir()} == {p.stem for p in (out / "shards").iterdir()}
    assert set(kept) <= {r[C.SHARD] for r in manifest}  # the shards of rows with entries stay as they were


def test_actor_pools_use_the_current_ray_api_without_deprecation_warnings(tmp_path, ray_cluster):
    prompts = write_prompts(tmp_path / "p.parquet", [{C.PROMPT: "p"}])
    spec = spec_from_dict({**small_job(prompts, str(tmp_path / "out")), "stages": {"decoder": {"concurrency": [1, 2]}}})
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("ray.data").addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*concurrency.*")
            ds = ray_cluster.data.range(1)
            for cls, name in ((TextEncoder, "text"), (PriorStage, "prior"), (DecoderStage, "decoder")):
                ds = stage_pool(ds, spec, cls, name, None, 1)  # the plan only: no model is loaded
    finally:
        logging.getLogger("ray.data").removeHandler(handler)
    assert not [r.getMessage() for r in records if "concurrency" in r.getMessage()]
    args = placement(spec.stages.decoder, "decoder", 0)
    assert "concurrency" not in args and (args["compute"].min_size, args["compute"].max_size) == (1, 2)


class DiesOnOom:
    """A stage whose actor process dies (as an out-of-memory kill ends it) whenever it runs the row 'oom'."""

    def __call__(self, batch):
        if "oom" in list(batch[C.PROMPT]):
            os._exit(1)
        return {**batch, "made": np.full(len(batch[C.ROW_ID]), os.getpid())}

    def blank(self) -> dict:
        return {"made": 0}


def test_a_row_that_kills_its_actor_every_time_fails_after_bounded_tries(ray_cluster):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    tally = Tally.remote()
    rows = [{C.ROW_ID: f"r{i}", C.PROMPT: "oom" if i == 5 else f"p{i}", C.ERROR: ""} for i in range(8)]
    ds = ray_cluster.data.from_items(rows, override_num_blocks=2).map_batches(
        isolating(DiesOnOom, tally, "decoder"), batch_size=4, batch_format="numpy",
        compute=ray_cluster.data.ActorPoolStrategy(size=1), num_cpus=0.5)
    out = {r[C.ROW_ID]: r for r in ds.take_all()}  # ends: no livelock on the row that always dies
    once_each(list(out.values()), 8)
    assert out["r5"][C.ERROR] == f"decoder: the stage's actor died {MAX_DEATHS} times running this row alone " \
                                 "(out of memory?)"
    assert all(not out[f"r{i}"][C.ERROR] and out[f"r{i}"]["made"] for i in range(8) if i != 5)
    # the deaths the run's FailureWatch counts: r5's batch once, then r5 alone MAX_DEATHS times
    assert ray_cluster.get(tally.stage_outcomes.remote())["decoder"][5] == 1 + MAX_DEATHS


def truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # what a crash between a local write and its disk can leave


def test_a_part_cut_short_is_one_line_naming_it(tmp_path, ray_cluster, capsys, monkeypatch):
    """A manifest part whose footer is gone (counted from footers on the driver) and an embeddings part read by
    Ray Data: each is one line naming the part and the way on (a 47-line ArrowInvalid traceback before)."""
    from jobs import cli
    from jobs.report_data import read_view
    from stages import footers

    folder = tmp_path / "out" / output.MANIFEST
    folder.mkdir(parents=True)
    for name in ("a", "b"):
        pq.write_table(pa.table({C.ROW_ID: [f"{name}1", f"{name}2"], C.ERROR: pa.nulls(2, pa.string())}),
                       folder / f"{name}.parquet")
    truncated(folder / "b.parquet")
    for count in (lambda: footers.part_counts(str(tmp_path / "out"), output.MANIFEST, {}, nulls_of=C.ERROR),
                  lambda: read_view(str(tmp_path / "out"), {}, [])):  # report's passes: an ArrowInvalid traceback
        with pytest.raises(output.UnreadablePart, match=rf"^{folder / 'b.parquet'}: not a readable Parquet part"):
            count()
    with pytest.raises(Exception) as err:  # the same part read by Ray Data (as in-flight embeddings are)
        output.read_parts(str(tmp_path / "out"), output.MANIFEST, {}).take_all()
    assert str(output.unreadable_part(err.value)).startswith(f"{folder / 'b.parquet'}: not a readable Parquet part")

    def failing(args):
        raise err.value
    monkeypatch.setattr(cli, "_dispatch", failing)
    assert cli.main(["report", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and message.startswith(f"error: {folder / 'b.parquet'}: not a readable Parquet")
    assert message.endswith("delete it and run the job again: its rows are made again")


def test_a_table_put_in_a_run_folder_by_hand_is_one_line_naming_it(tmp_path, ray_cluster):
    """A Parquet file without row ids in manifest/ (a prompt table copied there): generate failed on it after
    claiming the output (70 lines), report counted its rows as entries, evaluate said to rerun evaluate."""
    from jobs.report_data import read_view
    from stages import footers

    folder = tmp_path / "out" / output.MANIFEST
    folder.mkdir(parents=True)
    pq.write_table(pa.table({C.ROW_ID: ["a1"], C.ERROR: pa.nulls(1, pa.string())}), folder / "a.parquet")
    pq.write_table(pa.table({C.PROMPT: ["a fox", "a cat"]}), folder / "prompts.parquet")
    message = (rf"^{folder / 'prompts.parquet'}: not a part of this run \(row_id is not among its columns\); move it "
               rf"out of manifest/ and run the command again$")
    for count in (lambda: footers.manifest_counts(str(tmp_path / "out"), {}),
                  lambda: read_view(str(tmp_path / "out"), {}, [])):
        with pytest.raises(output.ForeignPart, match=message):
            count()
    with pytest.raises(Exception) as err:  # in a Ray task (a webdataset run's shard check): the same one line
        ray_cluster.get(ray_cluster.remote(footers.manifest_counts).remote(str(tmp_path / "out"), {}))
    assert re.match(message, str(output.unreadable_part(err.value)))


def test_an_error_no_retry_fixes_is_one_line_naming_why(ray_cluster):
    """A full disk or a refused permission inside a Ray write task (and a store's 403): one line naming the cause
    and the way on, where a 52- to 330-line Ray traceback ended the run; other errors are left as they are."""
    from jobs.retries import storage_failure

    def failing(err):
        @ray_cluster.remote(max_retries=0)
        def write():
            raise err
        with pytest.raises(Exception) as caught:
            ray_cluster.get(write.remote())
        return caught.value

    full = storage_failure(failing(OSError(28, "No space left on device", "/data/out/manifest/p.parquet")), "OUT")
    assert full == ("output OUT: stopped on an error no retry fixes (No space left on device: /data/out/manifest/"
                    "p.parquet); the rows finished so far are kept: fix it (space, permissions, credentials), then "
                    "run the same command again")
    assert "no retry fixes (Permission denied: /data/x)" in storage_failure(
        failing(PermissionError(13, "Permission denied", "/data/x")), "OUT")
    assert "refused a request (403" in storage_failure(failing(PermissionError("Access Denied")), "OUT")
    assert storage_failure(failing(ValueError("a bug")), "OUT") is None
    assert storage_failure(failing(OSError(5, "Input/output error")), "OUT") is None
    import ssl  # an SSL error is an OSError of errno 1 (EPERM): a blip, not a refusal
    blip = ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC] bad mac")
    assert storage_failure(failing(blip), "OUT") is None


def test_an_ssl_error_in_this_process_is_not_a_refusal():
    """An SSL error is an OSError of errno 1 (EPERM): a blip, not "an error no retry fixes", unwrapped too."""
    import ssl

    from jobs.retries import storage_failure

    assert storage_failure(ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC] bad mac"), "OUT") is None


def test_an_error_raised_while_handling_a_dropped_connection_is_transient():
    """A client's own error raised in its `except` of a connection reset (its __context__) is retried."""
    from jobs.retries import storage_failure

    try:
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except ConnectionResetError:
            raise RuntimeError("write failed")  # raised while handling it: its __context__
    except RuntimeError as err:
        during = err
    assert transient(during)
    assert "stayed unreachable through every retry" in storage_failure(during, "OUT")


def test_a_403_seen_only_in_a_wrapped_errors_text_is_a_refusal():
    """Ray's wrapped errors carry the store's 403 as text only: still "refused a request", not retried."""
    from jobs.retries import refused_for_good

    wrapped = RuntimeError("ray.exceptions.RayTaskError(PermissionError): ray::write()\nPermissionError: Access Denied")
    assert not transient(wrapped)
    assert refused_for_good(wrapped).startswith("the store refused a request (403")
