"""scores.parquet: each manifest row once, with its own scores and params; a row without a score is an error."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import eval_scores as S
from jobs import evaluate as J
from jobs.spec import SpecError
from stages import columns as C
from stages import evaluate as E


def make_run(root, n: int, parts: int = 3) -> tuple[str, pa.Table]:
    """A manifest of `n` rows in `parts` parts (ids in no order) and its score parts, cut elsewhere."""
    rng = np.random.default_rng(0)
    ids = np.asarray([f"{i:05x}" for i in rng.permutation(n)])
    manifest = pa.table({C.ROW_ID: ids, C.PROMPT: [f"prompt {i}" for i in ids], C.IMAGE_URI: [f"{i}.png" for i in ids],
                         C.ERROR: pa.nulls(n, pa.string()), C.SEED: np.arange(n), C.FINISHED_AT: np.ones(n),
                         "style": pa.array([["a", "b"][i % 2] for i in range(n)])})
    (root / "manifest").mkdir(parents=True)
    for k, cut in enumerate(np.array_split(np.arange(n), parts)):
        pq.write_table(manifest.take(cut), root / "manifest" / f"part-{k}.parquet")
    scores = pa.table({C.ROW_ID: ids, E.CLIP_SCORE: rng.random(n) * 30,
                       E.EVAL_ERROR: pa.array([None if i % 50 else "cannot read" for i in range(n)], pa.string()),
                       E.CLIP_TRUNCATED: pa.array([i % 7 == 0 for i in range(n)])})
    (root / "eval" / "scores.parts").mkdir(parents=True)
    for k, cut in enumerate(np.array_split(rng.permutation(n), 7)):
        pq.write_table(scores.take(cut), root / "eval" / "scores.parts" / f"{k}.parquet")
    return str(root), manifest.join(scores, C.ROW_ID)


def test_scores_file_holds_each_manifest_row_once_in_row_id_order(ray_cluster, tmp_path):
    """5000 rows, a block scored twice (a retried task): one file, every row once with its scores and params."""
    run, expected = make_run(tmp_path / "run", 5000)
    pq.write_table(pq.read_table(f"{run}/eval/scores.parts/3.parquet"), f"{run}/eval/scores.parts/3-again.parquet")
    S.write_scores(run, J.check_run(run, (), {}), {})
    got = pq.read_table(f"{run}/eval/scores.parquet")
    assert got.column_names == [C.ROW_ID, E.CLIP_SCORE, E.EVAL_ERROR, E.CLIP_TRUNCATED, C.PROMPT, C.IMAGE_URI,
                                C.SEED, "style"]
    assert got.column(C.ROW_ID).to_pylist() == sorted(expected.column(C.ROW_ID).to_pylist())
    assert got.equals(expected.sort_by(C.ROW_ID).select(got.column_names))
    assert not (tmp_path / "run" / "eval" / "scores.parts").exists()


def test_a_manifest_row_without_a_score_is_named_and_no_file_is_left(ray_cluster, tmp_path):
    run, expected = make_run(tmp_path / "run", 3000)
    part = f"{run}/eval/scores.parts/5.parquet"
    table = pq.read_table(part)
    dropped = table.column(C.ROW_ID)[17].as_py()
    pq.write_table(table.filter(pa.compute.not_equal(table.column(C.ROW_ID), dropped)), part)
    with pytest.raises(SpecError, match=f"the manifest row {dropped} has no score"):
        S.write_scores(run, J.check_run(run, (), {}), {})
    assert not list((tmp_path / "run" / "eval").glob("*scores.parquet*"))


def batches(table: pa.Table, sizes) -> list[pa.Table]:
    cuts = np.cumsum([0, *sizes])
    return [table.slice(a, b - a) for a, b in zip(cuts[:-1], cuts[1:])]


@pytest.mark.parametrize("params_sizes, scores_sizes", [([5, 0, 7, 8], [1, 19]), ([20], [3, 3, 3, 3, 8]),
                                                        ([1] * 20, [20])])
def test_aligned_pairs_rows_whatever_the_batches(params_sizes, scores_sizes):
    ids = pa.array([f"id{i:03d}" for i in range(20)])
    params = pa.table({C.ROW_ID: ids, "p": np.arange(20)})
    scores = pa.table({C.ROW_ID: ids, E.CLIP_SCORE: np.arange(20) * 1.5, E.EVAL_ERROR: pa.nulls(20, pa.string()),
                       E.CLIP_TRUNCATED: pa.nulls(20, pa.bool_())})
    pairs = list(S.aligned(batches(params, params_sizes), batches(scores, scores_sizes), "RUN"))
    assert pa.concat_tables([b for b, _ in pairs]).equals(params)
    assert pa.concat_tables([s for _, s in pairs]).equals(scores.select(list(S.SCORES)))
    doubled = pa.concat_tables([scores.slice(0, 8), scores.slice(7, 13)])  # id007 twice, across two batches
    assert len(list(S.aligned(batches(params, params_sizes), batches(doubled, [8, 13]), "RUN"))) == len(pairs)
    with pytest.raises(SpecError, match="RUN: the manifest row id019 has no score"):
        list(S.aligned(batches(params, params_sizes), [scores.slice(0, 19)], "RUN"))
    with pytest.raises(SpecError, match="a score for id020, a row not in the manifest"):
        list(S.aligned([params], [scores, pa.table({C.ROW_ID: ["id020"], E.CLIP_SCORE: [1.0],
                                                    E.EVAL_ERROR: pa.nulls(1, pa.string()),
                                                    E.CLIP_TRUNCATED: pa.nulls(1, pa.bool_())})], "RUN"))
    twice = pa.concat_tables([params.slice(0, 8), params.slice(7, 13)])  # id007 in the manifest twice
    for sizes in ([8, 13], [7, 14], [21]):  # across a batch boundary, or within a batch
        with pytest.raises(SpecError, match="RUN: the manifest holds row id007 more than once"):
            list(S.aligned(batches(twice, sizes), batches(scores, scores_sizes), "RUN"))


def test_failures_are_counted_streaming_and_listed_up_to_a_cap(tmp_path):
    """metrics.json lists the first failures (up to a cap) and counts them all, from scores.parquet in batches."""
    from jobs.eval_report import read_failures

    n = 150_000
    errors = [None] * n
    for i in (3, 70_000, 70_001, 140_000, n - 1):
        errors[i] = f"unreadable {i}"
    (tmp_path / "eval").mkdir()
    pq.write_table(pa.table({C.ROW_ID: [f"r{i}" for i in range(n)], E.EVAL_ERROR: errors}),
                   tmp_path / "eval" / "scores.parquet")
    listed, count, _ = read_failures(str(tmp_path), {}, most=3)
    assert count == 5
    assert listed == [{"row_id": f"r{i}", "error": f"unreadable {i}"} for i in (3, 70_000, 70_001)]


def test_a_manifest_row_written_twice_is_named_and_no_file_is_left(ray_cluster, tmp_path):
    """A row in two manifest parts (two invocations wrote the output): its image would count twice; one line."""
    run, expected = make_run(tmp_path / "run", 3000)
    twice = pq.read_table(f"{run}/manifest/part-1.parquet").slice(40, 1)
    pq.write_table(twice, f"{run}/manifest/part-9.parquet")
    with pytest.raises(SpecError, match=f"the manifest holds row {twice.column(C.ROW_ID)[0]} more than once"):
        S.write_scores(run, J.check_run(run, (), {}), {})
    assert not list((tmp_path / "run" / "eval").glob("*scores.parquet*"))


def test_a_plot_by_prior_steps_shows_the_default_schedule_and_counts_what_it_shows():
    from jobs.eval_report import plot_spec

    rows = [{"value": None, "count": 8, "clip_score": 0.31, "fid": None},  # sweep: {prior_steps: [null, 2, 4]}
            {"value": 2, "count": 8, "clip_score": 0.25, "fid": None},
            {"value": 4, "count": 3, "clip_score": None, "fid": None}]  # no score: not shown, not counted
    plot = plot_spec("prior_steps", rows, "clip_score")
    assert plot == dict(points=[(2, 0.25, 8)], lines=[(0.31, "prior_steps default (n=8)")],
                        title="clip_score by prior_steps (16 images)")
    assert plot_spec("prior_steps", rows, "fid") is None


def test_truncated_prompts_are_counted_over_the_scored_images(tmp_path):
    from jobs.eval_report import truncated_prompts

    (tmp_path / "eval").mkdir()
    pq.write_table(pa.table({E.EVAL_ERROR: [None, None, "cannot read", None],
                             E.CLIP_TRUNCATED: [True, False, True, None]}), tmp_path / "eval" / "scores.parquet")
    assert truncated_prompts(str(tmp_path), {}) == 1  # the unread image's prompt is not a score read cut short
