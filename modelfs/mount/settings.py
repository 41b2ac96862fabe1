"""A mount's settings (:func:`modelfs.config.resolve`'s dict) → what each of its processes needs.

One place for the daemon's ``MountConfig``, the fetch workers started before it, and
the helper that resolves its source beside it (:mod:`.resolving`). Light on purpose
(no FUSE, trio or boto3): the waiting ``modelfs mount`` imports it before it forks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..cache import default_cache_dir
from ..config import StoreConfig, Timeouts
from ..errors import UsageError
from ..transfer.spawn import LaneConfig

if TYPE_CHECKING:  # imported by SourceSpec.of, in the processes that resolve (~17 ms)
    from ..format.encryption import RegistryKey
    from ..format.trust import TrustedKeys


def cache_dir_of(settings: dict[str, Any]) -> Path:
    """The mount's cache directory: the setting, else the default one, made absolute."""
    return (settings["cache_dir"] or default_cache_dir()).absolute()


def lanes_of(settings: dict[str, Any]) -> LaneConfig:
    """The mount's lanes: the daemon's, and the workers' started before it (which the lanes
    adopt only if they match)."""
    return LaneConfig(workers=settings["fetch_workers"], concurrency=settings["concurrency"],
                      fetch_timeout=settings["fetch_timeout"], timeouts=Timeouts.of(settings),
                      sealed=settings["encrypt_cache"], tiers=settings["cache_tier"] or ())


@dataclass(frozen=True)
class SourceSpec:
    """What a mount shows, and all that resolving it takes: the daemon's and its helper's.

    Invariant: ``sealed`` only with ``key`` (an encrypted cache needs the registry's key)."""
    source: str  # s3://bucket/prefix (registry), s3://…/name@sel (model), a manifest file, a checkout
    store: StoreConfig
    registry_url: str | None = None  # chunks of a manifest file or checkout (default: its origin)
    key: RegistryKey | None = None  # an encrypted registry's key (never shown)
    trust: TrustedKeys | None = None  # serve only versions (and tags) these keys signed
    sealed: bool = False  # keep chunks and records encrypted in the cache (--encrypt-cache)
    ttl: float = 30.0  # the metadata TTL: a tag resolved this recently is not asked again

    @classmethod
    def of(cls, s: dict[str, Any]) -> SourceSpec:
        """From the settings; a key or trusted-key file that cannot be read: UsageError."""
        from ..format.encryption import RegistryKey
        from ..format.trust import TrustedKeys

        key_file = s["encryption_key_file"]
        if s["encrypt_cache"] and key_file is None:
            raise UsageError("encrypt_cache needs the registry's key: pass --encryption-key FILE too")
        store = StoreConfig(endpoint_url=s["endpoint_url"], region=s["region"], profile=s["profile"],
                            concurrency=s["concurrency"], timeouts=Timeouts.of(s))
        return cls(source=s["source"], store=store, registry_url=s["registry"],
                   key=RegistryKey.load(key_file) if key_file is not None else None,
                   trust=TrustedKeys(s["trusted_keys"]) if s["trusted_keys"] else None,
                   sealed=s["encrypt_cache"], ttl=s["metadata_ttl"])
