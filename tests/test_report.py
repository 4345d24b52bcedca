"""The run report on a hand-made run folder (real PNGs, a manifest with a failure and a 2-axis sweep)."""

from __future__ import annotations

import argparse
import colorsys
import io
import json
import posixpath
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from jobs.report import add_parser, build_report, record_run, run_from_args
from stages import columns as C
from stages.storage import join, url_to_fs, write_atomic
from stages.writer import MANIFEST_SCHEMA

SWEPT = 'a red <b>cube</b> & "friends"'  # markup in a prompt must come out as text
NODE = {C.TEXT_NODE: "a" * 56, C.PRIOR_NODE: "b" * 56}


@pytest.fixture(scope="session")
def model_cache():
    """This module needs no model: skip building the tiny preset (conftest's autouse fixture)."""


def manifest_rows(image_uri) -> list[dict]:
    """9 rows: seeds 1-3 × decoder guidance 0/2 for SWEPT, two sizes of one prompt, one failed row."""
    params = [(SWEPT, s, g, 128, 128) for s in (1, 2, 3) for g in (0.0, 2.0)] + [
        ("a blue sphere", 0, 0.0, 128, 128), ("a blue sphere", 0, 0.0, 128, 256),
        ("a broken prompt", 0, 0.0, 128, 128)]
    rows = []
    for i, (prompt, seed, guidance, height, width) in enumerate(params):
        row_id = f"{i:02d}" + "f" * 30
        failed = prompt == "a broken prompt"
        rows.append({C.ROW_ID: row_id, C.PROMPT: prompt, C.NEGATIVE_PROMPT: "", C.SEED: seed, C.HEIGHT: height,
                     C.WIDTH: width, C.PRIOR_STEPS: None, C.PRIOR_GUIDANCE: 4.0, C.DECODER_STEPS: 12,
                     C.DECODER_GUIDANCE: guidance, C.IMAGE_INDEX: 0, C.CHECKPOINT: "prior=tiny decoder=tiny",
                     C.IMAGE_URI: None if failed else image_uri(row_id),
                     C.ERROR: "Stage C output is not finite" if failed else None,
                     C.TEXT_SECONDS: 0.01, C.PRIOR_SECONDS: 0.1, C.DECODER_SECONDS: 0.5, C.FINISHED_AT: 1.7e9 + i,
                     **NODE, C.DECODER_NODE: "c" * 56 if i % 3 else "d" * 56, "source": f"p.parquet:{i}"})
    return rows


def make_run(output: str, storage_options: dict) -> list[dict]:
    """Write job.yaml, PNGs and a manifest (one row repeated in a second file, as a retried block) under output."""
    fs, root = url_to_fs(output, storage_options)
    uri = fs.unstrip_protocol if "://" in output else (lambda p: p)
    rows = manifest_rows(lambda row_id: uri(join(root, "images", row_id[:2], f"{row_id}.png")))
    job = {"output": output, "storage_options": storage_options, "model": {"prior": "tiny", "decoder": "tiny"},
           "generation": {"images_per_prompt": 3}, "sweep": {"decoder_guidance_scale": [0, 2], "resolution": []}}
    write_atomic(fs, join(root, "job.yaml"), yaml.safe_dump(job).encode())
    # Two invocations as generate records them: one cut off (no end), one that made 5 rows in 10 s.
    record_run(output, storage_options, 1.7e9 - 100)
    record_run(output, storage_options, 1.7e9 - 2, ended_at=1.7e9 + 8, made=5)
    for row in rows:
        if row[C.IMAGE_URI]:
            buffer = io.BytesIO()
            Image.fromarray(row_pixels(row)).save(buffer, format="PNG")
            write_atomic(fs, join(root, "images", row[C.ROW_ID][:2], f"{row[C.ROW_ID]}.png"), buffer.getvalue())
    schema = MANIFEST_SCHEMA.append(pa.field("source", pa.string()))
    for name, part in (("a", rows), ("b", rows[:1])):
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(part, schema=schema), sink)
        write_atomic(fs, join(root, "manifest", f"{name}.parquet"), sink.getvalue())
    return rows


def quadrant_colours(row: dict) -> np.ndarray:
    """(2, 2, 3) saturated colours of a row's image quadrants; golden-ratio hues make every row's unlike the others'."""
    index = int(row[C.ROW_ID][:2])
    hues = [((4 * index + q) * 0.618034) % 1 for q in range(4)]
    return np.asarray([colorsys.hsv_to_rgb(h, 1.0, 0.9) for h in hues]).reshape(2, 2, 3) * 255


def row_pixels(row: dict) -> np.ndarray:
    """A row's image: its four quadrant colours at its size."""
    h, w = row[C.HEIGHT], row[C.WIDTH]
    colours = quadrant_colours(row).round().astype(np.uint8)
    return colours.repeat(h // 2, axis=0).repeat(w // 2, axis=1)


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64)


def shrunk(row: dict, size: tuple[int, int]) -> np.ndarray:
    """The row's image box-filtered to (width, height) with PIL, not the report's code."""
    return np.asarray(Image.fromarray(row_pixels(row)).resize(size, Image.Resampling.BOX), dtype=np.float64)


def check_images_tied_to_rows(page: "Node", rows: list[dict], read) -> None:
    """Each thumbnail shows its own row's image, links to that row's image file, and sits where that row belongs.

    read(path relative to report/) → bytes. The row comes from the <img>'s alt; its place (grid cell or caption)
    and the decoded thumbnail and link must all agree with it.
    """
    by_id = {r[C.ROW_ID]: r for r in rows if r[C.IMAGE_URI]}
    for section in page.find("section", "sweep"):
        varying = section.find("p")[0].text()
        header, *body = section.find("table", "grid")[0].find("tr")
        columns = [th.text() for th in header.find("th")[1:]]
        for tr in body:
            for column, td in zip(columns, tr.find("td")):
                place = f"{tr.find('th')[0].text()}, {column}".split(", ")  # the cell's row and column labels
                for img in td.find("img"):
                    row = by_id[img.attrs["alt"]]
                    labels = {C.SEED: f"seed = {row[C.SEED]}",
                              C.DECODER_GUIDANCE: f"decoder_guidance_scale = {row[C.DECODER_GUIDANCE]:g}",
                              "resolution": f"resolution = {row[C.HEIGHT]}x{row[C.WIDTH]}"}
                    assert row[C.PROMPT] == section.find("h3")[0].text()
                    assert all(label in place for axis, label in labels.items() if axis in varying), place
    sheet = page.find("div", "sheet")[0].find("figure")
    assert sorted(f.find("img")[0].attrs["alt"] for f in sheet) == sorted(by_id)  # every image once on the sheet
    for figure in sheet:
        row = by_id[figure.find("img")[0].attrs["alt"]]
        assert figure.find("figcaption")[0].text() == (  # the swept values tell a sweep's images apart
            f"{row[C.PROMPT]} · seed {row[C.SEED]} · decoder_guidance_scale {row[C.DECODER_GUIDANCE]:g} · "
            f"resolution {row[C.HEIGHT]}x{row[C.WIDTH]}")
    links = page.find("a")
    assert len(links) == len(page.find("img")) == len(sheet) + 8  # the sheet, 6 + 2 grid cells
    for link in links:
        img = link.find("img")[0]
        row = by_id[img.attrs["alt"]]
        assert img.attrs["src"].startswith("thumbs/")
        thumb = decode(read(img.attrs["src"]))
        height, width = thumb.shape[:2]
        assert max(height, width) == 128 and width * row[C.HEIGHT] == height * row[C.WIDTH]
        own = np.abs(thumb - shrunk(row, (width, height))).mean()
        nearest_other = min(np.abs(thumb - shrunk(r, (width, height))).mean() for r in by_id.values() if r is not row)
        assert own < 4 and nearest_other > 15, (row[C.ROW_ID], own, nearest_other)
        assert np.array_equal(decode(read(link.attrs["href"])), row_pixels(row))  # the link opens the row's image


class Node:
    """An element of a parsed page: tag, attributes, children, text."""

    def __init__(self, tag: str, attrs: dict):
        self.tag, self.attrs, self.children, self.content = tag, attrs, [], []  # content: text and children in order

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.content)

    def find(self, tag: str, cls: str | None = None) -> list[Node]:
        found = [c for c in self.children if c.tag == tag and (cls is None or c.attrs.get("class") == cls)]
        return found + [n for c in self.children for n in c.find(tag, cls)]


class Page(HTMLParser):
    """html.parser into a tree of Nodes (void elements are not pushed)."""

    VOID = {"img", "meta", "br", "link"}

    def __init__(self, text: str):
        super().__init__()
        self.root = Node("root", {})
        self.stack = [self.root]
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs))
        self.stack[-1].children.append(node)
        self.stack[-1].content.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        if tag not in self.VOID:
            assert self.stack.pop().tag == tag, f"unbalanced </{tag}>"

    def handle_data(self, data):
        self.stack[-1].content.append(data)


def parse(path) -> Node:
    with open(path, encoding="utf-8") as f:
        return Page(f.read()).root


@pytest.fixture
def local_run(tmp_path):
    output = str(tmp_path / "run")
    return output, make_run(output, {})


def test_report_counts_failures_sweeps_and_thumbnails(local_run):
    output, rows = local_run
    uri = build_report(output)
    assert uri == f"{output}/report/index.html"
    page = parse(uri)
    summary = {tr.find("th")[0].text(): tr.find("td")[0].text() for tr in page.find("table", "summary")[0].find("tr")}
    assert (summary["rows"], summary["succeeded"], summary["failed"]) == ("9", "8", "1")  # the repeated row counts once
    assert summary["invocations"] == "2 (1 did not finish)"
    assert "Not evaluated: <code>wuerstchen-batch evaluate" in Path(uri).read_text()  # says how to fill it
    assert (summary["wall time of finished invocations"], summary["images made / wall time"]) == (
        "10.0 s", "0.50 images/s")  # the whole span of the invocation, not the last images' spacing
    runs = [[td.text() for td in tr.find("td")] for tr in page.find("table", "runs")[0].find("tr")[1:]]
    assert [r[1:] for r in runs] == [["—", "did not finish", "n/a"], ["5", "10.0", "0.50"]]

    stages = {tr.find("th")[0].text(): [td.text() for td in tr.find("td")]
              for tr in page.find("table", "stages")[0].find("tr")[1:]}
    assert stages["decoder"][:4] == ["9", "4.50", "2.00", "45%"] and stages["text"][4] == "aaaaaaaaaaaa: 9"
    assert stages["decoder"][4] == "cccccccccccc: 6dddddddddddd: 3"

    failed = page.find("table", "failed")[0].find("tr")[1:]
    assert [[td.text() for td in tr.find("td")] for tr in failed] == [
        ["08" + "f" * 30, "a broken prompt", "Stage C output is not finite"]]

    sweeps = {s.find("h3")[0].text(): s for s in page.find("section", "sweep")}
    assert set(sweeps) == {SWEPT, "a blue sphere"}  # the failed prompt's single row is no sweep
    assert any("images_per_prompt = 3" in note.text() for note in page.find("p", "note"))
    grid = sweeps[SWEPT].find("table", "grid")[0]
    header, *body = grid.find("tr")
    assert [th.text() for th in header.find("th")] == [
        "seed ↓ / decoder_guidance_scale →", "decoder_guidance_scale = 0", "decoder_guidance_scale = 2"]
    assert [tr.find("th")[0].text() for tr in body] == ["seed = 1", "seed = 2", "seed = 3"]
    assert [len(td.find("img")) for tr in body for td in tr.find("td")] == [1] * 6
    by_id = {r[C.ROW_ID]: r for r in rows}
    cell = body[0].find("td")[1].find("a")[0]  # seed 1, guidance 2
    shown = by_id[cell.find("img")[0].attrs["alt"]]
    assert (shown[C.SEED], shown[C.DECODER_GUIDANCE]) == (1, 2.0)
    assert cell.attrs["href"] == f"../images/{shown[C.ROW_ID][:2]}/{shown[C.ROW_ID]}.png"

    row = sweeps["a blue sphere"].find("table", "grid")[0].find("tr")
    assert [th.text() for th in row[0].find("th")] == ["resolution", "resolution = 128x128", "resolution = 128x256"]
    assert len(row) == 2 and len(row[1].find("img")) == 2

    check_images_tied_to_rows(page, rows, lambda path: open(f"{output}/report/{path}", "rb").read())
    fs, _ = url_to_fs(output)
    assert len(fs.ls(f"{output}/report/thumbs")) == 8

    text = open(uri, encoding="utf-8").read()
    assert "<b>cube</b>" not in text and "&lt;b&gt;cube&lt;/b&gt; &amp; &quot;friends&quot;" in text
    assert "http://" not in text and "https://" not in text and "<script" not in text


def test_no_grids_without_a_declared_axis(tmp_path):
    """Rows of one prompt with other seeds from the table are no sweep when the job declares none."""
    output = str(tmp_path / "run")
    make_run(output, {})
    fs, root = url_to_fs(output, {})
    write_atomic(fs, join(root, "job.yaml"), yaml.safe_dump({"model": {"prior": "tiny"}}).encode())
    page = parse(build_report(output))
    assert page.find("section", "sweep") == []
    assert "No sweep" in page.text()
    assert len(page.find("div", "sheet")[0].find("figure")) == 8  # every image still on the contact sheet


def test_a_moved_run_shows_its_own_images(tmp_path):
    """A run folder moved (or copied) since it was written: its manifest names the old place; the report reads
    and links the images where the run is now."""
    import shutil

    rows = make_run(str(tmp_path / "run"), {})
    shutil.move(tmp_path / "run", tmp_path / "moved")
    page = parse(build_report(str(tmp_path / "moved")))
    assert "unreadable" not in page.text()
    by_id = {r[C.ROW_ID]: r for r in rows}
    for link in page.find("a"):
        row = by_id[link.find("img")[0].attrs["alt"]]
        assert link.attrs["href"] == f"../images/{row[C.ROW_ID][:2]}/{row[C.ROW_ID]}.png"
        assert np.array_equal(decode((tmp_path / "moved" / "report" / link.attrs["href"]).read_bytes()),
                              row_pixels(row))


def test_a_declared_axis_no_prompt_varies_on_is_no_sweep(tmp_path):
    """A one-value sweep (allowed: a sweep may only gain values later) makes no grid, and the report is written."""
    output = str(tmp_path / "run")
    make_run(output, {})
    fs, root = url_to_fs(output, {})
    write_atomic(fs, join(root, "job.yaml"), yaml.safe_dump({"sweep": {"prior_guidance_scale": [4.0]}}).encode())
    page = parse(build_report(output))
    assert page.find("section", "sweep") == [] and "No sweep" in page.text()
    assert len(page.find("div", "sheet")[0].find("figure")) == 8


def test_report_command_takes_storage_options_from_job_yaml(local_run, capsys):
    output, _ = local_run
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", output])
    assert args.storage_options is None
    assert run_from_args(args) == 0
    assert f"{output}/report/index.html" in capsys.readouterr().out
    args = parser.parse_args(["report", output, "--storage-options", '{"anon": true}'])
    assert args.storage_options == {"anon": True}


def test_report_of_a_folder_without_a_run_is_one_line_and_writes_nothing(tmp_path, capsys):
    from jobs.cli import main

    (tmp_path / "prompts").mkdir()
    for folder in (tmp_path / "prompts", tmp_path / "nowhere"):
        assert main(["report", str(folder)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: report: {folder} is not a run folder (no job.yaml)"
    assert not (tmp_path / "nowhere").exists() and list((tmp_path / "prompts").iterdir()) == []


def test_report_on_s3(s3_server):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("reports")
    output = "s3://reports/run"
    rows = make_run(output, s3_server)
    assert build_report(output, s3_server) == "s3://reports/run/report/index.html"
    page = Page(fs.cat_file("reports/run/report/index.html").decode()).root
    check_images_tied_to_rows(page, rows, lambda path: fs.cat_file(posixpath.normpath(f"reports/run/report/{path}")))
    assert len(fs.ls("reports/run/report/thumbs")) == 8


def test_page_renders_in_headless_chromium(local_run, tmp_path):
    """Chromium's DOM of the page has the summary and every thumbnail; its screenshot shows each row's colours."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    output, rows = local_run
    uri = build_report(output)

    def chromium_run(*args) -> str:
        return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                               "--no-first-run", "--disable-background-networking", "--disable-component-update",
                               "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", *args, f"file://{uri}"],
                              check=True, capture_output=True, text=True, timeout=60).stdout

    page = Page(chromium_run("--dump-dom")).root
    summary = {tr.find("th")[0].text(): tr.find("td")[0].text() for tr in page.find("table", "summary")[0].find("tr")}
    assert page.find("h1")[0].text() == "Run report" and summary["run"] == output
    assert (summary["rows"], summary["succeeded"], summary["failed"]) == ("9", "8", "1")
    assert len(page.find("div", "sheet")[0].find("img")) == 8 and len(page.find("img")) == 16
    shot = tmp_path / "shot.png"
    chromium_run(f"--screenshot={shot}", "--window-size=1200,2400", "--hide-scrollbars")
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.shape == (2400, 1200, 3)
    for row in rows:  # each quadrant's colour covers at least a thumbnail quadrant's worth of pixels
        for colour in quadrant_colours(row).reshape(4, 3) if row[C.IMAGE_URI] else ():
            assert (np.abs(pixels - colour).max(-1) <= 8).sum() >= 1500, (row[C.ROW_ID], colour)


def test_an_unreadable_evaluation_is_said_on_the_page_not_raised(local_run):
    """The report is built at the end of every generate: an edited or older eval/metrics.json must not fail it."""
    output, _ = local_run
    (Path(output) / "eval").mkdir()
    (Path(output) / "eval" / "metrics.json").write_text('{"images": 3}')
    page = Path(build_report(output)).read_text()
    assert "eval/metrics.json could not be shown (&#x27;clip_score&#x27;)" in page and "Contact sheet" in page


def test_the_evaluation_table_names_values_as_the_grid_does(local_run):
    """A swept float is "2" in the grid's headings: the evaluation table beside it said "2.0" (JSON's float)."""
    output, _ = local_run
    (Path(output) / "eval").mkdir()
    by = {C.DECODER_GUIDANCE: [{"value": 2.0, "count": 3, "clip_score": 0.25, "fid": None}],
          "resolution": [{"value": "48x64", "count": 3, "clip_score": 0.25, "fid": None}],
          C.PRIOR_STEPS: [{"value": None, "count": 3, "clip_score": 0.25, "fid": None}]}
    (Path(output) / "eval" / "metrics.json").write_text(json.dumps({"images": 3, "clip_score": 0.25, "fid": 1.5,
                                                                    "by": by}))
    page = Path(build_report(output)).read_text()
    for cell in ("decoder_guidance_scale = 2<", "resolution = 48x64<", "prior_steps = default<"):
        assert f"<td>{cell}" in page, cell
