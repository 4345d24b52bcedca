"""Checkpoints as the user named them: a swept prior runs its own weights (checked against diffusers'
WuerstchenPriorPipeline on that checkpoint), priors with other conditioning are refused, and a per-row
`prior_checkpoint` column is refused before any model work."""

import functools
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_prompts
from diffusers import DDPMWuerstchenScheduler
from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior, WuerstchenPriorPipeline
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

from jobs.generate import run
from jobs.preflight import preflight
from jobs.spec import SpecError, spec_from_dict
from stages import columns as C
from stages.models import prior_id

PROMPTS = [{C.PROMPT: "a lighthouse", C.SEED: 11}, {C.PROMPT: "a red fox", C.SEED: 12}]
GENERATION = {"height": 128, "width": 128, "prior_steps": 2, "decoder_steps": 2}


def perturbed(source, target, file, seed):
    """A copy of the prior folder `source` whose weights in `file` are moved by noise."""
    shutil.copytree(source, target)
    tensors = load_file(target / file)
    gen = torch.Generator().manual_seed(seed)
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in tensors.items()}, target / file)
    return target


@pytest.fixture(scope="module")
def priors(model_cache, tmp_path_factory):
    """A (the tiny prior), B (other Stage C weights), and priors whose text encoder, scheduler, latent settings
    or Stage C architecture differ from A's."""
    root, a = tmp_path_factory.mktemp("priors"), model_cache / "prior"
    b = perturbed(a, root / "B", "prior/diffusion_pytorch_model.safetensors", 1)
    text = perturbed(a, root / "text", "text_encoder/model.safetensors", 2)
    shutil.copytree(a, root / "scheduler")
    config = json.loads((root / "scheduler" / "scheduler" / "scheduler_config.json").read_text())
    (root / "scheduler" / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "s": 0.02}))
    shutil.copytree(a, root / "latent")
    index = json.loads((root / "latent" / "model_index.json").read_text())
    (root / "latent" / "model_index.json").write_text(json.dumps({**index, "latent_mean": 40.0}))
    shutil.copytree(a, root / "heads")  # the same weight shapes: load_state_dict would take them silently
    config = json.loads((root / "heads" / "prior" / "config.json").read_text())
    (root / "heads" / "prior" / "config.json").write_text(json.dumps({**config, "nhead": 2 * config["nhead"]}))
    shutil.copytree(a, root / "respelt")  # the same settings written otherwise, and a dropout (no shape) changed
    index = json.loads((root / "respelt" / "model_index.json").read_text())
    (root / "respelt" / "model_index.json").write_text(json.dumps({**index, "latent_std": int(index["latent_std"])}))
    (root / "respelt" / "prior" / "config.json").write_text(json.dumps({**config, "dropout": 0.0}))
    return {name: str(path) for name, path in (("A", a), ("B", b), ("text", text), ("scheduler", root / "scheduler"),
                                               ("latent", root / "latent"), ("heads", root / "heads"),
                                               ("respelt", root / "respelt"))}


@functools.cache
def prior_pipeline_embeddings(checkpoint: str, prompt: str, seed: int) -> np.ndarray:
    """What diffusers' WuerstchenPriorPipeline makes on `checkpoint` for one row: (16, h, w)."""
    return prior_pipeline(checkpoint)(
        prompt, height=GENERATION["height"], width=GENERATION["width"], num_inference_steps=GENERATION["prior_steps"],
        guidance_scale=4.0, negative_prompt="", generator=torch.Generator().manual_seed(seed),
        output_type="pt").image_embeddings[0].numpy()


@functools.cache
def prior_pipeline(checkpoint: str) -> WuerstchenPriorPipeline:
    """diffusers' prior pipeline from a checkpoint's own components and latent settings."""
    index = json.loads(open(f"{checkpoint}/model_index.json").read())
    pipe = WuerstchenPriorPipeline(
        tokenizer=CLIPTokenizer.from_pretrained(checkpoint, subfolder="tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(checkpoint, subfolder="text_encoder"),
        prior=WuerstchenPrior.from_pretrained(checkpoint, subfolder="prior"),
        scheduler=DDPMWuerstchenScheduler.from_pretrained(checkpoint, subfolder="scheduler"),
        latent_mean=index["latent_mean"], latent_std=index["latent_std"],
        resolution_multiple=index["resolution_multiple"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_checkpoint_sweep_runs_each_named_checkpoint(tmp_path, ray_cluster, priors):
    a, b = priors["A"], priors["B"]
    spec = spec_from_dict({"prompts": write_prompts(tmp_path / "p.parquet", PROMPTS), "output": str(tmp_path / "out"),
                           "model": {"prior": a}, "generation": GENERATION, "sweep": {"prior_checkpoint": [a, b]},
                           "stages": {"text": {"batch_size": 4}, "prior": {"batch_size": 4},
                                      "decoder": {"batch_size": 4}}})
    assert run(spec).rows == 4
    stored = pq.read_table(tmp_path / "out" / "embeddings").to_pylist()
    assert sorted((r[C.PROMPT], r[C.PRIOR_CHECKPOINT]) for r in stored) == sorted(
        (p[C.PROMPT], prior_id(c)) for p in PROMPTS for c in (a, b))
    for row in stored:
        checkpoint = json.loads(row[C.PRIOR_CHECKPOINT])
        embeddings = np.asarray(row[C.IMAGE_EMBEDDINGS], dtype=np.float32).reshape(row[C.EMBEDDING_SHAPE])
        expected = prior_pipeline_embeddings(checkpoint, row[C.PROMPT], row[C.SEED])
        other = prior_pipeline_embeddings(b if checkpoint == a else a, row[C.PROMPT], row[C.SEED])
        error = np.abs(embeddings - expected).max()
        assert error <= 5e-5 * np.abs(expected).max()  # each row has its own checkpoint's embeddings (float32
        assert error < 0.001 * np.abs(expected - other).mean()  # rounding), far from the other checkpoint's


@pytest.mark.parametrize("other, part", [("text", "text encoder"), ("scheduler", "scheduler"),
                                         ("latent", "latent settings"), ("heads", "Stage C architecture")])
@pytest.mark.parametrize("where", ["sweep", "interpolation"])
def test_a_checkpoint_with_other_conditioning_is_refused(tmp_path, priors, other, part, where):
    a, b = priors["A"], priors[other]
    data = {"prompts": write_prompts(tmp_path / "p.parquet", PROMPTS), "output": str(tmp_path / "out")}
    if where == "sweep":
        data.update(model={"prior": a}, sweep={"prior_checkpoint": [a, priors["B"], b]})
        name = "sweep.prior_checkpoint[2]"
    else:
        data.update(model={"prior": {"interpolate": [a, b], "alpha": 0.5}})
        name = "model.prior"
    with pytest.raises(SpecError) as err:
        preflight(spec_from_dict(data))
    message = str(err.value)
    assert message.startswith(f"{name}: the {part} of {b} differs") and "\n" not in message
    setting = {"text": " (text_encoder/model.safetensors)", "scheduler": " (scheduler/scheduler_config.json)",
               "latent": " (latent_mean: 40.0, not 42.0)", "heads": " (nhead: 4, not 2)"}[other]
    assert f"model.prior's ({a}){setting};" in message


def test_a_sweep_of_compatible_checkpoints_passes_preflight(tmp_path, priors):
    data = {"prompts": write_prompts(tmp_path / "p.parquet", PROMPTS), "output": str(tmp_path / "out"),
            "model": {"prior": priors["A"]},
            "sweep": {"prior_checkpoint": [priors["B"], {"interpolate": [priors["A"], priors["B"]], "alpha": 0.3},
                                           priors["respelt"]]}}
    assert preflight(spec_from_dict(data)).rows == 2


def test_a_prior_checkpoint_column_is_refused_naming_it(tmp_path):
    rows = [{**p, C.PRIOR_CHECKPOINT: "somewhere/else"} for p in PROMPTS]
    spec = spec_from_dict({"prompts": write_prompts(tmp_path / "p.parquet", rows), "output": str(tmp_path / "o")})
    with pytest.raises(SpecError, match="prompts: column 'prior_checkpoint' in .*p.parquet is set by the job"):
        preflight(spec)
