"""cluster/*.yaml and jobs/examples/cluster.yaml agree: groups, custom resources, labels, GPUs and sizes."""

import copy
import json
import math
import re
from pathlib import Path

import pytest
import yaml

from jobs.console import LOCAL_RAY_SETTINGS
from jobs.placement import placement
from jobs.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("text", "prior", "decoder")
LABEL = "wuerstchen-batch/stage"
IDLE_WORKERS = "RAY_idle_worker_killing_time_threshold_ms"
INSTANCES = {"g6.xlarge": (1, 4), "g6.2xlarge": (1, 8), "p4d.24xlarge": (8, 96), "p5.48xlarge": (8, 192)}  # GPUs, vCPUs
JOB = load_spec(ROOT / "jobs/examples/cluster.yaml")


def load(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((ROOT / "cluster" / name).read_text()) if d]
    assert len(docs) == 1, f"{name}: expected one YAML document"
    return docs[0]


RAYCLUSTER, RAYJOB = load("kuberay-raycluster.yaml"), load("kuberay-rayjob.yaml")
LAUNCHER = load("ray-launcher-aws.yaml")


def kuberay_resources(raw: str) -> dict:
    """The rayStartParams string '"{\\"x\\": 1}"' is a JSON string holding a JSON object (what `ray start` gets)."""
    return json.loads(json.loads(raw))


def cpus(quantity) -> float:
    quantity = str(quantity)
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def kuberay_groups(spec: dict) -> dict:
    groups = {}
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        hosts = group.get("numOfHosts", 1)
        groups[group["groupName"]] = dict(
            min=group["minReplicas"] * hosts, max=group["maxReplicas"] * hosts, labels=group.get("labels", {}),
            offers={"CPU": cpus(limits["cpu"]), "GPU": int(limits.get("nvidia.com/gpu", 0)),
                    **kuberay_resources(group["rayStartParams"]["resources"])})
    return groups


def launcher_groups(config: dict) -> dict:
    return {name: dict(min=t.get("min_workers", 0), max=t.get("max_workers", 0), labels=t.get("labels", {}),
                       offers=dict(t["resources"]))
            for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


GROUPS = {"raycluster": kuberay_groups(RAYCLUSTER["spec"]), "rayjob": kuberay_groups(RAYJOB["spec"]["rayClusterSpec"]),
          "launcher": launcher_groups(LAUNCHER)}
CASES = [(source, stage) for source in GROUPS for stage in STAGES]


def ask(stage: str) -> dict:
    """One actor's resource ask, as the pipeline passes it to map_batches."""
    args = placement(getattr(JOB.stages, stage), stage, cluster_gpus=8)
    request = {"CPU": args["num_cpus"], "GPU": args["num_gpus"], **args.get("resources", {})}
    return {k: v for k, v in request.items() if v}


def actors_per_node(offers: dict, request: dict) -> int:
    return min(math.floor(offers.get(k, 0) / v + 1e-9) for k, v in request.items())


@pytest.mark.parametrize("source", GROUPS)
def test_each_config_has_exactly_the_three_stage_groups(source):
    assert sorted(GROUPS[source]) == sorted(STAGES)


@pytest.mark.parametrize("source,stage", CASES)
def test_group_offers_what_the_stage_asks_for(source, stage):
    group, spec = GROUPS[source][stage], getattr(JOB.stages, stage)
    custom = {k: v for k, v in group["offers"].items() if k not in ("CPU", "GPU", "memory")}
    assert spec.resources and set(custom) == set(spec.resources), f"{source}/{stage} offers {custom}"
    assert all(isinstance(v, int) and v >= 1 for v in custom.values()), "Ray node resources are whole numbers"
    others = [g for name, g in GROUPS[source].items() if name != stage]
    assert not any(set(custom) & set(g["offers"]) for g in others), "a stage resource offered by two groups"
    assert group["offers"]["GPU"] >= spec.num_gpus > 0


@pytest.mark.parametrize("source,stage", CASES)
def test_concurrency_fits_the_group(source, stage):
    group, (low, high) = GROUPS[source][stage], getattr(JOB.stages, stage).concurrency
    per_node = actors_per_node(group["offers"], ask(stage))
    assert per_node >= 1, f"{source}/{stage}: one node cannot hold one actor"
    assert high <= group["max"] * per_node, f"{source}/{stage}: max {high} > {group['max']} nodes × {per_node}"
    # The minimum pools must fit on the groups' minimum nodes, so the job starts without waiting on the autoscaler.
    assert low <= group["min"] * per_node, f"{source}/{stage}: min {low} > {group['min']} nodes × {per_node}"


@pytest.mark.parametrize("source,stage", CASES)
def test_group_labels(source, stage):
    labels = GROUPS[source][stage]["labels"]
    assert labels.get(LABEL) == stage and all(re.fullmatch(r"[A-Za-z0-9]([-_.A-Za-z0-9]*[A-Za-z0-9])?", v)
                                              for v in labels.values())
    selector = getattr(JOB.stages, stage).label_selector or {}
    assert selector.items() <= labels.items(), f"{source}/{stage}: label_selector {selector} matches no group node"


@pytest.mark.parametrize("source", GROUPS)
def test_prior_gets_about_twice_the_decoder_gpus(source):
    groups = GROUPS[source]
    for end in ("min", "max"):
        prior, decoder = (groups[s][end] * groups[s]["offers"]["GPU"] for s in ("prior", "decoder"))
        assert 1.5 <= prior / decoder <= 2.5, f"{source} {end}: prior {prior} GPUs, decoder {decoder}"


def test_rayjob_cluster_is_the_raycluster_plus_the_job_spec_mount():
    spec = copy.deepcopy(RAYJOB["spec"]["rayClusterSpec"])
    head = spec["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0].pop("volumeMounts")}
    volumes = {v["name"]: v for v in head.pop("volumes")}
    assert spec == RAYCLUSTER["spec"]
    command, path = RAYJOB["spec"]["entrypoint"].rsplit(" ", 1)
    assert command == "wuerstchen-batch generate" and Path(path).name == "cluster.yaml"
    assert "configMap" in volumes[mounts[str(Path(path).parent)]]


@pytest.mark.parametrize("spec", [RAYCLUSTER["spec"], RAYJOB["spec"]["rayClusterSpec"]], ids=["raycluster", "rayjob"])
def test_kuberay_workers_cache_models_on_a_host_volume(spec):
    assert spec["enableInTreeAutoscaling"] is True
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        volume = next(m for p, m in mounts.items() if env["WUERSTCHEN_BATCH_CACHE"].startswith(p.rstrip("/") + "/"))
        assert "hostPath" in next(v for v in pod["volumes"] if v["name"] == volume)
        assert env[IDLE_WORKERS] == LOCAL_RAY_SETTINGS[IDLE_WORKERS]  # as a local Ray keeps them


def test_launcher_resources_match_the_instance_types():
    for name, node in LAUNCHER["available_node_types"].items():
        if name == LAUNCHER["head_node_type"]:
            continue
        gpus, vcpus = INSTANCES[node["node_config"]["InstanceType"]]
        assert node["resources"]["GPU"] == gpus and node["resources"]["CPU"] <= vcpus, name
    assert LAUNCHER["max_workers"] >= sum(g["max"] for g in GROUPS["launcher"].values())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "WUERSTCHEN_BATCH_CACHE=" in " ".join(LAUNCHER[key])
        assert f"{IDLE_WORKERS}={LOCAL_RAY_SETTINGS[IDLE_WORKERS]}" in " ".join(LAUNCHER[key])


def test_ray_reads_the_configs_as_intended():
    """Ray's own parsers (pure Python, no cluster) see the same groups, resources and labels."""
    kuberay = pytest.importorskip("ray.autoscaler._private.kuberay.autoscaling_config")
    util = pytest.importorskip("ray.autoscaler._private.util")
    util.validate_config(util.prepare_config(copy.deepcopy(LAUNCHER)))
    for cr in (RAYCLUSTER, {**RAYJOB, "spec": RAYJOB["spec"]["rayClusterSpec"]}):
        cr = copy.deepcopy(cr)
        cr["metadata"]["namespace"] = "default"
        types = kuberay._derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]
        for stage in STAGES:
            mine = GROUPS["raycluster"][stage]
            assert (types[stage]["min_workers"], types[stage]["max_workers"]) == (mine["min"], mine["max"])
            assert types[stage]["labels"] == mine["labels"]
            assert {k: v for k, v in types[stage]["resources"].items() if k != "memory"} == mine["offers"]
