"""The `wuerstchen-batch` command: generate, decode, evaluate, plan, report, tiny-model, benchmark, bench-scale."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs.console import VERBOSE_HELP, interrupt_on_sigterm
from jobs.spec import SpecError
from stages.credentials import options_arg, redact

# Heavy libraries (Ray, torch, diffusers, transformers) are imported by the commands that use them, never
# here: --help, a spec error and a finished rerun answer in about a second.


def parser() -> argparse.ArgumentParser:
    """The command line's parser, every subcommand included."""
    cli = argparse.ArgumentParser(prog="wuerstchen-batch", description=__doc__)
    sub = cli.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="run a job: prompt table → images + manifest")
    gen.add_argument("job", help="job spec (YAML)")
    gen.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a spec key, e.g. --set generation.height=512 (repeatable)")
    gen.add_argument("--overwrite", action="store_true",
                     help="delete the run the output holds (a run folder or an empty one; anything else is "
                          "refused) and start afresh")
    gen.add_argument("--retry-failed", action="store_true",
                     help="make again only the rows whose manifest entry has an error, replacing those entries")
    gen.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)

    dec = sub.add_parser("decode", help="re-run Stage B/A from a run's stored embeddings into a new output")
    dec.add_argument("run", help="the run folder whose embeddings/ to decode")
    dec.add_argument("output", help="the new output")
    dec.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="decoder-side overrides, e.g. --set generation.decoder_steps=20")
    dec.add_argument("--storage-options", type=options_arg, default=None, metavar="JSON",
                     help="fsspec options for the stores (default: the run's job.yaml without its masked "
                          "credentials, which then come from the environment; a custom endpoint such as an "
                          "S3-compatible store's must be given here: job.yaml is read through it)")
    dec.add_argument("--overwrite", action="store_true",
                     help="delete the run the output holds (a run folder or an empty one) and decode afresh")
    dec.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)

    plan = sub.add_parser("plan", help="rows, buckets, per-stage FLOPs and the suggested actor ratio of a job")
    plan.add_argument("job", help="job spec (YAML)")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a spec key, as generate's --set (repeatable)")

    tiny = sub.add_parser("tiny-model", help="write the tiny random-weight preset in the official layout")
    tiny.add_argument("directory")
    tiny.add_argument("--full-size", action="store_true",
                      help="random weights in the official shapes instead (~2.7B parameters, bfloat16), for GPU benchmarks")

    from jobs import bench_args, bench_scale, eval_args, report

    bench_args.add_parser(sub)
    report.add_parser(sub)
    bench_scale.add_parser(sub)
    eval_args.add_parser(sub)
    return cli


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    joined_before = _in_ray()  # a caller's Ray (the Python API, tests) is the caller's to leave
    if not joined_before:
        interrupt_on_sigterm()  # from the first check on, not only once Ray runs (its start sets it again)
    try:
        _refuse_credentials_in_uris(args)
        if getattr(args, "overwrite", False) and getattr(args, "retry_failed", False):
            raise SpecError("--overwrite and --retry-failed: choose one (--overwrite deletes the failed rows too)")
        return _dispatch(args)
    except SpecError as err:
        _leave_ray(joined_before)
        print(f"error: {redact(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if getattr(args, "retry_failed", False):  # the failed entries it took out are rows without an entry now
            print("interrupted: run the same command without --retry-failed to make the failed rows it took out "
                  "(then with it again, for any failed rows left)", file=sys.stderr)
        else:
            print("interrupted: run the same command again to continue where it stopped", file=sys.stderr)
        return 130
    except Exception as err:
        from stages.output import unreadable_part, vanished_part

        if (unreadable := unreadable_part(err)) is not None:
            _leave_ray(joined_before)
            print(f"error: {unreadable}", file=sys.stderr)
            return 2
        if (part := vanished_part(err)) is None:
            raise
        _leave_ray(joined_before)
        print(f"error: {part}: deleted while this command read the manifest (a run on the same output compacted "
              f"it meanwhile); run the command again", file=sys.stderr)
        return 2


def _in_ray() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _leave_ray(joined_before: bool) -> None:
    """Disconnect from the Ray this command joined or started (not a caller's) before printing its last line: the
    stage actors' logs that Ray still forwards would otherwise print after it."""
    if not joined_before and _in_ray():
        sys.modules["ray"].shutdown()


def _refuse_credentials_in_uris(args) -> None:
    """A URI argument holding user:password@ is refused without being shown (the job spec's URIs are checked
    when it is loaded)."""
    from stages.credentials import has_user_info

    for name, value in vars(args).items():
        if isinstance(value, str) and has_user_info(value):
            raise SpecError(f"{name}: credentials in a URI (user:password@…) are not accepted and not shown; "
                            f"give them in --storage-options or the environment")


def _dispatch(args) -> int:
    if args.command == "generate":
        from jobs.preflight import generate_job
        from jobs.spec import load_spec

        summary = generate_job(load_spec(args.job, args.overrides), overwrite=args.overwrite, verbose=args.verbose,
                               retry_failed=args.retry_failed)
        print(redact(summary))
        return 1 if summary.failed - summary.kept else 0  # a retry: its own rows only
    if args.command == "decode":
        from jobs.decode import run_decode

        summary = run_decode(args.run, args.output, args.overrides, args.storage_options, args.overwrite,
                             verbose=args.verbose)
        print(redact(summary))
        return 1 if summary.failed or summary.unstored else 0
    if args.command == "evaluate":
        from jobs.eval_args import run_from_args as evaluate_from_args

        return evaluate_from_args(args)
    if args.command == "report":
        from jobs.report import run_from_args

        return run_from_args(args)
    if args.command == "bench-scale":
        from jobs.bench_scale import run_from_args as bench_scale_from_args

        return bench_scale_from_args(args)
    if args.command == "plan":
        from jobs.plan import plan
        from jobs.spec import load_spec

        print(plan(load_spec(args.job, args.overrides)))
        return 0
    if args.command == "tiny-model":
        return _tiny_model(args.directory, args.full_size)
    from jobs.bench_args import run_from_args as benchmark_from_args

    return benchmark_from_args(args)


def _tiny_model(directory: str, full_size: bool) -> int:
    """Write the tiny preset (or the official shapes, `full_size`) with random weights into a new folder."""
    from stages.models import quiet_libraries
    from stages.presets import write_tiny_model

    quiet_libraries()  # no "Writing model shards" bars: the command prints one line when done
    if Path(directory).exists() and not Path(directory).is_dir():
        raise SpecError(f"tiny-model: {directory} is a file, not a folder to write the model into")
    held = [role for role in ("prior", "decoder") if (Path(directory) / role).exists()]
    if held:  # a real model's weights would be replaced by random ones
        raise SpecError(f"tiny-model: {directory} already holds {held[0]}/; choose a new folder")
    try:
        written = write_tiny_model(directory, full=full_size)
    except OSError as err:
        raise SpecError(f"tiny-model: cannot write {directory} ({err.strerror or err})") from None
    print(f"{'full-size random' if full_size else 'tiny'} model written to {written} (prior/, decoder/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
