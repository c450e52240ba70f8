"""Rows per second of the model stage against the model alone, and end to end, on one machine.

It writes N real JPEG files (random content, sizes between 320 and 1280 px) with captions and a JSON Lines
manifest, prepares them once with the CPU stage's own function (`prepare_batch`: decode, resize, tokenize), then
in one process, with the same configuration, image size, dtype, compilation, batch size and thread count:

1. backbone alone: the calls `EmbedWorker` makes (`forward_vision_features` when only the pooled embeddings are
   stored, as by default, and `forward_text`) on tensors already on the device, short batches padded as the actor
   pads them, compiled code warmed up beforehand;
2. `EmbedWorker` called directly (no Ray) on the prepared Arrow batches: uint8 pixels out of the Arrow buffer, the
   forward passes, pooling on the device, the host copy and the Arrow output columns;
3. end to end: `run_job` on a local Ray cluster started beforehand (cluster start-up is not counted; model building
   and warm-up in the actor, reading, decoding, resizing, tokenizing, embedding and writing Parquet are). Reported
   twice: over the whole run, and steady, from the first finished batch to the last (the run's
   `steady_rows_per_s`): the rate a long run converges to, without the fixed start-up a short run cannot amortize.

The thread count is the model actor's share as `run_job` decides it (`pipeline.run.job.actor_threads`); on a CPU-only
machine that is every core, with decoding running in the model's gaps.

    python bench/pipeline.py --config tiny --imgsz 224 --rows 256 --batch-size 16
    python bench/pipeline.py --config sam3 --imgsz 336 --rows 48 --batch-size 4 --dtype bfloat16
    python bench/pipeline.py --config sam3 --imgsz 1008 --rows 512 --batch-size 16   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from pipeline import JobConfig, run_job  # noqa: E402
from pipeline.config import FEATURES_DEFAULT  # noqa: E402
from pipeline.dataset import schema  # noqa: E402
from pipeline.input.records import PrepareSettings, prepare_batch  # noqa: E402
from pipeline.input.sources import SourceSpec  # noqa: E402
from pipeline.model.embed import EmbedSettings, EmbedWorker, pixel_array  # noqa: E402
from pipeline.run.job import actor_threads  # noqa: E402
from sam3core import normalize_images  # noqa: E402


def write_dataset(root: Path, rows: int) -> tuple[Path, list[Path], list[str]]:
    rng = np.random.default_rng(0)
    images, captions = [], []
    with (root / "manifest.jsonl").open("w") as manifest:
        for index in range(rows):
            width, height = (int(v) for v in rng.integers(320, 1281, size=2))
            path = root / f"img_{index:05d}.jpg"
            pixels = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).resize((width, height), Image.BILINEAR).save(path, quality=90)
            caption = f"photo number {index} of a {['red', 'green', 'blue'][index % 3]} object"
            manifest.write(json.dumps({"id": str(index), "image": str(path), "caption": caption}) + "\n")
            images.append(path)
            captions.append(caption)
    return root / "manifest.jsonl", images, captions


def job_config(args: argparse.Namespace, manifest: Path, output: Path) -> JobConfig:
    return JobConfig.from_dict(
        {
            "input": {"uri": str(manifest), "format": "manifest"},
            "output": {"uri": str(output)},
            "model": {
                "config": args.config,
                "imgsz": args.imgsz,
                "dtype": args.dtype,
                "compile": args.compile,
                "random_weights": True,
            },
            "compute": {"batch_size": args.batch_size},
        }
    )


def prepared_batches(manifest: Path, args: argparse.Namespace, tokenizer_context: int) -> list[pa.Table]:
    table = pa.Table.from_pylist([json.loads(line) for line in manifest.read_text().splitlines()])
    settings = PrepareSettings(
        source=SourceSpec(format="manifest", protocol="file"),
        imgsz=args.imgsz,
        context_length=tokenizer_context,
        bpe_path=None,
        storage_options=None,
    )
    prepared = prepare_batch(table, settings)
    return [prepared.slice(i, args.batch_size) for i in range(0, prepared.num_rows, args.batch_size)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def backbone_alone(worker: EmbedWorker, batches: list[pa.Table]) -> float:
    """Rows per second of the forward passes the worker makes, on inputs already on the device."""
    backbone, size, batch_size = worker.backbone, worker.settings.imgsz, worker.settings.batch_size
    inputs = []
    for batch in batches:
        uint8 = torch.from_numpy(pixel_array(batch.column(schema.PIXELS), np.arange(batch.num_rows), size))
        if worker.compiled and len(uint8) < batch_size:  # the actor pads short batches rather than recompile
            uint8 = torch.cat([uint8, uint8.new_zeros((batch_size - len(uint8), *uint8.shape[1:]))])
        tokens = torch.tensor([row[0] for row in batch.column(schema.TOKENS).to_pylist()], dtype=torch.long)
        inputs.append((normalize_images(uint8.to(worker.device)), tokens.to(worker.device)))
    image_call = backbone.forward_vision_features if worker.vision_only else backbone.forward_image
    with torch.inference_mode():
        synchronize(worker.device)
        start = time.perf_counter()
        for images, tokens in inputs:
            image_call(images)
            backbone.forward_text(tokens)
        synchronize(worker.device)
        elapsed = time.perf_counter() - start
    return sum(b.num_rows for b in batches) / elapsed


def worker_alone(worker: EmbedWorker, batches: list[pa.Table]) -> float:
    start = time.perf_counter()
    for batch in batches:
        worker(batch)
    synchronize(worker.device)
    return sum(b.num_rows for b in batches) / (time.perf_counter() - start)


def end_to_end(job: JobConfig) -> tuple[float, float]:
    """Rows per second of the whole run, and steady: from the first finished batch to the last (the run's
    `steady_rows_per_s`, which leaves out the actor building and compiling the model and Ray Data starting)."""
    start = time.perf_counter()
    summary = run_job(job)
    elapsed = time.perf_counter() - start
    assert summary.rows_ok == summary.rows_total, summary
    assert summary.steady_rows_per_s is not None, "one batch: no steady rate; raise --rows"
    return summary.rows_total / elapsed, summary.steady_rows_per_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", choices=["tiny", "sam3"])
    parser.add_argument("--imgsz", type=int, default=224)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    args = parser.parse_args(argv)

    import ray

    ray.init(include_dashboard=False, logging_level="ERROR")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest, _, _ = write_dataset(root, args.rows)
        job = job_config(args, manifest, root / "out")
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        threads = actor_threads(job, ray.cluster_resources().get("CPU", 0.0), 1, gpus) or torch.get_num_threads()
        settings = EmbedSettings(
            checkpoint=None,
            model_config=args.config,
            imgsz=args.imgsz,
            dtype=args.dtype,
            compile=args.compile,
            bpe_path=None,
            features=FEATURES_DEFAULT,
            feature_dtype="float16",
            multi_caption=False,
            batch_size=args.batch_size,
            threads=threads,
        )
        worker = EmbedWorker(settings)  # builds, compiles and warms up as the actor does
        batches = prepared_batches(manifest, args, worker.backbone.config.text.context_length)
        worker_alone(worker, batches[:1])  # first real batch (allocator, caches) not counted on either side
        alone = backbone_alone(worker, batches)
        direct = worker_alone(worker, batches)
        del worker
        whole_run, steady = end_to_end(job)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else platform.machine()
    print(
        f"# {date.today()}: {device} ({name}), dtype {args.dtype}, compile {args.compile}, {threads} model threads "
        f"of {os.cpu_count()} CPUs, torch {torch.__version__}"
    )
    print(
        "| config | imgsz | rows | batch | threads | backbone alone | EmbedWorker direct | end to end, whole run "
        "| end to end, steady | worker / backbone | steady / backbone | whole run / backbone |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    cells = (args.config, args.imgsz, args.rows, args.batch_size, threads, alone, direct, whole_run, steady)
    print(_row(*cells, f"{direct / alone:.1%}", f"{steady / alone:.1%}", f"{whole_run / alone:.1%}"))
    return 0


def _row(*cells: object) -> str:
    return "| " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells) + " |"


if __name__ == "__main__":
    raise SystemExit(main())
