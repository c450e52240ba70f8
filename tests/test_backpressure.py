"""What a run lets pile up between decoding and the model: a bound that follows the model, not the cluster.

The figures (memory flat, nothing spilled) come from `bench/soak.py` (docs/benchmarks.md, "Soak"); these tests
pin the bound itself and that a run sets it only for its own datasets.
"""

from __future__ import annotations

import pytest

from pipeline.config import JobConfig
from pipeline.run.job import IN_FLIGHT_FLOOR, PREPARE_BATCH_ROWS, _bounded_in_flight, in_flight_limit


def job(imgsz: int, actors: int, batch: int) -> JobConfig:
    return JobConfig.from_dict({"model": {"imgsz": imgsz}, "compute": {"num_actors": actors, "batch_size": batch}})


def test_the_in_flight_limit_holds_some_batches_per_model_actor_and_no_more() -> None:
    row = 1008 * 1008 * 3  # a decoded row at the default size: 3 MB
    eight_gpus = in_flight_limit(job(1008, 8, 16))
    assert 8 * 16 * 4 * row < eight_gpus < 8 * 16 * 16 * row  # several batches per actor, not the whole store
    assert eight_gpus < 8 * 1024**3  # Ray Data's default would be half the object store: tens of GiB there
    assert in_flight_limit(job(224, 1, 8)) == IN_FLIGHT_FLOOR  # small images: room for every operator's blocks
    assert in_flight_limit(job(1008, 1, 8)) >= 2 * PREPARE_BATCH_ROWS * row  # a decode task's output always fits


def test_the_limit_applies_to_the_runs_datasets_only_and_a_limit_set_by_the_caller_wins() -> None:
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    before = options.resource_limits
    config = job(1008, 2, 16)
    with _bounded_in_flight(config):
        assert options.resource_limits.object_store_memory == in_flight_limit(config)
    assert options.resource_limits == before
    options.resource_limits = before.copy(object_store_memory=123 * 1024**2)
    try:
        with _bounded_in_flight(config):
            assert options.resource_limits.object_store_memory == 123 * 1024**2
    finally:
        options.resource_limits = before


@pytest.mark.parametrize("imgsz", [224, 1008])
def test_every_operator_fits_one_block_under_the_limit(imgsz: int) -> None:
    """A decode task's output block (PREPARE_BATCH_ROWS rows) and a model batch fit with room to spare, so the
    bound slows decoding down but never stalls the run."""
    config = job(imgsz, 1, 16)
    row = imgsz * imgsz * 3
    assert in_flight_limit(config) >= 4 * max(PREPARE_BATCH_ROWS, 16) * row


def test_block_splitting_a_decode_task_and_a_write_task_fit_on_two_cpus_together() -> None:
    """Ray Data reserves each stage's smallest task for it, upstream first; a stage whose minimum no longer fits
    waits for an upstream stage to end. The block splitting in front of the CPU stage (a whole CPU, Ray Data's
    default, not settable), a decode task and the grouping-and-write step must fit together on the smallest
    cluster we run on, or no file is written before the splitting ends (328 s into a 100,000-row soak)."""
    from pipeline.run.file_groups import WRITE_CPUS
    from pipeline.run.job import PREPARE_CPUS

    splitting_cpus = 1.0
    assert splitting_cpus + PREPARE_CPUS + WRITE_CPUS <= 2.0


@pytest.mark.timeout(300)
def test_a_parquet_file_read_as_one_block_is_decoded_by_many_small_tasks(ray_local: None, tmp_path) -> None:
    """Ray reads a Parquet file of small JPEGs as one block; decoded by one task, its pixels (3 MB a row at
    1008 px) would all be in flight before backpressure could act. The CPU stage gets blocks of one batch."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline.input.sources import SourceSpec, input_protocol, input_uris, plan_source, read_source
    from pipeline.run.job import PREPARE_CPUS, _prepare, decode_memory
    from pipeline.run.preflight import preflight
    from pipeline.run.row_selection import start_copy_marking, stop_selection

    rows = 4 * PREPARE_BATCH_ROWS + 5
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((24, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    images = [{"bytes": buffer.getvalue(), "path": f"{i}.jpg"} for i in range(rows)]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(
        pa.table({"image": pa.array(images, image_type), "caption": [f"c{i}" for i in range(rows)]}),
        tmp_path / "m.parquet",
    )
    config = JobConfig.from_dict(
        {
            "input": {"uri": str(tmp_path / "m.parquet")},
            "output": {"uri": str(tmp_path / "out")},
            "model": {"config": "tiny", "imgsz": 56, "random_weights": True},
        }
    )
    plan = preflight(config)
    uris = input_uris(plan.config.input.uri)
    source, layout = plan_source(
        SourceSpec.from_config(plan.config.input, input_protocol(uris)), uris, None, plan.layout
    )
    read = read_source(source, uris, None, layout)
    assert read.materialize().num_blocks() == 1  # the premise: one block for the whole file
    selection = start_copy_marking(source)  # what a plain run passes
    try:
        prepared = _prepare(read, plan.config, source, {}, decode_memory(56), selection)
        # what a decode task reserves, as Ray Data records it (no public accessor)
        assert prepared._logical_plan.dag.ray_remote_args["num_cpus"] == PREPARE_CPUS
        prepared = prepared.materialize()
    finally:
        stop_selection(selection)
    assert prepared.count() == rows
    sizes = [meta.num_rows for bundle in prepared.iter_internal_ref_bundles() for meta in bundle.metadata]
    assert max(sizes) <= PREPARE_BATCH_ROWS and len(sizes) >= rows // PREPARE_BATCH_ROWS, sizes
