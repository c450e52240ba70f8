"""Refuse an input whose rows would share an id, in the driver, before Ray starts.

An id names one output row, and resume skips rows by id: two input rows with one id would be written twice, or
the second would be skipped as already done. So duplicates are refused up front (the jobs layer turns the
`ValueError` into exit code 2), never suffixed: a suffixed id would not match the user's own id any more.

What is read: a manifest with an id column, only that column (Parquet reads just its column chunks); a manifest of
image URIs without ids, the image and caption columns the ids derive from. Not checked up front: ids derived
from image bytes held in the manifest (that would mean reading every image in the driver): after such a run the
id column of the output is counted and repeated ids are reported (`report_repeated_content_ids`). Not checked at
all: the `images` / `webdataset` formats, whose ids derive from distinct file names and sample keys.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import pyarrow.compute as pc

from pipeline.config import JobConfig
from pipeline.dataset import schema
from pipeline.input.ids import id_to_string
from pipeline.input.manifest_layout import ManifestLayout, read_columns
from pipeline.input.sources import SourceSpec, caption_columns, describe_block, input_protocol, input_uris, plan_source
from pipeline.storage import Location, arrow_filesystem

logger = logging.getLogger(__name__)

NAMED = 3  # duplicates named in the message


def check_unique_ids(config: JobConfig, layout: ManifestLayout | None = None) -> None:
    """Raise ValueError naming a few duplicate ids and what to change; the whole check for one job config.

    `layout`: the manifest's, when the caller has read it already."""
    uris = input_uris(config.input.uri)
    storage_options = config.storage_options()
    spec = SourceSpec.from_config(config.input, input_protocol(uris))
    try:
        spec, layout = plan_source(spec, uris, storage_options, layout)
    except OSError:
        return  # a missing or unreadable input is reported by the input checks, with their own message
    check_layout_ids(spec, layout, storage_options)


def check_layout_ids(spec: SourceSpec, layout: ManifestLayout | None, storage_options: dict[str, Any] | None) -> None:
    if layout is None:
        return
    filesystem = arrow_filesystem(spec.protocol, storage_options)
    if spec.id_column and spec.id_column in layout.column_names:
        ids = read_columns(layout, [spec.id_column], filesystem).column(spec.id_column)
        counts = pc.value_counts(ids.drop_null()).to_pylist()  # rows without an id derive theirs from the image
        repeated = [id_to_string(item["values"]) for item in counts if item["counts"] > 1]
        if repeated:
            raise ValueError(
                f"{len(repeated)} ids occur more than once in the manifest's column {spec.id_column!r}: "
                f"{_examples(repeated)}; each id names one output row. Make them unique, or choose another id "
                "column with --id-column (input.id_column)"
            )
        return
    if spec.image_bytes or spec.image_column not in layout.column_names:
        return  # content-derived ids; or a missing image column, which the column checks report
    columns = [c for c in (spec.image_column, spec.caption_column, spec.captions_column) if c]
    records = describe_block(read_columns(layout, columns, filesystem, caption_columns(spec)), spec)
    counts = Counter(records.ids)
    repeated_uris = list(
        dict.fromkeys(
            str(uri) for row_id, uri in zip(records.ids, records.source_uris, strict=True) if counts[row_id] > 1
        )
    )
    if repeated_uris:
        raise ValueError(
            f"{len(repeated_uris)} images are listed more than once with the same caption(s), so their derived ids "
            f"repeat: {_examples(repeated_uris)}. Remove the repeated rows, or give each row an id with --id-column "
            "(input.id_column)"
        )


def ids_derive_from_content(spec: SourceSpec, layout: ManifestLayout | None) -> bool:
    return layout is not None and spec.image_bytes and spec.id_column not in layout.column_names


def report_repeated_content_ids(output: Location, files: list[str], filesystem: Any) -> int:
    """Count ids written more than once (identical image bytes with identical captions); log them. Returns the
    number of repeated ids."""
    from pipeline.dataset.reader import open_dataset

    if not files:
        return 0
    ids = open_dataset(output, files, filesystem).to_table(columns=[schema.ID]).column(schema.ID)
    repeated = [item["values"] for item in pc.value_counts(ids).to_pylist() if item["counts"] > 1]
    if repeated:
        logger.warning(
            "%d ids occur more than once in %s: the manifest holds identical images with identical captions, "
            "which get one content-derived id (%s); give each row an id with --id-column (input.id_column) to keep "
            "them apart",
            len(repeated),
            output.uri,
            _examples(repeated),
        )
    return len(repeated)


def _examples(values: list[str | None]) -> str:
    named = ", ".join(repr(v) for v in values[:NAMED])
    return named + (f" and {len(values) - NAMED} more" if len(values) > NAMED else "")
