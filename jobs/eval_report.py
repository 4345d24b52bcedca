"""Evaluation report: metrics.json (overall and per-axis metrics, definitions, failures) and the plots."""

from __future__ import annotations

import io
import json
import logging
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.report import fmt
from stages import columns as C
from stages import evaluate as E
from stages import fid as F
from stages import output
from stages.storage import join, url_to_fs, write_atomic

log = logging.getLogger(__name__)
MIN_FID_IMAGES = 2048  # more images than feature dimensions, or the covariance is rank-deficient
MAX_FAILURES_LISTED = 10_000  # rows not evaluated that metrics.json lists (scores.parquet has them all)
DEFINITIONS = {
    "clip_score": "per image 100 * max(cos(image_embeds, text_embeds), 0), transformers CLIPModel/CLIPProcessor, "
                  "prompt truncated to the text model's positions; run and slice score = mean over evaluated images",
    "fid": "Frechet distance of Gaussians fitted to Inception pool-3 (2048-d) features: |mu1-mu2|^2 + tr S1 + tr S2 "
           "- 2 tr sqrt(S1 S2); float64 statistics (unbiased covariance) merged from per-block sums; the trace from "
           "the eigenvalues of S1^1/2 S2 S1^1/2 (numpy eigh, negatives clipped to 0, real by construction)",
    "resize": E.RESIZE,
}


# What an FID of this tool can be set beside: the same features and resize (stages/evaluate.py), checked equal.
COMPARABLE = ("clean-fid mode='clean' (PIL bicubic resize to 299x299, TF-FID Inception): not pytorch-fid or "
              "torchmetrics, whose bilinear resize gives other FIDs of the same images")


def write_eval(run: str, name: str, data: bytes, storage_options: dict) -> None:
    """Write RUN/eval/<name> in one piece."""
    fs, path = url_to_fs(join(run, output.EVAL, name), storage_options)
    write_atomic(fs, path, data)


def warn(message: str, warnings: list[str]) -> None:
    """Log a warning and keep it for metrics.json."""
    log.warning(message)
    warnings.append(message)


def warn_if_few(n: int, what: str, warnings: list[str]) -> None:
    """FID needs more images than feature dimensions."""
    if n < MIN_FID_IMAGES:
        warn(f"FID of {what} uses {n} images, fewer than the {MIN_FID_IMAGES} feature dimensions: "
             f"unreliable (biased, rank-deficient covariance)", warnings)


def summarize(opts, groups: dict, ref_stats: dict | None, models: dict, reference, warnings: list[str]) -> dict:
    """metrics.json for an EvalOptions `opts` from stages.fid_agg.GroupResult's: overall and per-axis metrics,
    models, failures and warnings."""
    overall = groups[F.ALL]
    if ref_stats is not None:
        warn_if_few(overall.n, opts.run, warnings)
    failures, failed, failed_by = read_failures(opts.run, opts.storage_options, axes=opts.by)
    if failures:
        where = "metrics.json 'failures'" if failed == len(failures) else \
            f"the first {len(failures)} in metrics.json 'failures', all in scores.parquet's eval_error"
        warn(f"{failed} image(s) not evaluated, e.g. row {failures[0]['row_id']}: {failures[0]['error']} "
             f"({where})", warnings)
    truncated = truncated_prompts(opts.run, opts.storage_options)
    if truncated:
        warn(f"CLIP score of {truncated} image(s) read only the first tokens of a prompt longer than the CLIP text "
             f"model's positions (scores.parquet's clip_truncated)", warnings)
    by = {axis: by_axis(axis, groups, values) for axis, values in zip(opts.by, failed_by)}
    for axis, rows in by.items():
        few = [r for r in rows if r["fid"] is not None and r["count"] < MIN_FID_IMAGES]
        if few:
            warn(f"FID by {axis}: {len(few)} of {len(rows)} values from fewer than {MIN_FID_IMAGES} images (e.g. "
                 f"{few[0]['value']!r}: {few[0]['count']}): biased upward by their count, compare values of "
                 f"equal counts", warnings)
    return {
        "run": opts.run, "images": overall.n, "clip_score": overall.clip_score(), "fid": overall.fid, **models,
        "fid_reference": None if reference is None else {
            "uri": reference.uri, "kind": reference.kind, "stats": ref_stats["source"], "images": ref_stats["n"]},
        "resize": E.RESIZE if models["inception"] else None, "definitions": DEFINITIONS,
        "fid_comparable_with": COMPARABLE if models["inception"] else None,
        "by": by,
        "failures": failures, "failed": failed, "clip_truncated": truncated, "warnings": warnings,
    }


def by_axis(axis: str, groups: dict, failed: Counter) -> list[dict]:
    """One row of metrics per value of an axis, sorted by value (nulls last): its images and its rows not
    evaluated (a value whose every row failed has a row of count 0)."""
    rows = {}
    for key, moments in groups.items():
        name, *value = json.loads(key) or [None]
        if name == axis:
            rows[value[0]] = {"value": value[0], "clip_score": moments.clip_score(), "fid": moments.fid,
                              "count": moments.n}
    for value in failed.keys() - rows.keys():
        rows[value] = {"value": value, "clip_score": None, "fid": None, "count": 0}
    for value, row in rows.items():
        row["failed"] = failed[value]
    return sorted(rows.values(), key=lambda r: (r["value"] is None, type(r["value"]).__name__,
                                       0 if r["value"] is None else r["value"]))


def truncated_prompts(run: str, storage_options: dict) -> int:
    """The evaluated images whose CLIP score read a truncated prompt, from scores.parquet (streamed)."""
    fs, path = url_to_fs(join(run, output.EVAL, E.SCORES_FILE), storage_options)
    count = 0
    with fs.open(path) as f:
        for batch in pq.ParquetFile(f).iter_batches(columns=[E.EVAL_ERROR, E.CLIP_TRUNCATED], batch_size=65536):
            truncated = pc.fill_null(batch.column(E.CLIP_TRUNCATED), False)
            scored = pc.and_(pc.is_null(batch.column(E.EVAL_ERROR)), truncated)
            count += pc.sum(scored.cast(pa.int64())).as_py() or 0
    return count


def read_failures(run: str, storage_options: dict, most: int = MAX_FAILURES_LISTED,
                  axes: tuple[str, ...] = ()) -> tuple[list[dict], int, list[Counter]]:
    """The first `most` rows not evaluated (row_id, error), their count, and per axis of `axes` their count of
    each value, from scores.parquet in one streamed pass: only the failed rows are kept (an axis: at most
    AXIS_VALUES values)."""
    fs, path = url_to_fs(join(run, output.EVAL, E.SCORES_FILE), storage_options)
    listed, count, by = [], 0, [Counter() for _ in axes]
    with fs.open(path) as f:
        parquet = pq.ParquetFile(f)
        held = [a for a in axes if a in parquet.schema_arrow.names]
        for batch in parquet.iter_batches(columns=[C.ROW_ID, E.EVAL_ERROR, *held], batch_size=65536):
            failed = pa.Table.from_batches([batch]).filter(pc.is_valid(batch.column(E.EVAL_ERROR)))
            count += failed.num_rows
            for row_id, error in zip(*(failed.column(c).to_pylist() for c in (C.ROW_ID, E.EVAL_ERROR))):
                if len(listed) < most:
                    listed.append({"row_id": row_id, "error": error})
            for axis, values in zip(axes, by):
                if axis in held:
                    values.update(v for v in failed.column(axis).to_pylist() if v == v)  # NaN: no value
    return listed, count, by


def eval_html(fs, root: str) -> str:
    """The run report's Evaluation section, from RUN/eval/metrics.json where `evaluate` wrote one."""
    from html import escape
    from urllib.parse import quote

    path = join(root, output.EVAL, E.METRICS_FILE)
    if not fs.exists(path):
        return ('<p class="note">Not evaluated: <code>wuerstchen-batch evaluate RUN_URI --clip-model MODEL '
                '[--fid-reference REF]</code> writes CLIP score and FID here.</p>')
    try:  # the run's own report must not fail on it (an edited or older metrics.json)
        metrics = json.loads(fs.cat_file(path))
        rows = [["all", str(metrics["images"]), _num(metrics["clip_score"]), _num(metrics["fid"])]]
        for axis, values in metrics.get("by", {}).items():
            rows += [[escape(f"{axis} = {fmt(axis, v['value'])}"), str(v["count"]), _num(v["clip_score"]),
                      _num(v["fid"])] for v in values]
    except Exception as err:  # noqa: BLE001 - said on the page instead
        return f'<p class="note">eval/metrics.json could not be shown ({escape(str(err))}).</p>'
    ref = metrics.get("fid_reference") or {}
    head = "".join(f"<th>{h}</th>" for h in ("slice", "images", "CLIP score", "FID"))
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    against = (f" FID against {escape(str(ref.get('uri')))} ({ref.get('images')} images)." if ref else "")
    plots = "".join(f'<img src="../eval/{quote(name)}" alt="{escape(name)}">' for name in metrics.get("plots", []))
    warned = "".join(f'<p class="note">{escape(str(w))}</p>' for w in metrics.get("warnings", []))
    return (f"<p>From <code>eval/metrics.json</code> (its definitions and models are there), as evaluated then: "
            f"rows made since are not in it.{against}</p><table><tr>{head}</tr>{body}</table>{warned}{plots}")


def _num(value) -> str:
    return "" if value is None else f"{value:.3f}"


def numeric(rows: list[dict]) -> bool:
    """Whether every non-null value of an axis is a number."""
    values = [r["value"] for r in rows if r["value"] is not None]
    return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def write_plots(run: str, metrics: dict, storage_options: dict) -> list[str]:
    """RUN/eval/<metric>_by_<axis>.png for each numeric axis and each metric with values; returns the names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    written = []
    for axis, rows in metrics["by"].items():
        for metric in ("clip_score", "fid") if numeric(rows) else ():
            plot = plot_spec(axis, rows, metric)
            if plot is None:
                continue
            fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
            if plot["points"]:
                ax.plot(*zip(*[(x, y) for x, y, _ in plot["points"]]), marker="o")
            for x, y, n in plot["points"] if metric == "fid" else ():  # an FID's bias falls with its image count
                ax.annotate(f"n={n}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
            for y, label in plot["lines"]:
                ax.axhline(y, linestyle="--", color="gray", label=label)
            if plot["lines"]:
                ax.legend(fontsize=7)
            ax.set(xlabel=axis, ylabel=metric, title=plot["title"])
            if all(isinstance(x, int) for x, _, _ in plot["points"]):  # steps, seeds: no tick at 2.5
                ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", bbox_inches="tight")
            plt.close(fig)
            written.append(f"{metric}_by_{axis}.png")
            write_eval(run, written[-1], buffer.getvalue(), storage_options)
    return written


def plot_spec(axis: str, rows: list[dict], metric: str) -> dict | None:
    """What a plot of `metric` by a numeric `axis` shows: a point per value, a dashed line for the null value (the
    default schedule of prior_steps, or rows without the column), and the count of the images it shows."""
    points = [(r["value"], r[metric], r["count"]) for r in rows if r["value"] is not None and r[metric] is not None]
    nulls = [r for r in rows if r["value"] is None and r[metric] is not None]
    name = "default" if axis == "prior_steps" else "null"
    lines = [(r[metric], f"{axis} {name} (n={r['count']})") for r in nulls]
    if not points and not lines:
        return None
    images = sum(n for _, _, n in points) + sum(r["count"] for r in nulls)
    return dict(points=points, lines=lines, title=f"{metric} by {axis} ({images} images)")
