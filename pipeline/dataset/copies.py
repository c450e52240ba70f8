"""Rows that repeat an image get its image features by copy, after the model, without running it on them.

A row is marked in the column `__image_copy` before the model stage (`pipeline.run.row_selection`): `run` when an
earlier row of the same run has the same image bytes (the first row with a digest claims it), `dataset` when an
`ok` row already in the dataset has them. The model actor leaves its image features null, still encodes its
caption, drops the marker column and writes the row with status `copy` (`pipeline.model.copy_aware_embed`), a
status no committed file holds. Before the run commits, `collect_sources` finds one source row per digest (a
computed row of the run, else an `ok` row of the dataset, read from its file: only the digest, status and image
feature columns) and `fill_copies` puts the source's image features into each copy and sets its status `ok`. A copy
whose source failed in the model becomes an error row with the source's reason. An incremental run fills its copies
while preparing its commit (`pipeline.dataset.replacement`); a plain run fills them in its own output
(`pipeline.dataset.copy_fill`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.dataset import schema
from pipeline.dataset.id_set import OK, IdSet
from pipeline.storage import Location

COPY_COLUMN = "__image_copy"  # between the selection stage and the model actor only; never written
COPY_IN_RUN = "run"
COPY_FROM_DATASET = "dataset"
NOT_FOUND = "the row this image repeats was not found at the commit"


def copy_rows(table: pa.Table) -> np.ndarray:
    """Which rows of `table` wait for another row's image features (status `copy`)."""
    return np.asarray(
        pc.fill_null(pc.equal(table.column(schema.STATUS), schema.STATUS_COPY), False).to_numpy(zero_copy_only=False),
        dtype=bool,
    )


def image_feature_columns(names: list[str]) -> list[str]:
    """The columns that depend on the image alone (what a copy takes from its source)."""
    dense = (schema.TRUNK, schema.VISION_FEATURES)
    return [
        name
        for name in names
        if name in (schema.IMAGE_EMBEDDING, *dense) or name.startswith(("backbone_fpn_", "sam2_backbone_fpn_"))
    ]


@dataclass
class CopySources:
    table: pa.Table | None = None  # image_sha256, status, error and the image feature columns; one row per digest
    index: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.index)


def _read(filesystem: Any, path: str, columns: list[str] | None = None) -> pa.Table:
    with filesystem.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        if columns is not None:
            columns = [name for name in columns if name in parquet.schema_arrow.names]
        return parquet.read(columns=columns)


def _names(filesystem: Any, path: str) -> list[str]:
    with filesystem.open_input_file(path) as f:
        return pq.read_schema(f).names


def collect_sources(
    staged_files: list[str], staged_fs: Any, output: Location, output_fs: Any, id_set: IdSet
) -> CopySources:
    needed: set[str] = set()
    for path in staged_files:
        table = _read(staged_fs, path, [schema.IMAGE_SHA256, schema.STATUS])
        marked = table.filter(pa.array(copy_rows(table)))
        needed.update(d for d in marked.column(schema.IMAGE_SHA256).to_pylist() if d)
    if not needed:
        return CopySources()
    parts: list[pa.Table] = []
    found: set[str] = set()
    for path in staged_files:  # rows computed in this run
        found = take_new_sources(computed_rows(staged_fs, path), needed - found, parts, found)
    missing = needed - found
    if missing:  # ok rows of the dataset
        present = (id_set.status == OK) & np.isin(id_set.sha256, list(missing))
        for owner in np.unique(id_set.file_index[present]):
            path = output.join(id_set.files[int(owner)]).path
            names = pq.read_schema(output_fs.open_input_file(path)).names
            table = _read(
                output_fs, path, [schema.IMAGE_SHA256, schema.STATUS, schema.ERROR, *image_feature_columns(names)]
            )
            table = table.filter(pc.equal(table.column(schema.STATUS), schema.STATUS_OK))
            found = take_new_sources(table, needed - found, parts, found)
    return merge_sources(parts)


def merge_sources(parts: list[pa.Table]) -> CopySources:
    """One table of source rows (one per digest) from the parts `take_new_sources` collected."""
    if not parts:
        return CopySources()
    columns = parts[0].schema.names
    merged = pa.concat_tables([part.select(columns) for part in parts], promote_options="permissive")
    digests = merged.column(schema.IMAGE_SHA256).to_pylist()
    return CopySources(merged, {digest: i for i, digest in enumerate(digests)})


def computed_rows(filesystem: Any, path: str) -> pa.Table:
    """The digest, status, error and image feature columns of the rows of one file that are not copies."""
    features = image_feature_columns(_names(filesystem, path))
    table = _read(filesystem, path, [schema.IMAGE_SHA256, schema.STATUS, schema.ERROR, *features])
    copies = copy_rows(table)
    return table.filter(pa.array(~copies)) if copies.any() else table


def take_new_sources(table: pa.Table, wanted: set[str], parts: list[pa.Table], found: set[str]) -> set[str]:
    """Append to `parts` the first row of `table` for each wanted digest; the digests found so far."""
    if not wanted or table.num_rows == 0:
        return found
    rows, seen = [], set()
    for i, digest in enumerate(table.column(schema.IMAGE_SHA256).to_pylist()):
        if digest in wanted and digest not in seen:
            rows.append(i)
            seen.add(digest)
    if rows:
        parts.append(table.take(pa.array(rows)))
    return found | seen


def fill_copies(
    table: pa.Table, sources: CopySources, pending: Callable[[str], bool] | None = None
) -> tuple[pa.Table, int]:
    """`table` with each copy's image features taken from its source and its status set; the rows now `ok`.

    A copy whose digest has no source in `sources` becomes an error row, unless `pending(digest)` says a later
    call (with another slice of the sources) fills it: then it stays a copy.
    """
    marked = copy_rows(table)
    if not marked.any():
        return table, 0
    digests = table.column(schema.IMAGE_SHA256).to_pylist()
    source_of = np.array([sources.index.get(digests[i], -1) if marked[i] else -1 for i in range(len(digests))])
    status = table.column(schema.STATUS).to_pylist()
    error = table.column(schema.ERROR).to_pylist()
    filled = marked & (source_of >= 0)
    copied = 0
    for i in np.flatnonzero(marked):
        if source_of[i] < 0:
            if pending is None or not pending(digests[i]):
                status[i], error[i] = schema.STATUS_ERROR, NOT_FOUND
            continue
        source_status = sources.table.column(schema.STATUS)[int(source_of[i])].as_py()
        if source_status == schema.STATUS_OK:
            status[i] = schema.STATUS_OK
            copied += 1
        else:
            source_error = sources.table.column(schema.ERROR)[int(source_of[i])].as_py()
            status[i], error[i] = schema.STATUS_ERROR, f"same image as a row that failed: {source_error}"
    n = table.num_rows
    for name in image_feature_columns(table.column_names):
        if sources.table is None or name not in sources.table.column_names:
            continue
        own = table.column(name).combine_chunks()
        theirs = sources.table.column(name).combine_chunks().cast(own.type)
        indices = np.arange(n)
        indices[filled] = n + source_of[filled]
        combined = pa.concat_arrays([own, theirs])
        table = table.set_column(table.schema.get_field_index(name), name, combined.take(pa.array(indices)))
    table = table.set_column(table.schema.get_field_index(schema.STATUS), schema.STATUS, pa.array(status, pa.string()))
    table = table.set_column(table.schema.get_field_index(schema.ERROR), schema.ERROR, pa.array(error, pa.string()))
    return table, copied
