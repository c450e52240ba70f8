"""Commit markers: a directory of Parquet files is complete when it holds a `_SUCCESS` file.

`run_job` writes `_SUCCESS` into every partition directory it wrote and at the output root, after the run summary.
Writers that add partitions later (backfills) do the same per partition. Readers, when any marker exists under the
dataset root, read only files whose directory has one; a dataset without any marker (a run still in progress, or
Parquet from another tool) is read whole.
"""

from __future__ import annotations

import posixpath
from typing import Any

from pipeline.dataset import schema
from pipeline.storage import Location, fsspec_filesystem

PARQUET_SUFFIX = ".parquet"


def _listing(location: Location, storage_options: dict[str, Any] | None, raw_options: bool) -> list[str]:
    fs = fsspec_filesystem(location.protocol, storage_options, raw_options=raw_options)  # listings never cached
    if not fs.exists(location.path):
        return []
    return sorted(fs.find(location.path, withdirs=False))


def _is_hidden(path: str, root: str) -> bool:
    """Under a `_` or `.` directory (staging areas, Ray's temporary files), or such a file itself."""
    relative = posixpath.relpath(path, root)
    return relative != "." and any(part.startswith((".", "_")) for part in relative.split("/"))


def _is_data_file(path: str, root: str) -> bool:
    return path.endswith(PARQUET_SUFFIX) and not _is_hidden(path, root)


def _is_marker(path: str, root: str) -> bool:
    return posixpath.basename(path) == schema.SUCCESS_FILE and not _is_hidden(posixpath.dirname(path), root)


def data_files(
    location: Location, storage_options: dict[str, Any] | None = None, *, raw_options: bool = False
) -> list[str]:
    """Every Parquet data file under the root, committed or not."""
    return [p for p in _listing(location, storage_options, raw_options) if _is_data_file(p, location.path)]


def committed_files(
    location: Location, storage_options: dict[str, Any] | None = None, *, raw_options: bool = False
) -> tuple[list[str], bool]:
    """Data files a reader may trust, and whether commit markers were in use at all."""
    listing = _listing(location, storage_options, raw_options)
    marked_dirs = {posixpath.dirname(p) for p in listing if _is_marker(p, location.path)}
    files = [p for p in listing if _is_data_file(p, location.path)]
    if not marked_dirs:
        return files, False
    return [p for p in files if posixpath.dirname(p) in marked_dirs], True


def write_markers(location: Location, storage_options: dict[str, Any] | None = None) -> None:
    """`_SUCCESS` in each directory holding data files, the root last."""
    fs = fsspec_filesystem(location.protocol, storage_options)
    directories = sorted({posixpath.dirname(p) for p in data_files(location, storage_options)} - {location.path})
    for directory in directories:
        fs.pipe_file(posixpath.join(directory, schema.SUCCESS_FILE), b"")
    fs.pipe_file(location.join(schema.SUCCESS_FILE).path, b"")


def remove_markers(location: Location, storage_options: dict[str, Any] | None = None) -> None:
    """Withdraw a dataset's commit (its markers and run summary) before more files are added to it."""
    fs = fsspec_filesystem(location.protocol, storage_options)
    for path in _listing(location, storage_options, raw_options=False):
        summary = path == location.join(schema.SUMMARY_FILE).path
        if summary or _is_marker(path, location.path):
            fs.rm_file(path)
