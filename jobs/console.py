"""Quiet by default: Ray's own progress bars, info logs and warnings off in the terminal unless --verbose."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading

# A Ray started here keeps an idle worker process for a minute, not Ray's default second: a run's short phases (a
# join's map and reduce tasks, each kind in its own pool of workers) would otherwise each start new processes,
# ~2 s apiece on a small machine (a 5-row `--retry-failed`: 66 s → 24 s on 2 cores). As environment variables
# (Ray's RAY_<setting>): a cluster joined instead keeps its own settings.
VERBOSE_HELP = "show Ray's own progress bars and logs, and the model libraries' messages and download bars"
LOCAL_RAY_SETTINGS = {"RAY_idle_worker_killing_time_threshold_ms": "60000"}


def local_ray_settings() -> None:
    """Set LOCAL_RAY_SETTINGS for a Ray this process starts (where the caller has not set them already)."""
    for key, value in LOCAL_RAY_SETTINGS.items():
        os.environ.setdefault(key, value)


def start_ray(verbose: bool = False) -> None:
    """Join RAY_ADDRESS (or the caller's Ray, or the cluster `ray start` started on this machine), else start a
    local Ray; then set how loud Ray Data is."""
    import ray

    if verbose:
        os.environ["WUERSTCHEN_BATCH_VERBOSE"] = "1"  # stage actors keep the model libraries' messages
    if not ray.is_initialized():
        local_ray_settings()
        try:
            ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=True,
                     logging_level=logging.INFO if verbose else logging.ERROR)
        except SystemExit as err:  # ray.init's own SIGTERM handler (sys.exit(15)) while it starts
            if err.code == signal.SIGTERM:
                interrupt_on_sigterm()  # a second SIGTERM while the command cleans up interrupts that too
                raise KeyboardInterrupt from None
            raise
        interrupt_on_sigterm()  # before anything else runs under Ray's handler
        if not verbose:
            absorb_restart_warning()
    quiet_ray_data(verbose)


def joined_cluster() -> bool:
    """Whether this process's Ray is a cluster it joined (RAY_ADDRESS, a `ray start` cluster of this machine), not
    a Ray started in this process: only a joined one may gain nodes while a job waits for them."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # the head node where this process started it; None
    return ray.is_initialized() and (node is None or not node.head)  # for a Ray Client (ray://) connection


def raise_interrupt(signum, frame):
    """A signal handler that interrupts the main thread as Ctrl-C does."""
    raise KeyboardInterrupt


def interrupt_on_sigterm() -> None:
    """SIGTERM (what Kubernetes and Slurm send) interrupts as Ctrl-C does: the lease is given back and the command
    says how to go on. ray.init puts in its own handler (sys.exit after a native stack dump); this replaces it."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_interrupt)


@functools.cache
def absorb_restart_warning() -> None:
    """Ray Data hands every actor-pool worker its DataContext and transform as object-store arguments and
    turns actor restarts on, so Ray core logs, once per driver process, an ERROR line that a restarted actor
    could lose such arguments (ray-project/ray#53727): it is not caused by the job's own arguments (the
    stages take a few strings) and is no error of the job; Ray Data keeps those objects alive for the whole
    run. Trigger that once-per-process line here, with stderr pointed at /dev/null for the one call, so
    that it does not read as a failure in the middle of the job."""
    import ray

    @ray.remote(num_cpus=0, max_restarts=1)
    class Probe:
        def __init__(self, arg):
            self.arg = arg

    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        probe = Probe.remote(ray.put(None))
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    probe.__ray_terminate__.remote()  # exits once created (killing it while still pending makes the GCS log)


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data without its progress bars, execution-plan lines and console info (its log file keeps all)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = verbose
    context.print_on_execution_start = verbose
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":
            handler.setLevel(logging.INFO if verbose else logging.ERROR)
