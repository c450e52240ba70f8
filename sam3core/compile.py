"""Compiling the vision backbone: the choice per device, the eager fallback and the warm-up that pays for it.

What `compile="auto"` picks (measured with `bench/backbone.py`, figures in docs/benchmarks.md):

- CPU, bfloat16: inductor with `freezing`: the weights become constants of the graph, so whatever is computed
  from weights alone (transposes, layouts) is done once, and the memory-bound work between the matmuls (LayerNorm,
  GELU, RoPE in float32, casts, window reshapes) is fused into a few C++ loops; eager runs each of those ops as a
  separate pass over memory. Attention is not compiled: on a CPU it is one opaque op in cache-sized chunks
  (`sam3core.attention`), eager or compiled. Against eager in the same run on a shared 2-core CPU, compiling
  measured 1.14x at 336 px and 1.15x at 1008 px (docs/benchmarks.md); `cpp_wrapper` and `max_autotune` added
  nothing measurable. `compile: off` skips the 20 to 60 s of compilation per actor.
- CPU, a small run: eager whatever the dtype when the caller says how many images the model will see and their
  trunk work (`trunk_flops`) stays under `CPU_COMPILE_MIN_TFLOP`: compiling costs more than it saves there
  (`compile_pays_off`).
- CPU, float32: eager (not measured: compiling costs about a minute per actor on a small CPU, and the float32
  matmuls dominate even more than in bfloat16).
- CUDA: inductor `max-autotune-no-cudagraphs` (Triton matmul templates tuned once per shape; CUDA graphs are left
  out because their output buffers are reused by the next call, and callers keep outputs around). Not measured
  yet: no GPU was available to the session that wrote this.

Compilation is lazy: the first call of each compiled module pays it. `warm_up` makes that call on a padded batch of
the size real batches will have (inputs of another batch size would compile again), measures it and, if
compilation fails, falls back to eager with a warning. Inductor caches compiled code on disk (FX graph cache, on
by default, under `TORCHINDUCTOR_CACHE_DIR`, default `/tmp/torchinductor_<user>`): a second process with the same
model, shapes and torch version skips most of the work. Freezing captures the weights at the first call: load
weights before it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import Sam3Config

logger = logging.getLogger(__name__)

COMPILE_CHOICES = ("auto", "on", "off")


@dataclass(frozen=True)
class CompilePlan:
    """How (and whether) to compile the vision modules on one device."""

    enabled: bool
    backend: str | Callable[..., Any] = "inductor"
    mode: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        if not self.enabled:
            return "eager"
        backend = self.backend if isinstance(self.backend, str) else getattr(self.backend, "__name__", "custom")
        extras = [self.mode] if self.mode else []
        extras += [f"{key}={value}" for key, value in sorted(self.options.items())]
        return f"{backend} ({', '.join(extras)})" if extras else backend


def compile_plan(requested: str | bool, device: torch.device | str, dtype: torch.dtype) -> CompilePlan:
    """`requested` is auto | on | off (or a bool); `on` compiles with the device's compiled choice even where
    `auto` would not (CPU float32)."""
    if isinstance(requested, bool):
        requested = "on" if requested else "off"
    if requested not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {COMPILE_CHOICES}, got {requested!r}")
    device_type = torch.device(device).type
    if requested == "off":
        return CompilePlan(enabled=False)
    if device_type == "cuda":
        return CompilePlan(enabled=True, mode="max-autotune-no-cudagraphs")
    if requested == "auto" and dtype == torch.float32:
        return CompilePlan(enabled=False)
    return CompilePlan(enabled=True, options={"freezing": True})


# On a CPU, compiling (7 s for `tiny`, 20 to 45 s for `sam3` per actor) saves 13 to 15% of the model's time, so
# it pays only past some amount of work. Break-even on the 2-core CPU of docs/benchmarks.md ("Compiling only what
# pays"): about 21,000 to 35,000 rows of `tiny` at 224 px (3 to 5 TFLOP), about 16 images of `sam3` at 1008 px
# with a warm cache (88 TFLOP). The tiny model is bound by per-op overhead rather than FLOPs, hence the spread; the
# threshold sits between the two.
CPU_COMPILE_MIN_TFLOP = 20.0


def trunk_flops(config: Sam3Config, imgsz: int) -> float:
    """FLOPs of the ViT trunk for one image (multiply-adds counted as two), from the configuration alone.

    Per block: the four attention projections and the MLP (2 x tokens x width^2 x (4 + 2 x mlp_ratio)), then the
    attention scores and their weighted sum over the block's window, or over every token in a global block. The
    neck and the text tower are left out (a few percent for `sam3`). For `sam3` at 1008 px this gives 5.4 TFLOP.
    """
    vision = config.vision
    side = imgsz // vision.patch_size
    tokens = side * side
    window_tokens = min(vision.window_size, side) ** 2
    projections = 2 * tokens * vision.width**2 * (4 + 2 * vision.mlp_ratio)
    total = 0.0
    for block in range(vision.depth):
        attended = tokens if block in vision.global_blocks else window_tokens
        total += projections + 4 * tokens * attended * vision.width
    return total


def compile_pays_off(device: torch.device | str, rows: int | None, flops_per_image: float) -> bool:
    """Whether `compile="auto"` should compile for an actor that embeds at most `rows` images.

    Always on CUDA (compiled kernels are where a GPU's speed comes from) and when the rows are not known; on a CPU
    only when the work reaches `CPU_COMPILE_MIN_TFLOP`.
    """
    if torch.device(device).type != "cpu" or rows is None:
        return True
    return rows * flops_per_image >= CPU_COMPILE_MIN_TFLOP * 1e12


def compiled_modules(vision: nn.Module) -> list[nn.Module]:
    """The modules compiled in place: the trunk (one graph) and each pyramid level of the neck (`FpnLevel`, whose
    forward Dynamo traces; `tests/test_compile.py` checks that every one of them yields a graph).

    Compiling the modules rather than one call keeps parameter names (checkpoints stay interchangeable) and serves
    every entry point that calls them, whichever subset of levels it runs.
    """
    modules: list[nn.Module] = [vision.trunk, *vision.convs]
    for head in ("sam2_convs", "interactive_convs", "propagation_convs"):  # SAM 3's optional head, SAM 3.1's two
        if getattr(vision, head, None) is not None:
            modules += list(getattr(vision, head))
    return modules


def apply_compile(vision: nn.Module, plan: CompilePlan) -> None:
    if not plan.enabled:
        return
    for module in compiled_modules(vision):
        module.compile(backend=plan.backend, mode=plan.mode, options=plan.options or None)


def remove_compile(vision: nn.Module) -> None:
    """Back to eager in place (what `nn.Module.compile` set up is the `_compiled_call_impl` attribute)."""
    for module in compiled_modules(vision):
        module._compiled_call_impl = None


def is_compiled(vision: nn.Module) -> bool:
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in compiled_modules(vision))


def set_compile_threads(threads: int) -> None:
    """Inductor's compile workers: as many as the process may use, not the host's core count (inductor counts the
    host's cores, which in a container limited to a few CPUs starts dozens of workers that fight over them).
    An explicit `TORCHINDUCTOR_COMPILE_THREADS` wins. The variable is set too, for worker processes."""
    if "TORCHINDUCTOR_COMPILE_THREADS" in os.environ:
        return
    threads = max(1, int(threads))
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = str(threads)
    # Inductor reads the variable when its config is first imported; importing it here would cost an eager
    # process (every model actor that does not compile) over a second of CPU for nothing (docs/benchmarks.md).
    inductor_config = sys.modules.get("torch._inductor.config")
    if inductor_config is not None:
        inductor_config.compile_threads = threads


# How each allocator says it ran out, in the first line of its error: CUDA's (`torch.OutOfMemoryError`), and the
# CPU's, which raises a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory: you tried to allocate ...")
_OUT_OF_MEMORY_TEXTS = ("out of memory", "can't allocate memory", "not enough memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an out-of-memory error of the device or the host, also when a compiler wrapped it (inductor's
    autotuning does)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        first_line = str(seen).lower().split("\n", 1)[0]
        if isinstance(seen, torch.OutOfMemoryError) or any(text in first_line for text in _OUT_OF_MEMORY_TEXTS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def short_reason(exc: BaseException, lines: int = 3, limit: int = 400) -> str:
    """The exception's type and its first few lines (inductor's wrapped errors put the cause on the second)."""
    text = " ".join([line.strip() for line in str(exc).splitlines() if line.strip()][:lines])
    return f"{type(exc).__name__}: {text}"[:limit]


def compile_fallback(vision: nn.Module) -> str | None:
    """Why `vision` runs eagerly after all (None: it does not): its last `warm_up` gave up compiling, or a loaded
    library of a module failed at a call and the module runs eagerly since (`sam3core.aot_package.PackagedCall`,
    whose `failed` says why). Callers record it in metadata."""
    reason = getattr(vision, "_compile_fallback", None)
    if reason is not None:
        return reason
    for module in compiled_modules(vision):
        failed = getattr(module._compiled_call_impl, "failed", None)
        if failed is not None:
            name = next(name for name, other in vision.named_modules() if other is module)
            return f"{name}: {failed}"
    return None


def warm_up(run: Callable[[], Any], vision: nn.Module, description: str = "") -> float:
    """Calls `run` once (it should push a padded batch of the real batch size through the compiled modules) and
    returns its seconds. If compilation fails, warns, reverts `vision` to eager, records why (`compile_fallback`)
    and runs it again eagerly. Running out of device memory is not a compilation failure: it is raised as is."""
    started = time.monotonic()
    vision._compile_fallback = None
    try:
        with torch.inference_mode():
            run()
    except Exception as exc:
        if not is_compiled(vision) or is_out_of_memory(exc):
            raise
        message = f"compiling the vision backbone failed, running it eagerly: {type(exc).__name__}: {exc}"
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        logger.warning(message)
        vision._compile_fallback = short_reason(exc)
        remove_compile(vision)
        torch._dynamo.reset()
        with torch.inference_mode():
            run()
    seconds = time.monotonic() - started
    logger.info("warm-up %s took %.1fs (compiled=%s)", description, seconds, is_compiled(vision))
    return seconds
