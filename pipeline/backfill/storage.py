"""One place that turns a URI (local path, file://, s3://) into an fsspec filesystem and keeps both forms.

The backfill hands URIs to the pipeline and works on the same objects itself through fsspec, so a location
carries the user's URI spelling (for the pipeline and for messages) next to the filesystem path (for fsspec).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.core import url_to_fs

_OBJECT_STORE_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "abfs", "az"}


def protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


def is_object_store(uri: str) -> bool:
    return protocol_of(uri) in _OBJECT_STORE_PROTOCOLS


def filesystem_options(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Connection options apply to object stores only; the local filesystem rejects S3 keywords."""
    if not is_object_store(uri):
        return {}
    options = dict(storage_options or {})
    # Listings feed lock and commit decisions: a cached listing could hide another process's lease or marker.
    options["use_listings_cache"] = False
    return options


@dataclass(frozen=True)
class Location:
    """A directory or file addressed both as a URI (`uri`) and as a path on `fs`."""

    uri: str
    fs: fsspec.AbstractFileSystem
    path: str

    @classmethod
    def parse(cls, uri: str, storage_options: dict[str, Any] | None = None) -> Location:
        if not uri:
            raise ValueError("empty URI")
        fs, path = url_to_fs(uri, **filesystem_options(uri, storage_options))
        return cls(uri=uri.rstrip("/"), fs=fs, path=path.rstrip("/"))

    def child(self, *parts: str) -> Location:
        suffix = "/".join(part.strip("/") for part in parts if part)
        return Location(uri=f"{self.uri}/{suffix}", fs=self.fs, path=f"{self.path}/{suffix}")

    def exists(self) -> bool:
        self.fs.invalidate_cache(self.path)
        return bool(self.fs.exists(self.path))

    def files(self) -> list[str]:
        """Every file below this directory, as paths relative to it (sorted); empty when it does not exist."""
        self.fs.invalidate_cache(self.path)
        if not self.fs.exists(self.path):
            return []
        found = self.fs.find(self.path, withdirs=False)
        prefix = self.path + "/"
        return sorted(name[len(prefix) :] for name in found if name.startswith(prefix))

    def read_text(self) -> str:
        # One GET of whatever version is current. A file object would pin the ETag it saw first and fail with
        # FileExpired when a lease holder rewrites the record mid-read (seen in CI).
        return self.fs.cat_file(self.path).decode("utf-8")

    def write_text(self, text: str) -> None:
        """Replace the file in one step: readers see the old or the new content, never a prefix."""
        data = text.encode("utf-8")
        if is_object_store(self.uri):
            # A single PUT is atomic on object stores.
            self.fs.pipe_file(self.path, data)
            return
        parent = self.path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        temporary = f"{self.path}.tmp-{_unique_suffix()}"
        with self.fs.open(temporary, "wb") as f:
            f.write(data)
        self.fs.mv(temporary, self.path)

    def create_exclusive(self, text: str) -> bool:
        """Create the file only if nothing is there yet; False when it already exists.

        Object stores: a PUT with `If-None-Match: *` (fsspec mode "xb"). Local files: O_EXCL. The content must not be
        empty: s3fs writes an empty file with a plain touch, which is not conditional.
        """
        if not text:
            raise ValueError("exclusive create needs non-empty content")
        parent = self.path.rsplit("/", 1)[0]
        if not is_object_store(self.uri):
            self.fs.makedirs(parent, exist_ok=True)
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
        self.fs.invalidate_cache(self.path)
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)


def _unique_suffix() -> str:
    return uuid.uuid4().hex[:12]
