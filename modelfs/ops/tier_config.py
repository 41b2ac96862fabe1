"""``modelfs tier-config``: the nginx configuration of one cache tier node (``docs/fleet.md``).

The tier is stock nginx: this module only writes its configuration. What the
configuration does, and why:

* only chunk objects (``…/chunks/<64 hex>``, GET alone) are served; anything else is
  refused (403), so manifests, tags and leases — mutable, or small and private — always
  come from the store itself;
* a miss forwards the host's presigned GET as it came (same path and query, ``Host`` set
  to the store's: the signature stays valid), so the node holds no credentials; the
  cache is keyed on the object's path alone (no signature in the key), and only 200
  answers are kept (a denial or a 404 is never served to another host);
* ``proxy_cache_lock`` makes concurrent misses of one chunk one store GET, its timeout
  above a chunk's fetch (past it nginx would go to the store uncached);
* ranges (a small cold read's blocks) are served from the cached whole chunk: a miss
  fetches the whole chunk once (nginx drops ``Range`` towards the store when it caches);
* ``X-Modelfs-Refresh: 1`` (a host that found a bad copy) fetches again and replaces it;
* ``X-Cache-Status`` tells the host whether it was a hit.
* ``check_access``: every request's signature is first checked by the store with a
  1-byte ranged GET of the same URL (``auth_request``), so a host reads from the cache
  only what it may read from the bucket, at one small store request per chunk request.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..config import origin_url

CHUNK_PATH = r"^/(.+/)?chunks/[0-9a-f]{64}$"  # registry/layout.py's chunk keys, path style or not


@dataclass(frozen=True)
class TierConfig:
    store: str  # the store's endpoint, http[s]://HOST[:PORT]
    listen: str = "0.0.0.0:8480"
    cache_dir: Path = Path("/var/cache/modelfs-tier")
    max_size: str = "100g"  # nginx size syntax
    user: str | None = None  # the worker processes' user (None: nginx's default)
    check_access: bool = False
    lock_seconds: int = 120  # above a chunk's fetch from the store, however far

    def __post_init__(self) -> None:
        origin_url(self.store, "the store")
        if not self.cache_dir.is_absolute():
            raise ValueError(f"{self.cache_dir}: the cache directory must be an absolute path")
        for bad in (";", "{", "}", "\n", "'", '"', " "):
            if bad in str(self.cache_dir) or bad in self.listen or bad in self.max_size or bad in (self.user or ""):
                raise ValueError(f"{bad!r} has no place in a tier's settings")

    def render(self) -> str:
        u = urlsplit(self.store)
        d = self.cache_dir
        host = u.netloc
        auth = ""
        auth_use = ""
        if self.check_access:
            auth_use = "            auth_request /modelfs-check-access;\n"
            auth = f"""
        # the store checks each request's signature: a 1-byte ranged GET of the same URL
        location = /modelfs-check-access {{
            internal;
            proxy_pass {u.scheme}://modelfs_store$request_uri;
            proxy_set_header Host {host};
            proxy_set_header Range "bytes=0-0";
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
"""
        user = f"user {self.user};\n" if self.user else ""
        ssl = "            proxy_ssl_server_name on;\n" if u.scheme == "https" else ""
        return f"""# modelfs cache tier node for {self.store}, written by `modelfs tier-config`.
# Run: nginx -c THIS_FILE   (in the foreground: systemd, containers). docs/fleet.md
{user}daemon off;
worker_processes auto;
pid {d}/nginx.pid;
error_log stderr warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;

    # chunks are immutable and named by their hash: kept until space is needed
    proxy_cache_path {d}/cache levels=1:2 keys_zone=modelfs_chunks:64m max_size={self.max_size}
                     inactive=365d use_temp_path=off;

    upstream modelfs_store {{
        server {host};
        keepalive 64;
    }}

    server {{
        listen {self.listen};
        location ~ "{CHUNK_PATH}" {{
            limit_except GET {{ deny all; }}
            # GET alone: nginx would turn a HEAD into a GET towards the store, which breaks a
            # presigned HEAD's signature (hosts send only GETs through a tier)
            if ($request_method = HEAD) {{ return 405; }}
{auth_use}            proxy_pass {u.scheme}://modelfs_store;
            proxy_set_header Host {host};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
{ssl}            proxy_cache modelfs_chunks;
            proxy_cache_key $uri;
            proxy_cache_valid 200 365d;
            proxy_cache_lock on;
            proxy_cache_lock_timeout {self.lock_seconds}s;
            proxy_cache_lock_age {self.lock_seconds}s;
            proxy_cache_bypass $http_x_modelfs_refresh;
            proxy_force_ranges on;
            proxy_ignore_headers Cache-Control Expires Set-Cookie Vary X-Accel-Expires;
            proxy_connect_timeout 5s;
            proxy_read_timeout 60s;
            add_header X-Cache-Status $upstream_cache_status always;
        }}
{auth}
        location / {{
            return 403;
        }}
    }}
}}
"""

    def directories(self) -> list[Path]:
        """What nginx needs to exist before it starts (it creates the cache levels itself)."""
        d = self.cache_dir
        return [d, d / "tmp", d / "cache"]
