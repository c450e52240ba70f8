"""Where the backbone's time goes on a CPU: attention kernels against the linear layers, at the trunk's shapes.

Times, in bfloat16 with the machine's threads, at the shapes of the "sam3" trunk (16 heads of 64 channels): one
window of 576 tokens (every block at 336 px), nine windows (a window block at 1008 px) and one global map of 5184
tokens (a global block at 1008 px):

- SDPA (`F.scaled_dot_product_attention`, PyTorch's fused flash kernel on the CPU) in bfloat16 and in float32;
- explicit attention over all heads at once (`q @ k^T`, softmax, `@ v`): the scores leave the cache;
- `sam3core.attention.attention`, the trunk's CPU path: the same in cache-sized chunks, eager and compiled,
  and eagerly with chunks of 1, 3 and 12 Mi scores against the default 6 Mi;
- a linear layer of the MLP (5184 x 1024 -> 4736) and a 4096^3 matmul, for the peak.

Each time is the fastest of 5 calls (a shared machine only slows calls down).

    python bench/attention.py
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sam3core.attention as attention_module
from sam3core.attention import attention


def seconds(run: Callable[[], object], calls: int = 5) -> float:
    run()
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2), -1) @ v


def with_chunk(scores: int) -> Callable[..., torch.Tensor]:
    """The trunk's CPU attention with another chunk size."""

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        default, attention_module.SCORES_PER_CHUNK = attention_module.SCORES_PER_CHUNK, scores
        try:
            return attention(q, k, v)
        finally:
            attention_module.SCORES_PER_CHUNK = default

    return run


def main() -> int:
    print(f"# {date.today()}, torch {torch.__version__}, {torch.get_num_threads()} threads, TFLOP/s")
    print("| kernel | shape | ms | TFLOP/s | cosine vs float32 SDPA |")
    print("|---|---|---|---|---|")
    compiled = torch.compile(attention, dynamic=False)
    with torch.inference_mode():
        a = torch.randn(4096, 4096, dtype=torch.bfloat16)
        s = seconds(lambda: a @ a)
        print(f"| matmul | 4096^3 | {s * 1e3:.1f} | {2 * 4096**3 / s / 1e12:.3f} | |")
        linear = torch.nn.Linear(1024, 4736).to(torch.bfloat16)
        x = torch.randn(5184, 1024, dtype=torch.bfloat16)
        s = seconds(lambda: linear(x))
        print(f"| linear | 5184x1024->4736 | {s * 1e3:.1f} | {2 * 5184 * 1024 * 4736 / s / 1e12:.3f} | |")
        for batch, tokens in ((1, 576), (9, 576), (1, 5184)):
            generator = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(batch, 16, tokens, 64, generator=generator, dtype=torch.bfloat16) for _ in range(3))
            qf, kf, vf = q.float(), k.float(), v.float()
            reference = F.scaled_dot_product_attention(qf, kf, vf)
            flops = 4 * batch * tokens * tokens * 1024
            sdpa = F.scaled_dot_product_attention
            variants = {
                "SDPA bfloat16": (sdpa, (q, k, v)),
                "SDPA float32": (sdpa, (qf, kf, vf)),
                "explicit, all heads at once": (explicit, (q, k, v)),
                "sam3core chunked": (attention, (q, k, v)),
                "sam3core chunked, compiled": (compiled, (q, k, v)),
            }
            for mebi in (1, 3, 12):  # the chunk size against its default of 6 Mi scores
                variants[f"sam3core chunked, {mebi} Mi scores per chunk"] = (with_chunk(mebi * 2**20), (q, k, v))
            for name, (kernel, inputs) in variants.items():
                s = seconds(lambda kernel=kernel, inputs=inputs: kernel(*inputs))
                cosine = F.cosine_similarity(kernel(*inputs).float().flatten(), reference.flatten(), dim=0).item()
                shape = f"{batch}x16x{tokens}x64"
                print(f"| {name} | {shape} | {s * 1e3:.1f} | {flops / s / 1e12:.3f} | {cosine:.6f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
