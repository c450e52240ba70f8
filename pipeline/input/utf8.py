"""Text that is not valid UTF-8: read with replacement characters, never a reason to lose a row or a column.

Where invalid bytes end up depends on the format:
- CSV / TSV: Arrow's reader infers `binary` for a column with one cell that is not UTF-8 (and a streaming read
  fails outright when that cell comes after the first block). A CSV holds only text, so the schema probe calls
  such a column text (`text_schema`), and the caption columns are read as binary (`binary_column_types`); their
  cells are decoded with replacement characters in `pipeline.input.sources.clean_captions`.
- JSON Lines and Parquet: Arrow's readers keep the bytes in a `string` column without checking them; Python then
  fails on the first `to_pylist()`. `replace_invalid_utf8` repairs those columns of a block (valid columns, the
  common case, cost one validation pass).
"""

from __future__ import annotations

import pyarrow as pa


def text_schema(schema: pa.Schema) -> pa.Schema:
    """A CSV's probed schema with binary columns called strings: in a CSV they are text holding invalid bytes."""
    fields = [
        field.with_type(pa.string())
        if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type)
        else field
        for field in schema
    ]
    return pa.schema(fields, metadata=schema.metadata)


def binary_column_types(columns: list[str | None]) -> dict[str, pa.DataType]:
    """CSV convert-option column types that read `columns` as bytes, whatever their cells hold."""
    return {column: pa.binary() for column in columns if column}


def replace_invalid_utf8(table: pa.Table) -> pa.Table:
    """`table` with every invalid UTF-8 sequence in its string (and list-of-string) columns replaced by U+FFFD."""
    for index, field in enumerate(table.schema):
        if not _holds_text(field.type):
            continue
        column = table.column(index)
        if all(_valid(chunk) for chunk in column.chunks):
            continue
        repaired = pa.chunked_array([_repair(chunk) for chunk in column.chunks], field.type)
        table = table.set_column(index, field, repaired)
    return table


def _holds_text(kind: pa.DataType) -> bool:
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _holds_text(kind.value_type)
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _valid(chunk: pa.Array) -> bool:
    try:
        chunk.validate(full=True)  # checks UTF-8 of string data, children included
    except pa.ArrowInvalid:
        return False
    return True


def _repair(chunk: pa.Array) -> pa.Array:
    if _valid(chunk):
        return chunk
    kind = chunk.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return type(chunk).from_arrays(chunk.offsets, _repair(chunk.values), mask=chunk.is_null())
    as_bytes = chunk.view(pa.large_binary() if pa.types.is_large_string(kind) else pa.binary())
    return pa.array([None if b is None else b.decode("utf-8", errors="replace") for b in as_bytes.to_pylist()], kind)
