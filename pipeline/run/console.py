"""What a run prints: the pipeline's own lines by default, Ray's progress blocks and internal logs only when asked.

Ray, left alone, prints a token-authentication warning and "Started a local Ray instance" at `ray.init`, and
Ray Data prints its execution plan, a progress block per operator (13 lines every 10 s when stderr is not a
terminal) and per-dataset statistics. `set_verbose(False)` (the default) turns those off through their own
switches; the pipeline's progress line (pipeline/run/progress.py) and summary remain. Everything Ray logs still goes
to its session's log files (`ray-data.log` and friends under the Ray temp dir).

`start_ray` and `stop_ray` also set up and stop the local cluster a run starts when no RAY_ADDRESS is given.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Callable

logger = logging.getLogger("pipeline")

# How long a local cluster keeps an idle worker process. Ray ends one after a second once its node runs more worker
# processes than it has CPUs, and a run's actors alone (the model, the run's small-objects actor, Ray Data's three)
# outnumber the CPUs of a small machine: between two blocks a decoding worker was ended, and the next block waited
# for a new process that imported Ray Data and torch again (over 2 s of CPU each; a 2,000-row run on 2 CPUs started
# 13 to 16 worker processes). Kept a minute, a run's workers last it: 8 processes (docs/benchmarks.md, "Decoding
# workers kept").
IDLE_WORKER_KEEP_MS = 60_000
IDLE_WORKER_SETTING = "RAY_idle_worker_killing_time_threshold_ms"

_verbose = False
_interactive: bool | None = None


def set_verbose(verbose: bool) -> None:
    """Called by the entry points before anything redirects stderr (it also notes whether stderr is a terminal)."""
    global _verbose, _interactive
    _verbose = verbose
    _interactive = _isatty()


def interactive() -> bool:
    """Whether the user's stderr is a terminal (progress is then rewritten in place)."""
    return _isatty() if _interactive is None else _interactive


def _isatty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def is_verbose() -> bool:
    return _verbose


_after_ray_start: Callable[[], None] | None = None


def after_ray_start(callback: Callable[[], None] | None) -> None:
    """Call `callback` right after `start_ray` has initialised Ray (None: nothing). The entry points use it to take
    SIGINT and SIGTERM back from the handler `ray.init` installs, wherever in the run Ray is started."""
    global _after_ray_start
    _after_ray_start = callback


def start_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS, or start a local one, unless Ray is already initialised."""
    import ray

    if not ray.is_initialized():
        keep_idle_workers()
        ray.init(
            # the "ray" logger of this process: its warnings (token auth) and info lines (local instance started)
            logging_level=logging.INFO if _verbose else logging.ERROR,
            # workers' stdout / stderr copied to this console, prefixed "(MapWorker pid=…)"; always in log files
            log_to_driver=_verbose,
            # A local cluster's dashboard only with -v (Ray's default then): it costs a run 1.3 s of start-up and
            # 3 s of CPU (docs/benchmarks.md, "Re-measured with a quieter local cluster"). Ignored when joining.
            include_dashboard=None if _verbose else False,
        )
        resources = ray.cluster_resources()
        logger.info(
            "Ray: %s, %g CPUs, %g GPUs",
            "the cluster in RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "a local cluster",
            resources.get("CPU", 0),
            resources.get("GPU", 0),
        )
        if _after_ray_start is not None:
            _after_ray_start()
    quiet_ray_data()


def stop_ray() -> None:
    """`ray.shutdown()`, without the second it spends on a local cluster's autoscaler monitor.

    Ray stops a local cluster's processes one after another, each given a second to exit on SIGTERM before SIGKILL.
    The monitor (an autoscaler with nothing to scale here) is stopped after the GCS it reports to and never exits
    in that second, so every run waited a second for the SIGKILL it got anyway; it gets that SIGKILL first here.
    Best effort: Ray's own shutdown still does everything else (and this part, should its internals change).
    """
    import ray

    with contextlib.suppress(Exception):  # a private part of Ray: without it, only the second is lost
        from ray._private import ray_constants
        from ray._private.worker import _global_node

        if _global_node is not None:
            for info in _global_node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []):
                info.process.kill()
                info.process.wait(timeout=5)
    ray.shutdown()


def keep_idle_workers() -> None:
    """Idle worker processes live `IDLE_WORKER_KEEP_MS` in a cluster this process starts (Ray's daemons read the
    setting from their environment; a cluster joined through RAY_ADDRESS keeps its own). A value already in the
    environment wins."""
    os.environ.setdefault(IDLE_WORKER_SETTING, str(IDLE_WORKER_KEEP_MS))


def quiet_ray_data() -> None:
    """Ray Data's progress bars, execution-start lines and console log level, for datasets created after this."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = _verbose
    context.print_on_execution_start = _verbose
    context.verbose_stats_logs = _verbose
    # `ray.data` logs to a session file and to the console through its own handlers (propagate=False); only the
    # console one is turned down. Its file keeps every line.
    level = logging.INFO if _verbose else logging.ERROR
    if not _verbose:
        # Ray Data's tuning hints (Python warnings such as "the operator only received 0 inputs", seen when a
        # resumed run has nothing left to do) are for whoever tunes Ray, not for the user of a finished job.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"ray\.data\.")
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler) and type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(level)
