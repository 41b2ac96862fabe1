"""Commands that act on this host: mount, unmount, stats, prefetch, and its block cache."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from ..cache import BlockCache
from .. import logs
from ..config import DEFAULTS
from ..errors import UsageError
from ..units import fmt_bytes
from .app import (SIZE, cache_dir_option, cache_tier, encryption_option, main, registry_key, resolve_ref, setting_help,
                  tier_option, trust_option)


@main.command()
@click.argument("source", required=False)
@click.argument("mountpoint", required=False, type=click.Path(path_type=Path))
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML file with any of these settings (flags win over it); see docs/operations.md.")
@click.option("--registry", help=setting_help("registry"))
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), help=setting_help("cache_dir"))
@click.option("--cache-size", help=setting_help("cache_size"))
@click.option("--memory-cache", help=setting_help("memory_cache"))
@click.option("--fetch-workers", type=int, help=setting_help("fetch_workers"))
@click.option("--readahead", help=setting_help("readahead"))
@click.option("--readahead-trigger", help=setting_help("readahead_trigger"))
@click.option("--readahead-order", type=click.Choice(["tensors", "file"]), help=setting_help("readahead_order"))
@click.option("--fetch-timeout", type=float, help=setting_help("fetch_timeout"))
@click.option("--metadata-ttl", type=float, help=setting_help("metadata_ttl"))
@click.option("--kernel-readahead-kb", type=int, help=setting_help("kernel_readahead_kb"))
@click.option("--allow-other/--no-allow-other", default=None, help=setting_help("allow_other"))
@click.option("--nonempty/--no-nonempty", default=None, help=setting_help("nonempty"))
@click.option("--metrics-port", type=int, help=setting_help("metrics_port"))
@click.option("--metrics-address", help=setting_help("metrics_address"))
@trust_option(expose=True)
@encryption_option(expose=True)
@click.option("--encrypt-cache/--no-encrypt-cache", default=None, help=setting_help("encrypt_cache"))
@tier_option(expose=True)
@click.option("--foreground", "-f", is_flag=True, help="Stay attached (systemd, debugging).")
@click.option("--ready-fd", type=int, hidden=True)
@click.pass_context
def mount(ctx, source, mountpoint, config_file, foreground, ready_fd, **flags):
    """Mount SOURCE read-only at MOUNTPOINT.

    SOURCE is a registry (s3://BUCKET/PREFIX: every model, tag and version), one
    model version (s3://BUCKET/PREFIX/NAME@TAG), a manifest file, or a directory
    of *.modelfs.json pointer files (a git checkout: each pointer shows as a
    directory). Both may come from --config instead.
    """
    import gc

    from ..config import Timeouts, resolve

    # what a start allocates (imports, boto3's models, the manifest) lives as long as the
    # daemon: no collection until it serves, when it is frozen and the collector comes back
    # on (mount/daemon.py); collections were ~13 % of the start's imports and S3 client
    gc.disable()
    given = {**ctx.obj["given"], **{k: v for k, v in flags.items() if v not in (None, ())}}
    if source is not None:
        given["source"] = source
    if mountpoint is not None:
        given["mountpoint"] = str(mountpoint)
    settings = resolve(config_file, given)
    logs.setup(settings["log_level"])  # the config file may name one
    if foreground:
        from ..mount.resolving import resolve_ahead

        ahead = resolve_ahead(settings)  # resolving the source while this process imports the daemon
        from ..mount.background import prestart_workers
        from ..mount.daemon import run_foreground

        early = prestart_workers(settings)  # after the imports (see background._become_daemon)
        run_foreground(settings, ready_fd, early, ahead)
        return
    # the waiting parent: what the daemon refuses (a bad key file, a bad ref) it says through
    # the ready pipe; here only what is cheap to check, before starting anything
    from ..mount.background import cache_dir_of, log_path, start_background, start_timeout
    from ..mount.mountpoint import check_mountpoint

    mnt = settings["mountpoint"].absolute()
    check_mountpoint(mnt, settings["nonempty"])
    log = log_path(cache_dir_of(settings), mnt)
    pid = start_background(settings, log, start_timeout(Timeouts.of(settings)))
    click.echo(f"mounted {settings['source']} at {mnt} (pid {pid}; log {log})")
    # done, and nothing of ours left to flush or close: skip the interpreter's teardown of
    # every module imported (~0.07 s of a ~0.35 s command, measured)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@main.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def stats(mountpoint: Path, as_json: bool):
    """Live figures of the daemon serving MOUNTPOINT (or any path on it)."""
    from ..mount.metrics import read_stats

    s = read_stats(mountpoint)
    if as_json:
        click.echo(s.to_json().decode())
        return
    ms = lambda v: "-" if v is None else f"{v:.1f} ms"  # noqa: E731
    version = f" (version {s.version})" if s.version else ""
    click.echo(f"{s.source}{version} at {s.mountpoint} (pid {s.pid}, up {s.uptime_seconds:.0f} s)")
    click.echo(f"  served      {fmt_bytes(s.bytes_served)}")
    click.echo(f"  fetched     {fmt_bytes(s.bytes_fetched)} in {s.fetches} GETs "
               f"(p50 {ms(s.fetch_p50_ms)}, p99 {ms(s.fetch_p99_ms)})")
    click.echo(f"  block reads {s.peeks} (small cold reads served from a few verified blocks first)")
    if s.tier_chunks or s.tier_fallbacks or s.tier_bad:
        click.echo(f"  cache tier  {s.tier_chunks} chunks ({fmt_bytes(s.tier_bytes)}), {s.tier_hits} hits; "
                   f"{s.store_chunks} from the store; {s.tier_fallbacks} fallbacks, {s.tier_bad} bad copies refused")
    click.echo(f"  chunk hits  {s.hit_ratio:.1%} ({s.memory_hits} served from the cache's map, "
               f"{s.cache_hits} re-checked by a worker; {s.paged_in} paged in ahead of readers)")
    click.echo(f"  workers     {len(s.worker_pids)} ({s.worker_restarts} replaced)")
    click.echo(f"  in flight   {s.fetches_in_flight}")
    click.echo(f"  errors      {s.errors}")
    click.echo(f"  cache       {fmt_bytes(s.cache_used_bytes)} of {fmt_bytes(s.cache_cap_bytes)}")


@main.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("--lazy", "-z", is_flag=True, help="Detach now, even with files open; finish when they close.")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for the daemon to exit.")
def unmount(mountpoint: Path, lazy: bool, timeout: float):
    """Unmount a modelfs mount and wait for its daemon to exit."""
    from ..mount.mountpoint import unmount_and_wait

    r = unmount_and_wait(mountpoint, lazy, timeout)
    click.echo(f"unmounted {mountpoint}")
    if r.still_running and not lazy:
        where = (f": {', '.join(r.other_mounts)}" if r.other_mounts
                 else " (bind mounts in another mount namespace, e.g. a container's)")
        click.echo(f"modelfs: warning: its daemon (pid {r.pid}) keeps serving other mounts of the same "
                   f"filesystem{where}; it exits when they are unmounted", err=True)


# -- cache tools --------------------------------------------------------------------

def _open_cache(cache_dir: Path | None):
    from ..cache import default_cache_dir

    return BlockCache.open_existing(cache_dir or default_cache_dir())


@main.group()
def cache():
    """Inspect, verify and prune a block cache (safe while mounts use it)."""


@cache.command("stats")
@cache_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def cache_stats(cache_dir, as_json):
    """What the cache holds."""
    from dataclasses import asdict

    c = _open_cache(cache_dir)
    try:
        st = c.stats()
    finally:
        c.close()
    if as_json:
        click.echo(json.dumps({"path": str(c.path), **asdict(st)}, sort_keys=True))
        return
    when = lambda ns: "-" if ns is None else time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ns / 1e9))  # noqa: E731
    click.echo(f"cache {c.path}")
    click.echo(f"  chunks     {st.entries} ({fmt_bytes(st.chunk_bytes)})")
    click.echo(f"  manifests  {st.manifests}")
    click.echo(f"  used       {fmt_bytes(st.used_bytes)} (file {fmt_bytes(st.file_bytes)})")
    click.echo(f"  last use   oldest {when(st.oldest_use_ns)}, newest {when(st.newest_use_ns)}")


@cache.command("verify")
@cache_dir_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def cache_verify(cache_dir, quiet):
    """Re-hash every cached chunk; drop damaged ones (a mount refetches them). Exit 1 if any were."""
    c = _open_cache(cache_dir)
    from ..progress import Progress

    bar = Progress("verify", enabled=False if quiet else None)
    try:
        bar.start(c.stats().chunk_bytes)
        r = c.verify(on_progress=bar.advance)
    finally:
        bar.close()
        c.close()
    click.echo(f"verified {r.checked} chunks ({fmt_bytes(r.bytes)}): "
               + (f"{r.damaged} damaged, dropped" if r.damaged else "all intact"))
    if r.damaged:
        sys.exit(1)


@cache.command("prune")
@cache_dir_option
@click.option("--max-size", type=SIZE, help="Drop least recently used chunks until the cache uses at most this (e.g. 10G).")
@click.option("--all", "drop_all", is_flag=True, help="Drop every chunk and manifest.")
def cache_prune(cache_dir, max_size, drop_all):
    """Free cache space now (mounts evict on their own past --cache-size)."""
    from ..errors import UsageError

    if (max_size is None) != drop_all:
        raise UsageError("give exactly one of --max-size SIZE or --all")
    c = _open_cache(cache_dir)
    try:
        before = c.used_bytes()
        if drop_all:
            c.clear()
        else:
            c.evict(target=max_size)
        after = c.used_bytes()
    finally:
        c.close()
    click.echo(f"pruned {c.path}: {fmt_bytes(before)} -> {fmt_bytes(after)} used")


def _is_manifest_file(path: str) -> bool:
    """A local file, not one on a modelfs mount (those carry user.modelfs.* attributes)."""
    from ..mount.xattrs import on_a_mount

    return os.path.isfile(path) and not on_a_mount(path)


@main.command()
@click.argument("targets", nargs=-1, required=True)
@cache_dir_option
@click.option("--cache-size", "cap", type=SIZE, default=DEFAULTS["cache_size"], show_default=True,
              help="Cap of the cache (by ref), as the mounts that use it have.")
@click.option("--registry", "registry_url", help="Registry holding the chunks, when a target is a manifest file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--encrypt-cache", is_flag=True,
              help="Warm the encrypted cache that mounts with --encrypt-cache read (<cache_dir>/sealed).")
@click.option("--tier-only", is_flag=True,
              help="Warm the cache tier (--cache-tier) for a rollout: every chunk passes through it, verified, "
                   "and nothing is kept on this host.")
@trust_option
@encryption_option
@tier_option
@click.pass_context
def prefetch(ctx, targets, cache_dir, cap, registry_url, quiet, encrypt_cache, tier_only):
    """Warm the cache before traffic arrives.

    TARGETS are either model refs (s3://…/NAME@TAG, or manifest files), whose
    chunks go straight into the block cache (no mount needed), or files and
    directories on a running mount, which are read through it.
    """
    from ..cache import cache_root, default_cache_dir
    from ..ops.prefetch import files_under, read_through, warm_cache
    from ..progress import Progress

    refs = [t for t in targets if t.startswith("s3://") or _is_manifest_file(t)]
    paths = [Path(t) for t in targets if t not in refs]
    t0 = time.monotonic()
    if tier_only:
        _warm_tier(ctx, refs, paths, registry_url, quiet)
        return
    if encrypt_cache and registry_key(ctx) is None:
        raise UsageError("--encrypt-cache needs the registry's key: pass --encryption-key FILE too")
    if refs:
        c = BlockCache(cache_root(cache_dir or default_cache_dir(), sealed=encrypt_cache), cap)
        try:
            for ref in refs:
                cat, version, m = resolve_ref(ctx, ref, registry_url, need_registry=True, cache=c, sealed=encrypt_cache)
                assert cat is not None
                reg = cat.registry
                total = m.totals()["unique_chunk_bytes"]
                if total > cap:
                    click.echo(f"modelfs: warning: {m.name}@{version} ({fmt_bytes(total)}) is larger than "
                               f"the cache cap ({fmt_bytes(cap)}); its first chunks will be evicted", err=True)
                bar = Progress(f"prefetch {m.name}", enabled=False if quiet else None)
                bar.start(total)
                try:
                    st = warm_cache(reg, m, c, concurrency=ctx.obj["config"].concurrency,
                                    sealed=encrypt_cache, on_progress=bar.advance, tiers=cache_tier(ctx))
                finally:
                    bar.close()
                click.echo(f"prefetched {m.name}@{version} into {c.path}: {fmt_bytes(st.fetched_bytes)} "
                           f"fetched in {st.fetched_chunks} chunks, {st.cached_chunks} chunks already cached")
        finally:
            c.close()
    if paths:
        files = files_under(paths)
        bar = Progress("prefetch", enabled=False if quiet else None)
        bar.start(sum(n for _, n in files))
        try:
            st = read_through(files, on_progress=bar.advance)
        finally:
            bar.close()
        click.echo(f"prefetched {st.files} files ({fmt_bytes(st.bytes)}) through the mount")
    click.echo(f"took {time.monotonic() - t0:.1f} s")


def _warm_tier(ctx, refs: list[str], paths: list[Path], registry_url: str | None, quiet: bool) -> None:
    """``prefetch --tier-only``: each ref's chunks through the cache tier, none kept here."""
    from ..ops.prefetch import warm_tier
    from ..progress import Progress

    if paths:
        raise UsageError(f"--tier-only takes model refs, not paths ({paths[0]})")
    tiers = cache_tier(ctx)
    if not tiers:
        raise UsageError("--tier-only warms the cache tier: pass --cache-tier URL (repeatable)")
    for ref in refs:
        cat, version, m = resolve_ref(ctx, ref, registry_url, need_registry=True)
        assert cat is not None
        total = sum({h: n for e in m.files for h, n in e.chunks}.values())
        bar = Progress(f"tier {m.name}", enabled=False if quiet else None)
        bar.start(total)
        try:
            st = warm_tier(cat.registry, m, tiers, concurrency=ctx.obj["config"].concurrency, on_progress=bar.advance)
        finally:
            bar.close()
        click.echo(f"warmed the cache tier with {m.name}@{version}: {st.fetched_chunks} chunks "
                   f"({fmt_bytes(st.fetched_bytes)}), {st.tier_hits} already there, {st.from_store} from the "
                   "store directly (a node did not answer or gave a bad copy)")


@main.command("tier-config")
@click.option("--store", required=True, help="The object store's endpoint the tier forwards to, http[s]://HOST[:PORT].")
@click.option("--listen", default="0.0.0.0:8480", show_default=True, help="Address and port the node listens on.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("/var/cache/modelfs-tier"),
              show_default=True, help="Where the node keeps chunks (and its temporary files); an absolute path.")
@click.option("--max-size", default="100g", show_default=True, help="Cap of the node's cache (nginx sizes: 500g, 2t).")
@click.option("--user", help="User nginx's workers run as (default: nginx's own); owns --cache-dir with --output.")
@click.option("--check-access", is_flag=True,
              help="Have the store check every request's signature (a 1-byte ranged GET each) before a cached "
                   "chunk is served: for a tier shared by hosts with different rights (docs/security.md).")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the configuration here (and make the cache directories) instead of printing it.")
def tier_config(store, listen, cache_dir, max_size, user, check_access, output):
    """Print the nginx configuration of a cache tier node (docs/fleet.md): run it with
    `nginx -c FILE`, and point hosts at it with --cache-tier http://NODE:PORT."""
    from ..ops.tier_config import TierConfig
    from .app import write_atomically

    try:
        cfg = TierConfig(store=store.rstrip("/"), listen=listen, cache_dir=cache_dir, max_size=max_size, user=user,
                         check_access=check_access)
    except ValueError as e:
        raise UsageError(str(e)) from None
    text = cfg.render()
    if output is None:
        click.echo(text, nl=False)
        return
    import shutil

    for d in cfg.directories():
        d.mkdir(parents=True, exist_ok=True, mode=0o750)
        if user and os.geteuid() == 0:
            shutil.chown(d, user)
    write_atomically(output, text.encode())
    click.echo(f"wrote {output}; run: nginx -c {output.absolute()}")
