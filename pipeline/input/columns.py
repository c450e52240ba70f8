"""A manifest's columns: read its schema cheaply, check the configured columns, recognise the common names.

The schema comes from the first manifest file only: a Parquet footer, or the first 64 KiB of a CSV / TSV / JSON
Lines file. When the job names no image, caption or id column, the first of the names below that the manifest
has (compared without case) is taken, and the choice is logged; a name the job does give must exist. An image or
caption column with one of these names but the wrong kind of values (a `caption` column of numbers) is refused
rather than skipped: skipping it would drop every caption of the run without a word. (An id column of the wrong
kind is skipped with a note: ids are then derived from each row, and nothing is lost.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

# In order of preference. Image bytes before URIs: img2dataset's Parquet holds both `jpg` (the image) and `url`
# (where it came from), and the bytes are what was meant to be embedded.
IMAGE_COLUMN_NAMES = (
    "image",
    "img",
    "jpg",
    "jpeg",
    "png",
    "webp",
    "image_bytes",
    "image_uri",
    "image_url",
    "image_path",
    "url",
    "uri",
    "path",
    "filepath",
    "file_path",
    "file_name",
    "filename",
)
CAPTION_COLUMN_NAMES = ("caption", "text", "alt", "alt_text", "prompt", "description", "sentence")
CAPTIONS_COLUMN_NAMES = ("captions", "texts", "prompts", "sentences")
ID_COLUMN_NAMES = ("id", "key", "uid", "image_id", "sample_id")
EMPTY = "''"  # how a user asks for no caption column on the command line


class ColumnError(ValueError):
    """A configured manifest column that does not exist or holds the wrong kind of values (one line)."""


@dataclass
class ResolvedColumns:
    id_column: str | None
    image_column: str
    caption_column: str | None
    captions_column: str | None
    notes: list[str] = field(default_factory=list)  # what was recognised, for the run's log


def is_image_type(kind: pa.DataType) -> bool:
    """URIs (strings), image bytes (binary) or a Hugging Face image (struct with a `bytes` field)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if pa.types.is_struct(kind):
        return any(kind.field(i).name == "bytes" for i in range(kind.num_fields))
    return (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
        or pa.types.is_null(kind)  # all-null in the sample: decided per row later
    )


def is_text_type(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)


def is_text_list_type(kind: pa.DataType) -> bool:
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return is_text_type(kind.value_type)
    return is_text_type(kind)  # a JSON list serialized into a CSV cell is a string


def resolve_columns(
    schema: pa.Schema,
    *,
    id_column: str | None,
    image_column: str | None,
    caption_column: str | None,
    captions_column: str | None,
) -> ResolvedColumns:
    """The manifest columns to use: the configured ones, checked, or recognised ones where none is configured."""
    present = {name: schema.field(name).type for name in schema.names}
    listing = ", ".join(schema.names)
    notes: list[str] = []

    def check(name: str, flag: str, accepts: Any, kind: str) -> None:
        if name not in present:
            raise ColumnError(
                f"the manifest has no column {name!r} ({flag}); its columns are: {listing}; set {flag} to one of them"
            )
        if not accepts(present[name]):
            raise ColumnError(f"manifest column {name!r} ({flag}) holds {present[name]}, not {kind}")

    by_lower = {name.lower(): name for name in schema.names}

    def recognise(names: tuple[str, ...], accepts: Any) -> str | None:
        for candidate in names:
            actual = by_lower.get(candidate)
            if actual is not None and accepts(present[actual]):
                return actual
        return None

    def refuse_mistyped(names: tuple[str, ...], what: str, flag: str, kind: str, optional: bool) -> None:
        """A column named like one the job needs but holding other values: never dropped without a word."""
        for candidate in names:
            actual = by_lower.get(candidate)
            if actual is not None:
                instead = f", or {flag} {EMPTY} for none" if optional else ""
                raise ColumnError(
                    f"manifest column {actual!r} is named like {what} but holds {present[actual]}, not {kind}; "
                    f"name the column to use with {flag}{instead}"
                )

    image_kind = "image URIs (strings), image bytes (binary) or {bytes, path} structs"
    if image_column:
        check(image_column, "--image-column / input.image_column", is_image_type, image_kind)
    else:
        image_column = recognise(IMAGE_COLUMN_NAMES, is_image_type)
        if image_column is None:
            refuse_mistyped(IMAGE_COLUMN_NAMES, "images", "--image-column", image_kind, optional=False)
            raise ColumnError(
                f"no image column recognised in the manifest (looked for {', '.join(IMAGE_COLUMN_NAMES)}); its "
                f"columns are: {listing}; set --image-column / input.image_column"
            )
        notes.append(f"image column: {image_column!r} (recognised; set --image-column to choose another)")

    if captions_column:
        check(captions_column, "--captions-column / input.captions_column", is_text_list_type, "lists of captions")
        if caption_column:
            raise ColumnError("set either a caption column or a captions column, not both")
        caption_column = None
    elif caption_column:
        check(caption_column, "--caption-column / input.caption_column", is_text_list_type, "captions")
        if not is_text_type(present[caption_column]):
            raise ColumnError(
                f"manifest column {caption_column!r} holds lists of captions: name it with --captions-column "
                "(input.captions_column) instead of --caption-column"
            )
    elif caption_column is None:
        caption_column = recognise(CAPTION_COLUMN_NAMES, is_text_type)
        if caption_column is None:
            captions_column = recognise(CAPTION_COLUMN_NAMES + CAPTIONS_COLUMN_NAMES, is_text_list_type)
        chosen = caption_column or captions_column
        if chosen:
            flag = "--caption-column" if caption_column else "--captions-column"
            what = "caption column" if caption_column else "captions column (several per row)"
            notes.append(f"{what}: {chosen!r} (recognised; set {flag} to choose another)")
        else:
            refuse_mistyped(
                CAPTION_COLUMN_NAMES + CAPTIONS_COLUMN_NAMES,
                "captions",
                "--caption-column",
                "text or lists of text",
                optional=True,
            )
            notes.append(
                f"no caption column recognised (looked for {', '.join(CAPTION_COLUMN_NAMES + CAPTIONS_COLUMN_NAMES)})"
                "; rows get no caption"
            )
    else:
        caption_column = None  # "": no caption wanted

    if id_column:
        check(id_column, "--id-column / input.id_column", lambda kind: True, "ids")
    else:
        id_column = recognise(ID_COLUMN_NAMES, lambda kind: not pa.types.is_nested(kind))
        if id_column is not None and id_column != "id":
            notes.append(f"id column: {id_column!r} (recognised; set --id-column to choose another)")
        if id_column is None:
            notes.append("no id column: ids are derived from each row's image and caption")
    return ResolvedColumns(id_column, image_column, caption_column, captions_column, notes)
