"""Progress while a job runs: the model actors report counts to one small actor; the driver logs them periodically.

Ray Data's own progress bars show per-operator progress; this adds one line a user can grep in job logs.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import ray

logger = logging.getLogger("pipeline.progress")


@dataclass
class ProgressSnapshot:
    ok: int
    error: int
    elapsed_s: float

    @property
    def done(self) -> int:
        return self.ok + self.error

    @property
    def rows_per_s(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def line(self) -> str:
        return f"rows done {self.done} (ok {self.ok}, error {self.error}), {self.rows_per_s:.2f} rows/s"


@ray.remote(num_cpus=0)
class ProgressCounter:
    def __init__(self) -> None:
        self.ok = 0
        self.error = 0
        self.started = time.monotonic()

    def add(self, ok: int, error: int) -> None:
        self.ok += ok
        self.error += error

    def snapshot(self) -> ProgressSnapshot:
        return ProgressSnapshot(self.ok, self.error, time.monotonic() - self.started)


class ProgressLogger:
    """Logs a progress line every `interval_s` seconds from a daemon thread until stopped."""

    def __init__(self, counter: ray.actor.ActorHandle, interval_s: float = 15.0) -> None:
        self.counter = counter
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sam3-embed-progress", daemon=True)

    def __enter__(self) -> ProgressLogger:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def snapshot(self) -> ProgressSnapshot:
        return ray.get(self.counter.snapshot.remote(), timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                logger.info(self.snapshot().line())
            except Exception as exc:  # progress is best effort; never disturb the job
                logger.debug("progress unavailable: %s", exc)
