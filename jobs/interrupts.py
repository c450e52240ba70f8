"""Ctrl-C (SIGINT) and SIGTERM stop a run within seconds, at any point, and leave no process of it behind.

The first signal raises KeyboardInterrupt in the driver, as Python does by default: Ray Data stops its executor,
the entry point prints one line and exits 130 (143 for SIGTERM), and with `resume_path` a rerun continues where
the files end. That path can stall: Ray's own processes are in the terminal's process group and get the same
Ctrl-C, and a driver calling a GCS that is going away retries for a minute; a run under memory pressure can
take as long to unwind. So a watchdog started by the first signal ends the process after `grace_s`, and a second
signal ends it at once: every process descended from the driver (a local cluster's raylet, GCS, dashboard,
runtime-env and dashboard agents, workers) is killed first, so none outlives the run. SIGTERM, Python's default
for which is to die without running `atexit` (which is how a local cluster's dashboard and agents were left
running), takes the same path.

Python runs a signal handler between any two bytecodes, including inside code whose exceptions it reports and drops
(an `os.register_at_fork` callback such as logging's, run by every `subprocess` start while Ray starts; a `__del__`;
a weakref callback): a KeyboardInterrupt raised there printed "Exception ignored in ..." with a traceback, and the
run went on. Such a dropped interrupt is signalled again to the main thread until it reaches the run.

Processes are found through /proc (Linux); elsewhere only the in-process shutdown runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

GRACE_S = 10.0  # from the first signal to the forced exit
TERM_WAIT_S = 3.0  # between SIGTERM and SIGKILL for processes left after a clean shutdown
REDELIVER_AFTER_S = 0.05  # from a dropped interrupt to its second delivery


class Interrupted(KeyboardInterrupt):
    """Raised in the driver by SIGTERM (SIGINT raises a plain KeyboardInterrupt); carries the exit code."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


def exit_code_for(error: KeyboardInterrupt) -> int:
    return error.exit_code if isinstance(error, Interrupted) else 128 + signal.SIGINT


class SignalHandlers:
    """What `stop_on_signals` yields: `rearm()` takes the signals back after a library installed its own handler
    (`ray.init` sets a SIGTERM handler that exits without stopping anything)."""

    def __init__(self, handle: Callable[[int, FrameType | None], None] | None) -> None:
        self._handle = handle

    def rearm(self) -> None:
        if self._handle is not None:
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, self._handle)


@contextlib.contextmanager
def stop_on_signals(message: str, grace_s: float = GRACE_S) -> Iterator[SignalHandlers]:
    """Within the block, SIGINT and SIGTERM interrupt the run as described above (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield SignalHandlers(None)
        return
    received: list[int] = []
    redelivering: list[bool] = []  # a dropped interrupt sent again: not a second signal
    delivered: list[bool] = []  # the interrupt left the block: nothing more to send

    def handle(signum: int, frame: FrameType | None) -> None:
        if redelivering:  # the same signal as the first (`_signal_main_thread`)
            redelivering.clear()
        else:
            received.append(signum)
            if len(received) > 1:
                _force_exit(message, 128 + received[0])
            threading.Thread(target=_watchdog, args=(message, 128 + signum, grace_s), daemon=True).start()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Interrupted(signum)

    previous_hook = sys.unraisablehook

    def deliver_dropped_interrupt(unraisable: Any) -> None:
        if received and not delivered and isinstance(unraisable.exc_value, KeyboardInterrupt):
            redelivering[:] = [True]
            threading.Thread(target=_signal_main_thread, args=(received[0],), daemon=True).start()
            return
        previous_hook(unraisable)

    previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    sys.unraisablehook = deliver_dropped_interrupt
    try:
        yield SignalHandlers(handle)
    except KeyboardInterrupt:
        delivered.append(True)
        raise
    finally:
        # After a signal the handlers stay (a second one during the exit must force it); otherwise the caller's
        # come back (the block is over, and the caller may go on: tests, `sam3-embed demo`).
        if not received:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            sys.unraisablehook = previous_hook


def _signal_main_thread(signum: int) -> None:
    # A real signal, not `_thread.interrupt_main`: it also wakes a main thread blocked in a system call. Sent from
    # another thread a moment later, so that the handler runs after the callback that dropped the interrupt.
    time.sleep(REDELIVER_AFTER_S)
    signal.pthread_kill(threading.main_thread().ident, signum)


def _watchdog(message: str, code: int, grace_s: float) -> None:
    time.sleep(grace_s)
    _force_exit(f"{message} (forced after {grace_s:.0f}s)", code)


def _force_exit(message: str, code: int) -> None:
    kill_descendants(signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.write(2, f"{message}\n".encode())
    os._exit(code)


def stop_descendants(wait_s: float = TERM_WAIT_S) -> list[int]:
    """SIGTERM every process descended from this one, SIGKILL what is left after `wait_s`; returns their pids."""
    pids = kill_descendants(signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while pids and time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    kill_descendants(signal.SIGKILL, pids)
    return pids


def kill_descendants(signum: int, pids: list[int] | None = None) -> list[int]:
    """Send `signum` to every descendant of this process (the whole tree is read before the first kill)."""
    pids = descendants(os.getpid()) if pids is None else pids
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signum)
    return pids


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")"
        fields = stat[stat.rfind(b")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    queue = list(children.get(root, []))
    while queue:
        pid = queue.pop()
        found.append(pid)
        queue.extend(children.get(pid, []))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] != b"Z"  # a zombie is gone but not reaped


def shut_down_ray() -> None:
    """After an interrupt: disconnect from Ray (stopping a local cluster), then end whatever it left running."""
    with contextlib.suppress(Exception):
        import ray

        from pipeline.run.console import stop_ray

        if ray.is_initialized():
            stop_ray()
    stop_descendants()
    sys.stderr.flush()
