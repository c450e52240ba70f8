"""Incremental runs against a first run, side by side: model calls and wall time (docs/incremental.md).

    python bench/incremental.py --rows 20000

Tiny model configuration, random weights, on the CPU. Every run is a separate `sam3-embed run` process, timed
from its start to its exit, so each wall time includes Python, Ray and model start-up. Model calls are what the
model actors counted (rows whose image went through the backbone, `rows_computed` in `_summary.json`), never
derived from the input sizes. The runs:

* first:   N rows into an empty output with `--incremental`; 1% of them name images that do not exist yet
           (error rows, no model call);
* second:  the same input plus 10% new rows, `--incremental`;
* retry:   the missing images now exist, `--retry-errors`: the model must run on exactly those rows;
* repeats: N rows of which 30% repeat another row's image bytes, into a fresh output with `--incremental`: the
           model must run on 70%;
* repeats_plain: the same rows as a plain run (no `--incremental`) into another fresh output: 70% as well.

`--repeats-only` runs the last two alone (their figures do not depend on the others). `--pairs K` runs the first
and second runs K times, each pair into a fresh output, and reports every pair's wall ratio and their median.

`--cluster`: every run joins one Ray head started before the first (`ray start --head`, as many CPUs as the
machine, Ray's own settings) instead of starting a local cluster of its own: how the nightly job of
infra/kuberay/backfill-cronjob.yaml runs, submitted to a long-lived cluster. A run's own start-up (Python, joining
the cluster, planning, its actors) is still in its wall time; the cluster's boot and stop are not.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the package, not bench/pipeline.py beside this script

from pipeline.run.incremental import RUN_COUNT_KEYS  # noqa: E402


def write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"img{i:06d}.jpg"
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=80)
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def write_manifest(path: Path, rows: list[tuple[str, str]]) -> Path:
    table = pa.table(
        {
            "id": [row_id for row_id, _ in rows],
            "image": [image for _, image in rows],
            "caption": [f"a photo numbered {row_id}" for row_id, _ in rows],
        }
    )
    pq.write_table(table, path)
    return path


def run(
    manifest: Path,
    output: Path,
    imgsz: int,
    batch_size: int,
    *flags: str,
    log: Path | None = None,
    cluster_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "jobs.cli", "run", "--input", str(manifest), "--output", str(output),
        "--model-config", "tiny", "--imgsz", str(imgsz), "--random-weights", "--batch-size", str(batch_size),
        "--max-error-fraction", "0.5", *flags,
    ]  # fmt: skip
    base = cluster_env if cluster_env is not None else os.environ
    environment = {**base, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    began = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=REPO)
    wall = time.monotonic() - began
    if log is not None:  # the run's own log lines carry timestamps: where its wall time went
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(result.stderr)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"run failed with exit code {result.returncode}: {' '.join(command)}")
    summary = json.loads((output / "_summary.json").read_text())
    # a plain run's summary holds the counts that apply to it (rows, computed, copied), not the dataset's
    return {"wall_s": round(wall, 1), **{k: summary[k] for k in RUN_COUNT_KEYS if k in summary}}


@contextlib.contextmanager
def running_cluster() -> Iterator[dict[str, str]]:
    """A Ray head for every run of `--cluster`, in its own session and temp dir (stopped by process group at the
    end, no other Ray on the machine touched); yields the environment a run needs to join it."""
    temp_dir = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Ray's socket paths must fit in ~107 bytes
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"  # this environment's Ray
    command = [
        ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
        f"--num-cpus={os.cpu_count()}", "--num-gpus=0", "--include-dashboard=false", f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]  # fmt: skip
    head = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    client_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    try:
        joined = "import ray; ray.init(logging_level='ERROR'); ray.shutdown()"
        for _ in range(30):  # until the head answers (seconds); the runs are timed from a ready cluster
            with contextlib.suppress(subprocess.TimeoutExpired):
                probe_run = subprocess.run(
                    [sys.executable, "-c", joined], env=client_env, capture_output=True, timeout=60
                )
                if probe_run.returncode == 0:
                    break
            if head.poll() is not None:
                raise SystemExit(f"ray start --head exited with {head.returncode}")
            time.sleep(1)
        else:
            raise SystemExit("the Ray head did not answer within 30 tries")
        yield client_env
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return ",".join(flag for flag in wanted if f" {flag}" in flags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--imgsz", type=int, default=224)  # the demo's size for tiny
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workdir", help="scratch folder (default: a temporary one, removed at the end)")
    parser.add_argument("--skip-retry-and-repeats", action="store_true", help="only the first and second runs")
    parser.add_argument("--repeats-only", action="store_true", help="only the two runs with repeated images")
    parser.add_argument("--log-dir", help="keep each run's log (stderr, timestamped lines) in this folder")
    parser.add_argument(
        "--pairs",
        type=int,
        default=1,
        help="first and second runs this many times, each pair into a fresh output (a wall ratio moves by several "
        "points from one pair to the next on a shared machine); reports every pair's ratio and the median",
    )
    parser.add_argument(
        "--cluster", action="store_true", help="every run joins one Ray head started first (the nightly job's setup)"
    )
    args = parser.parse_args()
    n = args.rows
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sam3-incremental-"))
    stack = contextlib.ExitStack()
    try:
        cluster_env = stack.enter_context(running_cluster()) if args.cluster else None
        new_count, failed_count = n // 10, n // 100
        images = write_images(root / "images", n + new_count)
        missing = {i: root / "late" / f"img{i:06d}.jpg" for i in range(0, n, 100)[:failed_count]}
        first_rows = [(f"r{i}", str(missing.get(i, images[i]))) for i in range(n)]
        second_rows = first_rows + [(f"r{i}", str(images[i])) for i in range(n, n + new_count)]
        dataset = root / "dataset"

        def embed(name: str, manifest: Path, output: Path, *flags: str) -> dict[str, Any]:
            """One `sam3-embed run`, its log kept as NAME.log under --log-dir (if given)."""
            log = Path(args.log_dir) / f"{name}.log" if args.log_dir else None
            return run(manifest, output, args.imgsz, args.batch_size, *flags, log=log, cluster_env=cluster_env)

        results: dict[str, Any] = {}
        report: dict[str, Any] = {
            "rows": n,
            "imgsz": args.imgsz,
            "batch_size": args.batch_size,
            "cpu": {"cores": os.cpu_count(), "flags": cpu_flags()},
            "cluster": "one Ray head for every run" if args.cluster else "a local cluster per run",
            "runs": results,
        }
        if not args.repeats_only:
            m1, m2 = write_manifest(root / "m1.parquet", first_rows), write_manifest(root / "m2.parquet", second_rows)
            results["first"] = embed("first", m1, dataset, "--incremental")
            results["second"] = embed("second", m2, dataset, "--incremental")
            first, second = results["first"], results["second"]
            report["second_over_first_model_calls"] = round(second["rows_computed"] / first["rows_computed"], 4)
            report["second_over_first_wall"] = round(second["wall_s"] / first["wall_s"], 4)
            if args.pairs > 1:
                pairs = [{"first_s": first["wall_s"], "second_s": second["wall_s"]}]
                for k in range(2, args.pairs + 1):
                    output = root / f"dataset-{k}"
                    first_k = embed(f"first-{k}", m1, output, "--incremental")
                    second_k = embed(f"second-{k}", m2, output, "--incremental")
                    pairs.append({"first_s": first_k["wall_s"], "second_s": second_k["wall_s"]})
                for pair in pairs:
                    pair["wall_ratio"] = round(pair["second_s"] / pair["first_s"], 4)
                report["pairs"] = pairs
                report["median_wall_ratio"] = statistics.median(pair["wall_ratio"] for pair in pairs)
        if not args.skip_retry_and_repeats and not args.repeats_only:
            (root / "late").mkdir()
            for i, path in missing.items():
                shutil.copyfile(images[i], path)
            results["retry"] = embed("retry", root / "m2.parquet", dataset, "--retry-errors")
            report["retry_model_calls"] = results["retry"]["rows_computed"]
            report["retry_expected"] = failed_count
        if not args.skip_retry_and_repeats:
            distinct = n - (3 * n) // 10
            repeat_rows = [(f"d{i}", str(images[i if i < distinct else (i * 7919) % distinct])) for i in range(n)]
            manifest = write_manifest(root / "m3.parquet", repeat_rows)
            for name, output, flags in (("repeats", "repeats", ["--incremental"]), ("repeats_plain", "plain", [])):
                results[name] = embed(name, manifest, root / output, *flags)
                report[f"{name}_model_calls_fraction"] = round(results[name]["rows_computed"] / n, 4)
        print(json.dumps(report, indent=1))
    finally:
        stack.close()
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
