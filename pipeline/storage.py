"""Filesystems for any fsspec URI: object stores, `file://` URIs and plain local paths.

S3 connection options (endpoint, region, anonymous, profile) come from the job's `S3Options`; credentials are
left to botocore's usual chain (environment, instance profile, `~/.aws`).
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow.fs as pafs
from fsspec.core import split_protocol

LOCAL_PROTOCOLS = ("file", "local")
S3_PROTOCOLS = ("s3", "s3a")


@dataclass(frozen=True)
class Location:
    """A URI split into its protocol and the path the filesystem understands (no scheme)."""

    protocol: str
    path: str

    @property
    def is_local(self) -> bool:
        return self.protocol in LOCAL_PROTOCOLS

    def uri(self) -> str:
        return to_uri(self.protocol, self.path)

    def join(self, *parts: str) -> Location:
        return Location(self.protocol, posixpath.join(self.path, *parts))


def parse_uri(uri: str) -> Location:
    protocol, path = split_protocol(uri)
    if protocol is None or protocol in LOCAL_PROTOCOLS:
        return Location("file", os.path.abspath(os.path.expanduser(path)))
    return Location(protocol, path.rstrip("/") if len(path) > 1 else path)


def to_uri(protocol: str, path: str) -> str:
    """The URI users see: local files as plain absolute paths, everything else with its scheme."""
    if protocol in LOCAL_PROTOCOLS:
        return path
    return f"{protocol}://{path}"


def options_for(protocol: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """S3 options only make sense for S3; other protocols get none (their credentials come from the env)."""
    if protocol in S3_PROTOCOLS:
        return dict(storage_options or {})
    return {}


def fsspec_filesystem(protocol: str, storage_options: dict[str, Any] | None = None) -> fsspec.AbstractFileSystem:
    if protocol in LOCAL_PROTOCOLS:
        return fsspec.filesystem("file")
    return fsspec.filesystem(protocol, **options_for(protocol, storage_options))


def arrow_filesystem(protocol: str, storage_options: dict[str, Any] | None = None) -> pafs.FileSystem:
    """A pyarrow filesystem for Ray Data's readers and writers.

    Object stores go through fsspec so one set of options (endpoint, profile, anonymous) serves the Ray readers,
    the image fetches and the checkpoint copy alike.
    """
    if protocol in LOCAL_PROTOCOLS:
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_filesystem(protocol, storage_options)))


def list_files(location: Location, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Every file under a prefix (or the file itself), as filesystem paths, sorted; hidden and `_` files skipped."""
    fs = fsspec_filesystem(location.protocol, storage_options)
    fs.invalidate_cache(location.path)  # object-store listings are cached per process; this one must be fresh
    if fs.isfile(location.path):
        return [location.path]
    if not fs.isdir(location.path):
        raise FileNotFoundError(f"no such file or prefix: {location.uri()}")
    found = fs.find(location.path, withdirs=False)
    return sorted(path for path in found if not _is_hidden(path, location.path))


def _is_hidden(path: str, root: str) -> bool:
    relative = posixpath.relpath(path, root) if path.startswith(root) else posixpath.basename(path)
    return any(part.startswith((".", "_")) for part in relative.split("/"))
