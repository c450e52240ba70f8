"""NumPy feature arrays to Arrow columns: vectors as fixed-size lists, maps as canonical fixed-shape tensors.

Both are plain Parquet types underneath (a fixed-size list of floats), so pyarrow, Ray, DuckDB and polars all read
them; pyarrow and polars also see the tensor shape from the `arrow.fixed_shape_tensor` extension metadata.
Rows that have nothing to store (error rows, records without a caption) are nulls.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa


def arrow_float_type(dtype: np.dtype) -> pa.DataType:
    return pa.from_numpy_dtype(np.dtype(dtype))


def vector_type(dim: int, dtype: np.dtype) -> pa.DataType:
    return pa.list_(arrow_float_type(dtype), dim)


def tensor_type(shape: Sequence[int], dtype: np.dtype) -> pa.DataType:
    return pa.fixed_shape_tensor(arrow_float_type(dtype), list(shape))


def _null_mask(valid: np.ndarray) -> pa.Array | None:
    return None if bool(valid.all()) else pa.array(~valid)


def _fixed_size(values: np.ndarray, valid: np.ndarray) -> pa.FixedSizeListArray:
    """`values` [N, ...]: one entry per row (placeholders where not valid)."""
    width = int(np.prod(values.shape[1:]))
    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, width, mask=_null_mask(valid))


def vectors(values: np.ndarray, valid: np.ndarray) -> pa.Array:
    """[N, d] -> fixed_size_list<float>[d], null where not valid."""
    return _fixed_size(values, valid)


def tensors(values: np.ndarray, valid: np.ndarray) -> pa.Array:
    """[N, *shape] -> arrow.fixed_shape_tensor(shape), null where not valid."""
    storage = _fixed_size(values, valid)
    return pa.ExtensionArray.from_storage(tensor_type(values.shape[1:], values.dtype), storage)


def ragged(items: pa.Array, counts: Sequence[int], valid: np.ndarray) -> pa.Array:
    """Group consecutive `items` into one list per row (`counts[i]` items for row i); null where not valid."""
    offsets = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), items, mask=_null_mask(valid))


def null_rows(column: pa.Array, rows: Iterable[int]) -> pa.Array:
    """`column` (built by the functions above) with `rows` turned to nulls; values stay, unseen, under the mask."""
    mask = column.is_null().to_numpy(zero_copy_only=False).copy()
    mask[list(rows)] = True
    if isinstance(column, pa.ExtensionArray):
        return pa.ExtensionArray.from_storage(column.type, null_rows(column.storage, rows))
    if isinstance(column, pa.FixedSizeListArray):
        return pa.FixedSizeListArray.from_arrays(column.values, column.type.list_size, mask=pa.array(mask))
    return pa.ListArray.from_arrays(column.offsets, column.values, mask=pa.array(mask))


def empty_rows(num_rows: int, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
    return np.zeros((num_rows, *shape), dtype=dtype)
