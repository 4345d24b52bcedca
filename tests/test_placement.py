"""Where the stage pools run: default GPU shares and pool sizes that keep every GPU of a node busy."""

import pytest

from jobs.placement import split_gpus, stage_placement
from jobs.spec import spec_from_dict


def job(**changes) -> dict:
    return {"prompts": "p.parquet", "output": "out", **changes}


def pools(spec, gpus) -> dict[str, tuple[float, int, int]]:
    """stage → (GPU share, min actors, max actors)."""
    out = {}
    for name in ("text", "prior", "decoder"):
        args = stage_placement(spec, name, gpus)
        out[name] = (args["num_gpus"], args["compute"].min_size, args["compute"].max_size)
    return out


def packs(placed: dict, gpus: int) -> bool:
    """Whether every actor fits on `gpus` GPUs of 1.0 each (first fit, largest asks first), as Ray places them."""
    free = [1.0] * gpus
    for share in sorted((s for s, n, _ in placed.values() for _ in range(n) if s), reverse=True):
        slot = next((i for i, f in enumerate(free) if f + 1e-9 >= share), None)
        if slot is None:
            return False
        free[slot] -= share
    return True


def test_eight_gpus_split_between_stage_c_and_b_in_the_ratio_of_their_work():
    spec = spec_from_dict(job())  # 1024², the default 29 Stage C steps with guidance, 12 Stage B steps: 65 : 31 TFLOP
    placed = pools(spec, 8)
    assert placed == {"text": (0.1, 1, 1), "prior": (1.0, 5, 5), "decoder": (0.9, 3, 3)}
    assert packs(placed, 8) and not packs({**placed, "prior": (1.0, 6, 6)}, 8)  # every GPU busy, none asked twice
    unguided = spec_from_dict(job(generation={"prior_guidance_scale": 1.0}))  # Stage C's work halves
    assert split_gpus(unguided, 8) == {"prior": 4, "decoder": 4}


def test_the_split_counts_the_default_schedule_as_the_stage_runs_it():
    """prior_steps null: 29 Stage C steps (diffusers' 30 values), as Stage C and `plan` count them; 20 GPUs split
    13 : 7 at 29 steps and 14 : 6 at 30."""
    default, steps = spec_from_dict(job()), {n: spec_from_dict(job(generation={"prior_steps": n})) for n in (29, 30)}
    assert split_gpus(default, 20) == split_gpus(steps[29], 20) == {"prior": 13, "decoder": 7}
    assert split_gpus(steps[30], 20) == {"prior": 14, "decoder": 6}


@pytest.mark.parametrize("gpus, expected", [
    (2, {"text": (0.1, 1, 1), "prior": (1.0, 1, 1), "decoder": (0.9, 1, 1)}),  # one GPU each, text beside B/A
    (1, {"text": (0.1, 1, 1), "prior": (0.45, 1, 1), "decoder": (0.45, 1, 1)}),  # all three share it
    (0, {"text": (0, 1, 1), "prior": (0, 1, 1), "decoder": (0, 1, 1)}),
])
def test_smaller_clusters(gpus, expected):
    placed = pools(spec_from_dict(job()), gpus)
    assert placed == expected and packs(placed, gpus)


@pytest.mark.parametrize("stages", [
    {"decoder": {"num_gpus": 1}},  # the old shares: 0.1 + 0.45 + 1 fit 2 GPUs (0.1 + 1 + 1 would not)
    {"prior": {"resources": {"prior_group": 1}}, "decoder": {"resources": {"decoder_group": 1}}},  # node groups
    {"text": {"label_selector": {"group": "text"}}},
])
def test_a_spec_that_places_a_stage_gets_no_split(stages):
    spec = spec_from_dict(job(stages=stages))
    assert split_gpus(spec, 2) == split_gpus(spec, 8) == {}
    placed = pools(spec, 2)
    assert [n for _, n, _ in placed.values()] == [1, 1, 1] and placed["text"][0] == 0.1
    assert placed["prior"][0] == stages.get("prior", {}).get("num_gpus", 0.45)


def test_num_gpus_0_keeps_a_stage_on_cpus_on_any_cluster():
    """num_gpus 0 puts a stage on CPUs, as on one GPU: no split of 8 GPUs gives it a share. The text encoder on
    CPUs keeps the split, Stage B/A then on whole GPUs; Stage C on CPUs places the GPUs by the spec."""
    spec = spec_from_dict(job(stages={"text": {"num_gpus": 0, "num_cpus": 0}}))
    assert pools(spec, 8) == {"text": (0, 1, 1), "prior": (1.0, 5, 5), "decoder": (1.0, 3, 3)}  # no GPU idles
    assert stage_placement(spec, "text", 1)["num_gpus"] == stage_placement(spec, "text", 8)["num_cpus"] == 0
    on_cpus = spec_from_dict(job(stages={"prior": {"num_gpus": 0}}))
    assert split_gpus(on_cpus, 8) == {} and stage_placement(on_cpus, "prior", 8)["num_gpus"] == 0
    assert pools(on_cpus, 3) == {"text": (0.25, 1, 1), "prior": (0, 1, 1), "decoder": (1.0, 1, 1)}  # whole from 3


def test_a_fixed_text_pool_still_splits_the_gpus():
    """Only Stage C's and B/A's pool sizes decide the split: more text encoders leave it as it was."""
    spec = spec_from_dict(job(stages={"text": {"concurrency": 2}}))
    assert split_gpus(spec, 8) == {"prior": 5, "decoder": 3}
    assert pools(spec, 8)["text"] == (0.1, 2, 2)


def test_a_cluster_too_small_for_the_minimum_pools_is_refused_naming_both_amounts():
    """Ray Data's listing task (1 CPU) plus every minimum pool's CPUs must fit; one CPU short is a one-line error."""
    from jobs.placement import check_capacity
    from jobs.spec import SpecError

    spec = spec_from_dict(job(stages={"prior": {"concurrency": 4}}))
    need = 1 + 0.1 * 6  # the listing, and 6 actors of 0.1 CPU
    check_capacity(spec, {"CPU": need, "GPU": 8})
    with pytest.raises(SpecError, match=f"need {need:g} CPU, the Ray cluster has {need - 0.1:g}; lower a stage"):
        check_capacity(spec, {"CPU": need - 0.1, "GPU": 8})


def test_a_pool_the_spec_sizes_is_kept_and_asked_for_whole():
    spec = spec_from_dict(job(stages={"prior": {"concurrency": [1, 4], "num_gpus": 1}}))
    assert split_gpus(spec, 8) == {}  # the spec places Stage C: Stage B/A keeps its pool of one
    placed = pools(spec, 8)
    assert placed["prior"] == (1, 1, 4) and placed["decoder"] == (1.0, 1, 1)
    assert stage_placement(spec, "prior", 8)["compute"].initial_size == 4  # all at once: none waits for another's load


def test_a_pool_starts_no_bigger_than_the_batches_of_its_rows():
    """A job of a few rows on a big cluster asks for an actor per batch, not the pool's maximum (every group's max
    nodes), and never fewer than the minimum; a big one asks for the maximum at once."""
    spec = spec_from_dict(job(stages={"prior": {"concurrency": [2, 16], "batch_size": 8}}))
    starts = {rows: stage_placement(spec, "prior", 0, rows)["compute"].initial_size for rows in (1, 40, 41, 10**7)}
    assert starts == {1: 2, 40: 5, 41: 6, 10**7: 16}
    assert stage_placement(spec, "prior", 0)["compute"].initial_size == 16


def test_a_cluster_whose_gpu_nodes_start_from_zero_asks_for_gpus(ray_cluster):
    """No GPU node up yet, but the autoscaler publishes a node group of 8 GPUs: the pools are placed for that node
    (the job waits for it) instead of running full-size models on CPUs."""
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY as KEY, GCS_AUTOSCALER_STATE_NAMESPACE as NAMESPACE
    from ray.core.generated.autoscaler_pb2 import ClusterConfig

    from jobs.placement import check_capacity, cpu_warning, placing_gpus
    from jobs.spec import SpecError

    ray_cluster.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)  # an
    # earlier test's CLI run may have shut the session's Ray down
    spec = spec_from_dict(job(model={"prior": "warp-ai/wuerstchen-prior", "decoder": "warp-ai/wuerstchen"}))
    cluster = {"CPU": 2.0}  # a head node without GPUs (the local Ray serves the autoscaler's config only)
    assert placing_gpus(cluster) == 0 and "run on CPUs" in cpu_warning(spec, cluster)
    assert cpu_warning(spec_from_dict(job()), cluster) is None  # the tiny preset is meant for CPUs
    one_placed = spec_from_dict(job(model=spec.to_dict()["model"], stages={"prior": {"num_gpus": 1}}))
    assert "Stage B/A runs on CPUs" in cpu_warning(one_placed, cluster)
    on_cpus = {name: {"num_gpus": 0} for name in ("prior", "decoder")}  # asked for: no warning
    assert cpu_warning(spec_from_dict(job(model=spec.to_dict()["model"], stages=on_cpus)), cluster) is None
    config = ClusterConfig()
    group = config.node_group_configs.add(name="h100", min_count=0, max_count=4)
    group.resources.update({"CPU": 180, "GPU": 8})
    config.node_group_configs.add(name="cpu", min_count=0, max_count=2).resources.update({"CPU": 16})
    config.node_group_configs.add(name="off", min_count=0, max_count=0).resources.update({"GPU": 16})  # never up
    gcs = ray_cluster._private.worker.global_worker.gcs_client  # the driver's own (ray.experimental.internal_kv's
    # module-wide client is unset after an earlier test's interrupted shutdown)
    gcs.internal_kv_put(KEY.encode(), config.SerializeToString(), True, NAMESPACE.encode())
    try:
        assert placing_gpus(cluster) == 8
        assert pools(spec, placing_gpus(cluster)) == pools(spec, 8)  # Stage C 5 GPUs, Stage B/A 3, as on one node
        assert cpu_warning(spec, cluster) is None
        with pytest.raises(SpecError, match="no node of the Ray cluster offers GPU"):
            check_capacity(spec, cluster)  # what wait_for_capacity waits on, asking the autoscaler for the node
    finally:
        gcs.internal_kv_del(KEY.encode(), False, NAMESPACE.encode())
    assert placing_gpus(cluster) == 0


@pytest.mark.parametrize("stage, message", [
    ({"num_cpus": 0.00001}, "stages.text: The precision of the fractional quantity of resource num_cpus cannot go "
                            "beyond 0.0001"),
    ({"resources": {"CPU": 1}}, "stages.text: Use the 'num_cpus' and 'num_gpus' keyword instead"),
    ({"label_selector": {"gpu-type": "H100 SXM"}}, "stages.text: Invalid label selector value `H100 SXM`"),
])
def test_ray_options_ray_would_refuse_are_one_line_before_any_work(stage, message):
    from jobs.placement import check_options
    from jobs.spec import SpecError

    check_options(spec_from_dict(job(stages={"text": {"num_cpus": 0.5, "resources": {"text_group": 0.25}}})))
    with pytest.raises(SpecError) as err:
        check_options(spec_from_dict(job(stages={"text": stage})))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_an_accelerator_type_no_node_has_is_missing_not_waited_for():
    """Ray asks for `accelerator_type:A100` for a stage placed on A100s: a cluster without one is refused, not
    waited on forever."""
    from jobs.placement import missing_resource

    spec = spec_from_dict(job(stages={"prior": {"accelerator_type": "A100"}}))
    cluster = {"CPU": 8.0, "GPU": 1.0, "accelerator_type:H100": 1.0}
    assert missing_resource(spec, cluster) == ("stages.prior: no node of the Ray cluster offers accelerator_type:A100 "
                                               "(the cluster offers CPU, GPU, accelerator_type:H100)")
    assert missing_resource(spec, {**cluster, "accelerator_type:A100": 1.0}) is None


def test_a_ray_address_nothing_answers_is_one_line():
    """ray.init waits minutes on an address nothing answers (after the output was claimed): said at once."""
    import socket

    from jobs.placement import check_ray_address
    from jobs.spec import SpecError

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}", "auto", "local", ""):
            check_ray_address(address)
    with pytest.raises(SpecError, match=rf"^RAY_ADDRESS 127.0.0.1:{port}: no Ray cluster answers there \("):
        check_ray_address(f"127.0.0.1:{port}", wait_s=1)
    check_ray_address("no-such-host.invalid:6379")  # unresolvable here: Ray's to judge (a proxy may resolve it)


class Clock:
    """time.time and time.sleep of jobs.placement, on a clock of the test's own; counts the autoscaler requests."""

    def __init__(self):
        self.now, self.asked = 1000.0, 0

    def time(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    import jobs.placement as placement

    clock = Clock()
    monkeypatch.setattr(placement, "time", clock)
    monkeypatch.setattr(placement, "request_resources", lambda **kw: setattr(clock, "asked", clock.asked + 1))
    return clock


def test_a_missing_node_is_waited_for_placement_timeout_s_once(monkeypatch, capsys, clock):
    """The wait asks the autoscaler once and gives up when `timeout` seconds have passed (a clock of its own)."""
    import jobs.placement as placement
    from jobs.spec import SpecError

    monkeypatch.setattr(placement.ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    spec = spec_from_dict(job(stages={"prior": {"resources": {"h100_group": 1}}}))
    with pytest.raises(SpecError, match="no node of the Ray cluster offers h100_group.*after waiting 5 s"):
        placement.wait_for_capacity(spec, 5)
    assert clock.now == 1005.0 and clock.asked == 1
    assert capsys.readouterr().err.count("waiting up to 5 s for the Ray cluster to offer") == 1


def test_a_node_lost_mid_run_stops_the_pass_only_after_timeout_s_without_it(monkeypatch, clock):
    """A stage's group node gone: the watch says nothing while it may come back, and stops the pass once it has
    been gone `timeout` s running (a node back in between starts the wait anew)."""
    import jobs.placement as placement

    cluster = {"CPU": 4.0, "GPU": 1.0, "prior_group": 1.0}
    monkeypatch.setattr(placement.ray, "cluster_resources", lambda: dict(cluster))
    watch = placement.CapacityWatch(spec_from_dict(job(stages={"prior": {"resources": {"prior_group": 1}}})), 30)
    assert watch.check() is None
    del cluster["prior_group"]
    for _ in range(3):  # gone 20 s, then back
        assert watch.check() is None
        clock.sleep(10)
    cluster["prior_group"] = 1.0
    assert watch.check() is None
    del cluster["prior_group"]
    for _ in range(3):  # gone again: 0, 10, 20 s
        assert watch.check() is None
        clock.sleep(10)
    error = watch.check()  # 30 s
    assert error.startswith("stages.prior: no node of the Ray cluster offers prior_group")
    assert error.endswith("a node left mid-run (waited 30 s); the rows finished so far are kept: add a node that "
                          "offers it and run the same command again") and clock.asked == 1


def test_a_joined_cluster_is_waited_for_and_a_ray_started_here_is_not(ray_cluster, monkeypatch):
    """The session's Ray was started in this process (its head node is ours): nothing can join it. A Ray Client
    (ray://) connection holds no node of this process: a cluster joined, which an autoscaler may grow."""
    from jobs.console import joined_cluster

    ray_cluster.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    assert joined_cluster() is False
    monkeypatch.setattr(ray_cluster._private.worker, "_global_node", None)
    assert joined_cluster() is True
