"""The ``modelfs`` group and what its commands share: global options, the options several
commands take, and turning them into a registry, a key, trusted keys or a resolved ref.

Errors a user can cause become one ``modelfs: error: ...`` line and a non-zero exit;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .. import __version__, logs
from ..config import DEFAULTS, KEYS, LOG_LEVELS, TRANSFER_CONCURRENCY, StoreConfig, Timeouts
from ..errors import ModelfsError, UsageError

if TYPE_CHECKING:  # imported where used: a command that needs no store (mount's parent,
    # stats, unmount, cache) does not pay for boto3 (~0.25 s of a ~0.4 s start)
    from ..cache import BlockCache
    from ..format.manifest import Manifest
    from ..format.refs import RegistryRef
    from ..registry.catalog import Catalog
    from ..registry.layout import Registry


_SECONDS = click.FloatRange(0, 86400, min_open=True)  # the same bound as a config file's seconds


class _Cli(click.Group):
    """No command ends in a traceback without ``--debug``: a ModelfsError is its one line, an
    OSError says what failed on which path, anything else is named as a bug; Ctrl-C exits 130.
    A command's objects are frozen out of the collector when it ends (see :meth:`invoke`)."""

    def invoke(self, ctx: click.Context):
        try:
            return self._invoke(ctx)
        finally:
            # what is left (boto3's and botocore's models, the imports) dies with the process:
            # interpreter shutdown would otherwise walk it all in a last collection, 0.15–0.2 s
            # of every command that used the store (measured: `adopt` exited 0.19 s after its
            # last request, 0.015 s with this); files and temporary directories are closed and
            # removed by their owners before this, and atexit handlers still run
            gc.freeze()

    def _invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click's own: usage errors, --help, exits
        except KeyboardInterrupt:
            click.echo("modelfs: interrupted", err=True)
            ctx.exit(130)
        except Exception as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"modelfs: error: {_one_line(e)}", err=True)
            ctx.exit(e.exit_code if isinstance(e, ModelfsError) else 1)


def _one_line(e: Exception) -> str:
    if isinstance(e, ModelfsError):
        return str(e)
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return (f"unexpected {type(e).__name__}: {e} (a bug: please report it with the output of "
            "the same command with --debug)")


def check_output_file(path: Path, flag: str) -> None:
    """Refuse an output path that cannot be written, before anything else is done."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory")
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"{flag} {path}: not writable")


def write_atomically(path: Path, data: bytes) -> None:
    """``data`` into ``path`` whole or not at all (a temporary file beside it, then a rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="modelfs")
@click.option("--endpoint-url", envvar="AWS_ENDPOINT_URL", help="S3 endpoint (default: AWS, or $AWS_ENDPOINT_URL).")
@click.option("--region", help="Region (default: $AWS_REGION, $AWS_DEFAULT_REGION or the profile's).")
@click.option("--profile", help="AWS profile (default: $AWS_PROFILE).")
@click.option("--concurrency", "-j", default=TRANSFER_CONCURRENCY, show_default=True,
              type=click.IntRange(1, 256),
              help="Parallel transfers (a mount's default: four per core, from 8 to 16).")
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
                                     timeouts=Timeouts(connect_timeout, read_timeout, attempts))}


KEY_ENV = "MODELFS_ENCRYPTION_KEY_FILE"


def shared_option(flag: str, key: str, doc: str, *, type=click.Path(dir_okay=False, path_type=Path), **kw):
    """An option that is a mount setting (``key``) and that other commands take too:
    ``mount`` gets it as its setting (``expose=True``); the others keep it in ctx.obj."""
    def factory(f=None, *, expose: bool = False):
        def remember(ctx: click.Context, _param, value):
            if value:  # None, or () for a repeatable option not given
                ctx.ensure_object(dict)[key] = value
            return value or None

        def decorate(f):
            return click.option(flag, key, type=type, expose_value=expose,
                                callback=None if expose else remember, help=KEYS[key].doc, **kw)(f)
        return decorate(f) if f is not None else decorate
    factory.__doc__ = doc
    return factory


encryption_option = shared_option(
    "--encryption-key", "encryption_key_file",
    "``--encryption-key FILE`` (or $MODELFS_ENCRYPTION_KEY_FILE), on every command that opens a registry.",
    envvar=KEY_ENV)
trust_option = shared_option(
    "--trusted-key", "trusted_keys", "``--trusted-key PEM`` (repeatable), on every command that reads a version.",
    multiple=True)

tier_option = shared_option(
    "--cache-tier", "cache_tier", "``--cache-tier URL`` (repeatable), on every command that fetches chunks.",
    type=str, multiple=True)


def cache_tier(ctx: click.Context) -> tuple[str, ...]:
    """The cache tier nodes the command was given (checked as the mount setting is)."""
    value = ctx.obj.get("cache_tier")
    if not value:
        return ()
    try:
        return KEYS["cache_tier"].parse(value)
    except ValueError as e:
        raise UsageError(f"--cache-tier: {e}") from None


def sign_key_option(what: str, *, required: bool = False):
    """``--sign-key PEM``: the private key of publish, sign and tag."""
    return click.option("--sign-key", required=required, type=click.Path(dir_okay=False, path_type=Path),
                        help=f"Private key (PEM, elliptic curve) that signs {what}.")


def registry_key(ctx: click.Context):
    """The registry key the command was given, if any (loaded once)."""
    from ..format.encryption import RegistryKey

    if "encryption_key" not in ctx.obj:
        path = ctx.obj.get("encryption_key_file")
        ctx.obj["encryption_key"] = RegistryKey.load(path) if path is not None else None
    return ctx.obj["encryption_key"]


def registry_of(ctx: click.Context, ref: RegistryRef, *, creating: bool = False, dry_run: bool = False) -> Registry:
    from ..registry.layout import open_registry

    return open_registry(ref, ctx.obj["config"], registry_key(ctx), creating=creating, dry_run=dry_run)


def origin_of(ctx: click.Context, m: Manifest, registry_url: str | None) -> Registry:
    from ..registry.layout import origin_registry

    return origin_registry(m, registry_url, ctx.obj["config"], registry_key(ctx))


def trusted_keys(ctx: click.Context):
    """The trusted public keys the command was given, if any (loaded once)."""
    from ..format.trust import TrustedKeys

    if "trust" not in ctx.obj:
        paths = ctx.obj.get("trusted_keys")
        ctx.obj["trust"] = TrustedKeys(paths) if paths else None
    return ctx.obj["trust"]


def resolve_ref(ctx: click.Context, ref: str, registry_url: str | None = None, *, need_registry: bool = False,
                cache: BlockCache | None = None, sealed: bool = False) -> tuple[Catalog | None, str, Manifest]:
    """A model ref (s3://…/NAME@SEL) or a local manifest file → (catalog, version, manifest),
    by :func:`modelfs.registry.source.resolve` with the command's key and trusted keys."""
    from ..registry.source import resolve

    src = resolve(ref, ctx.obj["config"], key=registry_key(ctx), trust=trusted_keys(ctx), registry_url=registry_url,
                  cache=cache, sealed=sealed, need_registry=need_registry)
    assert src.version is not None and src.manifest is not None
    return src.catalog, src.version, src.manifest


class _Size(click.ParamType):
    """``20G``, ``512M`` … → bytes; a bad value is the usual one-line ``--option: why`` error."""
    name = "size"

    def convert(self, value, param, ctx):
        from ..units import parse_size

        try:
            return parse_size(value)
        except ValueError as e:
            raise UsageError(f"{param.opts[0] if param else 'size'}: {e}") from None


SIZE = _Size()


def setting_help(name: str) -> str:
    """A mount option's help: the config key's own doc (one text for flag, file and docs)."""
    d = DEFAULTS[name]
    return KEYS[name].doc + (f" [default: {d}]" if d not in (None, False, 0) else "")


cache_dir_option = click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
                                 help=setting_help("cache_dir"))
