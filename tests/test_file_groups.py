"""Files per partition and the first files: the rule of `pipeline.run.file_groups` alone (no Ray), then a real
run on the shared local Ray cluster (resume checkpoint included)."""

from __future__ import annotations

import io
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import JobConfig, run_job
from pipeline.dataset import schema
from pipeline.run.file_groups import PartitionChunks


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def block(start: int, rows: int, shards: list[str]) -> pa.Table:
    return pa.table({"id": [f"r{start + i}" for i in range(rows)], "shard": shards[:rows]})


def files_by_partition(chunks: list[pa.Table]) -> dict[str, list[int]]:
    files: dict[str, list[int]] = {}
    for chunk in chunks:
        values = set(chunk.column("shard").to_pylist())
        assert len(values) == 1, values  # one partition value per chunk: one file per chunk
        files.setdefault(values.pop(), []).append(chunk.num_rows)
    return files


@pytest.mark.parametrize("seed", range(4))
def test_files_per_partition_stay_within_the_bound_whatever_the_rate_skew_and_block_sizes(seed: int) -> None:
    rng = random.Random(seed)
    min_rows = rng.choice([7, 16, 50])
    clock = Clock()
    chunks = PartitionChunks(["shard"], min_rows, first_file_after_s=30.0, clock=clock)
    weights = [rng.random() ** 3 for _ in range(6)]  # skewed: some partitions get a row now and then
    out: list[pa.Table] = []
    start = 0
    for _ in range(120):
        rows = rng.randint(1, 40)
        shards = rng.choices([f"s{i}" for i in range(6)], weights=weights, k=rows)
        out += chunks.add(block(start, rows, shards))
        start += rows
        clock.now += rng.choice([0.1, 1.0, 9.0])  # fast and slow stretches: early files in some partitions
    out += chunks.drain()

    ids = [row_id for chunk in out for row_id in chunk.column("id").to_pylist()]
    assert len(ids) == start and len(set(ids)) == start  # every row once
    assert chunks.counts() == (start, start)
    written = Counter(shard for chunk in out for shard in chunk.column("shard").to_pylist())
    for shard, sizes in files_by_partition(out).items():
        assert len(sizes) <= math.ceil(written[shard] / min_rows) + 1, (shard, sizes, min_rows)
        assert all(size >= min_rows for size in sizes[1:-1])  # only the first and the last file may be small


def test_the_first_file_of_each_partition_comes_once_its_oldest_row_has_waited_and_only_the_first() -> None:
    clock = Clock()
    chunks = PartitionChunks(["shard"], 1000, first_file_after_s=30.0, clock=clock)
    assert chunks.add(block(0, 3, ["a", "a", "b"])) == []
    clock.now = 20.0
    assert chunks.add(block(3, 1, ["c"])) == []
    clock.now = 31.0  # a and b waited 31 s, c 11 s: only a and b are due
    first = chunks.add(block(4, 1, ["a"]))
    assert sorted((c.column("shard")[0].as_py(), c.num_rows) for c in first) == [("a", 3), ("b", 1)]
    clock.now = 100.0  # c is due now; a and b have written their first file: they wait for 1000 rows
    later = chunks.add(block(5, 2, ["a", "b"]))
    assert [(c.column("shard")[0].as_py(), c.num_rows) for c in later] == [("c", 1)]
    assert sorted((c.column("shard")[0].as_py(), c.num_rows) for c in chunks.drain()) == [("a", 1), ("b", 1)]


def test_without_partition_columns_rows_are_gathered_into_files_of_at_least_the_minimum() -> None:
    chunks = PartitionChunks([], 10, first_file_after_s=1e9)
    out = [chunk for start in range(0, 44, 4) for chunk in chunks.add(block(start, 4, ["x"] * 4))]
    assert [chunk.num_rows for chunk in out] == [12, 12, 12]
    assert [chunk.num_rows for chunk in chunks.drain()] == [8]


# A real run ---------------------------------------------------------------------------------------------------------

ROWS = 48
SHARDS = 4


def hf_parquet(path: Path) -> Path:
    rng = np.random.default_rng(0)
    images = []
    for i in range(ROWS):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
        images.append({"bytes": buffer.getvalue(), "path": f"{i}.jpg"})
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array(images, image_type),
            "caption": [f"picture {i}" for i in range(ROWS)],
            "shard": [f"s{i % SHARDS}" for i in range(ROWS)],
        }
    )
    pq.write_table(table, path, row_group_size=16)
    return path


def config(tmp_path: Path, min_rows: int) -> JobConfig:
    return JobConfig.from_dict(
        {
            "input": {"uri": str(hf_parquet(tmp_path / "m.parquet"))},
            "output": {"uri": str(tmp_path / "out"), "partition_by": ["shard"], "min_rows_per_file": min_rows},
            "model": {"config": "tiny", "imgsz": 56, "random_weights": True, "compile": "off"},
            "compute": {"batch_size": 4, "num_actors": 1},
            "resume_path": str(tmp_path / "ckpt"),
        }
    )


def output_files(tmp_path: Path) -> dict[str, list[str]]:
    files: dict[str, list[str]] = {}
    for path in sorted((tmp_path / "out").rglob("*.parquet")):
        files.setdefault(path.parent.name, []).append(path.name)
    return files


@pytest.mark.timeout(240)
def test_a_partitioned_run_writes_one_file_per_partition_and_checkpoints_the_last_chunks(
    ray_local: None, tmp_path: Path
) -> None:
    """12 rows per partition, minimum 100: Ray Data's own writer wrote a file per partition per write task; here
    the rows wait in the buffer and each partition gets one file, written at the end with its checkpoint."""
    footer_readers_before = actors_named("FooterReader")
    summary = run_job(config(tmp_path, 100))
    assert (summary.rows_total, summary.rows_ok) == (ROWS, ROWS)
    files = output_files(tmp_path)
    assert sorted(files) == [f"shard=s{i}" for i in range(SHARDS)]
    assert all(len(names) == 1 and names[0].startswith("tail-") for names in files.values()), files

    written = pq.ParquetDataset(str(tmp_path / "out")).read(columns=["id"]).column("id").to_pylist()
    assert len(written) == ROWS == len(set(written))
    for path in (tmp_path / "out").rglob("*.parquet"):  # the model's block timestamps are never written
        assert set(pq.read_schema(path).metadata) == {schema.METADATA_KEY}, path
    checkpoints = list((tmp_path / "ckpt").glob("*.parquet"))
    assert not [path for path in checkpoints if ".pending" in path.name]
    checkpointed = pa.concat_tables([pq.read_table(path) for path in checkpoints]).column("id").to_pylist()
    assert sorted(checkpointed) == sorted(written)  # each row checkpointed once, with the file that holds it
    prefix = next(files.values().__iter__())[0].split("_")[0]
    assert (tmp_path / "ckpt" / f"{prefix}.parquet").exists()  # named after the files, as Ray Data's recovery needs

    again = run_job(config(tmp_path, 100))  # a rerun with the same checkpoint adds nothing
    assert (again.rows_this_run, again.rows_total) == (0, ROWS) and output_files(tmp_path) == files
    # Reading the Parquet input and the checkpoint back started no pool of footer-reading actors (32 processes a
    # read with Ray Data's newer Parquet reader: pipeline.run.job._run_context_fields).
    assert actors_named("FooterReader") == footer_readers_before


def actors_named(class_name: str) -> int:
    """Actors of that class the cluster has ever started, dead ones included (the GCS's actor table: Ray's
    state API needs the dashboard, which the test cluster leaves out)."""
    import ray._private.state

    return sum(1 for actor in ray._private.state.actors().values() if actor["ActorClassName"] == class_name)


@pytest.mark.timeout(240)
def test_first_files_are_written_while_the_run_streams_and_the_count_stays_within_the_bound(
    ray_local: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.run.file_groups

    monkeypatch.setattr(pipeline.run.file_groups, "FIRST_FILE_AFTER_S", 0.0)  # every partition's first block is due
    summary = run_job(config(tmp_path, 5))
    assert summary.rows_total == ROWS
    files = output_files(tmp_path)
    for names in files.values():
        assert len(names) <= math.ceil(ROWS / SHARDS / 5) + 1, files
        assert not names[0].startswith("tail-") or len(names) == 1  # the first written by the streaming write
    assert any(not name.startswith("tail-") for names in files.values() for name in names)
    written = pq.ParquetDataset(str(tmp_path / "out")).read(columns=["id"]).column("id").to_pylist()
    assert len(written) == ROWS == len(set(written))


def test_a_block_handed_over_twice_by_a_retried_task_fails_instead_of_being_written_twice() -> None:
    chunks = PartitionChunks(["shard"], 1)
    assert len(chunks.add(block(0, 2, ["a", "b"]), call_key="task-1/0")) == 2
    assert len(chunks.add(block(2, 1, ["a"]), call_key="task-1/1")) == 1
    with pytest.raises(RuntimeError, match="retried"):
        chunks.add(block(0, 2, ["a", "b"]), call_key="task-1/0")
    assert chunks.counts() == (3, 3)


def test_the_first_file_clock_starts_when_the_rows_left_the_model_and_the_timestamp_is_never_written() -> None:
    """A grouping step that gets its first block late (a write scheduled late) must not add that delay to the
    first file: a block that left the model 31 s ago makes its partition's first file due at once."""
    clock = Clock()
    clock.now = 1000.0
    chunks = PartitionChunks(["shard"], 1000, first_file_after_s=30.0, clock=clock)
    run_metadata = {schema.METADATA_KEY: b"{}"}
    late = block(0, 2, ["a", "a"]).replace_schema_metadata({**run_metadata, schema.EMBEDDED_AT_KEY: b"969.0"})
    fresh = block(2, 1, ["b"]).replace_schema_metadata({**run_metadata, schema.EMBEDDED_AT_KEY: b"999.0"})
    ready = chunks.add(late) + chunks.add(fresh)
    assert [(c.column("shard")[0].as_py(), c.num_rows) for c in ready] == [("a", 2)]  # b waited 1 s only
    assert ready[0].schema.metadata == run_metadata  # the run's metadata kept, the timestamp gone
    assert all(schema.EMBEDDED_AT_KEY not in (c.schema.metadata or {}) for c in chunks.drain())
