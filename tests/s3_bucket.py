"""A moto S3 bucket as the tests use it: objects in and out through boto3, listings never cached."""

from __future__ import annotations

import json
from typing import Any


class S3Bucket:
    """A bucket on the moto server, read and written through boto3 so listings are never cached."""

    def __init__(self, endpoint: str, name: str) -> None:
        import boto3

        self.endpoint = endpoint
        self.name = name
        self.client = boto3.client("s3", endpoint_url=endpoint)

    def put(self, key: str, body: bytes) -> str:
        self.client.put_object(Bucket=self.name, Key=key, Body=body)
        return self.uri(key)

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()

    def read_json(self, key: str) -> Any:
        return json.loads(self.get(key))

    def uri(self, key: str) -> str:
        return f"s3://{self.name}/{key}"

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"client_kwargs": {"endpoint_url": self.endpoint}}
