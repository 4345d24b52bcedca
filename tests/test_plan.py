"""Plan: buckets and per-stage FLOPs from the models' configs, and the suggested actor ratio."""

import re

import pytest
import torch
from conftest import write_prompts
from diffusers import DDPMWuerstchenScheduler
from diffusers.pipelines.deprecated.wuerstchen.pipeline_wuerstchen_prior import DEFAULT_STAGE_C_TIMESTEPS

import jobs.plan as plan_module
from jobs.plan import Bucket, bucket_flops, count_buckets, meta_models, plan
from jobs.prompts import scan
from jobs.spec import spec_from_dict
from stages import columns as C
from stages.denoise import schedule


def job(tmp_path, rows, sweep=None, **generation):
    return spec_from_dict({"prompts": write_prompts(tmp_path / "p.parquet", rows), "output": str(tmp_path / "o"),
                           "generation": {"height": 128, "width": 128, **generation}, "sweep": sweep or {}})


def test_buckets_count_images_by_shape_steps_and_guidance(tmp_path):
    rows = [{C.PROMPT: "a"}, {C.PROMPT: "b", C.HEIGHT: 256}, {C.PROMPT: "c", C.HEIGHT: 256},
            {C.PROMPT: "d", C.DECODER_GUIDANCE: 3.0}, {C.PROMPT: "e", C.PRIOR_GUIDANCE: 7.0},
            {C.PROMPT: "f", C.PRIOR_GUIDANCE: 1.0, C.DECODER_GUIDANCE: 1.0}]  # 1.0: guidance off, as diffusers' > 1
    spec = job(tmp_path, rows, images_per_prompt=3)
    buckets = count_buckets(spec, scan(spec))
    assert sum(b.images for b in buckets) == 18
    by_key = {(b.height, b.prior_cfg, b.decoder_cfg): b.images for b in buckets}
    assert by_key == {(128, True, False): 6, (256, True, False): 6, (128, True, True): 3,
                      (128, False, False): 3}  # guidance 4 vs 7: same bucket


def test_flops_follow_steps_and_guidance(tmp_path):
    models = meta_models(job(tmp_path, [{C.PROMPT: "a"}]))
    base = bucket_flops(models, Bucket(128, 128, 2, False, 2, False, 1))
    one = bucket_flops(models, Bucket(128, 128, 1, False, 2, False, 1))["prior"]
    step, once = base["prior"] - one, 2 * one - base["prior"]  # the text's keys and values: once, not per step
    assert once > 0 and step > 0
    default = bucket_flops(models, Bucket(128, 128, 0, True, 2, False, 1))["prior"]  # guidance: two branches
    assert default == pytest.approx(2 * (once + 29 * step), rel=1e-9)
    scheduler = DDPMWuerstchenScheduler()
    scheduler.set_timesteps(timesteps=DEFAULT_STAGE_C_TIMESTEPS)  # as Stage C sets it for prior_steps null
    assert schedule(scheduler, torch.device("cpu")).steps == 29
    bigger = bucket_flops(models, Bucket(256, 256, 2, False, 2, False, 1))
    assert bigger["decoder"] > 3 * base["decoder"]


def test_official_shapes_cost_about_104_tflop_at_1024(tmp_path, monkeypatch):
    monkeypatch.setattr(plan_module, "_config", lambda *args: None)  # as if the hub were unreachable
    models = meta_models(job(tmp_path, [{C.PROMPT: "a"}]))
    flops = bucket_flops(models, Bucket(1024, 1024, 0, True, 12, False, 1))  # the defaults
    total = sum(flops.values()) / 1e12
    assert 95 < total < 97.5  # 95.9 as the stages run it; diffusers' forward, text and effnet terms per step: 103.6
    assert 0.6 < flops["prior"] / (total * 1e12) < 0.7 and flops["text"] / (total * 1e12) < 0.01


def figures(report: str) -> tuple[list[list[str]], dict[str, float], dict[str, str]]:
    """A report's per-bucket TFLOP figures (text, prior, decoder), its totals in PFLOP and its suggested ratio."""
    rows = [line.split()[-5::2] for line in report.splitlines() if re.match(r"  \d+x\d+ ", line)]
    totals = {stage: float(v) for stage, v in re.findall(r"(\w+) (\S+) PFLOP", report)}
    ratio = dict(part.split() for part in report.split("(per decoder GPU): ")[1].strip().split(" : "))
    return rows, totals, ratio


def test_plan_report(tmp_path):
    rows = [{C.PROMPT: "a"}, {C.PROMPT: "b", C.WIDTH: 256}]
    spec = job(tmp_path, rows, prior_steps=2, decoder_steps=2)
    report = plan(spec)
    assert "2 prompt rows → 2 images in 2 bucket(s) (at most: identical rows" in report
    assert "unconditional" not in report
    models = meta_models(spec)
    expected = [bucket_flops(models, b) for b in count_buckets(spec, scan(spec))]  # each counted afresh
    shown, totals, ratio = figures(report)
    assert shown == [[f"{f[s] / 1e12:.3g}" for s in ("text", "prior", "decoder")] for f in expected]
    whole = {s: sum(f[s] for f in expected) for s in ("text", "prior", "decoder")}
    assert totals == {s: pytest.approx(whole[s] / 1e15, rel=5e-3) for s in whole}
    assert ratio == {s: f"{whole[s] / whole['decoder']:.2g}" for s in whole}
    alone = []  # each row's bucket planned by itself
    for i, row in enumerate(rows):
        (tmp_path / str(i)).mkdir()
        alone.append(figures(plan(job(tmp_path / str(i), [row], prior_steps=2, decoder_steps=2)))[1])
    assert totals == {s: pytest.approx(alone[0][s] + alone[1][s], rel=5e-3) for s in whole}


def test_plan_counts_each_size_once(tmp_path, monkeypatch):
    calls, count = [], plan_module.size_flops
    monkeypatch.setattr(plan_module, "size_flops", lambda models, h, w: calls.append((h, w)) or count(models, h, w))
    spec = job(tmp_path, [{C.PROMPT: "a"}, {C.PROMPT: "b", C.WIDTH: 256}],
               sweep={"prior_steps": [None, 1, 2], "decoder_steps": [1, 2], "prior_guidance_scale": [1.0, 4.0]})
    report = plan(spec)
    assert "in 24 bucket(s)" in report and len(figures(report)[0]) == 24
    assert sorted(calls) == [(128, 128), (128, 256)]
