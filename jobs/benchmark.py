"""Benchmark: the stages in process and the Ray pipeline against diffusers' WuerstchenCombinedPipeline on the same rows."""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch

from jobs.bench_diffusers import MODES, diffusers_rates
from jobs.bench_stages import in_process, psnr_vs_float32
from jobs.spec import JobSpec, SpecError, apply_overrides, spec_from_dict
from stages import columns as C
from stages.refs import DECODER_SUBFOLDERS, PRIOR_SUBFOLDERS, ModelRefError, check_ref

_SUBJECTS = ["a red fox", "a lighthouse", "a bowl of ramen", "an astronaut", "a sailboat", "a cathedral",
             "a bonsai tree", "a vintage car"]
_STYLES = ["at dawn", "in watercolor", "as a pencil sketch", "in the rain", "on the moon", "in neon light"]


def benchmark_prompts(rows: int, source: str | None) -> list[str]:
    """`rows` prompts: from a Parquet/TSV table (PartiPrompts' `Prompt` column works), else generated."""
    if source:
        if source.endswith(".tsv"):
            table = pacsv.read_csv(source, parse_options=pacsv.ParseOptions(delimiter="\t"))
        else:
            table = pq.read_table(source)
        column = C.PROMPT if C.PROMPT in table.column_names else "Prompt"
        texts = table.column(column).to_pylist()
    else:
        texts = [f"{s} {t}" for t in _STYLES for s in _SUBJECTS]
    if not texts:
        raise SpecError(f"benchmark: --prompts {source} has no rows")
    return [texts[i % len(texts)] for i in range(rows)]


def benchmark_spec(args, work: Path) -> tuple[JobSpec, list[str]]:
    """The benchmark's job: generated or given prompts, seed = row index, the official size unless tiny."""
    prompts = benchmark_prompts(args.rows, args.prompts)
    pq.write_table(pa.table({C.PROMPT: prompts, C.SEED: list(range(len(prompts)))}), work / "prompts.parquet")
    tiny = args.model == "tiny"
    prior, decoder = ("tiny", "tiny") if tiny else (str(Path(args.model) / "prior"), str(Path(args.model) / "decoder"))
    data = {
        "prompts": str(work / "prompts.parquet"),
        "output": str(work / "out"),
        "model": {"prior": prior, "decoder": decoder, "dtype": args.dtype or "float32"},
        "generation": {"height": args.height or (256 if tiny else 1024), "width": args.width or (256 if tiny else 1024)},
    }
    if args.compile:
        data["stages"] = {name: {"compile": args.compile} for name in ("text", "prior", "decoder")}
    return spec_from_dict(apply_overrides(data, args.overrides)), prompts


def check_args(args) -> None:
    """One line for a mistaken argument, before any model work."""
    if args.rows < 1:
        raise SpecError(f"benchmark: --rows must be at least 1, got {args.rows}")
    if args.psnr_rows < 0:
        raise SpecError(f"benchmark: --psnr-rows must not be negative (0: no PSNR pass), got {args.psnr_rows}")
    if args.model != "tiny" and not Path(args.model).is_dir():
        raise SpecError(f"benchmark: --model {args.model} is neither 'tiny' nor a folder holding prior/ and decoder/ "
                        f"(see tiny-model)")
    if args.model != "tiny":  # generate's model check, each component named: not an OSError after the loads
        try:
            model = Path(args.model).resolve()  # a relative name is a folder here, not a hub id
            check_ref(str(model / "prior"), "prior", PRIOR_SUBFOLDERS, {}, "benchmark: --model")
            check_ref(str(model / "decoder"), "decoder", DECODER_SUBFOLDERS, {}, "benchmark: --model")
        except ModelRefError as err:
            raise SpecError(str(err)) from None
    if args.prompts:
        try:
            benchmark_prompts(1, args.prompts)
        except (OSError, pa.ArrowInvalid, KeyError) as err:
            raise SpecError(f"benchmark: --prompts {args.prompts}: not a Parquet/TSV table with a prompt or Prompt "
                            f"column ({type(err).__name__})") from None
    if args.json and not Path(args.json).resolve().parent.is_dir():  # found out after the run, the figures lost
        raise SpecError(f"benchmark: --json {args.json}: its folder does not exist")
    if args.json and Path(args.json).is_dir():
        raise SpecError(f"benchmark: --json {args.json}: is a folder; name the JSON file to write")


def run_benchmark(args) -> dict:
    """Per-stage figures in this process, the Ray pipeline where Ray is installed, diffusers on the same rows."""
    check_args(args)
    work = Path(tempfile.mkdtemp(prefix="wuerstchen-bench-"))
    try:
        return _measure(args, work)
    finally:  # its prompt table and the Ray run's output (images, manifest): the figures are what it keeps
        shutil.rmtree(work, ignore_errors=True)


def _measure(args, work: Path) -> dict:
    spec, prompts = benchmark_spec(args, work)
    if not args.in_process and len(prompts) <= 2 * spec.stages.text.batch_size:
        raise SpecError(f"benchmark: --rows must exceed twice the text batch size ({spec.stages.text.batch_size}) "
                        f"to see the pipeline's steady state (or give --in-process)")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    measured, images = in_process(spec, prompts)
    figures = {"rows": len(prompts), "model": args.model, "height": spec.generation.height,
               "width": spec.generation.width, "dtype": spec.model.dtype, "device": device, **measured}
    figures["pipeline_images_per_s"] = figures["in_process_images_per_s"]  # end to end: only through Ray
    if not args.in_process and importlib.util.find_spec("ray"):
        figures.update(ray_rates(spec, getattr(args, "verbose", False)))
        figures["pipeline_images_per_s"] = figures["ray_steady_images_per_s"]
        figures["end_to_end_images_per_s"] = figures["ray_end_to_end_images_per_s"]
    print(report_pipeline(figures), flush=True)  # shown (and kept) before the float32 pass and diffusers' turn
    _save(args.json, figures)
    if args.psnr_rows and spec.model.dtype != "float32":
        figures["psnr_vs_float32_db"] = p = psnr_vs_float32(spec, prompts, images, args.psnr_rows)
        print(f"PSNR {spec.model.dtype} vs float32, {p['rows']} rows: mean {p['mean']:.2f} dB, min {p['min']:.2f} dB",
              flush=True)
        _save(args.json, figures)
    del images
    if args.skip_diffusers:
        return figures
    figures["diffusers_compiled"] = any(bool(getattr(spec.stages, name).compile)
                                        for name in ("text", "prior", "decoder"))
    rates = diffusers_rates(spec, prompts, figures["diffusers_compiled"], args.diffusers)
    figures["diffusers"] = {mode: {"how": MODES[mode], "images_per_s": rate, "warmup_s": warmup}
                            for mode, (rate, warmup) in rates.items()}
    figures["diffusers_mode"] = max(rates, key=lambda mode: rates[mode][0])  # the ratios: against the faster
    figures["diffusers_images_per_s"] = rates[figures["diffusers_mode"]][0]
    figures["ratio"] = figures["pipeline_images_per_s"] / figures["diffusers_images_per_s"]
    if "end_to_end_images_per_s" in figures:
        figures["end_to_end_ratio"] = figures["end_to_end_images_per_s"] / figures["diffusers_images_per_s"]
    print(report_diffusers(figures))
    _save(args.json, figures)
    return figures


def _save(path: str | None, figures: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(figures, indent=2))


def ray_rates(spec: JobSpec, verbose: bool = False) -> dict:
    """The whole Ray Data pipeline on the rows: steady state, and end to end with start-up."""
    from jobs.console import start_ray
    from jobs.generate import run

    start_ray(verbose)
    summary = run(spec, verbose=verbose)
    return {"ray_steady_images_per_s": steady_state_rate(spec.output, skip=spec.stages.text.batch_size),
            "ray_end_to_end_images_per_s": summary.images_per_s}


def report_pipeline(f: dict) -> str:
    """The printed table of this project's figures."""
    lines = [f"{f['rows']} rows, {f['height']}x{f['width']}, {f['dtype']}, {f['device']}; MFU against a measured "
             f"matmul rate of {f['matmul_peak_tflops']:.1f} TFLOP/s",
             "stage      images/s   TFLOP/image    MFU   warm-up s   load s   peak GiB"]
    for name, s in f["stages"].items():
        peak = f"{s['peak_memory_gib']:8.2f}" if "peak_memory_gib" in s else "       -"
        lines.append(f"{name:<9} {s['images_per_s']:9.2f} {s['tflop_per_image']:13.3g} {100 * s['mfu']:5.1f}% "
                     f"{s['warmup_s']:10.1f} {s['load_s']:8.1f} {peak}")
    lines.append(f"in process, stages one after another, warm-up excluded: {f['in_process_images_per_s']:.2f} "
                 f"images/s, MFU {100 * f['in_process_mfu']:.1f}% (load + warm-up {f['in_process_warmup_s']:.1f} s)")
    if "ray_steady_images_per_s" in f:
        lines.append(f"pipeline (steady state): {f['ray_steady_images_per_s']:.2f} images/s   end to end, with "
                     f"start-up: {f['ray_end_to_end_images_per_s']:.2f} images/s")
    if "compile" in f:
        c = f["compile"]
        lines.append(f"compiled: {c['graphs']} graphs, {c['graph_breaks']} graph breaks, {c['cudagraph_skips']} "
                     f"CUDA graphs skipped")
    if f["failed_rows"]:
        lines.append(f"warning: {f['failed_rows']} rows failed (non-finite output)")
    return "\n".join(lines)


def report_diffusers(f: dict) -> str:
    """The printed comparison with diffusers."""
    how = "prior and decoder compiled as its docs say" if f["diffusers_compiled"] else "eager"
    lines = [f"diffusers ({how}), {d['how']}: {d['images_per_s']:.2f} images/s (warm-up {d['warmup_s']:.1f} s)"
             for d in f["diffusers"].values()]
    end = (f"end to end: {f['end_to_end_ratio']:.2f}" if "end_to_end_ratio" in f else
           "end to end: not measured (in process: no Ray start-up, no writing)")
    lines.append(f"ratio {'pipeline' if 'end_to_end_ratio' in f else 'in process'} / diffusers "
                 f"({f['diffusers_mode']}, the faster): {f['ratio']:.2f}  {end}")
    return "\n".join(lines)


def steady_state_rate(output: str, skip: int) -> float:
    """Images/s after the first `skip` rows (one streaming block) are written: start-up excluded. Rows written in
    the same burst as the first block's last row are not counted after it (they took no time of their own)."""
    finished = np.sort(pq.read_table(Path(output) / "manifest", columns=[C.FINISHED_AT])[C.FINISHED_AT].to_numpy())
    if len(finished) <= 2 * skip:
        raise SystemExit(f"benchmark: --rows must exceed twice the text batch size ({skip}) to see a steady state")
    start = finished[skip - 1]
    after = finished[finished > start]
    if len(after) < skip:  # the rest came with the first block: nothing was measured after start-up
        raise SystemExit(f"benchmark: the rows after the first {skip} came in one burst with them: give more --rows "
                         f"to see a steady state")
    return len(after) / (after[-1] - start)
