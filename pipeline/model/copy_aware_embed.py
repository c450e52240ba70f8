"""The model actor that runs the image model once per distinct image: copies skip it, captions are still encoded.

`pipeline.run.row_selection.check_prepared` marks a row whose image bytes were seen before (earlier in this run, or in
an `ok` row of the dataset) in the column `__image_copy`. Such a row needs no image forward pass: its image features
are copied from the row it repeats before the run commits (`pipeline.dataset.copies`). Its caption may differ from
that row's, so the text encoder still runs for it. The actor drops the marker column and writes such a row with
status `copy` and null image features, which is how the fill step finds it in the written files.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.dataset import schema
from pipeline.dataset.copies import COPY_COLUMN
from pipeline.model.embed import EmbedWorker
from pipeline.model.settings import EmbedSettings


class CopyAwareEmbedWorker(EmbedWorker):
    """`counter` (a `row_selection.SelectionCounter`, or None) receives the number of rows each batch sends through
    the image model (`model_image_rows`), counted here where the forward pass happens."""

    _copies: np.ndarray | None = None

    def __init__(self, settings: EmbedSettings, progress: Any = None, counter: Any = None) -> None:
        self.counter = counter
        super().__init__(settings, progress)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if COPY_COLUMN not in batch.column_names:
            self._copies = None
            return super().__call__(batch)
        self._copies = np.asarray(pc.is_valid(batch.column(COPY_COLUMN)).to_numpy(zero_copy_only=False), dtype=bool)
        try:
            out = super().__call__(batch.drop_columns([COPY_COLUMN]))
        finally:
            copies, self._copies = self._copies, None
        if not copies.any():
            return out
        status = np.asarray(out.column(schema.STATUS).to_pylist(), dtype=object)
        waiting = copies & (status == schema.STATUS_OK)  # a copy whose caption failed stays an error row
        status[waiting] = schema.STATUS_COPY
        index = out.schema.get_field_index(schema.STATUS)
        return out.set_column(index, schema.STATUS, pa.array(status.tolist(), pa.string()))

    def _image_columns(self, pixels: pa.ChunkedArray, ok: np.ndarray) -> tuple[dict[str, pa.Array], Any]:
        if self._copies is not None and self._copies.any():
            ok = ok & ~self._copies  # null image features here; filled from the repeated row before the commit
        if self.counter is not None and ok.any():
            import ray

            ray.get(self.counter.add.remote({"model_image_rows": int(ok.sum())}))
        return super()._image_columns(pixels, ok)
