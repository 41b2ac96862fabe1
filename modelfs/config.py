"""Settings: what the flags hold, what a TOML file may hold, and which one wins.

Precedence, highest first: command-line flags and the environment variables
that stand for flags (``AWS_ENDPOINT_URL``, ``MODELFS_LOG_LEVEL``), then the
config file (``/etc/modelfs/<name>.toml``), then the defaults in ``MOUNT_KEYS``.
Every value, whichever of those it came from, goes through the same parser, so a
bad value is the same clear error with its origin named.

Credentials never live here: boto3's standard chain (environment, profile,
instance role) finds them, and a config file that tries to hold one is refused.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import UsageError
from .units import parse_size


TRANSFER_CONCURRENCY = 16  # parallel store requests of the bulk commands (pull, publish, prefetch, adopt)


def mount_concurrency() -> int:
    """A mount's parallel store requests by default: four per core, from 8 to 16. A mount's
    fetches share the cores with the FUSE loop and the loader reading through it; on two
    cores 8 loaded a model as fast as 16 over 20 ms / 2.5 Gbit/s, 1 % sooner over 20 ms /
    1 Gbit/s and 10 % sooner, with ~1 CPU-s less per 2 GiB, from a near store
    (docs/benchmarks.md). A bulk command has the cores to itself: ``pull`` was 3–5 % faster
    with 16 there, which it keeps (``TRANSFER_CONCURRENCY``)."""
    return max(8, min(16, 4 * (os.cpu_count() or 2)))


def retry_backoff(attempts: int) -> float:
    """The most botocore's "standard" retry mode sleeps between ``attempts`` tries
    (random × 2^(n-1) s before try n+1, each at most 20 s); the workers use the same."""
    return sum(min(2.0 ** (n - 1), 20.0) for n in range(1, attempts))


@dataclass(frozen=True)
class Timeouts:
    """How long one store request may take against a store that is down or hung: the one
    set of values every process that talks to the store uses (boto3 here, the fetch
    workers' http.client). The defaults bound a command's wait to about 33 s (issue 13)."""
    connect: float = 5.0  # seconds to connect, per attempt
    read: float = 10.0  # seconds without a byte from the store, per attempt
    attempts: int = 3  # tries per request, the first included (throttling, 5xx, resets, timeouts)

    @classmethod
    def of(cls, settings: dict[str, Any]) -> Timeouts:
        """The timeouts in :func:`resolve`'s settings (flags, config file, defaults)."""
        return cls(settings["connect_timeout"], settings["read_timeout"], settings["attempts"])

    def request_bound(self) -> float:
        """The longest one request can take before it fails, whatever the store does."""
        return self.attempts * (self.connect + self.read) + retry_backoff(self.attempts)


@dataclass(frozen=True)
class StoreConfig:
    endpoint_url: str | None = None  # None: AWS_ENDPOINT_URL or AWS itself
    region: str | None = None  # None: AWS_REGION / AWS_DEFAULT_REGION / profile
    profile: str | None = None  # None: AWS_PROFILE or the default profile
    concurrency: int = TRANSFER_CONCURRENCY  # parallel transfers; the connection pool is sized to it
    timeouts: Timeouts = Timeouts()


LOG_LEVELS = ("debug", "info", "warning", "error")


# -- value parsers: raw (TOML value or flag string) → typed value, or ValueError ----------

def _str(v: Any) -> str:
    if not isinstance(v, str) or not v or "\0" in v:
        raise ValueError("expected a non-empty string")
    return v


def _path(v: Any) -> Path:
    return Path(_str(str(v) if isinstance(v, Path) else v)).expanduser()


def _paths(v: Any) -> tuple[Path, ...]:
    """One path or a list of them (TOML), or the tuple a repeated flag gives."""
    items = [v] if isinstance(v, (str, Path)) else v
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError("expected a path or a list of paths")
    return tuple(_path(p) for p in items)


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    raise ValueError("expected true or false")


def _int_in(lo: int, hi: int) -> Callable[[Any], int]:
    def parse(v: Any) -> int:
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"expected a whole number from {lo} to {hi}")
        return v
    return parse


def _seconds(v: Any) -> float:
    try:
        f = float(v) if not isinstance(v, bool) else -1.0
    except (TypeError, ValueError):
        f = -1.0
    if not 0 < f <= 86400:
        raise ValueError("expected seconds, more than 0")
    return f


def _level(v: Any) -> str:
    if not isinstance(v, str) or v.lower() not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")
    return v.lower()


def _choice(*options: str) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        if v not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return v
    return parse


def origin_url(url: str, what: str = "it") -> str:
    """``http[s]://HOST[:PORT]`` of ``url`` (a cache tier node, the store a node forwards to:
    no path, no query), or ValueError naming ``what`` it should have been."""
    u = urlsplit(url.strip())
    if u.scheme not in ("http", "https") or not u.hostname or u.path not in ("", "/") or u.query:
        raise ValueError(f"{url!r}: {what} is http[s]://HOST[:PORT]")
    return f"{u.scheme}://{u.netloc}"


def _tier_urls(v: Any) -> tuple[str, ...]:
    """Cache tier nodes: a URL, several separated by commas, a list (TOML), or the tuple a
    repeated flag gives; each http[s]://HOST[:PORT] (no path: a node serves the store's)."""
    given = [v] if isinstance(v, str) else list(v) if isinstance(v, (list, tuple)) else []
    items = [part for s in given for part in (s.split(",") if isinstance(s, str) else [s])]
    if not items:
        raise ValueError("expected http[s]://HOST[:PORT], or several")
    return tuple(dict.fromkeys(origin_url(_str(item), "a cache tier node") for item in items))


def _s3_url(v: Any) -> str:
    s = _str(v)
    if not s.startswith(("http://", "https://")):
        raise ValueError("expected an http:// or https:// URL")
    return s


@dataclass(frozen=True)
class Key:
    name: str
    default: Any  # None: unset (the doc says what that means)
    parse: Callable[[Any], Any]
    doc: str


# The one list of mount settings: flags, config file keys, defaults and docs
# (docs/operations.md and systemd/modelfs.example.toml; a test keeps them in step).
MOUNT_KEYS: tuple[Key, ...] = (
    Key("source", None, _str, "What to mount: s3://BUCKET/PREFIX (a registry), s3://…/NAME@TAG, a manifest file, or a directory of *.modelfs.json pointers (a git checkout). Required."),
    Key("mountpoint", None, _path, "An existing empty directory. Required."),
    Key("registry", None, _str, "Registry holding the chunks when source is a manifest file or a directory of pointers (default: their origin)."),
    Key("cache_dir", None, _path, "Persistent block cache (default: $CACHE_DIRECTORY under systemd, /var/cache/modelfs for root, else ~/.cache/modelfs)."),
    Key("cache_size", "16G", parse_size, "Cap of the block cache on disk."),
    Key("memory_cache", "256M", parse_size, "Ignored: the kernel's page cache is the memory tier now (kept so older config files load)."),
    Key("fetch_workers", 0, _int_in(0, 64), "Fetch worker processes that GET, verify and cache chunks (0: half the cores, 2 to 8)."),
    Key("readahead", "64M", parse_size, "Largest readahead window per sequential reader (against a far store, up to 4 times this: what 2 s of fetches bring)."),
    Key("readahead_trigger", "4M", parse_size, "Bytes a reader reads in order before readahead starts (a lone small read loads only the chunks it touches)."),
    Key("readahead_order", "tensors", _choice("tensors", "file"), "Read ahead in the order loaders read tensors (safetensors: sorted names), or in file order."),
    Key("fetch_timeout", 60.0, _seconds, "Seconds before a chunk fetch becomes an I/O error."),
    Key("metadata_ttl", 30.0, _seconds, "Seconds model/tag/version listings are kept before asking the store again "
        "(also: a mount of NAME@TAG started within this time of this host's last resolution uses it)."),
    Key("kernel_readahead_kb", 1024, _int_in(0, 1 << 20), "Kernel readahead for the mount in KiB (root only; 0 keeps the kernel's)."),
    Key("allow_other", False, _bool, "Let other users (and containers) read the mount."),
    Key("nonempty", False, _bool, "Mount over a directory that is not empty (hiding its entries)."),
    Key("encryption_key_file", None, _path, "Key file of an encrypted registry (made by `modelfs keygen`; also $MODELFS_ENCRYPTION_KEY_FILE). The file is read, never its contents logged or passed on."),
    Key("encrypt_cache", False, _bool, "Keep this mount's chunks encrypted in the block cache too (needs encryption_key_file; its own cache under <cache_dir>/sealed): a warm read then decrypts each chunk it touches (docs/security.md)."),
    Key("cache_tier", None, _tier_urls, "Cache tier nodes (nginx from `modelfs tier-config`) asked for chunks before the store: each chunk has one node, then the next, then the store; nothing from them is trusted (docs/fleet.md). Flag repeatable; in the file a list."),
    Key("trusted_keys", None, _paths, "Public keys (PEM) whose signatures make a version servable: with any, only versions and tags signed by one of them are shown (docs/security.md). Flag repeatable; in the file a list."),
    Key("concurrency", mount_concurrency(), _int_in(1, 256), "Parallel S3 requests of the mount (default: four per core, from 8 to 16; other commands: 16)."),
    Key("connect_timeout", Timeouts.connect, _seconds, "Seconds to wait for a connection to the store, per attempt."),
    Key("read_timeout", Timeouts.read, _seconds, "Seconds to wait for the store's next bytes, per attempt."),
    Key("attempts", Timeouts.attempts, _int_in(1, 20), "Tries per store request, the first included (a hung store fails a request after attempts × timeout + backoff)."),
    Key("endpoint_url", None, _s3_url, "S3 endpoint (default: $AWS_ENDPOINT_URL, else AWS)."),
    Key("region", None, _str, "Region (default: $AWS_REGION, $AWS_DEFAULT_REGION or the profile's)."),
    Key("profile", None, _str, "AWS profile in the standard files (default: $AWS_PROFILE)."),
    Key("log_level", "warning", _level, "debug, info, warning or error (also $MODELFS_LOG_LEVEL)."),
    Key("metrics_port", 0, _int_in(0, 65535), "Serve Prometheus metrics on this TCP port (0: off)."),
    Key("metrics_address", "127.0.0.1", _str, "Address the metrics endpoint listens on (loopback unless you open it)."),
)
KEYS = {k.name: k for k in MOUNT_KEYS}
DEFAULTS = {k.name: k.default for k in MOUNT_KEYS}

_CREDENTIALS = ("key", "secret", "token", "password", "credential")


def load_file(path: Path) -> dict[str, Any]:
    """The raw key → value table of a config file, with every key known and no credentials."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except OSError as e:
        raise UsageError(f"cannot read config file {path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"config file {path} is not valid TOML: {e}") from None
    for name, value in data.items():
        if name in KEYS:
            if isinstance(value, dict):
                raise UsageError(f"config file {path}: {name!r} must be a value, not a table")
            continue
        if any(word in name.lower() for word in _CREDENTIALS):
            raise UsageError(f"config file {path}: {name!r} looks like a credential; credentials "
                             "come from the standard AWS chain (environment, profile, instance role), "
                             "never from the config file")
        close = difflib.get_close_matches(name, KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"config file {path}: unknown key {name!r}{hint}")
    return data


def resolve(file: Path | None, given: dict[str, Any]) -> dict[str, Any]:
    """Defaults ← config file ← given flags, every value parsed; bad values name their origin."""
    raw: dict[str, tuple[Any, str]] = {k: (v, "default") for k, v in DEFAULTS.items()}
    if file is not None:
        raw.update({k: (v, f"config file {file}") for k, v in load_file(file).items()})
    raw.update({k: (v, "the command line") for k, v in given.items()})
    out: dict[str, Any] = {}
    for name, (value, origin) in raw.items():
        if value is None:
            out[name] = None
            continue
        try:
            out[name] = KEYS[name].parse(value)
        except ValueError as e:
            raise UsageError(f"{name} = {value!r} (from {origin}): {e}") from None
    for name in ("source", "mountpoint"):
        if out[name] is None:
            raise UsageError(f"no {name}: give it on the command line or as {name!r} in a config file")
    return out
