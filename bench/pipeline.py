"""Rows per second end to end (`run_job`) against the model alone, same machine, configuration and batch size.

It writes N real JPEG files (random content, sizes between 320 and 1280 px) with captions and a JSON Lines
manifest, then in one process:

1. model alone: the backbone `run_job`'s actors build (same config, image size, dtype and batch size), on images
   already decoded, resized and tokenized, calling `forward_image` and `forward_text` batch by batch;
2. end to end: `run_job` on a local Ray cluster started beforehand (cluster start-up is not counted; model
   building in the actors, reading, decoding, resizing, tokenizing, embedding and writing Parquet are).

    python bench/pipeline.py --config tiny --imgsz 224 --rows 256 --batch-size 16
    python bench/pipeline.py --config sam3 --imgsz 336 --rows 24 --batch-size 4
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
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from pipeline import JobConfig, run_job  # noqa: E402
from sam3core import build_sam3_vl_backbone, normalize_images, resize_image  # noqa: E402


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


def model_alone(
    config: str, imgsz: int, batch_size: int, images: list[Path], captions: list[str], threads: int
) -> float:
    """Rows per second of the backbone itself on prepared inputs, with `threads` intra-op threads."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    backbone = build_sam3_vl_backbone(config=config, imgsz=imgsz)
    pixels = torch.from_numpy(np.stack([resize_image(Image.open(p).convert("RGB"), imgsz) for p in images]))
    tokens = backbone.tokenizer(captions)
    with torch.inference_mode():
        backbone.forward_image(normalize_images(pixels[:batch_size]))  # warm-up, as the actors' first batch
        start = time.perf_counter()
        for first in range(0, len(images), batch_size):
            backbone.forward_image(normalize_images(pixels[first : first + batch_size]))
            backbone.forward_text(tokens[first : first + batch_size])
        elapsed = time.perf_counter() - start
    torch.set_num_threads(os.cpu_count() or 1)
    return len(images) / elapsed


def end_to_end(config: str, imgsz: int, batch_size: int, manifest: Path, output: Path) -> float:
    job = JobConfig.from_dict(
        {
            "input": {"uri": str(manifest), "format": "manifest"},
            "output": {"uri": str(output)},
            "model": {"config": config, "imgsz": imgsz},
            "compute": {"batch_size": batch_size},
        }
    )
    start = time.perf_counter()
    summary = run_job(job)
    elapsed = time.perf_counter() - start
    assert summary.rows_ok == summary.rows_total, summary
    return summary.rows_total / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", choices=["tiny", "sam3"])
    parser.add_argument("--imgsz", type=int, default=224)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    import ray

    ray.init(include_dashboard=False, logging_level="ERROR")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest, images, captions = write_dataset(root, args.rows)
        # Ray gives an actor as many torch threads as CPUs it reserves (compute.cpus_per_actor, 1 by default):
        # time the model alone both with that share and with the whole machine.
        alone_actor = model_alone(args.config, args.imgsz, args.batch_size, images, captions, threads=1)
        alone_all = model_alone(args.config, args.imgsz, args.batch_size, images, captions, os.cpu_count() or 1)
        pipeline = end_to_end(args.config, args.imgsz, args.batch_size, manifest, root / "out")
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"# {date.today()} {machine}")
    print(
        "| config | imgsz | rows | batch | model alone, 1 thread | model alone, all threads | end to end "
        "| end to end / model (1 thread) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.config} | {args.imgsz} | {args.rows} | {args.batch_size} | {alone_actor:.2f} | {alone_all:.2f} "
        f"| {pipeline:.2f} | {pipeline / alone_actor:.2f} |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
