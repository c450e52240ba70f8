"""The CPU stage: one read block in, one table of prepared records out (same rows, same order).

Fetches image bytes and sidecar captions, decodes and resizes images, tokenizes captions. A record that cannot be
prepared leaves with status "error" and the reason; the block never fails because of one record.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipeline.dataset import schema
from pipeline.input.decode import decode_image, error_reason
from pipeline.input.sources import SourceRecords, SourceSpec, clean_captions, describe_block
from pipeline.storage import Location, fsspec_filesystem

if TYPE_CHECKING:
    import pandas as pd

FETCH_THREADS = 16  # object stores answer slowly but in parallel


@dataclass(frozen=True)
class PrepareSettings:
    source: SourceSpec
    imgsz: int
    context_length: int
    bpe_path: str | None
    storage_options: dict[str, Any] | None
    partition_by: tuple[str, ...] = ()


def prepare_batch(block: pa.Table | pd.DataFrame, settings: PrepareSettings) -> pa.Table:
    records = describe_block(block, settings.source)
    n = len(records)
    image_bytes, fetch_errors = _fetch_images(records, settings.storage_options)
    captions, caption_errors = _fetch_sidecar_captions(records, settings.storage_options)

    widths: list[int | None] = [None] * n
    heights: list[int | None] = [None] * n
    digests: list[str | None] = [None] * n
    pixels: list[bytes | None] = [None] * n
    errors: list[str | None] = [None] * n
    for i in range(n):
        error = records.problems[i] or fetch_errors[i] or caption_errors[i]
        if error is None:
            decoded = decode_image(image_bytes[i], settings.imgsz, records.source_uris[i])
            widths[i], heights[i], digests[i], error = decoded.width, decoded.height, decoded.sha256, decoded.error
            pixels[i] = decoded.pixels
        errors[i] = error

    tokens = _tokenize(captions, errors, settings)
    columns: dict[str, pa.Array] = {
        schema.ID: pa.array(records.ids, pa.string()),
        schema.SOURCE_URI: pa.array(records.source_uris, pa.string()),
    }
    table = pa.table(columns)
    if records.passthrough is not None:
        for name in records.passthrough.column_names:
            table = table.append_column(name, records.passthrough.column(name))
    caption_column = settings.source.caption_output_column
    if settings.source.multi_caption:
        caption_values = pa.array(captions, pa.list_(pa.string()))
    else:
        caption_values = pa.array([c[0] if c else None for c in captions], pa.string())
    extra = {
        schema.IMAGE_WIDTH: pa.array(widths, pa.int32()),
        schema.IMAGE_HEIGHT: pa.array(heights, pa.int32()),
        schema.IMAGE_SHA256: pa.array(digests, pa.string()),
        caption_column: caption_values,
        schema.STATUS: pa.array([schema.STATUS_OK if e is None else schema.STATUS_ERROR for e in errors]),
        schema.ERROR: pa.array(errors, pa.string()),
        schema.PIXELS: pa.array(pixels, pa.binary()),
        schema.TOKENS: tokens,
    }
    for name, values in extra.items():
        table = table.append_column(name, values)
    missing = [name for name in settings.partition_by if name not in table.column_names]
    if missing:
        raise ValueError(
            f"output.partition_by names columns the records do not have: {missing}; available: "
            f"{[c for c in table.column_names if not c.startswith('__')]}"
        )
    return table


def _fetch_images(
    records: SourceRecords, storage_options: dict[str, Any] | None
) -> tuple[list[bytes | None], list[str | None]]:
    data = list(records.image_bytes)
    errors: list[str | None] = [None] * len(records)
    wanted = [i for i in range(len(records)) if data[i] is None and records.image_locations[i] is not None]
    fetched = _fetch_many([records.image_locations[i] for i in wanted], storage_options)  # type: ignore[misc]
    for i, result in zip(wanted, fetched, strict=True):
        if isinstance(result, BaseException):
            errors[i] = _describe_fetch_error(records.source_uris[i], result)
        else:
            data[i] = result
    return data, errors


def _fetch_sidecar_captions(
    records: SourceRecords, storage_options: dict[str, Any] | None
) -> tuple[list[list[str] | None], list[str | None]]:
    captions = list(records.captions)
    errors: list[str | None] = [None] * len(records)
    wanted = [i for i in range(len(records)) if records.caption_locations[i] is not None]
    fetched = _fetch_many([records.caption_locations[i] for i in wanted], storage_options)  # type: ignore[misc]
    for i, result in zip(wanted, fetched, strict=True):
        if isinstance(result, FileNotFoundError):
            continue  # no sidecar: a record without a caption, not an error
        if isinstance(result, BaseException):
            location = records.caption_locations[i]
            errors[i] = _describe_fetch_error(location.uri if location else None, result, what="caption")
        else:
            captions[i] = clean_captions(result)
    return captions, errors


def _fetch_many(locations: list[Location], storage_options: dict[str, Any] | None) -> list[bytes | BaseException]:
    """Fetch whole objects concurrently; failures come back as exceptions, one per location.

    `cat_file` per path rather than `cat` on a list: `cat` expands glob characters, and `[` is common in names.
    """
    if not locations:
        return []

    def fetch(location: Location) -> bytes | BaseException:
        try:
            fs = fsspec_filesystem(location.protocol, storage_options)
            # Each filesystem has its own idea of a path (HTTP keeps the scheme, S3 drops it).
            return fs.cat_file(fs._strip_protocol(location.uri))
        except Exception as exc:
            return exc

    if len(locations) == 1:
        return [fetch(locations[0])]
    with ThreadPoolExecutor(max_workers=min(FETCH_THREADS, len(locations))) as pool:
        return list(pool.map(fetch, locations))


def _describe_fetch_error(uri: str | None, exc: BaseException, what: str = "image") -> str:
    if isinstance(exc, FileNotFoundError):
        return f"{what} not found: {uri}"
    return f"cannot read {what} {uri}: {error_reason(exc)}"


@functools.lru_cache(maxsize=4)
def _tokenizer(bpe_path: str | None, context_length: int) -> Any:
    from sam3core import Sam3Tokenizer

    return Sam3Tokenizer(bpe_path=bpe_path, context_length=context_length)


def _tokenize(captions: list[list[str] | None], errors: list[str | None], settings: PrepareSettings) -> pa.Array:
    """Token ids per record: a list of `context_length` ids per caption; null where there is nothing to embed."""
    flat: list[str] = []
    counts: list[int] = []
    for row_captions, error in zip(captions, errors, strict=True):
        count = len(row_captions) if (row_captions and error is None) else 0
        flat.extend(row_captions[:count] if row_captions else [])
        counts.append(count)
    token_type = pa.list_(pa.list_(pa.int32(), settings.context_length))
    if not flat:
        return pa.nulls(len(captions), token_type)
    ids = _tokenizer(settings.bpe_path, settings.context_length).encode_batch(flat).astype(np.int32)
    if ids.shape != (len(flat), settings.context_length):
        raise RuntimeError(f"tokenizer returned shape {ids.shape}, expected {(len(flat), settings.context_length)}")
    values = pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), settings.context_length)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    mask = pa.array([c == 0 for c in counts])
    return pa.ListArray.from_arrays(pa.array(offsets), values, type=token_type, mask=mask)
