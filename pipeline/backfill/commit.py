"""Make a staged partition visible in one step: copy the files into place, then write `_SUCCESS` last.

Readers treat a partition directory as complete only when `_SUCCESS` is present, so whatever a crash leaves behind
(some copied files, no marker) stays invisible and is replaced by the next commit. `_SUCCESS` is a small JSON
manifest: the files that belong to the partition with their row counts, so a reader or an audit can also notice a
stray file that is not part of the commit.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.parquet as pq

from pipeline.storage import Location

logger = logging.getLogger(__name__)

SUCCESS_MARKER = "_SUCCESS"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class CommittedFile:
    path: str  # relative to the partition directory
    bytes: int
    rows: int | None  # None for files that are not Parquet


@dataclass(frozen=True)
class CommitManifest:
    partition: dict[str, str]
    run_id: str
    committed_at: float
    files: list[CommittedFile]
    rows: int  # rows in the partition's data files (error files excluded)
    details: dict[str, Any] = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CommitManifest:
        data = json.loads(text)
        data["files"] = [CommittedFile(**entry) for entry in data.get("files", [])]
        return cls(**data)


def is_data_file(relative_path: str) -> bool:
    """Data rows live in visible Parquet files; `_`- or `.`-prefixed components are side outputs (errors, ...)."""
    parts = relative_path.split("/")
    return relative_path.endswith(".parquet") and not any(part.startswith(("_", ".")) for part in parts)


def read_manifest(partition_dir: Location) -> CommitManifest | None:
    """The commit manifest, or None when the partition is not committed."""
    marker = partition_dir.join(SUCCESS_MARKER)
    try:
        return CommitManifest.from_json(marker.read_text())
    except FileNotFoundError:
        return None


def is_committed(partition_dir: Location) -> bool:
    return partition_dir.join(SUCCESS_MARKER).exists()


def uncommit(partition_dir: Location) -> None:
    """Hide a partition, then remove its files: every marker goes first (the top one before nested ones written
    by a partitioned pipeline run), so no directory is ever visible with part of its files deleted."""
    partition_dir.join(SUCCESS_MARKER).remove()
    for name in partition_dir.files():
        if _is_marker(name):
            partition_dir.join(name).remove()
    partition_dir.remove()


def _is_marker(relative_path: str) -> bool:
    return relative_path.rsplit("/", 1)[-1] == SUCCESS_MARKER


def staged_files(staged_dir: Location) -> list[str]:
    """Files a commit carries over: everything the pipeline wrote except its top-level completion marker (the
    commit writes its own). Markers of nested directories (a run with `output.partition_by`) are kept, last."""
    names = [name for name in staged_dir.files() if name != SUCCESS_MARKER]
    return sorted(names, key=lambda name: (_is_marker(name), name))


def commit_partition(
    staged_dir: Location,
    partition_dir: Location,
    *,
    partition: dict[str, str],
    run_id: str,
    details: dict[str, Any] | None = None,
    before_marker: Callable[[], None] | None = None,
) -> CommitManifest:
    """Copy `staged_dir` into `partition_dir` and mark it complete.

    `before_marker` runs after the copy and before the marker is written: the backfill passes its
    lease check there, so a holder that lost its lease while copying never makes the partition visible.
    Whatever was in `partition_dir` before (an older commit when overwriting, debris of a crashed commit) is
    removed first, marker first.
    """
    names = staged_files(staged_dir)
    uncommit(partition_dir)
    copied: list[CommittedFile] = []
    data_names = [name for name in names if not _is_marker(name)]
    nested_markers = [name for name in names if _is_marker(name)]
    for name in data_names:
        copied.append(_copy(staged_dir, partition_dir, name))
    if before_marker is not None:
        before_marker()
    for name in nested_markers:
        copied.append(_copy(staged_dir, partition_dir, name))
    manifest = CommitManifest(
        partition=dict(partition),
        run_id=run_id,
        committed_at=time.time(),
        files=copied,
        rows=sum(entry.rows or 0 for entry in copied if is_data_file(entry.path)),
        details=dict(details or {}),
    )
    partition_dir.join(SUCCESS_MARKER).write_text(manifest.to_json())
    logger.info("committed %s: %d files, %d rows", partition_dir.uri, len(copied), manifest.rows)
    return manifest


def _copy(staged_dir: Location, partition_dir: Location, name: str) -> CommittedFile:
    source = staged_dir.join(name)
    target = partition_dir.join(name)
    target.fs.makedirs(target.path.rsplit("/", 1)[0], exist_ok=True)
    source.fs.copy(source.path, target.path)
    return _describe(target, name)


def _describe(location: Location, relative_path: str) -> CommittedFile:
    size = int(location.fs.size(location.path))
    rows = None
    if relative_path.endswith(".parquet"):
        # Reading the footer of the copy (not the source) also proves the copy is a whole Parquet file.
        with location.fs.open(location.path, "rb") as f:
            rows = pq.ParquetFile(f).metadata.num_rows
    return CommittedFile(path=relative_path, bytes=size, rows=rows)


def refresh_manifest(
    partition_dir: Location, *, partition: dict[str, str], run_id: str, details: dict[str, Any] | None = None
) -> CommitManifest:
    """Rewrite the `_SUCCESS` manifest of a committed partition that grew in place (an incremental backfill): it
    lists every file now there. One write, so a reader sees the old manifest or the new one."""
    files = [_describe(partition_dir.join(name), name) for name in partition_dir.files() if is_data_file(name)]
    manifest = CommitManifest(
        partition=dict(partition),
        run_id=run_id,
        committed_at=time.time(),
        files=files,
        rows=sum(entry.rows or 0 for entry in files),
        details=dict(details or {}),
    )
    partition_dir.join(SUCCESS_MARKER).write_text(manifest.to_json())
    return manifest
