"""Compilation levers on a CPU, at the "sam3" shapes at 1008 px: inductor options on one window block of the trunk,
memory formats on the neck.

- block ([1, 72, 72, 1024] in bfloat16, nine windows of 576 tokens): eager, inductor with `freezing` (what
  `compile="auto"` picks on a CPU), `freezing` with `cpp_wrapper`, and `freezing` with `max_autotune`
  (inductor's C++ GEMM templates benchmarked against the aten matmuls);
- neck (the four SAM 3 levels from the trunk's map): eager and compiled with `freezing`, fed the trunk's map as the
  trunk returns it (a channels-last view), as a contiguous NCHW copy, or with channels-last weights.

Calls are interleaved across variants and each gets the fastest of `--rounds` (a shared machine only slows calls
down); the first call of each compiled variant (its compilation) is timed apart, and each output is compared with
eager by cosine similarity.

    python bench/levers.py --rounds 6
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sam3core.neck import fpn_level
from sam3core.rope import AxialRoPE
from sam3core.vit import Block

Variant = tuple[Callable[[torch.Tensor], object], torch.Tensor]


def cosine(a: object, b: object) -> float:
    flat = [torch.cat([t.float().flatten() for t in (x if isinstance(x, list) else [x])]) for x in (a, b)]
    return F.cosine_similarity(flat[0], flat[1], dim=0).item()


def compiled(module: nn.Module, reference: object, example: torch.Tensor, **kwargs: object) -> Callable:
    """Compiles a copy of `module`; prints its compilation time and its cosine to `reference`."""
    function = torch.compile(copy.deepcopy(module), **kwargs)
    start = time.perf_counter()
    out = function(example)
    print(f"  compiled {kwargs}: first call {time.perf_counter() - start:.0f} s, cosine {cosine(out, reference):.6f}")
    return function


def race(group: str, variants: dict[str, Variant], rounds: int) -> None:
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (run, x) in variants.items():
            start = time.perf_counter()
            run(x)
            times[name].append(time.perf_counter() - start)
    base = min(next(iter(times.values())))
    for name, values in times.items():
        print(f"| {group} | {name} | {min(values) * 1e3:.1f} | {base / min(values):.2f}x |", flush=True)


def block_variants() -> dict[str, Variant]:
    torch.manual_seed(0)
    block = Block(1024, 16, 4.625, 24, AxialRoPE(64, 24, 10000.0, 1.0), 1e-5).eval().to(torch.bfloat16)
    x = torch.randn(1, 72, 72, 1024, dtype=torch.bfloat16)
    reference = block(x)
    return {
        "eager": (block, x),
        "inductor, freezing": (compiled(block, reference, x, options={"freezing": True}), x),
        "inductor, freezing, cpp_wrapper": (
            compiled(block, reference, x, options={"freezing": True, "cpp_wrapper": True}),
            x,
        ),
        "inductor max-autotune, freezing": (
            compiled(block, reference, x, options={"freezing": True, "max_autotune": True}),
            x,
        ),
    }


def neck_variants() -> dict[str, Variant]:
    torch.manual_seed(0)
    levels = nn.ModuleList(fpn_level(1024, 256, s) for s in (4.0, 2.0, 1.0, 0.5)).eval().to(torch.bfloat16)
    channels_last = copy.deepcopy(levels).to(memory_format=torch.channels_last)
    trunk_map = torch.randn(1, 72, 72, 1024, dtype=torch.bfloat16).permute(0, 3, 1, 2)  # as the trunk returns it
    contiguous = trunk_map.contiguous()
    reference = [level(contiguous) for level in levels]

    def each(modules: nn.ModuleList | list) -> Callable[[torch.Tensor], list]:
        return lambda x: [module(x) for module in modules]

    def each_compiled(modules: nn.ModuleList, x: torch.Tensor) -> Callable[[torch.Tensor], list]:
        functions = [torch.compile(copy.deepcopy(m), options={"freezing": True}) for m in modules]
        print(f"  compiled neck: cosine {cosine([f(x) for f in functions], reference):.6f}")
        return each(functions)

    return {
        "eager, trunk's layout (channels-last view)": (each(levels), trunk_map),
        "eager, contiguous NCHW input": (each(levels), contiguous),
        "eager, channels-last weights": (each(channels_last), trunk_map),
        "compiled, trunk's layout": (each_compiled(levels, trunk_map), trunk_map),
        "compiled, contiguous NCHW input": (each_compiled(levels, contiguous), contiguous),
        "compiled, channels-last weights": (each_compiled(channels_last, trunk_map), trunk_map),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    print(f"# {date.today()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    # Every compiled copy here shares one wrapper frame; past dynamo's default of 8 graphs per frame the rest would
    # silently run eagerly.
    torch._dynamo.config.recompile_limit = 64
    with torch.inference_mode():
        block = block_variants()
        neck = neck_variants()
        print("| part | variant | ms | vs the first |")
        print("|---|---|---|---|")
        race("window block", block, args.rounds)
        race("neck", neck, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
