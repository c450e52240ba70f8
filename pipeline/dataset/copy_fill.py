"""A plain run's copies filled in its own output, file by file: each repeated image computed once, memory bounded.

A plain run (no dataset to join) writes with Ray Data's partitioned writer straight into its output, so its copies
(status `copy`, image features null: `pipeline.dataset.copies`) land in files of their own partition, possibly before
the row they repeat does. Before the run writes its `_SUCCESS` markers, `fill_output_copies`:

1. reads `status` and `image_sha256` of every data file (a few bytes a row) and notes the files holding copies and
   the digests they repeat (sorted NumPy arrays, no per-row Python objects kept);
2. reads those two columns again to find the file of each digest's source: a row of the run that went through the
   model (ok, or an error whose reason the copies take over);
3. loads the sources' image feature columns (only those rows), one slice of digests at a time so that at most
   `memory_budget` bytes of features are held, and rewrites every file holding copies of that slice under its own
   name (a write to a temporary name, then a rename; one PUT on object stores).

Files without copies are never rewritten, and with one slice (pooled embeddings are 1-4 KB a row: a 512 MiB budget
holds the sources of more than 100,000 distinct repeated images) each file with copies is rewritten once. A run
killed part way leaves copies in its files; the resumed run (the same `--resume-path`) fills them.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.dataset import schema
from pipeline.dataset.copies import (
    computed_rows,
    fill_copies,
    image_feature_columns,
    merge_sources,
    take_new_sources,
)
from pipeline.dataset.markers import data_files
from pipeline.dataset.replacement import kill_hook
from pipeline.storage import Location, arrow_filesystem

MEMORY_BUDGET = 512 * 1024**2  # bytes of source image features held at once


def fill_output_copies(
    output: Location,
    storage_options: dict[str, Any] | None,
    *,
    compression: str = "zstd",
    memory_budget: int = MEMORY_BUDGET,
) -> int:
    """Fill every copy in the data files under `output`; the number of rows that got image features."""
    files = data_files(output, storage_options)
    filesystem = arrow_filesystem(output.protocol, storage_options)
    copy_digests: dict[int, np.ndarray] = {}  # file index -> the sorted distinct digests its copies repeat
    for index, path in enumerate(files):
        status, digests = _narrow(filesystem, path)
        marked = status == schema.STATUS_COPY
        if marked.any():
            copy_digests[index] = np.unique(digests[marked])
    if not copy_digests:
        return 0
    needed = np.unique(np.concatenate(list(copy_digests.values())))
    source_file = _source_files(filesystem, files, needed)
    have = needed[source_file >= 0]  # sorted
    have_files = source_file[source_file >= 0]
    missing = needed[source_file < 0]  # become error rows in the first slice
    per_slice = 1
    if len(have):
        per_slice = max(1, memory_budget // _source_row_bytes(filesystem, files[int(have_files[0])]))
    filled = rewritten = 0
    for start in range(0, max(len(have), 1), per_slice):
        stop = start + per_slice
        digests, owners = have[start:stop], have_files[start:stop]
        wanted, parts, found = set(digests.tolist()), [], set()
        for owner in np.unique(owners):
            found = take_new_sources(computed_rows(filesystem, files[int(owner)]), wanted - found, parts, found)
        sources = merge_sources(parts)
        touched = digests if start else np.concatenate([digests, missing])
        later = have[stop:]

        def pending(digest: str, later: np.ndarray = later) -> bool:
            position = np.searchsorted(later, digest)
            return bool(position < len(later) and later[position] == digest)

        for index, repeated in copy_digests.items():
            if not np.isin(repeated, touched).any():
                continue
            with filesystem.open_input_file(files[index]) as f:
                table = pq.ParquetFile(f).read()
            table, count = fill_copies(table, sources, pending)
            _rewrite(output, files[index], table, storage_options, compression)
            filled += count
            rewritten += 1
            kill_hook("copy_fill", rewritten)
    return filled


def _narrow(filesystem: Any, path: str) -> tuple[np.ndarray, np.ndarray]:
    """(status, digest) of every row of one file, as object arrays (digest "" where unknown)."""
    with filesystem.open_input_file(path) as f:
        table = pq.ParquetFile(f).read(columns=[schema.STATUS, schema.IMAGE_SHA256])
    status = table.column(schema.STATUS).to_numpy(zero_copy_only=False)
    digests = table.column(schema.IMAGE_SHA256).fill_null("").to_numpy(zero_copy_only=False)
    return status.astype(object), digests.astype(object)


def _source_files(filesystem: Any, files: list[str], needed: np.ndarray) -> np.ndarray:
    """For each of `needed` (sorted digests), the index of the first file holding a row with it that is no copy."""
    source_file = np.full(len(needed), -1, dtype=np.int64)
    for index, path in enumerate(files):
        status, digests = _narrow(filesystem, path)
        candidates = digests[(status != schema.STATUS_COPY) & (digests != "")]
        if not len(candidates):
            continue
        position = np.minimum(np.searchsorted(needed, candidates), len(needed) - 1)
        matched = position[needed[position] == candidates]
        unset = matched[source_file[matched] < 0]
        source_file[unset] = index
        if (source_file >= 0).all():
            break
    return source_file


def _source_row_bytes(filesystem: Any, path: str) -> int:
    """Uncompressed bytes a row's image feature columns take in `path` (from its footer, nothing else read)."""
    with filesystem.open_input_file(path) as f:
        metadata = pq.ParquetFile(f).metadata
    names = set(image_feature_columns(metadata.schema.to_arrow_schema().names))
    total = 0
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for column in range(row_group.num_columns):
            chunk = row_group.column(column)
            if chunk.path_in_schema.split(".", 1)[0] in names:
                total += chunk.total_uncompressed_size
    return total // max(1, metadata.num_rows) + 64  # and the digest, status and error of the row


def _rewrite(
    output: Location, path: str, table: pa.Table, storage_options: dict[str, Any] | None, compression: str
) -> None:
    """Replace the file at `path` with `table`: a reader sees the old file or the new one, never part of one."""
    filesystem = arrow_filesystem(output.protocol, storage_options)
    if not output.is_local:
        pq.write_table(table, path, filesystem=filesystem, compression=compression)  # one object, whole or absent
        return
    temporary = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    pq.write_table(table, temporary, compression=compression)
    os.replace(temporary, path)
