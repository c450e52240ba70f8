"""The three input layouts, read with Ray Data's own readers, and the canonical view of one read block.

- manifest: Parquet, CSV/TSV or JSON Lines rows naming an image URI (or, in Parquet, holding the image bytes:
  a binary column or the Hugging Face image struct), optional id and caption(s); other columns pass through to the
  output, under the prefix `input_` where their name is one the pipeline writes.
- images: a prefix of images, each with an optional sidecar caption (`name.jpg` + `name.txt`).
- webdataset: tar shards, one sample per key: an image member plus `.txt` and/or `.json` members; the `.json`
  member's text is carried into the output column `json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.config import InputConfig
from pipeline.dataset import schema
from pipeline.input.ids import derive_id, derive_id_from_row, id_to_string
from pipeline.input.manifest_layout import ManifestLayout, csv_convert_options, holds_image_bytes, manifest_layout
from pipeline.input.utf8 import replace_invalid_utf8
from pipeline.storage import Location, arrow_filesystem, parse_uri, to_uri

if TYPE_CHECKING:
    import pandas as pd
    import ray.data

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CAPTION_SIDECAR_EXTENSION = "txt"
WEBDATASET_TEXT_MEMBERS = ("txt", "text", "caption")
CLASH_PREFIX = "input_"  # manifest columns named like an output column are written as input_<name>
RAY_PATH_COLUMN = "path"  # the column Ray Data's `include_paths` adds: the file each row was read from


@dataclass(frozen=True)
class SourceSpec:
    """Everything needed to turn one read block into records; small and picklable (it travels to every task)."""

    format: str
    protocol: str
    id_column: str = "id"
    image_column: str = "image"
    caption_column: str | None = "caption"
    captions_column: str | None = None
    image_bytes: bool = False  # the manifest's image column holds the images (binary or the HF image struct)
    file_column: str | None = None  # Ray Data's per-row file path column, when the reader adds one
    input_uri: str = ""  # names the source of in-manifest images when the file itself is not known

    @property
    def multi_caption(self) -> bool:
        return self.format != "images" and self.captions_column is not None

    @property
    def has_captions(self) -> bool:
        """Whether any row can carry a caption: a manifest only through its caption column(s); an image's sidecar
        text or a WebDataset sample's text member may exist for any row."""
        return self.format != "manifest" or self.caption_column is not None or self.captions_column is not None

    @property
    def caption_output_column(self) -> str:
        return schema.CAPTIONS if self.multi_caption else schema.CAPTION

    @classmethod
    def from_config(cls, config: InputConfig, protocol: str) -> SourceSpec:
        if config.format not in ("manifest", "images", "webdataset"):
            raise ValueError(f"input.format must be manifest, images or webdataset, not {config.format!r}")
        if config.format == "images" and config.captions_column:
            raise ValueError("input.captions_column does not apply to format 'images' (one sidecar caption each)")
        if config.format == "manifest" and not config.image_column:
            raise ValueError("input.image_column must name the manifest column holding image URIs")
        return cls(
            format=config.format,
            protocol=protocol,
            id_column=config.id_column,
            image_column=config.image_column,
            caption_column=config.caption_column or None,
            captions_column=config.captions_column or None,
        )


@dataclass
class SourceRecords:
    """One read block in canonical form. Lists are aligned with the block's rows; no row is ever dropped."""

    ids: list[str] = field(default_factory=list)
    source_uris: list[str | None] = field(default_factory=list)
    image_bytes: list[bytes | None] = field(default_factory=list)  # None: fetch `image_locations`
    image_locations: list[Location | None] = field(default_factory=list)
    caption_locations: list[Location | None] = field(default_factory=list)  # sidecar captions to fetch
    captions: list[list[str] | None] = field(default_factory=list)
    problems: list[str | None] = field(default_factory=list)  # known before any fetch: the row is an error
    passthrough: pa.Table | None = None

    def __len__(self) -> int:
        return len(self.ids)


def input_uris(uri: str | list[str]) -> list[str]:
    uris = [uri] if isinstance(uri, str) else list(uri)
    uris = [u for u in uris if u]
    if not uris:
        raise ValueError("input.uri is empty: give a file, a list of files or a prefix")
    return uris


def input_protocol(uris: list[str]) -> str:
    protocols = {parse_uri(u).protocol for u in uris}
    if len(protocols) != 1:
        raise ValueError(f"all input URIs must use one filesystem, got {sorted(protocols)}")
    return protocols.pop()


def plan_source(
    spec: SourceSpec,
    uris: list[str],
    storage_options: dict[str, Any] | None,
    layout: ManifestLayout | None = None,
) -> tuple[SourceSpec, ManifestLayout | None]:
    """The spec completed from what the driver can see of the input, and the manifest's layout (None otherwise).

    `layout`: one already read (preflight's), so the manifest is listed and its schema read once per run.
    """
    if spec.format != "manifest":
        return spec, None
    layout = layout or manifest_layout([parse_uri(u) for u in uris], storage_options)
    image_bytes = layout.kind == "parquet" and holds_image_bytes(layout.schema, spec.image_column)
    # Ray's `include_paths` would overwrite a manifest column called `path`; then the input URI names the source.
    file_column = RAY_PATH_COLUMN if image_bytes and RAY_PATH_COLUMN not in layout.column_names else None
    return dataclasses.replace(spec, image_bytes=image_bytes, file_column=file_column, input_uri=uris[0]), layout


def log_renamed_columns(spec: SourceSpec, layout: ManifestLayout | None) -> None:
    for name, renamed in output_names(layout.column_names if layout else [], spec):
        if name != renamed:
            logger.warning("manifest column %r has the name of an output column; it is written as %r", name, renamed)


def read_source(
    spec: SourceSpec, uris: list[str], storage_options: dict[str, Any] | None, layout: ManifestLayout | None = None
) -> ray.data.Dataset:
    """The input as a Ray Dataset, through Ray Data's readers and one pyarrow filesystem built from the S3 options."""
    import ray.data

    filesystem = arrow_filesystem(spec.protocol, storage_options)
    locations = [parse_uri(u) for u in uris]
    if spec.format == "manifest":
        if layout is None:
            spec, layout = plan_source(spec, uris, storage_options)
        kind, files = layout.kind, layout.files
        if kind == "parquet":
            return ray.data.read_parquet(
                files, filesystem=filesystem, file_extensions=None, include_paths=spec.file_column is not None
            )
        if kind in ("csv", "tsv"):
            import pyarrow.csv as pacsv

            delimiter = "\t" if kind == "tsv" else ","
            return ray.data.read_csv(
                files,
                filesystem=filesystem,
                parse_options=pacsv.ParseOptions(delimiter=delimiter),
                convert_options=csv_convert_options(caption_columns(spec)),
            )
        # Arrow's JSON reader reads newline-delimited objects: JSON Lines. (`lines=True` is a pandas path that
        # takes no filesystem.)
        return ray.data.read_json(files, filesystem=filesystem, file_extensions=None)
    paths = [location.path for location in locations]
    if spec.format == "images":
        extensions = list(IMAGE_EXTENSIONS) + [e.upper() for e in IMAGE_EXTENSIONS]
        return ray.data.read_binary_files(paths, filesystem=filesystem, include_paths=True, file_extensions=extensions)
    # decoder=None keeps members as raw bytes: decoding, EXIF handling and hashing happen in the CPU stage.
    return ray.data.read_webdataset(paths, filesystem=filesystem, decoder=None, file_extensions=["tar"])


def caption_columns(spec: SourceSpec) -> list[str | None]:
    """The columns a CSV manifest's reader takes as bytes (`csv_convert_options`)."""
    return [spec.caption_column, spec.captions_column]


def block_rows(block: pa.Table | pd.DataFrame) -> tuple[list[dict[str, Any]], pa.Table | None]:
    """Rows as dicts, plus the block itself when it is Arrow (pass-through columns keep their exact types).

    Invalid UTF-8 in a string column (JSON Lines and Parquet readers keep it unchecked) becomes U+FFFD here."""
    if isinstance(block, pa.Table):
        block = replace_invalid_utf8(block)
        return block.to_pylist(), block
    return block.to_dict("records"), None


def describe_block(block: pa.Table | pd.DataFrame, spec: SourceSpec) -> SourceRecords:
    rows, table = block_rows(block)
    if spec.format == "manifest":
        return _describe_manifest(rows, table, spec)
    if spec.format == "images":
        return _describe_images(rows, spec)
    return _describe_webdataset(rows, spec)


def block_ids(block: pa.Table | pd.DataFrame, spec: SourceSpec) -> list[str]:
    return describe_block(block, spec).ids


def consumed_columns(spec: SourceSpec) -> set[str | None]:
    return {spec.id_column, spec.image_column, spec.caption_column, spec.captions_column, spec.file_column}


def output_names(column_names: Iterable[str], spec: SourceSpec) -> list[tuple[str, str]]:
    """(manifest column, output column) for every column passed through.

    A column named like one the pipeline writes (`status`, `error`, `image_embedding`, ...) keeps its values under
    `input_<name>` (prefixed again while that name is taken too), so manifests from other tools need no editing.
    """
    names = list(column_names)
    taken = set(names) | schema.RESERVED_COLUMNS | {schema.PIXELS, schema.TOKENS}
    consumed = consumed_columns(spec)
    result = []
    for name in names:
        if name in consumed:
            continue
        renamed = name
        if name in schema.RESERVED_COLUMNS or name in (schema.PIXELS, schema.TOKENS):
            renamed = CLASH_PREFIX + name
            while renamed in taken:
                renamed = CLASH_PREFIX + renamed
            taken.add(renamed)
        result.append((name, renamed))
    return result


def _describe_manifest(rows: list[dict[str, Any]], table: pa.Table | None, spec: SourceSpec) -> SourceRecords:
    records = SourceRecords()
    for row in rows:
        captions, problem = _row_captions(row, spec)
        given_id = id_to_string(row.get(spec.id_column))
        image_value = row.get(spec.image_column)
        name = None  # the image's name inside the manifest: the HF struct's path
        if isinstance(image_value, dict):  # Hugging Face `datasets.Image`: bytes, or a path when bytes are null
            name = image_value.get("path") or None
            image_value = image_value.get("bytes") if image_value.get("bytes") is not None else name
        if isinstance(image_value, (bytes, bytearray, memoryview)) and not spec.image_bytes:
            # a CSV's URI column that Arrow read as binary (a cell that is not UTF-8): still URIs
            image_value = bytes(image_value).decode("utf-8", errors="replace")
        data = bytes(image_value) if isinstance(image_value, (bytes, bytearray, memoryview)) else None
        image_uri = image_value.strip() if isinstance(image_value, str) else None
        location = None
        if data is not None:
            # Ids of images held in the manifest derive from their content: row-local, so the resume filter can
            # recompute them from any read block.
            content = f"sha256:{hashlib.sha256(data).hexdigest()}"
            row_id = given_id or derive_id(content, captions)
            source_uri = f"{_manifest_uri(row, spec)}#{name or row_id}"
        else:
            if problem is not None:
                pass
            elif not image_uri:
                what = "image bytes" if spec.image_bytes else "image URI"
                problem = f"missing {what} in column {spec.image_column!r}"
            elif _is_relative(image_uri):
                problem = f"image path {image_uri!r} is relative; the manifest must hold absolute paths or URIs"
            else:
                location = parse_uri(image_uri)
            if given_id is not None:
                row_id = given_id
            elif image_uri:
                row_id = derive_id(image_uri, captions)
            else:
                row_id = derive_id_from_row(row)
            source_uri = image_uri or None
            if source_uri is None and spec.image_bytes:
                source_uri = f"{_manifest_uri(row, spec)}#{name or row_id}"  # the row, for an error without an image
        records.ids.append(row_id)
        records.source_uris.append(source_uri)
        records.image_bytes.append(data)
        records.image_locations.append(location)
        records.caption_locations.append(None)
        records.captions.append(captions)
        records.problems.append(problem)
    names = table.column_names if table is not None else (list(rows[0]) if rows else [])
    keep = output_names(names, spec)
    if table is not None:
        columns = {renamed: table.column(name) for name, renamed in keep}
        records.passthrough = pa.table(columns) if columns else None
    else:
        records.passthrough = pa.Table.from_pylist([{renamed: row.get(name) for name, renamed in keep} for row in rows])
    return records


def _manifest_uri(row: dict[str, Any], spec: SourceSpec) -> str:
    """The manifest file a row was read from, or the input URI where the reader did not record the file."""
    source_file = row.get(spec.file_column) if spec.file_column else None
    return to_uri(spec.protocol, source_file) if source_file else spec.input_uri


def _describe_images(rows: list[dict[str, Any]], spec: SourceSpec) -> SourceRecords:
    records = SourceRecords()
    for row in rows:
        path = row["path"]
        source_uri = to_uri(spec.protocol, path)
        stem = path.rsplit(".", 1)[0]
        records.ids.append(derive_id(source_uri))
        records.source_uris.append(source_uri)
        records.image_bytes.append(row["bytes"])
        records.image_locations.append(None)
        records.caption_locations.append(Location(spec.protocol, f"{stem}.{CAPTION_SIDECAR_EXTENSION}"))
        records.captions.append(None)
        records.problems.append(None)
    return records


def _describe_webdataset(rows: list[dict[str, Any]], spec: SourceSpec) -> SourceRecords:
    records = SourceRecords()
    metadata: list[str | None] = []
    for row in rows:
        metadata.append(_json_member_text(row))
        key = str(row.get("__key__"))
        source_uri = f"{to_uri(spec.protocol, str(row.get('__url__')))}#{key}"
        image = next((row[ext] for ext in _member_names(row, IMAGE_EXTENSIONS) if _present(row[ext])), None)
        captions, problem = _webdataset_captions(row, spec)
        if image is None and problem is None:
            members = sorted(k for k in row if not k.startswith("__") and _present(row[k]))
            problem = f"no image member in sample {key!r} (members: {members})"
        records.ids.append(derive_id(source_uri))
        records.source_uris.append(source_uri)
        records.image_bytes.append(image)
        records.image_locations.append(None)
        records.caption_locations.append(None)
        records.captions.append(captions)
        records.problems.append(problem)
    # One string column whatever the members hold: their keys and value types vary from sample to sample, and
    # per-key columns would give each written file its own schema.
    records.passthrough = pa.table({schema.WEBDATASET_JSON: pa.array(metadata, pa.string())})
    return records


def _json_member_text(row: dict[str, Any]) -> str | None:
    """The sample's `.json` member as text, exactly as stored (None when the sample has none)."""
    member = next((row[name] for name in _member_names(row, ("json",)) if _present(row[name])), None)
    if member is None:
        return None
    if isinstance(member, (bytes, bytearray, memoryview)):
        return bytes(member).decode("utf-8", errors="replace")
    return member if isinstance(member, str) else json.dumps(member)


def _member_names(row: dict[str, Any], extensions: Iterable[str]) -> list[str]:
    wanted = set(extensions)
    return [name for name in row if name.lower() in wanted]


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and value != value)


def _webdataset_captions(row: dict[str, Any], spec: SourceSpec) -> tuple[list[str] | None, str | None]:
    for name in _member_names(row, WEBDATASET_TEXT_MEMBERS):
        if _present(row[name]):
            text = row[name].decode("utf-8", errors="replace") if isinstance(row[name], bytes) else str(row[name])
            return clean_captions([text]), None
    member = next((row[name] for name in _member_names(row, ("json",)) if _present(row[name])), None)
    if member is None:
        return None, None
    try:
        document = json.loads(member) if isinstance(member, (bytes, str)) else member
    except ValueError as exc:
        return None, f"unreadable .json member: {exc}"
    if not isinstance(document, dict):
        return None, None
    if spec.captions_column and spec.captions_column in document:
        return clean_captions(document[spec.captions_column], parse_json_list=True), None
    if spec.caption_column and spec.caption_column in document:
        captions = clean_captions(document[spec.caption_column])
        if captions is not None and len(captions) > 1 and not spec.multi_caption:
            return None, f"json key {spec.caption_column!r} holds several captions; set input.captions_column"
        return captions, None
    return None, None


def _row_captions(row: dict[str, Any], spec: SourceSpec) -> tuple[list[str] | None, str | None]:
    if spec.captions_column:
        return clean_captions(row.get(spec.captions_column), parse_json_list=True), None
    if spec.caption_column:
        captions = clean_captions(row.get(spec.caption_column))
        if captions is not None and len(captions) > 1:
            return None, (
                f"column {spec.caption_column!r} holds several captions; name it in input.captions_column instead"
            )
        return captions, None
    return None, None


def clean_captions(value: Any, *, parse_json_list: bool = False) -> list[str] | None:
    """Captions as a non-empty list of non-blank strings, or None: blank and missing captions are no caption."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        stripped = value.strip()
        if parse_json_list and stripped.startswith("[") and stripped.endswith("]"):
            # A list serialized into a CSV cell.
            try:
                parsed = json.loads(stripped)
            except ValueError:
                parsed = None
            if isinstance(parsed, list):
                return clean_captions(parsed)
        return [stripped] if stripped else None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        captions = [str(c).strip() for c in value if c is not None and str(c).strip()]
        return captions or None
    text = str(value).strip()
    return [text] if text else None


def _is_relative(uri: str) -> bool:
    return "://" not in uri and not uri.startswith("/") and not uri.startswith("~")
