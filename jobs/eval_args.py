"""The `evaluate` command's options and arguments, importable without Ray or torch (the CLI stays quick)."""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.spec import ACTOR_CPUS, SpecError
from stages.credentials import options_arg
from stages.storage import join


@dataclass(frozen=True)
class PoolOptions:
    """Actor pools of the CLIP and Inception stages (`map_batches` arguments)."""

    batch_size: int = 32
    concurrency: int = 1
    num_gpus: float | None = None  # None: 0.5 per pool on a cluster with one GPU, 1 with more, else 0
    num_cpus: float = ACTOR_CPUS
    stats_batch_size: int = 1024  # rows per block entering the per-group merge
    stats_partitions: int = 16  # hash partitions of the per-group merge (more: fewer groups per aggregator)


@dataclass(frozen=True)
class EvalOptions:
    """What `wuerstchen-batch evaluate` was asked to do."""

    run: str
    clip_model: str
    fid_reference: str | None = None
    inception: str | None = None
    by: tuple[str, ...] = ()
    storage_options: dict = field(default_factory=dict)
    pools: PoolOptions = PoolOptions()
    verbose: bool = False  # Ray's own logs and progress in the terminal


def add_parser(subparsers) -> None:
    """Register the `evaluate` subcommand."""
    ev = subparsers.add_parser("evaluate", help="CLIP score and FID of a run's images, per sweep slice, with plots")
    ev.add_argument("run", metavar="RUN_URI", help="output folder of `wuerstchen-batch generate`")
    ev.add_argument("--clip-model", required=True, help="CLIP: hub id, local directory or object-store URI")
    ev.add_argument("--fid-reference", help="a run folder, an image folder/prefix, or a .npz with mu and sigma")
    ev.add_argument("--inception", help="TorchScript FID Inception: file, directory or object-store URI")
    ev.add_argument("--by", nargs="+", action="extend", default=[], metavar="AXIS",
                    help="manifest column(s) to break the metrics down by (repeatable); resolution: by height x width")
    ev.add_argument("--batch-size", type=int, default=PoolOptions.batch_size,
                    help=f"images per CLIP / Inception batch (default {PoolOptions.batch_size})")
    ev.add_argument("--concurrency", type=int, default=PoolOptions.concurrency, help="actors per pool")
    ev.add_argument("--num-gpus", type=float, default=None, help="GPUs per actor (default: by cluster)")
    ev.add_argument("--storage-options", type=options_arg, default="{}", help="fsspec options for remote URIs, as JSON")
    ev.add_argument("--verbose", action="store_true", help="show Ray's own progress and logs")


def run_from_args(args) -> int:
    """Run `evaluate` from parsed arguments and print where the results are."""
    storage_options = args.storage_options
    if args.num_gpus is not None and args.num_gpus < 0:
        raise SpecError(f"--num-gpus must not be negative, got {args.num_gpus}")
    if args.inception and not args.fid_reference:
        raise SpecError("--inception is the FID's network: give --fid-reference too (no FID is computed without one)")
    if args.batch_size < 1 or args.concurrency < 1:
        raise SpecError("--batch-size and --concurrency must be at least 1")
    pools = PoolOptions(batch_size=args.batch_size, concurrency=args.concurrency, num_gpus=args.num_gpus)
    from jobs.retries import RUN_OPTIONS, check_reachable
    from jobs.spec_rules import check_store

    check_store("run", args.run)
    check_reachable({"run": args.run, "--fid-reference": args.fid_reference, "--clip-model": args.clip_model,
                     "--inception": args.inception}, storage_options, RUN_OPTIONS)
    from jobs.evaluate import evaluate  # Ray, torch and the models: only once the arguments are checked

    metrics = evaluate(EvalOptions(run=args.run, clip_model=args.clip_model, fid_reference=args.fid_reference,
                                   inception=args.inception, by=tuple(dict.fromkeys(args.by)),
                                   storage_options=storage_options, pools=pools,
                                   verbose=args.verbose))
    fid = "n/a" if metrics["fid"] is None else f"{metrics['fid']:.3f}"
    clip = "n/a" if metrics["clip_score"] is None else f"{metrics['clip_score']:.3f}"
    print(f"{metrics['images']} images ({metrics['failed']} failed): CLIP score {clip}, FID {fid}; "
          f"results in {join(args.run, 'eval')}")
    return 0 if metrics["images"] else 1  # not one image could be read: no metric
