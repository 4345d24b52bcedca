"""The `benchmark` command's arguments, importable without torch (the CLI stays quick)."""

from __future__ import annotations

import argparse

from jobs.console import VERBOSE_HELP
from stages.dtypes import COMPILE_MODES


def add_parser(subparsers) -> None:
    """Register the `benchmark` subcommand."""
    bench = subparsers.add_parser("benchmark",
                                  help="images/s of the pipeline vs diffusers' pipelines on the same rows")
    bench.add_argument("--rows", type=int, default=256, help="rows to time (default 256)")
    bench.add_argument("--model", default="tiny", help="tiny, or a directory holding prior/ and decoder/")
    bench.add_argument("--prompts", help="a Parquet or TSV prompt table (default: generated prompts)")
    bench.add_argument("--height", type=int, default=None, help="default: 256 for tiny, else 1024")
    bench.add_argument("--width", type=int, default=None, help="default: 256 for tiny, else 1024")
    bench.add_argument("--dtype", default=None, help="float32 (default) | float16 | bfloat16")
    bench.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a key of the benchmark's job spec, as generate's --set (repeatable)")
    bench.add_argument("--json", help="write the figures to this JSON file")
    bench.add_argument("--psnr-rows", type=int, default=8,
                       help="rows whose half-precision images are compared with float32 ones (0: none)")
    bench.add_argument("--compile", nargs="?", const=True, default=False, choices=COMPILE_MODES, metavar="MODE",
                       help="compile every stage (stages.<name>.compile: true, or MODE: max-autotune) and diffusers' "
                            "prior and decoder (as its docs say)")
    bench.add_argument("--skip-diffusers", action="store_true", help="time only this project's stages")
    bench.add_argument("--diffusers", nargs="+", choices=["combined", "batched"], default=["combined", "batched"],
                       help="diffusers baselines to time: its combined pipeline one row per call, and/or its prior "
                            "pipeline batched (default both; the ratios use the faster)")
    bench.add_argument("--in-process", action="store_true",
                       help="time the stages in this process only, without the Ray pipeline (also when Ray is missing)")
    bench.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark the arguments ask for; it prints (and with --json writes) its figures."""
    from jobs.benchmark import run_benchmark  # torch, diffusers: only once a benchmark runs

    run_benchmark(args)
    return 0
