"""The run report: counts, timings, nodes, sweep grids and a contact sheet on one offline HTML page."""

from __future__ import annotations

import argparse
import io
import json
import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from html import escape
from pathlib import PurePosixPath
from urllib.parse import quote

from PIL import Image

from jobs.report_data import (MAX_FAILED, STAGES, ManifestView, _order, axis_value, declared_axes,
                              images_per_prompt, read_view)
from stages import columns as C
from stages import output as output_folder
from stages.credentials import options_arg, usable
from stages.samples import read_image_bytes, relocated, relocation
from stages.storage import full_uri, join, outer_uri, url_to_fs, write_atomic

log = logging.getLogger(__name__)
THUMB_PX = 128  # longest side of a thumbnail
THREADS = 16  # thumbnail workers (image I/O may be remote)
CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f3f3f3}td.num{text-align:right}img{display:block;border:0}
.sheet{display:flex;flex-wrap:wrap;gap:6px}.sheet figure{margin:0;width:128px;font-size:11px}
figcaption{overflow:hidden;white-space:nowrap;text-overflow:ellipsis}.bad{color:#b00020}
.grid td{text-align:center}.grid td a{display:inline-block;margin:1px}.note{color:#666}code{font-size:90%}"""


def build_report(output: str, storage_options: dict | None = None) -> str:
    """Write <output>/report/index.html and its thumbnails; return the page's URI. The manifest is read with
    Arrow, streaming (see report_data): only the rows the page shows become Python rows."""
    job = output_folder.read_job(output, storage_options or {})
    options = storage_options if storage_options is not None else usable(job.get("storage_options") or {})
    fs, root = url_to_fs(output, options)
    view = read_view(output, options, declared_axes(job))
    shown = view.sheet + [r for _, _, group, _ in view.sweeps for r in group]
    here = relocation(output)  # a run moved or copied since: its own images, where they are now
    for row in shown:
        row[C.IMAGE_URI] = relocated(row[C.IMAGE_URI], here)
    thumbs = make_thumbs(fs, join(root, output_folder.REPORT, "thumbs"), {r[C.ROW_ID]: r for r in shown}.values(),
                         options)
    from jobs.eval_report import eval_html  # its module imports torch: not for `report --help`

    page = render(output, job, view, lambda row: thumb_html(row, thumbs, full_uri(fs, root)), read_runs(fs, root),
                  eval_html(fs, root))
    path = join(root, output_folder.REPORT, "index.html")
    write_atomic(fs, path, page.encode())
    return full_uri(fs, path)


def record_run(output: str, storage_options: dict, started_at: float, **fields) -> None:
    """Write <output>/runs/<start>.json: an invocation's start, and at its end `ended_at` and `made`."""
    fs, root = url_to_fs(output, storage_options)
    record = {"started_at": started_at, **fields}
    write_atomic(fs, join(root, output_folder.RUNS, f"{started_at:.6f}.json"), json.dumps(record).encode())


def read_runs(fs, root: str) -> list[dict]:
    """The invocation records of a run folder, oldest first."""
    folder = join(root, output_folder.RUNS)
    if not fs.exists(folder):
        return []
    runs = [json.loads(fs.cat_file(path)) for path in fs.find(folder) if path.endswith(".json")]
    return sorted(runs, key=lambda r: r["started_at"])


def wall_seconds(runs: list[dict]) -> float:
    """The summed span of the invocations that finished."""
    return sum(r["ended_at"] - r["started_at"] for r in runs if r.get("ended_at"))


def make_thumbs(fs, folder: str, rows, storage_options: dict) -> set[str]:
    """Write <folder>/<row_id>.jpg for every row with an image, in parallel; the row ids that have one."""
    todo = [r for r in rows if r[C.IMAGE_URI]]
    with ThreadPoolExecutor(THREADS) as pool:
        made = list(pool.map(lambda r: make_thumb(fs, folder, r, storage_options), todo))
    return {r[C.ROW_ID] for r, ok in zip(todo, made) if ok}


def make_thumb(fs, folder: str, row: dict, storage_options: dict) -> bool:
    """Thumbnail one image; False (logged) when its image cannot be read."""
    try:
        with Image.open(io.BytesIO(read_image_bytes(row[C.IMAGE_URI], storage_options))) as image:
            image.thumbnail((THUMB_PX, THUMB_PX))
            image = image.convert("RGB")
    except Exception as err:  # noqa: BLE001 — one unreadable image must not sink the report
        log.warning("report: cannot read %s: %s", row[C.IMAGE_URI], err)
        return False
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    write_atomic(fs, join(folder, f"{row[C.ROW_ID]}.jpg"), buffer.getvalue())
    return True


def image_link(uri: str, root_uri: str) -> str:
    """A link relative to report/ for images inside the run folder, else the URI (file:// for paths)."""
    base, uri = root_uri.rstrip("/") + "/", outer_uri(uri)  # a WebDataset sample links its shard
    if uri.startswith(base):
        return "../" + quote(uri[len(base):])
    return PurePosixPath(uri).as_uri() if uri.startswith("/") else uri


def thumb_html(row: dict, thumbs: set[str], root_uri: str) -> str:
    """A row's thumbnail linked to its image, or why there is none."""
    if not row[C.IMAGE_URI]:
        return f'<span class="bad" title="{escape(row[C.ERROR] or "")}">failed</span>'
    if row[C.ROW_ID] not in thumbs:
        return f'<span class="bad" title="{escape(row[C.IMAGE_URI])}">unreadable</span>'
    title = f"{row[C.PROMPT]} | seed {row[C.SEED]} | {row[C.ROW_ID]}"
    return (f'<a href="{escape(image_link(row[C.IMAGE_URI], root_uri))}"><img src="thumbs/{quote(row[C.ROW_ID])}.jpg"'
            f' alt="{escape(row[C.ROW_ID])}" title="{escape(title)}"></a>')


def fmt(axis: str, value) -> str:
    """A sweep value as text (unescaped)."""
    if value is None:
        return "default" if axis == C.PRIOR_STEPS else "null"
    if axis == C.RESOLUTION and not isinstance(value, str):  # (height, width); evaluate's metrics.json holds "HxW"
        return "{}x{}".format(*value)
    if isinstance(value, float):
        return f"{value:g}"
    return "(none)" if axis == C.NEGATIVE_PROMPT and value == "" else str(value)


def label(axes: list[str], key: tuple) -> str:
    """Escaped "axis = value, …" of a grid row or column."""
    return escape(", ".join(f"{a} = {fmt(a, v)}" for a, v in zip(axes, key)))


def table(header: list[str], body: list[list[str]], cls: str = "") -> str:
    """An HTML table from already-escaped cells."""
    head = "".join(f"<th>{h}</th>" for h in header)
    rows = "".join("<tr>" + "".join(body_row) + "</tr>" for body_row in body)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def stamp(seconds: float) -> str:
    """Unix seconds as UTC date and time."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def sweep_note(job: dict) -> str:
    """Why the grids exist: the job's sweep axes and/or its images_per_prompt."""
    parts = [f"sweep over {', '.join(job['sweep'])}"] if job.get("sweep") else []
    per_prompt = images_per_prompt(job)
    if per_prompt > 1:
        parts.append(f"images_per_prompt = {per_prompt} (seeds seed … seed + {per_prompt - 1})")
    return f'<p class="note">Grids per prompt, from the job\'s {escape(" and ".join(parts))}.</p>'


def summary_html(output: str, job: dict, view: ManifestView, runs: list[dict]) -> str:
    """The run, its counts, and throughput over each invocation's whole span (as the CLI printed it)."""
    model = job.get("model") or {}
    items = [("run", escape(output)), ("model", escape(" ".join(f"{k}={v}" for k, v in model.items()) or "?")),
             ("rows", view.rows), ("succeeded", view.succeeded), ("failed", view.failed)]
    if view.folded:
        items.append(("identical input rows folded", f"{view.folded} (made once each; see input_rows)"))
    finished = [r for r in runs if r.get("ended_at")]
    if finished:
        seconds = wall_seconds(runs)
        made = sum(r["made"] for r in finished)
        items += [("started", stamp(min(r["started_at"] for r in runs))),
                  ("invocations", f"{len(runs)} ({len(runs) - len(finished)} did not finish)"),
                  ("wall time of finished invocations", f"{seconds:.1f} s"),
                  ("images made / wall time", f"{made / seconds:.2f} images/s" if seconds > 0 else "n/a")]
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in items)
    note = ('<p class="note">Each invocation\'s span runs from the command\'s start to its closing summary '
            "(start-up, model loads and writing included), the figures the CLI printed.</p>")
    return f'<table class="summary">{body}</table>' + (runs_html(runs) + note if runs else "")


def runs_html(runs: list[dict]) -> str:
    """One line per invocation of generate/decode on this output."""
    body = []
    for run in runs:
        seconds = run["ended_at"] - run["started_at"] if run.get("ended_at") else None
        rate = f"{run['made'] / seconds:.2f}" if seconds else "n/a"
        body.append([f"<td>{stamp(run['started_at'])}</td>", f'<td class="num">{run.get("made", "—")}</td>',
                     f'<td class="num">{f"{seconds:.1f}" if seconds is not None else "did not finish"}</td>',
                     f'<td class="num">{rate}</td>'])
    return table(["invocation started", "images made", "seconds", "images/s"], body, "runs")


def stages_html(view: ManifestView, wall: float) -> str:
    """Per-stage busy time, images per busy second, share of the wall time busy, and the nodes each stage ran on."""
    body = []
    for name, _, _ in STAGES:
        figures = view.stages[name]
        busy = figures.busy
        listed = "<br>".join(f'<code title="{escape(n)}">{escape(n if n[0] == "(" else n[:12])}</code>: {c}'
                             for n, c in figures.nodes.most_common())
        rate = f"{figures.timed / busy:.2f}" if busy > 0 else "n/a"
        share = f"{100 * busy / wall:.0f}%" if wall > 0 else "n/a"
        body.append([f"<th>{name}</th>", f'<td class="num">{figures.timed}</td>', f'<td class="num">{busy:.2f}</td>',
                     f'<td class="num">{rate}</td>', f'<td class="num">{share}</td>', f"<td>{listed}</td>"])
    header = ["stage", "rows timed", "busy s (sum)", "images per busy s (one actor)",
              "busy s / wall s (over 100%: several actors)", "nodes (rows)"]
    return table(header, body, "stages")


def failed_html(view: ManifestView) -> str:
    """The failed rows with their errors (the first MAX_FAILED by row id)."""
    if not view.failed:
        return "<p>No failed rows.</p>"
    body = [[f"<td><code>{escape(r[C.ROW_ID])}</code></td>", f"<td>{escape(r[C.PROMPT])}</td>",
             f'<td class="bad">{escape(r[C.ERROR])}</td>'] for r in view.failed_rows[:MAX_FAILED]]
    more = (f'<p class="note">Showing {len(body)} of {view.failed} failed rows.</p>' if view.failed > len(body)
            else "")
    return table(["row_id", "prompt", "error"], body, "failed") + more


def grid_html(prompt: str, axes: list[str], shown: list[dict], total: int, thumb) -> str:
    """One sweep: a row (one axis) or a grid with the first axis as rows and the rest as columns."""
    row_axes, col_axes = ([], axes) if len(axes) == 1 else (axes[:1], axes[1:])
    cells = defaultdict(list)
    for r in shown:
        cells[tuple(axis_value(r, a) for a in row_axes), tuple(axis_value(r, a) for a in col_axes)].append(r)
    row_keys = list(dict.fromkeys(k[0] for k in cells))
    col_keys = sorted({k[1] for k in cells}, key=lambda k: tuple(map(_order, k)))
    corner = escape(f"{axes[0]} ↓ / {', '.join(col_axes)} →" if row_axes else " × ".join(col_axes))
    body = [[f"<th>{label(row_axes, rk)}</th>", *(
        "<td>" + ("".join(thumb(r) for r in cells[(rk, ck)]) or "—") + "</td>" for ck in col_keys)]
        for rk in row_keys]
    note = f'<p class="note">Showing {len(shown)} of {total} images.</p>' if len(shown) < total else ""
    return (f'<section class="sweep"><h3>{escape(prompt)}</h3><p>varying: {escape(" × ".join(axes))}</p>'
            + table([corner, *(label(col_axes, ck) for ck in col_keys)], body, "grid") + note + "</section>")


def sheet_html(view: ManifestView, thumb, axes: list[str] = ()) -> str:
    """The contact sheet: the first MAX_SHEET images, captioned with their seed and the swept `axes`' values."""
    def caption(row: dict) -> str:
        swept = "".join(f" · {a} {fmt(a, axis_value(row, a))}" for a in axes if a != C.SEED)
        return escape(f"{row[C.PROMPT]} · seed {row[C.SEED]}{swept}")
    figures = "".join(f"<figure>{thumb(r)}<figcaption title=\"{text}\">{text}</figcaption></figure>"
                      for r, text in ((r, caption(r)) for r in view.sheet))
    images = view.succeeded if view.sheet else 0
    capped = f'<p class="note">Showing {len(view.sheet)} of {images} images.</p>' if images > len(view.sheet) else ""
    return capped + f'<div class="sheet">{figures}</div>'


def render(output: str, job: dict, view: ManifestView, thumb, runs: list[dict] = (), evaluation: str = "") -> str:
    """The whole page."""
    wall = wall_seconds(runs)
    grids = "".join(grid_html(p, axes, shown, total, thumb) for p, axes, shown, total in view.sweeps)
    grids = (sweep_note(job) + grids) if grids else "<p>No sweep: the job varies no axis per prompt.</p>"
    if view.swept_prompts > len(view.sweeps):
        grids += f'<p class="note">Showing {len(view.sweeps)} of {view.swept_prompts} swept prompts.</p>'
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Run report: {escape(output)}</title>'
            f"<style>{CSS}</style></head><body><h1>Run report</h1>{summary_html(output, job, view, runs)}"
            f"<h2>Stages</h2>{stages_html(view, wall)}<h2>Failed rows</h2>{failed_html(view)}"
            f"<h2>Evaluation</h2>{evaluation}"
            f"<h2>Per-prompt grids</h2>{grids}<h2>Contact sheet</h2>{sheet_html(view, thumb, declared_axes(job))}"
            "</body></html>\n"
            )


def add_parser(subparsers) -> argparse.ArgumentParser:
    """The `report RUN_URI [--storage-options JSON]` subcommand."""
    parser = subparsers.add_parser("report", help="write <run>/report/index.html: counts, timings, sweeps, thumbnails")
    parser.add_argument("run", help="the run folder (a generate job's output: local path or fsspec URI)")
    parser.add_argument("--storage-options", type=options_arg, default=None, metavar="JSON",
                        help="fsspec options for the run's store (default: the run's job.yaml without its masked "
                             "credentials, which then come from the environment; a custom endpoint such as an "
                             "S3-compatible store's must be given here: job.yaml is read through it)")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Build the report and print where it is (a folder without a run is one line, and gets no report)."""
    from jobs.retries import RUN_OPTIONS, check_reachable, run_folder_read
    from jobs.spec import SpecError
    from jobs.spec_rules import check_store

    check_store("run", args.run)
    check_reachable({"run": args.run}, args.storage_options, RUN_OPTIONS)
    fs, root = url_to_fs(args.run, args.storage_options or {})
    with run_folder_read("report", args.run):
        if not fs.exists(join(root, output_folder.JOB_FILE)):
            raise SpecError(f"report: {args.run} is not a run folder (no job.yaml)")
    print(f"report written to {build_report(args.run, args.storage_options)}")
    return 0
