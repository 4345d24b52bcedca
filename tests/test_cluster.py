"""A real multi-node Ray on this machine, joined via RAY_ADDRESS: each stage runs only on its own group's node;
a node whose disk is broken (no model can be cached there) is passed over while other nodes serve; a group whose
only node dies mid-run ends the run in one line."""

import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import write_prompts

from stages import columns as C

GROUPS = ("text", "prior", "decoder")


@pytest.fixture(scope="module")
def cluster(model_cache):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    nodes = {g: cluster.add_node(num_cpus=1, resources={f"{g}_group": 1}) for g in ("text", "prior")}
    nodes["decoder"] = cluster.add_node(num_cpus=1, resources={"decoder_group": 1, "serve": 1})
    # A node that cannot load any model: its model cache is not a folder (a full or broken disk).
    nodes["broken"] = cluster.add_node(num_cpus=1, resources={"serve": 1, "broken_group": 1},
                                       env_vars={"WUERSTCHEN_BATCH_CACHE": "/dev/null/cache"})
    cluster.wait_for_nodes()
    yield cluster.address, {g: node.node_id for g, node in nodes.items()}
    cluster.shutdown()


def submit(tmp_path, address, **job):
    """Run the job through the CLI on the cluster at `address` (None: without RAY_ADDRESS, as `ray start`'s cluster of
    this machine is found; ray.cluster_utils.Cluster leaves its address where `ray start` does)."""
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if address is not None:
        env["RAY_ADDRESS"] = address
    return subprocess.run([sys.executable, "-m", "jobs.cli", "generate", str(path)], env=env,
                          capture_output=True, text=True, timeout=600)


def base_job(tmp_path):
    rows = [{C.PROMPT: f"prompt {i}", C.SEED: i} for i in range(6)]
    return dict(prompts=write_prompts(tmp_path / "p.parquet", rows), output=str(tmp_path / "out"),
                generation={"height": 128, "width": 128, "prior_steps": 2, "decoder_steps": 2})


def test_each_stage_runs_only_on_its_group(cluster, tmp_path):
    address, node_ids = cluster
    stages = {g: {"batch_size": 2, "resources": {f"{g}_group": 0.5}} for g in GROUPS}
    result = submit(tmp_path, address, **base_job(tmp_path), stages=stages)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = pq.read_table(tmp_path / "out" / "manifest").to_pylist()
    assert len(manifest) == 6
    for row in manifest:
        assert (row[C.TEXT_NODE], row[C.PRIOR_NODE], row[C.DECODER_NODE]) == \
            (node_ids["text"], node_ids["prior"], node_ids["decoder"])


def test_a_group_without_nodes_is_a_clear_error(cluster, tmp_path):
    """Also on a cluster joined without RAY_ADDRESS (`ray start` on this machine): it may gain the node, so the job
    waits placement_timeout_s for it."""
    stages = {"prior": {"resources": {"h100_group": 1}}}
    result = submit(tmp_path, None, **base_job(tmp_path), stages=stages, placement_timeout_s=2)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stages.prior: no node of the Ray cluster offers h100_group")
    assert "waiting up to 2 s" in result.stderr and "after waiting 2 s" in last and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # refused before anything is written (job.yaml, runs/ were)


def test_a_node_that_cannot_load_the_model_is_passed_over(cluster, tmp_path):
    address, node_ids = cluster
    stages = {g: {"batch_size": 2, "resources": {f"{g}_group": 0.5}} for g in ("text", "prior")}
    stages["decoder"] = {"batch_size": 2, "concurrency": 2, "resources": {"serve": 0.6}}  # one actor a node
    result = submit(tmp_path, address, **base_job(tmp_path), stages=stages)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = pq.read_table(tmp_path / "out" / "manifest").to_pylist()
    assert sorted(row[C.SEED] for row in manifest) == list(range(6)) and not any(r[C.ERROR] for r in manifest)
    assert {row[C.DECODER_NODE] for row in manifest} == {node_ids["decoder"]}
    warning = next(line for line in result.stderr.splitlines() if line.startswith("warning: stages.decoder"))
    assert f"node {node_ids['broken'][:8]}" in warning and "Not a directory: '/dev/null/cache'" in warning


def test_a_stage_no_node_can_load_is_a_clear_error(cluster, tmp_path):
    address, _ = cluster
    stages = {g: {"batch_size": 2, "resources": {f"{g}_group": 0.5}} for g in ("text", "prior")}
    stages["decoder"] = {"batch_size": 2, "resources": {"broken_group": 0.5}}
    result = submit(tmp_path, address, **base_job(tmp_path), stages=stages)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stages.decoder: the model could not be loaded (node "), last
    assert "NotADirectoryError: [Errno 20] Not a directory: '/dev/null/cache'" in last
    assert "jobs/cli.py" not in result.stderr  # no traceback of the driver
    manifest = tmp_path / "out" / "manifest"
    assert not manifest.exists() or pq.read_table(manifest).num_rows == 0


def test_a_stage_whose_only_node_died_mid_run_ends_in_one_line(model_cache, tmp_path):
    """The prior group's one node dies mid-run (a spot node reclaimed) and none comes back: the run ends within
    placement_timeout_s in one line naming the group (it waited for ever, its progress frozen), rows kept once."""
    import time

    from ray.cluster_utils import Cluster

    cluster, run = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1}), None
    try:
        for g in ("text", "decoder"):
            cluster.add_node(num_cpus=1, resources={f"{g}_group": 1})
        prior = cluster.add_node(num_cpus=1, resources={"prior_group": 1})
        cluster.wait_for_nodes()
        rows = [{C.PROMPT: f"prompt {i}", C.SEED: i} for i in range(80)]
        stages = {g: {"batch_size": 2, "resources": {f"{g}_group": 0.5}} for g in GROUPS}
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(dict(base_job(tmp_path), prompts=write_prompts(tmp_path / "p.parquet", rows),
                                            stages=stages, placement_timeout_s=5)))
        run = subprocess.Popen([sys.executable, "-m", "jobs.cli", "generate", str(path)], text=True,
                               env={**os.environ, "RAY_ADDRESS": cluster.address}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
        deadline = time.time() + 300
        while not list((tmp_path / "out" / "embeddings").glob("*.parquet")) and time.time() < deadline:
            time.sleep(0.2)
        cluster.remove_node(prior, allow_graceful=False)
        _, err = run.communicate(timeout=240)
        assert run.returncode == 2, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: stages.prior: no node of the Ray cluster offers prior_group"), last
        assert "a node left mid-run (waited 5 s)" in last
        ids = pq.read_table(tmp_path / "out" / "manifest").column(C.ROW_ID).to_pylist() if list(
            (tmp_path / "out" / "manifest").glob("*.parquet")) else []
        assert len(ids) == len(set(ids)) < 80
    finally:
        if run is not None and run.poll() is None:
            run.kill()  # it hung (the old behaviour): not left running
        cluster.shutdown()
