"""How long the checks before a run take (pipeline/run/preflight.py), against loading what they look at.

Writes, under --dir: a checkpoint in the official `sam3.pt` layout of --checkpoint-gb GiB (float32 tensors under
`detector.backbone.*` names, --tensors of them), the same tensors as safetensors, and a Parquet manifest of --rows
rows. Then times, each the best of --repeat:
- `probe_checkpoint` (the key list from the zip's data.pkl / the safetensors header) against `torch.load` with
  mmap (what sam3core does for a local file) and against a full `torch.load`;
- `preflight` on a job over the manifest (schema from the footer, row count from the footer, output listing).

    python bench/preflight.py --dir /tmp/bench-preflight --checkpoint-gb 1 --rows 1000000
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # before bench/ itself, whose pipeline.py would shadow the package

from pipeline.config import JobConfig  # noqa: E402
from pipeline.run.preflight import preflight  # noqa: E402
from sam3core.checkpoint import probe_checkpoint  # noqa: E402


def best_of(repeat: int, fn: Callable[[], Any]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def write_checkpoint(directory: Path, gib: float, tensors: int) -> tuple[Path, Path]:
    per_tensor = int(gib * 1024**3 / 4 / tensors)
    state = {f"detector.backbone.vision_backbone.trunk.blocks.{i}.w": torch.randn(per_tensor) for i in range(tensors)}
    official, safetensors = directory / "sam3.pt", directory / "model.safetensors"
    torch.save({"model": state}, official)
    save_file(state, safetensors)
    return official, safetensors


def write_manifest(directory: Path, rows: int) -> Path:
    path = directory / "manifest.parquet"
    table = pa.table(
        {
            "url": [f"s3://bucket/images/{i:09d}.jpg" for i in range(rows)],
            "text": [f"caption number {i}" for i in range(rows)],
        }
    )
    pq.write_table(table, path, row_group_size=128 * 1024)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--checkpoint-gb", type=float, default=1.0)
    parser.add_argument("--tensors", type=int, default=1500)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    official, safetensors = write_checkpoint(args.dir, args.checkpoint_gb, args.tensors)
    manifest = write_manifest(args.dir, args.rows)

    def full_load() -> None:
        state = torch.load(official, map_location="cpu", weights_only=True)
        sum(t.sum().item() for t in state["model"].values())  # touch every tensor, as copying into a model would

    rows = [
        ("probe_checkpoint, sam3.pt", best_of(args.repeat, lambda: probe_checkpoint(official))),
        ("probe_checkpoint, model.safetensors", best_of(args.repeat, lambda: probe_checkpoint(safetensors))),
        (
            "torch.load(mmap=True), sam3.pt",
            best_of(args.repeat, lambda: torch.load(official, map_location="cpu", weights_only=True, mmap=True)),
        ),
        ("torch.load, every tensor read, sam3.pt", best_of(args.repeat, full_load)),
    ]
    job = JobConfig.from_dict(
        {
            "input": {"uri": str(manifest)},
            "output": {"uri": str(args.dir / "out")},
            "model": {"checkpoint": str(official), "config": "sam3"},
        }
    )
    plan = preflight(job)
    assert plan.total_rows == args.rows and plan.config.input.image_column == "url"
    rows.append(
        (
            f"preflight: {args.rows} row Parquet manifest + checkpoint probe",
            best_of(args.repeat, lambda: preflight(job)),
        )
    )

    size = official.stat().st_size / 1024**3
    print(f"checkpoint {size:.2f} GiB, {args.tensors} tensors; manifest {args.rows} rows")
    print("| what | seconds |")
    print("|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
