"""Quiet by default, everything with -v: the switches in pipeline/run/console.py and the stderr filter."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from jobs.native_stderr import NativeStderrFilter
from pipeline.run import console
from tests.test_interrupts import processes_using

REPO_ROOT = Path(__file__).resolve().parents[1]

CORE_WORKER_LINE = (
    b"[2026-11-22 05:48:22,849 E 4749 4749] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches("
    b"EmbedWorker))' and ID: '535f' has constructor arguments in the object store and max_restarts > 0. If the "
    b"arguments in the object store go out of scope or are lost, the actor restart will fail.\n"
)


def test_the_filter_drops_rays_core_worker_line_and_passes_everything_else_in_order(
    capfd: pytest.CaptureFixture[str],
) -> None:
    with NativeStderrFilter():
        os.write(2, b"first line\n")
        os.write(2, CORE_WORKER_LINE)
        os.write(2, b"[2026-11-22 05:48:23,000 E 1 1] raylet.cc:1: a real native error\n")
        os.write(2, b"\rrows 3/10: 3 ok")  # an in-place progress update, no newline
    os.write(2, b"\nafter\n")
    err = capfd.readouterr().err
    assert err == (
        "first line\n[2026-11-22 05:48:23,000 E 1 1] raylet.cc:1: a real native error\n\rrows 3/10: 3 ok\nafter\n"
    )


def test_verbose_turns_ray_datas_progress_and_console_logs_back_on(ray_local: None) -> None:
    from ray.data import DataContext

    def console_levels() -> set[int]:
        # file handlers (Ray's session log, and any rotating file handler a Ray session adds) never reach the console
        handlers = logging.getLogger("ray.data").handlers
        return {
            h.level
            for h in handlers
            if not isinstance(h, logging.FileHandler) and type(h).__name__ != "SessionFileHandler"
        }

    try:
        console.set_verbose(True)
        console.quiet_ray_data()
        context = DataContext.get_current()
        assert context.enable_progress_bars and context.print_on_execution_start
        assert console_levels() == {logging.INFO}
        console.set_verbose(False)
        console.quiet_ray_data()
        assert not context.enable_progress_bars and not context.print_on_execution_start
        assert console_levels() == {logging.ERROR}
    finally:
        console.set_verbose(False)
        console.quiet_ray_data()


# In its own process and Ray temp dir, so the cluster is the one `start_ray` starts: on a node of 2 CPUs, four tasks
# of half a CPU at once (three or four worker processes, over Ray's soft limit of one per CPU), a 4 s pause, four
# again.
IDLE_WORKER_SCRIPT = """
import os, time
import ray
from pipeline.run import console

ray.init = (lambda init: lambda **kw: init(num_cpus=2, **kw))(ray.init)
console.start_ray()

@ray.remote(num_cpus=0.5)
def pid():
    time.sleep(2)
    return os.getpid()

first = set(ray.get([pid.remote() for _ in range(4)]))
time.sleep(4)
second = set(ray.get([pid.remote() for _ in range(4)]))
print(len(first), len(first & second))
console.stop_ray()
"""


@pytest.mark.timeout(90)
def test_a_local_cluster_keeps_idle_worker_processes_for_the_next_tasks_and_stops_whole() -> None:
    """The run's local cluster keeps every worker of the first round for the second (`console.keep_idle_workers`);
    with Ray's own setting (1 s, `RAY_idle_worker_killing_time_threshold_ms=1000` in the environment) all but two
    end in the pause and new processes start. `console.stop_ray` (its autoscaler monitor killed first, then Ray's own
    shutdown) leaves no process of the cluster behind."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", console.IDLE_WORKER_SETTING)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rk-", dir="/tmp")  # short: Ray's socket paths must fit
    try:
        result = subprocess.run(
            [sys.executable, "-c", IDLE_WORKER_SCRIPT], capture_output=True, text=True, env=env, timeout=80
        )
        left = processes_using(Path(env["RAY_TMPDIR"]))
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    started, kept = result.stdout.split()
    assert int(started) > 2 and kept == started, result.stdout
    assert not left, left
