"""Compiled code as one portable artifact: what keys it, how it is sealed, saved and loaded. No I/O here.

Two kinds of payload go behind the same sealed header; `SAM3_COMPILE_ARTIFACT` chooses, and `artifact_kind` says
what each device gets by default. "aoti", the default on a CPU, is an AOTInductor package of the compiled modules
(`sam3core.aot_package`): a fresh process loads it and runs, without tracing or compiling. Measured on a CPU
(docs/benchmarks.md, "Compiled code shared across actors and nodes"), it brings a fresh node to its first batch in
11% to 14% of its own cold build (the full model's 0.9 GB package copied out of its file by the kernel, no warm-up
call, no trunk weights built beside it: 18% to 24% of a cold just-in-time compile, against 53% to 54% for the
caches), and its calls on the full model ran 1.13x as fast as the just-in-time code's; the price is its
publisher's build, 1.2x to 2.4x a just-in-time compilation, once per key.
"caches", the default on CUDA (where neither kind has been measured), is described below.

A "caches" artifact is torch's portable compile caches (`torch.compiler.save_cache_artifacts`: inductor's FX graph
cache, AOTAutograd's cache and autotuning results) for one compiled backbone, plus the C++ kernels inductor built
for it on a CPU (the `.so` files of `TORCHINDUCTOR_CACHE_DIR`, which torch's caches do not carry: without them a
fresh node compiles every kernel again from the cached source), behind a header that names the key it was made for
and the SHA-256 of the payload. Loading it fills this process's local caches, so the warm-up call that follows finds
every graph and kernel compiled: it still traces the model with dynamo and, with freezing (which AOTAutograd's cache
refuses), runs the freezing passes and lowering again, but generates and builds no code. An artifact runs native
code: its URI must be as trusted as the checkpoint's. An artifact made for another key, truncated or altered is
refused (`ArtifactError`) before torch reads a byte of it; whoever holds it then compiles and writes a new one.

The key is everything that changes the compiled code or whether it may run: torch and Python versions, the device
kind and instruction set (or GPU model and compute capability), dtype, image size, batch size, which entry point is
compiled (vision features only or the whole pyramid), the compile plan, the model configuration, the checkpoint's
hash (freezing folds small weights into the code) and the source of `sam3core` itself.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import tarfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .cpu import CpuFeatures, cpu_features

# What an artifact holds (the key's `artifact`): torch's portable caches (the default), or an AOTInductor package per
# compiled module, which a fresh process loads without tracing anything (docs/benchmarks.md measures both).
ARTIFACT_KINDS = ("caches", "aoti")
ARTIFACT_ENV = "SAM3_COMPILE_ARTIFACT"
MAGIC = b"SAM3CC1\n"  # the format of the header below; a new format gets a new magic
_SOURCE_DIR = Path(__file__).resolve().parent
_TORCH_MEMBER = "torch-caches"
_BINARY_PREFIX = "kernels/"
_HEADER_LIMIT = 1 << 20  # a header line is a few hundred bytes; a file without one is not read further
CHUNK_BYTES = 16 << 20  # an artifact is hashed and copied this much at a time, never held whole
_recording_since = 0.0  # wall time: kernels built after it belong to the compilation being recorded


class ArtifactError(ValueError):
    """An artifact that must not be loaded: not one, another key's, or damaged."""


@dataclass(frozen=True)
class CompileKey:
    torch_version: str
    python: str
    device: str  # "cpu:avx512_bf16 (ATen AVX512, bfloat16 native)" or "cuda:NVIDIA H100 80GB HBM3 sm_90"
    dtype: str
    imgsz: int
    batch_size: int
    vision_features_only: bool
    sam2_neck: bool
    plan: str  # CompilePlan.describe()
    artifact: str  # what the payload is: "aoti" (sam3core.aot_package) or "caches" (torch's caches and kernels)
    model_config: str  # the configuration as canonical JSON
    checkpoint_sha256: str  # "random:<seed>" for random weights
    source_sha256: str  # of sam3core's Python files

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def device_description(device: torch.device | str, features: CpuFeatures | None = None) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda:{torch.cuda.get_device_name(device)} sm_{major}{minor}"
    if device.type == "cpu":
        return f"cpu:{(features or cpu_features()).describe()}"
    return device.type


def source_sha256() -> str:
    """Of every Python file of sam3core: a changed model or compile plan must not meet old compiled code."""
    digest = hashlib.sha256()
    for path in sorted(_SOURCE_DIR.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def artifact_kind(device_type: str, environ: Mapping[str, str] | None = None) -> str:
    """The artifact made and looked for on `device_type`: `SAM3_COMPILE_ARTIFACT` when set, otherwise what measured
    better there: "aoti" on a CPU (bench/startup.py, bench/aot_speed.py); "caches" elsewhere, until a GPU
    measurement says otherwise."""
    default = "aoti" if device_type == "cpu" else "caches"
    kind = (os.environ if environ is None else environ).get(ARTIFACT_ENV) or default
    if kind not in ARTIFACT_KINDS:
        raise ValueError(f"{ARTIFACT_ENV} must be one of {ARTIFACT_KINDS}, not {kind!r}")
    return kind


def compile_key(
    model: Any,
    *,
    batch_size: int,
    vision_features_only: bool,
    checkpoint_sha256: str,
    features: CpuFeatures | None = None,
    artifact: str | None = None,
) -> CompileKey:
    """The key of `model` (a built SAM3VLBackbone, compile plan applied) warmed up at `batch_size`."""
    weight = model.vision_backbone.trunk.patch_embed.proj.weight
    return CompileKey(
        torch_version=torch.__version__,
        python=platform.python_version(),
        device=device_description(weight.device, features),
        dtype=str(weight.dtype).removeprefix("torch."),
        imgsz=int(model.imgsz),
        batch_size=int(batch_size),
        vision_features_only=bool(vision_features_only),
        sam2_neck=getattr(model.vision_backbone, "sam2_convs", None) is not None,
        plan=model.compile_plan.describe(),
        artifact=artifact or artifact_kind(weight.device.type),
        model_config=json.dumps(model.config.to_dict(), sort_keys=True),
        checkpoint_sha256=checkpoint_sha256,
        source_sha256=source_sha256(),
    )


def seal(payload: bytes, key: CompileKey) -> bytes:
    """The artifact: magic, one JSON header line (key, digest, payload size and hash), the payload."""
    header = {
        "key": key.as_dict(),
        "digest": key.digest(),
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload


def read_header(head: bytes) -> Mapping[str, Any]:
    """The header of an artifact that starts with `head` (its magic and header line, or more)."""
    if not head.startswith(MAGIC):
        raise ArtifactError("not a sam3core compile artifact (bad magic)")
    end = head.find(b"\n", len(MAGIC))
    if end < 0:
        raise ArtifactError("compile artifact truncated in its header")
    try:
        return json.loads(head[len(MAGIC) : end])
    except ValueError as error:
        raise ArtifactError(f"compile artifact header unreadable: {error}") from error


def unseal(file: BinaryIO, key: CompileKey) -> int:
    """Checks the artifact that `file` holds from its current position: made for `key`, its payload intact.
    Returns the payload's size with `file` at the payload's first byte; ArtifactError otherwise.

    The payload is hashed in chunks, never held whole: a package is about the size of the trunk's weights
    (0.9 GB for "sam3"), and each copy of it in memory adds to a starting actor's peak beside its model."""
    header = read_header(file.read(len(MAGIC)) + file.readline(_HEADER_LIMIT))
    if header.get("digest") != key.digest() or header.get("key") != key.as_dict():
        theirs = header.get("key") or {}
        changed = sorted(name for name, value in key.as_dict().items() if theirs.get(name) != value)
        raise ArtifactError(f"compile artifact made for another key (differs in {', '.join(changed) or 'digest'})")
    start = file.tell()
    digest, size = hashlib.sha256(), 0
    while chunk := file.read(CHUNK_BYTES):
        digest.update(chunk)
        size += len(chunk)
    if size != header.get("payload_bytes") or digest.hexdigest() != header.get("payload_sha256"):
        raise ArtifactError(f"compile artifact damaged: {size} payload bytes, SHA-256 does not match its header")
    file.seek(start)
    return size


def start_recording() -> None:
    """Forget cache artifacts recorded so far in this process, so the next `save_artifacts` holds only what the
    compilation that follows produces (or loads)."""
    from torch.compiler._cache import CacheArtifactManager

    global _recording_since
    CacheArtifactManager.clear()
    _recording_since = time.time() - 1.0


def save_artifacts() -> bytes | None:
    """What this process compiled (or found in its caches) since `start_recording`, as bytes; None if nothing.

    One tar: torch's serialized caches, and the kernels built since `start_recording` (a process that found its
    kernels in a warm local cache built none: its artifact carries torch's caches alone, and a fresh node builds
    the kernels from them)."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return None
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        _add(tar, _TORCH_MEMBER, saved[0])
        root = _inductor_cache_dir()
        for path in sorted(root.glob("*/*.so")):
            if path.stat().st_mtime >= _recording_since:
                _add(tar, _BINARY_PREFIX + path.relative_to(root).as_posix(), path.read_bytes())
    return buffer.getvalue()


def load_artifacts(payload: bytes) -> None:
    """Fills this process's compile caches from a verified payload (see `unseal`)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r") as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    except (tarfile.TarError, OSError, AttributeError) as error:
        raise ArtifactError(f"compile artifact payload unreadable: {error}") from error
    if _TORCH_MEMBER not in members:
        raise ArtifactError("compile artifact payload holds no torch caches")
    kernels = {}
    for name, data in members.items():
        if name == _TORCH_MEMBER:
            continue
        relative = name.removeprefix(_BINARY_PREFIX).split("/")
        # exactly <2 characters>/<name>.so, as inductor lays them out: nothing else is written anywhere
        valid = name.startswith(_BINARY_PREFIX) and len(relative) == 2 and relative[1].endswith(".so")
        if not valid or any(part in ("", ".", "..") for part in relative):
            raise ArtifactError(f"compile artifact holds an unexpected member {name!r}")
        kernels[tuple(relative)] = data
    try:
        info = torch.compiler.load_cache_artifacts(members[_TORCH_MEMBER])
    except Exception as error:  # a payload torch cannot read: as damaged as a bad hash
        raise ArtifactError(f"torch could not load the compile artifact: {type(error).__name__}: {error}") from error
    if info is None:  # torch logs why (a checksum, an unpickling error) and returns None
        raise ArtifactError("torch could not load the compile artifact (see its warning above)")
    root = _inductor_cache_dir()
    for relative, data in kernels.items():
        target = root.joinpath(*relative)
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        partial.write_bytes(data)
        os.replace(partial, target)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _inductor_cache_dir() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())
