"""Rows per second end to end (`run_job`) against the model alone, same machine, configuration and batch size.

It writes N real JPEG files (random content, sizes between 320 and 1280 px) with captions and a JSON Lines
manifest, then in one process:

1. model alone: the backbone `run_job`'s actors build (same config, image size, device, dtype, compilation and
   batch size, decided by the same functions), on images already decoded, resized and tokenized, calling
   `forward_image` and `forward_text` batch by batch;
2. end to end: `run_job` on a local Ray cluster started beforehand (cluster start-up is not counted; model
   building in the actors, reading, decoding, resizing, tokenizing, embedding and writing Parquet are).

    python bench/pipeline.py --config tiny --imgsz 224 --rows 256 --batch-size 16
    python bench/pipeline.py --config sam3 --imgsz 336 --rows 24 --batch-size 4
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
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from pipeline import JobConfig, run_job  # noqa: E402
from pipeline.embed import compute_dtype, should_compile  # noqa: E402
from sam3core import build_sam3_vl_backbone, normalize_images, resize_image  # noqa: E402


@dataclass(frozen=True)
class Model:
    """Where and how the backbone runs: decided exactly as `pipeline.embed.EmbedWorker` decides it."""

    device: torch.device
    dtype: torch.dtype
    compiled: bool

    @classmethod
    def like_the_actor(cls, dtype: str, compile: str) -> Model:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return cls(device, compute_dtype(dtype, device), should_compile(compile, device))

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.machine()
        return f"{self.device.type} ({name}), {str(self.dtype).removeprefix('torch.')}, compiled={self.compiled}"


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
    config: str, imgsz: int, batch_size: int, images: list[Path], captions: list[str], threads: int, model: Model
) -> float:
    """Rows per second of the backbone itself on prepared inputs, built and fed as the pipeline's actor does."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    backbone = build_sam3_vl_backbone(
        config=config, imgsz=imgsz, device=model.device, dtype=model.dtype, compile_visual=model.compiled
    )
    pixels = torch.from_numpy(np.stack([resize_image(Image.open(p).convert("RGB"), imgsz) for p in images]))
    tokens = backbone.tokenizer(captions)

    def one_batch(first: int) -> None:
        uint8 = pixels[first : first + batch_size]
        if model.compiled and len(uint8) < batch_size:  # the actor pads short batches rather than recompile
            uint8 = torch.cat([uint8, uint8.new_zeros((batch_size - len(uint8), *uint8.shape[1:]))])
        backbone.forward_image(normalize_images(uint8.to(model.device)))
        backbone.forward_text(tokens[first : first + batch_size].to(model.device))

    with torch.inference_mode():
        one_batch(0)  # warm-up (and compilation), as the actor's first batch
        _synchronize(model.device)
        start = time.perf_counter()
        for first in range(0, len(images), batch_size):
            one_batch(first)
        _synchronize(model.device)
        elapsed = time.perf_counter() - start
    torch.set_num_threads(os.cpu_count() or 1)
    return len(images) / elapsed


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def end_to_end(
    config: str, imgsz: int, batch_size: int, manifest: Path, output: Path, dtype: str, compile: str
) -> float:
    job = JobConfig.from_dict(
        {
            "input": {"uri": str(manifest), "format": "manifest"},
            "output": {"uri": str(output)},
            "model": {"config": config, "imgsz": imgsz, "dtype": dtype, "compile": compile, "random_weights": True},
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
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    args = parser.parse_args(argv)
    model = Model.like_the_actor(args.dtype, args.compile)
    shape = (args.config, args.imgsz, args.batch_size)

    import ray

    ray.init(include_dashboard=False, logging_level="ERROR")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest, images, captions = write_dataset(root, args.rows)
        all_threads = os.cpu_count() or 1
        if model.device.type == "cuda":
            # the actor holds the whole GPU; its CPU thread share hardly matters there
            alone_actor = alone_all = model_alone(*shape, images, captions, all_threads, model)
        else:
            # Ray gives an actor as many torch threads as CPUs it reserves (compute.cpus_per_actor, 1 by
            # default): time the model alone both with that share and with the whole machine.
            alone_actor = model_alone(*shape, images, captions, 1, model)
            alone_all = model_alone(*shape, images, captions, all_threads, model)
        pipeline = end_to_end(*shape, manifest, root / "out", args.dtype, args.compile)
    print(f"# {date.today()}: {model.describe()}, {all_threads} CPU threads, torch {torch.__version__}")
    head = (args.config, args.imgsz, args.rows, args.batch_size)
    if model.device.type == "cuda":
        print("| config | imgsz | rows | batch | model alone | end to end | end to end / model |")
        print("|---|---|---|---|---|---|---|")
        print(_row(*head, alone_all, pipeline, pipeline / alone_all))
    else:
        print(
            "| config | imgsz | rows | batch | model alone, 1 thread | model alone, all threads | end to end "
            "| end to end / model (1 thread) |"
        )
        print("|---|---|---|---|---|---|---|---|")
        print(_row(*head, alone_actor, alone_all, pipeline, pipeline / alone_actor))
    return 0


def _row(*cells: object) -> str:
    return "| " + " | ".join(f"{c:.2f}" if isinstance(c, float) else str(c) for c in cells) + " |"


if __name__ == "__main__":
    raise SystemExit(main())
