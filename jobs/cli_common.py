"""Small pieces both entry points share: logging set-up and writing a JSON report next to the printed one."""

from __future__ import annotations

import logging
import sys

import fsspec


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def write_report(path_or_uri: str, text: str) -> None:
    """Write a report to a local path or an fsspec URI (S3 credentials from the environment, as for the job)."""
    with fsspec.open(path_or_uri, "w", encoding="utf-8", auto_mkdir=True) as f:
        f.write(text + "\n")
