"""What this CPU can do natively, as torch will use it, and the dtype `auto` picks from it.

Three libraries decide which instructions a CPU run uses, each on its own:

- ATen's vectorized kernels (elementwise ops, softmax, LayerNorm, SDPA's flash kernel): the best of DEFAULT, AVX2
  and AVX512 the CPU has, capped by `ATEN_CPU_CAPABILITY` (`torch.backends.cpu.get_cpu_capability()`);
- oneDNN (bfloat16 and float16 matmuls, linear layers and convolutions): capped by `ONEDNN_MAX_CPU_ISA`; below
  AVX-512 it refuses bfloat16 (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`), and torch falls back to its own
  scalar-converting GEMM, several times slower than float32;
- MKL (float32 matmuls): capped by `MKL_ENABLE_INSTRUCTIONS`, which neither of the two above touches.

bfloat16 is native where the hardware has AVX-512 BF16 or AMX and oneDNN may use them; elsewhere it is emulated
(converted to float32 around every multiply) and slower than float32, so `auto` picks float32 there.
docs/benchmarks.md ("Per-CPU choices") has the measurements behind this, on this machine and under an AVX2 cap.

The features are read once per process; `cpu_features()` takes them from torch, and every decision takes a
`CpuFeatures` argument so tests can describe any CPU.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

# What `auto` picks on a CPU can be forced (a cluster whose driver has other CPUs than its workers, a test suite
# that must not compile): "float32" or "bfloat16".
AUTO_DTYPE_ENV = "SAM3_CPU_AUTO_DTYPE"
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which bfloat16 dot products are still native.
_ONEDNN_CAPS_WITH_BF16 = {
    "ALL",
    "DEFAULT",
    "AVX512_CORE_BF16",
    "AVX512_CORE_FP16",
    "AVX512_CORE_AMX",
    "AVX512_CORE_AMX_FP16",
    "AVX10_1_512",
    "AVX10_1_512_AMX",
    "AVX10_1_512_AMX_FP16",
    "AVX10_2_512",
    "AVX10_2_512_AMX_2",
}


@dataclass(frozen=True)
class CpuFeatures:
    capability: str  # ATen's vector ISA in use: "AVX512", "AVX2", "DEFAULT" (after ATEN_CPU_CAPABILITY)
    avx512_bf16: bool  # the hardware has AVX-512 BF16
    amx: bool  # the hardware has AMX tiles
    onednn_bf16: bool  # oneDNN runs bfloat16 matmuls (its ISA cap allows AVX-512 at least)
    onednn_isa_cap: str = "ALL"  # ONEDNN_MAX_CPU_ISA as set, upper case
    l3_bytes: int | None = None  # the last-level cache of one core's cluster (Linux sysfs); None: unknown

    @property
    def native_bfloat16(self) -> bool:
        hardware = self.avx512_bf16 or self.amx
        return hardware and self.onednn_bf16 and self.onednn_isa_cap in _ONEDNN_CAPS_WITH_BF16

    @property
    def isa(self) -> str:
        """A short name for keys and tables: amx, avx512_bf16, avx512, avx2 or default."""
        if self.native_bfloat16:
            return "amx" if self.amx else "avx512_bf16"
        return self.capability.lower()

    def describe(self) -> str:
        bf16 = "native" if self.native_bfloat16 else "emulated"
        return f"{self.isa} (ATen {self.capability}, bfloat16 {bf16})"


def read_cpu_features(environ: Mapping[str, str] | None = None) -> CpuFeatures:
    """The features as torch reports them in this process, with `environ` for the oneDNN cap."""
    environ = os.environ if environ is None else environ
    return CpuFeatures(
        capability=torch.backends.cpu.get_cpu_capability(),
        avx512_bf16=bool(torch.cpu._is_avx512_bf16_supported()),
        amx=bool(torch.cpu._is_amx_tile_supported()),
        onednn_bf16=bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        onednn_isa_cap=(environ.get("ONEDNN_MAX_CPU_ISA") or "ALL").upper(),
        l3_bytes=_l3_bytes(),
    )


def _l3_bytes(cpu: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """The L3 cache cpu0 shares (on AMD parts one CCX's, not the socket's), from sysfs; None where unreadable."""
    try:
        for index in sorted(os.listdir(cpu)):
            base = os.path.join(cpu, index)
            with open(os.path.join(base, "level")) as level, open(os.path.join(base, "size")) as size:
                if level.read().strip() == "3":
                    text = size.read().strip().upper()
                    scale = {"K": 1024, "M": 1024**2}.get(text[-1:], 1)
                    return int(text.rstrip("KM")) * scale
    except (OSError, ValueError):
        return None
    return None


@functools.cache
def cpu_features() -> CpuFeatures:
    """This process's features, read once (ATen and oneDNN fix their ISA at the first use anyway)."""
    return read_cpu_features()


def auto_dtype(
    device: torch.device | str, features: CpuFeatures | None = None, environ: Mapping[str, str] | None = None
) -> torch.dtype:
    """What `dtype: auto` means: bfloat16 on a GPU and on a CPU that has it natively, float32 elsewhere."""
    if torch.device(device).type != "cpu":
        return torch.bfloat16
    forced = (os.environ if environ is None else environ).get(AUTO_DTYPE_ENV)
    if forced:
        if forced not in ("float32", "bfloat16"):
            raise ValueError(f"{AUTO_DTYPE_ENV} must be float32 or bfloat16, not {forced!r}")
        return getattr(torch, forced)
    features = cpu_features() if features is None else features
    return torch.bfloat16 if features.native_bfloat16 else torch.float32


def emulated_dtype_warning(dtype: torch.dtype, features: CpuFeatures | None = None) -> str | None:
    """One line when `dtype` runs emulated (slower than float32) on this CPU, else None."""
    features = cpu_features() if features is None else features
    if dtype == torch.bfloat16 and not features.native_bfloat16:
        return (
            f"bfloat16 is emulated on this CPU ({features.describe()}: no AVX-512 BF16 or AMX in use) and runs "
            "slower than float32; use dtype auto or float32 here"
        )
    return None
