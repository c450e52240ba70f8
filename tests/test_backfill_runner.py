"""The backfill runner around the real pipeline, in-process on the shared local Ray (`ray_local`), local files.

Covers the recovery paths a subprocess test cannot easily reach: a crash between the pipeline run and the commit,
a holder that lost its lease before committing, and `--overwrite`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline import JobConfig, read_embeddings, run_job
from pipeline.backfill.commit import is_committed, read_manifest
from pipeline.backfill.lease import PartitionLease
from pipeline.backfill.runner import Backfill, BackfillOptions
from pipeline.backfill.staging import STAGING_DIR
from pipeline.storage import Location

DAY = "2025-03-01"


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[JobConfig, list[str]]:
    """One partition of three images with captions, and a job config writing next to it."""
    partition = tmp_path / "in" / f"date={DAY}"
    partition.mkdir(parents=True)
    ids = [f"img{i}" for i in range(3)]
    lines = ["id,image,caption"]
    for i, row_id in enumerate(ids):
        pixels = np.random.default_rng(i).integers(0, 255, (30, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{row_id}.png")
        lines.append(f"{row_id},{tmp_path / f'{row_id}.png'},picture {i}")
    (partition / "manifest.csv").write_text("\n".join(lines) + "\n")
    config = JobConfig.from_dict(
        {
            "input": {"uri": str(tmp_path / "in"), "format": "manifest"},
            "output": {"uri": str(tmp_path / "out")},
            "model": {"config": "tiny", "imgsz": 56, "random_weights": True},
            "compute": {"batch_size": 2, "num_actors": 1},
        }
    )
    return config, ids


def backfill(config: JobConfig, run_pipeline: Any, run_id: str, **options: Any) -> Backfill:
    config = JobConfig.from_dict({**config.to_dict(), "run_id": run_id})
    return Backfill(config, BackfillOptions(column="date", values=[DAY], **options), run_pipeline)


def must_not_run(config: JobConfig) -> None:
    raise AssertionError(f"the pipeline ran again for {config.input.uri}")


def output_ids(config: JobConfig) -> list[str]:
    return read_embeddings(config.output.uri).column("id").to_pylist()


@pytest.mark.timeout(300)
def test_a_partition_staged_before_a_crash_is_committed_without_running_again(
    ray_local: None, dataset: tuple[JobConfig, list[str]]
) -> None:
    config, ids = dataset

    def crash_after_the_run(partition_config: JobConfig) -> Any:
        run_job(partition_config)
        raise RuntimeError("driver lost between the pipeline run and the commit")

    first = backfill(config, crash_after_the_run, "first").run()
    assert [r.status for r in first.results] == ["failed"]
    assert "driver lost" in first.results[0].message
    output = Location.parse(config.output.uri)
    assert not is_committed(output.join(f"date={DAY}"))
    assert output.join(STAGING_DIR, f"date={DAY}", "data", "_SUCCESS").exists()

    second = backfill(config, must_not_run, "second").run()
    (result,) = second.results
    assert (result.status, result.rows, result.message) == ("committed", 3, "staging was staged")
    assert sorted(output_ids(config)) == ids
    assert not output.join(STAGING_DIR, f"date={DAY}").exists()

    # Committed now: a plain rerun skips it, --overwrite redoes it (new files, same rows, no duplicates).
    assert [r.status for r in backfill(config, must_not_run, "third").run().results] == ["skipped"]
    old_files = {f.path for f in read_manifest(output.join(f"date={DAY}")).files}
    redone = backfill(config, run_job, "fourth", overwrite=True).run()
    assert [r.status for r in redone.results] == ["committed"]
    manifest = read_manifest(output.join(f"date={DAY}"))
    assert manifest.run_id == "fourth"
    assert {f.path for f in manifest.files}.isdisjoint(old_files - {"_summary.json"})
    assert sorted(output_ids(config)) == ids


@pytest.mark.timeout(300)
def test_a_holder_whose_lease_was_taken_over_does_not_commit(
    ray_local: None, dataset: tuple[JobConfig, list[str]]
) -> None:
    config, _ = dataset
    output = Location.parse(config.output.uri)
    lock = output.join("_locks", f"date={DAY}")
    taker = PartitionLease(lock, owner="taker", clock=lambda: time.time() + 3600)

    def stall_past_the_lease(partition_config: JobConfig) -> Any:
        summary = run_job(partition_config)
        # Meanwhile this holder stopped renewing (paused VM, network partition) and another backfill took over.
        assert taker.try_acquire()
        return summary

    report = backfill(config, stall_past_the_lease, "stalled", lease_ttl_s=600).run()
    (result,) = report.results
    assert result.status == "failed"
    assert "LeaseLost" in result.message
    assert not is_committed(output.join(f"date={DAY}"))
    assert taker.current().owner == "taker" and not taker.current().released
    # The new holder finds the staged run and commits it.
    taker.release()
    report = backfill(config, must_not_run, "after").run()
    assert [r.status for r in report.results] == ["committed"]


def test_every_partition_shares_the_compiled_model_at_the_backfill_root(dataset: tuple[JobConfig, list[str]]) -> None:
    """Not in the partition's staging area, which is cleared after it: the next partition would compile again."""
    config, _ = dataset
    seen: list[JobConfig] = []

    def record(partition_config: JobConfig) -> None:
        seen.append(partition_config)
        raise RuntimeError("stop here")

    report = backfill(config, record, "compile-cache").run()
    assert [result.status for result in report.results] == ["failed"]
    assert seen[0].model.compile_cache == Location.parse(config.output.uri).join("_compile_cache").uri
