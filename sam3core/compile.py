"""Compiling the vision backbone: the choice per device, the eager fallback and the warm-up that pays for it.

What `compile="auto"` picks (measured with `bench/backbone.py`, figures in docs/benchmarks.md):

- CPU, bfloat16: inductor with `freezing`: the weights become constants of the graph, so whatever is computed
  from weights alone (transposes, layouts) is done once, and the memory-bound work between the matmuls (LayerNorm,
  GELU, RoPE in float32, casts, window reshapes) is fused into a few C++ loops; eager runs each of those ops as a
  separate pass over memory. Attention is not compiled: on a CPU it is one opaque op in cache-sized chunks
  (`sam3core.attention`), eager or compiled. Against eager in the same run on a shared 2-core CPU, compiling
  measured 1.14x at 336 px and 1.15x at 1008 px (docs/benchmarks.md); `cpp_wrapper` and `max_autotune` added
  nothing measurable. `compile: off` skips the 20 to 60 s of compilation per actor.
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


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a device out-of-memory error, also when a compiler wrapped it (inductor's autotuning does)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, torch.OutOfMemoryError) or "out of memory" in str(seen).lower().split("\n", 1)[0]:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _short_reason(exc: BaseException, lines: int = 3, limit: int = 400) -> str:
    """The exception's type and its first few lines (inductor's wrapped errors put the cause on the second)."""
    text = " ".join([line.strip() for line in str(exc).splitlines() if line.strip()][:lines])
    return f"{type(exc).__name__}: {text}"[:limit]


def compile_fallback(vision: nn.Module) -> str | None:
    """Why the last `warm_up` of `vision` gave up compiling (None: it did not): callers record it in metadata."""
    return getattr(vision, "_compile_fallback", None)


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
        vision._compile_fallback = _short_reason(exc)
        remove_compile(vision)
        torch._dynamo.reset()
        with torch.inference_mode():
            run()
    seconds = time.monotonic() - started
    logger.info("warm-up %s took %.1fs (compiled=%s)", description, seconds, is_compiled(vision))
    return seconds
