"""Load a job file (local path or any fsspec URI) and apply `--set section.key=value` overrides."""

from __future__ import annotations

import argparse
from typing import Any

import fsspec
import yaml

from pipeline.config import JobConfig


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        required=True,
        metavar="PATH_OR_URI",
        help="job file (YAML): a path relative to the job's working directory, or an s3:// or other fsspec URI",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set output.uri=s3://bucket/out --set compute.num_actors=4 "
        "(VALUE is parsed as YAML; repeatable)",
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    key, separator, raw_value = text.partition("=")
    if not separator or not key.strip():
        raise ValueError(f"override {text!r} is not KEY=VALUE")
    path = [part for part in key.strip().split(".") if part]
    return path, yaml.safe_load(raw_value) if raw_value.strip() else None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for override in overrides:
        path, value = parse_override(override)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {override!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def read_config_data(path_or_uri: str) -> dict[str, Any]:
    with fsspec.open(path_or_uri, "r", encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path_or_uri}: a job file is a YAML mapping, got {type(data).__name__}")
    return data


def load_job_config(path_or_uri: str, overrides: list[str] | None = None) -> JobConfig:
    """The job config with overrides applied; unknown keys are rejected by `JobConfig.from_dict`."""
    data = apply_overrides(read_config_data(path_or_uri), overrides or [])
    return JobConfig.from_dict(data)
