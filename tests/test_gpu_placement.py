"""Where the model runs and what happens when the device is short: GPUs asked for on autoscaling clusters, actors
that reserved a GPU but see no CUDA, actors that reserved none, out-of-memory batches, compile fallbacks made
visible. The cluster-facing parts are pure functions of what Ray reports; the actor parts run the real model stage.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import JobConfig
from pipeline.dataset import schema
from pipeline.model.embed import EmbedWorker, actor_device
from pipeline.run.job import actor_cpus, compile_fallbacks, gpus_per_actor
from pipeline.run.preflight import validate
from tests.test_pipeline_units import _embed_settings, _prepared_batch


def job(**compute) -> JobConfig:
    return JobConfig.from_dict({"compute": compute})


# --- GPUs and CPUs per actor ----------------------------------------------------------------------------------------


def test_actors_ask_for_a_gpu_when_the_autoscaler_can_add_gpu_nodes_although_none_is_up() -> None:
    head_only = {"CPU": 0.0, "memory": 1e10}  # the head with num-cpus 0, every worker group at zero
    assert gpus_per_actor(job(), head_only, {"GPU": 8, "CPU": 64}) == 1.0
    assert gpus_per_actor(job(), {"CPU": 16.0, "GPU": 2.0}, None) == 1.0  # GPUs up now
    assert gpus_per_actor(job(), {"CPU": 2.0}, None) == 0.0  # a laptop: the CPU
    assert gpus_per_actor(job(gpus_per_actor=0.5), head_only, None) == 0.5  # an explicit setting wins


def test_a_cluster_at_zero_that_does_not_say_what_it_can_add_is_refused_with_what_to_set() -> None:
    with pytest.raises(RuntimeError, match=r"set compute\.gpus_per_actor \(1 for GPU workers"):
        gpus_per_actor(job(), {"CPU": 0.0}, None)
    with pytest.raises(RuntimeError, match=r"compute\.gpus_per_actor"):
        gpus_per_actor(job(), {}, {})


def test_actors_keep_their_cpu_reservation_while_no_cpu_is_up() -> None:
    """A reservation shrunk to 0 on a cluster at zero would let actors land on the head and never scale a node."""
    assert actor_cpus(job(cpus_per_actor=4.0), 0.0) == 4.0
    assert actor_cpus(job(cpus_per_actor=1.0), 2.0) == 1.0  # a laptop still leaves decoding a CPU
    assert actor_cpus(job(cpus_per_actor=2.0, num_actors=1), 2.0) == 1.0


def test_more_than_one_gpu_per_actor_is_refused_before_the_cluster_starts() -> None:
    config = JobConfig.from_dict(
        {"input": {"uri": "in.jsonl"}, "output": {"uri": "out/"}, "model": {"random_weights": True}}
    )
    config.compute.gpus_per_actor = 2
    with pytest.raises(ValueError, match=r"compute\.gpus_per_actor must be between 0 and 1.*compute\.num_actors"):
        validate(config)
    config.compute.gpus_per_actor = 0.25  # four actors share a GPU: fine
    validate(config)


# --- the actor's device ---------------------------------------------------------------------------------------------


def test_an_actor_that_reserved_no_gpu_runs_on_the_cpu_even_where_cuda_is_visible() -> None:
    assert actor_device(0.0) == torch.device("cpu")
    assert actor_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")  # outside Ray: what is there


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_actor_that_reserved_a_gpu_but_sees_no_cuda_fails_loudly(tmp_path: Path) -> None:
    import dataclasses

    settings = dataclasses.replace(_embed_settings("off", ("image_embedding",), batch_size=2), num_gpus=1.0)
    with pytest.raises(RuntimeError, match=r"reserved 1 GPU but CUDA is not usable.*compute\.gpus_per_actor: 0"):
        EmbedWorker(settings)


# --- out of memory --------------------------------------------------------------------------------------------------


def _fails_above(worker: EmbedWorker, rows: int, device: str = "cuda") -> list[int]:
    """Makes the model run out of memory on batches of more than `rows` images: as a GPU does ("cuda"), or with
    the host allocator's own error, from a real allocation it refuses ("cpu"); returns the batch sizes it was
    called with."""
    real = worker.backbone.forward_vision_features
    calls: list[int] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        if len(x) > rows:
            if device == "cpu":
                torch.empty(1 << 62, dtype=torch.uint8)  # 4 EiB: more than any address space, refused at once
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(x)} GiB")
        return real(x)

    worker.backbone.forward_vision_features = forward
    return calls


@pytest.mark.timeout(120)
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_an_out_of_memory_batch_is_split_and_loses_no_row(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, device: str
) -> None:
    batch = _prepared_batch(tmp_path, missing_at=None, rows=5)
    worker = EmbedWorker(_embed_settings("off", ("image_embedding",), batch_size=5))
    expected = worker(batch)
    calls = _fails_above(worker, 2, device)
    with caplog.at_level(logging.WARNING, logger="pipeline.model.embed"):
        actual = worker(batch)
    assert calls == [5, 2, 3, 1, 2]  # halves until each part fits
    assert actual.column(schema.STATUS).to_pylist() == ["ok"] * 5
    np.testing.assert_allclose(
        np.asarray(actual.column("image_embedding").to_pylist()),
        np.asarray(expected.column("image_embedding").to_pylist()),
        atol=1e-6,
    )
    assert "lower compute.batch_size (now 5)" in caplog.text


@pytest.mark.timeout(120)
def test_an_image_that_alone_does_not_fit_fails_naming_the_setting(tmp_path: Path) -> None:
    worker = EmbedWorker(_embed_settings("off", ("image_embedding",), batch_size=2))
    _fails_above(worker, 0)
    with pytest.raises(RuntimeError, match=r"out of memory on a single image.*lower compute\.batch_size"):
        worker(_prepared_batch(tmp_path, missing_at=None, rows=2))


@pytest.mark.timeout(120)
def test_out_of_memory_in_the_warm_up_names_the_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    from sam3core.vl_backbone import SAM3VLBackbone

    def warm_up(self, batch_size: int, vision_features_only: bool = False) -> float:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(SAM3VLBackbone, "warm_up", warm_up)
    with pytest.raises(RuntimeError, match=r"out of memory warming up the model on a batch of 64.*compute\.batch_size"):
        EmbedWorker(_embed_settings("off", ("image_embedding",), batch_size=64))


# --- compile fallbacks --------------------------------------------------------------------------------------------


def _failing_backend(graph_module, example_inputs):
    raise RuntimeError("no C compiler found (cc)")


@pytest.mark.timeout(180)
def test_a_compile_fallback_reaches_the_files_metadata_and_the_run_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sam3core.build
    from jobs.embed import render_summary
    from sam3core.compile import CompilePlan

    monkeypatch.setattr(
        sam3core.build, "compile_plan", lambda *args: CompilePlan(enabled=True, backend=_failing_backend)
    )
    with pytest.warns(RuntimeWarning, match="running it eagerly"):
        worker = EmbedWorker(_embed_settings("on", ("image_embedding",), batch_size=2))
    out = worker(_prepared_batch(tmp_path, missing_at=None, rows=2))
    model = json.loads(out.schema.metadata[schema.METADATA_KEY])["model"]
    assert model["compiled_vision"] is False and "no C compiler found" in model["compile_fallback"]

    # two actors' files: one fell back, one compiled
    compiled = out.replace_schema_metadata(
        {schema.METADATA_KEY: json.dumps({"model": {"compile_fallback": None}}).encode()}
    )
    pq.write_table(out, tmp_path / "a.parquet")
    pq.write_table(compiled, tmp_path / "b.parquet")
    reasons = compile_fallbacks(ds.dataset([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]))
    assert len(reasons) == 1 and "no C compiler found" in reasons[0]
    text = render_summary(JobConfig(), {"rows_total": 2, "rows_error": 0, "compile_fallbacks": reasons}, 0)
    assert "compile:      FAILED, the model ran eagerly" in text and "no C compiler found" in text


def test_files_of_a_run_that_compiled_report_no_fallback(tmp_path: Path) -> None:
    table = pa.table({"x": [1]}).replace_schema_metadata(
        {schema.METADATA_KEY: json.dumps({"model": {"compile_fallback": None}}).encode()}
    )
    pq.write_table(table, tmp_path / "a.parquet")
    assert compile_fallbacks(ds.dataset(str(tmp_path / "a.parquet"))) == []


@pytest.mark.timeout(120)
def test_the_gpus_an_autoscaler_reports_it_can_add_are_read_from_the_cluster(ray_local: None) -> None:
    """Where the cluster's node groups are written to the GCS (as hosted Ray clusters do), a job submitted while
    every GPU node is down still asks for GPUs."""
    import ray._raylet
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    from pipeline.run.job import _scalable_resources

    namespace = ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE
    key = ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY
    assert _scalable_resources() is None  # a local cluster reports no node groups
    config = autoscaler_pb2.ClusterConfig()
    gpu_group = config.node_group_configs.add(name="gpu", min_count=0, max_count=8)
    gpu_group.resources.update({"CPU": 12, "GPU": 1})
    config.node_group_configs.add(name="cpu", min_count=0, max_count=4).resources.update({"CPU": 16})
    _internal_kv_put(key, config.SerializeToString(), overwrite=True, namespace=namespace)
    try:
        scalable = _scalable_resources()
        assert scalable is not None and scalable["GPU"] == 8 and scalable["CPU"] == 8 * 12 + 4 * 16
        assert gpus_per_actor(job(), {"CPU": 0.0}, scalable) == 1.0
    finally:
        _internal_kv_del(key, namespace=namespace)


def test_compile_threads_follow_the_containers_cpu_limit(tmp_path: Path) -> None:
    """A pod limited to 12 CPUs on a 192-core host must not start 32 compile workers (inductor counts the host)."""
    from pipeline.model.embed import cgroup_cpu_limit, usable_cpus

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("1200000 100000\n")
    assert cgroup_cpu_limit(str(v2)) == 12
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(str(v2)) is None
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(str(tmp_path / "v1")) == 2  # 1.5 CPUs: two workers
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(str(tmp_path / "v1")) is None
    (v2 / "cpu.max").write_text("100000 100000\n")
    assert usable_cpus(str(v2)) == 1
    assert usable_cpus(str(tmp_path / "none")) >= 1
