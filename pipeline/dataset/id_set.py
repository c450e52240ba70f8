"""The ids a dataset already holds, with each row's status, image digest and file: read without the features.

Only three narrow columns are read (`id`, `status`, `image_sha256`), column chunk by column chunk, from every
data file a plain glob would see (`**/*.parquet` outside `_` and `.` directories), so the cost is a few bytes per
row whatever features the dataset stores. The result is sorted by id for binary search, both in the driver and in
the filter tasks that receive it.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.dataset import schema
from pipeline.dataset.markers import data_files
from pipeline.storage import Location, arrow_filesystem

STATUS_CODES = {schema.STATUS_OK: 0, schema.STATUS_ERROR: 1}
OK, ERROR = 0, 1


@dataclass(frozen=True)
class IdSet:
    ids: np.ndarray  # object array of str, sorted
    status: np.ndarray  # int8: OK / ERROR (aligned with ids)
    sha256: np.ndarray  # object array: the image digest, None where unknown
    file_index: np.ndarray  # int32: index into `files`
    files: tuple[str, ...]  # data files, relative to the dataset root

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def empty(cls) -> IdSet:
        return cls(
            np.empty(0, dtype=object), np.empty(0, np.int8), np.empty(0, dtype=object), np.empty(0, np.int32), ()
        )

    def positions(self, ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """(present mask, position in this set) for each of `ids` (positions are meaningless where absent)."""
        query = np.asarray(ids, dtype=object)
        if len(self.ids) == 0 or len(query) == 0:
            return np.zeros(len(query), dtype=bool), np.zeros(len(query), dtype=np.int64)
        position = np.searchsorted(self.ids, query)
        inside = position < len(self.ids)
        present = np.zeros(len(query), dtype=bool)
        present[inside] = self.ids[position[inside]] == query[inside]
        return present, np.minimum(position, len(self.ids) - 1)

    def lookup(self, ids: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(present, status, digest) for each of `ids`; status -1 and digest None where absent."""
        present, position = self.positions(ids)
        status = np.full(len(present), -1, dtype=np.int8)
        digest = np.full(len(present), None, dtype=object)
        status[present] = self.status[position[present]]
        digest[present] = self.sha256[position[present]]
        return present, status, digest

    def count(self, status: int) -> int:
        return int((self.status == status).sum())


def read_id_set(output: Location, storage_options: dict[str, Any] | None = None) -> IdSet:
    files = data_files(output, storage_options)
    if not files:
        return IdSet.empty()
    filesystem = arrow_filesystem(output.protocol, storage_options)
    ids, status, digests, owners = [], [], [], []
    wanted = [schema.ID, schema.STATUS, schema.IMAGE_SHA256]
    for index, path in enumerate(files):
        with filesystem.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            names = set(parquet.schema_arrow.names)
            table = parquet.read(columns=[name for name in wanted if name in names])
        ids.append(table.column(schema.ID).cast(pa.string()).to_numpy(zero_copy_only=False))
        status.append(
            np.array([STATUS_CODES.get(value, ERROR) for value in table.column(schema.STATUS).to_pylist()], np.int8)
        )
        if schema.IMAGE_SHA256 in table.column_names:
            digests.append(table.column(schema.IMAGE_SHA256).to_numpy(zero_copy_only=False))
        else:
            digests.append(np.full(table.num_rows, None, dtype=object))
        owners.append(np.full(table.num_rows, index, dtype=np.int32))
    all_ids = np.concatenate(ids).astype(object)
    order = np.argsort(all_ids, kind="stable")
    root = output.path.rstrip("/") + "/"
    return IdSet(
        ids=all_ids[order],
        status=np.concatenate(status)[order],
        sha256=np.concatenate(digests).astype(object)[order],
        file_index=np.concatenate(owners)[order],
        files=tuple(path[len(root) :] if path.startswith(root) else posixpath.basename(path) for path in files),
    )


def repeated_ids(id_set: IdSet) -> list[str]:
    """Ids present more than once (a dataset written by hand, or by two writers without the lease)."""
    if len(id_set.ids) < 2:
        return []
    same = id_set.ids[1:] == id_set.ids[:-1]
    return sorted(set(id_set.ids[1:][same].tolist()))
