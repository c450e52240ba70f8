"""Which input rows a run sends on: a Ray Data stage before the CPU stage, a step at the end of its task, and counts.

Before the CPU stage (`select_rows`), each read row's id is computed exactly as the pipeline computes it and
looked up in the dataset's id set (shipped once through the object store, sorted, searched in NumPy): a new id is
kept when the run adds new rows, an `error` id when it retries errors, an `ok` id when it refreshes changed images;
everything else is dropped before any image is fetched. At the end of the CPU stage's task (`check_prepared`), a
refreshed row whose image digest is unchanged is dropped before the model. The rows left with status `ok` are what
the model stage embeds; they are counted here on their way in (`sent_to_model`) and again by the model actor
itself, where the image forward pass runs (`model_image_rows`, what summaries report as computed).

A plain run (no dataset to join) uses the second step alone (`start_copy_marking`): it marks the rows that repeat
an image seen earlier in the run, so that every run, not only incremental ones, computes each distinct image once.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipeline.dataset import schema
from pipeline.dataset.copies import COPY_COLUMN, COPY_FROM_DATASET, COPY_IN_RUN
from pipeline.dataset.id_set import ERROR, OK, IdSet
from pipeline.input.sources import SourceSpec, block_ids

if TYPE_CHECKING:
    import pandas as pd

_KNOWN_CACHE: dict[str, IdSet] = {}  # per worker process: the id set, fetched once per run
_OK_DIGESTS_CACHE: dict[str, np.ndarray] = {}  # ... and the sorted digests of its ok rows


class SelectionCounter:
    """What the selection stages report to (each report awaited, so the driver's final read is whole)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, counts: dict[str, int]) -> None:
        self.counts.update({key: value for key, value in counts.items() if value})

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


@dataclass(frozen=True)
class RowSelection:
    source: SourceSpec
    known: Any  # ObjectRef of the dataset's IdSet (ids, status, digests)
    counter: Any  # the hosted SelectionCounter (`pipeline.run.hosted`)
    new_rows: bool = True  # add ids the dataset does not hold
    retry_errors: bool = False  # re-embed ids whose row is an error
    refresh_changed: bool = False  # re-hash ok rows, re-embed those whose image changed
    claims: Any = None  # the hosted ContentClaims: rows repeating an image computed in this run are copies
    filter_by_id: bool = True  # False for a plain run: every read row goes on, only copies are marked


class ContentClaims:
    """The image digests seen so far in a run: the first row with a digest is computed, later ones are copies."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def claim(self, digests: list[str]) -> list[bool]:
        first = []
        for digest in digests:
            first.append(digest not in self.seen)
            self.seen.add(digest)
        return first


def start_selection(
    source: SourceSpec, id_set: IdSet, *, new_rows: bool, retry_errors: bool, refresh_changed: bool
) -> RowSelection:
    import ray

    from pipeline.run.hosted import hosted

    counter = hosted(SelectionCounter)
    claims = hosted(ContentClaims)
    slim = IdSet(id_set.ids, id_set.status, id_set.sha256, np.empty(0, np.int32), ())
    return RowSelection(source, ray.put(slim), counter, new_rows, retry_errors, refresh_changed, claims)


def start_copy_marking(source: SourceSpec) -> RowSelection:
    """The selection of a plain run: no row is dropped; rows repeating an image of the run are marked as copies."""
    selection = start_selection(source, IdSet.empty(), new_rows=True, retry_errors=False, refresh_changed=False)
    return dataclasses.replace(selection, filter_by_id=False)


def stop_selection(selection: RowSelection) -> None:
    """Release the selection's hosted objects (the run's digests live in one of them) once its counts are read."""
    from pipeline.run.hosted import release

    release(selection.claims)
    release(selection.counter)


def selection_counts(selection: RowSelection) -> dict[str, int]:
    import ray

    return ray.get(selection.counter.snapshot.remote())


def _known(selection: RowSelection) -> IdSet:
    import ray

    key = selection.known.hex()
    if key not in _KNOWN_CACHE:
        _KNOWN_CACHE.clear()
        _KNOWN_CACHE[key] = ray.get(selection.known)
    return _KNOWN_CACHE[key]


def _report(selection: RowSelection, counts: dict[str, int]) -> None:
    import ray

    ray.get(selection.counter.add.remote({key: int(value) for key, value in counts.items()}))


def select_rows(block: pa.Table | pd.DataFrame, selection: RowSelection) -> pa.Table | pd.DataFrame:
    """The rows of one read block the run embeds (same columns, a subset of the rows, order kept)."""
    if len(block) == 0:
        return block
    known = _known(selection)
    present, status, _ = known.lookup(block_ids(block, selection.source))
    new = ~present & selection.new_rows
    retry = present & (status == ERROR) & selection.retry_errors
    refresh = present & (status == OK) & selection.refresh_changed
    keep = new | retry | refresh
    _report(
        selection,
        {
            "selected_new": new.sum(),
            "selected_retry": retry.sum(),
            "selected_refresh": refresh.sum(),
            "skipped_present": (present & ~keep).sum(),
            "skipped_new": (~present & ~keep).sum(),  # retry / refresh alone: new ids wait for an incremental run
        },
    )
    if isinstance(block, pa.Table):
        return block.filter(pa.array(keep))
    return block[keep].reset_index(drop=True)


def check_prepared(table: pa.Table, selection: RowSelection) -> pa.Table:
    """Drop refreshed rows whose image is unchanged (or unreadable now: the stored row stays); count the rest."""
    drop = np.zeros(table.num_rows, dtype=bool)
    counts: dict[str, int] = {}
    if selection.refresh_changed and table.num_rows:
        known = _known(selection)
        ids = table.column(schema.ID).cast(pa.string()).to_numpy(zero_copy_only=False)
        present, status, known_digests = known.lookup(ids)
        refreshed = present & (status == OK)
        digests = np.asarray(table.column(schema.IMAGE_SHA256).to_pylist(), dtype=object)
        ok = np.asarray([s == schema.STATUS_OK for s in table.column(schema.STATUS).to_pylist()], dtype=bool)
        unchanged = refreshed & ok & (digests == known_digests)
        unreadable = refreshed & ~ok
        drop = unchanged | unreadable
        counts["refresh_unchanged"] = int(unchanged.sum())
        counts["refresh_unreadable"] = int(unreadable.sum())
        counts["refresh_changed"] = int((refreshed & ~drop).sum())
    kept = table.filter(pa.array(~drop)) if drop.any() else table
    ok = np.asarray([s == schema.STATUS_OK for s in kept.column(schema.STATUS).to_pylist()], dtype=bool)
    copies = _mark_copies(kept, ok, selection)
    counts["sent_to_model"] = int((ok & (copies == None)).sum())  # noqa: E711 (element-wise)
    counts["copied_in_run"] = int((copies == COPY_IN_RUN).sum())
    counts["copied_from_dataset"] = int((copies == COPY_FROM_DATASET).sum())
    counts["copied"] = counts["copied_in_run"] + counts["copied_from_dataset"]
    counts["failed_before_model"] = int((~ok).sum())
    _report(selection, counts)
    return kept.append_column(COPY_COLUMN, pa.array(copies.tolist(), pa.string()))


def _mark_copies(table: pa.Table, ok: np.ndarray, selection: RowSelection) -> np.ndarray:
    """Per row: None (the model computes it), COPY_FROM_DATASET or COPY_IN_RUN (its image was seen before)."""
    copies = np.full(table.num_rows, None, dtype=object)
    if selection.claims is None or not ok.any():
        return copies
    import ray

    digests = np.asarray(table.column(schema.IMAGE_SHA256).to_pylist(), dtype=object)
    ok_digests = _ok_digests(selection)
    in_dataset = np.zeros(len(ok), dtype=bool)
    if len(ok_digests):
        position = np.minimum(np.searchsorted(ok_digests, digests[ok]), len(ok_digests) - 1)
        in_dataset[ok] = ok_digests[position] == digests[ok]
    copies[in_dataset] = COPY_FROM_DATASET
    rest = np.flatnonzero(ok & ~in_dataset)
    if len(rest):
        first = ray.get(selection.claims.claim.remote(digests[rest].tolist()))
        copies[rest[~np.asarray(first, dtype=bool)]] = COPY_IN_RUN
    return copies


def _ok_digests(selection: RowSelection) -> np.ndarray:
    key = selection.known.hex()
    if key not in _OK_DIGESTS_CACHE:
        known = _known(selection)
        digests = known.sha256[(known.status == OK) & (known.sha256 != None)]  # noqa: E711 (element-wise)
        _OK_DIGESTS_CACHE.clear()
        _OK_DIGESTS_CACHE[key] = np.unique(digests.astype(str)).astype(object)
    return _OK_DIGESTS_CACHE[key]


def select_before_prepare(dataset: Any, selection: RowSelection) -> Any:
    """`dataset` (as read) with only the selected rows, before any image is fetched."""
    return dataset.map_batches(
        select_rows,
        fn_kwargs={"selection": selection},
        batch_size=None,  # whole read blocks: the lookup is vectorized
        batch_format="pandas" if selection.source.format == "webdataset" else "pyarrow",
        udf_modifying_row_count=True,
    )


def prepare_and_check(block: pa.Table | pd.DataFrame, settings: Any, selection: RowSelection) -> pa.Table:
    """The CPU stage's task with `check_prepared` in it: fetched, decoded and marked in one task.

    A stage of its own would be one more kind of CPU task per block: on a small cluster, where the model actor and
    a hung fetch each hold a CPU, the rows finished meanwhile waited for a free CPU to pass that stage.
    """
    from pipeline.input.records import prepare_batch

    return check_prepared(prepare_batch(block, settings), selection)
