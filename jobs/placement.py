"""Where each stage's actor pool runs: its GPU share and size, and whether the Ray cluster can hold the pools."""

from __future__ import annotations

import os
import socket
import sys
import time

import ray
from ray.autoscaler.sdk import request_resources

from jobs.spec import ACTOR_CPUS, JobSpec, SpecError, StageSpec

LISTING_CPUS = 1.0  # Ray Data lists the input files in one task that always asks for a whole CPU

# GPU shares when a stage's num_gpus is not set (and no split below applies): one GPU shared by all three pools,
# or whole GPUs for Stage C and Stage B/A (text encoding is ~0.1% of the FLOPs) when the cluster has several.
_GPU_SHARES = {"text": (0.1, 0.25), "prior": (0.45, 1.0), "decoder": (0.45, 1.0)}
# The split of 2 or more GPUs: whole GPUs for Stage C, 0.9 for Stage B/A, the text encoder's 0.1 beside one.
_SPLIT_SHARES = {"text": 0.1, "prior": 1.0, "decoder": 0.9}
_PLACING = ("num_gpus", "resources", "accelerator_type", "label_selector")  # a spec that places a stage itself
# Work per 1024² image (`plan`, TFLOP): Stage C per step and guidance branch, Stage B per step, Stage A once.
_PRIOR_STEP, _DECODER_STEP, _VQGAN = 1.12, 2.39, 2.0


def placing_gpus(cluster: dict) -> float:
    """The GPUs the stages are placed for: the cluster's, or where it has none now, the GPUs of one node of the
    largest GPU node group its autoscaler publishes (a cluster whose GPU nodes start from zero: the pools ask for
    GPUs and the autoscaler adds the node); 0 where neither."""
    if cluster.get("GPU", 0):
        return cluster["GPU"]
    config = ray._private.state.state.get_cluster_config()  # as Ray Data's own autoscaler reads it; None where the
    # autoscaler publishes no node groups
    groups = config.node_group_configs if config is not None else []
    return max((g.resources.get("GPU", 0) for g in groups if g.max_count != 0), default=0)


def cpu_warning(spec: JobSpec, cluster: dict) -> str | None:
    """The warning for a job of real models whose Stage C or B/A will run on CPUs (no GPU to place it on and no
    num_gpus of its own), else None."""
    if placing_gpus(cluster) or all(m == "tiny" for m in (spec.model.prior, spec.model.decoder)):
        return None
    unplaced = [label for name, label in (("prior", "Stage C"), ("decoder", "Stage B/A"))
                if getattr(spec.stages, name).num_gpus is None]  # 0: CPUs, as asked
    if not unplaced:
        return None
    return (f"warning: the Ray cluster has no GPU (nor an autoscaler node group with one): {' and '.join(unplaced)} "
            f"{'runs' if len(unplaced) == 1 else 'run'} on CPUs, minutes per image at full size; on a cluster whose "
            f"GPU nodes start from zero, set stages.prior.num_gpus and stages.decoder.num_gpus (the job then waits "
            f"placement_timeout_s for them)")


def stage_placement(spec: JobSpec, name: str, cluster_gpus: float, rows: int | None = None) -> dict:
    """map_batches keyword arguments for stage `name` of a job on a cluster with `cluster_gpus` GPUs (for a pass
    of at most `rows` rows, where given)."""
    split = split_gpus(spec, cluster_gpus)
    shares = dict(share=split_shares(spec)[name], pool=split.get(name)) if split else {}
    return placement(getattr(spec.stages, name), name, cluster_gpus, rows=rows, **shares)


def split_gpus(spec: JobSpec, cluster_gpus: float) -> dict[str, int]:
    """Actors of Stage C's and Stage B/A's pools where the spec places none of the three stages (no num_gpus,
    resources, accelerator_type or label_selector; no concurrency for Stage C and B/A), on 2 or more GPUs: the
    GPUs split in the ratio of the two stages' work per image at the spec's settings, so no GPU idles (8 GPUs at
    the defaults: 5 for Stage C, 3 for Stage B/A beside the text encoder). Else {}: the spec's pools."""
    gpus = int(cluster_gpus)
    stages = [spec.stages.text, spec.stages.prior, spec.stages.decoder]
    if gpus < 2 or any(places(s) for s in stages[1:]) or places(stages[0]) and not on_cpus(stages[0]) or any(
            s.concurrency is not None for s in stages[1:]):
        return {}
    from stages.prior import DEFAULT_PRIOR_STEPS  # imports diffusers: only where the GPUs are split

    gen = spec.generation
    prior = (gen.prior_steps or DEFAULT_PRIOR_STEPS) * (2 if gen.prior_guidance_scale > 1 else 1) * _PRIOR_STEP
    decoder = gen.decoder_steps * (2 if gen.decoder_guidance_scale > 1 else 1) * _DECODER_STEP + _VQGAN
    priors = max(range(1, gpus), key=lambda p: min(p / prior, (gpus - p) / decoder))
    return {"prior": priors, "decoder": gpus - priors}


def split_shares(spec: JobSpec) -> dict[str, float]:
    """Each stage's GPU share in a split: the text encoder's 0.1 beside a Stage B/A actor, or, with the text
    encoder on CPUs (num_gpus 0), none, and Stage B/A's whole GPUs."""
    return {"text": 0, "prior": 1.0, "decoder": 1.0} if on_cpus(spec.stages.text) else _SPLIT_SHARES


def on_cpus(stage: StageSpec) -> bool:
    """A stage the spec puts on CPUs (num_gpus 0) and places no other way."""
    return stage.num_gpus == 0 and not any(getattr(stage, key) for key in _PLACING[1:])


def places(stage: StageSpec) -> bool:
    """Whether the spec places the stage itself: num_gpus set (0 too: on CPUs), or resources, accelerator_type or
    label_selector given."""
    return stage.num_gpus is not None or any(getattr(stage, key) for key in _PLACING[1:])


def placement(stage: StageSpec, name: str, cluster_gpus: float, share: float | None = None,
              pool: int | None = None, rows: int | None = None) -> dict:
    """map_batches keyword arguments for a stage's actor pool, from its spec and the cluster, or from a split of
    the GPUs (its GPU `share`, its `pool` size where it sets one). Every actor of a pool is asked for at once (none
    waits for the first to load its models), but no more than the pass's `rows` fill batches for (where given):
    a small job on a big cluster does not bring up every group's max nodes."""
    if share is not None:
        num_gpus = share
    elif stage.num_gpus is not None:
        num_gpus = stage.num_gpus
    elif cluster_gpus:
        num_gpus = _GPU_SHARES[name][0 if cluster_gpus < 3 else 1]
    else:
        num_gpus = 0
    low, high = (pool, pool) if pool else pool_size(stage)
    start = high if rows is None else min(high, max(low, -(-rows // stage.batch_size)))
    args = dict(
        batch_size=stage.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high, initial_size=start),
        num_gpus=num_gpus,
        num_cpus=stage.num_cpus if stage.num_cpus is not None else ACTOR_CPUS,
    )
    for key in ("resources", "accelerator_type", "label_selector"):
        if getattr(stage, key):
            args[key] = getattr(stage, key)
    return args


class _Probe:
    """An actor class that is never started: Ray checks a stage's options when they are applied to it."""


def check_ray(spec: JobSpec) -> None:
    """Before the output is claimed: the stages' Ray options, and the cluster RAY_ADDRESS names (where this
    process has not joined one already)."""
    check_options(spec)
    check_cluster_address()


def check_cluster_address() -> None:
    """RAY_ADDRESS checked (check_ray_address) where this process has not joined a Ray already."""
    if not ray.is_initialized():
        check_ray_address(os.environ.get("RAY_ADDRESS", ""))


def check_ray_address(address: str, timeout: float = 5.0, wait_s: float = 20.0) -> None:
    """A RAY_ADDRESS of host:port (or ray://host:port) where the connection is refused or times out for `wait_s`
    (a head still starting has that long) is one line: ray.init would wait on it for minutes. `auto`, `local`,
    no address, a name this machine cannot resolve (a proxy may) and ray:// behind a proxy are left to Ray."""
    host, sep, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    proxied = address.startswith("ray://") and any(os.environ.get(k) for k in ("grpc_proxy", "https_proxy"))
    if not sep or not port.isdigit() or proxied:
        return
    deadline = time.time() + wait_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
            return
        except socket.gaierror:
            return
        except OSError as err:
            if time.time() >= deadline:
                raise SpecError(f"RAY_ADDRESS {address}: no Ray cluster answers there ({err.strerror or err}, for "
                                f"{wait_s:g} s); start one (ray start --head) or unset RAY_ADDRESS to run on a Ray "
                                f"of this machine's own") from None
            time.sleep(1.0)


def check_options(spec: JobSpec) -> None:
    """Each stage's Ray options as Ray itself checks them (a quantity finer than 0.0001, CPU or GPU inside
    `resources`, a malformed label selector): one line naming the stage, before the output is claimed."""
    for name in ("text", "prior", "decoder"):
        stage = getattr(spec.stages, name)
        options = {key: getattr(stage, key) for key in ("num_cpus", "num_gpus", *_PLACING[1:])
                   if getattr(stage, key) is not None}
        try:
            if options:
                ray.remote(**options)(_Probe)
        except (ValueError, TypeError) as err:
            raise SpecError(f"stages.{name}: {err}") from None


def pool_size(stage: StageSpec) -> tuple[int, int]:
    """(min, max) actors of a stage's pool: its concurrency n (a fixed pool) or [min, max]; 1 by default."""
    concurrency = stage.concurrency or 1
    return tuple(concurrency) if isinstance(concurrency, list) else (concurrency, concurrency)


def wait_for_capacity(spec: JobSpec, timeout: float) -> None:
    """Ask the autoscaler for the stages' minimum pools and wait up to `timeout` s; then a clear error."""
    deadline, announced = time.time() + timeout, False
    while True:
        try:
            return check_capacity(spec, ray.cluster_resources())
        except SpecError as err:
            if time.time() >= deadline:
                raise SpecError(f"{err} (after waiting {timeout:g} s)" if timeout else str(err)) from None
            if not announced:
                print(f"waiting up to {timeout:g} s for the Ray cluster to offer: {err}", file=sys.stderr)
                request_resources(bundles=minimum_bundles(spec))
                announced = True
            time.sleep(min(2.0, max(deadline - time.time(), 0)))


def minimum_pools(spec: JobSpec, cluster: dict) -> list[tuple[str, int, dict]]:
    """(stage, minimum actor count, one actor's resource ask) for each stage."""
    pools = []
    for name in ("text", "prior", "decoder"):
        args = stage_placement(spec, name, placing_gpus(cluster))
        ask = {"CPU": args["num_cpus"], "GPU": args["num_gpus"], **args.get("resources", {})}
        if args.get("accelerator_type"):  # what Ray asks a node for (its nodes of that type offer 1)
            ask[f"accelerator_type:{args['accelerator_type']}"] = 0.001
        pools.append((name, args["compute"].min_size, {k: v for k, v in ask.items() if v}))
    return pools


def minimum_bundles(spec: JobSpec, pools: list | None = None) -> list[dict]:
    """One resource bundle per actor of the minimum pools (what the autoscaler is asked for)."""
    return [ask for _, count, ask in pools or minimum_pools(spec, ray.cluster_resources()) for _ in range(count)]


def missing_resource(spec: JobSpec, cluster: dict, pools: list | None = None) -> str | None:
    """The first stage resource that no node of the cluster offers (the one-line error's start), else None;
    `pools`: the minimum pools' asks as placed (else placed on `cluster`)."""
    for name, _, ask in pools or minimum_pools(spec, cluster):
        for resource in ask:
            if resource not in cluster:
                offered = sorted(k for k in cluster if not k.startswith("node:") and "memory" not in k)
                return (f"stages.{name}: no node of the Ray cluster offers {resource} (the cluster offers "
                        f"{', '.join(offered)})")
    return None


class CapacityWatch:
    """A check for PassWatch while a pass runs: a stage resource that no node offers any more (its only node died)
    for `timeout` s stops the pass, which then ends in one line instead of waiting for an actor that cannot be
    placed."""

    def __init__(self, spec: JobSpec, timeout: float):
        self.spec, self.timeout, self.since = spec, timeout, None
        self.pools = minimum_pools(spec, ray.cluster_resources())  # as the pass placed them: a cluster that lost
        # its GPUs would place them without one, and miss nothing

    def check(self) -> str | None:
        missing = missing_resource(self.spec, ray.cluster_resources(), self.pools)
        self.since = None if missing is None else self.since or time.time()
        if self.since is None or time.time() - self.since < self.timeout:
            return None
        request_resources(bundles=minimum_bundles(self.spec, self.pools))  # an autoscaler may bring one
        return (f"{missing}, any more: a node left mid-run (waited {self.timeout:g} s); the rows finished so far "
                f"are kept: add a node that offers it and run the same command again")


def check_capacity(spec: JobSpec, cluster: dict) -> None:
    """Refuse a job whose minimum actor pools cannot all be placed: Ray would otherwise wait forever."""
    need: dict[str, float] = {"CPU": LISTING_CPUS}
    if (missing := missing_resource(spec, cluster)) is not None:
        raise SpecError(missing)
    for name, count, ask in minimum_pools(spec, cluster):
        for resource, amount in ask.items():
            need[resource] = need.get(resource, 0) + count * amount
    for resource, amount in need.items():
        have = cluster.get(resource, 0)
        if amount > have + 1e-9:
            raise SpecError(f"stages: the minimum actor pools and Ray Data's file listing need {amount:g} {resource}, "
                            f"the Ray cluster has {have:g}; lower a stage's concurrency or its {resource} ask")
