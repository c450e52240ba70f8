"""Runs that grow one dataset (docs/incremental.md), on a local Ray cluster with real files and moto's S3 server.

After every run the dataset is read with plain globs by pyarrow, DuckDB and polars and by
`pipeline.dataset.reader`: each id must be there exactly once. Tiny model configuration, random weights, 56 px images.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import JobConfig, read_embeddings, run_job
from pipeline.dataset.id_set import read_id_set
from pipeline.dataset.lock import dataset_lease
from pipeline.dataset.replacement import JOURNAL, KILL_HOOK_ENV
from pipeline.dataset.runs import read_record
from pipeline.storage import Location

IMGSZ = 56
REPO = Path(__file__).resolve().parents[1]


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def write_images(folder: Path, seeds: range | list[int]) -> dict[int, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for seed in seeds:
        path = folder / f"img{seed}.jpg"
        path.write_bytes(jpeg(seed))
        paths[seed] = path
    return paths


def write_manifest(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def manifest_rows(images: dict[int, Path], ids: range | list[int], image_of: dict[int, int] | None = None) -> list:
    image_of = image_of or {}
    return [
        {
            "id": f"r{i}",
            "image": str(images[image_of.get(i, i)]) if image_of.get(i, i) in images else f"/nonexistent/{i}.jpg",
            "caption": f"photo {i}",
            "split": "a" if i % 2 else "b",
        }
        for i in ids
    ]


def job(manifest: Path | str, output: str, **output_options: Any) -> JobConfig:
    return JobConfig.from_dict(
        {
            "input": {"uri": str(manifest), "id_column": "id", "image_column": "image", "caption_column": "caption"},
            "output": {"uri": output, "partition_by": ["split"], "min_rows_per_file": 4, **output_options},
            "model": {"config": "tiny", "imgsz": IMGSZ, "random_weights": True},
            "compute": {"batch_size": 4, "num_actors": 1},
        }
    )


def ids_every_reader(root: Path) -> dict[str, list[str]]:
    """The ids each reader sees through a plain glob of the dataset directory (and through our own reader)."""
    import duckdb
    import polars as pl

    glob = f"{root}/**/*.parquet"
    return {
        "pyarrow": ds.dataset(str(root), format="parquet", partitioning="hive")
        .to_table(columns=["id"])["id"]
        .to_pylist(),
        "duckdb": [
            row[0] for row in duckdb.sql(f"select id from read_parquet('{glob}', hive_partitioning=true)").fetchall()
        ],
        "polars": pl.scan_parquet(glob, hive_partitioning=True).select("id").collect()["id"].to_list(),
        "pipeline.dataset.reader": read_embeddings(str(root), columns=["id"]).column("id").to_pylist(),
    }


def assert_each_id_once(root: Path, expected: set[str]) -> None:
    for reader, ids in ids_every_reader(root).items():
        assert len(ids) == len(set(ids)), f"{reader} sees repeated ids"
        assert set(ids) == expected, f"{reader} sees {sorted(set(ids) ^ expected)} differently"


def rows_by_id(root: Path) -> dict[str, dict[str, Any]]:
    return {row["id"]: row for row in read_embeddings(str(root)).to_pylist()}


# The dataset protocol -------------------------------------------------------------------------------------------


@pytest.mark.timeout(400)
def test_incremental_runs_add_only_new_ids_and_record_each_run(ray_local: None, tmp_path: Path) -> None:
    images = write_images(tmp_path / "images", range(14))
    output = tmp_path / "dataset"
    first = run_job(
        job(write_manifest(tmp_path / "m1.parquet", manifest_rows(images, range(10))), str(output), mode="incremental")
    )
    assert (first.rows_added, first.rows_computed, first.rows_skipped_present) == (10, 10, 0)
    assert (first.rows_total, first.rows_ok) == (10, 10)
    assert_each_id_once(output, {f"r{i}" for i in range(10)})
    before = rows_by_id(output)
    files_before = {p: p.stat().st_mtime_ns for p in output.rglob("*.parquet")}

    second = run_job(
        job(write_manifest(tmp_path / "m2.parquet", manifest_rows(images, range(14))), str(output), mode="incremental")
    )
    assert (second.rows_added, second.rows_computed, second.rows_skipped_present) == (4, 4, 10)
    assert (second.rows_total, second.rows_ok, second.files_rewritten) == (14, 14, 0)
    assert_each_id_once(output, {f"r{i}" for i in range(14)})
    after = rows_by_id(output)
    for row_id, row in before.items():  # present rows untouched: same files, same values
        assert after[row_id]["image_embedding"] == row["image_embedding"]
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in files_before.items())
    assert not (tmp_path / "dataset.staging").exists()

    record = read_record(Location.parse(str(output)))
    assert [run["run_id"] for run in record.runs] == [first.run_id, second.run_id]
    assert [run["rows_added"] for run in record.runs] == [10, 4]
    assert record.identity.image_size == IMGSZ and record.identity.config == "tiny"
    summary = json.loads((output / "_summary.json").read_text())
    assert (summary["run_id"], summary["rows_added"], summary["rows_skipped_present"]) == (second.run_id, 4, 10)


@pytest.mark.timeout(400)
def test_retry_errors_re_embeds_exactly_the_error_rows(ray_local: None, tmp_path: Path) -> None:
    images = write_images(tmp_path / "images", range(8))
    output = tmp_path / "dataset"
    # r6 and r7 point at images that do not exist yet: error rows
    missing = {6: 106, 7: 107}
    manifest = write_manifest(tmp_path / "m.parquet", manifest_rows(images, range(8), image_of=missing))
    first = run_job(job(manifest, str(output), mode="incremental"))
    assert (first.rows_ok, first.rows_error) == (6, 2)
    ok_before = {k: v for k, v in rows_by_id(output).items() if v["status"] == "ok"}

    # one of them appears (the 503 passed); the other is still missing
    write_images(tmp_path / "images", [106])
    images = {**images, 106: tmp_path / "images" / "img106.jpg"}
    manifest = write_manifest(tmp_path / "m.parquet", manifest_rows(images, range(8), image_of=missing))
    retry = run_job(job(manifest, str(output), retry_errors=True))
    assert (retry.rows_retried, retry.rows_retried_ok, retry.rows_computed, retry.rows_added) == (2, 1, 1, 0)
    assert (retry.rows_total, retry.rows_ok, retry.rows_error, retry.files_rewritten) == (8, 7, 1, 2)
    assert_each_id_once(output, {f"r{i}" for i in range(8)})
    rows = rows_by_id(output)
    assert rows["r6"]["status"] == "ok" and rows["r6"]["image_embedding"] is not None
    assert rows["r7"]["status"] == "error" and rows["r7"]["error"].startswith("attempt 2: image not found")
    for row_id, row in ok_before.items():
        assert rows[row_id]["image_embedding"] == row["image_embedding"]


# Refusals -------------------------------------------------------------------------------------------------------


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
        cwd=REPO,
    )


def cli_args(manifest: Path, output: Path, *extra: str) -> list[str]:
    return [
        "run", "--input", str(manifest), "--output", str(output), "--partition-by", "split", "--model-config", "tiny",
        "--imgsz", str(IMGSZ), "--random-weights", "--batch-size", "4", "--incremental", *extra,
    ]  # fmt: skip


@pytest.mark.timeout(120)
def test_a_model_identity_mismatch_is_refused_before_ray_starts(tmp_path: Path) -> None:
    from pipeline.dataset.identity import ModelIdentity
    from pipeline.dataset.runs import DatasetRecord, write_record

    images = write_images(tmp_path / "images", range(4))
    manifest = write_manifest(tmp_path / "m.parquet", manifest_rows(images, range(4)))
    output = tmp_path / "dataset"
    # a dataset of the tiny model at 56 px (its record and one data file; which run wrote them does not matter here)
    write_manifest(output / "split=a" / "part-0.parquet", [{"id": "r1", "status": "ok", "image_sha256": "x"}])
    identity = ModelIdentity("tiny", None, None, IMGSZ, ("image_embedding", "text_embedding"), "float16")
    write_record(Location.parse(str(output)), DatasetRecord(identity=identity))
    began = time.monotonic()
    result = cli(*cli_args(manifest, output), "--imgsz", "112", "--features", "vision_features")
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "image_size 56 vs 112" in line and "features image_embedding,text_embedding vs" in line
    assert "Ray" not in result.stderr and time.monotonic() - began < 60
    assert sorted(p.name for p in output.rglob("*.parquet")) == ["part-0.parquet"]  # nothing written


@pytest.mark.timeout(120)
def test_a_dataset_held_by_another_run_is_refused_with_its_name(ray_local: None, tmp_path: Path) -> None:
    images = write_images(tmp_path / "images", range(2))
    manifest = write_manifest(tmp_path / "m.parquet", manifest_rows(images, range(2)))
    output = tmp_path / "dataset"
    holder = dataset_lease(Location.parse(str(output)), "nightly-a")
    assert holder.try_acquire()
    try:
        with holder.keep_alive(interval_s=1):
            result = cli(*cli_args(manifest, output))
    finally:
        holder.release()
    assert result.returncode == 2, result.stderr
    assert "is being written by run nightly-a" in result.stderr.strip().splitlines()[-1]
    assert not list(output.rglob("*.parquet"))


# Kill and concurrency (each driver its own process, joined to the shared cluster) ------------------------------------


@pytest.mark.timeout(600)
def test_a_driver_killed_during_the_commit_is_finished_by_the_rerun(
    ray_driver_env: dict[str, str], tmp_path: Path
) -> None:
    images = write_images(tmp_path / "images", range(12))
    output = tmp_path / "dataset"
    manifest = write_manifest(tmp_path / "m.parquet", manifest_rows(images, range(8)))
    run_job(job(manifest, str(output), mode="incremental"))
    manifest = write_manifest(tmp_path / "m.parquet", manifest_rows(images, range(12)))
    # killed after the first of the commit's file operations: the journal names the rest
    killed = cli(*cli_args(manifest, output), env={**ray_driver_env, KILL_HOOK_ENV: "commit:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (output / JOURNAL).exists()
    ids = read_id_set(Location.parse(str(output))).ids.tolist()
    assert len(ids) == len(set(ids))  # every id once even now, for a plain glob
    rerun = cli(*cli_args(manifest, output), env=ray_driver_env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "finishing the commit of run" in rerun.stderr
    assert not (output / JOURNAL).exists()
    assert_each_id_once(output, {f"r{i}" for i in range(12)})
    assert all(row["status"] == "ok" for row in rows_by_id(output).values())


@pytest.mark.timeout(600)
def test_two_runs_at_once_one_writes_the_other_is_refused(ray_driver_env: dict[str, str], tmp_path: Path) -> None:
    images = write_images(tmp_path / "images", range(10))
    manifest = write_manifest(tmp_path / "m.parquet", manifest_rows(images, range(10)))
    output = tmp_path / "dataset"
    environment = {**ray_driver_env, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", *cli_args(manifest, output)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment, cwd=REPO,
    )  # fmt: skip
    lease_dir = output / "_locks" / "dataset"
    deadline = time.monotonic() + 120
    while not (lease_dir.exists() and any(lease_dir.glob("lease-*.json"))) and time.monotonic() < deadline:
        time.sleep(0.1)
    second = cli(*cli_args(manifest, output), env=ray_driver_env)
    _, err = first.communicate(timeout=400)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 2, second.stderr[-2000:]
    assert "is being written by run" in second.stderr.strip().splitlines()[-1]
    assert_each_id_once(output, {f"r{i}" for i in range(10)})


# Identical images, changed images -------------------------------------------------------------------------------


@pytest.mark.timeout(400)
def test_each_distinct_image_goes_through_the_model_once(
    ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = write_images(tmp_path / "images", range(6))
    output = tmp_path / "dataset"
    repeats = {6: 0, 7: 1, 8: 2, 9: 0}  # r6..r9 repeat the images of r0, r1, r2 (their captions differ)
    manifest = write_manifest(tmp_path / "m.parquet", manifest_rows(images, range(10), image_of=repeats))
    first = run_job(job(manifest, str(output), mode="incremental", features=["trunk"]))
    assert (first.rows_added, first.rows_computed, first.rows_copied) == (10, 6, 4)
    rows = rows_by_id(output)
    for copy, source in repeats.items():
        assert rows[f"r{copy}"]["status"] == "ok"
        assert rows[f"r{copy}"]["image_embedding"] == rows[f"r{source}"]["image_embedding"]
        assert rows[f"r{copy}"]["trunk"] == rows[f"r{source}"]["trunk"] is not None  # dense maps too
        assert rows[f"r{copy}"]["image_sha256"] == rows[f"r{source}"]["image_sha256"]
        assert rows[f"r{copy}"]["text_embedding"] is not None  # its own caption, encoded
        assert rows[f"r{copy}"]["text_embedding"] != rows[f"r{source}"]["text_embedding"]

    # new ids whose bytes match ok rows already in the dataset: copied without the model
    later = {10: 4, 11: 5}
    second = run_job(
        job(
            write_manifest(tmp_path / "m.parquet", manifest_rows(images, range(12), image_of={**repeats, **later})),
            str(output),
            mode="incremental",
            features=["trunk"],
        )
    )
    assert (second.rows_added, second.rows_computed, second.rows_copied, second.rows_skipped_present) == (2, 0, 2, 10)
    rows = rows_by_id(output)
    for copy, source in later.items():
        assert rows[f"r{copy}"]["image_embedding"] == rows[f"r{source}"]["image_embedding"]
    assert_each_id_once(output, {f"r{i}" for i in range(12)})
    # the feature cache and `inspect` read the same files: each id once
    from jobs.cli import inspect_output
    from pipeline.cache.feature_cache import FeatureCache

    cached = FeatureCache(str(output), checkpoint=None).dataset.to_table(columns=["id"])["id"].to_pylist()
    assert sorted(cached) == sorted(f"r{i}" for i in range(12))
    inspect_output(str(output), rows=1)
    assert "rows:       12 (12 ok, 0 error)" in capsys.readouterr().out


@pytest.mark.timeout(300)
def test_a_plain_run_computes_each_distinct_image_once(ray_local: None, tmp_path: Path) -> None:
    """Not only runs that join a dataset: a plain run (Ray Data's partitioned writer into its own output) too."""
    from jobs.embed import render_summary

    images = write_images(tmp_path / "images", range(4))
    # r4..r6 name other files holding the bytes of r1, r0 and r1 again, in the other partition (split by parity)
    repeats = {4: 1, 5: 0, 6: 1}
    for copy, source in repeats.items():
        images[copy] = tmp_path / "images" / f"copy{copy}.jpg"
        images[copy].write_bytes(images[source].read_bytes())
    output = tmp_path / "run"
    config = job(
        write_manifest(tmp_path / "m.parquet", manifest_rows(images, range(7))), str(output), features=["trunk"]
    )
    summary = run_job(config)
    assert (summary.rows_total, summary.rows_ok, summary.rows_computed, summary.rows_copied) == (7, 7, 4, 3)
    written = json.loads((output / "_summary.json").read_text())
    assert (written["rows_computed"], written["rows_copied"]) == (4, 3)
    assert "4 computed by the model, 3 copied" in render_summary(config, written, 0)
    rows = rows_by_id(output)
    for copy, source in repeats.items():
        mine, theirs = rows[f"r{copy}"], rows[f"r{source}"]
        assert mine["status"] == "ok" and mine["image_embedding"] is not None
        assert mine["image_embedding"] == theirs["image_embedding"]
        assert mine["trunk"] == theirs["trunk"] is not None  # the dense maps too
        assert mine["text_embedding"] != theirs["text_embedding"]  # its own caption, encoded
        assert (mine["split"], mine["source_uri"]) != (theirs["split"], theirs["source_uri"])
        assert mine["source_uri"].endswith(f"copy{copy}.jpg")
    assert_each_id_once(output, {f"r{i}" for i in range(7)})


@pytest.mark.timeout(400)
def test_a_plain_run_killed_while_filling_its_copies_is_finished_by_the_rerun(
    ray_driver_env: dict[str, str], tmp_path: Path
) -> None:
    images = write_images(tmp_path / "images", range(4))
    repeats = {4: 1, 5: 0, 6: 1}  # copies in both partitions: two files to fill
    for copy, source in repeats.items():
        images[copy] = tmp_path / "images" / f"copy{copy}.jpg"
        images[copy].write_bytes(images[source].read_bytes())
    output = tmp_path / "run"
    manifest = write_manifest(tmp_path / "m.parquet", manifest_rows(images, range(7)))
    args = [arg for arg in cli_args(manifest, output) if arg != "--incremental"]
    args += ["--resume-path", str(tmp_path / "ckpt")]
    # killed once the first file holding copies is rewritten, the second not yet
    killed = cli(*args, env={**ray_driver_env, KILL_HOOK_ENV: "copy_fill:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (output / "_SUCCESS").exists()  # not committed: no reader trusts it yet
    statuses = [row["status"] for row in pq.ParquetDataset(str(output)).read(columns=["status"]).to_pylist()]
    assert "copy" in statuses and len(statuses) == 7

    rerun = cli(*args, env=ray_driver_env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    rows = rows_by_id(output)
    assert all(row["status"] == "ok" for row in rows.values())
    for copy, source in repeats.items():
        assert rows[f"r{copy}"]["image_embedding"] == rows[f"r{source}"]["image_embedding"] is not None
    assert_each_id_once(output, {f"r{i}" for i in range(7)})


@pytest.mark.timeout(400)
def test_refresh_changed_re_embeds_only_images_whose_bytes_changed(ray_local: None, tmp_path: Path) -> None:
    images = write_images(tmp_path / "images", range(6))
    output = tmp_path / "dataset"
    manifest = write_manifest(tmp_path / "m.parquet", manifest_rows(images, range(6)))
    run_job(job(manifest, str(output), mode="incremental"))
    before = rows_by_id(output)
    images[1].write_bytes(jpeg(101))  # the same URI now holds another image
    refreshed = run_job(job(manifest, str(output), refresh="changed"))
    assert (refreshed.rows_refreshed, refreshed.rows_unchanged, refreshed.rows_computed) == (1, 5, 1)
    assert (refreshed.rows_added, refreshed.files_rewritten, refreshed.rows_total) == (0, 1, 6)
    after = rows_by_id(output)
    assert after["r1"]["image_sha256"] != before["r1"]["image_sha256"]
    assert after["r1"]["image_embedding"] != before["r1"]["image_embedding"]
    for row_id in ("r0", "r2", "r3", "r4", "r5"):
        assert after[row_id] == before[row_id]
    assert_each_id_once(output, {f"r{i}" for i in range(6)})


# Backfills ------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(400)
def test_an_incremental_backfill_adds_only_the_new_rows_of_a_committed_partition(
    ray_local: None, tmp_path: Path
) -> None:
    from pipeline.backfill.commit import read_manifest
    from pipeline.backfill.runner import Backfill, BackfillOptions

    day = "2025-03-01"
    images = write_images(tmp_path / "images", range(6))
    manifest = tmp_path / "in" / f"date={day}" / "manifest.parquet"
    write_manifest(
        manifest, [{k: v for k, v in row.items() if k != "split"} for row in manifest_rows(images, range(4))]
    )
    config = job(tmp_path / "in", str(tmp_path / "out"))
    config.output.partition_by = []

    def backfill(run_id: str, **options: Any) -> Any:
        run_config = JobConfig.from_dict({**config.to_dict(), "run_id": run_id})
        return Backfill(run_config, BackfillOptions(column="date", values=[day], **options), run_job).run()

    assert backfill("night-1").results[0].status == "committed"
    partition = Location.parse(str(tmp_path / "out" / f"date={day}"))
    before = rows_by_id(tmp_path / "out")
    write_manifest(
        manifest, [{k: v for k, v in row.items() if k != "split"} for row in manifest_rows(images, range(6))]
    )

    assert backfill("night-2").results[0].message == "already committed"  # without --incremental: skipped whole
    report = backfill("night-3", incremental=True)
    result = report.results[0]
    assert (result.status, result.rows, result.message) == ("committed", 6, "incremental: 2 rows added")
    committed = read_manifest(partition)
    assert committed.rows == 6 and committed.run_id == "night-3"
    record = read_record(partition)
    assert [run["rows_added"] for run in record.runs] == [2] and record.runs[0]["rows_skipped_present"] == 4
    assert_each_id_once(tmp_path / "out", {f"r{i}" for i in range(6)})
    after = rows_by_id(tmp_path / "out")
    assert all(after[row_id]["image_embedding"] == row["image_embedding"] for row_id, row in before.items())
    assert not (tmp_path / "out.staging" / f"date={day}").exists()


# On object storage ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(400)
def test_incremental_runs_on_s3_keep_each_id_once_for_every_reader(
    ray_local: None, tmp_path: Path, bucket: Any
) -> None:
    import duckdb
    import polars as pl
    import pyarrow.fs as pafs
    import s3fs

    images = write_images(tmp_path / "images", range(7))
    output = bucket.uri("embeddings/events")

    def config(ids: range) -> JobConfig:
        rows = [{**row, "image": bucket.put(f"images/{Path(row['image']).name}", Path(row["image"]).read_bytes())}
                for row in manifest_rows(images, ids)]  # fmt: skip
        manifest = bucket.put("manifest.parquet", _parquet_bytes(rows))
        data = job(manifest, output, mode="incremental").to_dict()
        data["s3"] = {"endpoint_url": bucket.endpoint, "region": "us-east-1"}
        return JobConfig.from_dict(data)

    first = run_job(config(range(5)))
    second = run_job(config(range(7)))
    assert (first.rows_added, second.rows_added, second.rows_skipped_present, second.rows_total) == (5, 2, 5, 7)
    assert not bucket.keys("embeddings/events.staging/")  # the staging area is cleared after the commit
    expected = {f"r{i}" for i in range(7)}

    prefix = f"{bucket.name}/embeddings/events"
    s3 = pafs.S3FileSystem(endpoint_override=bucket.endpoint, scheme="http", region="us-east-1")
    seen = {
        "pyarrow": ds.dataset(prefix, filesystem=s3, format="parquet", partitioning="hive").to_table()["id"].to_pylist()
    }
    options = {"aws_endpoint_url": bucket.endpoint, "aws_region": "us-east-1", "aws_allow_http": "true"}
    seen["polars"] = pl.scan_parquet(f"s3://{prefix}/**/*.parquet", storage_options=options).collect()["id"].to_list()
    connection = duckdb.connect()
    connection.register_filesystem(s3fs.S3FileSystem(client_kwargs={"endpoint_url": bucket.endpoint}))
    seen["duckdb"] = [
        r[0] for r in connection.sql(f"select id from read_parquet('s3://{prefix}/**/*.parquet')").fetchall()
    ]
    seen["pipeline.dataset.reader"] = (
        read_embeddings(output, storage_options=bucket.storage_options).column("id").to_pylist()
    )
    for reader, ids in seen.items():
        assert len(ids) == len(set(ids)) and set(ids) == expected, reader
    assert [run["rows_added"] for run in json.loads(bucket.get("embeddings/events/_dataset.json"))["runs"]] == [5, 2]


def _parquet_bytes(rows: list[dict[str, Any]]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def test_both_entry_points_take_the_dataset_flags(tmp_path: Path) -> None:
    from jobs import cli, embed

    job_file = tmp_path / "job.yaml"
    job_file.write_text("input: {uri: m.parquet}\noutput: {uri: out}\n")
    args = embed.build_parser().parse_args(
        ["--config", str(job_file), "--incremental", "--retry-errors", "--refresh", "changed"]
    )
    config = embed.resolve_config(args)
    assert (config.output.mode, config.output.retry_errors, config.output.refresh) == ("incremental", True, "changed")
    args = cli.build_parser().parse_args(["run", "--input", "m.parquet", "--output", "out", "--incremental"])
    assert args.incremental and not args.retry_errors and args.refresh is None
    job_file.write_text("input: {uri: m.parquet}\noutput: {uri: out, mode: incremental}\n")
    assert (
        embed.resolve_config(embed.build_parser().parse_args(["--config", str(job_file)])).output.mode == "incremental"
    )
