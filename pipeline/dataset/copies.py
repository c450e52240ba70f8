"""Rows that repeat an image get its image features by copy, at the commit, without the model.

A row is marked in the column `__image_copy` before the model stage (`pipeline.run.row_selection`): `run` when an
earlier row of the same run has the same image bytes (the first row with a digest claims it), `dataset` when an
`ok` row already in the dataset has them. The model actor leaves its image features null (it still encodes its
caption). At the commit, `collect_sources` finds one source row per digest (a computed row in the staging area,
else an `ok` row of the dataset, read from its file: only the digest, status and image feature columns) and
`fill_copies` puts the source's image features into each copy. A copy whose source failed in the model becomes an
error row with the source's reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.dataset import schema
from pipeline.dataset.id_set import OK, IdSet
from pipeline.storage import Location

COPY_COLUMN = "__image_copy"
COPY_IN_RUN = "run"
COPY_FROM_DATASET = "dataset"


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
        table = _read(staged_fs, path, [schema.IMAGE_SHA256, COPY_COLUMN])
        if COPY_COLUMN in table.column_names:
            marked = table.filter(pc.is_valid(table.column(COPY_COLUMN)))
            needed.update(d for d in marked.column(schema.IMAGE_SHA256).to_pylist() if d)
    if not needed:
        return CopySources()
    parts: list[pa.Table] = []
    found: set[str] = set()
    for path in staged_files:  # rows computed in this run
        features = image_feature_columns(_names(staged_fs, path))
        columns = [schema.IMAGE_SHA256, schema.STATUS, schema.ERROR, COPY_COLUMN, *features]
        table = _read(staged_fs, path, columns)
        computed = pc.is_null(table.column(COPY_COLUMN)) if COPY_COLUMN in table.column_names else None
        table = table.filter(computed) if computed is not None else table
        found = _take_new(table, needed - found, parts, found)
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
            found = _take_new(table, needed - found, parts, found)
    if not parts:
        return CopySources()
    columns = parts[0].schema.names
    merged = pa.concat_tables([part.select(columns) for part in parts], promote_options="permissive")
    digests = merged.column(schema.IMAGE_SHA256).to_pylist()
    return CopySources(merged, {digest: i for i, digest in enumerate(digests)})


def _take_new(table: pa.Table, wanted: set[str], parts: list[pa.Table], found: set[str]) -> set[str]:
    """Append to `parts` the first row of `table` for each wanted digest; the digests found so far."""
    if not wanted or table.num_rows == 0:
        return found
    rows, seen = [], set()
    for i, digest in enumerate(table.column(schema.IMAGE_SHA256).to_pylist()):
        if digest in wanted and digest not in seen:
            rows.append(i)
            seen.add(digest)
    if rows:
        taken = table.take(pa.array(rows))
        parts.append(taken.drop_columns([c for c in (COPY_COLUMN,) if c in taken.column_names]))
    return found | seen


def fill_copies(table: pa.Table, sources: CopySources) -> tuple[pa.Table, int]:
    """`table` with each marked row's image features taken from its source, the marker column dropped."""
    if COPY_COLUMN not in table.column_names:
        return table, 0
    marked = np.asarray(pc.is_valid(table.column(COPY_COLUMN)).to_numpy(zero_copy_only=False), dtype=bool)
    table = table.drop_columns([COPY_COLUMN])
    if not marked.any():
        return table, 0
    digests = table.column(schema.IMAGE_SHA256).to_pylist()
    source_of = np.array([sources.index.get(digests[i], -1) if marked[i] else -1 for i in range(len(digests))])
    status = table.column(schema.STATUS).to_pylist()
    error = table.column(schema.ERROR).to_pylist()
    filled = marked & (source_of >= 0)
    for i in np.flatnonzero(marked):
        if source_of[i] < 0:
            status[i], error[i] = schema.STATUS_ERROR, "the row this image repeats was not found at the commit"
            continue
        source_status = sources.table.column(schema.STATUS)[int(source_of[i])].as_py()
        if source_status != schema.STATUS_OK:
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
    return table, int(filled.sum())
