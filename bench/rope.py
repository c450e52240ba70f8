"""The rotary embedding's eager cost: the rotation written out in real arithmetic (what compiled graphs run)
against one complex multiplication (what eager code runs), on the trunk's two attention shapes at 1008 px, one
head layout of the "sam3" configuration (16 heads of 64 channels), fastest of 7 calls each, and whether the two
agree bit for bit.

    python bench/rope.py

`bench/gpu_suite.py` measures the same on a GPU, with the share of a window block it costs.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sam3core.rope import AxialRoPE, rotate_complex, rotate_real


def fastest(run: Callable[[], object], calls: int = 7) -> float:
    run()
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    machine = platform.processor() or "cpu"
    print(f"# {date.today()} torch {torch.__version__} on {machine}, {torch.get_num_threads()} threads")
    print("| shape | dtype | real, ms | complex, ms | speed-up | bit-identical |")
    print("|---|---|---|---|---|---|")
    for label, shape, grid in (
        ("9 windows of 576 tokens", (9, 16, 576, 64), 24),
        ("global, 5184 tokens", (1, 16, 5184, 64), 72),
    ):
        rope = AxialRoPE(64, grid, 10000.0, 1.0)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
            with torch.inference_mode():
                real = fastest(lambda x=x, rope=rope: rotate_real(x, rope.cos, rope.sin))
                complex_ = fastest(lambda x=x, rope=rope: rotate_complex(x, rope.cos, rope.sin))
                same = torch.equal(rotate_real(x, rope.cos, rope.sin), rotate_complex(x, rope.cos, rope.sin))
            name = str(dtype).removeprefix("torch.")
            print(
                f"| {label} | {name} | {real * 1e3:.1f} | {complex_ * 1e3:.1f} | {real / complex_:.2f}x | {same} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
