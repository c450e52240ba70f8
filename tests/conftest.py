"""Shared fixtures: a real S3 endpoint (moto's server on loopback) and one local Ray session per test run.

The suite must stay under 12 minutes on a 2-core AVX2 CI machine; what costs there is starting Ray and new Python
processes that import torch. A new test:
- runs the pipeline in-process on the shared cluster (`ray_local`), never its own `ray.init`;
- runs a driver subprocess (`python -m jobs.cli run ...`) with `env=ray_driver_env` so it joins that cluster,
  unless the test is about the embedded local default (tests/test_cli.py's demo, tests/test_interrupts.py);
- uses the tiny configuration, random weights or a written checkpoint, images of a few dozen pixels at `imgsz` 56,
  a handful of rows, and shares one run between assertions through a module fixture where they read one output;
- stays eager (conftest sets SAM3_CPU_AUTO_DTYPE=float32) unless it is about compilation;
- waits for the state it needs (a file, a log line) by polling, never with a fixed sleep;
- has a `pytest.mark.timeout` when it starts Ray, a subprocess or a server.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# `dtype: auto` picks bfloat16 (and so compiles) on a CPU with native bfloat16; tests that do not test that choice
# run in float32, eagerly, as on any CPU. Set before Ray starts so its workers inherit it.
os.environ.setdefault("SAM3_CPU_AUTO_DTYPE", "float32")

_DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _moto_server_command(port: int) -> list[str]:
    executable = shutil.which("moto_server")
    if executable:
        return [executable, "-H", "127.0.0.1", "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


def _wait_until_answering(url: str, process: subprocess.Popen, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited early with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer means the server is up
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not answer at {url} within {deadline_s}s")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL of a moto S3 server running on 127.0.0.1 for the whole test session."""
    saved_env = {key: os.environ.get(key) for key in _DUMMY_AWS_ENV}
    os.environ.update(_DUMMY_AWS_ENV)
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(_moto_server_command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_until_answering(endpoint + "/", process, deadline_s=30)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh, empty bucket on the moto server; the test owns it."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    client = boto3.client("s3", endpoint_url=s3_server, region_name=_DUMMY_AWS_ENV["AWS_DEFAULT_REGION"])
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where pipeline workers cache model checkpoints during the tests (never the user's ~/.cache)."""
    return tmp_path_factory.mktemp("sam3-embed-cache")


@pytest.fixture(scope="session")
def ray_local(model_cache_dir: Path) -> Iterator[None]:
    """One small local Ray cluster shared by every test that needs Ray (starting Ray costs seconds)."""
    import ray

    if ray.is_initialized():
        yield
        return
    # Workers take their environment from the cluster, not from later changes in the driver: set it all now.
    repo_root = str(Path(__file__).resolve().parents[1])
    python_path = os.pathsep.join(p for p in (repo_root, os.environ.get("PYTHONPATH")) if p)
    worker_env = {"PYTHONPATH": python_path, "SAM3_EMBED_CACHE": str(model_cache_dir), **_DUMMY_AWS_ENV}
    os.environ["PYTHONPATH"] = python_path
    os.environ["SAM3_EMBED_CACHE"] = str(model_cache_dir)
    for key, value in _DUMMY_AWS_ENV.items():
        os.environ.setdefault(key, value)
    from pipeline.run.console import keep_idle_workers, stop_ray

    keep_idle_workers()  # kept as a run's own local cluster keeps them (`start_ray`)
    ray.init(
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        object_store_memory=512 * 1024 * 1024,
        runtime_env={"env_vars": worker_env},
        ignore_reinit_error=True,
    )
    try:
        yield
    finally:
        stop_ray()


@pytest.fixture(scope="session")
def ray_driver_env(ray_local: None) -> dict[str, str]:
    """Environment for a driver in a subprocess (`python -m jobs.cli run ...`) that joins the shared cluster
    through RAY_ADDRESS instead of starting a local one: a local Ray costs a few seconds of both cores to start
    and stop. Tests about the embedded local default (interrupts, `demo`) leave RAY_ADDRESS out instead."""
    import ray

    return {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}


@pytest.fixture(params=["local", "s3"])
def storage_root(request: pytest.FixtureRequest, tmp_path: Path):
    """An empty output root for the backfill protocol: a local directory, or a prefix in a fresh moto bucket."""
    from pipeline.storage import Location

    if request.param == "local":
        return Location.parse(str(tmp_path / "out"))
    endpoint = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return Location.parse(f"s3://{bucket}/out", {"client_kwargs": {"endpoint_url": endpoint}})


@pytest.fixture
def bucket(s3_server: str, s3_bucket: str):
    """The fresh bucket wrapped for reading and writing objects (tests/s3_bucket.py)."""
    from tests.s3_bucket import S3Bucket

    return S3Bucket(s3_server, s3_bucket)
