"""Shared pieces of the benchmarks: a server, a bucket, medians, a results folder."""

from __future__ import annotations

import json
import os
import platform
import statistics
import uuid
from pathlib import Path

import boto3

from modelfs.devserver import SeaweedServer

RESULTS = Path(__file__).parent / "results"


def client(srv: SeaweedServer):
    e = srv.env()
    return boto3.client("s3", endpoint_url=srv.endpoint, region_name="us-east-1",
                        aws_access_key_id=e["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"])


def new_bucket(c, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    c.create_bucket(Bucket=name)
    return name


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    p = RESULTS / f"{name}.json"
    p.write_text(json.dumps(data, indent=2))
    return p
