"""What each instruction-set cap changes, and which attention kernel wins per dtype and instruction set.

Runs the same measurements in one child process per environment: the machine as it is, each of the three caps
alone (`ATEN_CPU_CAPABILITY=avx2`, `ONEDNN_MAX_CPU_ISA=AVX2`, `MKL_ENABLE_INSTRUCTIONS=AVX2`) and all three
together (the AVX2 emulation). Each child prints what torch reports (`sam3core.cpu.read_cpu_features`, the
dtype `auto` picks, the attention kernel `sam3core.attention` picks) and the fastest of `--calls` calls of:

- a 2048^3 matmul in float32 and in bfloat16 (TFLOP/s);
- SDPA (PyTorch's CPU flash kernel) and the chunked op (`sam3core::chunked_attention`) at the trunk's shapes
  (16 heads of 64 channels): one window of 576 tokens (every block at 336 px), nine windows (a window block at
  1008 px) and one global map of 5184 tokens (a global block at 1008 px), in float32 and bfloat16 (ms).

    python bench/cpu_isa.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

ENVIRONMENTS = {
    "as is": {},
    "ATEN_CPU_CAPABILITY=avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "ONEDNN_MAX_CPU_ISA=AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "MKL_ENABLE_INSTRUCTIONS=AVX2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "all three (AVX2 emulation)": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    },
}
SHAPES = ((1, 576), (9, 576), (1, 5184))


def fastest(run: Callable[[], object], calls: int) -> float:
    run()
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def measure(calls: int) -> dict:
    """In this process: the features, the choices and the timings."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO_ROOT))
    from sam3core.attention import chunked_attention, cpu_attention_kernel
    from sam3core.cpu import auto_dtype, read_cpu_features

    features = read_cpu_features()
    result: dict = {
        "features": features.describe(),
        "auto dtype": str(auto_dtype("cpu", features, environ={})).removeprefix("torch."),
        "kernel": {d: cpu_attention_kernel(getattr(torch, d), features) for d in ("float32", "bfloat16")},
    }
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            a = torch.randn(2048, 2048, dtype=dtype)
            result[f"matmul {dtype}"] = 2 * 2048**3 / fastest(lambda a=a: a @ a, calls) / 1e12
        for batch, tokens in SHAPES:
            for dtype in (torch.float32, torch.bfloat16):
                generator = torch.Generator().manual_seed(0)
                q, k, v = (torch.randn(batch, 16, tokens, 64, generator=generator, dtype=dtype) for _ in range(3))
                shape = f"{batch}x16x{tokens}x64 {str(dtype).removeprefix('torch.')}"
                sdpa = fastest(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v), calls)
                chunked = fastest(lambda q=q, k=k, v=v: chunked_attention(q, k, v), calls)
                result[shape] = (sdpa * 1e3, chunked * 1e3)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--only", choices=list(ENVIRONMENTS), help="one environment")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.calls)))
        return 0
    import torch

    flags = sorted({f for f in Path("/proc/cpuinfo").read_text().split() if f.startswith(("avx", "amx"))})
    print(f"# {date.today()} torch {torch.__version__}, {torch.get_num_threads()} threads, flags: {' '.join(flags)}")
    results = {}
    for name, env in ENVIRONMENTS.items():
        if args.only and name != args.only:
            continue
        command = [sys.executable, __file__, "--child", "--calls", str(args.calls)]
        output = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, check=True)
        results[name] = json.loads(output.stdout.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    print("\n| environment | features | auto dtype | kernel fp32 / bf16 | matmul fp32 TFLOP/s | matmul bf16 TFLOP/s |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        kernels = f"{r['kernel']['float32']} / {r['kernel']['bfloat16']}"
        print(
            f"| {name} | {r['features']} | {r['auto dtype']} | {kernels} | {r['matmul torch.float32']:.3f} "
            f"| {r['matmul torch.bfloat16']:.3f} |"
        )
    print("\n| environment | shape, dtype | SDPA ms | chunked ms | chunked vs SDPA |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        for key, value in r.items():
            if isinstance(value, list):
                print(f"| {name} | {key} | {value[0]:.1f} | {value[1]:.1f} | {value[0] / value[1]:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
