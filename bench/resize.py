"""What a decoding worker pays for the resize: importing torch, against resizing in NumPy until that pays.

`sam3core.resize` resizes in NumPy (the same bytes as torch's uint8 kernel) until a process has spent
`TORCH_AFTER_SECONDS` in it, then imports torch and uses torch's kernel. This reports, on one thread:

- the cost of the import in a fresh process, as a new decoding worker pays it: the seconds, and the peak resident
  memory of a process that has imported the decoding stage (`pipeline.input.records`) with and without torch;
- the milliseconds per image of each kernel, for common photo sizes and the output sizes of the tiny and sam3 runs.

    python bench/resize.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

# One thread for NumPy's BLAS and torch alike: a decoding task's view of a core.
for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")

import numpy as np  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

sys.path.insert(0, str(REPO_ROOT / "bench"))

from incremental import cpu_flags  # noqa: E402

IMPORT_PROBE = (
    "import resource, sys, time\n"
    "started = time.perf_counter()\n"
    "import pipeline.input.records\n"
    "records = time.perf_counter() - started\n"
    "if sys.argv[1] == 'torch':\n"
    "    import torch, torch.nn.functional\n"
    "print(records, time.perf_counter() - started - records, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
)


def import_cost(rounds: int) -> dict[str, float]:
    """Seconds to import torch after the decoding stage, and the peak memory with and without it (fresh processes)."""
    seconds, peak = {"numpy": [], "torch": []}, {"numpy": [], "torch": []}
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for _ in range(rounds):
        for variant in ("numpy", "torch"):
            line = subprocess.run(
                [sys.executable, "-c", IMPORT_PROBE, variant],
                capture_output=True,
                text=True,
                env=environment,
                check=True,
            ).stdout.split()
            seconds[variant].append(float(line[1]))
            peak[variant].append(int(line[2]) / 1024)
    return {
        "import_torch_s": round(float(np.median(seconds["torch"])), 2),
        "peak_mb_without_torch": round(float(np.median(peak["numpy"]))),
        "peak_mb_with_torch": round(float(np.median(peak["torch"]))),
    }


def per_image_ms(function, image: np.ndarray, size: int, repeats: int) -> float:
    function(image, size)
    started = time.perf_counter()
    for _ in range(repeats):
        function(image, size)
    return (time.perf_counter() - started) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per import variant")
    parser.add_argument("--repeats", type=int, default=10, help="resizes per timed figure")
    args = parser.parse_args()

    imported = import_cost(args.rounds)
    import torch

    from sam3core.resize import TORCH_AFTER_SECONDS, resize_with_numpy, resize_with_torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    rows = []
    for height, width in [(48, 64), (375, 500), (480, 640), (1000, 1500), (1500, 2250), (3000, 4000)]:
        image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        for size in (224, 1008):
            numpy_ms = per_image_ms(resize_with_numpy, image, size, args.repeats)
            torch_ms = per_image_ms(resize_with_torch, image, size, args.repeats)
            rows.append(
                {
                    "input": f"{width}x{height}",
                    "imgsz": size,
                    "numpy_ms": round(numpy_ms, 1),
                    "torch_ms": round(torch_ms, 1),
                    # images a process resizes in NumPy before it imports torch
                    "numpy_images_before_torch": int(TORCH_AFTER_SECONDS * 1000 / numpy_ms),
                }
            )
    report = {
        "date": date.today().isoformat(),
        "cpu_flags": cpu_flags(),
        "torch_after_seconds": TORCH_AFTER_SECONDS,
        **imported,
        "per_image": rows,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
