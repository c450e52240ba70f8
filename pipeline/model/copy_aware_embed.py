"""The model actor of an incremental run: rows marked as copies skip the image model, captions are still encoded.

`pipeline.run.row_selection.check_prepared` marks a row whose image bytes were seen before (earlier in this run, or in
an `ok` row of the dataset) in the column `__image_copy`. Such a row needs no image forward pass: the commit copies
the image features of the row it repeats (`pipeline.dataset.copies`). Its caption may differ from that row's, so
the text encoder still runs for it. The marker column passes through to the staged files and is dropped there.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.dataset.copies import COPY_COLUMN
from pipeline.model.embed import EmbedWorker


class CopyAwareEmbedWorker(EmbedWorker):
    """`counter` (a `row_selection.SelectionCounter`, set on a subclass per run): it receives the number of rows each
    batch sends through the image model (`model_image_rows`), counted here where the forward pass happens."""

    counter: Any = None
    _copies: np.ndarray | None = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        if COPY_COLUMN in batch.column_names:
            self._copies = np.asarray([value is not None for value in batch.column(COPY_COLUMN).to_pylist()])
        else:
            self._copies = None
        try:
            return super().__call__(batch)
        finally:
            self._copies = None

    def _image_columns(self, pixels: pa.ChunkedArray, ok: np.ndarray) -> tuple[dict[str, pa.Array], Any]:
        if self._copies is not None and self._copies.any():
            ok = ok & ~self._copies  # null image features here; the commit fills them from the repeated row
        if self.counter is not None and ok.any():
            import ray

            ray.get(self.counter.add.remote({"model_image_rows": int(ok.sum())}))
        return super()._image_columns(pixels, ok)
