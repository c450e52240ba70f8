"""Filesystems for any fsspec URI: object stores, `file://` URIs and plain local paths, and `Location`, the one
way the pipeline and the backfill address a file or directory.

S3 connection options (endpoint, region, anonymous, profile) come from the job's `S3Options`; credentials are
left to botocore's usual chain (environment, instance profile, `~/.aws`).

Object-store listings are never cached. Other processes (Ray tasks, a second backfill, a killed run's successor)
create and delete the files these listings decide on: resume checkpoints, commit markers, leases. fsspec's
per-process listing cache would show them as they were when first listed (a deleted pending checkpoint once made
the first rerun after a kill fail with "The specified key does not exist").
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow.fs as pafs
from fsspec.core import split_protocol

LOCAL_PROTOCOLS = ("file", "local")
S3_PROTOCOLS = ("s3", "s3a")
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "az"})


@dataclass(frozen=True)
class Location:
    """A file or directory: its protocol and the path the filesystem understands (no scheme).

    `storage_options` are the job's S3 options (or, with `raw_options`, fsspec options for any protocol); they
    take no part in equality, so two spellings of one place compare equal.
    """

    protocol: str
    path: str
    storage_options: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    raw_options: bool = field(default=False, compare=False, repr=False)

    @classmethod
    def parse(cls, uri: str, storage_options: dict[str, Any] | None = None) -> Location:
        if not uri:
            raise ValueError("empty URI")
        return parse_uri(uri, storage_options)

    @property
    def is_local(self) -> bool:
        return self.protocol in LOCAL_PROTOCOLS

    @property
    def is_object_store(self) -> bool:
        return self.protocol in OBJECT_STORE_PROTOCOLS

    @property
    def uri(self) -> str:
        """The URI users see: local files as plain absolute paths, everything else with its scheme."""
        return to_uri(self.protocol, self.path)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return fsspec_filesystem(self.protocol, self.storage_options, raw_options=self.raw_options)

    def join(self, *parts: str) -> Location:
        suffix = "/".join(part.strip("/") for part in parts if part)
        path = f"{self.path.rstrip('/')}/{suffix}" if suffix else self.path
        return Location(self.protocol, path, self.storage_options, self.raw_options)

    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def files(self) -> list[str]:
        """Every file below this directory, as paths relative to it (sorted); empty when it does not exist."""
        fs = self.fs
        if not fs.exists(self.path):
            return []
        found = fs.find(self.path, withdirs=False)
        prefix = self.path.rstrip("/") + "/"
        return sorted(name[len(prefix) :] for name in found if name.startswith(prefix))

    def read_bytes(self) -> bytes:
        # One GET of whatever version is current. A file object would pin the ETag it saw first and fail with
        # FileExpired when a lease holder rewrites the record mid-read (seen in CI).
        return self.fs.cat_file(self.path)

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_text(self, text: str) -> None:
        """Replace the file in one step: readers see the old or the new content, never a prefix."""
        data = text.encode("utf-8")
        fs = self.fs
        if not self.is_local:
            # A single PUT is atomic on object stores.
            fs.pipe_file(self.path, data)
            return
        fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        temporary = f"{self.path}.tmp-{_unique_suffix()}"
        with fs.open(temporary, "wb") as f:
            f.write(data)
        fs.mv(temporary, self.path)

    def create_exclusive(self, text: str) -> bool:
        """Create the file only if nothing is there yet; False when it already exists.

        Object stores: a PUT with `If-None-Match: *` (fsspec mode "xb"). Local files: a hard link. The content must
        not be empty: s3fs writes an empty file with a plain touch, which is not conditional.
        """
        if not text:
            raise ValueError("exclusive create needs non-empty content")
        if self.is_local:
            os.makedirs(posixpath.dirname(self.path), exist_ok=True)
            return self._create_local_exclusive(text)
        try:
            with self.fs.open(self.path, "xb") as f:
                f.write(text.encode("utf-8"))
        except FileExistsError:
            return False
        return True

    def _create_local_exclusive(self, text: str) -> bool:
        # Write a private file, then hard-link it into place: link fails if the name exists, and a reader never
        # sees the file before its content is complete (plain O_EXCL would show an empty file for a moment).
        temporary = f"{self.path}.tmp-{_unique_suffix()}"
        with open(temporary, "wb") as f:
            f.write(text.encode("utf-8"))
        try:
            os.link(temporary, self.path)
        except FileExistsError:
            return False
        finally:
            os.unlink(temporary)
        return True

    def remove(self) -> None:
        """Delete a file or a whole directory tree; nothing to do when it is absent."""
        fs = self.fs
        if fs.exists(self.path):
            fs.rm(self.path, recursive=True)


def parse_uri(uri: str, storage_options: dict[str, Any] | None = None, *, raw_options: bool = False) -> Location:
    protocol, path = split_protocol(uri)
    if protocol is None or protocol in LOCAL_PROTOCOLS:
        return Location("file", os.path.abspath(os.path.expanduser(path)), storage_options, raw_options)
    return Location(protocol, path.rstrip("/") if len(path) > 1 else path, storage_options, raw_options)


def to_uri(protocol: str, path: str) -> str:
    """The URI users see: local files as plain absolute paths, everything else with its scheme."""
    if protocol in LOCAL_PROTOCOLS:
        return path
    return f"{protocol}://{path}"


def options_for(protocol: str, storage_options: dict[str, Any] | None, *, raw_options: bool = False) -> dict[str, Any]:
    """S3 options only make sense for S3; other protocols get none (their credentials come from the env).

    raw_options: the options are fsspec's own for this protocol (the public reader API takes them as given).
    Object stores always get `use_listings_cache=False` (see the module docstring).
    """
    if protocol in LOCAL_PROTOCOLS:
        return {}
    options = dict(storage_options or {}) if (raw_options or protocol in S3_PROTOCOLS) else {}
    if protocol in OBJECT_STORE_PROTOCOLS:
        options["use_listings_cache"] = False
    return options


def fsspec_filesystem(
    protocol: str, storage_options: dict[str, Any] | None = None, *, raw_options: bool = False
) -> fsspec.AbstractFileSystem:
    if protocol in LOCAL_PROTOCOLS:
        return fsspec.filesystem("file")
    return fsspec.filesystem(protocol, **options_for(protocol, storage_options, raw_options=raw_options))


def arrow_filesystem(
    protocol: str, storage_options: dict[str, Any] | None = None, *, raw_options: bool = False
) -> pafs.FileSystem:
    """A pyarrow filesystem for Ray Data's readers and writers.

    Object stores go through fsspec so one set of options (endpoint, profile, anonymous) serves the Ray readers,
    the image fetches and the checkpoint copy alike, and so Ray Data's checkpoint listings are never cached either.
    """
    if protocol in LOCAL_PROTOCOLS:
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_filesystem(protocol, storage_options, raw_options=raw_options)))


def list_files(location: Location, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Every file under a prefix (or the file itself), as filesystem paths, sorted; hidden and `_` files skipped."""
    fs = fsspec_filesystem(location.protocol, storage_options)
    if fs.isfile(location.path):
        return [location.path]
    if not fs.isdir(location.path):
        raise FileNotFoundError(f"no such file or prefix: {location.uri}")
    found = fs.find(location.path, withdirs=False)
    return sorted(path for path in found if not _is_hidden(path, location.path))


def _is_hidden(path: str, root: str) -> bool:
    relative = posixpath.relpath(path, root) if path.startswith(root) else posixpath.basename(path)
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def _unique_suffix() -> str:
    return uuid.uuid4().hex[:12]
