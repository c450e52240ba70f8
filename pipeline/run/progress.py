"""Progress while a job runs: the model actors report counts to one small actor; the driver shows them.

One line: rows done (of the total when the input's size is cheap to know), ok and error rows, rows per second and
the time left. Once a second batch is done, the rate is the steady one, counted from the first finished batch: it
leaves out the start-up (actors building and compiling the model, Ray Data starting its operators) that a whole-run
average would spread over the ETA. On a terminal the line is rewritten in place every second; otherwise (job logs,
CI) it is logged every `interval_s` seconds, so a long run's log grows by one line per interval.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, TextIO

import ray

from pipeline.run import console

logger = logging.getLogger("pipeline.run.progress")

LOG_INTERVAL_S = 30.0
TTY_INTERVAL_S = 1.0


@dataclass
class ProgressSnapshot:
    ok: int
    error: int
    elapsed_s: float
    total: int | None = None  # rows this run will process, when known
    # Rows reported after the first report, and the seconds from the first report to the last one.
    rows_after_first: int = 0
    seconds_after_first: float = 0.0

    @property
    def done(self) -> int:
        return self.ok + self.error

    @property
    def rows_per_s(self) -> float:
        """The whole run's average, start-up included."""
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def steady_rows_per_s(self) -> float | None:
        """Rows per second since the first batch finished (None until a second one has)."""
        if self.rows_after_first <= 0 or self.seconds_after_first <= 0:
            return None
        return self.rows_after_first / self.seconds_after_first

    @property
    def current_rows_per_s(self) -> float:
        steady = self.steady_rows_per_s
        return self.rows_per_s if steady is None else steady

    def eta_s(self) -> float | None:
        if self.total is None or self.current_rows_per_s <= 0 or self.done >= self.total:
            return None
        return (self.total - self.done) / self.current_rows_per_s

    def line(self) -> str:
        if self.total:
            rows = f"rows {self.done}/{self.total} ({100 * self.done / self.total:.0f}%)"
        else:
            rows = f"rows {self.done}"
        text = f"{rows}: {self.ok} ok, {self.error} error, {self.current_rows_per_s:.2f} rows/s"
        eta = self.eta_s()
        if eta is not None:
            text += f", ETA {format_duration(eta)}"
        return text


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{seconds:02d}s"
    return f"{seconds}s"


class ProgressCounter:
    """Rows the model actors have finished, ok and error (hosted: `pipeline.run.hosted`)."""

    def __init__(self) -> None:
        self.ok = 0
        self.error = 0
        self.started = time.monotonic()
        self.first_at: float | None = None  # when the first batch was reported
        self.first_rows = 0
        self.last_at = 0.0

    def add(self, ok: int, error: int) -> None:
        now = time.monotonic()
        if self.first_at is None:
            self.first_at, self.first_rows = now, ok + error
        self.last_at = now
        self.ok += ok
        self.error += error

    def snapshot(self) -> ProgressSnapshot:
        snapshot = ProgressSnapshot(self.ok, self.error, time.monotonic() - self.started)
        if self.first_at is not None:
            snapshot.rows_after_first = snapshot.done - self.first_rows
            snapshot.seconds_after_first = self.last_at - self.first_at
        return snapshot


class ProgressReporter:
    """Shows the counter's progress from a daemon thread until stopped: in place on a TTY, else a log line."""

    def __init__(
        self,
        counter: Any,
        total: int | None = None,
        *,
        stream: TextIO | None = None,
        interval_s: float | None = None,
    ) -> None:
        self.counter = counter
        self.total = total
        self.stream = stream or sys.stderr
        self.in_place = console.interactive() if stream is None else _is_tty(stream)
        self.interval_s = interval_s or (TTY_INTERVAL_S if self.in_place else LOG_INTERVAL_S)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sam3-embed-progress", daemon=True)
        self._width = 0
        # Held while a line is written: once __exit__ has ended the line, a snapshot still in flight writes nothing.
        self._writing = threading.Lock()

    def __enter__(self) -> ProgressReporter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._writing:
            if self.in_place and self._width:
                self.stream.write("\n")
                self.stream.flush()
            self._width = 0

    def snapshot(self) -> ProgressSnapshot:
        snapshot = ray.get(self.counter.snapshot.remote(), timeout=30)
        snapshot.total = self.total
        return snapshot

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                line = self.snapshot().line()
            except Exception as exc:  # progress is best effort; never disturb the job
                logger.debug("progress unavailable: %s", exc)
                continue
            with self._writing:
                if self._stop.is_set():
                    return
                if self.in_place:
                    # \r back to the line's start; pad with spaces over a longer previous line
                    self.stream.write("\r" + line.ljust(self._width))
                    self.stream.flush()
                    self._width = len(line)
                else:
                    logger.info(line)


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
