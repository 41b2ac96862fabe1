"""Settings that flow from the CLI (and later a config file) into the store.

Credentials never live here: boto3's standard chain (environment, profile,
instance role) finds them. Endpoint and region follow the standard variables
(``AWS_ENDPOINT_URL``, ``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_PROFILE``),
which a flag may override.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StoreConfig:
    endpoint_url: str | None = None  # None: AWS_ENDPOINT_URL or AWS itself
    region: str | None = None  # None: AWS_REGION / AWS_DEFAULT_REGION / profile
    profile: str | None = None  # None: AWS_PROFILE or the default profile
    concurrency: int = 16  # parallel transfers; the connection pool is sized to it
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_attempts: int = 5  # botocore "standard" retries: throttling, 5xx, resets
