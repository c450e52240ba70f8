"""Images per second through the vision backbone: sam3core (eager and compiled) against Meta's official
implementation, side by side, with the fraction of the machine's measured matmul peak each reaches.

Both run in the same process, on the same machine, on the same input, with the official "sam3" configuration
(weights do not change the cost, so both get the same random weights). For each image size and dtype it times
`forward_image` (ViT trunk + FPN neck with its SAM 2 twin + position encodings) at batch size 1 after a warm-up:

- float32: both models as built;
- bfloat16: sam3core cast with `.to(torch.bfloat16)` (its RoPE tables stay float32 by design), the official model
  under `torch.autocast` (casting it would silently drop the imaginary part of its complex RoPE buffers);
- sam3core compiled: what `compile="auto"` picks for the device and dtype (`sam3core.compile.compile_plan`; `on`
  where auto stays eager), compiled in place, warm-up (= compilation) timed separately;
- sam3core packaged (`--variants ... packaged`): the same plan compiled ahead of time into an AOTInductor package
  and loaded (`sam3core.aot_package`), what a CPU job's model actors run when their compiled code is shared.

Every output of each timed variant is checked against sam3core float32 (cosine similarity). The peak is the
fastest 4096 x 4096 x 4096 matmul in the same dtype, measured before and after the variants; FLOPs per image are
counted by `torch.utils.flop_counter` on a meta copy of the model. The official modules come from Meta's `sam3`
wheel in a separate environment (see `tools/official_sam3.py`):

    TORCHINDUCTOR_CACHE_DIR=/tmp/inductor PYTHONPATH=. .refenv/bin/python bench/backbone.py \\
        --sizes 336 1008 --dtypes bfloat16 --iters 2

`--device cuda` runs the same comparison on a GPU. `--variants official eager` leaves out the compiled variant;
`--cpu-kernels sdpa chunked` times the eager model once per CPU attention kernel (`sam3core.attention`), forced,
next to the kernel the machine's table picks. `--rounds N` calls the official model and the eager variants in turn,
N times, and keeps the fastest call of each (the form to use on a shared machine; no compiled variant). The AVX2
emulation of docs/benchmarks.md ("Per-CPU choices") is the same command under `ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import sam3core.attention as attention_module  # noqa: E402
from sam3core import build_sam3_vl_backbone, get_config  # noqa: E402
from sam3core.aot_package import build_package, install_package  # noqa: E402
from sam3core.build import _assemble  # noqa: E402
from sam3core.compile import apply_compile, compile_plan, is_compiled, remove_compile  # noqa: E402
from sam3core.cpu import cpu_features  # noqa: E402
from sam3core.tokenizer import Sam3Tokenizer  # noqa: E402

CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


@dataclass
class Row:
    imgsz: int
    dtype: str
    variant: str
    seconds: float
    flops: float
    peak: float
    cosine: float
    official_seconds: float | None
    note: str = ""

    def cells(self) -> list[str]:
        ratio = f"{self.official_seconds / self.seconds:.2f}x" if self.official_seconds else "n/a"
        return [
            str(self.imgsz),
            self.dtype,
            self.variant,
            f"{self.seconds:.2f}",
            f"{1 / self.seconds:.3f}",
            ratio,
            f"{self.flops / self.seconds / 1e12:.3f}",
            f"{self.flops / self.seconds / self.peak:.0%}",
            f"{self.cosine:.6f}",
            self.note,
        ]


HEADER = [
    "size",
    "dtype",
    "variant",
    "s/img",
    "img/s",
    "vs official",
    "TFLOP/s",
    "of matmul peak",
    "min cosine vs fp32",
    "note",
]


def official_backbone(imgsz: int, device: str) -> torch.nn.Module | None:
    try:
        from tools.make_parity_reference import build_official_backbone, load_project_config_module
        from tools.official_sam3 import load_official_modules
    except ImportError as exc:
        print(f"official implementation not importable here ({exc}); timing sam3core only", file=sys.stderr)
        return None
    official = load_official_modules()
    config = load_project_config_module().CONFIGS["sam3"]
    return build_official_backbone(official, config, imgsz).to(device).eval()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_forward(run: Callable[[], object], iters: int, device: str) -> float:
    """Seconds per call, after one warm-up call."""
    run()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        run()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def matmul_peak(dtype: torch.dtype, device: str, n: int = 4096, calls: int = 8) -> float:
    """FLOP/s of the fastest of `calls` n x n x n matmuls (the best call: a shared machine only slows calls down)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    best = min(time_forward(lambda: a @ b, 1, device) for _ in range(calls))
    return 2 * n**3 / best


def image_flops(imgsz: int) -> float:
    """FLOPs of one `forward_image` (with the SAM 2 neck) at batch size 1, counted on a meta-device copy."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = get_config("sam3")
    with torch.device("meta"):
        model = _assemble(cfg, imgsz, Sam3Tokenizer(context_length=cfg.text.context_length), add_sam2_neck=True)
    model.to("meta")  # the RoPE tables are built on the CPU by design; move them too
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.forward_image(torch.zeros(1, 3, imgsz, imgsz, device="meta"))
    return float(counter.get_total_flops())


def outputs(out: dict) -> list[torch.Tensor]:
    return [*out["backbone_fpn"], *out["sam2_backbone_out"]["backbone_fpn"]]


def min_cosine(actual: dict, expected: list[torch.Tensor]) -> float:
    return min(
        F.cosine_similarity(a.float().flatten(), e.flatten(), dim=0).item()
        for a, e in zip(outputs(actual), expected, strict=True)
    )


def forced_kernel(kernel: str | None, dtype: torch.dtype) -> dict:
    """The CPU kernel table with `kernel` for `dtype` on this machine (None: the table as it is)."""
    table = dict(attention_module.CPU_KERNELS)
    if kernel is not None:
        table[(cpu_features().isa, dtype)] = kernel
    return table


def interleaved(
    imgsz: int,
    dtype: torch.dtype,
    ours: torch.nn.Module,
    theirs: torch.nn.Module | None,
    images: torch.Tensor,
    reference: list[torch.Tensor],
    rounds: int,
    cpu_kernels: tuple[str, ...],
    flops: float,
    peak: float,
) -> list[Row]:
    """The official model and the eager variants called in turn (the order rotating), `rounds` times after one
    warm-up call each; the fastest call of each (on a shared machine a neighbour only ever slows a call down, and
    it slows every variant alike only when they alternate)."""
    ours.to(dtype)
    table = attention_module.CPU_KERNELS
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()
    runs: dict[str, Callable[[], dict]] = {}
    if theirs is not None:
        runs["official"] = lambda: theirs.forward_image(images)
    chosen = attention_module.cpu_attention_kernel(dtype)
    for kernel in (None, *cpu_kernels):

        def run(kernel: str | None = kernel) -> dict:
            attention_module.CPU_KERNELS = forced_kernel(kernel, dtype)
            try:
                return ours.forward_image(images)
            finally:
                attention_module.CPU_KERNELS = table

        runs[f"sam3core eager ({kernel}, forced)" if kernel else f"sam3core eager ({chosen}, the table's)"] = run
    best = dict.fromkeys(runs, float("inf"))
    cosines = {}
    with torch.inference_mode():
        for name, run in runs.items():
            with autocast if name == "official" else nullcontext():
                cosines[name] = min_cosine(run(), reference)
        names = list(runs)
        for index in range(rounds):
            # each round starts one variant later: none always follows the same neighbour
            for name in names[index % len(names) :] + names[: index % len(names)]:
                run = runs[name]
                with autocast if name == "official" else nullcontext():
                    start = time.perf_counter()
                    run()
                    best[name] = min(best[name], time.perf_counter() - start)
            print(f"round {index + 1}: " + ", ".join(f"{n} {s:.2f}" for n, s in best.items()), flush=True)
    theirs_s = best.get("official")
    return [
        Row(imgsz, str(dtype).removeprefix("torch."), name, best[name], flops, peak, cosines[name], theirs_s)
        for name in runs
    ]


def timed_forward(
    ours: torch.nn.Module, images: torch.Tensor, reference: list[torch.Tensor], iters: int, device: str
) -> tuple[float, float]:
    """Seconds per `forward_image` call and the lowest cosine of its outputs against `reference`."""
    with torch.inference_mode():
        seconds = time_forward(lambda: ours.forward_image(images), iters, device)
        cosine = min_cosine(ours.forward_image(images), reference)
    return seconds, cosine


def compare_at(
    imgsz: int,
    dtypes: list[str],
    iters: int,
    device: str,
    with_official: bool,
    variants: tuple[str, ...] = ("official", "eager", "compiled"),
    cpu_kernels: tuple[str, ...] = (),
    rounds: int = 0,
) -> list[Row]:
    torch.manual_seed(0)
    # the official builder adds the SAM 2 twin neck; give ours the same work
    ours = build_sam3_vl_backbone(config="sam3", imgsz=imgsz, device=device, add_sam2_neck=True)
    theirs = official_backbone(imgsz, device) if with_official and "official" in variants else None
    if theirs is not None:
        # same names on both sides; only the official complex RoPE tables are not in ours
        missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
        assert not unexpected and all(name.endswith("freqs_cis") for name in missing), (missing, unexpected)
    with torch.inference_mode():  # an inference tensor, as the warm-up's: no second compilation
        images = torch.randn(1, 3, imgsz, imgsz, device=device)
        reference = [t.float() for t in outputs(ours.forward_image(images))]
    flops = image_flops(imgsz)
    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        peak = matmul_peak(dtype, device)
        print(f"{imgsz} px {dtype_name}: {flops / 1e12:.2f} TFLOP/image, matmul peak {peak / 1e12:.2f} TFLOP/s")
        if rounds:
            rows += interleaved(imgsz, dtype, ours, theirs, images, reference, rounds, cpu_kernels, flops, peak)
            continue
        theirs_s = None
        if theirs is not None:
            autocast = torch.autocast(device, dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()
            with torch.inference_mode(), autocast:
                theirs_s = time_forward(lambda: theirs.forward_image(images), iters, device)
                cosine = min_cosine(theirs.forward_image(images), reference)
            rows.append(Row(imgsz, dtype_name, "official", theirs_s, flops, peak, cosine, theirs_s))
            print(" | ".join(rows[-1].cells()), flush=True)
        ours.to(dtype)
        table = attention_module.CPU_KERNELS
        for kernel in (None, *cpu_kernels) if "eager" in variants else ():
            attention_module.CPU_KERNELS = forced_kernel(kernel, dtype)
            try:
                with torch.inference_mode():
                    seconds = time_forward(lambda: ours.forward_image(images), iters, device)
                    cosine = min_cosine(ours.forward_image(images), reference)
            finally:
                attention_module.CPU_KERNELS = table
            chosen = attention_module.cpu_attention_kernel(dtype) if device == "cpu" else "sdpa"
            label = f"sam3core eager ({kernel}, forced)" if kernel else f"sam3core eager ({chosen}, the table's)"
            rows.append(Row(imgsz, dtype_name, label, seconds, flops, peak, cosine, theirs_s))
            print(" | ".join(rows[-1].cells()), flush=True)
        if "compiled" not in variants and "packaged" not in variants:
            continue

        plan = compile_plan("auto", device, dtype)
        explicit = not plan.enabled
        if explicit:
            plan = compile_plan("on", device, dtype)
        ours.compile_plan = plan
        if "compiled" in variants:
            label = "sam3core compiled (`on`; auto stays eager)" if explicit else "sam3core compiled (auto)"
            apply_compile(ours.vision_backbone, plan)
            warm = ours.warm_up(1)
            assert is_compiled(ours.vision_backbone), "compilation fell back to eager"
            note = f"{plan.describe()}; first call (compile) {warm:.0f} s"
            seconds, cosine = timed_forward(ours, images, reference, iters, device)
            rows.append(Row(imgsz, dtype_name, label, seconds, flops, peak, cosine, theirs_s, note))
            print(" | ".join(rows[-1].cells()), flush=True)
            remove_compile(ours.vision_backbone)  # back to eager (a frozen graph holds this dtype's weights)
            torch._dynamo.reset()
        if "packaged" in variants:
            # what a CPU job's model actors run once the compiled code is shared (sam3core.compile_cache): the same
            # plan compiled ahead of time into an AOTInductor package, then loaded
            apply_compile(ours.vision_backbone, plan)
            started = time.perf_counter()
            payload = build_package(ours.vision_backbone, ours.zero_batch_call(1), plan)
            install_package(ours.vision_backbone, payload)
            built = time.perf_counter() - started
            note = f"{plan.describe()}; package {len(payload) / 1e6:.0f} MB built in {built:.0f} s"
            seconds, cosine = timed_forward(ours, images, reference, iters, device)
            label = "sam3core packaged (AOTInductor)"
            rows.append(Row(imgsz, dtype_name, label, seconds, flops, peak, cosine, theirs_s, note))
            print(" | ".join(rows[-1].cells()), flush=True)
            remove_compile(ours.vision_backbone)
            torch._dynamo.reset()
        # A shared machine only ever slows a matmul down: the faster of the peaks before and after is the peak.
        peak = max(peak, matmul_peak(dtype, device))
        for row in rows:
            if row.dtype == dtype_name:
                row.peak = peak
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[336, 1008])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-official", action="store_true", help="time sam3core only")
    parser.add_argument("--variants", nargs="+", default=["official", "eager", "compiled"])
    parser.add_argument("--cpu-kernels", nargs="*", default=[], choices=["sdpa", "chunked"])
    parser.add_argument(
        "--rounds", type=int, default=0, help="call the official model and the eager variants in turn, this often"
    )
    args = parser.parse_args(argv)

    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}"
    print(f"# {date.today()} torch {torch.__version__} on {machine}, {torch.get_num_threads()} threads")
    if args.device == "cpu":
        caps = {k: os.environ[k] for k in CAPS if k in os.environ}
        print(f"# CPU: {cpu_features().describe()}; caps: {caps or 'none'}")
    rows = []
    for imgsz in args.sizes:
        rows += compare_at(
            imgsz,
            args.dtypes,
            args.iters,
            args.device,
            with_official=not args.no_official,
            variants=tuple(args.variants),
            cpu_kernels=tuple(args.cpu_kernels),
            rounds=args.rounds,
        )

    print("\n| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for row in rows:
        print("| " + " | ".join(row.cells()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
