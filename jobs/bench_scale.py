"""Scale benchmark: a synthetic output of N done rows (the manifest's own schema, ids a rerun recomputes), then a
rerun with a few new prompts, `report` and evaluate's bookkeeping, each in its own process: driver peak RSS,
wall time and the objects the output holds."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages import columns as C
from stages import output

SIZE = 128  # the tiny model's smallest comfortable image
STEPS = ("rerun", "rerun-again", "report", "report-sweeps", "evaluate-bookkeeping")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """The `bench-scale --rows N` subcommand."""
    parser = subparsers.add_parser("bench-scale", help="driver memory and wall time of a rerun, report and "
                                   "evaluate bookkeeping over an output of N done rows")
    parser.add_argument("--rows", type=int, default=1_000_000, help="done rows in the synthetic output")
    parser.add_argument("--new", type=int, default=8, help="new prompts the rerun makes")
    parser.add_argument("--part-rows", type=int, default=1000, help="rows per synthetic manifest part")
    parser.add_argument("--work", help="folder for the synthetic output (default: a new temporary folder)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
    parser.add_argument("--keep", action="store_true", help="measure on an output already built in --work "
                        "(by an earlier run with that --work)")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # one measured step, in a child
    return parser


def job_data(work: Path) -> dict:
    """The benchmark's job: the tiny model, small images, few steps."""
    return {"prompts": str(work / "prompts"), "output": str(work / "out"),
            "model": {"prior": "tiny", "decoder": "tiny", "dtype": "float32"},
            "generation": {"height": SIZE, "width": SIZE, "prior_steps": 2, "decoder_steps": 2}}


def id_template(spec) -> tuple[str, str, str]:
    """(before prompt, between prompt and seed, after seed) of the JSON a row id hashes (see row_ids.identify)."""
    from jobs import prompts

    batch = {C.PROMPT: np.asarray(["\x01"], dtype=object), C.SEED: np.asarray([918273645])}
    row = prompts.expand_rows(batch, prompts.defaults_for(spec), 1, dict(decoder=spec.model.decoder,
                                                                         dtype=spec.model.dtype))
    key = {col: row[col][0].item() if hasattr(row[col][0], "item") else row[col][0] for col in (C.PROMPT, *C.OVERRIDABLE)}
    for col in C.FLOAT_PARAMS:
        key[col] = float(key[col])
    key[C.CHECKPOINT] = row[C.CHECKPOINT][0]
    text = json.dumps(key, sort_keys=True, ensure_ascii=False)
    before, rest = text.split(json.dumps("\x01", ensure_ascii=False))
    middle, after = rest.split("918273645")
    return before, middle, after


def fast_ids(template, texts: list[str], seeds: np.ndarray) -> list[str]:
    before, middle, after = template
    return [hashlib.sha256(f"{before}{json.dumps(t, ensure_ascii=False)}{middle}{s}{after}".encode()).hexdigest()[:32]
            for t, s in zip(texts, seeds.tolist())]


def build(work: Path, rows: int, new: int, part_rows: int) -> None:
    """prompts/ (rows done + `new` new prompts), job.yaml, and manifest parts of `part_rows` done rows."""
    from jobs import prompts
    from jobs.resume import claim
    from jobs.spec import spec_from_dict
    from stages.writer import MANIFEST_SCHEMA

    spec = spec_from_dict(job_data(work))
    claim(spec, overwrite=False)  # job.yaml first, as a run writes it (an output of files without one is refused)
    (work / "prompts").mkdir(parents=True, exist_ok=True)
    template = id_template(spec)
    defaults = prompts.defaults_for(spec)
    with pq.ParquetWriter(work / "prompts" / "a-done.parquet", pa.schema([(C.PROMPT, pa.string()),
                                                                          (C.SEED, pa.int64())])) as writer:
        for start in range(0, rows, part_rows):
            n = min(part_rows, rows - start)
            texts = [f"synthetic prompt {i}" for i in range(start, start + n)]
            seeds = np.arange(start, start + n)
            writer.write_table(pa.table({C.PROMPT: texts, C.SEED: seeds}))
            ids = fast_ids(template, texts, seeds)
            if start == 0:  # the fast ids are the pipeline's own
                check = prompts.expand_rows({C.PROMPT: np.asarray(texts[:50], dtype=object), C.SEED: seeds[:50]},
                                            defaults, 1, dict(decoder="tiny", dtype="float32"))
                assert sorted(check[C.ROW_ID]) == sorted(ids[:50]), "benchmark ids differ from the pipeline's"
            columns = {C.ROW_ID: ids, C.PROMPT: texts, C.SEED: seeds, C.IMAGE_INDEX: np.zeros(n, np.int64),
                       C.IMAGE_URI: [f"{work}/out/images/{i[:2]}/{i}.png" for i in ids]}
            for col in (C.NEGATIVE_PROMPT, C.HEIGHT, C.WIDTH, C.PRIOR_GUIDANCE, C.DECODER_GUIDANCE, C.DECODER_STEPS,
                        C.PRIOR_CHECKPOINT):
                columns[col] = np.full(n, defaults[col])
            columns[C.PRIOR_STEPS] = np.full(n, defaults[C.PRIOR_STEPS] or 0)
            columns[C.CHECKPOINT] = np.full(n, f"prior={defaults[C.PRIOR_CHECKPOINT]} decoder=tiny dtype=float32")
            for col in (C.TEXT_SECONDS, C.PRIOR_SECONDS, C.DECODER_SECONDS):
                columns[col] = np.full(n, 0.01)
            columns[C.FINISHED_AT] = np.full(n, time.time())
            for col in (C.TEXT_NODE, C.PRIOR_NODE, C.DECODER_NODE):
                columns[col] = np.full(n, "synthetic-node")
            table = pa.table({f.name: pa.array(columns[f.name], f.type) if f.name in columns
                              else pa.nulls(n, f.type) for f in MANIFEST_SCHEMA}, schema=MANIFEST_SCHEMA)
            path = work / "out" / output.MANIFEST / f"{start // part_rows:08d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path)
    pq.write_table(pa.table({C.PROMPT: [f"new prompt {i}" for i in range(new)], C.SEED: np.arange(new)}),
                   work / "prompts" / "b-new.parquet")
    time.sleep(1.1)  # the new prompts are newer than job.yaml on every store: no finished-rerun shortcut


def step(name: str, work: Path) -> dict:
    """One measured step in this process; returns its figures."""
    objects = count_objects(work / "out")
    if name == "rerun-again":  # a second rerun with more new prompts: after the first one's compaction
        count = len(list((work / "prompts").iterdir()))
        pq.write_table(pa.table({C.PROMPT: [f"new prompt {count}.{i}" for i in range(8)], C.SEED: np.arange(8)}),
                       work / "prompts" / f"c-new{count}.parquet")
        time.sleep(1.1)
        objects = count_objects(work / "out")
    if name == "evaluate-bookkeeping":
        fake_scores(work / "out")
    private = PrivatePeak()
    started = time.time()
    if name.startswith("rerun"):
        from jobs.preflight import generate_job
        from jobs.spec import spec_from_dict

        summary = generate_job(spec_from_dict(job_data(work)))
        detail = f"{summary.new} new rows, {summary.rows} rows"
    elif name == "report":
        from jobs.report import build_report

        detail = build_report(str(work / "out"))
    elif name == "report-sweeps":  # the seed declared an axis: the sweep search groups every row's prompt
        from jobs.report import build_report

        import yaml

        job = work / "out" / output.JOB_FILE
        plain = job.read_text()
        job.write_text(yaml.safe_dump({**yaml.safe_load(plain), "sweep": {"seed": [0, 1]}}))  # the report's axes
        try:
            detail = build_report(str(work / "out"))
        finally:
            job.write_text(plain)
    else:
        from jobs.eval_scores import write_scores
        from jobs.evaluate import check_run
        from stages.evaluate import SCORES_FILE

        manifest = check_run(str(work / "out"), (C.DECODER_GUIDANCE,), {})  # an axis of few values, as a sweep's
        write_scores(str(work / "out"), manifest, {})
        rows = pq.ParquetFile(work / "out" / output.EVAL / SCORES_FILE).metadata.num_rows
        detail = f"{len(manifest.files)} manifest parts, scores.parquet of {rows} rows"
    return {"step": name, "wall_s": round(time.time() - started, 1), "detail": detail, "objects_before": objects,
            "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "driver_peak_private_mib": private.peak_mib}


class PrivatePeak:
    """The process's peak private memory (RssAnon, sampled every 50 ms): peak RSS also counts the pages of Ray's
    shared object store that the driver read, which are not the driver's own."""

    def __init__(self):
        self.peak_mib = self._now()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while True:
            self.peak_mib = max(self.peak_mib, self._now())
            time.sleep(0.05)

    @staticmethod
    def _now() -> float:
        with open("/proc/self/status") as f:
            return next(round(int(line.split()[1]) / 1024, 1) for line in f if line.startswith("RssAnon:"))


def fake_scores(out: Path) -> None:
    """What evaluate's pipeline leaves for write_scores: a score part per manifest part (rows in another order),
    one row in 100 unreadable; then a running Ray (started before the clock, as evaluate's pipeline has it)."""
    from jobs.console import start_ray
    from jobs.retries import configure_ray_data
    from stages.evaluate import CLIP_SCORE, CLIP_TRUNCATED, EVAL_ERROR, SCORES_PARTS

    parts = out / output.EVAL / SCORES_PARTS
    parts.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k, path in enumerate(sorted((out / output.MANIFEST).glob("*.parquet"))):
        ids = pq.read_table(path, columns=[C.ROW_ID]).column(C.ROW_ID).take(rng.permutation(pq.read_metadata(
            path).num_rows))
        pq.write_table(pa.table({C.ROW_ID: ids, CLIP_SCORE: rng.random(len(ids)) * 30, EVAL_ERROR: pa.array(
            [None if i % 100 else "cannot read" for i in range(len(ids))], pa.string()),
            CLIP_TRUNCATED: pa.nulls(len(ids), pa.bool_())}), parts / f"{k:08d}.parquet")
    start_ray()
    configure_ray_data()


def count_objects(out: Path) -> dict:
    """Objects per folder of an output."""
    return {p.name: sum(1 for _ in p.rglob("*") if _.is_file()) for p in sorted(out.iterdir()) if p.is_dir()} \
        if out.exists() else {}


def check_args(args: argparse.Namespace) -> None:
    """One line for a mistaken argument, before anything is built: not a traceback after job.yaml, nor a child's
    refusal after the whole synthetic output."""
    from jobs.spec import SpecError

    for name, least in (("rows", 1), ("part_rows", 1), ("new", 0)):
        if getattr(args, name) < least:
            bound = "be at least 1" if least else "not be negative"
            raise SpecError(f"bench-scale: --{name.replace('_', '-')} must {bound}, got {getattr(args, name)}")
    for name in args.steps.split(","):
        if name not in STEPS:  # the child's --step choices
            raise SpecError(f"bench-scale: --steps: no step {name!r} (choose from {', '.join(STEPS)})")
    if args.keep and not args.work:
        raise SpecError("bench-scale: --keep measures an output already built in --work: give --work DIR")
    if args.keep and not (Path(args.work) / "out" / output.MANIFEST).is_dir():
        raise SpecError(f"bench-scale: --keep: {args.work} holds no built output (out/{output.MANIFEST}/); "
                        f"build it first without --keep")
    if args.work and Path(args.work).exists() and not Path(args.work).is_dir():
        raise SpecError(f"bench-scale: --work {args.work} is a file, not a folder")


def run_from_args(args: argparse.Namespace) -> int:
    """Build (unless a measured step is asked for), then measure each step in a child process; a temporary
    folder (no --work) is deleted at the end, unless a step failed (kept to look into, and said)."""
    if args.step:
        print(json.dumps(step(args.step, Path(args.work))))
        return 0
    check_args(args)
    work, code = Path(args.work or tempfile.mkdtemp(prefix="wuerstchen-scale-")), 1
    try:
        code = measure(args, work)
        return code
    finally:
        if not args.work and code == 0:
            shutil.rmtree(work, ignore_errors=True)
        elif not args.work:
            print(f"the synthetic output is kept in {work} (a step failed); delete it when done", flush=True)


def measure(args: argparse.Namespace, work: Path) -> int:
    """Build the synthetic output in `work` (unless --keep), then each step's figures, printed."""
    started = time.time()
    if not args.keep:
        build(work, args.rows, args.new, args.part_rows)
    parts = len(list((work / "out" / output.MANIFEST).iterdir()))
    made = "kept" if args.keep else f"built {args.rows} done rows in"
    print(f"{made} {parts} manifest parts under {work} in {time.time() - started:.0f} s", flush=True)
    for name in args.steps.split(","):
        child = subprocess.run([sys.executable, "-m", "jobs.cli", "bench-scale", "--work", str(work), "--step", name],
                               capture_output=True, text=True, env=os.environ)
        lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
        if child.returncode or not lines:
            print(f"{name}: failed\n{child.stderr[-3000:]}")
            return 1
        figures = json.loads(lines[-1])
        print(f"{name:22s} driver peak RSS {figures['driver_peak_rss_mib']:8.1f} MiB (private "
              f"{figures['driver_peak_private_mib']:7.1f})   wall {figures['wall_s']:7.1f} s"
              f"   objects before {figures['objects_before']}   ({figures['detail']})", flush=True)
    print(f"after: objects {count_objects(work / 'out')}")
    return 0

