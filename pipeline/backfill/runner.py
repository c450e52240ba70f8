"""The backfill protocol: for each partition, skip it if committed, lease it, stage it, commit it.

Per partition, in order:
1. `<out>/date=X/_SUCCESS` exists: skipped (unless overwriting).
2. Lease `<out>/_locks/date=X/`; another live holder: busy, left to that holder.
3. Under the lease (renewed in the background), check the marker again: a concurrent run may have committed
   between 1 and 2.
4. Stage: run the pipeline on the partition's input into `<out>/_staging/date=X/data/`, resuming a previous
   attempt's leftovers when they were made with the same settings.
5. Commit: copy into `<out>/date=X/`, confirm the lease is still ours, write `_SUCCESS` last; drop the staging.
A failure in one partition is recorded and the loop goes on; the next backfill call retries that partition.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.backfill.commit import commit_partition, read_manifest, refresh_manifest
from pipeline.backfill.lease import DEFAULT_TTL_S, PartitionLease
from pipeline.backfill.partitions import Partition, partition_input
from pipeline.backfill.staging import StagingArea, StagingState, config_fingerprint
from pipeline.config import JobConfig
from pipeline.run.outcome import Outcome, error_fraction, within_budget
from pipeline.run.run_summary import summary_counts, summary_to_dict
from pipeline.storage import Location

logger = logging.getLogger(__name__)

LOCKS_DIR = "_locks"

Status = Literal["committed", "skipped", "busy", "failed", "pending"]
RunPipeline = Callable[[JobConfig], Any]


@dataclass
class PartitionResult:
    partition: str
    status: Status
    rows: int | None = None
    error_rows: int | None = None
    error_fraction: float | None = None  # error rows / rows of the partition's run
    files: int | None = None
    seconds: float = 0.0
    message: str = ""


@dataclass
class BackfillReport:
    run_id: str
    output: str
    column: str
    started_at: float
    finished_at: float = 0.0
    overwrite: bool = False
    max_error_fraction: float = 0.05  # output.max_error_fraction: the error budget of each partition
    results: list[PartitionResult] = field(default_factory=list)

    def by_status(self, status: Status) -> list[PartitionResult]:
        return [result for result in self.results if result.status == status]

    def over_budget(self) -> list[PartitionResult]:
        """Partitions committed with a share of error rows above the budget (the same rule as a single run)."""
        return [
            result
            for result in self.by_status("committed")
            if not within_budget(result.rows, result.error_rows, self.max_error_fraction)
        ]

    def outcome(self) -> Outcome:
        if self.by_status("failed"):
            return Outcome.FAILED
        if self.by_status("busy"):
            return Outcome.PARTITIONS_BUSY
        if self.over_budget():
            return Outcome.ERROR_ROWS_OVER_BUDGET
        return Outcome.OK

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["outcome"] = self.outcome().value
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)


@dataclass
class BackfillOptions:
    column: str
    values: list[str]
    overwrite: bool = False
    lease_ttl_s: float = DEFAULT_TTL_S
    incremental: bool = False  # a committed partition gets its new rows (pipeline.run.incremental), not skipped


class Backfill:
    """Runs the protocol for one job config over a list of partitions of one column."""

    def __init__(
        self,
        config: JobConfig,
        options: BackfillOptions,
        run_pipeline: RunPipeline,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not config.output.uri:
            raise ValueError("the job config has no output.uri")
        if not config.input.uri:
            raise ValueError("the job config has no input.uri")
        if options.column in config.output.partition_by:
            raise ValueError(
                f"output.partition_by must not contain the backfill column {options.column!r}: "
                "the backfill writes one directory per partition itself"
            )
        self.config = config
        self.options = options
        self.run_pipeline = run_pipeline
        self._clock = clock
        storage_options = config.storage_options()
        self.output = Location.parse(config.output.uri, storage_options)
        self.resume_root = Location.parse(config.resume_path, storage_options) if config.resume_path else None
        self.partitions = [Partition(options.column, value) for value in options.values]

    def run(self) -> BackfillReport:
        report = BackfillReport(
            run_id=self.config.run_id,
            output=self.output.uri,
            column=self.options.column,
            started_at=self._clock(),
            overwrite=self.options.overwrite,
            max_error_fraction=self.config.output.max_error_fraction,
        )
        for partition in self.partitions:
            began = time.monotonic()
            result = self._process(partition, report.started_at)
            result.seconds = round(time.monotonic() - began, 3)
            report.results.append(result)
            _log_result(result)
        self._settle_busy(report)
        report.finished_at = self._clock()
        return report

    def state(self) -> list[PartitionResult]:
        """What a run would find, without running anything (for --dry-run)."""
        results = []
        for partition in self.partitions:
            manifest = read_manifest(self.output.join(partition.dirname))
            if manifest is not None and not self.options.incremental:
                results.append(PartitionResult(partition.value, "skipped", rows=manifest.rows, message="committed"))
                continue
            current = PartitionLease(self._lease_dir(partition), ttl_s=self.options.lease_ttl_s).current()
            if current is not None and current.is_live(self._clock()):
                results.append(PartitionResult(partition.value, "busy", message=f"leased by {current.owner}"))
            else:
                results.append(PartitionResult(partition.value, "pending", message="to do"))
        return results

    def _process(self, partition: Partition, started_at: float) -> PartitionResult:
        final = self.output.join(partition.dirname)
        try:
            if not (self.options.overwrite or self.options.incremental) and read_manifest(final) is not None:
                return PartitionResult(partition.value, "skipped", message="already committed")
            lease = PartitionLease(
                self._lease_dir(partition),
                ttl_s=self.options.lease_ttl_s,
                owner=f"{self.config.run_id}@{_host_and_pid()}",
                clock=self._clock,
            )
            if not lease.try_acquire():
                holder = lease.current()
                return PartitionResult(
                    partition.value, "busy", message=f"leased by {holder.owner if holder else 'another run'}"
                )
            try:
                with lease.keep_alive():
                    return self._process_leased(partition, final, lease, started_at)
            finally:
                lease.release()
        except Exception as error:
            logger.error("partition %s failed:\n%s", partition.dirname, traceback.format_exc())
            return PartitionResult(partition.value, "failed", message=f"{type(error).__name__}: {error}")

    def _process_leased(
        self, partition: Partition, final: Location, lease: PartitionLease, started_at: float
    ) -> PartitionResult:
        existing = read_manifest(final)
        if existing is not None and self.options.incremental and not self.options.overwrite:
            if existing.committed_at >= started_at:
                return PartitionResult(
                    partition.value, "skipped", rows=existing.rows, message="extended by another run"
                )
            return self._extend_committed(partition, final, lease)
        if existing is not None and (not self.options.overwrite or existing.committed_at >= started_at):
            # Committed by another backfill between our first look and the lease (or, when overwriting,
            # already redone by a concurrent overwrite that started after us).
            return PartitionResult(partition.value, "skipped", rows=existing.rows, message="committed by another run")
        config = self._partition_config(partition)
        area = StagingArea.for_partition(self.output, partition.dirname, self.resume_root)
        config.output.uri = area.data.uri
        config.resume_path = area.checkpoint.uri
        if self.options.overwrite:
            # Overwriting usually means the input or the weights changed in place, which the fingerprint cannot
            # see: never reuse an earlier attempt's rows.
            area.clear()
        state = area.prepare(config_fingerprint(config), self.config.run_id)
        if state is StagingState.STAGED:
            logger.info("partition %s: staged by an earlier attempt; committing it", partition.dirname)
            summary = area.staged_summary()
        else:
            logger.info("partition %s: running the pipeline (%s)", partition.dirname, state.value)
            summary = summary_to_dict(self.run_pipeline(config))
            area.mark_staged(summary)
        lease.check()
        rows, error_rows = summary_counts(summary)
        manifest = commit_partition(
            area.data,
            final,
            partition=partition.as_dict(),
            run_id=self.config.run_id,
            details={"input": config.input.uri, "summary": summary, "staging": state.value},
            before_marker=lease.check,
        )
        area.clear()
        return PartitionResult(
            partition.value,
            "committed",
            rows=manifest.rows,
            error_rows=error_rows,
            error_fraction=error_fraction(rows, error_rows),
            files=len(manifest.files),
            message=f"staging was {state.value}",
        )

    def _extend_committed(self, partition: Partition, final: Location, lease: PartitionLease) -> PartitionResult:
        """Add a committed partition's new input rows as an incremental run of the partition's own dataset.

        Under the partition's lease (and, inside the run, the partition dataset's own lease), so two backfills never
        both write an id. Staged beside the output root, outside every glob of the dataset. The `_SUCCESS` manifest
        is rewritten last, listing every file the partition now holds.
        """
        config = self._partition_config(partition)
        config.output.uri = final.uri
        config.output.mode = "incremental"
        staging = Location(self.output.protocol, self.output.path.rstrip("/") + ".staging", self.output.storage_options)
        config.output.staging_uri = staging.join(partition.dirname).uri
        summary = summary_to_dict(self.run_pipeline(config))
        lease.check()
        manifest = refresh_manifest(
            final, partition=partition.as_dict(), run_id=self.config.run_id, details={"summary": summary}
        )
        rows, error_rows = summary_counts(summary)
        return PartitionResult(
            partition.value,
            "committed",
            rows=manifest.rows,
            error_rows=error_rows,
            error_fraction=error_fraction(rows, error_rows),
            files=len(manifest.files),
            message=f"incremental: {summary.get('rows_added', 0)} rows added",
        )

    def _partition_config(self, partition: Partition) -> JobConfig:
        from pipeline.model.compile_share import compile_cache_uri

        config = JobConfig.from_dict(self.config.to_dict())
        config.input.uri = partition_input(self.config.input.uri, partition)
        if config.model.compile_cache is None:
            # One cache for the backfill, at its root: the default under each partition run's own output would be
            # in a staging area cleared after the partition (or inside a committed partition's directory).
            config.model.compile_cache = compile_cache_uri(None, self.config.output.uri)
        return config

    def _lease_dir(self, partition: Partition) -> Location:
        return self.output.join(LOCKS_DIR, partition.dirname)

    def _settle_busy(self, report: BackfillReport) -> None:
        """A partition that was busy may have been committed by its holder while we worked on the others."""
        for result in report.by_status("busy"):
            manifest = read_manifest(self.output.join(f"{self.options.column}={result.partition}"))
            if manifest is not None:
                result.status = "skipped"
                result.rows = manifest.rows
                result.message = f"committed by run {manifest.run_id}"


def _host_and_pid() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _log_result(result: PartitionResult) -> None:
    logger.info("partition %s: %s %s", result.partition, result.status, result.message)


def render_report(report: BackfillReport) -> str:
    """A plain-text table for the job log."""
    header = f"{'partition':<24} {'status':<10} {'rows':>10} {'errors':>8} {'files':>6} {'seconds':>8}  message"
    lines = [
        f"backfill {report.run_id}: {report.column} partitions into {report.output}",
        header,
        "-" * len(header),
    ]
    for result in report.results:
        lines.append(
            f"{result.partition:<24} {result.status:<10} {_blank(result.rows):>10} {_blank(result.error_rows):>8} "
            f"{_blank(result.files):>6} {result.seconds:>8.1f}  {result.message}"
        )
    counts = ", ".join(
        f"{len(report.by_status(status))} {status}"
        for status in ("committed", "skipped", "busy", "failed", "pending")
        if report.by_status(status) or status != "pending"
    )
    over = report.over_budget()
    if over:
        names = ", ".join(result.partition for result in over)
        counts += f"; {len(over)} above the error budget of {report.max_error_fraction:.2%} ({names})"
    lines.append(counts)
    return "\n".join(lines)


def _blank(value: int | None) -> str:
    return "" if value is None else str(value)
