"""The partition lease on local files and on a real S3 API (moto server): exclusivity, expiry, takeover."""

from __future__ import annotations

import json
import threading
import time

import pytest

from pipeline.backfill.lease import LeaseLost, PartitionLease, record_name
from pipeline.storage import Location


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.timeout(60)
def test_second_contender_is_refused_until_release(storage_root: Location) -> None:
    directory = storage_root.join("_locks", "date=2025-01-01")
    first = PartitionLease(directory, ttl_s=60, owner="first")
    second = PartitionLease(directory, ttl_s=60, owner="second")

    assert first.try_acquire()
    assert not second.try_acquire()
    assert second.current().owner == "first"

    first.release()
    assert second.try_acquire()
    assert second.held.generation == 1
    # The older record is cleaned up; the newest one is never deleted, so numbers only grow.
    assert directory.files() == [record_name(1)]


@pytest.mark.timeout(60)
def test_expired_lease_is_taken_over_and_the_old_holder_finds_out(storage_root: Location) -> None:
    directory = storage_root.join("_locks", "date=2025-01-02")
    clock = FakeClock()
    stale = PartitionLease(directory, ttl_s=30, owner="stale", clock=clock)
    assert stale.try_acquire()

    clock.now += 10
    assert not PartitionLease(directory, ttl_s=30, owner="early", clock=clock).try_acquire()

    clock.now += 25  # past the stale holder's expiry: it stopped renewing
    taker = PartitionLease(directory, ttl_s=30, owner="taker", clock=clock)
    assert taker.try_acquire()
    assert taker.held.generation == 1

    with pytest.raises(LeaseLost):
        stale.check()
    clock.now -= 30  # even with its clock back inside its ttl, the newer generation tells it that it lost
    with pytest.raises(LeaseLost, match="taken over"):
        stale.check()
    with pytest.raises(LeaseLost):
        stale.renew()
    stale.release()  # must not touch the taker's record
    current = taker.current()
    assert current.owner == "taker"
    assert not current.released
    taker.check()


@pytest.mark.timeout(120)
def test_exactly_one_of_many_concurrent_contenders_wins(storage_root: Location) -> None:
    directory = storage_root.join("_locks", "date=2025-01-03")
    contenders = [PartitionLease(directory, ttl_s=60, owner=f"c{index}") for index in range(8)]
    start = threading.Barrier(len(contenders))
    outcomes: dict[str, bool] = {}

    def contend(lease: PartitionLease) -> None:
        start.wait()
        outcomes[lease.owner] = lease.try_acquire()

    threads = [threading.Thread(target=contend, args=(lease,)) for lease in contenders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    winners = [owner for owner, won in outcomes.items() if won]
    assert len(winners) == 1
    assert PartitionLease(directory).current().owner == winners[0]


@pytest.mark.timeout(120)
def test_exactly_one_contender_takes_over_an_expired_lease(storage_root: Location) -> None:
    directory = storage_root.join("_locks", "date=2025-01-04")
    clock = FakeClock()
    assert PartitionLease(directory, ttl_s=5, owner="dead", clock=clock).try_acquire()
    clock.now += 60
    contenders = [PartitionLease(directory, ttl_s=60, owner=f"c{index}", clock=clock) for index in range(6)]
    start = threading.Barrier(len(contenders))
    won: list[str] = []

    def contend(lease: PartitionLease) -> None:
        start.wait()
        if lease.try_acquire():
            won.append(lease.owner)

    threads = [threading.Thread(target=contend, args=(lease,)) for lease in contenders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1


@pytest.mark.timeout(60)
def test_keep_alive_renews_while_the_work_runs(storage_root: Location) -> None:
    directory = storage_root.join("_locks", "date=2025-01-05")
    holder = PartitionLease(directory, ttl_s=2.0, owner="holder")
    assert holder.try_acquire()
    first_expiry = holder.held.expires_at
    with holder.keep_alive(interval_s=0.3):
        time.sleep(3.0)  # longer than the ttl: without renewals the lease would have expired
        assert not PartitionLease(directory, ttl_s=2.0, owner="other").try_acquire()
        holder.check()
    assert holder.held.expires_at > first_expiry + 0.5
    holder.release()
    assert PartitionLease(directory, ttl_s=2.0, owner="other").try_acquire()


@pytest.mark.timeout(60)
def test_keep_alive_reports_a_takeover_at_the_next_check(storage_root: Location) -> None:
    directory = storage_root.join("_locks", "date=2025-01-06")
    holder = PartitionLease(directory, ttl_s=600, owner="holder")
    assert holder.try_acquire()
    future = FakeClock(time.time() + 3600)  # a contender that sees the lease long expired
    with holder.keep_alive(interval_s=0.2):
        assert PartitionLease(directory, ttl_s=600, owner="taker", clock=future).try_acquire()
        time.sleep(0.8)
        with pytest.raises(LeaseLost):
            holder.check()


@pytest.mark.timeout(60)
def test_unreadable_record_counts_as_held_until_ttl_after_its_write(storage_root: Location) -> None:
    directory = storage_root.join("_locks", "date=2025-01-07")
    directory.join(record_name(0)).write_text("{not json")
    now = time.time()
    assert not PartitionLease(directory, ttl_s=300, clock=lambda: now).try_acquire()
    later = PartitionLease(directory, ttl_s=300, owner="later", clock=lambda: now + 400)
    assert later.try_acquire()
    assert later.held.generation == 1


@pytest.mark.timeout(60)
def test_record_content_names_the_holder(storage_root: Location) -> None:
    directory = storage_root.join("_locks", "date=2025-01-08")
    holder = PartitionLease(directory, ttl_s=60, owner="run-1@host:1")
    assert holder.try_acquire()
    record = json.loads(directory.join(record_name(0)).read_text())
    assert record["owner"] == "run-1@host:1"
    assert record["expires_at"] - record["acquired_at"] == pytest.approx(60)
    holder.release()
    assert json.loads(directory.join(record_name(0)).read_text())["released"] is True


def test_ttl_must_be_positive(tmp_path) -> None:
    with pytest.raises(ValueError):
        PartitionLease(Location.parse(str(tmp_path)), ttl_s=0)
