"""Identical input rows are folded: one row id, one manifest entry, one image, its input rows counted."""

import re
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import write_prompts

from jobs.folding import fold_block
from jobs.generate import run
from jobs.preflight import answered
from jobs.spec import spec_from_dict
from stages import columns as C

SMALL = {"height": 128, "width": 128, "prior_steps": 2, "decoder_steps": 2}


def job(prompts: str, output: str, **generation) -> dict:
    return {"prompts": prompts, "output": output, "generation": {**SMALL, **generation},
            "stages": {name: {"batch_size": 4} for name in ("text", "prior", "decoder")}}


def test_a_block_keeps_the_first_copy_of_each_id_and_counts_the_copies():
    block = pa.table({C.ROW_ID: ["b", "a", "b", "c", "b", "a"], "tag": [0, 1, 2, 3, 4, 5],
                      **{key: [1] * 6 for key in (C.HEIGHT, C.WIDTH, C.PRIOR_STEPS, C.DECODER_STEPS)},
                      C.PRIOR_CHECKPOINT: ["p"] * 6})
    folded = fold_block(block).to_pydict()
    assert sorted(zip(folded[C.ROW_ID], folded["tag"], folded[C.INPUT_ROWS])) == [("a", 1, 2), ("b", 0, 3),
                                                                                   ("c", 3, 1)]


def test_a_folded_block_comes_out_in_shape_order():
    """Rows of one shape side by side: a stage's batch then splits into few shape groups (full micro-batches)."""
    heights = [256, 128, 256, 128, 256, 128]
    block = pa.table({C.ROW_ID: list("abcdef"), C.HEIGHT: heights, C.WIDTH: [128] * 6, C.PRIOR_STEPS: [2] * 6,
                      C.DECODER_STEPS: [2] * 6, C.PRIOR_CHECKPOINT: ["p"] * 6})
    assert fold_block(block).column(C.HEIGHT).to_pylist() == sorted(heights)


def test_the_warning_counts_each_folded_row_whose_own_columns_differ():
    class Counts(dict):
        """What fold_block asks of the Tally actor (`tally.add.remote(key, n)`), kept in this dict."""

        @property
        def add(self):
            return SimpleNamespace(remote=lambda key, n: self.__setitem__(key, self.get(key, 0) + n))

        @property
        def example(self):
            return SimpleNamespace(remote=lambda key, text: self.setdefault(f"{key} example", text))

    block = pa.table({C.ROW_ID: ["b", "a", "a", "a", "b"], C.USER_VALUES: [b"C", b"A", b"B", b"B", b"C"],
                      C.PROMPT: ["pb", "pa", "pa", "pa", "pb"],
                      **{key: [1] * 5 for key in (C.HEIGHT, C.WIDTH, C.PRIOR_STEPS, C.DECODER_STEPS)},
                      C.PRIOR_CHECKPOINT: ["p"] * 5})
    counts = Counts()
    fold_block(block, counts)
    assert counts == {"folded": 3, "folded_other_values": 2,  # a's two B rows; b's copy holds the same C
                      "folded_other_values example": "pa"}


def test_identical_rows_are_made_once_and_counted(tmp_path, ray_cluster, capsys):
    rows = [{C.PROMPT: f"p{i}", C.SEED: i, "caption_id": i} for i in range(6)]
    rows += [{C.PROMPT: "p1", C.SEED: 1, "caption_id": 10}, {C.PROMPT: "p1", C.SEED: 1, "caption_id": 11},
             {C.PROMPT: "p4", C.SEED: 4, "caption_id": 12}]
    rows.append({C.PROMPT: "p4", C.SEED: 5, "caption_id": 13})  # another seed: another row
    prompts = write_prompts(tmp_path / "p.parquet", rows)
    out = tmp_path / "out"
    summary = run(spec_from_dict(job(prompts, str(out))))

    manifest = pq.read_table(out / "manifest").to_pylist()
    ids = [r[C.ROW_ID] for r in manifest]
    assert len(ids) == len(set(ids)) == 7 and summary.rows == 7
    inputs = {(r[C.PROMPT], r[C.SEED]): r[C.INPUT_ROWS] for r in manifest}
    assert inputs == {("p0", 0): 1, ("p1", 1): 3, ("p2", 2): 1, ("p3", 3): 1, ("p4", 4): 2, ("p5", 5): 1,
                      ("p4", 5): 1}
    assert {r["caption_id"] for r in manifest if r[C.PROMPT] == "p1"} <= {1, 10, 11}
    assert len(list((out / "images").rglob("*.png"))) == 7
    assert summary.folded == 3 and "3 identical input rows folded" in str(summary)
    assert re.search(r"warning: 3 input rows made in this run were folded into an identical row \(same prompt and "
                     r"settings\) but hold other values in your own columns than the row the manifest keeps \(first: "
                     r"prompt '(p1|p4)'\)", capsys.readouterr().err)  # their caption ids are not in the manifest
    assert "identical input rows folded" in (out / "report" / "index.html").read_text()
    rerun = answered(spec_from_dict(job(prompts, str(out))), time.time())  # from the footers, without Ray
    assert rerun is not None and rerun.rows == 7 and rerun.folded == 3

    rows.append({C.PROMPT: "p4", C.SEED: 4, "caption_id": 14})  # a later copy of a done row: nothing to make
    write_prompts(tmp_path / "p.parquet", rows)
    again = run(spec_from_dict(job(prompts, str(out))))
    assert again.rows == 7 and again.new == 0
    assert len(pq.read_table(out / "manifest").column(C.ROW_ID)) == 7
    # 11 planned rows, 7 entries standing for 10: the pass that found nothing to make lets the next rerun be
    # answered from the footers (not a pass of the stage pools for nothing at every rerun)
    assert answered(spec_from_dict(job(prompts, str(out))), time.time()) is not None


def test_images_per_prompt_copies_fold_with_the_seeds_they_share(tmp_path, ray_cluster):
    # seeds 0 and 1 with 2 images each: seed 0's second image is seed 1's first
    prompts = write_prompts(tmp_path / "p.parquet", [{C.PROMPT: "same", C.SEED: 0}, {C.PROMPT: "same", C.SEED: 1}])
    out = tmp_path / "out"
    summary = run(spec_from_dict(job(prompts, str(out), images_per_prompt=2)))
    manifest = pq.read_table(out / "manifest").to_pylist()
    assert sorted(r[C.SEED] for r in manifest) == [0, 1, 2] and summary.folded == 1
    assert np.sum([r[C.INPUT_ROWS] for r in manifest]) == 4
    assert len({Path(r[C.IMAGE_URI]).name for r in manifest}) == 3


def test_copies_meet_across_hash_partitions(ray_cluster, monkeypatch):
    import ray

    from jobs import folding

    monkeypatch.setattr(folding, "FOLD_BLOCK_ROWS", 64)  # 6 hash partitions for 360 rows
    rows = [{C.ROW_ID: f"id{i % 120}", "copy": i // 120, C.PRIOR_CHECKPOINT: "p",
             **{key: 1 for key in (C.HEIGHT, C.WIDTH, C.PRIOR_STEPS, C.DECODER_STEPS)}} for i in range(360)]
    ds = ray.data.from_items(rows, override_num_blocks=12)  # every id's three copies in three blocks
    folded = folding.fold_identical(ds, len(rows)).to_pandas()
    assert sorted(folded[C.ROW_ID]) == sorted(f"id{i}" for i in range(120))
    assert (folded[C.INPUT_ROWS] == 3).all()


def test_wide_prompt_rows_are_folded_in_more_partitions(tmp_path, ray_cluster, monkeypatch):
    """A fold partition is one task's memory: rows carrying 5 KB of the user's own columns make partitions by their
    bytes (from the table's footers), not only by their count; copies still meet."""
    from jobs import folding
    from jobs.generate import left_to_make
    from jobs.prompts import scan
    from stages import partitions

    rows = [{C.PROMPT: f"p{i % 40}", C.SEED: i % 40, "notes": "x" * 5000} for i in range(120)]
    wide = scan(spec_from_dict(job(write_prompts(tmp_path / "w.parquet", rows), str(tmp_path / "o"))))
    narrow = scan(spec_from_dict(job(write_prompts(tmp_path / "n.parquet", [{C.PROMPT: "a cat"}]), "unused")))
    assert wide.row_bytes > 5000 > 20 * narrow.row_bytes
    assert partitions.partitions(1000, 10**7, row_bytes=wide.row_bytes) > 5 * partitions.partitions(1000, 10**7)

    monkeypatch.setattr(partitions, "PARTITION_BYTES", 150_000)  # ~28 wide rows a partition: 120 rows make 5
    assert folding.fold_partitions(len(rows), narrow.row_bytes) == 1
    spec = spec_from_dict(job(str(tmp_path / "w.parquet"), str(tmp_path / "o")))
    folded = folding.fold_identical(left_to_make(spec, wide), len(rows), None, wide.row_bytes).materialize()
    assert folded.num_blocks() == folding.fold_partitions(len(rows), wide.row_bytes) == 5
    table = folded.to_pandas()
    assert sorted(table[C.PROMPT]) == sorted(f"p{i}" for i in range(40)) and (table[C.INPUT_ROWS] == 3).all()
