"""Runs that grow one dataset: add what is new, retry what failed, re-embed what changed; commit all at once.

`run_job` hands a run here when `output.mode` is `incremental` or it retries errors or refreshes changed images.
The run, in order:

1. takes the dataset's lease (`pipeline.dataset.lock`): a second writer is refused before Ray starts;
2. finishes a commit a killed run left behind (`pipeline.dataset.replacement`: its journal);
3. checks the model identity (`pipeline.dataset.identity`) and reads the id set (ids, status, digests only);
4. embeds the selected rows (`pipeline.run.row_selection`) with the ordinary pipeline into a staging area beside the
   dataset (`<output>.staging`, outside every glob of the dataset), resuming through Ray Data's checkpoint when an
   earlier attempt of the same run was killed there;
5. prepares the new files and the rewritten ones in the staging area, writes the journal (the decision), applies
   it, records the run in `_dataset.json` and `_summary.json`, and clears the staging area.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pipeline.backfill.staging import StagingArea, StagingState, config_fingerprint
from pipeline.config import JobConfig
from pipeline.dataset import schema
from pipeline.dataset.id_set import ERROR, OK, read_id_set, repeated_ids
from pipeline.dataset.identity import ModelIdentity, identity_of_config, mismatch_message
from pipeline.dataset.lock import DatasetBusy, acquire, dataset_lease
from pipeline.dataset.markers import data_files
from pipeline.dataset.reader import run_metadata_from_file
from pipeline.dataset.replacement import (
    CommitJournal,
    apply_journal,
    new_commit_id,
    prepare_commit,
    read_journal,
    write_journal,
)
from pipeline.dataset.runs import read_record
from pipeline.run.job import RunSummary
from pipeline.run.outcome import error_fraction
from pipeline.run.preflight import Plan, PreflightError
from pipeline.storage import Location, arrow_filesystem
from pipeline.version import package_version

logger = logging.getLogger("pipeline.run.incremental")

STAGING_SUFFIX = ".staging"


@dataclass
class IncrementalRunSummary(RunSummary):
    """A run of a growing dataset. rows_total / rows_ok / rows_error count the whole dataset after the commit."""

    mode: str = "incremental"
    commit_id: str = ""
    rows_added: int = 0  # new ids now in the dataset
    rows_skipped_present: int = 0  # input rows whose id the dataset held, left as they were
    rows_retried: int = 0  # error rows embedded again
    rows_retried_ok: int = 0  # ... that are ok now
    rows_refreshed: int = 0  # ok rows re-embedded because their image changed
    rows_unchanged: int = 0  # ok rows re-hashed and found unchanged
    files_added: int = 0
    files_rewritten: int = 0
    staging: str = ""  # fresh | resume | staged: what the staging area held when the run began


RunPipeline = Callable[..., Any]


def staging_location(config: JobConfig) -> Location:
    storage_options = config.storage_options()
    if config.output.staging_uri:
        return Location.parse(config.output.staging_uri, storage_options)
    output = Location.parse(config.output.uri, storage_options)
    if output.is_object_store and "/" not in output.path.strip("/"):
        raise PreflightError(
            f"output {output.uri} is a bucket root: an incremental run stages its rows beside the output, so give "
            "output.staging_uri (--set output.staging_uri=s3://bucket/prefix) or write the dataset under a prefix"
        )
    return Location(output.protocol, output.path.rstrip("/") + STAGING_SUFFIX, storage_options)


def check_dataset_output(config: JobConfig, storage_options: dict[str, Any]) -> None:
    """Preflight for a run joining a dataset: the output is a dataset (or empty) of the same model identity."""
    if config.resume_path:
        raise PreflightError(
            "resume_path does not apply to incremental runs (they keep their checkpoint in the staging area): "
            "drop --resume-path"
        )
    output = Location.parse(config.output.uri, storage_options)
    if output.fs.isfile(output.path):
        raise PreflightError(f"output {output.uri} is a file; --output must be a directory or prefix")
    staging_location(config)
    files = data_files(output, storage_options)
    if not files:
        return
    finished = output.join(schema.SUCCESS_FILE).exists() or read_record(output) is not None
    if not finished and read_journal(output) is None:
        raise PreflightError(
            f"{output.uri} holds {len(files)} Parquet files of a run that did not finish: finish it first with the "
            "--resume-path that run used, or write the incremental dataset to another --output"
        )
    check_identity(output, identity_of_config(config), storage_options)


def dataset_identity(output: Location, storage_options: dict[str, Any] | None) -> ModelIdentity | None:
    record = read_record(output)
    if record is not None:
        return record.identity
    files = data_files(output, storage_options)
    if not files:
        return None
    metadata = run_metadata_from_file(files[0], arrow_filesystem(output.protocol, storage_options))
    return ModelIdentity.from_file_metadata(metadata) if metadata else None


def check_identity(output: Location, identity: ModelIdentity, storage_options: dict[str, Any] | None) -> None:
    existing = dataset_identity(output, storage_options)
    message = mismatch_message(output.uri, existing, identity) if existing is not None else None
    if message:
        raise PreflightError(message)


def run_incremental(config: JobConfig, plan: Plan, run_pipeline: RunPipeline) -> IncrementalRunSummary:
    started_wall = datetime.now(timezone.utc)
    started = time.monotonic()
    storage_options = config.storage_options()
    output = Location.parse(config.output.uri, storage_options)
    lease = dataset_lease(output, config.run_id)
    try:
        acquire(lease)
    except DatasetBusy as busy:
        raise PreflightError(str(busy)) from busy
    try:
        with lease.keep_alive():
            unfinished = read_journal(output)
            if unfinished is not None:
                logger.warning("finishing the commit of run %s, which was interrupted", unfinished.run_id)
                apply_journal(output, unfinished, storage_options)
                _clear_staging(Location.parse(unfinished.staging, storage_options))
            identity = identity_of_config(config)
            check_identity(output, identity, storage_options)  # again under the lease: a first run may have won
            return _run_leased(config, plan, run_pipeline, output, identity, lease, started_wall, started)
    finally:
        lease.release()


def _clear_staging(root: Location) -> None:
    StagingArea(root=root, checkpoint=root.join("checkpoint")).clear()


def _run_leased(
    config: JobConfig,
    plan: Plan,
    run_pipeline: RunPipeline,
    output: Location,
    identity: ModelIdentity,
    lease: Any,
    started_wall: datetime,
    started: float,
) -> IncrementalRunSummary:
    storage_options = config.storage_options()
    id_set = read_id_set(output, storage_options)
    repeated = repeated_ids(id_set)
    if repeated:
        logger.warning("%d ids occur more than once in %s already (e.g. %r)", len(repeated), output.uri, repeated[0])
    record = read_record(output)
    logger.info(
        "dataset %s holds %d rows (%d ok, %d error) in %d files",
        output.uri,
        len(id_set),
        id_set.count(OK),
        id_set.count(ERROR),
        len(id_set.files),
    )
    root = staging_location(config)
    area = StagingArea(root=root, checkpoint=root.join("checkpoint"))
    # The staged rows are valid only against the dataset they were selected from: the last commit is part of it.
    fingerprint = f"{config_fingerprint(config)}:{record.last_commit_id if record else len(id_set)}"
    state = area.prepare(fingerprint, config.run_id)
    if state is StagingState.STAGED:
        logger.info("the rows of an earlier attempt are staged in %s; committing them", area.data.uri)
        staged = area.staged_summary()
    else:
        staged = _embed_selected(config, plan, run_pipeline, area, id_set)
        area.mark_staged(staged)
    counts = staged.get("selection") or {}
    lease.check()
    commit_id = new_commit_id(config.run_id)
    prepared = prepare_commit(
        output, area.data, area.root.join("commit"), id_set, commit_id, compression=config.output.compression
    )
    files_added = sum(op.kind == "add" for op in prepared.ops)
    rows_ok, rows_error = id_set.count(OK) + prepared.ok_delta, id_set.count(ERROR) + prepared.error_delta
    finished_wall = datetime.now(timezone.utc)
    elapsed = time.monotonic() - started
    rows_total = rows_ok + rows_error
    this_run = prepared.rows_added + prepared.rows_replaced
    summary = IncrementalRunSummary(
        run_id=config.run_id,
        output_uri=output.uri,
        rows_total=rows_total,
        rows_ok=rows_ok,
        rows_error=rows_error,
        rows_this_run=this_run,
        elapsed_s=round(elapsed, 3),
        rows_per_s=round(this_run / elapsed, 3) if elapsed > 0 else 0.0,
        started_at=started_wall.isoformat(),
        finished_at=finished_wall.isoformat(),
        files=len(id_set.files) + files_added,
        config=config.to_dict(),
        checkpoint_sha256=identity.checkpoint_sha256 or staged.get("checkpoint_sha256"),
        package_version=package_version(),
        random_weights=config.model.checkpoint is None,
        error_fraction=round(error_fraction(rows_total, rows_error) or 0.0, 6),
        max_error_fraction=config.output.max_error_fraction,
        steady_rows_per_s=staged.get("steady_rows_per_s"),
        mode=_mode(config),
        commit_id=commit_id,
        rows_added=prepared.rows_added,
        rows_computed=int(counts.get("model_image_rows", 0)),
        rows_copied=prepared.rows_copied,
        rows_skipped_present=int(counts.get("skipped_present", 0)),
        rows_retried=prepared.rows_retried,
        rows_retried_ok=prepared.rows_retried_ok,
        rows_refreshed=prepared.rows_refreshed,
        rows_unchanged=int(counts.get("refresh_unchanged", 0)),
        files_added=files_added,
        files_rewritten=len(prepared.ops) - files_added,
        staging=state.value,
    )
    journal = CommitJournal(
        commit_id=commit_id,
        run_id=config.run_id,
        staging=root.uri,
        ops=prepared.ops,
        identity=identity.to_dict(),
        run_entry=_run_entry(summary),
        summary=summary.to_dict(),
    )
    lease.check()  # a holder that lost its lease while preparing must not decide anything
    write_journal(output, journal)
    apply_journal(output, journal, storage_options)
    area.clear()
    return summary


def staging_config(config: JobConfig, area: StagingArea) -> JobConfig:
    """The job the pipeline runs for an incremental run: a plain run into the staging area, resumable there."""
    from pipeline.model.compile_share import compile_cache_uri

    inner = JobConfig.from_dict(config.to_dict())
    inner.output.uri = area.data.uri
    inner.output.mode, inner.output.retry_errors, inner.output.refresh = "new", False, "none"
    inner.resume_path = area.checkpoint.uri
    if inner.model.compile_cache is None:
        # The documented default, `<output>/_compile_cache`, is the dataset's (outside every glob of its files), not
        # the staging area's: that one is cleared after each run, and every run would compile the model again.
        inner.model.compile_cache = compile_cache_uri(None, config.output.uri)
    return inner


def _embed_selected(
    config: JobConfig, plan: Plan, run_pipeline: RunPipeline, area: StagingArea, id_set: Any
) -> dict[str, Any]:
    """Run the pipeline on the selected rows into the staging area; its summary plus the selection's counts."""
    from pipeline.input.sources import SourceSpec, input_protocol, input_uris, plan_source
    from pipeline.run import console
    from pipeline.run.row_selection import selection_counts, start_selection, stop_selection

    inner = staging_config(config, area)
    inner_plan = dataclasses.replace(plan, config=inner)
    uris = input_uris(config.input.uri)
    source, _ = plan_source(
        SourceSpec.from_config(config.input, input_protocol(uris)), uris, config.storage_options(), plan.layout
    )
    area.data.fs.makedirs(area.data.path, exist_ok=True)  # a run that selects no row still writes its summary there
    console.start_ray()
    selection = start_selection(
        source,
        id_set,
        new_rows=config.output.mode == "incremental",
        retry_errors=config.output.retry_errors,
        refresh_changed=config.output.refresh == "changed",
    )
    try:
        summary = run_pipeline(inner, inner_plan, selection=selection).to_dict()
        summary["selection"] = selection_counts(selection)
    finally:
        stop_selection(selection)
    logger.info("selection: %s", ", ".join(f"{k} {v}" for k, v in sorted(summary["selection"].items())))
    return summary


def _mode(config: JobConfig) -> str:
    parts = ["incremental"] if config.output.mode == "incremental" else []
    if config.output.retry_errors:
        parts.append("retry-errors")
    if config.output.refresh == "changed":
        parts.append("refresh-changed")
    return "+".join(parts)


# What `_dataset.json` records of each run's counts (and what bench/incremental.py reports of each run).
RUN_COUNT_KEYS = (
    "rows_total",
    "rows_ok",
    "rows_error",
    "rows_added",
    "rows_computed",
    "rows_copied",
    "rows_skipped_present",
    "rows_retried",
    "rows_retried_ok",
    "rows_refreshed",
    "rows_unchanged",
    "files_added",
    "files_rewritten",
)


def _run_entry(summary: IncrementalRunSummary) -> dict[str, Any]:
    keys = ("run_id", "commit_id", "mode", "started_at", "finished_at", *RUN_COUNT_KEYS, "package_version")
    data = summary.to_dict()
    entry = {key: data[key] for key in keys}
    entry["committed_at"] = datetime.now(timezone.utc).isoformat()
    return entry
