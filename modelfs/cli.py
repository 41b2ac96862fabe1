"""The ``modelfs`` command line: parse, build config, call one module, print.

Every command resolves its arguments into a :class:`~modelfs.config.StoreConfig`
and refs, then hands off; no storage logic lives here. Errors a user can cause
become one ``modelfs: error: ...`` line and a non-zero exit; ``--debug`` shows
the traceback.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from . import __version__, logs
from .config import DEFAULTS, KEYS, LOG_LEVELS, StoreConfig
from .errors import ModelfsError, UsageError
from .format.manifest import Manifest
from .progress import Progress
from .format.refs import RegistryRef, parse_model, parse_registry
from .cache import BlockCache
from .registry.catalog import Catalog
from .registry.layout import Registry, open_registry, origin_registry, read_manifest_file
from .units import count, fmt_bytes


_SECONDS = click.FloatRange(0, 86400, min_open=True)  # the same bound as a config file's seconds


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
@click.option("--concurrency", "-j", default=DEFAULTS["concurrency"], show_default=True,
              type=click.IntRange(1, 256), help="Parallel transfers.")
@click.option("--connect-timeout", default=DEFAULTS["connect_timeout"], show_default=True, type=_SECONDS,
              help=KEYS["connect_timeout"].doc)
@click.option("--read-timeout", default=DEFAULTS["read_timeout"], show_default=True, type=_SECONDS,
              help=KEYS["read_timeout"].doc)
@click.option("--attempts", default=DEFAULTS["attempts"], show_default=True, type=click.IntRange(1, 20),
              help=KEYS["attempts"].doc)
@click.option("--log-level", default=DEFAULTS["log_level"], show_default=True, envvar="MODELFS_LOG_LEVEL",
              type=click.Choice(LOG_LEVELS), help="Also $MODELFS_LOG_LEVEL.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, endpoint_url, region, profile, concurrency, connect_timeout, read_timeout,
         attempts, log_level, debug):
    """modelfs: publish large models as deduplicated chunks to S3, and read them back."""
    logs.setup(log_level)
    # what the user set (flag or its environment variable): a config file may fill in the rest
    given = {name: value for name, value in ctx.params.items()
             if name in KEYS and value is not None
             and ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}
    ctx.obj = {"debug": debug, "given": given,
               "config": StoreConfig(endpoint_url=endpoint_url or None, region=region,
                                     profile=profile, concurrency=concurrency,
                                     connect_timeout=connect_timeout, read_timeout=read_timeout,
                                     max_attempts=attempts)}


KEY_ENV = "MODELFS_ENCRYPTION_KEY_FILE"


def _shared_option(flag: str, key: str, doc: str, **kw):
    """An option that is a mount setting (``key``) and that other commands take too:
    ``mount`` gets it as its setting (``expose=True``); the others keep it in ctx.obj."""
    def factory(f=None, *, expose: bool = False):
        def remember(ctx: click.Context, _param, value):
            if value:  # None, or () for a repeatable option not given
                ctx.ensure_object(dict)[key] = value
            return value or None

        def decorate(f):
            return click.option(flag, key, type=click.Path(dir_okay=False, path_type=Path), expose_value=expose,
                                callback=None if expose else remember, help=KEYS[key].doc, **kw)(f)
        return decorate(f) if f is not None else decorate
    factory.__doc__ = doc
    return factory


_encryption_option = _shared_option(
    "--encryption-key", "encryption_key_file",
    "``--encryption-key FILE`` (or $MODELFS_ENCRYPTION_KEY_FILE), on every command that opens a registry.",
    envvar=KEY_ENV)
_trust_option = _shared_option(
    "--trusted-key", "trusted_keys", "``--trusted-key PEM`` (repeatable), on every command that reads a version.",
    multiple=True)


def _sign_key_option(what: str, *, required: bool = False):
    """``--sign-key PEM``: the private key of publish, sign and tag."""
    return click.option("--sign-key", required=required, type=click.Path(dir_okay=False, path_type=Path),
                        help=f"Private key (PEM, elliptic curve) that signs {what}.")


def _key(ctx: click.Context):
    """The registry key the command was given, if any (loaded once)."""
    from .format.encryption import RegistryKey

    if "encryption_key" not in ctx.obj:
        path = ctx.obj.get("encryption_key_file")
        ctx.obj["encryption_key"] = RegistryKey.load(path) if path is not None else None
    return ctx.obj["encryption_key"]


def _registry(ctx: click.Context, ref: RegistryRef, *, creating: bool = False, dry_run: bool = False) -> Registry:
    return open_registry(ref, ctx.obj["config"], _key(ctx), creating=creating, dry_run=dry_run)


def _origin(ctx: click.Context, m: Manifest, registry_url: str | None) -> Registry:
    return origin_registry(m, registry_url, ctx.obj["config"], _key(ctx))


def _trust(ctx: click.Context):
    """The trusted public keys the command was given, if any (loaded once)."""
    from .format.trust import TrustedKeys

    if "trust" not in ctx.obj:
        paths = ctx.obj.get("trusted_keys")
        ctx.obj["trust"] = TrustedKeys(paths) if paths else None
    return ctx.obj["trust"]


def _resolve(ctx: click.Context, ref: str, registry_url: str | None = None, *, need_registry: bool = False,
             cache: BlockCache | None = None, sealed: bool = False) -> tuple[Catalog | None, str, Manifest]:
    """A model ref (s3://…/NAME@SEL) or a local manifest file → (catalog, version, manifest).

    With --trusted-key the version (and the tag, if REF names one) must verify first.
    A manifest file gets its registry (its origin, or --registry) only when the command
    needs one or has trusted keys (the signature lives there). With ``cache`` (prefetch),
    what was resolved is recorded there (``sealed``: encrypted), so a mount of it can
    start while the store is down."""
    trust = _trust(ctx)
    if ref.startswith("s3://"):
        mref = parse_model(ref)
        catalog = Catalog(_registry(ctx, mref.registry), cache, trust, sealed=sealed)
        version, manifest = catalog.resolve(mref)
        return catalog, version, manifest
    manifest = read_manifest_file(ref)
    if not (need_registry or trust is not None or registry_url):
        return None, manifest.version_id, manifest
    catalog = Catalog(_origin(ctx, manifest, registry_url), cache, trust, sealed=sealed)
    catalog.verify(manifest, manifest.version_id)
    catalog.keep_manifest(manifest)
    return catalog, manifest.version_id, manifest


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
@_sign_key_option("the version and its tags (OpenSSF model signing)")
@_encryption_option
@click.pass_context
def publish(ctx, src: Path, registry: str, name: str, tags, dry_run, no_compress, manifest_out, quiet,
            sign_key: Path | None):
    """Publish directory SRC as a new version of model NAME in REGISTRY (s3://BUCKET/PREFIX)."""
    from .ops.publish import Publisher, scan
    from .format.trust import SigningKey

    signer = SigningKey(sign_key) if sign_key is not None else None  # a bad key fails before any upload

    reg = _registry(ctx, parse_registry(registry), creating=True, dry_run=dry_run)
    tag_list = list(dict.fromkeys(["latest", *tags]))
    bar = Progress("publish", enabled=False if quiet else None)
    tree = scan(src)
    bar.start(sum(f.size for f in tree[0]))

    def progress(n, stats):
        bar.advance(n, f"new {fmt_bytes(stats.uploaded_bytes)}, reused {stats.reused_chunks} chunks")

    pub = Publisher(reg, concurrency=ctx.obj["config"].concurrency, dry_run=dry_run,
                    compress=not no_compress, on_progress=progress, signer=signer)
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
    if signer is not None and not dry_run:
        click.echo(f"  signed    by key {signer.key_id[:16]} (version and tags)")
    click.echo(f"  ref       {reg.ref}/{name}@{result.version}")


@main.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def keygen(path: Path):
    """Write a new random 256-bit registry key to PATH (mode 0600, never over a file).

    Publish with --encryption-key PATH to an empty prefix and it becomes an encrypted
    registry: chunks, manifests and tags are encrypted before upload. Every reader
    needs the same file; a lost key cannot be recovered."""
    from .format.encryption import RegistryKey

    key = RegistryKey.generate()
    key.save(path)
    click.echo(f"wrote a new registry key to {path} (key id {key.key_id}); keep it secret, and keep a copy")


@main.command()
@click.argument("ref")
@_sign_key_option("the version", required=True)
@_encryption_option
@click.pass_context
def sign(ctx, ref: str, sign_key: Path):
    """Sign the version REF names (s3://…/NAME@VERSION-OR-TAG), without reading its data.

    The signature (an OpenSSF model signing bundle over its files' SHA-256) is stored
    beside the manifest; mounts show it as model.sig and pull writes it, so
    `model_signing verify` works on either. Tags are signed by `modelfs tag --sign-key`."""
    from .format.trust import SigningKey, signed_files

    signer = SigningKey(sign_key)
    mref = parse_model(ref)
    reg = _registry(ctx, mref.registry)
    version, m = Catalog(reg).resolve(mref)
    reg.put_signature(m.name, version, signer.sign_version(m))
    click.echo(f"signed {m.name}@{version} ({count(len(signed_files(m)), 'file')}) with key {signer.key_id[:16]}")


@main.command()
@click.argument("ref")
@click.option("--registry", "registry_url", help="Registry holding the signature, when REF is a manifest file.")
@_trust_option
@_encryption_option
@click.pass_context
def verify(ctx, ref: str, registry_url: str | None):
    """Check that a trusted key signed version REF (and tag, if REF names one), reading no data.

    Exit 0 and one line when it verifies; one error line and a non-zero exit otherwise."""
    if _trust(ctx) is None:
        raise UsageError("verify needs --trusted-key PEM (repeatable)")
    cat, version, m = _resolve(ctx, ref, registry_url, need_registry=True)
    assert cat is not None
    what = f"{m.name}@{version}"
    if ref.startswith("s3://") and not parse_model(ref).is_version:
        what = f"{m.name}@{parse_model(ref).selector} -> {version} (tag signed)"
    click.echo(f"verified {what}: {count(len(m.files), 'file')} signed by trusted key {cat.signed_by[version][:16]}")


@main.command("ls")
@click.argument("registry")
@_trust_option
@_encryption_option
@click.pass_context
def ls_cmd(ctx, registry: str):
    """List the models in REGISTRY with their tags and versions."""
    reg = _registry(ctx, parse_registry(registry))
    reg.store.check_bucket()
    catalog = Catalog(reg, None, _trust(ctx))  # with --trusted-key: only what verifies (the rest logged)
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
@click.option("--json", "as_json", is_flag=True, help="Print the manifest itself.")
@_trust_option
@_encryption_option
@click.pass_context
def inspect(ctx, ref: str, as_json: bool):
    """Show what model REF holds: files, sizes, tensors (REF: s3://…/NAME@TAG or a manifest file)."""
    cat, version, m = _resolve(ctx, ref)
    if as_json:
        sys.stdout.write(m.to_bytes().decode())
        return
    t = m.totals()
    click.echo(f"{m.name}@{version}  created {m.created}")
    if cat is not None and version in cat.signed_by:
        click.echo(f"  signed by trusted key {cat.signed_by[version][:16]}")
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


@main.command("diff")
@click.argument("old")
@click.argument("new")
@click.option("--registry", "registry_url", help="Registry holding the chunks of manifest files without an origin.")
@click.option("--json", "as_json", is_flag=True, help="Print the diff as JSON.")
@click.option("--limit", default=20, show_default=True, help="Tensors listed per kind and file (all with --json).")
@_trust_option
@_encryption_option
@click.pass_context
def diff_cmd(ctx, old: str, new: str, registry_url: str | None, as_json: bool, limit: int):
    """What changed from version OLD to NEW (refs or manifest files): files, tensors, bytes to fetch."""
    from .describe.diff import diff

    sides = []
    for ref in (old, new):
        cat, version, m = _resolve(ctx, ref, registry_url)
        reg = cat.registry if cat is not None else _origin(ctx, m, None) if m.origin else None
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
    for f in d.added:
        click.echo(f"  + {f.path} ({fmt_bytes(f.size)})")
    for f in d.removed:
        click.echo(f"  - {f.path} ({fmt_bytes(f.size)})")
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
@click.argument("tag")
@_sign_key_option("the tag record")
@_encryption_option
@click.pass_context
def tag(ctx, ref: str, tag: str, sign_key: Path | None):
    """Point TAG of the model at the version REF names (s3://…/NAME@TAG-OR-VERSION).

    With --sign-key the tag record is signed, and its sequence (which goes up with
    every move) lets hosts that trust the key refuse an older record put back."""
    from .format.trust import SigningKey

    signer = SigningKey(sign_key) if sign_key is not None else None
    mref = parse_model(ref)
    reg = _registry(ctx, mref.registry)
    version, _ = Catalog(reg).resolve(mref)  # proves the version exists and is valid
    record = reg.set_tag(mref.name, tag, version, signer)
    click.echo(f"{mref.name}@{tag} -> {version}" + (f" (signed, sequence {record.sequence})" if signer else ""))


@main.command("rm")
@click.argument("ref")
@click.option("--force", is_flag=True, help="Also remove the tags that point at the version.")
@_encryption_option
@click.pass_context
def rm_cmd(ctx, ref: str, force: bool):
    """Retire version REF (s3://…/NAME@VERSION): delete its manifest; its chunks go at the next gc."""
    from .registry.lifecycle import remove_version

    mref = parse_model(ref)
    if not mref.is_version:
        raise UsageError(f"rm takes a version (NAME@<20-hex id>), not the tag {mref.selector!r}: "
                         "see the versions with modelfs ls")
    reg = _registry(ctx, mref.registry)
    r = remove_version(reg, mref.name, mref.selector, force=force)
    click.echo(f"removed {mref.name}@{r.version}" + (f" and its tags {', '.join(r.tags_removed)}"
                                                    if r.tags_removed else ""))
    if "latest" in r.tags_removed:
        click.echo(f"  latest -> {r.latest_moved_to}" if r.latest_moved_to else "  no version left: latest removed")
    click.echo("  its chunks stay until `modelfs gc` finds no other version using them")


@main.command("gc")
@click.argument("registry")
@click.option("--delete", is_flag=True, help="Delete the garbage (without it: a dry run that only reports).")
@click.option("--grace", default="24h", show_default=True,
              help="Only chunks written longer ago than this (s, m, h, d) are garbage.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_encryption_option
@click.pass_context
def gc_cmd(ctx, registry: str, delete: bool, grace: str, quiet: bool):
    """Find (and with --delete, remove) the chunks no version in REGISTRY references."""
    from .registry.lifecycle import collect
    from .units import parse_duration

    try:
        grace_s = parse_duration(grace)
    except ValueError as e:
        raise UsageError(f"--grace: {e}") from None
    reg = _registry(ctx, parse_registry(registry))
    reg.store.check_bucket()
    bar = Progress("gc: deleting", enabled=False if quiet or not delete else None)
    done = [-1]  # not started

    def progress(phase: str, n: int, total: int) -> None:
        if done[0] < 0:
            bar.start(total)
            done[0] = 0
        bar.advance(n - done[0])
        done[0] = n

    try:
        r = collect(reg, grace=grace_s, delete=delete, on_progress=progress)
    finally:
        bar.close()
    click.echo(f"{reg.ref}: {count(r.chunks, 'chunk')} ({fmt_bytes(r.stored_bytes)} stored), "
               f"{r.referenced} referenced by {count(sum(u.versions for u in r.models.values()), 'version')}")
    for name, u in sorted(r.models.items()):
        click.echo(f"  {name}: {count(u.versions, 'version')}, {count(u.chunks, 'chunk')}, {fmt_bytes(u.bytes)}")
    click.echo(f"  unreferenced: {count(r.unreferenced, 'chunk')} ({fmt_bytes(r.unreferenced_bytes)}); "
               f"{r.young} of them written within the grace period ({grace}): kept")
    if not delete:
        click.echo(f"  would delete: {count(len(r.candidates), 'chunk')} ({fmt_bytes(r.candidate_bytes)}); "
                   "run with --delete to delete them")
        return
    click.echo(f"  deleted: {count(r.deleted, 'chunk')} ({fmt_bytes(r.deleted_bytes)})"
               + (f"; {r.kept_on_recheck} kept on the re-check before deletion" if r.kept_on_recheck else ""))
    if r.stopped_by_lease:
        click.echo(f"  stopped: a publish is running ({r.stopped_by_lease}); "
                   f"{len(r.candidates) - r.deleted - r.kept_on_recheck} chunks left for a later gc")


@main.command()
@click.argument("ref")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--registry", "registry_url", help="Registry holding the chunks, when REF is a manifest file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="The host's block cache to copy chunks from (default: the mounts' default, if it exists).")
@click.option("--no-cache", is_flag=True, help="Fetch every chunk from the store, even ones the host's cache holds.")
@_trust_option
@_encryption_option
@click.pass_context
def pull(ctx, ref: str, dest: Path, registry_url: str | None, quiet: bool, cache_dir: Path | None,
         no_cache: bool):
    """Download model REF into DEST, verified, in parallel (chunks the host's cache holds are copied from it)."""
    from .ops.pull import pull as do_pull

    cat, version, m = _resolve(ctx, ref, registry_url, need_registry=True)
    assert cat is not None
    reg = cat.registry
    cache = None if no_cache else _host_cache(cache_dir)
    bar = Progress("pull", enabled=False if quiet else None)
    bar.start(m.totals()["bytes"])
    t0 = time.monotonic()
    try:
        stats = do_pull(reg, m, dest, concurrency=ctx.obj["config"].concurrency, on_progress=bar.advance,
                        signature=cat.signature(m.name, version), cache=cache)
    finally:
        bar.close()
        if cache is not None:
            cache.close()
    dt = time.monotonic() - t0
    click.echo(f"pulled {m.name}@{version} into {dest}: {stats.files} files written, "
               f"{stats.skipped_files} already complete, {fmt_bytes(stats.fetched_bytes)} fetched, "
               f"{fmt_bytes(stats.cached_bytes)} from the host's cache, in {dt:.1f} s")


def _host_cache(cache_dir: Path | None) -> BlockCache | None:
    """The cache named by ``--cache-dir`` (an error if there is none), else the default one
    if it exists. A cache that cannot be opened is not worth failing a pull for."""
    from .cache import default_cache_dir

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


class _Size(click.ParamType):
    """``20G``, ``512M`` … → bytes; a bad value is the usual one-line ``--option: why`` error."""
    name = "size"

    def convert(self, value, param, ctx):
        from .errors import UsageError
        from .units import parse_size

        try:
            return parse_size(value)
        except ValueError as e:
            raise UsageError(f"{param.opts[0] if param else 'size'}: {e}") from None


SIZE = _Size()


def _help(name: str) -> str:
    """A mount option's help: the config key's own doc (one text for flag, file and docs)."""
    d = DEFAULTS[name]
    return KEYS[name].doc + (f" [default: {d}]" if d not in (None, False, 0) else "")


@main.command()
@click.argument("source", required=False)
@click.argument("mountpoint", required=False, type=click.Path(path_type=Path))
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML file with any of these settings (flags win over it); see docs/operations.md.")
@click.option("--registry", help=_help("registry"))
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), help=_help("cache_dir"))
@click.option("--cache-size", help=_help("cache_size"))
@click.option("--memory-cache", help=_help("memory_cache"))
@click.option("--fetch-workers", type=int, help=_help("fetch_workers"))
@click.option("--readahead", help=_help("readahead"))
@click.option("--readahead-order", type=click.Choice(["tensors", "file"]), help=_help("readahead_order"))
@click.option("--fetch-timeout", type=float, help=_help("fetch_timeout"))
@click.option("--metadata-ttl", type=float, help=_help("metadata_ttl"))
@click.option("--kernel-readahead-kb", type=int, help=_help("kernel_readahead_kb"))
@click.option("--allow-other/--no-allow-other", default=None, help=_help("allow_other"))
@click.option("--nonempty/--no-nonempty", default=None, help=_help("nonempty"))
@click.option("--metrics-port", type=int, help=_help("metrics_port"))
@click.option("--metrics-address", help=_help("metrics_address"))
@_trust_option(expose=True)
@_encryption_option(expose=True)
@click.option("--encrypt-cache/--no-encrypt-cache", default=None, help=_help("encrypt_cache"))
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
    from .config import resolve
    from .mount.daemon import MountConfig, run_foreground, start_background
    from .mount.mountpoint import check_mountpoint

    given = {**ctx.obj["given"], **{k: v for k, v in flags.items() if v not in (None, ())}}
    if source is not None:
        given["source"] = source
    if mountpoint is not None:
        given["mountpoint"] = str(mountpoint)
    settings = resolve(config_file, given)
    logs.setup(settings["log_level"])  # the config file may name one
    cfg = MountConfig.from_settings(settings)
    if foreground:
        run_foreground(cfg, ready_fd)
        return
    check_mountpoint(cfg.mountpoint, cfg.nonempty)  # fail fast, before starting anything
    slug = str(cfg.mountpoint).strip("/").replace("/", "_") or "root"
    log_path = cfg.cache_dir / "logs" / f"mount-{slug}.log"
    pid = start_background(sys.argv[1:], log_path, cfg.start_timeout())
    click.echo(f"mounted {cfg.source} at {cfg.mountpoint} (pid {pid}; log {log_path})")


@main.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def stats(mountpoint: Path, as_json: bool):
    """Live figures of the daemon serving MOUNTPOINT (or any path on it)."""
    from .mount.metrics import read_stats

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
    from .mount.mountpoint import unmount_and_wait

    r = unmount_and_wait(mountpoint, lazy, timeout)
    click.echo(f"unmounted {mountpoint}")
    if r.still_running and not lazy:
        where = (f": {', '.join(r.other_mounts)}" if r.other_mounts
                 else " (bind mounts in another mount namespace, e.g. a container's)")
        click.echo(f"modelfs: warning: its daemon (pid {r.pid}) keeps serving other mounts of the same "
                   f"filesystem{where}; it exits when they are unmounted", err=True)


# -- cache tools --------------------------------------------------------------------

_cache_dir_option = click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
                                 help=_help("cache_dir"))


def _open_cache(cache_dir: Path | None):
    from .cache import default_cache_dir

    return BlockCache.open_existing(cache_dir or default_cache_dir())


@main.group()
def cache():
    """Inspect, verify and prune a block cache (safe while mounts use it)."""


@cache.command("stats")
@_cache_dir_option
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
@_cache_dir_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def cache_verify(cache_dir, quiet):
    """Re-hash every cached chunk; drop damaged ones (a mount refetches them). Exit 1 if any were."""
    c = _open_cache(cache_dir)
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
@_cache_dir_option
@click.option("--max-size", type=SIZE, help="Drop least recently used chunks until the cache uses at most this (e.g. 10G).")
@click.option("--all", "drop_all", is_flag=True, help="Drop every chunk and manifest.")
def cache_prune(cache_dir, max_size, drop_all):
    """Free cache space now (mounts evict on their own past --cache-size)."""
    from .errors import UsageError

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
    from .mount.fs import XATTR_PREFIX

    if not os.path.isfile(path):
        return False
    try:
        return not any(a.startswith(XATTR_PREFIX) for a in os.listxattr(path))
    except OSError:
        return True


@main.command()
@click.argument("targets", nargs=-1, required=True)
@_cache_dir_option
@click.option("--cache-size", "cap", type=SIZE, default=DEFAULTS["cache_size"], show_default=True,
              help="Cap of the cache (by ref), as the mounts that use it have.")
@click.option("--registry", "registry_url", help="Registry holding the chunks, when a target is a manifest file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--encrypt-cache", is_flag=True,
              help="Warm the encrypted cache that mounts with --encrypt-cache read (<cache_dir>/sealed).")
@_trust_option
@_encryption_option
@click.pass_context
def prefetch(ctx, targets, cache_dir, cap, registry_url, quiet, encrypt_cache):
    """Warm the cache before traffic arrives.

    TARGETS are either model refs (s3://…/NAME@TAG, or manifest files), whose
    chunks go straight into the block cache (no mount needed), or files and
    directories on a running mount, which are read through it.
    """
    from .cache import cache_root, default_cache_dir
    from .ops.prefetch import files_under, read_through, warm_cache

    refs = [t for t in targets if t.startswith("s3://") or _is_manifest_file(t)]
    paths = [Path(t) for t in targets if t not in refs]
    t0 = time.monotonic()
    if encrypt_cache and _key(ctx) is None:
        raise UsageError("--encrypt-cache needs the registry's key: pass --encryption-key FILE too")
    if refs:
        c = BlockCache(cache_root(cache_dir or default_cache_dir(), sealed=encrypt_cache), cap)
        try:
            for ref in refs:
                cat, version, m = _resolve(ctx, ref, registry_url, need_registry=True, cache=c, sealed=encrypt_cache)
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
                                    sealed=encrypt_cache, on_progress=bar.advance)
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


if __name__ == "__main__":
    main()
