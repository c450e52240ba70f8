"""Softmax attention for the ViT trunk: SDPA on accelerators, on a CPU the kernel measured faster for its
instruction set and dtype (`cpu_attention_kernel`): cache-sized chunks or SDPA.

On a CPU the attention scores of a whole layer do not fit in cache ([heads, L, L] is 95 MB in bfloat16 for a
window block at 1008 px, 860 MB for a global block), so a `q @ k^T` over all heads at once runs at memory speed,
and PyTorch's fused CPU flash kernel is no better: it spends its time in small matmuls with an inner dimension of
64. Computing `softmax(q k^T) v` a few heads and a few queries at a time, with the softmax in place, keeps each
chunk's scores in the last-level cache. Measured on a 2-core AVX-512 CPU in bfloat16 (bench/attention.py): 2.3x
to 2.8x SDPA over one window of 576 tokens, over nine, and over the 5184 tokens of a global block, in two runs.

The chunked loop is a custom op, so that `torch.compile` calls it as one opaque kernel: traced, it would unroll
into hundreds of nodes per block and inductor would be free to fuse the chunks back into one pass over memory.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .cpu import CpuFeatures, cpu_features

CpuKernel = Literal["chunked", "sdpa"]

# Attention scores per chunk in bfloat16: 6 Mi elements (12 MB) fit in a server CPU's last-level cache with room
# for the chunk's queries, keys and values. 1 to 6 Mi measured within noise of each other; 12 Mi (24 MB) ran 1.8x
# slower over the 5184 tokens of a global block (bench/attention.py). What counts is bytes: float32 scores get
# half as many per chunk.
SCORES_PER_CHUNK = 6 * 2**20


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention, scale 1/sqrt(head_dim): q, k, v [B, heads, L, head_dim] -> [B, heads, L, head_dim].

    The chunked op has no backward; where a gradient is wanted (fine-tuning), SDPA runs on the CPU too.
    """
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.device.type == "cpu" and not needs_grad and _this_cpu_kernel(q.dtype) == "chunked":
        # Eagerly the loop itself: calling a custom op imports `torch._dynamo` on its first call (1.4 s of CPU in
        # every process that only runs eagerly: each Ray actor on a bfloat16 CPU). A traced graph needs the op.
        if torch.compiler.is_compiling():
            return chunked_attention(q, k, v)
        return chunked_attention_loop(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


# The faster CPU kernel per (instruction set, dtype) as `CpuFeatures.isa` names it, from bench/backbone.py
# (`--rounds`, the whole model against the official one) and bench/cpu_isa.py (the kernels alone); figures in
# docs/benchmarks.md, "Per-CPU choices". Anything not measured gets SDPA, PyTorch's own choice.
CPU_KERNELS: dict[tuple[str, torch.dtype], CpuKernel] = {
    # bfloat16 scores in cache-sized chunks: 2.3x to 2.8x SDPA at every trunk shape on AVX-512 BF16
    ("avx512_bf16", torch.bfloat16): "chunked",
    ("amx", torch.bfloat16): "chunked",  # not measured: AMX does the same bfloat16 matmuls faster still
    # float32 on AVX-512: SDPA's flash kernel measured faster than the chunks, alone and in the whole model
    ("avx512_bf16", torch.float32): "sdpa",
    ("amx", torch.float32): "sdpa",
    ("avx512", torch.float32): "sdpa",
    ("avx2", torch.float32): "sdpa",
}


def cpu_attention_kernel(dtype: torch.dtype, features: CpuFeatures | None = None) -> CpuKernel:
    """The attention kernel for `dtype` on a CPU with `features` (this one by default)."""
    features = cpu_features() if features is None else features
    return CPU_KERNELS.get((features.isa, dtype), "sdpa")


def _this_cpu_kernel(dtype: torch.dtype) -> CpuKernel:
    return cpu_attention_kernel(dtype)


# A constant of any compiled graph (the CPU does not change under a running process). This is exactly what
# `torch.compiler.assume_constant_result` does, written out because the decorator imports `torch._dynamo`: about
# 2 s of CPU in every process (each Ray actor, each CLI call) that only runs eagerly. If torch renames the marker,
# test_attention's compiled-graph test fails (Dynamo then refuses to trace the CPU probe).
_this_cpu_kernel._dynamo_marked_constant = True  # type: ignore[attr-defined]


def chunk_shape(sequences: int, length: int, element_bytes: int = 2, l3_bytes: int | None = None) -> tuple[int, int]:
    """(sequences, queries) per chunk for `sequences` attention maps of `length` queries over `length` keys, with
    scores of `element_bytes` bytes each, on a CPU whose L3 cache holds `l3_bytes` (None: unknown)."""
    budget_bytes = SCORES_PER_CHUNK * 2
    if l3_bytes:
        # 12 MB was 3/8 of the 32 MB L3 it was measured on; 24 MB (3/4) ran 1.8x slower. A smaller L3 (an AVX2
        # part's CCX of 16 MB, say) gets the same share.
        budget_bytes = min(budget_bytes, l3_bytes * 3 // 8)
    budget = max(1, budget_bytes // element_bytes)
    queries = min(length, max(1, budget // length))
    return min(sequences, max(1, budget // (queries * length))), queries


def chunked_attention_loop(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """`softmax(q k^T / sqrt(head_dim)) v` a chunk of queries at a time: [B, heads, L, head_dim] in and out."""
    batch, heads, length, head_dim = q.shape
    q = (q * head_dim**-0.5).reshape(batch * heads, length, head_dim)
    keys_t = k.reshape(batch * heads, length, head_dim).transpose(1, 2)  # [BH, head_dim, L]
    v = v.reshape(batch * heads, length, head_dim)
    out = torch.empty_like(q)
    # The scores are rounded to q's dtype before the softmax (a bfloat16 matmul writes bfloat16); the softmax
    # itself accumulates in float32. docs/benchmarks.md gives the cosine to float32 this keeps.
    sequences, queries = chunk_shape(batch * heads, length, q.element_size(), cpu_features().l3_bytes)
    for s in range(0, batch * heads, sequences):
        for i in range(0, length, queries):
            scores = torch.bmm(q[s : s + sequences, i : i + queries], keys_t[s : s + sequences])  # [S, Q, L]
            torch.softmax(scores, dim=-1, out=scores)
            torch.bmm(scores, v[s : s + sequences], out=out[s : s + sequences, i : i + queries])
    return out.view(batch, heads, length, head_dim)


@torch.library.custom_op("sam3core::chunked_attention", mutates_args=(), device_types="cpu")
def chunked_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return chunked_attention_loop(q, k, v)


@chunked_attention.register_fake
def _chunked_attention_shape(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)
