"""Everything that can be checked before Ray starts, in seconds, each mistake refused with one line to act on.

`preflight(config)` reads only what is cheap: the input listing, a manifest's schema (a Parquet footer or the first
lines of a CSV / JSON Lines file), a checkpoint's header or key list (never its tensors) and the output's listing.
It writes nothing. It returns a `Plan`: the config with the manifest's columns resolved, the number of input rows
when that is cheap to know (for the progress line's ETA) and notes for the log. Every refusal is a
`PreflightError`, whose message is one sentence naming what to change; the entry points turn it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.config import FEATURES_DEFAULT, FEATURES_OPTIONAL, JobConfig, uses_dataset_protocol
from pipeline.dataset import schema
from pipeline.dataset.markers import data_files
from pipeline.input.columns import ColumnError, resolve_columns
from pipeline.input.duplicate_ids import check_unique_ids
from pipeline.input.manifest_layout import ManifestLayout, manifest_layout
from pipeline.input.sources import IMAGE_EXTENSIONS, input_protocol, input_uris
from pipeline.model.neck_heads import unsupported_features
from pipeline.storage import Location, fsspec_filesystem, options_for, parse_uri

if TYPE_CHECKING:
    from sam3core.cpu import CpuFeatures

logger = logging.getLogger("pipeline.run.preflight")

COUNT_PARQUET_FILES_MAX = 256  # footers read to count rows for the ETA; more files: no ETA
COUNT_TEXT_BYTES_MAX = 64 * 1024**2  # CSV / JSON Lines read whole to count rows; more: no ETA


class PreflightError(ValueError):
    """A mistake found before the run started: one line saying what to change. Nothing was written."""


@dataclass
class Plan:
    config: JobConfig  # a copy of the job's config with the manifest's columns resolved
    total_rows: int | None = None  # rows in the input, when cheap to know
    checkpoint_format: str | None = None  # e.g. "torch zip, sam3.pt layout"; None with random weights
    notes: list[str] = field(default_factory=list)  # decisions worth a log line (columns recognised, …)
    layout: ManifestLayout | None = None  # the manifest's files and schema, read once here and reused by the run
    warnings: list[str] = field(default_factory=list)  # legal but costly choices, logged once as warnings


def validate(config: JobConfig) -> None:
    """The settings alone, no I/O."""
    input_uris(config.input.uri)
    if not config.output.uri:
        raise ValueError("output.uri is empty: where should the Parquet dataset go? (--output)")
    known = set(FEATURES_DEFAULT) | set(FEATURES_OPTIONAL)
    unknown = sorted(set(config.output.features) - known)
    if unknown:
        raise ValueError(f"unknown output.features {unknown}; choose from {sorted(known)}")
    if config.output.feature_dtype not in ("float16", "float32"):
        raise ValueError(f"output.feature_dtype must be float16 or float32, not {config.output.feature_dtype!r}")
    if config.output.min_rows_per_file < 1:
        raise ValueError("output.min_rows_per_file must be at least 1")
    if not 0.0 <= float(config.output.max_error_fraction) <= 1.0:
        raise ValueError(f"output.max_error_fraction must be between 0 and 1, not {config.output.max_error_fraction}")
    if config.compute.batch_size < 1 or config.compute.num_actors < 1:
        raise ValueError("compute.batch_size and compute.num_actors must be at least 1")
    gpus = config.compute.gpus_per_actor
    if gpus is not None and not 0 <= float(gpus) <= 1:
        raise ValueError(
            f"compute.gpus_per_actor must be between 0 and 1, got {gpus}: an actor runs its model on one GPU "
            "(a share below 1 packs several actors on one); use compute.num_actors for more GPUs"
        )
    if config.model.imgsz % 14:
        raise ValueError(f"model.imgsz must be a multiple of the patch size 14, got {config.model.imgsz}")
    if config.resume_path and parse_uri(config.resume_path) == parse_uri(config.output.uri):
        raise ValueError("resume_path must differ from output.uri (Ray Data keeps its own files there)")
    if config.output.mode not in ("new", "incremental"):
        raise ValueError(f"output.mode must be new or incremental, not {config.output.mode!r}")
    if config.output.refresh not in ("none", "changed"):
        raise ValueError(f"output.refresh must be none or changed, not {config.output.refresh!r}")
    if config.input.format not in ("manifest", "images", "webdataset"):
        raise ValueError(f"input.format must be manifest, images or webdataset, not {config.input.format!r}")
    if config.input.format == "images" and config.input.captions_column:
        raise ValueError("input.captions_column does not apply to format 'images' (one sidecar caption each)")
    if config.model.checkpoint is None and not config.model.random_weights:
        raise ValueError(
            "no checkpoint: pass --checkpoint sam3.pt (model.checkpoint: a path, URI or hf://facebook/sam3), or "
            "--random-weights (model.random_weights: true) to run with random weights, whose embeddings mean nothing"
        )
    if config.model.checkpoint is not None and config.model.random_weights:
        raise ValueError("both a checkpoint and random weights were asked for: drop --random-weights or --checkpoint")
    generation = _config_generation(config.model.config)
    if config.model.checkpoint is None:
        _check_generation_features(config, generation or "sam3", "random weights")


def _config_generation(name: str) -> str | None:
    """The generation of a model config name; None for "auto" (the checkpoint's)."""
    from sam3core.config import AUTO, get_config

    return None if name == AUTO else get_config(name).generation  # ValueError names the choices


def _check_generation_features(config: JobConfig, generation: str, what: str) -> None:
    unsupported = unsupported_features(generation, config.output.features)
    if unsupported:
        raise ValueError(f"output.features {unsupported} need a SAM 3.1 checkpoint, and {what} is SAM 3")


def check_settings(config: JobConfig) -> str | None:
    """The settings and the checkpoint, not the input or output: what a backfill checks once for all partitions.

    Returns a description of the checkpoint (None with random weights).
    """
    try:
        validate(config)
    except ValueError as error:
        raise PreflightError(str(error)) from error
    return _check_checkpoint(config, config.storage_options())


def preflight(config: JobConfig) -> Plan:
    """Check the job before any cluster starts; PreflightError (one line) for the first mistake found."""
    storage_options = config.storage_options()
    plan = Plan(config=JobConfig.from_dict(dataclasses.asdict(config)))
    plan.checkpoint_format = check_settings(config)
    if plan.checkpoint_format is None:
        plan.notes.append(f"RANDOM WEIGHTS: no checkpoint; the {config.model.config!r} model's embeddings mean nothing")
    emulated = emulated_dtype_warning(config)
    if emulated:
        logger.warning(emulated)
        plan.warnings.append(emulated)
    uris = input_uris(config.input.uri)
    try:
        protocol = input_protocol(uris)
        columns = _check_input(plan, uris, protocol, storage_options)
        _check_partition_columns(config, columns)
        _check_output(config, storage_options)
        check_unique_ids(plan.config, plan.layout)  # with the manifest's columns resolved
    except PreflightError:
        raise
    except (ValueError, OSError) as error:
        raise PreflightError(_one_line(error)) from error
    except Exception as error:
        if not _is_storage_error(error):
            raise
        raise PreflightError(f"cannot reach the storage: {type(error).__name__}: {_one_line(error)}") from error
    return plan


def emulated_dtype_warning(config: JobConfig, features: CpuFeatures | None = None) -> str | None:
    """One line when the job asks for bfloat16 on CPU actors and this machine's CPU only emulates it.

    Judged on the driver's CPU: on a CPU-only cluster its nodes are usually alike; a job that asks for GPUs is not
    judged (its actors run on GPUs).
    """
    if config.model.dtype != "bfloat16" or (config.compute.gpus_per_actor or 0) > 0:
        return None
    import torch

    if torch.cuda.is_available():
        return None
    from sam3core.cpu import emulated_dtype_warning as warning_for

    line = warning_for(torch.bfloat16, features)
    return f"model.dtype {line}" if line else None


def _check_checkpoint(config: JobConfig, storage_options: dict[str, Any]) -> str | None:
    if config.model.checkpoint is None:
        return None
    from sam3core.checkpoint import CheckpointError, probe_checkpoint

    checkpoint = config.model.checkpoint
    options = {} if checkpoint.startswith("hf://") else options_for(parse_uri(checkpoint).protocol, storage_options)
    try:
        probe = probe_checkpoint(checkpoint, options)
    except CheckpointError as error:
        raise PreflightError(f"{_one_line(error)} (--checkpoint / model.checkpoint)") from error
    except Exception as error:
        if not _is_storage_error(error):
            raise
        reason = f"{type(error).__name__}: {_one_line(error)}"
        raise PreflightError(f"cannot read checkpoint {checkpoint}: {reason}") from error
    if probe.format == "hub":
        return "hub file, read when the model is built"
    asked = _config_generation(config.model.config)
    if asked is not None and asked != probe.generation:
        raise PreflightError(
            f"checkpoint {checkpoint} is {probe.generation} ({probe.layout} layout) but model.config "
            f"{config.model.config!r} is {asked}: use --model-config {probe.generation} or auto"
        )
    try:
        _check_generation_features(config, probe.generation, f"checkpoint {checkpoint}")
    except ValueError as error:
        raise PreflightError(str(error)) from error
    return f"{probe.format}, {probe.layout} layout ({probe.generation}), {probe.entries} entries"


def _check_input(plan: Plan, uris: list[str], protocol: str, storage_options: dict[str, Any]) -> list[str] | None:
    """Input exists and holds something to read; for manifests, resolves the columns. Returns the manifest's
    pass-through column names (None when they cannot be known cheaply)."""
    config = plan.config
    if config.input.format != "manifest":
        config.input.id_column = config.input.id_column or "id"
        config.input.image_column = config.input.image_column or "image"
    locations = [parse_uri(uri) for uri in uris]
    fs = fsspec_filesystem(protocol, storage_options)
    for location in locations:
        fs.invalidate_cache(location.path)
        if not fs.exists(location.path):
            raise PreflightError(f"input {location.uri} does not exist (--input / input.uri)")
    if config.input.format == "images":
        if not any(_holds_file(fs, location, IMAGE_EXTENSIONS) for location in locations):
            raise PreflightError(
                f"input {uris[0]} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); "
                "for a manifest or WebDataset shards set --format"
            )
        config.input.caption_column = config.input.caption_column or None
        return None
    if config.input.format == "webdataset":
        if not any(_holds_file(fs, location, ("tar",)) for location in locations):
            raise PreflightError(f"input {uris[0]} holds no WebDataset shards (.tar files); check --input / --format")
        # keys of each sample's .json member; no cheap way to see them, so the usual name is the default
        if config.input.caption_column is None and not config.input.captions_column:
            config.input.caption_column = "caption"
        config.input.caption_column = config.input.caption_column or None
        return None

    try:
        layout = manifest_layout(locations, storage_options)
    except ValueError as error:
        raise PreflightError(f"input {uris[0]}: {_one_line(error)}") from error
    plan.layout = layout
    kind, files, manifest_schema = layout.kind, layout.files, layout.schema
    try:
        resolved = resolve_columns(
            manifest_schema,
            id_column=config.input.id_column,
            image_column=config.input.image_column,
            caption_column=config.input.caption_column,
            captions_column=config.input.captions_column,
        )
    except ColumnError as error:
        raise PreflightError(f"{_one_line(error)} (manifest {files[0]})") from error
    config.input.id_column = resolved.id_column or "id"
    config.input.image_column = resolved.image_column
    config.input.caption_column = resolved.caption_column
    config.input.captions_column = resolved.captions_column
    plan.notes.extend(resolved.notes)
    plan.total_rows = _count_rows(kind, files, fs)
    if plan.total_rows == 0:
        raise PreflightError(f"the manifest {uris[0]} holds no rows")
    consumed = {resolved.id_column, resolved.image_column, resolved.caption_column, resolved.captions_column}
    return [name for name in manifest_schema.names if name not in consumed]


def _holds_file(fs: Any, location: Location, extensions: tuple[str, ...]) -> bool:
    """Whether a file or prefix holds at least one file with one of these extensions; stops at the first found."""
    wanted = tuple(f".{extension}" for extension in extensions)
    if fs.isfile(location.path):
        return location.path.lower().endswith(wanted)
    for directory, _, names in fs.walk(location.path):
        relative = posixpath.relpath(directory, location.path) if directory != location.path else ""
        if any(part.startswith((".", "_")) for part in relative.split("/") if part):
            continue
        if any(name.lower().endswith(wanted) and not name.startswith((".", "_")) for name in names):
            return True
    return False


def _count_rows(kind: str, files: list[str], fs: Any) -> int | None:
    """Input rows when cheap: Parquet footers (up to COUNT_PARQUET_FILES_MAX files), small text manifests."""
    if kind == "parquet":
        if len(files) > COUNT_PARQUET_FILES_MAX:
            return None
        import pyarrow.parquet as pq

        total = 0
        for path in files:
            with fs.open(path, "rb") as f:
                total += pq.ParquetFile(f).metadata.num_rows
        return total
    sizes = [fs.size(path) for path in files]
    compressed = any(path.lower().endswith((".gz", ".zst", ".bz2")) for path in files)
    if compressed or None in sizes or sum(sizes) > COUNT_TEXT_BYTES_MAX:
        return None
    total = 0
    for path in files:
        lines = [line for line in fs.cat_file(path).splitlines() if line.strip()]
        total += max(0, len(lines) - 1) if kind in ("csv", "tsv") else len(lines)  # CSV: minus the header
    return total


def _check_partition_columns(config: JobConfig, manifest_columns: list[str] | None) -> None:
    if not config.output.partition_by or (manifest_columns is None and config.input.format == "webdataset"):
        return  # a WebDataset's pass-through fields are only known once shards are read; checked then
    available = sorted(set(manifest_columns or []) | set(schema.RESERVED_COLUMNS))
    missing = [name for name in config.output.partition_by if name not in available]
    if missing:
        extra = f" (manifest columns: {', '.join(manifest_columns)})" if manifest_columns else ""
        raise PreflightError(
            f"--partition-by / output.partition_by names {', '.join(missing)}, which the output will not have{extra}"
        )


def _check_output(config: JobConfig, storage_options: dict[str, Any]) -> None:
    """The output is empty, or this run resumes the run that wrote it (or joins it: `pipeline.run.incremental`)."""
    if uses_dataset_protocol(config):
        from pipeline.run.incremental import check_dataset_output

        check_dataset_output(config, storage_options)
        return
    output = parse_uri(config.output.uri)
    fs = fsspec_filesystem(output.protocol, storage_options)
    fs.invalidate_cache(output.path)
    if fs.isfile(output.path):
        raise PreflightError(f"output {output.uri} is a file; --output must be a directory or prefix")
    existing = data_files(output, storage_options)
    if not existing:
        return
    delete = f"rm -r {output.uri}" if output.is_local else f"aws s3 rm --recursive {output.uri}"
    if config.resume_path is None:
        if fs.exists(output.join(schema.SUCCESS_FILE).path):
            raise PreflightError(
                f"{output.uri} already holds a finished run ({len(existing)} Parquet files): choose another "
                f"--output, or delete it first ({delete}) to write it again"
            )
        raise PreflightError(
            f"{output.uri} holds {len(existing)} Parquet files of a run that did not finish: rerun with the "
            f"--resume-path that run used to continue it, or delete them first ({delete}) to start over"
        )
    resume = parse_uri(config.resume_path)
    resume_fs = fsspec_filesystem(resume.protocol, storage_options)
    resume_fs.invalidate_cache(resume.path)
    if not (resume_fs.exists(resume.path) and resume_fs.find(resume.path, withdirs=False)):
        # Every file a checkpointed run writes is recorded (pending, then committed) before it is written.
        raise PreflightError(
            f"{output.uri} already holds {len(existing)} Parquet files but {config.resume_path} records none of "
            f"them: they were not written by a run resuming from there; choose another --output or delete them "
            f"first ({delete})"
        )


def _is_storage_error(error: BaseException) -> bool:
    """Credentials, permissions and connection errors of object stores (botocore / aiohttp raise their own)."""
    module = type(error).__module__ or ""
    return module.startswith(("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec"))


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
