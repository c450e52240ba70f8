"""Reading a finished (or growing) embedding dataset back: one Arrow table, or NumPy matrices of embeddings."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.dataset import schema
from pipeline.dataset.markers import committed_files
from pipeline.storage import Location, arrow_filesystem, parse_uri, to_uri

logger = logging.getLogger(__name__)

Filters = pc.Expression | Sequence[tuple[str, str, Any]] | Sequence[Sequence[tuple[str, str, Any]]]


def _arrow_filesystem(location: Location, storage_options: dict[str, Any] | None) -> Any:
    return arrow_filesystem(location.protocol, storage_options, raw_options=True)


def open_dataset(location: Location, files: list[str], filesystem: Any) -> ds.Dataset:
    """A pyarrow dataset over exactly `files`, with `col=value/` directories as (typed) partition columns."""
    return ds.dataset(
        files,
        filesystem=filesystem,
        format="parquet",
        partitioning="hive",
        partition_base_dir=location.path,
    )


def open_embeddings(uri: str, *, storage_options: dict[str, Any] | None = None) -> ds.Dataset:
    """A lazy pyarrow dataset over the committed files: schema, counts and a few rows without reading it all."""
    location = parse_uri(uri)
    files, marked = committed_files(location, storage_options, raw_options=True)
    if not files:
        raise FileNotFoundError(f"no committed Parquet files under {uri}")
    if not marked:
        logger.warning("%s has no _SUCCESS markers: reading every file (the run may still be in progress)", uri)
    return open_dataset(location, files, _arrow_filesystem(location, storage_options))


def read_embeddings(
    uri: str,
    *,
    columns: Sequence[str] | None = None,
    filters: Filters | None = None,
    storage_options: dict[str, Any] | None = None,
) -> pa.Table:
    """Every committed row under `uri` as one Arrow table.

    columns: a subset of columns (partition columns included) or None for all.
    filters: a pyarrow expression or DNF tuples as in `pyarrow.parquet.read_table`, e.g. [("split", "=", "val")];
      filters on partition columns skip whole directories.
    storage_options: fsspec options for the URI's filesystem, e.g. {"client_kwargs": {"endpoint_url": ...}}.
    """
    dataset = open_embeddings(uri, storage_options=storage_options)
    expression = as_expression(filters)
    table = dataset.to_table(columns=list(columns) if columns is not None else None, filter=expression)
    metadata = dataset.schema.metadata
    return table.replace_schema_metadata(metadata) if metadata and not table.schema.metadata else table


def list_committed_files(uri: str, *, storage_options: dict[str, Any] | None = None) -> list[str]:
    """URIs of the data files a reader may trust (see pipeline.dataset.markers), for DuckDB, polars or Spark to read."""
    location = parse_uri(uri)
    files, _ = committed_files(location, storage_options, raw_options=True)
    return [to_uri(location.protocol, path) for path in files]


def as_expression(filters: Filters | None) -> pc.Expression | None:
    if filters is None or isinstance(filters, pc.Expression):
        return filters
    return pq.filters_to_expression(list(filters))


def embeddings_to_numpy(
    table: pa.Table, column: str = schema.IMAGE_EMBEDDING, *, dtype: Any = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors [N, d]) for the non-null entries of an embedding column.

    For `text_embedding` with several captions per row, every caption is one vector and its row id repeats.
    """
    values = table.column(column).combine_chunks()
    ids = table.column(schema.ID).combine_chunks()
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        lengths = pc.fill_null(pc.list_value_length(values), 0).to_numpy()
        ids = pc.take(ids, pa.array(np.repeat(np.arange(len(ids)), lengths)))
        values = pc.list_flatten(values)
    if not pa.types.is_fixed_size_list(values.type):
        raise TypeError(f"column {column!r} is not an embedding column (type {values.type})")
    present = pc.is_valid(values)
    values, ids = values.filter(present), ids.filter(present)
    dim = values.type.list_size
    flat = values.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(ids.to_pylist(), dtype=object), flat.reshape(len(values), dim).astype(dtype, copy=False)


def read_embeddings_numpy(
    uri: str,
    column: str = schema.IMAGE_EMBEDDING,
    *,
    filters: Filters | None = None,
    storage_options: dict[str, Any] | None = None,
    dtype: Any = np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) straight from storage: only the id and embedding columns are read."""
    table = read_embeddings(uri, columns=[schema.ID, column], filters=filters, storage_options=storage_options)
    return embeddings_to_numpy(table, column, dtype=dtype)


def run_metadata_from_file(path: str, filesystem: Any) -> dict[str, Any]:
    with filesystem.open_input_file(path) as f:
        metadata = pq.read_schema(f).metadata or {}
    raw = metadata.get(schema.METADATA_KEY)
    return json.loads(raw) if raw else {}


def read_run_metadata(uri: str, *, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's Parquet key-value metadata (model, checkpoint digest, sizes, dtypes, pooling, version, run id)
    and its `_summary.json` when the run has finished."""
    location = parse_uri(uri)
    files, _ = committed_files(location, storage_options, raw_options=True)
    filesystem = _arrow_filesystem(location, storage_options)
    result: dict[str, Any] = {"metadata": run_metadata_from_file(files[0], filesystem) if files else {}}
    try:
        with filesystem.open_input_stream(location.join(schema.SUMMARY_FILE).path) as f:
            result["summary"] = json.loads(f.read())
    except (FileNotFoundError, OSError):
        result["summary"] = None
    return result
