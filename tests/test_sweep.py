"""Sweeps and checkpoints: every prompt × every axis combination, and Stage C weights per row."""

import shutil
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_batch, write_prompts
from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior

from jobs.generate import run
from jobs.plan import count_buckets
from jobs.prompts import scan
from jobs.spec import spec_from_dict
from stages import columns as C
from stages.models import prior_id
from stages.prior import PriorStage
from stages.text import TextEncoder


@pytest.fixture(scope="module")
def checkpoints(model_cache, tmp_path_factory):
    """Two more priors beside the tiny one: B (other weights) and C = 0.7·A + 0.3·B saved as a checkpoint."""
    root = tmp_path_factory.mktemp("priors")
    a = WuerstchenPrior.from_pretrained(str(model_cache / "prior"), subfolder="prior")
    gen = torch.Generator().manual_seed(9)
    b_weights = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in a.state_dict().items()}
    c_weights = {k: a.state_dict()[k] * 0.7 + b_weights[k] * 0.3 for k in b_weights}
    for name, weights in (("B", b_weights), ("C", c_weights)):
        shutil.copytree(model_cache / "prior", root / name)
        a.load_state_dict(weights)
        a.save_pretrained(root / name / "prior", safe_serialization=True)
    return str(model_cache / "prior"), str(root / "B"), str(root / "C")


def stage_c(prior, rows, checkpoint_column=None, dtype="float32", stages=None):
    batch = TextEncoder("tiny", "tiny", dtype=dtype)(make_batch(rows))
    if checkpoint_column is not None:
        batch[C.PRIOR_CHECKPOINT] = np.asarray(checkpoint_column, dtype=object)
    stage = PriorStage(prior, dtype=dtype)
    if stages is not None:
        stages.append(stage)
    return stage(batch)[C.IMAGE_EMBEDDINGS]


ROWS = [{C.PROMPT: "a lighthouse", C.SEED: 1}, {C.PROMPT: "a red fox", C.SEED: 2}]


def test_interpolated_prior_equals_the_saved_interpolation(checkpoints):
    a, b, c = checkpoints
    interpolated = stage_c({"interpolate": [a, b], "alpha": 0.3}, ROWS)
    saved = stage_c(c, ROWS)
    assert np.array_equal(np.stack(list(interpolated)), np.stack(list(saved)))
    assert not np.array_equal(np.stack(list(stage_c(a, ROWS))), np.stack(list(saved)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rows_of_several_checkpoints_in_one_batch(checkpoints, dtype):
    """Each row gets its checkpoint's embeddings, bit for bit as a stage of that checkpoint alone makes them; a
    swapped-in checkpoint is held in the model's dtype (half of float32's memory in bfloat16)."""
    a, b, _ = checkpoints
    rows, stages = ROWS + ROWS, []
    mixed = stage_c(a, rows, [prior_id(a), prior_id(a), prior_id(b), prior_id(b)], dtype, stages)
    assert np.array_equal(np.stack(list(mixed[:2])), np.stack(list(stage_c(a, ROWS, dtype=dtype))))
    assert np.array_equal(np.stack(list(mixed[2:])), np.stack(list(stage_c(b, ROWS, dtype=dtype))))
    held = sum(v.numel() * v.element_size() for v in stages[0].weights[prior_id(b)].values())
    assert held == sum(v.numel() * v.element_size() for v in stages[0].prior.state_dict().values())


def test_sweep_makes_every_combination_once(tmp_path, ray_cluster, checkpoints):
    a, b, _ = checkpoints
    spec = spec_from_dict({
        "prompts": write_prompts(tmp_path / "p.parquet", [{C.PROMPT: p, C.SEED: 99, C.DECODER_GUIDANCE: 5.0}
                                                          for p in ("a cat", "a dog")]),  # the sweep replaces these
        "output": str(tmp_path / "out"),
        "generation": {"height": 128, "width": 128, "prior_steps": 2, "decoder_steps": 2},
        "sweep": {"seed": [1, 2], "decoder_guidance_scale": [0.0, 2.0], "resolution": [[128, 128], [256, 128]],
                  "prior_checkpoint": [a, {"interpolate": [a, b], "alpha": 0.5}]},
        "stages": {"text": {"batch_size": 8}, "prior": {"batch_size": 8}, "decoder": {"batch_size": 4}},
    })
    assert run(spec).rows == 2 * 16
    rows = pq.read_table(tmp_path / "out" / "manifest").to_pylist()
    combos = {(r[C.PROMPT], r[C.SEED], r[C.DECODER_GUIDANCE], r[C.HEIGHT], r[C.WIDTH], r[C.PRIOR_CHECKPOINT])
              for r in rows}
    assert len(combos) == len(rows) == 32 and len({r[C.ROW_ID] for r in rows}) == 32
    assert {r[C.SEED] for r in rows} == {1, 2} and {r[C.DECODER_GUIDANCE] for r in rows} == {0.0, 2.0}
    assert {r[C.PRIOR_CHECKPOINT] for r in rows} == {prior_id(a), prior_id({"interpolate": [a, b], "alpha": 0.5})}
    for row in rows:
        from PIL import Image

        assert Image.open(row[C.IMAGE_URI]).size == (row[C.WIDTH], row[C.HEIGHT])


def test_planning_100k_prompts_by_100_combinations_keeps_driver_memory_flat(tmp_path):
    pq.write_table(pa.table({C.PROMPT: [f"prompt {i}" for i in range(100_000)]}), tmp_path / "p.parquet")
    spec = spec_from_dict({"prompts": str(tmp_path / "p.parquet"), "output": str(tmp_path / "o"),
                           "sweep": {"seed": list(range(10)), "decoder_guidance_scale": [float(g) for g in range(10)]}})
    tracemalloc.start()
    buckets = count_buckets(spec, scan(spec))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert sum(b.images for b in buckets) == 10_000_000
    assert peak < 64 * 2**20, f"planning held {peak / 2**20:.0f} MiB"
