"""An expiring, exclusive lease on one partition, built on nothing but "create this object if it does not exist".

Object stores have no locks and no atomic rename, but S3 (and GCS, Azure, local files) can create an object only
when the key is free (`If-None-Match: *`, O_EXCL). A lease directory holds numbered records
`lease-<generation>.json`. The highest generation is the current lease:

* acquire: read the highest record; if it is live and someone else's, the partition is busy. Otherwise (none,
  expired, or released) create generation + 1 exclusively. Of several contenders exactly one creation succeeds.
* renew: the holder rewrites its own record with a later expiry (nobody else ever writes that key).
* steal: a holder that stops renewing (crashed, partitioned) expires after `ttl_s`; the next contender takes
  generation + 1. The old holder notices on its next renewal or check that a higher generation exists, and must
  not commit.
* release: the holder marks its record released. The highest record is never deleted, so generations only grow
  and a contender working from an old listing cannot reuse a number.

Expiry compares the writer's timestamp with the reader's clock: keep `ttl_s` far above clock skew between hosts.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from pipeline.storage import Location

logger = logging.getLogger(__name__)

_RECORD_NAME = re.compile(r"^lease-(\d{12})\.json$")
DEFAULT_TTL_S = 900.0


class LeaseLost(RuntimeError):
    """The lease expired or was taken over: the holder must stop before making anything visible."""


@dataclass(frozen=True)
class LeaseRecord:
    generation: int
    owner: str
    host: str
    pid: int
    acquired_at: float
    expires_at: float
    released: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LeaseRecord:
        return cls(**json.loads(text))

    def is_live(self, now: float) -> bool:
        return not self.released and now < self.expires_at


def record_name(generation: int) -> str:
    return f"lease-{generation:012d}.json"


class PartitionLease:
    """Lease over `directory` (one per partition). Not reentrant; one holder object per attempt."""

    def __init__(
        self,
        directory: Location,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError("lease ttl must be positive")
        self.directory = directory
        self.ttl_s = ttl_s
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._clock = clock
        self._held: LeaseRecord | None = None
        self._lost_reason: str | None = None

    @property
    def held(self) -> LeaseRecord | None:
        return self._held

    def current(self) -> LeaseRecord | None:
        """The highest-generation record, or None when the partition was never leased."""
        generations = self._generations()
        if not generations:
            return None
        return self._read(generations[-1])

    def try_acquire(self) -> bool:
        if self._held is not None:
            raise RuntimeError("lease already held by this object")
        now = self._clock()
        current = self.current()
        if current is not None and current.is_live(now):
            logger.info("lease %s busy: held by %s until %.0f", self.directory.uri, current.owner, current.expires_at)
            return False
        generation = 0 if current is None else current.generation + 1
        record = LeaseRecord(
            generation=generation,
            owner=self.owner,
            host=socket.gethostname(),
            pid=os.getpid(),
            acquired_at=now,
            expires_at=now + self.ttl_s,
        )
        if not self.directory.join(record_name(generation)).create_exclusive(record.to_json()):
            logger.info("lease %s: lost the race for generation %d", self.directory.uri, generation)
            return False
        newest = self._generations()
        if newest and newest[-1] > generation:
            # Our listing was stale: a winner had already taken a later generation and deleted this one, so the
            # name was free again (a local directory scan can miss both a file added and one removed during it).
            self.directory.join(record_name(generation)).remove()
            logger.info("lease %s: generation %d was already superseded", self.directory.uri, generation)
            return False
        self._held = record
        self._lost_reason = None
        self._forget_older_generations(generation)
        return True

    def check(self) -> None:
        """Raise LeaseLost unless this object still holds the newest, unexpired lease."""
        if self._lost_reason is not None:
            raise LeaseLost(self._lost_reason)
        held = self._require_held()
        now = self._clock()
        if now >= held.expires_at:
            raise LeaseLost(f"lease on {self.directory.uri} expired {now - held.expires_at:.0f}s ago")
        newest = self._generations()
        if newest and newest[-1] > held.generation:
            raise LeaseLost(f"lease on {self.directory.uri} was taken over (generation {newest[-1]})")

    def renew(self) -> None:
        self.check()
        held = self._require_held()
        renewed = LeaseRecord(**{**asdict(held), "expires_at": self._clock() + self.ttl_s})
        self.directory.join(record_name(held.generation)).write_text(renewed.to_json())
        self._held = renewed

    def release(self) -> None:
        """Mark the lease free. Safe to call when it was lost: then it leaves the new holder's record alone."""
        held = self._held
        if held is None:
            return
        self._held = None
        newest = self._generations()
        if newest and newest[-1] != held.generation:
            return
        released = LeaseRecord(**{**asdict(held), "released": True})
        try:
            self.directory.join(record_name(held.generation)).write_text(released.to_json())
        except OSError:
            # The lease then simply expires; nothing else depends on this write.
            logger.warning("could not release lease %s; it will expire", self.directory.uri, exc_info=True)

    @contextmanager
    def keep_alive(self, interval_s: float | None = None) -> Iterator[None]:
        """Renew in a background thread while the body runs. A failed renewal is remembered and makes the next
        `check()` raise, so the body finds out before it commits."""
        interval = interval_s if interval_s is not None else self.ttl_s / 3
        stop = threading.Event()

        def renew_until_stopped() -> None:
            while not stop.wait(interval):
                try:
                    self.renew()
                except LeaseLost as lost:
                    self._lost_reason = str(lost)
                    return
                except OSError:
                    # Storage hiccup: try again next tick; the lease is still valid until it expires.
                    logger.warning("lease renewal failed for %s", self.directory.uri, exc_info=True)

        thread = threading.Thread(target=renew_until_stopped, name="lease-keep-alive", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _require_held(self) -> LeaseRecord:
        if self._held is None:
            raise LeaseLost(f"lease on {self.directory.uri} is not held")
        return self._held

    def _generations(self) -> list[int]:
        names = [name for name in self.directory.files() if "/" not in name]
        return sorted(int(match.group(1)) for name in names if (match := _RECORD_NAME.match(name)))

    def _read(self, generation: int) -> LeaseRecord:
        location = self.directory.join(record_name(generation))
        try:
            return LeaseRecord.from_json(location.read_text())
        except FileNotFoundError:
            # Cleaned up between listing and reading: only older generations are ever deleted, so a newer one
            # exists; treat this one as busy-until-ttl from now rather than guessing.
            return self._unknown_record(generation, self._clock())
        except (ValueError, TypeError):
            # Unreadable record (foreign writer): trust only the storage's timestamp.
            modified = location.fs.modified(location.path).timestamp()
            return self._unknown_record(generation, modified)

    def _unknown_record(self, generation: int, since: float) -> LeaseRecord:
        return LeaseRecord(
            generation=generation, owner="unknown", host="", pid=0, acquired_at=since, expires_at=since + self.ttl_s
        )

    def _forget_older_generations(self, generation: int) -> None:
        for older in self._generations():
            if older >= generation:
                break
            try:
                self.directory.join(record_name(older)).remove()
            except OSError:
                logger.debug("could not delete old lease record %d", older, exc_info=True)
