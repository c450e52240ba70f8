"""Small pieces both entry points share: logging set-up and writing a JSON report next to the printed one."""

from __future__ import annotations

import logging
import sys

import fsspec

# The project's loggers: their INFO lines (recognised columns, progress, the summary) are what a run says.
PROJECT_LOGGERS = ("pipeline", "jobs", "sam3core")


def configure_logging(verbose: bool) -> None:
    """The project's lines at INFO; other libraries only from WARNING (everything at DEBUG with `-v`).

    Libraries log INFO lines of their own that tell the user nothing (aiobotocore's "Found credentials in
    environment variables." on every S3 access); at INFO on the root logger they came before every refusal, which
    must be one line.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


def write_report(path_or_uri: str, text: str) -> None:
    """Write a report to a local path or an fsspec URI (S3 credentials from the environment, as for the job)."""
    with fsspec.open(path_or_uri, "w", encoding="utf-8", auto_mkdir=True) as f:
        f.write(text + "\n")
