"""A manifest as the driver sees it before Ray starts: its files, their format and the first file's schema.

Reading the schema costs one Parquet footer or the first block of a CSV / JSON Lines file. It tells the driver
whether the image column holds URIs or the images themselves (a binary column, or the Hugging Face `datasets`
image struct `struct<bytes: binary, path: string>`), which manifest columns clash with output columns, and which
columns the duplicate-id check has to read.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.input.utf8 import binary_column_types, replace_invalid_utf8, text_schema
from pipeline.storage import Location, arrow_filesystem, list_files

MANIFEST_EXTENSIONS = {
    "parquet": "parquet",
    "pq": "parquet",
    "csv": "csv",
    "tsv": "tsv",
    "jsonl": "json",
    "ndjson": "json",
    "json": "json",
}
logger = logging.getLogger(__name__)

SCHEMA_PROBE_BYTES = 1 << 20  # JSON Lines: the first line must fit (a line holding base64 images may not)


@dataclass(frozen=True)
class ManifestLayout:
    kind: str  # parquet, csv, tsv or json
    files: list[str]  # filesystem paths, sorted
    schema: pa.Schema  # of the first file

    @property
    def column_names(self) -> list[str]:
        return list(self.schema.names)


def manifest_kind(paths: Iterable[str]) -> tuple[str, list[str]]:
    """The manifest format shared by every file (by extension, compression suffix ignored) and the file list."""
    by_kind: dict[str, list[str]] = {}
    plain_json: list[str] = []
    for path in paths:
        name = posixpath.basename(path).lower()
        for suffix in (".gz", ".zst", ".bz2"):
            name = name.removesuffix(suffix)
        extension = name.rsplit(".", 1)[-1] if "." in name else ""
        kind = MANIFEST_EXTENSIONS.get(extension)
        if extension == "json":
            plain_json.append(path)
        elif kind is not None:
            by_kind.setdefault(kind, []).append(path)
    if plain_json and not by_kind:
        by_kind["json"] = plain_json
    elif plain_json:
        # Beside Parquet or CSV shards, `.json` files are side files (img2dataset's `00000_stats.json`), not rows.
        logger.info("ignoring %d .json files beside the %s manifest files", len(plain_json), next(iter(by_kind)))
    if not by_kind:
        raise ValueError(
            "no manifest files found (expected .parquet, .csv, .tsv, .jsonl or .json files); "
            "for a folder of images use input.format=images"
        )
    if len(by_kind) > 1:
        raise ValueError(f"a manifest must use one format, found several: {sorted(by_kind)}")
    kind, files = by_kind.popitem()
    return kind, files


def manifest_layout(locations: Sequence[Location], storage_options: dict[str, Any] | None) -> ManifestLayout:
    files: list[str] = []
    for location in locations:
        files.extend(list_files(location, storage_options))
    kind, files = manifest_kind(files)
    filesystem = arrow_filesystem(locations[0].protocol, storage_options)
    return ManifestLayout(kind, files, read_schema(kind, files[0], filesystem))


def read_schema(kind: str, path: str, filesystem: Any) -> pa.Schema:
    if kind == "parquet":
        import pyarrow.parquet as pq

        with filesystem.open_input_file(path) as f:
            return pq.read_schema(f)
    if kind in ("csv", "tsv"):
        import pyarrow.csv as pacsv

        parse = pacsv.ParseOptions(delimiter="\t" if kind == "tsv" else ",")
        with filesystem.open_input_stream(path, compression="detect") as f:
            return text_schema(pacsv.open_csv(f, parse_options=parse).schema)
    # JSON Lines: infer from the whole lines of the first block, so a null in the first row does not decide a type
    with filesystem.open_input_stream(path, compression="detect") as f:
        sample = f.read(SCHEMA_PROBE_BYTES)
    if len(sample) == SCHEMA_PROBE_BYTES:
        sample = sample[: sample.rfind(b"\n") + 1]
    if not sample.strip():
        raise ValueError(f"the manifest {path} is empty")
    import pyarrow.json as pajson

    try:
        return pajson.read_json(pa.BufferReader(sample)).schema
    except pa.ArrowInvalid as exc:
        raise ValueError(f"the first lines of {path} are not JSON objects: {exc}") from exc


def read_columns(
    layout: ManifestLayout, columns: list[str], filesystem: Any, text_columns: Sequence[str | None] = ()
) -> pa.Table:
    """Only `columns` (those present) of every manifest file, as one table: Parquet reads just those columns.

    `text_columns`: read from a CSV as bytes, as the run reads them (`csv_convert_options`); invalid UTF-8 in
    string columns is replaced (`pipeline.input.utf8`)."""
    present = [c for c in columns if c in layout.column_names]
    tables = []
    for path in layout.files:
        if layout.kind == "parquet":
            import pyarrow.parquet as pq

            with filesystem.open_input_file(path) as f:
                table = pq.read_table(f, columns=present)
        elif layout.kind in ("csv", "tsv"):
            import pyarrow.csv as pacsv

            parse = pacsv.ParseOptions(delimiter="\t" if layout.kind == "tsv" else ",")
            convert = csv_convert_options(text_columns)
            convert.include_columns = present
            convert.include_missing_columns = True
            with filesystem.open_input_stream(path, compression="detect") as f:
                table = pacsv.read_csv(f, parse_options=parse, convert_options=convert)
        else:
            import pyarrow.json as pajson

            with filesystem.open_input_stream(path, compression="detect") as f:
                table = pajson.read_json(f)
            table = table.select([c for c in present if c in table.column_names])
        tables.append(replace_invalid_utf8(table))
    return pa.concat_tables(tables, promote_options="permissive")


def csv_convert_options(text_columns: Sequence[str | None]) -> Any:
    """How a CSV manifest is converted: caption columns as bytes, so one cell that is not UTF-8 costs nothing but
    replacement characters in that cell (Arrow would otherwise read the whole column as binary, or fail)."""
    import pyarrow.csv as pacsv

    return pacsv.ConvertOptions(column_types=binary_column_types(list(text_columns)))


def holds_image_bytes(schema: pa.Schema, column: str) -> bool:
    """A binary column, or a struct with a binary `bytes` field (Hugging Face `datasets.Image`)."""
    if column not in schema.names:
        return False
    kind = schema.field(column).type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind):
        return True
    if pa.types.is_struct(kind):
        index = kind.get_field_index("bytes")
        return index >= 0 and holds_image_bytes(pa.schema([kind.field(index)]), "bytes")
    return False
