"""Drop known noise that Ray's C++ core writes straight to this process's stderr (file descriptor 2).

Python's logging switches cannot reach these lines: Ray's core worker in the driver logs error-level lines to fd 2
itself. The one every run printed: Ray Data always passes a model actor's constructor through the object store and
keeps actor restarts on (for fault tolerance), and the core worker then logs, at error level, that such an actor
could not be restarted if those arguments were lost. Nothing is wrong and nothing can be done about it, so the
entry points filter it unless `-v` is given. Everything else passes through unchanged, in order; the line still
reaches Ray's own log file (`python-core-driver-*.log`).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from types import TracebackType

NOISE = (re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store"),)
_SYNC = b"\x00sam3-embed-stderr-sync\n"  # written on exit; once the reader sees it, all earlier bytes are out


class NativeStderrFilter:
    """Context manager: fd 2 goes through a pipe whose reader forwards every line except the NOISE ones.

    On exit fd 2 is restored once everything written before has been forwarded. Processes started meanwhile
    (a local Ray cluster) keep the pipe as their stderr; the reader stays alive, as a daemon, to forward theirs.
    """

    def __init__(self, noise: tuple[re.Pattern[bytes], ...] = NOISE) -> None:
        self.noise = noise
        self._synced = threading.Event()
        self._saved: int | None = None

    def __enter__(self) -> NativeStderrFilter:
        sys.stderr.flush()
        self._saved = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        threading.Thread(target=self._forward, args=(read_end, self._saved), daemon=True).start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        assert self._saved is not None
        sys.stderr.flush()
        os.write(2, _SYNC)
        self._synced.wait(timeout=5)
        os.dup2(self._saved, 2)  # the reader keeps writing to its own copy of the original stderr

    def _forward(self, read_end: int, target: int) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(read_end, 65536)
            except OSError:
                return
            if not chunk:
                return
            pending += chunk
            while True:
                cut = min((i for i in (pending.find(b"\n"), pending.find(b"\r")) if i >= 0), default=-1)
                if cut < 0:
                    break
                line, pending = pending[: cut + 1], pending[cut + 1 :]
                self._emit(line, target)
            if pending and not pending.startswith((b"[", b"\x00")):
                # not the start of a native log line (those begin "[2026-…"): no reason to hold it back
                self._emit(pending, target)
                pending = b""

    def _emit(self, line: bytes, target: int) -> None:
        synced = _SYNC in line
        line = line.replace(_SYNC, b"")
        if line and not any(pattern.search(line) for pattern in self.noise):
            with contextlib.suppress(OSError):  # the original stderr is gone (a closed terminal): nothing to tell
                os.write(target, line)
        if synced:
            self._synced.set()  # only now: everything written before the sync mark is out
