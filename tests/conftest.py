"""Shared fixtures: the tiny model in a test cache, a local Ray cluster, an S3 server on loopback."""

from __future__ import annotations

import os
import socket
import threading
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stages import columns as C

ROW_DEFAULTS = {C.NEGATIVE_PROMPT: "", C.SEED: 0, C.HEIGHT: 128, C.WIDTH: 128, C.PRIOR_GUIDANCE: 4.0,
                C.DECODER_GUIDANCE: 0.0, C.PRIOR_STEPS: 2, C.DECODER_STEPS: 2}


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Build the tiny preset once per session, in a cache of its own (Ray workers inherit the variable); every Ray
    the tests start (here, in a CLI subprocess, the multi-node cluster) is set up as the CLI's local Ray."""
    cache = tmp_path_factory.mktemp("model-cache")
    os.environ["WUERSTCHEN_BATCH_CACHE"] = str(cache)
    from jobs.console import local_ray_settings
    from stages.presets import ensure_tiny_model

    local_ray_settings()
    return ensure_tiny_model(cache)


@pytest.fixture(scope="session")
def ray_cluster(model_cache):
    """A real local Ray (2 logical CPUs, as on this machine), always a new one: without `address="local"`,
    ray.init joins a cluster already running on the machine (or fails on a stale /tmp/ray/ray_current_cluster a
    killed Ray left)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()


def make_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """A stage input batch: every generation column filled from ROW_DEFAULTS, plus row ids."""
    full = [{C.PROMPT: r[C.PROMPT], **ROW_DEFAULTS, **r} for r in rows]
    batch = {key: np.asarray([r[key] for r in full]) for key in full[0]}
    for key in (C.PROMPT, C.NEGATIVE_PROMPT):
        batch[key] = batch[key].astype(object)
    batch[C.ROW_ID] = np.asarray([f"row{i}" for i in range(len(rows))], dtype=object)
    batch[C.ERROR] = np.full(len(rows), "", dtype=object)
    return batch


def reference_image(pipe, row: dict) -> np.ndarray:
    """What diffusers' combined pipeline makes for this row alone: (H, W, 3) floats in [0, 1]."""
    from diffusers.pipelines.deprecated.wuerstchen.pipeline_wuerstchen_prior import DEFAULT_STAGE_C_TIMESTEPS

    row = {**ROW_DEFAULTS, **row}
    steps = row[C.PRIOR_STEPS]
    return pipe(
        prompt=row[C.PROMPT],
        negative_prompt=row[C.NEGATIVE_PROMPT],
        height=row[C.HEIGHT],
        width=row[C.WIDTH],
        prior_num_inference_steps=steps or 60,
        prior_timesteps=None if steps else DEFAULT_STAGE_C_TIMESTEPS,
        prior_guidance_scale=row[C.PRIOR_GUIDANCE],
        num_inference_steps=row[C.DECODER_STEPS],
        decoder_guidance_scale=row[C.DECODER_GUIDANCE],
        generator=torch.Generator().manual_seed(row[C.SEED]),
        output_type="np",
    ).images[0]


@pytest.fixture(scope="session")
def reference_pipe(model_cache):
    from stages.models import reference_pipeline

    return reference_pipeline("tiny", "tiny")


def random_decoder(clip_embd: int = 24):
    """A small WuerstchenDiffNeXt (attention at levels 2-3, 16 wide; text 24 wide) whose every weight is random:
    diffusers' init would leave parts of it near zero and hide a difference."""
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenDiffNeXt

    torch.manual_seed(0)
    net = WuerstchenDiffNeXt(c_cond=24, clip_embd=clip_embd, c_hidden=[8, 16, 16], nhead=[-1, 2, 2], blocks=[1, 2, 1],
                             level_config=["CT", "CTA", "CTA"], inject_effnet=[False, True, True], dropout=0.0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return net.eval()


def write_prompts(path, rows: list[dict], types: dict | None = None) -> str:
    """Write a prompt table (columns from the rows' keys, in `types` where given) and return its path."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    pq.write_table(pa.table({k: pa.array([r.get(k) for r in rows], (types or {}).get(k)) for k in keys}), path)
    return str(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1, reached through s3fs; yields the storage options."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    yield options
    server.stop()


class Requests:
    """A WSGI app that keeps (method, path) of each request it answers: what a run costs on an object store."""

    def __init__(self, app):
        self.app, self.seen = app, []

    def __call__(self, environ, start_response):
        self.seen.append((environ["REQUEST_METHOD"], environ["PATH_INFO"]))
        return self.app(environ, start_response)

    def reads(self, folder: str) -> Counter:
        """The requests that read bytes of a Parquet part under a `folder`/ (GET), by part name."""
        return Counter(path.rsplit("/", 1)[-1] for method, path in self.seen
                       if method == "GET" and f"/{folder}/" in path and path.endswith(".parquet"))


@pytest.fixture(scope="session")
def counted_s3():
    """moto's S3 server on 127.0.0.1 (as s3_server) whose requests are kept; yields (storage options, Requests)."""
    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    class Quiet(MotoRequestHandler):
        def log_request(self, *args) -> None:  # a line a request would fill a failing test's report
            pass

    requests = Requests(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", free_port(), requests, threaded=True, request_handler=Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"key": "testing", "secret": "testing",
           "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{server.server_port}"}}, requests
    server.shutdown()
