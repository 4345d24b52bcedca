"""A real multi-node Ray on this machine: each stage runs only on its own group's node, joined via RAY_ADDRESS."""

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
    nodes = {g: cluster.add_node(num_cpus=1, resources={f"{g}_group": 1}) for g in GROUPS}
    cluster.wait_for_nodes()
    yield cluster.address, {g: node.node_id for g, node in nodes.items()}
    cluster.shutdown()


def submit(tmp_path, address, **job):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {**os.environ, "RAY_ADDRESS": address}
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
    address, _ = cluster
    stages = {"prior": {"resources": {"h100_group": 1}}}
    result = submit(tmp_path, address, **base_job(tmp_path), stages=stages, placement_timeout_s=2)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stages.prior: no node of the Ray cluster offers h100_group")
    assert "after waiting 2 s" in last and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "manifest").exists()
