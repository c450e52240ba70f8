"""Soak: a long partitioned run, watched while it runs: memory of all its processes, object store and spill,
rows embedded, files written; then every row once, files per partition and the rate.

It writes a Hugging Face image Parquet (`image` = {bytes, path} of small JPEGs, a `caption`, and a `shard`
column with `--partitions` values), then runs `run_job` on a local Ray cluster started by the bench (as
`sam3-embed run` starts one), `--partition-by shard`, random weights, on the CPU. Every `--sample-s` seconds it
records the summed proportional set size (PSS, shared pages split between their users) of the driver and every
process descended from it (raylet, GCS, workers, the model actor), the object store's use and what Ray has
spilled, the rows the progress counter has seen and the data files in the output.

With `--reference-rows N`, a run of N rows goes first in the same process and cluster (same dataset shape), and
the long run's steady rate is compared with it. With `--stop-after-s S`, the long run is interrupted after S
seconds (to watch the start of a run too long to finish here, such as 1008 px on a CPU): the figures then cover
that window, and the rows written so far are still checked for duplicates.

    python bench/soak.py --rows 4000 --imgsz 224 --reference-rows 1000
    python bench/soak.py --rows 4000 --imgsz 1008 --stop-after-s 300
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import platform
import re
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from jobs.interrupts import descendants  # noqa: E402
from pipeline import JobConfig, run_job  # noqa: E402

ROWS_PER_FILE = 10_000  # manifest files
ROW_GROUP = 1_000  # Hugging Face writes image Parquet with row groups of this order


def write_dataset(root: Path, rows: int, partitions: int, rows_per_file: int = ROWS_PER_FILE) -> Path:
    root.mkdir(parents=True, exist_ok=True)

    # Every row a picture of its own (random pixels seeded by the row's number): a run embeds each distinct image
    # once and copies the rest, so repeated pictures would keep most rows away from the model.
    def jpeg(index: int) -> bytes:
        pixels = np.random.default_rng(index).integers(0, 255, (48, 64, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
        return buffer.getvalue()

    for start in range(0, rows, rows_per_file):
        stop = min(rows, start + rows_per_file)
        images = [{"bytes": jpeg(i), "path": f"img_{i:07d}.jpg"} for i in range(start, stop)]
        table = pa.table(
            {
                "image": pa.array(images, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                "caption": [f"picture number {i}" for i in range(start, stop)],
                "shard": [f"s{i % partitions}" for i in range(start, stop)],
            }
        )
        pq.write_table(table, root / f"train-{start // rows_per_file:05d}.parquet", row_group_size=ROW_GROUP)
    return root


def pss_bytes(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    match = re.search(r"^Pss:\s+(\d+) kB", text, flags=re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def rss_bytes(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, flags=re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def spill_bytes() -> int:
    """Bytes in Ray's spill directory (by default `ray_spilled_objects*` under the session directory)."""
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    return sum(
        path.stat().st_size for spill_dir in session.glob("*spill*") for path in spill_dir.rglob("*") if path.is_file()
    )


def object_store() -> tuple[float, float]:
    """(MiB in the object store, MiB spilled so far), from Ray's own memory summary."""
    import ray
    from ray._private.internal_api import memory_summary

    # this cluster's address: with other Ray clusters on the machine, Ray cannot tell which one is meant
    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    used = re.search(r"Plasma memory usage (\d+) MiB", text)
    spilled = re.search(r"Spilled (\d+) MiB", text)
    return (float(used.group(1)) if used else 0.0, float(spilled.group(1)) if spilled else 0.0)


@dataclass
class Sample:
    t: float
    pss_mib: float
    rss_mib: float
    processes: int
    store_mib: float
    spilled_mib: float
    spill_dir_mib: float
    rows: int
    files: int


class ProgressRows(logging.Handler):
    """Rows done, read from the pipeline's own progress lines."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = 0

    def emit(self, record: logging.LogRecord) -> None:
        match = re.search(r"rows (\d+)", record.getMessage())
        if match:
            self.rows = int(match.group(1))


@dataclass
class Watch:
    output: Path
    interval_s: float
    progress: ProgressRows
    samples: list[Sample] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        started = time.monotonic()
        while not self.stop.wait(self.interval_s):
            pids = [os.getpid(), *descendants(os.getpid())]
            try:
                store, spilled = object_store()
            except Exception:
                store, spilled = float("nan"), float("nan")
            files = len(list(self.output.rglob("*.parquet"))) if self.output.exists() else 0
            try:
                spill_dir = spill_bytes() / 2**20
            except Exception:
                spill_dir = float("nan")
            self.samples.append(
                Sample(
                    round(time.monotonic() - started, 1),
                    round(sum(pss_bytes(pid) for pid in pids) / 2**20, 1),
                    round(sum(rss_bytes(pid) for pid in pids) / 2**20, 1),
                    len(pids),
                    store,
                    spilled,
                    round(spill_dir, 1),
                    self.progress.rows,
                    files,
                )
            )


def files_per_partition(output: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in output.rglob("*.parquet"):
        counts[path.parent.name] = counts.get(path.parent.name, 0) + 1
    return dict(sorted(counts.items()))


def sampled_rate(samples: list[Sample]) -> float | None:
    started = [s for s in samples if s.rows > 0]
    if len(started) < 2 or started[-1].t <= started[0].t:
        return None
    return round((started[-1].rows - started[0].rows) / (started[-1].t - started[0].t), 2)


def one_run(args: argparse.Namespace, rows: int, work: Path, name: str, stop_after_s: float | None) -> dict[str, Any]:
    import pipeline.run.progress

    data = write_dataset(work / f"{name}-data", rows, args.partitions, args.rows_per_file)
    output = work / f"{name}-out"
    config = JobConfig.from_dict(
        {
            "input": {"uri": str(data)},
            "output": {
                "uri": str(output),
                "partition_by": ["shard"],
                "min_rows_per_file": args.min_rows_per_file,
            },
            "model": {"config": args.config, "imgsz": args.imgsz, "random_weights": True},
            "compute": {"batch_size": args.batch_size, "num_actors": 1},
            "resume_path": str(work / f"{name}-ckpt"),
        }
    )
    pipeline.run.progress.LOG_INTERVAL_S = args.sample_s
    progress = ProgressRows()
    logging.getLogger("pipeline.run.progress").addHandler(progress)
    logging.getLogger("pipeline.run.progress").setLevel(logging.INFO)
    if args.data_limit_mib is not None:  # an experiment: Ray Data's own object store limit for the dataset
        from ray.data import DataContext

        options = DataContext.get_current().execution_options
        options.resource_limits = options.resource_limits.copy(object_store_memory=args.data_limit_mib * 2**20)
    watch = Watch(output, args.sample_s, progress)
    watcher = threading.Thread(target=watch.run, daemon=True)
    watcher.start()
    timer = None
    if stop_after_s:
        import _thread

        # A shell starts a background job (`cmd &`, cron, nohup) with SIGINT ignored, and then interrupt_main does
        # nothing: the run would go on to its end. The timer needs Python's own handler.
        signal.signal(signal.SIGINT, signal.default_int_handler)

        timer = threading.Timer(stop_after_s, _thread.interrupt_main)
        timer.daemon = True  # a run that finishes first must not wait for it (nor be interrupted after)
        timer.start()
    started = time.monotonic()
    summary = None
    try:
        summary = run_job(config)
    except KeyboardInterrupt:
        print(f"{name}: interrupted after {stop_after_s}s, as asked", file=sys.stderr)
    elapsed = time.monotonic() - started
    if timer is not None:
        timer.cancel()
    watch.stop.set()
    watcher.join()
    logging.getLogger("pipeline.run.progress").removeHandler(progress)

    written = pq.ParquetDataset(str(output)).read(columns=["id"]) if list(output.rglob("*.parquet")) else None
    ids = written.column("id").to_pylist() if written is not None else []
    per_partition = files_per_partition(output)
    allowed = math.ceil(rows / args.partitions / args.min_rows_per_file) + 1
    first_rows = next((s.t for s in watch.samples if s.rows > 0), None)
    first_file = next((s.t for s in watch.samples if s.files > 0), None)
    settled = [s for s in watch.samples if s.t >= args.settle_s] or watch.samples
    half = len(settled) // 2
    result = {
        "name": name,
        "rows": rows,
        "interrupted": summary is None,
        "elapsed_s": round(elapsed, 1),
        "rows_written": len(ids),
        "distinct_ids": len(set(ids)),
        "every_row_once": summary is not None and len(ids) == rows and len(set(ids)) == rows,
        # rows whose image went through the model (counted by the model actors) and rows that got a copy
        "rows_computed": summary.rows_computed if summary else None,
        "rows_copied": summary.rows_copied if summary else None,
        "steady_rows_per_s": summary.steady_rows_per_s if summary else None,
        # from the samples: rows the progress counter saw, first rows to last sample (an interrupted run too)
        "sampled_rows_per_s": sampled_rate(watch.samples),
        "first_progress_s": first_rows,
        "first_file_s": first_file,
        # sampled every --sample-s: both times are known to that resolution
        "first_file_after_first_rows_s": None if first_file is None or first_rows is None else first_file - first_rows,
        "files_per_partition": per_partition,
        "files_allowed_per_partition": allowed,
        "peak_pss_mib": max((s.pss_mib for s in watch.samples), default=None),
        "pss_first_half_max_mib": max((s.pss_mib for s in settled[:half]), default=None),
        "pss_second_half_max_mib": max((s.pss_mib for s in settled[half:]), default=None),
        "peak_store_mib": max((s.store_mib for s in watch.samples), default=None),
        "spilled_mib": max((s.spilled_mib for s in watch.samples), default=None),
        "spill_dir_max_mib": max((s.spill_dir_mib for s in watch.samples), default=None),
        "rss_first_half_max_mib": max((s.rss_mib for s in settled[:half]), default=None),
        "rss_second_half_max_mib": max((s.rss_mib for s in settled[half:]), default=None),
        "files_within_bound": bool(per_partition) and max(per_partition.values()) <= allowed,
        "samples": [asdict(s) for s in watch.samples],
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--imgsz", type=int, default=224)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--min-rows-per-file", type=int, default=1024)
    parser.add_argument("--reference-rows", type=int, default=0)
    parser.add_argument(
        "--rows-per-file",
        type=int,
        default=ROWS_PER_FILE,
        help="rows per input Parquet file: more files keep reading and decoding busy for longer",
    )
    parser.add_argument("--stop-after-s", type=float, default=None)
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--settle-s", type=float, default=120.0, help="memory compared after this many seconds")
    parser.add_argument("--json", type=Path, help="also write every figure and sample here")
    parser.add_argument(
        "--data-limit-mib", type=int, help="experiment: set Ray Data's object store limit (resource_limits) first"
    )
    parser.add_argument("--write-cpus", type=float, help="experiment: CPUs a grouping-and-write task reserves")
    parser.add_argument("--write-concurrency", type=int, help="experiment: grouping-and-write tasks at once")
    args = parser.parse_args()
    import pipeline.run.file_groups as file_groups

    if args.write_cpus is not None:
        file_groups.WRITE_CPUS = args.write_cpus
    if args.write_concurrency is not None:
        file_groups.WRITE_CONCURRENCY = args.write_concurrency

    import ray

    flags = sorted(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in Path("/proc/cpuinfo").read_text())
    print(f"{date.today()} {platform.machine()} {os.cpu_count()} CPUs, flags {' '.join(flags)}")
    with tempfile.TemporaryDirectory(prefix="sam3-soak-") as scratch:
        work = Path(scratch)
        ray.init(logging_level=logging.ERROR, log_to_driver=False)
        results = []
        if args.reference_rows:
            results.append(one_run(args, args.reference_rows, work, "reference", None))
        results.append(one_run(args, args.rows, work, "soak", args.stop_after_s))
        ray.shutdown()
    for result in results:
        print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
        for sample in result["samples"][:: max(1, len(result["samples"]) // 24)]:
            print("  ", sample)
    if args.reference_rows and results[0]["steady_rows_per_s"] and results[1]["steady_rows_per_s"]:
        ratio = results[1]["steady_rows_per_s"] / results[0]["steady_rows_per_s"]
        print(f"steady rate, soak / reference: {ratio:.3f}")
    if args.reference_rows and results[0]["sampled_rows_per_s"] and results[1]["sampled_rows_per_s"]:
        ratio = results[1]["sampled_rows_per_s"] / results[0]["sampled_rows_per_s"]
        print(f"sampled rate, soak / reference: {ratio:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
