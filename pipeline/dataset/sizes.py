"""What each stored feature costs per row: its shape, its raw size, and its size in the Parquet files."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq


@dataclass(frozen=True)
class FeatureSize:
    name: str
    shape: tuple[int, ...]  # per entry: a tensor's shape, a vector's length
    dtype: str
    raw_bytes: int  # values x item size, per entry
    stored_bytes: float  # compressed column chunks per row, over the files read (list columns: per row, all entries)


def _entry(field_type: pa.DataType) -> tuple[tuple[int, ...], pa.DataType] | None:
    if isinstance(field_type, pa.FixedShapeTensorType):
        return tuple(field_type.shape), field_type.value_type
    if pa.types.is_fixed_size_list(field_type):
        return (field_type.list_size,), field_type.value_type
    if pa.types.is_list(field_type) or pa.types.is_large_list(field_type):
        return _entry(field_type.value_type)  # several captions per row: one entry per caption
    return None


def feature_sizes(dataset: ds.FileSystemDataset, max_files: int = 4) -> list[FeatureSize]:
    """Every vector or tensor column of `dataset`; stored sizes from the footers of its first `max_files` files."""
    compressed: dict[str, int] = {}
    rows = 0
    for path in dataset.files[:max_files]:
        with dataset.filesystem.open_input_file(path) as f:
            metadata = pq.ParquetFile(f).metadata
        rows += metadata.num_rows
        for group in range(metadata.num_row_groups):
            row_group = metadata.row_group(group)
            for index in range(row_group.num_columns):
                chunk = row_group.column(index)
                top = chunk.path_in_schema.split(".")[0]
                compressed[top] = compressed.get(top, 0) + chunk.total_compressed_size
    sizes = []
    for field in dataset.schema:
        entry = _entry(field.type)
        if entry is None:
            continue
        shape, value_type = entry
        values = 1
        for d in shape:
            values *= d
        sizes.append(
            FeatureSize(
                name=field.name,
                shape=shape,
                dtype=str(np.dtype(value_type.to_pandas_dtype())),
                raw_bytes=values * max(value_type.bit_width // 8, 1),
                stored_bytes=compressed.get(field.name, 0) / rows if rows else 0.0,
            )
        )
    return sizes
