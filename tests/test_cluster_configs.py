"""cluster/ (configs, README's image recipe) and jobs/examples/cluster.yaml agree: groups, sizes, credentials, Ray."""

import copy
import json
import math
import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private import util
from ray.autoscaler._private.kuberay import autoscaling_config as kuberay

from jobs import cli
from jobs.console import LOCAL_RAY_SETTINGS
from jobs.placement import placement
from jobs.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("text", "prior", "decoder")
LABEL = "wuerstchen-batch/stage"
IDLE_WORKERS = "RAY_idle_worker_killing_time_threshold_ms"
INSTANCES = {"g6.xlarge": (1, 4), "g6.2xlarge": (1, 8), "p4d.24xlarge": (8, 96), "p5.48xlarge": (8, 192)}  # GPUs, vCPUs
INSTANCE_TYPE = "node.kubernetes.io/instance-type"  # set by the kubelet on cloud nodes
ACCOUNT = "wuerstchen-batch"  # the KubeRay Pods' service account
JOB = load_spec(ROOT / "jobs/examples/cluster.yaml")


def load(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((ROOT / "cluster" / name).read_text()) if d]
    assert len(docs) == 1, f"{name}: expected one YAML document"
    return docs[0]


RAYCLUSTER, RAYJOB = load("kuberay-raycluster.yaml"), load("kuberay-rayjob.yaml")
LAUNCHER = load("ray-launcher-aws.yaml")
KUBERAY_SPECS = {"raycluster": RAYCLUSTER["spec"], "rayjob": RAYJOB["spec"]["rayClusterSpec"]}
RAY_VERSION = RAYCLUSTER["spec"]["rayVersion"]
RECIPE = re.search(r"```dockerfile\n(.*?)```", (ROOT / "cluster/README.md").read_text(), re.S).group(1)


def kuberay_resources(raw: str) -> dict:
    """The rayStartParams string '"{\\"x\\": 1}"' is a JSON string holding a JSON object (what `ray start` gets)."""
    return json.loads(json.loads(raw))


def cpus(quantity) -> float:
    quantity = str(quantity)
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def kuberay_groups(spec: dict) -> dict:
    groups = {}
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        hosts = group.get("numOfHosts", 1)
        groups[group["groupName"]] = dict(
            min=group["minReplicas"] * hosts, max=group["maxReplicas"] * hosts, labels=group.get("labels", {}),
            instance=pod.get("nodeSelector", {}).get(INSTANCE_TYPE),
            offers={"CPU": cpus(limits["cpu"]), "GPU": int(limits.get("nvidia.com/gpu", 0)),
                    **kuberay_resources(group["rayStartParams"]["resources"])})
    return groups


def launcher_groups(config: dict) -> dict:
    return {name: dict(min=t.get("min_workers", 0), max=t.get("max_workers", 0), labels=t.get("labels", {}),
                       instance=t["node_config"]["InstanceType"], offers=dict(t["resources"]))
            for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


GROUPS = {**{source: kuberay_groups(spec) for source, spec in KUBERAY_SPECS.items()},
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


@pytest.mark.parametrize("source,stage", CASES)
def test_group_matches_its_instance_type(source, stage):
    group = GROUPS[source][stage]
    assert group["instance"] in INSTANCES, f"{source}/{stage}: instance type {group['instance']} unknown here"
    gpus, vcpus = INSTANCES[group["instance"]]
    assert group["offers"]["GPU"] == gpus and group["offers"]["CPU"] <= vcpus, f"{source}/{stage}"
    assert group["instance"] == GROUPS["launcher"][stage]["instance"], f"{source}/{stage}: not the launcher's type"


def test_rayjob_cluster_is_the_raycluster_plus_the_job_spec_mount():
    spec = copy.deepcopy(RAYJOB["spec"]["rayClusterSpec"])
    head = spec["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0].pop("volumeMounts")}
    volumes = {v["name"]: v for v in head.pop("volumes")}
    assert spec == RAYCLUSTER["spec"]
    program, *argv = shlex.split(RAYJOB["spec"]["entrypoint"])
    args = cli.parser().parse_args(argv)
    assert program == cli.parser().prog and args.command == "generate" and Path(args.job).name == "cluster.yaml"
    assert "configMap" in volumes[mounts[str(Path(args.job).parent)]]


@pytest.mark.parametrize("spec", KUBERAY_SPECS.values(), ids=KUBERAY_SPECS)
def test_every_kuberay_pod_has_the_service_account(spec):
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    assert [pod.get("serviceAccountName") for pod in pods] == [ACCOUNT] * len(pods)


def test_every_launcher_node_has_the_same_instance_profile():
    """Ray gives its default profile to the head only: the workers (reads, stages, writes) need S3 too."""
    profiles = [t["node_config"].get("IamInstanceProfile") for t in LAUNCHER["available_node_types"].values()]
    assert profiles[0] and profiles[0].get("Arn") and profiles == [profiles[0]] * len(profiles), profiles


def test_cluster_extra_holds_rays_dashboard():
    """`ray job submit`, KubeRay's submitter and head probe need ray[default]; the extra keeps Ray's range."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    main = next(r for r in map(Requirement, project["dependencies"]) if r.name == "ray")
    extra = [r for r in map(Requirement, project["optional-dependencies"]["cluster"]) if r.name == "ray"]
    assert extra and "default" in extra[0].extras and extra[0].specifier == main.specifier, extra
    assert main.specifier.contains(RAY_VERSION), f"rayVersion {RAY_VERSION} outside {main.specifier}"


def pip_installs(commands: list[str]) -> list[str]:
    """What the `pip install` commands install (their options left out)."""
    args = []
    for words in map(shlex.split, commands):
        if "pip" in words and "install" in words:
            args += [w for w in words[words.index("install") + 1:] if not w.startswith("-")]
    return args


@pytest.mark.parametrize("source", ["recipe", "launcher"])
def test_nodes_install_the_cluster_extra_and_the_clusters_ray(source):
    commands = ([line[4:] for line in RECIPE.replace("\\\n", " ").splitlines() if line.startswith("RUN ")]
                if source == "recipe" else LAUNCHER["setup_commands"])
    installs = pip_installs(commands)
    assert any(re.fullmatch(r".*wuerstchen-batch\[cluster\]", a) for a in installs), f"{source}: no [cluster]"
    rays = [r for r in map(Requirement, (a for a in installs if a.startswith("ray["))) if r.name == "ray"]
    assert rays, f"{source}: Ray not pinned"
    assert all(str(r.specifier) == f"=={RAY_VERSION}" and {"default", "data"} <= r.extras for r in rays), rays
    assert RAYJOB["spec"]["rayClusterSpec"]["rayVersion"] == RAY_VERSION


@pytest.mark.parametrize("spec", KUBERAY_SPECS.values(), ids=KUBERAY_SPECS)
def test_kuberay_workers_cache_models_on_a_host_volume(spec):
    assert spec["enableInTreeAutoscaling"] is True
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        volume = next(m for p, m in mounts.items() if env["WUERSTCHEN_BATCH_CACHE"].startswith(p.rstrip("/") + "/"))
        assert "hostPath" in next(v for v in pod["volumes"] if v["name"] == volume)
        assert env[IDLE_WORKERS] == LOCAL_RAY_SETTINGS[IDLE_WORKERS]  # as a local Ray keeps them


def test_launcher_max_workers_and_start_commands():
    assert LAUNCHER["max_workers"] >= sum(g["max"] for g in GROUPS["launcher"].values())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "WUERSTCHEN_BATCH_CACHE=" in " ".join(LAUNCHER[key])
        assert f"{IDLE_WORKERS}={LOCAL_RAY_SETTINGS[IDLE_WORKERS]}" in " ".join(LAUNCHER[key])


def test_ray_reads_the_configs_as_intended():
    """Ray's own parsers (pure Python, no cluster) see the same groups, resources and labels."""
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
