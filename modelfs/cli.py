"""The ``modelfs`` command line: parse, build config, call one module, print.

Every command resolves its arguments into a :class:`~modelfs.config.StoreConfig`
and refs, then hands off; no storage logic lives here. Errors a user can cause
become one ``modelfs: error: ...`` line and a non-zero exit; ``--debug`` shows
the traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import click

from . import __version__
from .config import StoreConfig
from .errors import ModelfsError
from .manifest import Manifest
from .progress import Progress
from .refs import RegistryRef, parse_model, parse_registry
from .registry import Registry, open_registry, origin_registry, read_manifest_file


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


class _Cli(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ModelfsError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"modelfs: error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("modelfs: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="modelfs")
@click.option("--endpoint-url", envvar="AWS_ENDPOINT_URL", help="S3 endpoint (default: AWS, or $AWS_ENDPOINT_URL).")
@click.option("--region", help="Region (default: $AWS_REGION, $AWS_DEFAULT_REGION or the profile's).")
@click.option("--profile", help="AWS profile (default: $AWS_PROFILE).")
@click.option("--concurrency", "-j", default=16, show_default=True, type=click.IntRange(1, 256),
              help="Parallel transfers.")
@click.option("--log-level", default="warning", show_default=True, envvar="MODELFS_LOG_LEVEL",
              type=click.Choice(["debug", "info", "warning", "error"]), help="Also $MODELFS_LOG_LEVEL.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, endpoint_url, region, profile, concurrency, log_level, debug):
    """modelfs: publish large models as deduplicated chunks to S3, and read them back."""
    logging.basicConfig(level=getattr(logging, log_level.upper()),
                        format="modelfs: %(levelname)s: %(message)s")
    if log_level != "debug":  # their INFO lines are noise for users ("Found credentials ...")
        for name in ("botocore", "boto3", "urllib3", "s3transfer"):
            logging.getLogger(name).setLevel(logging.WARNING)
    ctx.obj = {"debug": debug,
               "config": StoreConfig(endpoint_url=endpoint_url or None, region=region,
                                     profile=profile, concurrency=concurrency)}


def _registry(ctx: click.Context, ref: RegistryRef) -> Registry:
    return open_registry(ref, ctx.obj["config"])


def _resolve(ctx: click.Context, ref: str) -> tuple[Registry | None, str, Manifest]:
    """A model ref (s3://…/NAME@SEL) or a local manifest file → (registry, version, manifest)."""
    if ref.startswith("s3://"):
        mref = parse_model(ref)
        registry = _registry(ctx, mref.registry)
        version, manifest = registry.resolve(mref)
        return registry, version, manifest
    manifest = read_manifest_file(ref)
    return None, manifest.version_id, manifest


@main.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("registry")
@click.option("--name", required=True, help="Model name.")
@click.option("--tag", "tags", multiple=True, help="Tag to point at the new version (repeatable); 'latest' always moves.")
@click.option("--dry-run", is_flag=True, help="Report what would upload; write nothing.")
@click.option("--no-compress", is_flag=True, help="Store chunks raw, never zstd.")
@click.option("--manifest-out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the manifest here (the pointer file to commit).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.pass_context
def publish(ctx, src: Path, registry: str, name: str, tags, dry_run, no_compress, manifest_out, quiet):
    """Publish directory SRC as a new version of model NAME in REGISTRY (s3://BUCKET/PREFIX)."""
    from .publish import Publisher, scan

    reg = _registry(ctx, parse_registry(registry))
    tag_list = list(dict.fromkeys(["latest", *tags]))
    bar = Progress("publish", enabled=False if quiet else None)
    tree = scan(src)
    bar.start(sum(f.size for f in tree[0]))

    def progress(n, stats):
        bar.advance(n, f"new {fmt_bytes(stats.uploaded_bytes)}, reused {stats.reused_chunks} chunks")

    pub = Publisher(reg, concurrency=ctx.obj["config"].concurrency, dry_run=dry_run,
                    compress=not no_compress, on_progress=progress)
    try:
        result = pub.run(tree, name, tag_list)
    finally:
        bar.close()
    s, m = result.stats, result.manifest
    if manifest_out:
        tmp = manifest_out.with_name(manifest_out.name + ".tmp")
        tmp.write_bytes(m.to_bytes())
        tmp.replace(manifest_out)
    rate = s.bytes / s.seconds if s.seconds else 0
    head = "dry run: would publish" if dry_run else "published"
    click.echo(f"{head} {name}@{result.version}" + (f" (tags: {', '.join(result.tags)})" if result.tags else ""))
    click.echo(f"  files     {s.files} ({fmt_bytes(s.bytes)}), {s.chunks} chunks")
    click.echo(f"  {'to upload' if dry_run else 'uploaded '} {fmt_bytes(s.uploaded_bytes)} in {s.uploaded_chunks} chunks")
    click.echo(f"  reused    {s.reused_chunks} chunks ({fmt_bytes(s.reused_bytes)}) already in the store")
    click.echo(f"  took      {s.seconds:.1f} s ({fmt_bytes(rate)}/s)")
    click.echo(f"  ref       {reg.ref}/{name}@{result.version}")


@main.command("ls")
@click.argument("registry")
@click.pass_context
def ls_cmd(ctx, registry: str):
    """List the models in REGISTRY with their tags and versions."""
    reg = _registry(ctx, parse_registry(registry))
    reg.store.check_bucket()
    models = reg.models()
    if not models:
        click.echo(f"no models in {reg.ref}")
    for name in models:
        tags = reg.tags(name)
        by_version: dict[str, list[str]] = {}
        for t, v in tags.items():
            by_version.setdefault(v, []).append(t)
        click.echo(name)
        for v in reversed(reg.versions(name)):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v.created))
            labels = ", ".join(by_version.get(v.version, []))
            click.echo(f"  {v.version}  {when}Z" + (f"  [{labels}]" if labels else ""))


@main.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest itself.")
@click.pass_context
def inspect(ctx, ref: str, as_json: bool):
    """Show what model REF holds: files, sizes, tensors (REF: s3://…/NAME@TAG or a manifest file)."""
    _, version, m = _resolve(ctx, ref)
    if as_json:
        sys.stdout.write(m.to_bytes().decode())
        return
    t = m.totals()
    click.echo(f"{m.name}@{version}  created {m.created}")
    click.echo(f"  {t['files']} files, {fmt_bytes(t['bytes'])}, {t['chunks']} chunks "
               f"({t['unique_chunks']} unique, {fmt_bytes(t['unique_chunk_bytes'])})")
    for f in m.files:
        click.echo(f"  {f.mode:04o} {fmt_bytes(f.size):>11}  {f.path}  {_summary(f.description)}")
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


@main.command()
@click.argument("ref")
@click.argument("tag")
@click.pass_context
def tag(ctx, ref: str, tag: str):
    """Point TAG of the model at the version REF names (s3://…/NAME@TAG-OR-VERSION)."""
    mref = parse_model(ref)
    reg = _registry(ctx, mref.registry)
    version, _ = reg.resolve(mref)  # proves the version exists and is valid
    reg.set_tag(mref.name, tag, version)
    click.echo(f"{mref.name}@{tag} -> {version}")


@main.command()
@click.argument("ref")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--registry", "registry_url", help="Registry holding the chunks, when REF is a manifest file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.pass_context
def pull(ctx, ref: str, dest: Path, registry_url: str | None, quiet: bool):
    """Download model REF into DEST, verified, in parallel."""
    from .pull import pull as do_pull

    reg, version, m = _resolve(ctx, ref)
    if reg is None:
        reg = origin_registry(m, registry_url, ctx.obj["config"])
    bar = Progress("pull", enabled=False if quiet else None)
    bar.start(m.totals()["bytes"])
    t0 = time.monotonic()
    try:
        stats = do_pull(reg, m, dest, concurrency=ctx.obj["config"].concurrency, on_progress=bar.advance)
    finally:
        bar.close()
    dt = time.monotonic() - t0
    click.echo(f"pulled {m.name}@{version} into {dest}: {stats.files} files written, "
               f"{stats.skipped_files} already complete, {fmt_bytes(stats.fetched_bytes)} fetched "
               f"in {dt:.1f} s")


@main.command()
@click.argument("source")
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("--registry", "registry_url", help="Registry holding the chunks, when SOURCE is a manifest file (default: its origin).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Persistent block cache (default: ~/.cache/modelfs, /var/cache/modelfs for root).")
@click.option("--cache-size", default="16G", show_default=True, help="Cap of the block cache.")
@click.option("--memory-cache", default="256M", show_default=True, help="Decoded chunks kept in memory.")
@click.option("--readahead", default="64M", show_default=True, help="Largest readahead window per sequential reader.")
@click.option("--fetch-timeout", default=60.0, show_default=True, help="Seconds before a chunk fetch is an I/O error.")
@click.option("--metadata-ttl", default=30.0, show_default=True, help="Seconds model/tag/version listings are kept.")
@click.option("--kernel-readahead-kb", default=1024, show_default=True, help="Kernel readahead for the mount (root only; 0 keeps the default).")
@click.option("--allow-other", is_flag=True, help="Let other users (and containers) read the mount.")
@click.option("--foreground", "-f", is_flag=True, help="Stay attached (systemd, debugging).")
@click.option("--ready-fd", type=int, hidden=True)
@click.pass_context
def mount(ctx, source, mountpoint: Path, registry_url, cache_dir, cache_size, memory_cache, readahead,
          fetch_timeout, metadata_ttl, kernel_readahead_kb, allow_other, foreground, ready_fd):
    """Mount SOURCE read-only at MOUNTPOINT.

    SOURCE is a registry (s3://BUCKET/PREFIX: every model, tag and version), one
    model version (s3://BUCKET/PREFIX/NAME@TAG), or a manifest file.
    """
    from .cache import default_cache_dir
    from .fetch import FetchConfig
    from .mount import MountConfig, parse_size, run_foreground, start_background

    store_cfg = ctx.obj["config"]
    cfg = MountConfig(
        source=source, mountpoint=mountpoint.absolute(), registry_url=registry_url,
        cache_dir=(cache_dir or default_cache_dir()).absolute(), cache_size=parse_size(cache_size),
        allow_other=allow_other, metadata_ttl=metadata_ttl,
        kernel_readahead_kb=kernel_readahead_kb or None, store=store_cfg,
        fetch=FetchConfig(memory_bytes=parse_size(memory_cache), s3_concurrency=store_cfg.concurrency,
                          readahead_bytes=parse_size(readahead), fetch_timeout=fetch_timeout))
    if foreground:
        run_foreground(cfg, ready_fd)
        return
    from .mount import check_mountpoint
    check_mountpoint(cfg.mountpoint)  # fail fast, before starting anything
    slug = str(cfg.mountpoint).strip("/").replace("/", "_") or "root"
    log_path = cfg.cache_dir / "logs" / f"mount-{slug}.log"
    pid = start_background(sys.argv[1:], log_path)
    click.echo(f"mounted {source} at {cfg.mountpoint} (pid {pid}; log {log_path})")


@main.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("--lazy", "-z", is_flag=True, help="Detach now, even with files open; finish when they close.")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for the daemon to exit.")
def unmount(mountpoint: Path, lazy: bool, timeout: float):
    """Unmount a modelfs mount and wait for its daemon to exit."""
    from .mount import unmount as do_unmount

    try:
        pid = int(os.getxattr(mountpoint, "user.modelfs.pid"))
    except (OSError, ValueError):
        pid = None
    do_unmount(mountpoint, lazy)
    deadline = time.monotonic() + timeout
    while pid and not lazy and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    click.echo(f"unmounted {mountpoint}")


if __name__ == "__main__":
    main()
