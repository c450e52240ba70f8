"""The installed package version, recorded in every output file and run summary."""

from __future__ import annotations

import functools
from importlib import metadata

DISTRIBUTION = "sam3-embed"


@functools.cache
def package_version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "0+source"  # running from a source checkout that was never installed
