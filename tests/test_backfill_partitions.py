"""Partition specs, per-partition input URIs and discovery of partitions in local and S3 inputs."""

from __future__ import annotations

import datetime as dt

import pytest

from pipeline.backfill.partitions import (
    Partition,
    discover_partition_values,
    input_uri_for,
    parse_partition_values,
    partition_input,
)
from pipeline.storage import Location

TODAY = dt.date(2025, 3, 2)


def test_date_range_is_inclusive_and_crosses_month_ends() -> None:
    assert parse_partition_values(["2025-02-27..2025-03-01"], TODAY) == ["2025-02-27", "2025-02-28", "2025-03-01"]


def test_lists_ranges_and_repeats_combine_in_order() -> None:
    values = parse_partition_values(["b,a", "2025-01-01..2025-01-02", "a"], TODAY)
    assert values == ["b", "a", "2025-01-01", "2025-01-02"]


def test_relative_days_are_resolved_against_today() -> None:
    assert parse_partition_values(["today-2..today-1"], TODAY) == ["2025-02-28", "2025-03-01"]
    assert parse_partition_values(["today"], TODAY) == ["2025-03-02"]


def test_integer_ranges_keep_zero_padding() -> None:
    assert parse_partition_values(["08..11"], TODAY) == ["08", "09", "10", "11"]
    assert parse_partition_values(["1..3"], TODAY) == ["1", "2", "3"]


@pytest.mark.parametrize(
    "spec",
    ["2025-01-05..2025-01-01", "a..b", "2025-01-01..7", "x/y", "../etc", "", "a=b", "2000-01-01..2999-01-01"],
)
def test_bad_specs_are_rejected(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_partition_values([spec], TODAY)


def test_partition_column_must_be_an_identifier() -> None:
    with pytest.raises(ValueError):
        Partition("da/te", "x")
    assert Partition("date", "2025-01-01").dirname == "date=2025-01-01"


def test_input_uri_uses_the_placeholder_or_a_hive_directory() -> None:
    day = Partition("date", "2025-01-01")
    assert input_uri_for("s3://b/in", day) == "s3://b/in/date=2025-01-01/"
    assert input_uri_for("s3://b/manifests/{date}/list.jsonl", day) == "s3://b/manifests/2025-01-01/list.jsonl"
    assert partition_input(["s3://a/{date}.tar", "s3://b/"], day) == [
        "s3://a/2025-01-01.tar",
        "s3://b/date=2025-01-01/",
    ]


def test_discovery_finds_hive_directories_locally(tmp_path) -> None:
    for value in ("2025-01-02", "2025-01-01"):
        (tmp_path / "in" / f"date={value}").mkdir(parents=True)
        (tmp_path / "in" / f"date={value}" / "manifest.jsonl").write_text("{}\n")
    (tmp_path / "in" / "other").mkdir()
    (tmp_path / "in" / "_staging").mkdir()
    assert discover_partition_values(str(tmp_path / "in"), "date") == ["2025-01-01", "2025-01-02"]


def test_discovery_follows_a_placeholder_locally(tmp_path) -> None:
    for value in ("a", "b"):
        (tmp_path / "m" / value).mkdir(parents=True)
        (tmp_path / "m" / value / "list.jsonl").write_text("{}\n")
    (tmp_path / "m" / "c").mkdir()  # no list.jsonl: not a partition
    assert discover_partition_values(str(tmp_path / "m" / "{shard}" / "list.jsonl"), "shard") == ["a", "b"]


@pytest.mark.timeout(60)
def test_discovery_on_s3(s3_server: str, s3_bucket: str) -> None:
    options = {"client_kwargs": {"endpoint_url": s3_server}}
    root = Location.parse(f"s3://{s3_bucket}/in", options)
    for value in ("2025-01-01", "2025-01-03"):
        root.join(f"date={value}", "manifest.jsonl").write_text("{}\n")
    assert discover_partition_values(root.uri, "date", options) == ["2025-01-01", "2025-01-03"]
    assert discover_partition_values(root.uri + "/date={date}/manifest.jsonl", "date", options) == [
        "2025-01-01",
        "2025-01-03",
    ]
