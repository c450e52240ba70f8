"""The compiled vision modules as one AOTInductor package: built ahead of time, loaded without tracing.

torch's portable caches (`sam3core.compile_cache`, the "caches" artifact) spare a fresh process the code
generation and the C++ builds, but not the rest of a compilation: dynamo traces the model again and, with
freezing (which AOTAutograd's cache refuses), the freezing passes and lowering run again; on 2 cores that is most
of a warm start. An AOTInductor package holds the finished product instead: one shared library per compiled
module, its weights (frozen, as inductor laid them out) inside. Loading it is opening a zip and `dlopen`; nothing is
traced, nothing compiled.

What is packaged is what the warm-up calls: each module of `sam3core.compile.compiled_modules` that one zero
batch reaches (the trunk and the pyramid levels it computes), exported (`torch.export`, non-strict) at exactly the
shapes it saw and compiled with the model's compile plan (`aoti_compile_and_package`). Installed, a packaged
module's call goes to its library where nn.Module looks for compiled code (`_compiled_call_impl`, where
`Module.compile` puts it), so every entry point of the backbone keeps working and `remove_compile` returns it to
eager. Inputs of another shape or dtype than the exported ones (a library is compiled for one) run eagerly, with
one warning, and so does every call after a library raised (other than for lack of memory): an installed package
needs no warm-up call to be safe, and a fresh actor's first batch is its first use.

The weights are part of the package (freezing folds and repacks them; a package that reads its weights from the
model at load time crashed with freezing on torch 2.13): the package is about the size of the trunk's weights in
its dtype, and its key holds the checkpoint's hash. So an actor that loads it can leave the trunk's own weights
unbuilt (`build_sam3_vl_backbone(defer=("trunk",))`, `sam3core.deferred`): they are made only if a call
falls back to eager code.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import warnings
from collections.abc import Callable
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from . import attention  # noqa: F401  (registers sam3core::chunked_attention, which a packaged library calls)
from .compile import CompilePlan, compiled_modules, is_out_of_memory, remove_compile, short_reason
from .compile_cache import CHUNK_BYTES

logger = logging.getLogger(__name__)

_SUFFIX = ".pt2"  # a module's AOTInductor package
_INPUTS = ".inputs.json"  # the inputs it was compiled for: [[shape, dtype, device] or a type name, ...]


class PackageError(ValueError):
    """A package payload that cannot be installed (unreadable, or not for this model's modules)."""


def _module_names(vision: nn.Module) -> dict[int, str]:
    """id(module) -> its name under `vision` ("trunk", "convs.3"), for the modules compilation applies to."""
    wanted = {id(m) for m in compiled_modules(vision)}
    return {id(m): name for name, m in vision.named_modules() if id(m) in wanted}


def capture_calls(vision: nn.Module, run: Callable[[], Any]) -> dict[str, tuple[tuple, dict]]:
    """Runs `run` eagerly (compiled code removed: nothing compiles) and returns, per compiled module it reached,
    the arguments of its first call, as plain tensors (not inference tensors, which export refuses)."""
    names = _module_names(vision)
    calls: dict[str, tuple[tuple, dict]] = {}

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        name = names[id(module)]
        if name not in calls:
            calls[name] = pytree.tree_map_only(Tensor, lambda t: t.detach().clone(), (args, kwargs))

    remove_compile(vision)
    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in compiled_modules(vision)]
    try:
        with torch.inference_mode():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    # outside inference mode, a clone of an inference tensor is an ordinary tensor
    return {name: pytree.tree_map_only(Tensor, torch.clone, call) for name, call in calls.items()}


def inductor_options(plan: CompilePlan) -> dict[str, Any]:
    """The compile plan as AOTInductor's options: the mode's options, then the plan's own (CUDA graphs are not
    something a package does)."""
    from torch._inductor import list_mode_options

    options = dict(list_mode_options(plan.mode)) if plan.mode else {}
    options.update(plan.options)
    options.pop("triton.cudagraphs", None)
    return options


def build_package(vision: nn.Module, run: Callable[[], Any], plan: CompilePlan) -> bytes:
    """Exports and compiles every compiled module `run` reaches; the packages, one tar member per module."""
    calls = capture_calls(vision, run)
    modules = dict(vision.named_modules())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, (args, kwargs) in calls.items():
            with torch.no_grad():
                program = torch.export.export(modules[name], args, kwargs, strict=False)
                package = io.BytesIO()
                torch._inductor.aoti_compile_and_package(
                    program, package_path=package, inductor_configs=inductor_options(plan)
                )
            _add(tar, name + _SUFFIX, package.getvalue())
            _add(tar, name + _INPUTS, json.dumps(_signature(args, kwargs)).encode())
            logger.info("packaged %s (%d bytes)", name, len(package.getvalue()))
    return buffer.getvalue()


def install_package(vision: nn.Module, payload: bytes | BinaryIO) -> list[str]:
    """Loads each module's library from `payload` and routes the module's calls to it; returns their names.

    `payload`: the package's bytes, or a seekable file positioned at its start (`compile_cache.unseal` leaves an
    artifact's file there). From a file, each library streams into its own file for the loader: the package is
    never held in memory, where a copy of the full model's would add 0.9 GB to a starting actor's peak.
    It must come from `build_package` on this model (verified by the caller's sealed key): each member names a
    compiled module of `vision`. A package that does not install leaves the model as it was."""
    modules = dict(vision.named_modules())
    compiled = {id(m) for m in compiled_modules(vision)}
    source = io.BytesIO(payload) if isinstance(payload, bytes) else payload
    with contextlib.ExitStack() as stack:
        try:
            tar = stack.enter_context(tarfile.open(fileobj=source, mode="r"))
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
        except (tarfile.TarError, OSError) as error:
            raise PackageError(f"compile package unreadable: {error}") from error
        if not members:
            raise PackageError("compile package holds no module")
        for member in members:
            name = member.removesuffix(_SUFFIX).removesuffix(_INPUTS)
            if member not in (name + _SUFFIX, name + _INPUTS) or id(modules.get(name)) not in compiled:
                raise PackageError(f"compile package holds {member!r}, not a compiled module of this model")
            if member.endswith(_SUFFIX) and name + _INPUTS not in members:
                raise PackageError(f"compile package holds no inputs for {name!r}")
        calls = {}
        for member, info in members.items():
            if not member.endswith(_SUFFIX):
                continue
            name = member.removesuffix(_SUFFIX)
            try:
                signature = json.loads(_read_member(tar, members[name + _INPUTS]))
                calls[name] = PackagedCall(_load(tar, info), modules[name], name, signature)
            except Exception as error:  # a library that does not load: as unusable as a bad hash
                raise PackageError(
                    f"compile package {member!r} does not load: {type(error).__name__}: {error}"
                ) from error
    remove_compile(vision)
    for name, call in calls.items():
        modules[name]._compiled_call_impl = call
    return sorted(calls)


def _member_file(tar: tarfile.TarFile, info: tarfile.TarInfo) -> BinaryIO:
    file = tar.extractfile(info)
    if file is None:
        raise PackageError(f"compile package member {info.name!r} is not a file")
    return file


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    return _member_file(tar, info).read()


def _load(tar: tarfile.TarFile, info: tarfile.TarInfo) -> Any:
    """One module's package, the member `info` of `tar`, as a callable. What `torch._inductor.aoti_load_package`
    does, less its device check: that builds a test program per candidate instruction set with the C++ compiler (six
    builds, 5 to 40 s on a fresh node with 2 cores) only to log a mismatch, which the artifact's key
    (`CompileKey.device`) already rules out. The loader reads a file of its own and extracts the library into a
    directory of its own: the file can go once it is loaded."""
    from torch.export.pt2_archive._package import AOTICompiledModel

    with tempfile.NamedTemporaryFile(suffix=_SUFFIX) as file:
        copy_member(tar, info, file)
        loader = torch._C._aoti.AOTIModelPackageLoader(file.name, "model", False, 1, -1)
    return AOTICompiledModel(loader)


def copy_member(tar: tarfile.TarFile, info: tarfile.TarInfo, target: BinaryIO) -> None:
    """The bytes of the member `info` into the file `target`. From a tar in a real file (an artifact on disk), the
    kernel copies them (`os.copy_file_range`: a `sam3` package loaded in 1.3 to 1.4 s against 3.1 to 3.9 s copied
    through Python, `bench/aot_load.py`); from memory, or where the kernel refuses, in chunks."""
    try:
        source = tar.fileobj.fileno()  # type: ignore[union-attr]
    except (AttributeError, OSError, io.UnsupportedOperation):
        source = None
    if source is not None and hasattr(os, "copy_file_range"):
        offset, left = info.offset_data, info.size  # offsets into the file the tar was opened on
        try:
            while left:
                copied = os.copy_file_range(source, target.fileno(), left, offset)
                if copied == 0:
                    raise OSError(f"{info.name}: the file ends {left} bytes before the member does")
                offset += copied
                left -= copied
            target.flush()
            return
        except OSError as error:
            logger.info("copying %s through Python: %s", info.name, error)
            target.seek(0)
            target.truncate()
    shutil.copyfileobj(_member_file(tar, info), target, CHUNK_BYTES)
    target.flush()


class PackagedCall:
    """A module's calls, sent to its compiled library when the inputs are those it was compiled for and the
    library has not failed."""

    def __init__(self, runner: Callable[..., Any], module: nn.Module, name: str, signature: list) -> None:
        self.runner = runner
        self.module = module
        self.name = name
        self.signature = signature  # the exported inputs (`_signature`)
        self.warned = False
        self.failed: str | None = None  # why the library was given up, once it raised

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed is None:
            signature = _signature(args, kwargs)
            if signature == self.signature:
                try:
                    return self.runner(*args, **kwargs)
                except Exception as error:
                    if is_out_of_memory(error):
                        raise
                    self.failed = short_reason(error)  # also in the output's metadata (compile.compile_fallback)
                    self._warn(f"{self.name}'s compiled library failed, running it eagerly: {self.failed}")
            else:
                self._warn(f"{self.name} compiled for inputs {self.signature}, called with {signature}: runs eagerly")
        return self.module._call_impl(*args, **kwargs)

    def _warn(self, message: str) -> None:
        if not self.warned:
            self.warned = True
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            logger.warning(message)


def _signature(args: tuple, kwargs: dict) -> list:
    """What a library is compiled for, JSON-ready: per input leaf [shape, dtype, device type] or its type name."""
    leaves = pytree.tree_leaves((args, kwargs))
    return [[list(x.shape), str(x.dtype), x.device.type] if isinstance(x, Tensor) else type(x).__name__ for x in leaves]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
