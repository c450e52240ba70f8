"""The commit of an incremental run: staged rows join the dataset so that every reader sees each id exactly once.

The run wrote its rows to a staging area outside the dataset (see `pipeline.run.incremental`). The commit turns them
into file operations, each of which a plain glob reader (pyarrow, DuckDB, polars) sees happen at once:

* add: the staged rows whose id is new, as new files in the same partition directories (new names, never reused);
* replace: a data file holding a row that is replaced (a retried error, a changed image) is rewritten whole, under
  its own name, with the new row in place of the old one. The file's set of ids does not change, so at no moment
  does any id appear twice or go missing, whatever a reader globs.

Every new file is first written complete into the staging area. Then the journal (`_incremental/commit.json` under
the dataset root, one write) names every operation: from that moment the run is decided. Applying the operations
copies each prepared file into place (a server-side copy on object stores, a rename locally: atomic per file), then
the commit records the run in `_dataset.json` and `_summary.json` and deletes the journal. A writer that finds a
journal (the driver was killed mid-commit) applies it again first; every step is idempotent. So after a kill the
dataset is as before the run (no journal yet) or is finished into the state after it by the next run.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import signal
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.dataset import schema
from pipeline.dataset.copies import collect_sources, fill_copies
from pipeline.dataset.id_set import IdSet
from pipeline.dataset.identity import ModelIdentity
from pipeline.dataset.markers import data_files
from pipeline.dataset.runs import DatasetRecord, read_record, write_record
from pipeline.storage import Location, arrow_filesystem

logger = logging.getLogger(__name__)

JOURNAL = "_incremental/commit.json"
# Test hook (never set in production): "commit:N" makes the driver SIGKILL itself after applying N file operations
# of a commit, so the tests can kill it at a known point of the commit and check what a rerun makes of it.
KILL_HOOK_ENV = "SAM3_EMBED_TEST_KILL_AT"
_ATTEMPT = re.compile(r"^attempt (\d+): ")


@dataclass(frozen=True)
class FileOp:
    kind: str  # "add" | "replace"
    source: str  # the prepared file, a path on the staging area's filesystem
    target: str  # relative to the dataset root


@dataclass
class CommitJournal:
    commit_id: str
    run_id: str
    staging: str  # URI of the staging area that holds the prepared files
    ops: list[FileOp]
    identity: dict[str, Any]
    run_entry: dict[str, Any]  # appended to `_dataset.json`
    summary: dict[str, Any] = field(default_factory=dict)  # written to `_summary.json`

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str) -> CommitJournal:
        data = json.loads(text)
        data["ops"] = [FileOp(**op) for op in data["ops"]]
        return cls(**data)


@dataclass
class PreparedCommit:
    ops: list[FileOp]
    rows_added: int = 0
    rows_replaced: int = 0
    rows_retried: int = 0  # replaced rows that were errors
    rows_retried_ok: int = 0  # ... and are ok now
    rows_refreshed: int = 0  # replaced rows that were ok (their image changed)
    rows_copied: int = 0  # rows whose image features were copied from a row with the same image
    ok_delta: int = 0  # how the dataset's ok and error counts change when the commit is applied
    error_delta: int = 0


def new_commit_id(run_id: str) -> str:
    return f"{run_id}-{uuid.uuid4().hex[:8]}"


def prepare_commit(
    output: Location,
    staged: Location,
    prepared: Location,
    id_set: IdSet,
    commit_id: str,
    compression: str = "zstd",
) -> PreparedCommit:
    """Write the files the commit will put in place into `prepared` (in the staging area); return the operations.

    `staged`: the run's own output (hive directories as in the dataset). Files are read one at a time and each
    rewritten dataset file once, so memory holds one file plus the replacing rows, never the whole dataset.
    """
    staged_fs = arrow_filesystem(staged.protocol, staged.storage_options)
    output_fs = arrow_filesystem(output.protocol, output.storage_options)
    prepared.remove()
    result = PreparedCommit(ops=[])
    replacing: dict[int, list[pa.Table]] = defaultdict(list)
    staged_root = staged.path.rstrip("/") + "/"
    staged_files = data_files(staged, staged.storage_options)
    sources = collect_sources(staged_files, staged_fs, output, output_fs, id_set)
    for index, path in enumerate(staged_files):
        table, copied = fill_copies(_read(staged_fs, path), sources)
        result.rows_copied += copied
        relative_dir = posixpath.dirname(path[len(staged_root) :])
        ids = table.column(schema.ID).cast(pa.string()).to_numpy(zero_copy_only=False)
        present, position = id_set.positions(ids)
        new_rows = table.filter(pa.array(~present))
        if new_rows.num_rows:
            name = f"{commit_id}-{index:06d}.parquet"
            target = posixpath.join(relative_dir, name) if relative_dir else name
            source = prepared.join("add", target)
            _write(new_rows, source, compression)
            result.ops.append(FileOp("add", source.path, target))
            result.rows_added += new_rows.num_rows
            added_ok = sum(status == schema.STATUS_OK for status in new_rows.column(schema.STATUS).to_pylist())
            result.ok_delta += added_ok
            result.error_delta += new_rows.num_rows - added_ok
        if present.any():
            rows = np.flatnonzero(present)
            owners = id_set.file_index[position[rows]]
            for owner in np.unique(owners):
                replacing[int(owner)].append(table.take(pa.array(rows[owners == owner])))
    for owner, parts in sorted(replacing.items()):
        target = id_set.files[owner]
        old = _read(output_fs, output.join(target).path)
        rewritten, counts = _replace_rows(old, pa.concat_tables(parts, promote_options="permissive"))
        source = prepared.join("replace", target)
        _write(rewritten, source, compression)
        result.ops.append(FileOp("replace", source.path, target))
        result.rows_replaced += counts["replaced"]
        result.rows_retried += counts["retried"]
        result.rows_retried_ok += counts["retried_ok"]
        result.rows_refreshed += counts["refreshed"]
        result.ok_delta += counts["ok_delta"]
        result.error_delta -= counts["ok_delta"]
    return result


def _read(filesystem: Any, path: str) -> pa.Table:
    with filesystem.open_input_file(path) as f:
        return pq.ParquetFile(f).read()


def _write(table: pa.Table, location: Location, compression: str) -> None:
    filesystem = arrow_filesystem(location.protocol, location.storage_options)
    if location.is_local:
        os.makedirs(posixpath.dirname(location.path), exist_ok=True)
    pq.write_table(table, location.path, filesystem=filesystem, compression=compression)


def _replace_rows(old: pa.Table, new: pa.Table) -> tuple[pa.Table, dict[str, int]]:
    """`old` with the rows of `new` in place of the rows with the same ids; error rows count their attempts."""
    old_ids = old.column(schema.ID).cast(pa.string())
    new_ids = new.column(schema.ID).cast(pa.string())
    replaced_mask = pc.is_in(old_ids, value_set=new_ids)
    previous = old.filter(replaced_mask)
    previous_by_id = {
        row_id: (status, error)
        for row_id, status, error in zip(
            previous.column(schema.ID).cast(pa.string()).to_pylist(),
            previous.column(schema.STATUS).to_pylist(),
            previous.column(schema.ERROR).to_pylist(),
            strict=True,
        )
    }
    statuses = new.column(schema.STATUS).to_pylist()
    errors = new.column(schema.ERROR).to_pylist()
    counts = {"replaced": len(statuses), "retried": 0, "retried_ok": 0, "refreshed": 0, "ok_delta": 0}
    for i, row_id in enumerate(new_ids.to_pylist()):
        old_status, old_error = previous_by_id.get(row_id, (None, None))
        counts["ok_delta"] += int(statuses[i] == schema.STATUS_OK) - int(old_status == schema.STATUS_OK)
        if old_status == schema.STATUS_ERROR:
            counts["retried"] += 1
            counts["retried_ok"] += statuses[i] == schema.STATUS_OK
        else:
            counts["refreshed"] += 1
        if statuses[i] == schema.STATUS_ERROR:
            errors[i] = f"attempt {_attempts(old_status, old_error) + 1}: {_strip_attempt(errors[i] or '')}"
    new = new.set_column(new.schema.get_field_index(schema.ERROR), schema.ERROR, pa.array(errors, pa.string()))
    kept = old.filter(pc.invert(replaced_mask))
    aligned = new.select(old.schema.names).cast(old.schema)
    return pa.concat_tables([kept, aligned]), counts


def _attempts(status: str | None, error: str | None) -> int:
    """How many times the row was tried before: an error row counts its attempts in its reason."""
    if status != schema.STATUS_ERROR:
        return 0
    match = _ATTEMPT.match(error or "")
    return int(match.group(1)) if match else 1


def _strip_attempt(error: str) -> str:
    return _ATTEMPT.sub("", error, count=1)


# Applying a journal ---------------------------------------------------------------------------------------------


def journal_location(output: Location) -> Location:
    return output.join(JOURNAL)


def read_journal(output: Location) -> CommitJournal | None:
    try:
        return CommitJournal.from_json(journal_location(output).read_text())
    except FileNotFoundError:
        return None


def write_journal(output: Location, journal: CommitJournal) -> None:
    """The decision: once this one write lands, the commit is finished by whoever comes next."""
    journal_location(output).write_text(journal.to_json())


def apply_journal(output: Location, journal: CommitJournal, storage_options: dict[str, Any] | None) -> None:
    """Put every prepared file in place, mark new directories, record the run, drop the journal. Idempotent."""
    staging = Location.parse(journal.staging, storage_options)
    for done, op in enumerate(journal.ops):
        _place(Location(staging.protocol, op.source, staging.storage_options), output.join(op.target))
        kill_hook("commit", done + 1)
    _mark_new_directories(output, storage_options)
    record = read_record(output) or DatasetRecord(identity=ModelIdentity.from_dict(journal.identity))
    write_record(output, record.with_run(journal.run_entry))
    if journal.summary:
        output.join(schema.SUMMARY_FILE).write_text(json.dumps(journal.summary, indent=2, default=str))
    journal_location(output).remove()
    logger.info("committed run %s: %d file operations in %s", journal.run_id, len(journal.ops), output.uri)


def _place(source: Location, target: Location) -> None:
    """Copy one prepared file into the dataset so that readers see the old file (or none), then the new one."""
    if target.is_local:
        directory = posixpath.dirname(target.path)
        os.makedirs(directory, exist_ok=True)
        temporary = posixpath.join(directory, f".{posixpath.basename(target.path)}.tmp-{uuid.uuid4().hex[:8]}")
        with open(temporary, "wb") as f:
            f.write(source.read_bytes())
        os.replace(temporary, target.path)  # atomic on one filesystem
        return
    if source.protocol == target.protocol:
        target.fs.copy(source.path, target.path)  # a server-side copy: the new object appears whole
    else:
        target.fs.pipe_file(target.path, source.read_bytes())  # one PUT


def _mark_new_directories(output: Location, storage_options: dict[str, Any] | None) -> None:
    """`_SUCCESS` in every data directory that has none yet (never rewriting a backfill's manifest marker)."""
    fs = output.fs
    directories = {posixpath.dirname(path) for path in data_files(output, storage_options)} | {output.path}
    for directory in sorted(directories, key=lambda d: (d == output.path, d)):  # the root last
        marker = posixpath.join(directory, schema.SUCCESS_FILE)
        if not fs.exists(marker):
            fs.pipe_file(marker, b"")


def kill_hook(step: str, count: int) -> None:
    """SIGKILL this process at the `count`-th operation of `step` when KILL_HOOK_ENV says `step:count` (tests
    of what a crash at that moment leaves: the commit here, the copy fill in `copy_fill`)."""
    if os.environ.get(KILL_HOOK_ENV) == f"{step}:{count}":
        logger.warning("test hook %s=%s: killing the driver", KILL_HOOK_ENV, os.environ[KILL_HOOK_ENV])
        os.kill(os.getpid(), signal.SIGKILL)
