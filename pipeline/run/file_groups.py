"""Rows gathered into files per partition before Ray Data writes them: few files, and the first ones early.

Ray Data's writer bundles `min_rows_per_file` rows per write task across ALL partitions, then splits the bundle
by partition value (Ray #59485): with 8 balanced partitions every file holds an eighth of the minimum, and the
first file waits for `min_rows_per_file` rows (minutes at CPU rates). Here one small actor (`PartitionChunks`) keeps
a buffer per partition value; a stateless step in front of the write hands it each embedded block and gets back
the chunks that are ready, each of ONE partition value, so each write task writes one file per chunk.

The rule, per partition value (m = `output.min_rows_per_file`):

- a chunk is ready when its buffer holds at least m rows;
- the partition's FIRST chunk is also ready once its oldest buffered row has waited `first_file_after_s`
  since it left the model (the block's `schema.EMBEDDED_AT_KEY`; checked whenever any block arrives), so a slow
  run shows files early;
- what is left when the input ends is written as the last chunk (`drain`, after the streaming write).

So a partition's files are: a first one (>= 1 row), middle ones (>= m rows each), a last one (>= 1 row). With n
files and R rows, R >= 1 + (n - 2) * m + 1 > (n - 2) * m, so ceil(R / m) >= n - 1: at most
`ceil(R / m) + 1` files per partition per run, whatever the rate, the skew between partitions or the block sizes.

Nothing here is checkpointed until Ray Data writes it: the buffered rows of a run that stops (Ctrl-C, a crash)
are not in the checkpoint, so a resumed run embeds them again; the rows drained at the end are written with the
same two-phase checkpoint as Ray Data's own write tasks. A write task that Ray retries after it handed its block
to the buffer fails the run (see `PartitionChunks.add`), which then resumes without loss. Memory is bounded: at
most about partitions x m rows of embedded output wait in the buffer.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
from ray.data.datasource import FilenameProvider

from pipeline.dataset import schema

# The first file of each partition is written once its oldest row has waited this long, even below
# min_rows_per_file: within a minute of the first batch at any rate (docs/schema.md, "Files per partition").
FIRST_FILE_AFTER_S = 30.0


@dataclass
class _Buffer:
    tables: list[pa.Table] = field(default_factory=list)
    rows: int = 0
    oldest: float = 0.0  # when the first buffered row left the model (wall clock, seconds)
    files: int = 0  # chunks handed out so far


class PartitionChunks:
    """Per-partition buffers and the rule that cuts them into file-sized chunks (no Ray, no I/O: see module)."""

    def __init__(
        self,
        partition_by: list[str],
        min_rows: int,
        first_file_after_s: float = FIRST_FILE_AFTER_S,
        clock: Callable[[], float] = time.time,  # wall clock: compared with the model actors' block times
    ) -> None:
        self.partition_by = list(partition_by)
        self.min_rows = max(1, min_rows)
        self.first_file_after_s = first_file_after_s
        self.clock = clock
        self.buffers: dict[tuple[Any, ...], _Buffer] = {}
        self.rows_in = 0
        self.rows_out = 0
        self.call_keys: set[str] = set()  # a few dozen bytes per embedded block

    def add(self, table: pa.Table, call_key: str | None = None) -> list[pa.Table]:
        """Buffer a block's rows by partition value; return the chunks now ready (one partition value each).

        `call_key` names the call's place in its Ray task. A key seen before means Ray retried a task that had
        handed its block over already: buffering it again would write its rows twice, and the chunks handed to
        the failed attempt may not have been written. The run fails instead (and resumes without loss: no row
        of the buffer or of those chunks is in the checkpoint unless its file was written).
        """
        if call_key is not None:
            if call_key in self.call_keys:
                raise RuntimeError(f"a write task was retried after handing over its rows ({call_key}); resume")
            self.call_keys.add(call_key)
        now = self.clock()
        table, embedded_at = _embedded_at(table)
        # The clock of a partition's first file starts when its rows left the model, not when this step got
        # them: a write scheduled late must not add its delay to the first file's (at most now: clocks differ).
        since = now if embedded_at is None else min(now, embedded_at)
        for key, part in self._split(table):
            buffer = self.buffers.setdefault(key, _Buffer())
            if buffer.rows == 0:
                buffer.oldest = since
            buffer.tables.append(part)
            buffer.rows += part.num_rows
            self.rows_in += part.num_rows
        ready = []
        for buffer in self.buffers.values():
            full = buffer.rows >= self.min_rows
            first_due = buffer.files == 0 and buffer.rows > 0 and now - buffer.oldest >= self.first_file_after_s
            if full or first_due:
                ready.append(self._take(buffer))
        return ready

    def drain(self) -> list[pa.Table]:
        """The last chunk of every partition (the input has ended)."""
        return [self._take(buffer) for buffer in self.buffers.values() if buffer.rows > 0]

    def counts(self) -> tuple[int, int]:
        """(rows received, rows handed out): equal after `drain`."""
        return self.rows_in, self.rows_out

    def _take(self, buffer: _Buffer) -> pa.Table:
        chunk = pa.concat_tables(buffer.tables, promote_options="default").combine_chunks()
        buffer.tables, buffer.rows = [], 0
        buffer.files += 1
        self.rows_out += chunk.num_rows
        return chunk

    def _split(self, table: pa.Table) -> Iterator[tuple[tuple[Any, ...], pa.Table]]:
        if table.num_rows == 0:
            return
        if not self.partition_by:
            yield (), table
            return
        columns = [table.column(name).to_pylist() for name in self.partition_by]
        positions: dict[tuple[Any, ...], list[int]] = {}
        for index, key in enumerate(zip(*columns, strict=True)):
            positions.setdefault(key, []).append(index)
        if len(positions) == 1:
            yield next(iter(positions)), table
            return
        for key, indices in positions.items():
            yield key, table.take(pa.array(indices, pa.int64()))


def _embedded_at(table: pa.Table) -> tuple[pa.Table, float | None]:
    """The block without the model's timestamp (never written), and the timestamp (None: not from the model)."""
    metadata = table.schema.metadata or {}
    raw = metadata.get(schema.EMBEDDED_AT_KEY)
    if raw is None:
        return table, None
    table = table.replace_schema_metadata({k: v for k, v in metadata.items() if k != schema.EMBEDDED_AT_KEY} or None)
    try:
        return table, float(raw)
    except ValueError:
        return table, None


def file_grouper(partition_by: list[str], min_rows: int, first_file_after_s: float) -> Any:
    """The run's buffer, hosted in the driver's small-objects actor (`pipeline.run.hosted`: no CPU reserved)."""
    from pipeline.run.hosted import hosted

    return hosted(PartitionChunks, partition_by, min_rows, first_file_after_s)


def chunks_ready(batch: pa.Table, grouper: Any) -> Iterator[pa.Table]:
    """Ray Data step before the write: one embedded block in, the ready chunks out (often none)."""
    import ray

    yield from ray.get(grouper.add.remote(batch, _call_key()))


_calls_by_task: dict[str, int] = {}


def _call_key() -> str:
    """This call's place in its Ray task: a retried task (same task id) makes the same keys again."""
    import ray

    task = ray.get_runtime_context().get_task_id() or ""
    if task not in _calls_by_task and len(_calls_by_task) > 256:
        _calls_by_task.clear()
    index = _calls_by_task.get(task, 0)
    _calls_by_task[task] = index + 1
    return f"{task}/{index}"


# CPUs a grouping-and-write task reserves. A whole CPU (Ray Data's default) was never granted while reading and
# decoding held the cluster's CPUs (no file after 10 minutes on 2 cores). None at all, with at most two tasks at
# once, cost the run a third of its rate (105.7 against 149.1 rows/s, every row through the model, side by side on
# a quiet 2-core machine: docs/benchmarks.md, "Soak: the write's CPU reservation"). A quarter it stays, and the
# decode tasks reserve three quarters (`pipeline.run.job.PREPARE_CPUS`) so that Ray Data can reserve it while
# input is still being split and decoded. The first-file clock starts when rows leave the model (`_embedded_at`).
WRITE_CPUS = 0.25
# Grouping-and-write tasks at once: None lets Ray Data size the pool by the CPUs (bench/soak.py --write-cpus
# and --write-concurrency try other values).
WRITE_CONCURRENCY: int | None = None


def group_for_files(dataset: Any, grouper: Any) -> Any:
    # The same resources and concurrency as the write (`WRITE_CPUS`), so that Ray Data fuses the two into one task.
    return dataset.map_batches(
        chunks_ready,
        fn_kwargs={"grouper": grouper},
        batch_size=None,  # each embedded block as it comes: no bundling in front of the buffer
        batch_format="pyarrow",
        zero_copy_batch=True,
        num_cpus=WRITE_CPUS,
        concurrency=WRITE_CONCURRENCY,
    )


def tail_prefix() -> str:
    """File name prefix of the chunks drained at the end (their pending checkpoint is named after it)."""
    return f"tail-{uuid.uuid4().hex[:16]}"


class TailNames(FilenameProvider):
    """Ray Data filename provider for the drained chunks: a known prefix, so a pending checkpoint can name them
    before they exist (Ray Data's recovery deletes data files whose name starts with a pending checkpoint's)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"{self.prefix}_{write_uuid}_{task_index:06}"


def write_grouped(
    dataset: Any,
    path: str,
    filesystem: Any,
    partition_by: list[str],
    min_rows_per_file: int,
    compression: str,
    first_file_after_s: float | None = None,
) -> None:
    """Write `dataset` as partitioned Parquet under `path`, files cut by `PartitionChunks` (see module)."""
    import ray

    from pipeline.run.hosted import release

    partition_cols = list(partition_by) or None
    after_s = FIRST_FILE_AFTER_S if first_file_after_s is None else first_file_after_s
    grouper = file_grouper(list(partition_by), min_rows_per_file, after_s)
    try:
        group_for_files(dataset, grouper).write_parquet(
            path,
            filesystem=filesystem,
            partition_cols=partition_cols,
            compression=compression,
            # When every row waits for the last chunks, this write writes none, and Ray Data then deletes the
            # directory it created: harmless on a local disk, an error on an object store, where the "directory"
            # does not exist (and where nothing needs creating before a write).
            try_create_dir=isinstance(filesystem, pafs.LocalFileSystem),
            ray_remote_args={"num_cpus": WRITE_CPUS},
            concurrency=WRITE_CONCURRENCY,
        )
        tail = ray.get(grouper.drain.remote())
        received, handed_out = ray.get(grouper.counts.remote())
    finally:
        release(grouper)
    if received != handed_out:  # cannot happen unless a chunk went missing: never report such a run as done
        raise RuntimeError(f"file grouping lost rows: {received} buffered, {handed_out} handed to the writer")
    if tail:
        _write_tail(tail, path, filesystem, partition_cols, compression)


def _write_tail(
    chunks: list[pa.Table], path: str, filesystem: Any, partition_cols: list[str] | None, compression: str
) -> None:
    """Write the drained chunks with Ray Data's writer, checkpointed like its write tasks: the ids first as a
    pending checkpoint named after the files' prefix, then the files, then the commit (a run stopped in between
    deletes these files when it resumes, and embeds their rows again)."""
    import ray.data
    from ray.data import DataContext

    context = DataContext.get_current()
    config = context.checkpoint_config
    prefix = tail_prefix()
    pending = None
    if config is not None:
        from ray.data.checkpoint.checkpoint_writer import CheckpointWriter

        writer = CheckpointWriter.create(config)
        ids = pa.chunked_array([chunk.column(config.id_column) for chunk in chunks])
        pending = writer.write_pending_checkpoint(ids, checkpoint_id=prefix)
    # Checkpointing is off for this dataset (no read to filter): the pending checkpoint above covers it.
    context.checkpoint_config = None
    try:
        ray.data.from_arrow(chunks).write_parquet(
            path,
            filesystem=filesystem,
            partition_cols=partition_cols,
            compression=compression,
            filename_provider=TailNames(prefix),
        )
    finally:
        context.checkpoint_config = config
    if pending is not None:
        writer.commit_checkpoint(pending)
