"""Staged commits on local files and on moto S3: all-or-nothing visibility, manifests, crash leftovers."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.backfill.commit import SUCCESS_MARKER, commit_partition, is_committed, read_manifest, uncommit
from pipeline.storage import Location


def write_parquet(location: Location, ids: list[str]) -> None:
    location.fs.makedirs(location.path.rsplit("/", 1)[0], exist_ok=True)
    with location.fs.open(location.path, "wb") as f:
        pq.write_table(pa.table({"id": ids, "value": list(range(len(ids)))}), f)


def stage(root: Location, files: dict[str, list[str]]) -> Location:
    staged = root.join("_staging", "date=2025-01-01", "data")
    for name, ids in files.items():
        write_parquet(staged.join(name), ids)
    staged.join(SUCCESS_MARKER).write_text("{}")  # the pipeline's own marker, not carried over
    staged.join("_summary.json").write_text(json.dumps({"rows": 5}))
    return staged


def read_ids(partition: Location) -> list[str]:
    manifest = read_manifest(partition)
    assert manifest is not None
    ids: list[str] = []
    for entry in manifest.files:
        if entry.path.endswith(".parquet"):
            with partition.fs.open(partition.join(entry.path).path, "rb") as f:
                ids.extend(pq.read_table(f).column("id").to_pylist())
    return ids


@pytest.mark.timeout(60)
def test_commit_copies_files_and_writes_a_manifest_last(storage_root: Location) -> None:
    staged = stage(storage_root, {"part-0.parquet": ["a", "b", "c"], "part-1.parquet": ["d", "e"]})
    final = storage_root.join("date=2025-01-01")

    manifest = commit_partition(staged, final, partition={"date": "2025-01-01"}, run_id="run-1", details={"note": "x"})

    assert is_committed(final)
    assert final.files() == ["_SUCCESS", "_summary.json", "part-0.parquet", "part-1.parquet"]
    assert manifest.rows == 5
    assert {entry.path: entry.rows for entry in manifest.files} == {
        "part-0.parquet": 3,
        "part-1.parquet": 2,
        "_summary.json": None,
    }
    on_disk = read_manifest(final)
    assert on_disk == manifest
    assert on_disk.partition == {"date": "2025-01-01"}
    assert on_disk.details == {"note": "x"}
    assert sorted(read_ids(final)) == ["a", "b", "c", "d", "e"]


@pytest.mark.timeout(60)
def test_a_commit_interrupted_before_the_marker_stays_invisible_and_is_replaced(storage_root: Location) -> None:
    staged = stage(storage_root, {"part-0.parquet": ["a", "b"]})
    final = storage_root.join("date=2025-01-01")
    write_parquet(final.join("debris-from-an-older-crash.parquet"), ["zzz"])

    def crash() -> None:
        raise RuntimeError("lost the lease")

    with pytest.raises(RuntimeError):
        commit_partition(staged, final, partition={"date": "2025-01-01"}, run_id="r", before_marker=crash)
    assert not is_committed(final)
    assert read_manifest(final) is None
    assert "part-0.parquet" in final.files()  # copied, but not visible without the marker

    commit_partition(staged, final, partition={"date": "2025-01-01"}, run_id="r2")
    assert read_ids(final) == ["a", "b"]
    assert "debris-from-an-older-crash.parquet" not in final.files()


@pytest.mark.timeout(60)
def test_recommit_replaces_the_previous_commit(storage_root: Location) -> None:
    final = storage_root.join("date=2025-01-01")
    first = stage(storage_root, {"old.parquet": ["a"]})
    commit_partition(first, final, partition={"date": "2025-01-01"}, run_id="first")
    first.remove()
    second = stage(storage_root, {"new.parquet": ["b", "c"]})
    commit_partition(second, final, partition={"date": "2025-01-01"}, run_id="second")
    assert read_manifest(final).run_id == "second"
    assert "old.parquet" not in final.files()
    assert read_ids(final) == ["b", "c"]


@pytest.mark.timeout(60)
def test_nested_side_outputs_are_carried_but_not_counted_as_rows(storage_root: Location) -> None:
    staged = stage(storage_root, {"part-0.parquet": ["a"], "_errors/part-0.parquet": ["bad"]})
    final = storage_root.join("date=2025-01-01")
    manifest = commit_partition(staged, final, partition={"date": "2025-01-01"}, run_id="r")
    assert manifest.rows == 1
    assert "_errors/part-0.parquet" in final.files()


@pytest.mark.timeout(60)
def test_empty_partition_commits_with_zero_rows(storage_root: Location) -> None:
    staged = storage_root.join("_staging", "date=2025-01-09", "data")
    final = storage_root.join("date=2025-01-09")
    manifest = commit_partition(staged, final, partition={"date": "2025-01-09"}, run_id="r")
    assert manifest.rows == 0
    assert manifest.files == []
    assert is_committed(final)


@pytest.mark.timeout(60)
def test_uncommit_hides_then_removes(storage_root: Location) -> None:
    staged = stage(storage_root, {"part-0.parquet": ["a"]})
    final = storage_root.join("date=2025-01-01")
    commit_partition(staged, final, partition={"date": "2025-01-01"}, run_id="r")
    uncommit(final)
    assert not is_committed(final)
    assert final.files() == []


@pytest.mark.timeout(60)
def test_nested_markers_of_a_partitioned_run_are_copied_only_after_the_lease_check(storage_root: Location) -> None:
    staged = stage(storage_root, {"split=a/part-0.parquet": ["a"], "split=b/part-0.parquet": ["b"]})
    for split in ("a", "b"):
        staged.join(f"split={split}", SUCCESS_MARKER).write_text("{}")
    final = storage_root.join("date=2025-01-01")

    def crash() -> None:
        raise RuntimeError("lost the lease")

    with pytest.raises(RuntimeError):
        commit_partition(staged, final, partition={"date": "2025-01-01"}, run_id="r", before_marker=crash)
    assert not [name for name in final.files() if name.endswith(SUCCESS_MARKER)]

    commit_partition(staged, final, partition={"date": "2025-01-01"}, run_id="r")
    assert {"split=a/_SUCCESS", "split=b/_SUCCESS", "_SUCCESS"} <= set(final.files())
    uncommit(final)
    assert final.files() == []
