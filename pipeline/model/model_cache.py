"""The model checkpoint, copied once per node into a local cache and hashed once.

Every model actor on a node calls `local_checkpoint`; a file lock makes the first one copy while the others wait,
and the copy lands under its final name only when complete, so a crashed copy is never mistaken for a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from pipeline.storage import fsspec_filesystem, parse_uri

CACHE_ENV = "SAM3_EMBED_CACHE"
CHUNK_BYTES = 8 * 1024 * 1024
# Locations sam3core resolves itself (it knows the hub layout); the pipeline passes them through.
PASS_THROUGH_PREFIXES = ("hf://",)


@dataclass(frozen=True)
class ResolvedCheckpoint:
    path: str | None  # what build_sam3_vl_backbone receives: a local path, a hub spec, or None (random weights)
    sha256: str | None  # of the checkpoint file; None for random weights and hub specs


def cache_root() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "sam3-embed")
    return Path(root) / "checkpoints"


def local_checkpoint(checkpoint: str | None, storage_options: dict[str, Any] | None = None) -> ResolvedCheckpoint:
    if checkpoint is None:
        return ResolvedCheckpoint(None, None)
    if checkpoint.startswith(PASS_THROUGH_PREFIXES):
        return ResolvedCheckpoint(checkpoint, None)
    location = parse_uri(checkpoint)
    fs = fsspec_filesystem(location.protocol, storage_options)
    info = fs.info(location.path)
    if info.get("type") == "directory":
        raise IsADirectoryError(f"model.checkpoint must name a file, not a directory: {checkpoint}")
    # The cache entry is keyed by what identifies this exact object: its URI, size and version tag.
    version = {k: str(info.get(k)) for k in ("size", "ETag", "etag", "mtime", "LastModified") if info.get(k)}
    key = hashlib.sha256(json.dumps([location.uri, version], sort_keys=True).encode()).hexdigest()[:24]
    entry = cache_root() / key
    entry.mkdir(parents=True, exist_ok=True)
    target = entry / posixpath.basename(location.path)
    digest_file = entry / "sha256"
    with FileLock(str(entry / ".lock")):
        usable = location.path if location.is_local else str(target)
        if digest_file.exists() and Path(usable).exists():
            return ResolvedCheckpoint(usable, digest_file.read_text().strip())
        if location.is_local:
            # A local file is used in place; only its digest is cached.
            digest = _sha256_of_file(location.path)
            digest_file.write_text(digest)
            return ResolvedCheckpoint(location.path, digest)
        digest = _copy_with_digest(fs, location.path, target)
        digest_file.write_text(digest)
    return ResolvedCheckpoint(str(target), digest)


def _copy_with_digest(fs: Any, source: str, target: Path) -> str:
    digest = hashlib.sha256()
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=".partial-")
    try:
        with os.fdopen(handle, "wb") as out, fs.open(source, "rb") as src:
            while chunk := src.read(CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def _sha256_of_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
