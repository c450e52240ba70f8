"""A storage root for the backfill protocol tests: one local directory or one fresh moto bucket."""

from __future__ import annotations

import pytest

from jobs.storage import Location


@pytest.fixture(params=["local", "s3"])
def storage_root(request: pytest.FixtureRequest, tmp_path) -> Location:
    if request.param == "local":
        return Location.parse(str(tmp_path / "out"))
    endpoint = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return Location.parse(f"s3://{bucket}/out", {"client_kwargs": {"endpoint_url": endpoint}})
