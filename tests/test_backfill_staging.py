"""The staging area's decisions about an earlier attempt's leftovers: reuse, resume or start over."""

from __future__ import annotations

import json

import pytest

from pipeline.backfill.staging import StagingArea, StagingState, config_fingerprint
from pipeline.config import JobConfig
from pipeline.storage import Location


def test_fingerprint_tracks_what_changes_the_rows_only() -> None:
    base = JobConfig.from_dict({"input": {"uri": "s3://b/in/date=1/"}, "output": {"uri": "s3://b/out"}})
    same = JobConfig.from_dict(
        {
            "input": {"uri": "s3://b/in/date=1/"},
            "output": {"uri": "s3://b/elsewhere", "max_error_fraction": 0.5},
            "compute": {"num_actors": 7, "batch_size": 3},
            "resume_path": "s3://b/ckpt",
        }
    )
    assert config_fingerprint(base) == config_fingerprint(same)
    other_model = JobConfig.from_dict({"input": {"uri": "s3://b/in/date=1/"}, "model": {"config": "tiny"}})
    other_input = JobConfig.from_dict({"input": {"uri": "s3://b/in/date=2/"}})
    other_features = JobConfig.from_dict(
        {"input": {"uri": "s3://b/in/date=1/"}, "output": {"features": ["image_embedding"]}}
    )
    fingerprints = {config_fingerprint(c) for c in (base, other_model, other_input, other_features)}
    assert len(fingerprints) == 4


@pytest.mark.timeout(60)
def test_attempts_resume_reuse_or_start_over(storage_root: Location) -> None:
    area = StagingArea.for_partition(storage_root, "date=2025-01-01")
    assert area.prepare("fp1", "run-a") is StagingState.FRESH

    # A crash after some rows were written and checkpointed: resume.
    area.data.join("part-0.parquet").write_text("rows")
    area.checkpoint.join("ckpt-0.parquet").write_text("ids")
    assert area.prepare("fp1", "run-b") is StagingState.RESUME
    assert area.data.files() == ["part-0.parquet"]

    # The pipeline finished (its own _SUCCESS) but the commit never happened: commit what is there.
    area.data.join("_SUCCESS").write_text("{}")
    area.data.join("_summary.json").write_text(json.dumps({"rows_total": 4}))
    assert area.prepare("fp1", "run-c") is StagingState.STAGED
    assert area.staged_summary() == {"rows_total": 4}
    area.mark_staged({"rows_total": 4, "rows_error": 1})
    assert area.staged_summary() == {"rows_total": 4, "rows_error": 1}

    # Other settings: nothing is reusable.
    assert area.prepare("fp2", "run-d") is StagingState.FRESH
    assert area.data.files() == []
    assert area.checkpoint.files() == []


@pytest.mark.timeout(60)
def test_rows_without_a_checkpoint_are_discarded(storage_root: Location) -> None:
    area = StagingArea.for_partition(storage_root, "date=2025-01-02")
    assert area.prepare("fp", "run-a") is StagingState.FRESH
    area.data.join("part-0.parquet").write_text("rows")
    assert area.prepare("fp", "run-b") is StagingState.FRESH
    assert area.data.files() == []


@pytest.mark.timeout(60)
def test_external_resume_root_holds_one_checkpoint_per_partition(storage_root: Location) -> None:
    resume_root = storage_root.join("checkpoints")
    area = StagingArea.for_partition(storage_root, "date=2025-01-03", resume_root)
    assert area.checkpoint.uri == resume_root.uri + "/date=2025-01-03"
    area.prepare("fp", "run")
    area.checkpoint.join("x").write_text("ids")
    area.clear()
    assert not area.checkpoint.exists()
    assert not area.root.exists()
