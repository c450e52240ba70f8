"""Compiled code paid once per cluster: the first model actor compiles and publishes, the others wait and load.

Every actor of a job (on every node) computes the same key (`sam3core.compile_cache.compile_key`) and looks under
the shared root (any fsspec URI; by default `<output>/_compile_cache`) for two objects named by the key's digest:

- `<digest>.artifact`: the sealed compiled code (an AOTInductor package of the vision modules on a CPU, torch's
  caches on CUDA: `sam3core.compile_cache`). Present: verified (key and SHA-256) and loaded; the caches then run the
  warm-up call (which finds every graph compiled), a package needs none (its libraries are ready once loaded). A
  damaged or foreign artifact is never loaded: the actor that finds it compiles and overwrites it.
- `<digest>.claim`: a publisher's claim, created exclusively (`If-None-Match: *` on object stores, a hard link on
  local disks), so exactly one actor compiles; it holds the owner and a heartbeat the owner rewrites while it
  compiles, and is removed once the artifact is written (or the compilation failed).

An actor that finds a live claim waits, polling for the artifact. If the claim's heartbeat stops (the publisher
died: killed, preempted, out of memory) for `stale_s`, a waiter removes it and claims in its place; if nothing
comes within `wait_s` in all, it compiles itself. Heartbeats compare wall clocks across nodes: `stale_s` must
exceed their skew by far (the default is two minutes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from pipeline.storage import Location, parse_uri

logger = logging.getLogger(__name__)

DEFAULT_DIRECTORY = "_compile_cache"  # under the output when no URI is configured
ARTIFACT_SUFFIX = ".artifact"
CLAIM_SUFFIX = ".claim"
# sam3core.compile_cache.CHUNK_BYTES, not imported: that module imports torch, and drivers import this one
CHUNK_BYTES = 16 << 20


class ArtifactRefused(ValueError):
    """Raised by a `load` callback for an artifact that must not be used (wrong key, damaged)."""


@dataclass(frozen=True)
class ShareSettings:
    root: Location
    wait_s: float = 1800.0  # the longest an actor waits for someone else's compilation, in all
    stale_s: float = 120.0  # a claim whose heartbeat is older than this belongs to a dead publisher
    poll_s: float = 2.0
    heartbeat_s: float = 10.0


@dataclass(frozen=True)
class Outcome:
    how: str  # "loaded" | "compiled and published" | "compiled" (nothing published) | "compiled after waiting"
    waited_s: float = 0.0
    note: str = ""  # why an artifact found was rebuilt, or why a claim was taken over


def share_root(
    cache_uri: str | bool | None, output_uri: str, storage_options: dict[str, Any] | None
) -> Location | None:
    """Where artifacts go: `cache_uri`, or `<output>/_compile_cache` when None; "off" shares nothing."""
    if cache_uri in ("off", False):  # YAML reads a bare `off` as False
        return None
    if cache_uri:
        return parse_uri(cache_uri, storage_options)
    return parse_uri(output_uri, storage_options).join(DEFAULT_DIRECTORY)


def obtain(
    settings: ShareSettings,
    digest: str,
    *,
    load: Callable[[BinaryIO], None],
    build: Callable[[], bytes | None],
) -> Outcome:
    """Loads the artifact for `digest`, or compiles (`build`, which returns the artifact to publish or None).

    `load` receives the artifact as a local, seekable file at its start, and raises ArtifactRefused when it must
    not be used; it is called before anything of the artifact runs.
    """
    artifact = settings.root.join(digest + ARTIFACT_SUFFIX)
    claim = settings.root.join(digest + CLAIM_SUFFIX)
    started = time.monotonic()
    note = ""
    refused: tuple | None = None  # the bad artifact already seen: not loaded twice while someone rebuilds it
    while True:
        with _opened(artifact, skip=refused) as found:
            if found is not None:
                file, identity = found
                try:
                    load(file)
                    return Outcome("loaded", time.monotonic() - started, note)
                except ArtifactRefused as error:
                    note = f"rebuilt: {error}"
                    logger.warning("compile artifact %s refused (%s); compiling again", artifact.uri, error)
                    refused = identity
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        if claim.create_exclusive(_claim_record(owner)):
            return _build_and_publish(settings, artifact, claim, owner, build, started, note)
        record = _read_claim(claim)
        if record is not None and time.time() - record.get("heartbeat", 0.0) > settings.stale_s:
            note = f"took over from {record.get('owner')}, silent for {time.time() - record['heartbeat']:.0f}s"
            logger.warning("compile claim %s is stale (%s); taking it over", claim.uri, note)
            if _read_claim(claim) == record:  # not renewed meanwhile, nor taken over by another waiter
                claim.remove()
            continue
        if time.monotonic() - started > settings.wait_s:
            logger.warning("no compile artifact at %s after %.0fs; compiling here", artifact.uri, settings.wait_s)
            build()
            return Outcome("compiled after waiting", time.monotonic() - started, note)
        time.sleep(settings.poll_s)


@contextlib.contextmanager
def _opened(location: Location, skip: tuple | None) -> Iterator[tuple[BinaryIO, tuple] | None]:
    """The artifact at `location` as a local file, with what tells it from a later replacement; None if absent or
    if that identity is `skip` (an artifact already refused, not fetched again while a waiter polls).

    A local artifact is opened once and read through that handle: a publisher's replacement (a rename) meanwhile
    does not change what is checked and loaded. A remote one is copied to a temporary file first, in chunks."""
    if location.is_local:
        with contextlib.ExitStack() as stack:
            try:
                file = stack.enter_context(open(location.path, "rb"))
            except FileNotFoundError:
                yield None
                return
            stat = os.fstat(file.fileno())
            identity = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
            yield None if identity == skip else (file, identity)
        return
    try:
        info = location.fs.info(location.path)
    except FileNotFoundError:
        yield None
        return
    identity = tuple(str(info.get(field)) for field in ("size", "ETag", "etag", "LastModified", "updated"))
    if identity == skip:
        yield None
        return
    with tempfile.TemporaryFile() as file:
        try:
            with location.fs.open(location.path, "rb") as remote:
                shutil.copyfileobj(remote, file, CHUNK_BYTES)
        except FileNotFoundError:
            yield None
            return
        file.seek(0)
        yield file, identity


def _build_and_publish(
    settings: ShareSettings,
    artifact: Location,
    claim: Location,
    owner: str,
    build: Callable[[], bytes | None],
    started: float,
    note: str,
) -> Outcome:
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(settings.heartbeat_s):
            try:
                claim.write_text(_claim_record(owner))
            except Exception as error:  # a missed beat only risks a waiter compiling too
                logger.debug("heartbeat on %s failed: %s", claim.uri, error)

    heart = threading.Thread(target=beat, name="compile-claim-heartbeat", daemon=True)
    heart.start()
    try:
        blob = build()
        if blob is not None:
            _write(artifact, blob)
            logger.info("published compile artifact %s (%d bytes)", artifact.uri, len(blob))
    finally:
        stop.set()
        heart.join()
        try:
            claim.remove()
        except Exception as error:
            logger.warning("could not remove compile claim %s: %s", claim.uri, error)
    waited = time.monotonic() - started
    return Outcome("compiled and published" if blob is not None else "compiled", waited, note)


def _claim_record(owner: str) -> str:
    return json.dumps({"owner": owner, "heartbeat": time.time()})


def _read_claim(claim: Location) -> dict[str, Any] | None:
    try:
        return json.loads(claim.read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # half-written by a crashed writer: as silent as a dead publisher
        return {"owner": "unreadable", "heartbeat": 0.0}


def _write(location: Location, data: bytes) -> None:
    """Replace in one step: readers see the old artifact or the new one, never a prefix."""
    fs = location.fs
    if not location.is_local:
        fs.pipe_file(location.path, data)  # one PUT is atomic on object stores
        return
    fs.makedirs(posixpath.dirname(location.path), exist_ok=True)
    temporary = f"{location.path}.tmp-{uuid.uuid4().hex[:12]}"
    with open(temporary, "wb") as f:
        f.write(data)
    os.replace(temporary, location.path)


# The model actor's side -------------------------------------------------------------------------------------------


def compile_cache_uri(cache: str | bool | None, output_uri: str) -> str | None:
    """The job's artifact root as a URI for the actors (None: sharing is off)."""
    root = share_root(cache, output_uri, None)
    return None if root is None else root.uri


def checkpoint_identity(sha256: str | None, checkpoint: str | None, seed: int) -> str:
    """What the key holds for the weights: the file's hash, a hub spec as written, or the random seed."""
    if sha256:
        return sha256
    return f"hub:{checkpoint}" if checkpoint else f"random:{seed}"


def expects_package(cache_uri: str | None, device: Any, dtype: Any, compile_visual: bool | str) -> bool:
    """Whether a model actor will run its trunk from a shared AOTInductor package, so that it can build the model
    without the trunk's own weights (`sam3core.deferred`): sharing on, compiling on, and a package the kind of
    artifact made for this device. If no package comes after all, `warm_up_shared` makes the weights first."""
    from sam3core.compile import compile_plan
    from sam3core.compile_cache import artifact_kind

    if cache_uri is None or not compile_plan(compile_visual, device, dtype).enabled:
        return False
    return artifact_kind(device.type) == "aoti"


def warm_up_shared(
    backbone: Any,
    *,
    batch_size: int,
    vision_features_only: bool,
    checkpoint_id: str,
    cache_uri: str | None,
    storage_options: dict[str, Any] | None,
    wait_s: float,
) -> tuple[float, Outcome | None]:
    """`backbone.warm_up` with the compiled code shared through `cache_uri`: returns the seconds from the start
    to a warmed-up model (waiting included) and how the compiled code was obtained (None: nothing compiled or
    sharing off)."""
    from sam3core.aot_package import PackageError, build_package, install_package
    from sam3core.compile import apply_compile, is_compiled
    from sam3core.compile_cache import (
        ArtifactError,
        compile_key,
        load_artifacts,
        save_artifacts,
        seal,
        start_recording,
        unseal,
    )

    started = time.monotonic()
    if cache_uri is None or not is_compiled(backbone.vision_backbone):
        backbone.materialize_weights("trunk")  # a trunk built for a package that will not come
        return backbone.warm_up(batch_size, vision_features_only=vision_features_only), None
    key = compile_key(
        backbone, batch_size=batch_size, vision_features_only=vision_features_only, checkpoint_sha256=checkpoint_id
    )
    vision = backbone.vision_backbone

    def warm() -> None:
        # a trunk whose weights were left for a package (model.deferred_weights) gets them before it is traced
        backbone.materialize_weights("trunk")
        backbone.warm_up(batch_size, vision_features_only=vision_features_only)

    def load(file: BinaryIO) -> None:
        try:
            unseal(file, key)  # the key and the hash first: nothing unverified reaches torch
            if key.artifact == "aoti":
                install_package(vision, file)
            else:
                load_artifacts(file.read())
        except (ArtifactError, PackageError) as error:
            raise ArtifactRefused(str(error)) from error
        if key.artifact != "aoti":
            warm()  # torch's caches still trace and lower: that happens here, not in the first batch
        # an installed package has nothing left to compile: a warm-up call would only cost one more batch (9 to
        # 16 s for "sam3" at 1008 px on 2 cores); a library that raises falls back to eager by itself

    def build() -> bytes | None:
        backbone.materialize_weights("trunk")  # exporting runs the trunk eagerly; its weights go into the package
        if key.artifact == "aoti":
            try:
                payload = build_package(
                    vision, backbone.zero_batch_call(batch_size, vision_features_only), backbone.compile_plan
                )
                install_package(vision, payload)  # this actor runs what the others will load
            except Exception as error:  # export or AOTInductor refused the model: compile it just in time
                logger.warning("AOTInductor package failed, compiling in place: %s: %s", type(error).__name__, error)
                apply_compile(vision, backbone.compile_plan)
                warm()
                return None
            warm()
            return seal(payload, key) if is_compiled(vision) else None
        start_recording()
        warm()
        if not is_compiled(vision):  # compilation failed, eager now: nothing to share
            return None
        payload = save_artifacts()
        return None if payload is None else seal(payload, key)

    settings = ShareSettings(root=parse_uri(cache_uri, storage_options), wait_s=wait_s)
    outcome = obtain(settings, key.digest(), load=load, build=build)
    return time.monotonic() - started, outcome
