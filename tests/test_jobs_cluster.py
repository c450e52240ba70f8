"""The entry points against real Ray clusters and moto's S3 server.

This module starts its own Ray head (`ray start --head --block` in its own session and temp dir, token auth with
a private token, stopped by process group at the end) and never calls `ray.init` in the test process, so it
cannot collide with the in-process cluster of the `ray_local` fixture. Drivers run as subprocesses: through
`ray job submit`, or as `python -m jobs....` with RAY_ADDRESS pointing at the head (or at `local` for drivers
that start their own cluster).
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline import read_embeddings
from tests.s3_bucket import S3Bucket

REPO = Path(__file__).resolve().parents[1]
IMGSZ = 56


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: every socket stays bound until all are chosen, so none repeats."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class RayHead:
    gcs_address: str
    dashboard_url: str
    env: dict[str, str]  # what a client needs: auth token, AWS test credentials, no stray RAY_ADDRESS
    log: Path


def dashboard_get(head: RayHead, path: str) -> Any:
    request = urllib.request.Request(
        head.dashboard_url + path, headers={"Authorization": f"Bearer {head.env['RAY_AUTH_TOKEN']}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def job_info(head: RayHead, submission_id: str) -> dict[str, Any]:
    """The job's record from the dashboard's REST API (what `ray job status` prints)."""
    return dashboard_get(head, f"/api/jobs/{submission_id}")


def _wait_for_dashboard(head: RayHead, process: subprocess.Popen, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray head exited with {process.returncode}:\n{head.log.read_text()[-3000:]}")
        try:
            dashboard_get(head, "/api/version")
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise RuntimeError(f"ray dashboard did not answer within {deadline_s}s:\n{head.log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def ray_head(s3_server: str) -> Iterator[RayHead]:
    # A short temp dir: Ray's Unix sockets live under it and socket paths are limited to ~107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    gcs_port, dashboard_port, client_port, agent_port, agent_grpc_port, metrics_port, env_agent_port = free_ports(7)
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # tear down at once at the end of the module
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
    )
    command = [
        shutil.which("ray") or "ray",
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs_port}",
        "--num-cpus=2",
        "--num-gpus=0",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        # Every port Ray would otherwise take at a fixed default, so a second cluster on this machine is no bother.
        f"--ray-client-server-port={client_port}",
        f"--dashboard-agent-listen-port={agent_port}",
        f"--dashboard-agent-grpc-port={agent_grpc_port}",
        f"--metrics-export-port={metrics_port}",
        f"--runtime-env-agent-port={env_agent_port}",
        "--object-store-memory=400000000",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    log = Path(temp_dir) / "head.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}", env, log)
    try:
        _wait_for_dashboard(head, process, deadline_s=60)
        yield head
    finally:
        _stop_process_group(process, grace_s=15)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_process_group(process: subprocess.Popen, grace_s: float) -> None:
    """Stop the head and everything it started: they share its session (process group), nobody else's."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


# Test data ---------------------------------------------------------------------------------------------------------


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (36, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def parquet_bytes(rows: list[dict[str, Any]]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def manifest_rows(bucket: S3Bucket, ids: list[str]) -> list[dict[str, Any]]:
    rows = []
    for row_id in ids:
        seed = int.from_bytes(row_id.encode(), "little") % 10_000
        rows.append(
            {"id": row_id, "image": bucket.put(f"images/{row_id}.jpg", jpeg(seed)), "caption": f"item {row_id}"}
        )
    return rows


def write_job_file(directory: Path, bucket: S3Bucket, **sections: Any) -> Path:
    data: dict[str, Any] = {
        "input": {"format": "manifest"},
        "model": {"config": "tiny", "imgsz": IMGSZ, "random_weights": True},
        "compute": {"batch_size": 2, "num_actors": 1},
        "s3": {"endpoint_url": bucket.endpoint, "region": "us-east-1"},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values} if isinstance(values, dict) else values
    path = directory / f"job-{secrets.token_hex(3)}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def driver_env(head: RayHead | None, address: str) -> dict[str, str]:
    env = dict(head.env) if head else {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_ADDRESS"] = address
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def run_module(module: str, args: list[str], env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}"


def ids_in(table: pa.Table) -> list[str]:
    return table.column("id").to_pylist()


# ray job submit ----------------------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_ray_job_submit_embeds_a_manifest_from_s3_to_s3(ray_head: RayHead, bucket: S3Bucket, tmp_path: Path) -> None:
    ids = [f"sub{i}" for i in range(5)]
    manifest = bucket.put("manifests/products.parquet", parquet_bytes(manifest_rows(bucket, ids)))
    job_file = write_job_file(tmp_path, bucket, input={"uri": manifest}, output={"uri": bucket.uri("embeddings")})
    report = tmp_path / "report.json"
    submission_id = f"sam3-embed-test-{secrets.token_hex(4)}"

    submit = subprocess.run(
        [
            shutil.which("ray") or "ray",
            "job",
            "submit",
            "--address",
            ray_head.dashboard_url,
            "--submission-id",
            submission_id,
            "--working-dir",
            ".",
            "--",
            "python",
            "-m",
            "jobs.embed",
            "--config",
            str(job_file),
            "--report",
            str(report),
        ],
        cwd=REPO,
        env=ray_head.env,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert submit.returncode == 0, explain(submit)
    assert "exit code 0 (ok)" in submit.stdout  # the entry point's summary, streamed from the job's log

    assert job_info(ray_head, submission_id)["status"] == "SUCCEEDED"

    summary = json.loads(report.read_text())
    assert (summary["rows_total"], summary["rows_error"], summary["exit_code"]) == (5, 0, 0)
    assert "embeddings/_SUCCESS" in bucket.keys("embeddings")
    table = read_embeddings(bucket.uri("embeddings"), storage_options=bucket.storage_options)
    assert sorted(ids_in(table)) == sorted(ids)
    vectors = np.asarray(table.column("image_embedding").to_pylist(), dtype=np.float32)
    assert vectors.shape == (5, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)


# backfill with a failing partition ---------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_backfill_commits_good_partitions_reports_the_failed_one_and_retries_it(
    ray_head: RayHead, bucket: S3Bucket, tmp_path: Path
) -> None:
    days = ["2025-01-01", "2025-01-02", "2025-01-03"]
    ids_by_day = {day: [f"{day}-{i}" for i in range(3)] for day in days}
    for day in days:
        bucket.put(f"events/date={day}/manifest.parquet", parquet_bytes(manifest_rows(bucket, ids_by_day[day])))
    # The middle day's manifest is damaged: that partition must fail without touching the others.
    bucket.put("events/date=2025-01-02/manifest.parquet", b"PAR1 this is not a parquet file")
    job_file = write_job_file(
        tmp_path, bucket, input={"uri": bucket.uri("events/")}, output={"uri": bucket.uri("embeddings/events")}
    )
    args = ["--config", str(job_file), "--partition-column", "date", "--partitions", "2025-01-01..2025-01-03"]
    env = driver_env(ray_head, ray_head.gcs_address)

    first = run_module("jobs.backfill", [*args, "--run-id", "first", "--report", str(tmp_path / "1.json")], env, 240)
    assert first.returncode == 1, explain(first)
    report = json.loads((tmp_path / "1.json").read_text())
    statuses = {r["partition"]: r["status"] for r in report["results"]}
    assert statuses == {"2025-01-01": "committed", "2025-01-02": "failed", "2025-01-03": "committed"}
    failed = next(r for r in report["results"] if r["status"] == "failed")
    assert failed["message"]  # the reason is reported, not just the status
    assert "2025-01-02" in first.stdout and "failed" in first.stdout

    keys = bucket.keys("embeddings/events")
    assert "embeddings/events/date=2025-01-01/_SUCCESS" in keys
    assert "embeddings/events/date=2025-01-03/_SUCCESS" in keys
    assert not [k for k in keys if k.startswith("embeddings/events/date=2025-01-02/")]
    visible = read_embeddings(bucket.uri("embeddings/events"), storage_options=bucket.storage_options)
    assert sorted(ids_in(visible)) == sorted(ids_by_day["2025-01-01"] + ids_by_day["2025-01-03"])
    manifest_day1 = bucket.read_json("embeddings/events/date=2025-01-01/_SUCCESS")
    assert manifest_day1["run_id"] == "first" and manifest_day1["rows"] == 3

    # Repair the day (one of its images is unreadable: an error row, not a failure) and run the same command.
    repaired = manifest_rows(bucket, ids_by_day["2025-01-02"][:2])
    repaired.append({"id": ids_by_day["2025-01-02"][2], "image": bucket.put("images/broken.jpg", b"not a jpeg")})
    bucket.put("events/date=2025-01-02/manifest.parquet", parquet_bytes(repaired))
    second = run_module("jobs.backfill", [*args, "--run-id", "second", "--report", str(tmp_path / "2.json")], env, 240)
    assert second.returncode == 3, explain(second)  # committed, with an error row
    report = json.loads((tmp_path / "2.json").read_text())
    statuses = {r["partition"]: r["status"] for r in report["results"]}
    assert statuses == {"2025-01-01": "skipped", "2025-01-02": "committed", "2025-01-03": "skipped"}

    table = read_embeddings(bucket.uri("embeddings/events"), storage_options=bucket.storage_options)
    all_ids = ids_in(table)
    assert len(all_ids) == len(set(all_ids)) == 9
    assert set(all_ids) == {i for day in days for i in ids_by_day[day]}
    errors = table.filter(pc.equal(table.column("status"), "error"))
    assert ids_in(errors) == [ids_by_day["2025-01-02"][2]]
    assert sorted(set(table.column("date").to_pylist())) == days  # the partition column comes from the directory
    # Committed partitions were not rewritten, and nothing is left in staging.
    assert bucket.read_json("embeddings/events/date=2025-01-01/_SUCCESS")["run_id"] == "first"
    assert bucket.read_json("embeddings/events/date=2025-01-02/_SUCCESS")["run_id"] == "second"
    assert not [k for k in bucket.keys("embeddings/events/_staging") if not k.endswith("/")]


# kill and resume ---------------------------------------------------------------------------------------------------


class SlowImageServer:
    """Serves JPEGs over HTTP with a delay per request, so a run takes long enough to be killed part way."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                time.sleep(owner.delay_s)
                body = jpeg(int(self.path.strip("/").split(".")[0]))
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with contextlib.suppress(OSError):  # the client may have been killed meanwhile
                    self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def uri(self, seed: int) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{seed}.jpg"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slow_image_server() -> Iterator[SlowImageServer]:
    server = SlowImageServer(delay_s=3.0)
    try:
        yield server
    finally:
        server.close()


def _rows_written(bucket: S3Bucket, prefix: str) -> int:
    rows = 0
    for key in bucket.keys(prefix):
        name = key.rsplit("/", 1)[-1]
        if key.endswith(".parquet") and not name.startswith(("_", ".")):
            rows += pq.ParquetFile(io.BytesIO(bucket.get(key))).metadata.num_rows
    return rows


def _checkpoint_committed(bucket: S3Bucket, prefix: str) -> bool:
    # Ray Data writes a `.pending` entry before a data file and the committed entry after it.
    return any(key.endswith(".parquet") and ".pending" not in key for key in bucket.keys(prefix))


@pytest.mark.timeout(300)
def test_a_killed_run_resumes_without_losing_or_duplicating_rows(
    ray_head: RayHead, bucket: S3Bucket, slow_image_server: SlowImageServer, tmp_path: Path
) -> None:
    from pipeline.run.job import PREPARE_BATCH_ROWS

    # Five CSV manifests of one CPU batch each (Ray reads CSV files as separate blocks, so each batch is written
    # on its own), images from a slow source (3 s a request, 16 in flight: about 6 s a batch). The driver is
    # killed once the first batch is written and checkpointed.
    ids = [f"row{i:03d}" for i in range(5 * PREPARE_BATCH_ROWS)]
    rows = [{"id": row_id, "image": slow_image_server.uri(i), "caption": f"item {i}"} for i, row_id in enumerate(ids)]
    for part in range(5):
        chunk = pa.Table.from_pylist(rows[part * PREPARE_BATCH_ROWS : (part + 1) * PREPARE_BATCH_ROWS])
        sink = pa.BufferOutputStream()
        pa_csv.write_csv(chunk, sink)
        bucket.put(f"manifests/big/part-{part}.csv", sink.getvalue().to_pybytes())
    job_file = write_job_file(
        tmp_path,
        bucket,
        input={"uri": bucket.uri("manifests/big/")},
        output={"uri": bucket.uri("out"), "min_rows_per_file": 2},
        compute={"batch_size": 8, "num_actors": 1},
        resume_path=bucket.uri("resume/big"),
    )
    env = driver_env(ray_head, ray_head.gcs_address)
    driver_log = tmp_path / "driver.log"
    with driver_log.open("wb") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "jobs.embed", "--config", str(job_file)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while not (_rows_written(bucket, "out") and _checkpoint_committed(bucket, "resume/big")):
            log_tail = driver_log.read_text(errors="replace")[-6000:]
            assert driver.poll() is None, f"the driver ended by itself (status {driver.returncode}):\n{log_tail}"
            assert time.monotonic() < deadline, f"no checkpointed output within 120s:\n{log_tail}"
            time.sleep(0.3)
        assert driver.poll() is None
        driver.send_signal(signal.SIGKILL)  # the driver dies with no cleanup, like a lost node or an OOM kill
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.wait()
    rows_at_kill = _rows_written(bucket, "out")
    assert 0 < rows_at_kill < len(ids)
    assert "out/_SUCCESS" not in bucket.keys("out")

    slow_image_server.delay_s = 0.0  # the source recovers
    report = tmp_path / "resumed.json"
    resumed = run_module("jobs.embed", ["--config", str(job_file), "--report", str(report)], env, 240)
    assert resumed.returncode == 0, explain(resumed)
    assert "resumed:" in resumed.stdout
    summary = json.loads(report.read_text())
    assert summary["rows_total"] == len(ids)
    assert 0 < summary["rows_this_run"] < len(ids)  # rows finished before the kill were not embedded again

    table = read_embeddings(bucket.uri("out"), storage_options=bucket.storage_options)
    written = ids_in(table)
    assert len(written) == len(set(written)), "duplicated rows after resume"
    assert sorted(written) == ids
    assert set(table.column("status").to_pylist()) == {"ok"}


# concurrent backfills ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_concurrent_backfills_write_each_partition_once(ray_head: RayHead, bucket: S3Bucket, tmp_path: Path) -> None:
    days = [f"2025-02-0{d}" for d in range(1, 5)]
    ids_by_day = {day: [f"{day}-{i}" for i in range(2)] for day in days}
    for day in days:
        bucket.put(f"events/date={day}/manifest.parquet", parquet_bytes(manifest_rows(bucket, ids_by_day[day])))
    job_file = write_job_file(
        tmp_path, bucket, input={"uri": bucket.uri("events/")}, output={"uri": bucket.uri("embeddings")}
    )
    # Two independent backfills, as two overlapping cron runs would be: separate drivers (separate Ray jobs) that
    # share nothing but the output, where only the leases keep them apart. They join the module's cluster: two
    # clusters of their own would cost both cores for their start-up alone, and the leases are the same.
    env = driver_env(ray_head, ray_head.gcs_address)
    runs = {}
    for name in ("a", "b"):
        args = ["--config", str(job_file), "--partition-column", "date", "--run-id", name]
        args += ["--report", str(tmp_path / f"{name}.json")]  # no --partitions: discovered from the input
        runs[name] = subprocess.Popen(
            [sys.executable, "-m", "jobs.backfill", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    outputs = {name: process.communicate(timeout=280) for name, process in runs.items()}
    for name, process in runs.items():
        assert process.returncode in (0, 4), f"{name}: exit {process.returncode}\n{outputs[name][1][-5000:]}"

    reports = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in runs}
    committed = {
        name: {r["partition"] for r in report["results"] if r["status"] == "committed"}
        for name, report in reports.items()
    }
    assert committed["a"].isdisjoint(committed["b"]), committed
    assert committed["a"] | committed["b"] == set(days)
    assert committed["a"] and committed["b"], f"the runs did not overlap: {committed}"
    for name, days_committed in committed.items():
        for day in days_committed:
            assert bucket.read_json(f"embeddings/date={day}/_SUCCESS")["run_id"] == name

    table = read_embeddings(bucket.uri("embeddings"), storage_options=bucket.storage_options)
    written = ids_in(table)
    assert len(written) == len(set(written)) == 8
    assert set(written) == {i for day in days for i in ids_by_day[day]}
