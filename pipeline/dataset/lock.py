"""One writer per dataset: the backfill's lease (`pipeline.backfill.lease`) on `<output>/_locks/dataset`.

Two schedulers firing the same nightly job must never both write ids into one output. The second one is refused
before Ray starts with a line naming the run that holds the dataset; its scheduler retries later. A holder renews
its lease while it runs; a holder that died stops renewing and its lease expires after `ttl_s`. A holder on this
same host whose process is gone is known dead at once (its record names host and pid), so a rerun right after a
crash or a kill does not wait for the expiry.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime, timezone

from pipeline.backfill.lease import LeaseRecord, PartitionLease
from pipeline.storage import Location

LOCK_DIR = "_locks/dataset"
DATASET_LEASE_TTL_S = 120.0  # renewed every 40 s while the run lives


class DatasetBusy(RuntimeError):
    """Another run holds the dataset's lease."""


def dataset_lease(output: Location, run_id: str, ttl_s: float = DATASET_LEASE_TTL_S) -> PartitionLease:
    owner = f"run {run_id} on {socket.gethostname()} (pid {os.getpid()})"
    return PartitionLease(output.join(LOCK_DIR), ttl_s=ttl_s, owner=owner)


def acquire(lease: PartitionLease) -> None:
    """Take the lease or raise DatasetBusy with one line naming the holder."""
    _release_for_dead_local_holder(lease)
    if lease.try_acquire():
        return
    holder = lease.current()
    if holder is None:
        raise DatasetBusy(f"{_root(lease)} is being written by another run; try again when it has finished")
    until = datetime.fromtimestamp(holder.expires_at, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    raise DatasetBusy(
        f"{_root(lease)} is being written by {holder.owner} (lease renewed until {until}); "
        "this run wrote nothing: try again when that run has finished"
    )


def _root(lease: PartitionLease) -> str:
    return lease.directory.uri.removesuffix("/" + LOCK_DIR)


def _release_for_dead_local_holder(lease: PartitionLease) -> None:
    holder = lease.current()
    if holder is None or holder.released or holder.host != socket.gethostname() or _alive(holder.pid):
        return
    # The record's writer is gone: only it would ever rewrite this record, so marking it released is safe.
    released = LeaseRecord(**{**holder.__dict__, "released": True})
    lease.directory.join(f"lease-{holder.generation:012d}.json").write_text(released.to_json())


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
