"""Commands that read versions from a registry: ls, inspect, verify, diff, pull."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from ..cache import BlockCache
from ..errors import ModelfsError, UsageError
from ..format.refs import parse_model, parse_registry
from ..units import count, fmt_bytes
from .app import (cache_tier, encryption_option, main, origin_of, registry_key, registry_of,
                  resolve_ref, tier_option, trust_option, trusted_keys)


@main.command("ls")
@click.argument("registry")
@trust_option
@encryption_option
@click.pass_context
def ls_cmd(ctx, registry: str):
    """List the models in REGISTRY with their tags and versions."""
    from ..registry.catalog import Catalog

    reg = registry_of(ctx, parse_registry(registry))
    reg.store.check_bucket()
    catalog = Catalog(reg, None, trusted_keys(ctx))  # with --trusted-key: only what verifies (the rest logged)
    models = reg.models()
    if not models:
        click.echo(f"no models in {reg.ref}")
    for name in models:
        tags = catalog.tags(name)
        by_version: dict[str, list[str]] = {}
        for t, v in tags.items():
            by_version.setdefault(v, []).append(t)
        click.echo(name)
        for v in reversed(catalog.versions(name)):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v.created))
            labels = ", ".join(by_version.get(v.version, []))
            click.echo(f"  {v.version}  {when}Z" + (f"  [{labels}]" if labels else ""))


@main.command()
@click.argument("ref")
@click.option("--registry", "registry_url", help="Registry holding the signature, when REF is a manifest file.")
@click.option("--deep", is_flag=True, help="Also check that the foreign objects an adopted version reads are still "
                                           "there, unchanged (a HEAD and its first chunk each).")
@trust_option
@encryption_option
@click.pass_context
def verify(ctx, ref: str, registry_url: str | None, deep: bool):
    """Check that a trusted key signed version REF (and tag, if REF names one), reading no data;
    with --deep, that an adopted version's DVC or Git LFS objects have not moved.

    Exit 0 when all holds; one error line (and, with --deep, what moved) and a non-zero exit otherwise."""
    if trusted_keys(ctx) is None and not deep:
        raise UsageError("verify needs --trusted-key PEM (repeatable), or --deep")
    cat, version, m = resolve_ref(ctx, ref, registry_url, need_registry=True)
    assert cat is not None
    if deep:
        from ..ops.adopt import check_sources

        checked, moved = check_sources(cat.registry, m)
        for x in moved:
            click.echo(f"  moved: {x.path}: {x.url} {x.why}")
        if moved:
            raise ModelfsError(f"{m.name}@{version}: {len(moved)} of {count(checked, 'adopted object')} moved since "
                               "adoption: reads of those files fail (EIO); adopt the checkout again")
        click.echo(f"sources of {m.name}@{version}: {count(checked, 'adopted object')}, all in place")
        if trusted_keys(ctx) is None:
            return
    what = f"{m.name}@{version}"
    if ref.startswith("s3://") and not parse_model(ref).is_version:
        what = f"{m.name}@{parse_model(ref).selector} -> {version} (tag signed)"
    click.echo(f"verified {what}: {count(len(m.files), 'file')} signed by trusted key {cat.signed_by[version][:16]}")


@main.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest itself.")
@trust_option
@encryption_option
@click.pass_context
def inspect(ctx, ref: str, as_json: bool):
    """Show what model REF holds: files, sizes, tensors (REF: s3://…/NAME@TAG or a manifest file)."""
    cat, version, m = resolve_ref(ctx, ref)
    if as_json:
        sys.stdout.write(m.to_bytes().decode())
        return
    t = m.totals()
    click.echo(f"{m.name}@{version}  created {m.created}")
    if cat is not None and version in cat.signed_by:
        click.echo(f"  signed by trusted key {cat.signed_by[version][:16]}")
    click.echo(f"  {t['files']} files, {fmt_bytes(t['bytes'])}, {t['chunks']} chunks "
               f"({t['unique_chunks']} unique, {fmt_bytes(t['unique_chunk_bytes'])})")
    for i, src in enumerate(m.sources):
        n = sum(1 for f in m.files if f.foreign is not None and f.foreign.source == i)
        click.echo(f"  adopted: {n} file(s) read in place from {src.url}"
                   + (f" at {src.endpoint}" if src.endpoint else "") + f" ({src.kind}; marked [{i}])")
    for f in m.files:
        where = f"  [{f.foreign.source}] {f.foreign.key}" if f.foreign is not None else ""
        click.echo(f"  {f.mode:04o} {fmt_bytes(f.size):>11}  {f.path}  {_summary(f.description)}{where}")
    for d in m.directories:
        click.echo(f"  {d.mode:04o} {'dir':>11}  {d.path}/")


def _summary(d: dict) -> str:
    fmt = d.get("format", "?")
    if fmt == "safetensors":
        dt = ", ".join(f"{k}×{v}" for k, v in d.get("dtypes", {}).items())
        return f"safetensors: {d.get('tensors')} tensors ({dt}), {d.get('parameters', 0):,} params"
    if fmt == "gguf":
        return (f"gguf: {d.get('architecture')}, {d.get('tensors')} tensors, "
                f"{d.get('parameters', 0):,} params, types {d.get('tensor_types')}")
    extra = {k: v for k, v in d.items() if k != "format"}
    return fmt + (f" {json.dumps(extra, ensure_ascii=False)}" if extra else "")


@main.command("diff")
@click.argument("old")
@click.argument("new")
@click.option("--registry", "registry_url", help="Registry holding the chunks of manifest files without an origin.")
@click.option("--json", "as_json", is_flag=True, help="Print the diff as JSON.")
@click.option("--limit", default=20, show_default=True, help="Tensors listed per kind and file (all with --json).")
@trust_option
@encryption_option
@click.pass_context
def diff_cmd(ctx, old: str, new: str, registry_url: str | None, as_json: bool, limit: int):
    """What changed from version OLD to NEW (refs or manifest files): files, tensors, bytes to fetch."""
    from ..describe.diff import diff

    sides = []
    for ref in (old, new):
        cat, version, m = resolve_ref(ctx, ref, registry_url)
        reg = cat.registry if cat is not None else origin_of(ctx, m, None) if m.origin else None
        read = reg.get_chunk if reg is not None else _no_chunks
        sides.append((f"{m.name}@{version}", m, read))
    (la, ma, ra), (lb, mb, rb) = sides
    d = diff(ma, mb, la, lb, ra, rb)
    if as_json:
        click.echo(json.dumps(d.as_json(), indent=2))
        return
    click.echo(f"{d.old} -> {d.new}")
    click.echo(f"  files: {len(d.added)} added, {len(d.removed)} removed, {len(d.changed)} changed, "
               f"{d.unchanged} unchanged")
    for sign, files in (("+", d.added), ("-", d.removed)):
        for f in files:
            click.echo(f"  {sign} {f.path} ({fmt_bytes(f.size)})")
    for c in d.changed:
        what = []
        if c.size[0] != c.size[1]:
            what.append(f"size {fmt_bytes(c.size[0])} -> {fmt_bytes(c.size[1])}")
        if c.mode[0] != c.mode[1]:
            what.append(f"mode {c.mode[0]:04o} -> {c.mode[1]:04o}")
        if c.content_changed:
            what.append("content")
        click.echo(f"  ~ {c.path}: {', '.join(what)}")
        t = c.tensors
        if t is None:
            continue
        click.echo(f"      tensors: {len(t.added)} added, {len(t.removed)} removed, {len(t.reshaped)} reshaped, "
                   f"{len(t.retyped)} retyped, {len(t.changed)} with changed bytes")
        rows = ([f"+ {n}" for n in t.added] + [f"- {n}" for n in t.removed]
                + [f"~ {n}: shape {a} -> {b}" for n, a, b in t.reshaped]
                + [f"~ {n}: dtype {a} -> {b}" for n, a, b in t.retyped] + [f"~ {n}: bytes" for n in t.changed])
        for r in rows[:limit]:
            click.echo(f"        {r}")
        if len(rows) > limit:
            click.echo(f"        … {len(rows) - limit} more (--limit, --json)")
    click.echo(f"  a host holding {d.old} fetches {fmt_bytes(d.fetch_bytes)} in {count(d.fetch_chunks, 'chunk')} "
               f"(of {fmt_bytes(d.new_bytes)}) to get {d.new}")


def _no_chunks(h: str, n: int) -> bytes:
    raise UsageError("this manifest names no origin registry: pass --registry s3://BUCKET/PREFIX "
                     "to compare tensors")


@main.command()
@click.argument("ref")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--registry", "registry_url", help="Registry holding the chunks, when REF is a manifest file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="The host's block cache to copy chunks from (default: the mounts' default, if it exists).")
@click.option("--no-cache", is_flag=True, help="Fetch every chunk from the store, even ones the host's cache holds.")
@click.option("--verify", "verify_files", is_flag=True,
              help="Also read each file back and check its SHA-256 (every chunk is checked, BLAKE3, either way).")
@trust_option
@encryption_option
@tier_option
@click.pass_context
def pull(ctx, ref: str, dest: Path, registry_url: str | None, quiet: bool, cache_dir: Path | None,
         no_cache: bool, verify_files: bool):
    """Download model REF into DEST, verified, in parallel (chunks the host's cache holds are copied from it).

    Every chunk is checked against its id before it is written; each file is fsynced
    and renamed into place whole. --verify (implied by --trusted-key, whose signatures
    name the files' SHA-256) adds a SHA-256 check of each whole file."""
    from ..transfer.spawn import LaneConfig, end_unadopted, prestart

    config = ctx.obj["config"]
    lanes = LaneConfig(concurrency=config.concurrency, timeouts=config.timeouts, tiers=cache_tier(ctx))
    cache = None if no_cache else _host_cache(cache_dir)
    # the workers start on the other cores while this process imports boto3 and resolves REF
    spawned = prestart(lanes, cache, encrypted=registry_key(ctx) is not None)
    try:
        from ..ops.pull import pull as do_pull
        from ..progress import Progress

        cat, version, m = resolve_ref(ctx, ref, registry_url, need_registry=True)
        assert cat is not None
        bar = Progress("pull", enabled=False if quiet else None)
        bar.start(m.totals()["bytes"])
        t0 = time.monotonic()
        try:
            stats = do_pull(cat.registry, m, dest, lanes_config=lanes, on_progress=bar.advance,
                            signature=cat.signature(m.name, version), cache=cache, spawned=spawned,
                            verify_files=verify_files or trusted_keys(ctx) is not None)
        finally:
            bar.close()
    finally:
        end_unadopted(spawned)
        if cache is not None:
            cache.close()
    dt = time.monotonic() - t0
    click.echo(f"pulled {m.name}@{version} into {dest}: {stats.files} files written, "
               f"{stats.skipped_files} already complete, {fmt_bytes(stats.fetched_bytes)} fetched, "
               f"{fmt_bytes(stats.cached_bytes)} from the host's cache, in {dt:.1f} s")


def _host_cache(cache_dir: Path | None) -> BlockCache | None:
    """The cache named by ``--cache-dir`` (an error if there is none), else the default one
    if it exists. A cache that cannot be opened is not worth failing a pull for."""
    from ..cache import default_cache_dir

    if cache_dir is None:
        cache_dir = default_cache_dir()
        if not (cache_dir / "blocks" / "data.mdb").is_file():
            return None
    try:
        return BlockCache.open_existing(cache_dir)
    except UsageError:
        raise
    except Exception as e:  # lmdb's errors, permissions: say so, and fetch instead
        click.echo(f"modelfs: warning: not using the cache in {cache_dir}: {e}", err=True)
        return None
