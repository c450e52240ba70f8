"""The incremental commit protocol on real Parquet files, locally and on moto's S3 server, without Ray.

Staged rows (new ids, a retried error, a copy of an image already in the dataset) become file operations; the
journal is applied part way (as a killed driver leaves it), then whole: each id is in exactly one file throughout.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.dataset.copy_fill import fill_output_copies
from pipeline.dataset.id_set import read_id_set
from pipeline.dataset.identity import ModelIdentity
from pipeline.dataset.replacement import (
    CommitJournal,
    _place,
    apply_journal,
    new_commit_id,
    prepare_commit,
    read_journal,
    write_journal,
)
from pipeline.dataset.runs import read_record
from pipeline.storage import Location, arrow_filesystem

DIM = 4


def rows(entries: list[tuple[str, str, str | None, str | None, float | None]]) -> pa.Table:
    """(id, status, error, image digest, embedding fill value or None); status `copy`: a copy the model left null."""
    embedding_type = pa.list_(pa.float16(), DIM)
    columns = {
        "id": pa.array([e[0] for e in entries], pa.string()),
        "image_sha256": pa.array([e[3] for e in entries], pa.string()),
        "status": pa.array([e[1] for e in entries], pa.string()),
        "error": pa.array([e[2] for e in entries], pa.string()),
        "image_embedding": pa.array(
            [None if e[4] is None else np.full(DIM, e[4], np.float16) for e in entries], embedding_type
        ),
    }
    return pa.table(columns)


def put(location: Location, table: pa.Table) -> None:
    filesystem = arrow_filesystem(location.protocol, location.storage_options)
    location.fs.makedirs(location.path.rsplit("/", 1)[0], exist_ok=True)
    pq.write_table(table, location.path, filesystem=filesystem)


def ids_in_files(output: Location) -> list[str]:
    return read_id_set(output, output.storage_options).ids.tolist()


def test_a_commit_adds_rewrites_and_copies_and_each_id_stays_once(storage_root: Location) -> None:
    output = storage_root.join("dataset")
    staging = storage_root.join("dataset.staging")
    put(output.join("split=x/f1.parquet"), rows([("a", "ok", None, "sa", 1.0), ("b", "error", "timeout", "sb", None)]))
    put(output.join("split=y/f2.parquet"), rows([("c", "ok", None, "sc", 3.0)]))
    output.join("_SUCCESS").write_text("{}")
    staged = staging.join("data")
    put(
        staged.join("split=x/s1.parquet"),
        rows([("b", "ok", None, "sb", 2.0), ("e", "ok", None, "se", 5.0), ("g", "error", "HTTP 503", None, None)]),
    )
    put(
        staged.join("split=y/s2.parquet"),
        rows([("h", "copy", None, "sc", None), ("k", "copy", None, "se", None)]),  # of the dataset's c, of the run's e
    )

    id_set = read_id_set(output, output.storage_options)
    assert sorted(id_set.ids.tolist()) == ["a", "b", "c"]
    commit_id = new_commit_id("night-2")
    prepared = prepare_commit(output, staged, staging.join("commit"), id_set, commit_id)
    assert sorted(op.kind for op in prepared.ops) == ["add", "add", "replace"]
    assert (prepared.rows_added, prepared.rows_replaced, prepared.rows_retried, prepared.rows_retried_ok) == (
        4,
        1,
        1,
        1,
    )
    assert prepared.rows_copied == 2
    identity = ModelIdentity("tiny", None, None, 56, ("image_embedding", "text_embedding"), "float16")
    journal = CommitJournal(
        commit_id, "night-2", staging.uri, prepared.ops, identity.to_dict(), {"commit_id": commit_id}
    )

    write_journal(output, journal)
    # a driver killed after the first operation: the glob still sees each id once
    first = prepared.ops[0]
    _place(Location(staging.protocol, first.source, staging.storage_options), output.join(first.target))
    seen = ids_in_files(output)
    assert len(seen) == len(set(seen))

    # whoever comes next finishes it from the journal, idempotently
    apply_journal(output, read_journal(output), output.storage_options)
    assert read_journal(output) is None
    seen = ids_in_files(output)
    assert sorted(seen) == ["a", "b", "c", "e", "g", "h", "k"]
    filesystem = arrow_filesystem(output.protocol, output.storage_options)
    table = pa.concat_tables(
        pq.read_table(output.join(name).path, filesystem=filesystem).select(
            ["id", "status", "error", "image_embedding"]
        )
        for name in output.files()
        if name.endswith(".parquet")
    )
    by_id = {row["id"]: row for row in table.to_pylist()}
    assert by_id["b"]["status"] == "ok" and by_id["b"]["image_embedding"] == [2.0] * DIM
    assert by_id["a"]["image_embedding"] == [1.0] * DIM
    assert by_id["h"]["image_embedding"] == [3.0] * DIM  # copied from c, already in the dataset
    assert by_id["k"]["image_embedding"] == [5.0] * DIM  # copied from e, computed in this run
    assert "copy" not in table.column("status").to_pylist()
    record = read_record(output)
    assert [run["commit_id"] for run in record.runs] == [commit_id]
    apply_journal(output, journal, output.storage_options)  # once more: still one run recorded, same ids
    assert [run["commit_id"] for run in read_record(output).runs] == [commit_id]
    assert sorted(ids_in_files(output)) == sorted(seen)
    assert output.join("split=x/_SUCCESS").exists() and output.join("split=y/_SUCCESS").exists()


def test_a_retry_that_fails_again_counts_its_attempts(storage_root: Location) -> None:
    output = storage_root.join("dataset")
    staging = storage_root.join("dataset.staging")
    put(
        output.join("f1.parquet"),
        rows([("a", "error", "attempt 2: HTTP 503", "sa", None), ("b", "ok", None, "sb", 1.0)]),
    )
    put(staging.join("data/s1.parquet"), rows([("a", "error", "read timed out", "sa", None)]))
    id_set = read_id_set(output, output.storage_options)
    prepared = prepare_commit(output, staging.join("data"), staging.join("commit"), id_set, "c1")
    assert [op.kind for op in prepared.ops] == ["replace"]
    assert (prepared.rows_retried, prepared.rows_retried_ok) == (1, 0)
    identity = ModelIdentity("tiny", None, None, 56, ("image_embedding",), "float16")
    journal = CommitJournal("c1", "r", staging.uri, prepared.ops, identity.to_dict(), {"commit_id": "c1"})
    write_journal(output, journal)
    apply_journal(output, journal, output.storage_options)
    filesystem = arrow_filesystem(output.protocol, output.storage_options)
    table = pq.read_table(output.join("f1.parquet").path, filesystem=filesystem)
    errors = dict(zip(table.column("id").to_pylist(), table.column("error").to_pylist(), strict=True))
    assert errors == {"a": "attempt 3: read timed out", "b": None}


@pytest.mark.parametrize(
    ("theirs", "expected"),
    [
        ({"image_size": 112}, "image_size 56 vs 112"),
        ({"feature_dtype": "float32"}, "feature_dtype float16 vs float32"),
        ({"checkpoint": "sam3.pt"}, "checkpoint none (random weights) vs sam3.pt"),
        ({"features": ("image_embedding", "text_embedding", "trunk")}, "features image_embedding,text_embedding vs"),
    ],
)
def test_identity_differences_name_both_values(theirs: dict, expected: str) -> None:
    from pipeline.dataset.identity import mismatch_message

    ours = ModelIdentity("tiny", None, None, 56, ("image_embedding", "text_embedding"), "float16")
    other = ModelIdentity(**{**ours.__dict__, **theirs})
    assert expected in mismatch_message("s3://b/out", ours, other)
    assert mismatch_message("s3://b/out", ours, ours) is None
    digest = ModelIdentity(**{**ours.__dict__, "checkpoint": "a.pt", "checkpoint_sha256": "0" * 64})
    moved = ModelIdentity(**{**digest.__dict__, "checkpoint": "b.pt"})
    assert mismatch_message("x", digest, moved) is None  # the same file under another name
    changed = ModelIdentity(**{**digest.__dict__, "checkpoint_sha256": "1" * 64})
    assert "checkpoint sha256" in mismatch_message("x", digest, changed)


@pytest.mark.parametrize("memory_budget", [1 << 30, 1], ids=["one-slice", "a-digest-a-slice"])
def test_a_plain_run_fills_its_copies_in_place_and_leaves_other_files_alone(
    storage_root: Location, memory_budget: int
) -> None:
    """Copies in any partition get their source's image features (from a file of another partition too), a copy of
    a failed row fails with its reason, one without a source fails, and a file without copies is not rewritten."""
    output = storage_root.join("run")
    put(output.join("split=x/a.parquet"), rows([("a", "ok", None, "sa", 1.0), ("b", "copy", None, "sc", None)]))
    put(
        output.join("split=y/b.parquet"),
        rows([("c", "ok", None, "sc", 3.0), ("d", "copy", None, "sa", None), ("e", "error", "NaN", "se", None)]),
    )
    put(output.join("split=y/c.parquet"), rows([("f", "copy", None, "se", None), ("g", "copy", None, "sz", None)]))
    put(output.join("split=z/d.parquet"), rows([("h", "ok", None, "sh", 8.0)]))
    untouched = output.join("split=z/d.parquet")
    before = untouched.fs.info(untouched.path)

    assert fill_output_copies(output, output.storage_options, memory_budget=memory_budget) == 2
    filesystem = arrow_filesystem(output.protocol, output.storage_options)
    table = pa.concat_tables(
        pq.read_table(path, filesystem=filesystem).select(["id", "status", "error", "image_embedding"])
        for path in sorted(output.fs.find(output.path))
        if path.endswith(".parquet")
    )
    by_id = {row["id"]: row for row in table.to_pylist()}
    assert sorted(by_id) == list("abcdefgh")
    assert by_id["b"]["status"] == "ok" and by_id["b"]["image_embedding"] == [3.0] * DIM
    assert by_id["d"]["status"] == "ok" and by_id["d"]["image_embedding"] == [1.0] * DIM
    assert (by_id["f"]["status"], by_id["f"]["error"]) == ("error", "same image as a row that failed: NaN")
    assert by_id["g"]["status"] == "error" and by_id["g"]["image_embedding"] is None
    assert "copy" not in table.column("status").to_pylist()
    assert untouched.fs.info(untouched.path) == before
    assert fill_output_copies(output, output.storage_options) == 0  # nothing left: a rerun changes nothing


def test_an_incremental_run_shares_its_compiled_model_through_the_dataset_not_the_staging_area(tmp_path) -> None:
    """The staging area is cleared after every run: a compile cache there would make every run compile again."""
    from pipeline.backfill.staging import StagingArea
    from pipeline.config import JobConfig
    from pipeline.run.incremental import staging_config, staging_location

    config = JobConfig.from_dict({"input": {"uri": "in.parquet"}, "output": {"uri": str(tmp_path / "data")}})
    config.output.mode = "incremental"
    root = staging_location(config)
    inner = staging_config(config, StagingArea(root=root, checkpoint=root.join("checkpoint")))
    assert inner.output.uri == root.join("data").uri and inner.output.mode == "new"
    assert inner.model.compile_cache == Location.parse(str(tmp_path / "data")).join("_compile_cache").uri
    config.model.compile_cache = "s3://bucket/compiled"  # one the user chose stays
    assert staging_config(config, StagingArea(root=root, checkpoint=root.join("c"))).model.compile_cache == (
        "s3://bucket/compiled"
    )
