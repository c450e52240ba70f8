"""`run_job`: read, prepare on CPUs, embed on model actors, stream partitioned Parquet, then summarize and commit."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pipeline.config import JobConfig, uses_dataset_protocol
from pipeline.dataset import schema
from pipeline.dataset.markers import data_files, remove_markers, write_markers
from pipeline.input.duplicate_ids import ids_derive_from_content, report_repeated_content_ids
from pipeline.input.records import PrepareSettings
from pipeline.input.sources import SourceSpec, input_protocol, input_uris, log_renamed_columns, plan_source, read_source
from pipeline.run import console
from pipeline.run.outcome import error_fraction
from pipeline.run.preflight import Plan, preflight
from pipeline.run.row_selection import (
    RowSelection,
    prepare_and_check,
    select_before_prepare,
    selection_counts,
    start_copy_marking,
    stop_selection,
)
from pipeline.storage import Location, arrow_filesystem, fsspec_filesystem, parse_uri
from pipeline.version import package_version

logger = logging.getLogger("pipeline")

PREPARE_BATCH_ROWS = 32  # rows per CPU task call: enough to amortize fetch latency, small enough to stream
# CPUs a decode task reserves. Ray Data reserves each stage's smallest task for it, upstream first, and a stage
# whose minimum no longer fits waits for an upstream one to end. The block splitting in front of this stage
# (`repartition`, a whole CPU, not settable) and whole-CPU decode tasks took both CPUs of a 2-CPU machine, so the
# grouping-and-write step (`pipeline.run.file_groups.WRITE_CPUS`) got no task until the splitting had ended: no file
# for 328 s on a 100,000-row input (docs/benchmarks.md, "Soak: the first files of a long run"). With three
# quarters, splitting, one decode task and the write fit on 2 CPUs together.
PREPARE_CPUS = 0.75
DECODE_BASE_MEMORY = 512 * 1024**2  # a worker process with torch imported, Pillow, the encoded bytes of a batch
# Decoded batches Ray Data may hold per model actor, waiting for it or being decoded: enough that the model
# never waits for the CPUs, few enough that decoding never runs far ahead (docs/benchmarks.md, "Soak").
IN_FLIGHT_BATCHES_PER_ACTOR = 8
IN_FLIGHT_FLOOR = 1024**3  # room for a few blocks of every operator whatever the image size


@dataclass
class RunSummary:
    run_id: str
    output_uri: str
    rows_total: int  # rows in the output, including rows written by earlier attempts of this run
    rows_ok: int
    rows_error: int
    rows_this_run: int  # rows embedded by this invocation (0 when resuming a finished run)
    elapsed_s: float
    rows_per_s: float
    started_at: str
    finished_at: str
    files: int
    config: dict[str, Any]
    checkpoint_sha256: str | None = None
    package_version: str = ""
    random_weights: bool = False  # no checkpoint: the embeddings mean nothing
    error_fraction: float = 0.0  # rows_error / rows_total
    max_error_fraction: float = 0.05  # the budget (output.max_error_fraction): above it the run exits 3
    # Rows per second from the first finished batch to the last: the rate without start-up (model building and
    # compilation in the actors, Ray Data starting), which a short run's rows_per_s is dominated by.
    steady_rows_per_s: float | None = None
    # Why the model ran eagerly although compilation was asked for (from the files' metadata; distinct reasons,
    # empty when every actor compiled or compilation was off): on a GPU that costs a large share of the speed.
    compile_fallbacks: list[str] = dataclasses.field(default_factory=list)
    # Each distinct image goes through the model once per run: rows whose image the model ran on in this invocation
    # (counted by the model actors), and rows that got the image features of an earlier row with the same bytes.
    rows_computed: int = 0
    rows_copied: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_job(config: JobConfig, plan: Plan | None = None, selection: Any = None) -> RunSummary:
    """Run one embedding job to completion; starts a local Ray cluster when none is initialised.

    The job is checked first (`pipeline.run.preflight`; pass the `Plan` of a check already made): a mistake raises
    PreflightError before Ray starts and before anything is written. An incremental run (`output.mode:
    incremental`, `output.retry_errors`, `output.refresh: changed`) goes through `pipeline.run.incremental`, which calls
    back here to embed the rows it selected (`selection`, a `pipeline.run.row_selection.RowSelection`) into staging.
    A plain run marks the rows that repeat an image of the run (`start_copy_marking`) and fills them in its output
    before it commits (`pipeline.dataset.copy_fill`).
    """
    started_wall = datetime.now(timezone.utc)
    started = time.monotonic()
    plan = plan or preflight(config)
    config = plan.config  # the manifest's columns resolved
    if selection is None and uses_dataset_protocol(config):
        from pipeline.run.incremental import run_incremental

        return run_incremental(config, plan, run_job)
    for note in plan.notes:
        (logger.warning if note.startswith("RANDOM WEIGHTS") else logger.info)(note)
    storage_options = config.storage_options()
    uris = input_uris(config.input.uri)
    # What the driver can see of the input (manifest files, schema) before Ray starts.
    source, layout = plan_source(
        SourceSpec.from_config(config.input, input_protocol(uris)), uris, storage_options, plan.layout
    )
    log_renamed_columns(source, layout)
    console.start_ray()
    output = parse_uri(config.output.uri)
    # The progress line's total: the input's rows, unless only some of them go (a selection, a resumed run). They
    # still bound what each model actor can see, which decides whether compiling pays (`_embed`).
    total = plan.total_rows if selection is None else None
    resuming = bool(data_files(output, storage_options))
    if resuming:
        # Resuming (preflight allowed it): the earlier files are not complete until this run commits again.
        remove_markers(output, storage_options)
        total = None  # how many rows are left is only known once Ray Data has read the checkpoint

    from pipeline.run.hosted import hosted, release
    from pipeline.run.progress import ProgressCounter, ProgressReporter

    plain = selection is None
    counter = None
    try:
        if selection is None:
            selection = start_copy_marking(source)
        counter = hosted(ProgressCounter)
        with _data_context(**_run_context_fields(config, source, storage_options)), _bounded_in_flight(config):
            memory = decode_memory(config.model.imgsz)
            dataset = read_source(source, uris, storage_options, layout)
            if selection.filter_by_id:
                dataset = select_before_prepare(dataset, selection)
            dataset = _prepare(dataset, config, source, storage_options, memory, selection)
            dataset = _embed(dataset, config, source, storage_options, counter, selection.counter, plan.total_rows)
            with ProgressReporter(counter, total) as progress:
                _write(dataset, config, output, storage_options)
                done = progress.snapshot()
        selected = selection_counts(selection)
    finally:  # the run's hosted objects (its digests among them) go, whatever ended it
        release(counter)
        if plain and selection is not None:
            stop_selection(selection)
    logger.info("written: %s", done.line())
    copied = 0
    if plain and (resuming or selected.get("copied")):  # an earlier attempt may have left copies too
        from pipeline.dataset.copy_fill import fill_output_copies

        copied = fill_output_copies(output, storage_options, compression=config.output.compression)
        logger.info("%d rows got the image features of an earlier row with the same image", copied)

    counts, files, checkpoint_sha, fallbacks = _scan_output(output, storage_options)
    for reason in fallbacks:
        logger.warning("the model ran EAGERLY: compiling it failed in a model actor (%s)", reason)
    if ids_derive_from_content(source, layout):
        report_repeated_content_ids(
            output, data_files(output, storage_options), arrow_filesystem(output.protocol, storage_options)
        )
    finished_wall = datetime.now(timezone.utc)
    elapsed = time.monotonic() - started
    summary = RunSummary(
        run_id=config.run_id,
        output_uri=output.uri,
        rows_total=sum(counts.values()),
        rows_ok=counts.get(schema.STATUS_OK, 0),
        rows_error=counts.get(schema.STATUS_ERROR, 0),
        rows_this_run=done.done,
        elapsed_s=round(elapsed, 3),
        rows_per_s=round(done.done / elapsed, 3) if elapsed > 0 else 0.0,
        started_at=started_wall.isoformat(),
        finished_at=finished_wall.isoformat(),
        files=files,
        config=config.to_dict(),
        checkpoint_sha256=checkpoint_sha,
        package_version=package_version(),
        random_weights=config.model.checkpoint is None,
        error_fraction=round(error_fraction(sum(counts.values()), counts.get(schema.STATUS_ERROR, 0)) or 0.0, 6),
        max_error_fraction=config.output.max_error_fraction,
        steady_rows_per_s=None if done.steady_rows_per_s is None else round(done.steady_rows_per_s, 3),
        compile_fallbacks=fallbacks,
        rows_computed=int(selected.get("model_image_rows", 0)),
        rows_copied=copied,
    )
    _commit(output, summary, storage_options)
    logger.info(
        "run %s finished: %d rows (%d ok, %d error) in %s%s; summary at %s",
        config.run_id,
        summary.rows_total,
        summary.rows_ok,
        summary.rows_error,
        output.uri,
        " with RANDOM WEIGHTS" if summary.random_weights else "",
        output.join(schema.SUMMARY_FILE).uri,
    )
    return summary


def _run_context_fields(config: JobConfig, source: SourceSpec, storage_options: dict[str, Any]) -> dict[str, Any]:
    """The DataContext fields a run's datasets are built with.

    `use_datasource_v2=False`: Ray Data's first Parquet reader, for the run's input and for the resume checkpoint
    Ray Data reads back (its filter actor inherits the dataset's context). The newer reader, the default of the Ray
    we test on (2.60), starts a pool of 32 footer-reading actors for every `read_parquet`, each a new Python
    process, whatever the number of files: on a 2-CPU node a run of a few dozen rows spent more CPU starting those
    processes than embedding (a partitioned test run with its rerun: 61.8 s of CPU against 40.8 with the first
    reader; `bench/process_cpu.py`, docs/benchmarks.md, "Test suite time"). The first reader fetches footers in
    ordinary tasks.
    """
    fields: dict[str, Any] = {"use_datasource_v2": False}
    if config.resume_path:
        from pipeline.run.resume import checkpoint_config

        fields["checkpoint_config"] = checkpoint_config(source, config.resume_path, storage_options)
    return fields


@contextlib.contextmanager
def _data_context(**fields: Any) -> Iterator[None]:
    """Set DataContext fields for datasets built inside the block (they copy the context when created)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    previous = {name: getattr(context, name) for name in fields}
    for name, value in fields.items():
        setattr(context, name, value)
    try:
        yield
    finally:
        for name, value in previous.items():
            setattr(context, name, value)


def in_flight_limit(config: JobConfig) -> int:
    """Object store bytes the run's dataset may hold: decoded batches for every model actor, and a floor.

    Ray Data's own budget is half the cluster's object store whatever the model needs. Decoding a small JPEG to
    1008 px takes milliseconds and makes 3 MB of pixels, while a model embeds a row in tens of milliseconds on a
    GPU and in seconds on a CPU; with that budget the decoded rows piled up in front of the model by the gigabyte
    (growing for as long as the run, then spilling to disk). The limit scales with the model actors, not with
    the cluster's memory.
    """
    row_bytes = config.model.imgsz * config.model.imgsz * 3
    rows = config.compute.num_actors * config.compute.batch_size * IN_FLIGHT_BATCHES_PER_ACTOR
    return max(IN_FLIGHT_FLOOR, rows * row_bytes + 2 * PREPARE_BATCH_ROWS * row_bytes)


@contextlib.contextmanager
def _bounded_in_flight(config: JobConfig) -> Iterator[None]:
    """Ray Data's object store limit for datasets built inside the block (`in_flight_limit`), unless the caller
    has set one in the DataContext already."""
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    previous = options.resource_limits
    limit = previous.object_store_memory
    if limit is None or limit == float("inf"):
        options.resource_limits = previous.copy(object_store_memory=in_flight_limit(config))
    try:
        yield
    finally:
        options.resource_limits = previous


def decode_memory(imgsz: int) -> int:
    """Bytes a CPU task holds: a batch of decoded images, their resized copies and the Arrow output.

    Reserving it keeps Ray from packing more decode tasks on a node than its memory holds; it also makes the CPU
    stage's resources differ from the model actor's, so Ray never fuses decoding into the model actor.
    """
    return DECODE_BASE_MEMORY + PREPARE_BATCH_ROWS * imgsz * imgsz * 3 * 4


def _prepare(
    dataset: Any,
    config: JobConfig,
    source: SourceSpec,
    storage_options: dict[str, Any],
    memory: int,
    selection: RowSelection,
) -> Any:
    from sam3core import get_config

    settings = PrepareSettings(
        source=source,
        imgsz=config.model.imgsz,
        # "auto" is read from the checkpoint in the model actor; both generations share the text tower
        context_length=get_config(config.model.config.replace("auto", "sam3")).text.context_length,
        bpe_path=config.model.bpe_path,
        storage_options=storage_options,
        partition_by=tuple(config.output.partition_by),
    )
    # A read block can hold thousands of rows (Ray reads a Parquet file of small JPEGs as one block), and one
    # decode task per block would decode them all: no backpressure pauses a task half way, so its decoded pixels
    # piled up in front of the model by the gigabyte. Blocks of one decode batch make each task small enough
    # for Ray Data's backpressure to hold decoding back (docs/benchmarks.md, "Soak"). Streaming: no shuffle.
    dataset = dataset.repartition(target_num_rows_per_block=PREPARE_BATCH_ROWS)
    return dataset.map_batches(
        prepare_and_check,  # prepare_batch, then the copies marked (and unchanged refreshed rows dropped)
        fn_kwargs={"settings": settings, "selection": selection},
        batch_size=PREPARE_BATCH_ROWS,
        # WebDataset blocks are pandas frames of raw bytes; converting them to Arrow here gains nothing.
        batch_format="pandas" if source.format == "webdataset" else "pyarrow",
        concurrency=config.compute.decode_concurrency,
        num_cpus=PREPARE_CPUS,
        memory=memory,
        udf_modifying_row_count=selection.refresh_changed,
    )


def _embed(
    dataset: Any,
    config: JobConfig,
    source: SourceSpec,
    storage_options: dict[str, Any],
    counter: Any,
    selection_counter: Any = None,  # a hosted row_selection.SelectionCounter: rows through the image model
    input_rows: int | None = None,
) -> Any:
    import ray
    from ray.data import ActorPoolStrategy

    from pipeline.model.actor import EmbedActor
    from pipeline.model.settings import EmbedSettings

    resources = ray.cluster_resources()
    gpus = gpus_per_actor(config, resources, _scalable_resources())
    cpus = actor_cpus(config, resources.get("CPU", 0.0))
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    threads = actor_threads(config, resources.get("CPU", 0.0), max(1, nodes), gpus)
    settings = EmbedSettings.from_job(
        config,
        multi_caption=source.multi_caption,
        captions=source.has_captions,
        threads=threads,
        num_gpus=gpus,
        storage_options=storage_options,
        run_id=config.run_id,
        package_version=package_version(),
        extra_metadata={"input": {"format": source.format, "uri": config.input.uri}},
        expected_rows=None if input_rows is None else math.ceil(input_rows / config.compute.num_actors),
    )
    return dataset.map_batches(
        EmbedActor,
        fn_constructor_kwargs={"settings": settings, "progress": counter, "counter": selection_counter},
        compute=ActorPoolStrategy(size=config.compute.num_actors),
        batch_size=config.compute.batch_size,
        batch_format="pyarrow",
        num_gpus=gpus,
        num_cpus=cpus,
        udf_modifying_row_count=False,
    )


def gpus_per_actor(config: JobConfig, current: dict[str, float], scalable: dict[str, float] | None) -> float:
    """GPUs each model actor reserves: `compute.gpus_per_actor`, else one when the cluster has GPUs now or its
    autoscaler can add GPU nodes (`scalable`: the most of each resource its node types reach, when it says).

    An autoscaling cluster scaled to zero shows no GPU at submission, and its head (`num-cpus: 0`) no CPU either:
    the actors would reserve nothing, never make the autoscaler add a GPU node, and could land on the head. When
    nothing tells which workers the cluster can add, the job is refused with what to set.
    """
    configured = config.compute.gpus_per_actor
    if configured is not None:
        return float(configured)
    if current.get("GPU", 0) > 0 or (scalable or {}).get("GPU", 0) > 0:
        return 1.0
    if current.get("CPU", 0) <= 0 and not (scalable or {}).get("CPU", 0):
        raise RuntimeError(
            "the cluster has no worker nodes yet (it autoscales from zero) and does not say which it can add: "
            "set compute.gpus_per_actor (1 for GPU workers, 0 for CPU workers; --set compute.gpus_per_actor=1)"
        )
    return 0.0


def _scalable_resources() -> dict[str, float] | None:
    """The most of each resource the cluster's node groups can reach, where something writes them to the GCS
    (hosted Ray clusters do; the open-source autoscalers of Ray 2.60 do not, so the job files in infra/ set
    `compute.gpus_per_actor`); None where nothing does (then only what is up now counts)."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config()
    except Exception:  # a private API: absent or changed in another Ray version means "not reported"
        return None


def actor_threads(config: JobConfig, cluster_cpus: float, nodes: int, gpus_per_actor: float) -> int | None:
    """Torch threads per model actor (None: leave Ray's choice, one per reserved CPU).

    On a CPU-only cluster the model is the bottleneck by far (sam3 at 336 px in bfloat16: ~1.2 s per image on 2
    cores, while decoding and resizing a 12-megapixel JPEG takes ~0.12 s on one core, a 1000 px one a few ms), so
    each actor runs as many threads as its node has CPUs shared among the node's actors. Ray still reserves fewer
    CPUs for it (`actor_cpus`), so decoding tasks get scheduled; they take their share from the model's threads.
    """
    if config.compute.threads_per_actor is not None:
        return config.compute.threads_per_actor
    if gpus_per_actor > 0 or cluster_cpus <= 0:
        return None
    actors_per_node = -(-config.compute.num_actors // nodes)
    return max(1, int(cluster_cpus / nodes) // actors_per_node)


def actor_cpus(config: JobConfig, cluster_cpus: float) -> float:
    """CPUs each model actor reserves: as configured, unless that would starve the CPU stage.

    Actors hold their CPUs for the whole run. Reading, decoding and writing need at least one more CPU, and a
    resumed run also needs one for Ray Data's checkpoint filter actor; without them a small cluster (a 2-core
    laptop) waits forever. There the reservation shrinks to what is left (it is only a scheduling hint: on a CPU
    the model still runs).
    """
    wanted = config.compute.cpus_per_actor
    if cluster_cpus <= 0:
        # No CPU is up yet (an autoscaling cluster at zero, its head reserving none): the autoscaler adds nodes
        # for what the actors ask, so they ask for what is configured; shrinking it to 0 would let them land
        # on the head.
        return wanted
    others = 1.0 + (1.0 if config.resume_path else 0.0)
    spare = max(0.0, cluster_cpus - others) / config.compute.num_actors
    if wanted <= spare:
        return wanted
    logger.warning(
        "compute.cpus_per_actor=%s leaves no CPU for decoding on this %s-CPU cluster; reserving %s per model actor",
        wanted,
        cluster_cpus,
        spare,
    )
    return spare


def _write(dataset: Any, config: JobConfig, output: Location, storage_options: dict[str, Any]) -> None:
    """Partitioned Parquet, rows gathered per partition value first (`pipeline.run.file_groups`): at most
    ceil(rows / min_rows_per_file) + 1 files per partition, the first ones within a minute."""
    from pipeline.run.file_groups import write_grouped

    write_grouped(
        dataset,
        output.path,
        arrow_filesystem(output.protocol, storage_options),
        list(config.output.partition_by),
        config.output.min_rows_per_file,
        config.output.compression,
    )


def _scan_output(
    output: Location, storage_options: dict[str, Any]
) -> tuple[dict[str, int], int, str | None, list[str]]:
    """Status counts over every data file (earlier attempts included), the file count, the checkpoint digest, and
    the distinct compile fallbacks the files' metadata record."""
    from pipeline.dataset.reader import open_dataset, run_metadata_from_file

    files = data_files(output, storage_options)
    if not files:
        return {}, 0, None, []
    filesystem = arrow_filesystem(output.protocol, storage_options)
    dataset = open_dataset(output, files, filesystem)
    statuses = dataset.to_table(columns=[schema.STATUS]).column(schema.STATUS)
    counts = {item["values"]: item["counts"] for item in statuses.value_counts().to_pylist()}
    metadata = run_metadata_from_file(files[0], filesystem)
    checkpoint_sha = (metadata.get("model") or {}).get("checkpoint_sha256")
    return counts, len(files), checkpoint_sha, compile_fallbacks(dataset)


def compile_fallbacks(dataset: Any) -> list[str]:
    """Distinct `model.compile_fallback` reasons over the files' footers (each actor records its own)."""
    reasons: list[str] = []
    for fragment in dataset.get_fragments():
        raw = (fragment.physical_schema.metadata or {}).get(schema.METADATA_KEY)
        reason = (json.loads(raw).get("model") or {}).get("compile_fallback") if raw else None
        if reason and reason not in reasons:
            reasons.append(reason)
    return reasons


def _commit(output: Location, summary: RunSummary, storage_options: dict[str, Any]) -> None:
    """Summary first, then `_SUCCESS` in every partition directory and at the root: readers trust only markers."""
    fs = fsspec_filesystem(output.protocol, storage_options)
    fs.pipe_file(output.join(schema.SUMMARY_FILE).path, json.dumps(summary.to_dict(), indent=2).encode())
    write_markers(output, storage_options)
