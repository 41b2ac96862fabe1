"""Commands that write a registry: publish, adopt, copy-in, tag, sign, rm, gc, and keygen for an encrypted one."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import ModelfsError, UsageError
from ..format.refs import parse_model, parse_registry
from ..units import count, fmt_bytes
from .app import check_output_file, encryption_option, main, registry_of, sign_key_option, write_atomically


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
@click.option("--allow-empty", is_flag=True, help="Publish (and tag) a version with no files.")
@click.option("--refuse-outside-links", is_flag=True,
              help="Fail if a symlink in SRC resolves outside it (default: follow it, and list it).")
@sign_key_option("the version and its tags (OpenSSF model signing)")
@encryption_option
@click.pass_context
def publish(ctx, src: Path, registry: str, name: str, tags, dry_run, no_compress, manifest_out, quiet,
            allow_empty: bool, refuse_outside_links: bool, sign_key: Path | None):
    """Publish directory SRC as a new version of model NAME in REGISTRY (s3://BUCKET/PREFIX).

    Symlinked files are followed (a Hugging Face cache snapshot is links into its blobs);
    those that resolve outside SRC are listed in the summary, or refused with
    --refuse-outside-links. An empty SRC is refused unless --allow-empty."""
    from ..ops.publish import Publisher, scan
    from ..format.trust import SigningKey

    # everything that can be refused is refused before the first upload
    signer = SigningKey(sign_key) if sign_key is not None else None
    if manifest_out is not None:  # a dry run says so too: the real run would fail
        check_output_file(manifest_out, "--manifest-out")
    tree = scan(src)
    files, outside = tree[0], [f for f in tree[0] if f.outside]
    if not files and not allow_empty:
        raise UsageError(f"{src} holds no files: nothing to publish (a mistyped path, an unmounted volume, a "
                         "failed build?); pass --allow-empty to publish an empty version")
    if outside and refuse_outside_links:
        listed = ", ".join(f"{f.path} -> {f.outside}" for f in outside[:3])
        more = f" and {len(outside) - 3} more" if len(outside) > 3 else ""
        raise UsageError(f"{count(len(outside), 'symlink')} in {src} resolve outside it ({listed}{more}): "
                         "refused (--refuse-outside-links)")

    reg = registry_of(ctx, parse_registry(registry), creating=True, dry_run=dry_run)
    tag_list = list(dict.fromkeys(["latest", *tags]))
    from ..progress import Progress

    bar = Progress("publish", enabled=False if quiet else None)
    bar.start(sum(f.size for f in files))

    def progress(n, stats):
        bar.advance(n, f"new {fmt_bytes(stats.uploaded_bytes)}, reused {stats.reused_chunks} chunks")

    pub = Publisher(reg, concurrency=ctx.obj["config"].concurrency, dry_run=dry_run,
                    compress=not no_compress, on_progress=progress, signer=signer)
    try:
        result = pub.run(tree, name, tag_list)
    finally:
        bar.close()
    s, m = result.stats, result.manifest
    if manifest_out and not dry_run:
        try:
            write_atomically(manifest_out, m.to_bytes())
        except OSError as e:  # checked before the upload, so rare: a full disk, a racing rm
            raise ModelfsError(f"published {name}@{result.version}, but the manifest could not be written "
                               f"to {manifest_out}: {e.strerror}; `modelfs inspect --json "
                               f"{reg.ref}/{name}@{result.version}` prints it") from None
    rate = s.bytes / s.seconds if s.seconds else 0
    head = "dry run: would publish" if dry_run else "published"
    click.echo(f"{head} {name}@{result.version}" + (f" (tags: {', '.join(result.tags)})" if result.tags else ""))
    click.echo(f"  files     {s.files} ({fmt_bytes(s.bytes)}), {s.chunks} chunks")
    click.echo(f"  {'to upload' if dry_run else 'uploaded '} {fmt_bytes(s.uploaded_bytes)} in {s.uploaded_chunks} chunks")
    click.echo(f"  reused    {s.reused_chunks} chunks ({fmt_bytes(s.reused_bytes)}) already in the store")
    click.echo(f"  took      {s.seconds:.1f} s ({fmt_bytes(rate)}/s)")
    if signer is not None and not dry_run:
        click.echo(f"  signed    by key {signer.key_id[:16]} (version and tags)")
    if outside:
        click.echo(f"  outside   {count(len(outside), 'symlink')} resolve outside {src} and "
                   f"{'would be' if dry_run else 'were'} published as files:")
        for f in outside:
            click.echo(f"              {f.path} -> {f.outside}")
    if manifest_out and dry_run:
        click.echo(f"  manifest  not written (dry run): {manifest_out}")
    click.echo(f"  ref       {reg.ref}/{name}@{result.version}")


@main.command()
@click.argument("checkout", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("registry")
@click.option("--name", required=True, help="Model name.")
@click.option("--tag", "tags", multiple=True, help="Tag to point at the new version (repeatable); 'latest' always moves.")
@click.option("--path", "subdir", help="Only what lies under this directory of the checkout (it becomes the root).")
@click.option("--remote", help="The DVC remote to read (default: the checkout's core.remote).")
@click.option("--lfs-store", metavar="s3://BUCKET/PREFIX", help="Where the Git LFS server keeps the objects.")
@click.option("--lfs-layout", type=click.Choice(["sharded", "flat"]), default="sharded", show_default=True,
              help="sharded: PREFIX/oid[0:2]/oid[2:4]/oid[4:] (Gitea, Forgejo, GitLab); flat: PREFIX/oid (giftless, "
                   "with the organisation and repository in PREFIX).")
@click.option("--lfs-endpoint", metavar="URL", help="The LFS store's S3 endpoint, when not the registry's.")
@click.option("--lfs-url", metavar="URL", help="The Git LFS server whose batch API says where each object is "
                                              "(default: the checkout's lfs.url or origin); without --lfs-store.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where objects are spooled while they are cut (default: the system's temporary directory).")
@click.option("--with-files", is_flag=True,
              help="Also publish the checkout's other files (configs, tokenizers Git keeps itself) as native files "
                   "of the version (uploaded; usually small).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.pass_context
def adopt(ctx, checkout: Path, registry: str, name: str, tags, subdir, remote, lfs_store, lfs_endpoint, lfs_url,
          lfs_layout, work_dir, with_files, quiet):
    """Make a version of NAME in REGISTRY from what a DVC or Git LFS CHECKOUT names, in place.

    Each object its .dvc files, dvc.lock and LFS pointers name is read once and cut into
    chunks as publish does, but no chunk is uploaded: mounts and pulls read the chunks
    as ranges of the DVC remote's or LFS store's objects, each verified (docs/adopt.md).
    Objects adopted before are not read again."""
    from ..ops.adopt import Adopter, plain_files
    from ..registry.adoption import plan
    from ..progress import Progress

    reg = registry_of(ctx, parse_registry(registry), creating=True)
    wanted = plan(reg, checkout, subdir=subdir, remote=remote, lfs_store=lfs_store, lfs_layout=lfs_layout,
                  lfs_endpoint=lfs_endpoint, lfs_url=lfs_url)
    plain = plain_files(checkout, wanted, subdir) if with_files else []
    tag_list = list(dict.fromkeys(["latest", *tags]))
    bar = Progress("adopt", enabled=False if quiet else None)
    bar.start(sum(w.size or 0 for w in wanted))
    adopter = Adopter(reg, concurrency=ctx.obj["config"].concurrency, work_dir=work_dir,
                      on_progress=lambda n, s: bar.advance(n, f"read {s.read_objects} objects"))
    try:
        result = adopter.run(wanted, name, tag_list, plain)
    finally:
        bar.close()
    s, m = result.stats, result.manifest
    click.echo(f"adopted {name}@{result.version} (tags: {', '.join(result.tags)})")
    click.echo(f"  files     {s.files} ({fmt_bytes(s.bytes)}), {m.totals()['chunks']} chunks")
    for src in m.sources:
        n = sum(1 for f in m.files if f.foreign is not None and m.sources[f.foreign.source] == src)
        click.echo(f"  from      {src.url}" + (f" at {src.endpoint}" if src.endpoint else "") +
                   f" ({src.kind}, {count(n, 'file')}, read in place)")
    if s.native_files:
        click.echo(f"  native    {count(s.native_files, 'file')} in the registry itself "
                   "(published with --with-files, or every chunk already there)")
    click.echo(f"  read      {count(s.read_objects, 'object')} ({fmt_bytes(s.read_bytes)}); "
               f"{s.known_objects} known from earlier adoptions")
    click.echo(f"  uploaded  {fmt_bytes(s.uploaded_bytes)} (manifest, adoption table"
               + (", the checkout's other files)" if with_files else ")"))
    click.echo(f"  took      {s.seconds:.1f} s")
    click.echo(f"  ref       {reg.ref}/{name}@{result.version}")


@main.command("copy-in")
@click.argument("ref")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.pass_context
def copy_in_cmd(ctx, ref: str, quiet: bool):
    """Copy adopted version REF's chunks from its DVC or Git LFS store into the registry.

    Writes the same files as a new native version and moves every tag that named REF's
    version to it, so the foreign store can be retired; the adopted version itself stays
    (and reads the foreign store) until `modelfs rm`."""
    from ..ops.adopt import copy_in
    from ..progress import Progress
    from ..registry.catalog import Catalog

    mref = parse_model(ref)
    reg = registry_of(ctx, mref.registry)
    version, m = Catalog(reg).resolve(mref)
    if not m.sources:
        raise UsageError(f"{m.name}@{version} is not an adopted version: its chunks are in the registry already")
    bar = Progress("copy-in", enabled=False if quiet else None)
    bar.start(sum(m.unique_chunks[h] for h in m.foreign_chunks))
    try:
        native, s = copy_in(reg, m, bar.advance)
    finally:
        bar.close()
    moved = [t for t, v in reg.tags(m.name).items() if v == version]
    for t in moved:
        reg.set_tag(m.name, t, native.version_id)
    click.echo(f"copied {m.name}@{version} in as {m.name}@{native.version_id}")
    click.echo(f"  chunks    {s.copied_chunks} copied ({fmt_bytes(s.copied_bytes)}), {s.present_chunks} already here")
    click.echo(f"  tags      {', '.join(moved) or 'none'} moved to {native.version_id}")
    click.echo(f"  ref       {reg.ref}/{m.name}@{native.version_id} (reads nothing outside the registry)")


@main.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def keygen(path: Path):
    """Write a new random 256-bit registry key to PATH (mode 0600, never over a file).

    Publish with --encryption-key PATH to an empty prefix and it becomes an encrypted
    registry: chunks, manifests and tags are encrypted before upload. Every reader
    needs the same file; a lost key cannot be recovered."""
    from ..format.encryption import RegistryKey

    key = RegistryKey.generate()
    key.save(path)
    click.echo(f"wrote a new registry key to {path} (key id {key.key_id}); keep it secret, and keep a copy")


@main.command()
@click.argument("ref")
@sign_key_option("the version", required=True)
@encryption_option
@click.pass_context
def sign(ctx, ref: str, sign_key: Path):
    """Sign the version REF names (s3://…/NAME@VERSION-OR-TAG), without reading its data.

    The signature (an OpenSSF model signing bundle over its files' SHA-256) is stored
    beside the manifest; mounts show it as model.sig and pull writes it, so
    `model_signing verify` works on either. Tags are signed by `modelfs tag --sign-key`."""
    from ..format.trust import SigningKey, signed_files

    signer = SigningKey(sign_key)
    mref = parse_model(ref)
    reg = registry_of(ctx, mref.registry)
    from ..registry.catalog import Catalog

    version, m = Catalog(reg).resolve(mref)
    reg.put_signature(m.name, version, signer.sign_version(m))
    click.echo(f"signed {m.name}@{version} ({count(len(signed_files(m)), 'file')}) with key {signer.key_id[:16]}")


@main.command()
@click.argument("ref")
@click.argument("tag")
@sign_key_option("the tag record")
@encryption_option
@click.pass_context
def tag(ctx, ref: str, tag: str, sign_key: Path | None):
    """Point TAG of the model at the version REF names (s3://…/NAME@TAG-OR-VERSION).

    With --sign-key the tag record is signed, and its sequence (which goes up with
    every move) lets hosts that trust the key refuse an older record put back."""
    from ..format.trust import SigningKey

    signer = SigningKey(sign_key) if sign_key is not None else None
    mref = parse_model(ref)
    reg = registry_of(ctx, mref.registry)
    from ..registry.catalog import Catalog

    version, _ = Catalog(reg).resolve(mref)  # proves the version exists and is valid
    record = reg.set_tag(mref.name, tag, version, signer)
    click.echo(f"{mref.name}@{tag} -> {version}" + (f" (signed, sequence {record.sequence})" if signer else ""))


@main.command("rm")
@click.argument("ref")
@click.option("--force", is_flag=True, help="Also remove the tags that point at the version.")
@encryption_option
@click.pass_context
def rm_cmd(ctx, ref: str, force: bool):
    """Retire version REF (s3://…/NAME@VERSION): delete its manifest; its chunks go at the next gc."""
    from ..registry.lifecycle import remove_version

    mref = parse_model(ref)
    if not mref.is_version:
        raise UsageError(f"rm takes a version (NAME@<20-hex id>), not the tag {mref.selector!r}: "
                         "see the versions with modelfs ls")
    reg = registry_of(ctx, mref.registry)
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
@encryption_option
@click.pass_context
def gc_cmd(ctx, registry: str, delete: bool, grace: str, quiet: bool):
    """Find (and with --delete, remove) the chunks no version in REGISTRY references."""
    from ..registry.lifecycle import collect
    from ..units import parse_duration

    try:
        grace_s = parse_duration(grace)
    except ValueError as e:
        raise UsageError(f"--grace: {e}") from None
    reg = registry_of(ctx, parse_registry(registry))
    reg.store.check_bucket()
    from ..progress import Progress

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
    for version, urls in sorted(r.adopted.items()):
        click.echo(f"  adopted {version}: reads {', '.join(urls)} in place (never touched by gc)")
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
