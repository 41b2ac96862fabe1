"""Registry keys and the AEAD that seals what an encrypted registry stores.

One 256-bit random key per registry (``modelfs keygen``). Nothing uses it
directly: HKDF-SHA256 derives one independent subkey per purpose, so a weakness
in one use cannot leak another:

    "chunk ids"        BLAKE3 keyed mode: a chunk's id (its object name)
    "chunk cipher"     AES-256-GCM over stored chunks
    "metadata cipher"  AES-256-GCM over manifests and tags
    "key id"           a public fingerprint (first 16 bytes, hex), kept in the
                       registry's marker object to tell a wrong key from a tamper

Every message gets a fresh random 96-bit nonce from the OS (never a counter, so
processes and hosts need no coordination); NIST SP 800-38D allows 2^32 messages
per key that way, i.e. ~16 PiB of 4 MiB chunks under one registry key. The
associated data binds a sealed object to where it lives (a chunk to its id, a
manifest or tag to its object key), so an object copied elsewhere does not open.
See docs/security.md for what someone with access to the bucket can still learn.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import IntegrityError, UsageError

KEY_BYTES = 32
KEY_LINE = "modelfs-registry-key-v1:"
NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD = NONCE_BYTES + TAG_BYTES  # what sealing adds to a message
SEALED_MAGIC = b"MFE1"  # sealed metadata objects (manifests, tags) start with this
_SALT = b"modelfs registry key v1"


@dataclass(frozen=True)
class RegistryKey:
    """A registry's secret key. Its bytes never appear in a repr, a log or a message."""

    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_BYTES:
            raise UsageError(f"a registry key is {KEY_BYTES} bytes, not {len(self.secret)}")

    @classmethod
    def generate(cls) -> RegistryKey:
        return cls(os.urandom(KEY_BYTES))

    def derive(self, purpose: str) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=_SALT,
                    info=purpose.encode()).derive(self.secret)

    @property
    def key_id(self) -> str:
        """A fingerprint that says which key this is and nothing about its bytes."""
        return self.derive("key id")[:16].hex()

    # -- files ---------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Write a new key file, mode 0600, never over an existing file."""
        text = ("# modelfs registry key: whoever holds this file can read and publish the\n"
                "# models of the registries it encrypts. Keep it secret; keep a copy.\n"
                f"{KEY_LINE}{base64.b64encode(self.secret).decode()}\n")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise UsageError(f"{path} already exists: a key file is never overwritten") from None
        except OSError as e:
            raise UsageError(f"cannot create key file {path}: {e.strerror}") from None
        with os.fdopen(fd, "w") as f:
            os.fchmod(fd, 0o600)  # whatever the umask
            f.write(text)
            f.flush()
            os.fsync(fd)

    @classmethod
    def load(cls, path: Path) -> RegistryKey:
        """The key in ``path`` (as ``modelfs keygen`` writes it), or one clear error."""
        try:
            with open(path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                data = f.read(4097)
        except OSError as e:
            raise UsageError(f"cannot read encryption key file {path}: {e.strerror}") from None
        if not stat.S_ISREG(mode) or len(data) > 4096:
            raise UsageError(f"{path} is not a modelfs key file")
        lines = [ln.strip() for ln in data.decode("utf-8", "replace").splitlines()]
        found = [ln[len(KEY_LINE):] for ln in lines if ln.startswith(KEY_LINE)]
        if len(found) != 1:
            raise UsageError(f"{path} is not a modelfs key file (make one with `modelfs keygen`)")
        try:
            secret = base64.b64decode(found[0], validate=True)
        except (binascii.Error, ValueError):
            secret = b""
        if len(secret) != KEY_BYTES:
            raise UsageError(f"{path} is damaged: its key is not {KEY_BYTES} bytes of base64")
        return cls(secret)


class Sealer:
    """AES-256-GCM under one derived subkey, a fresh random nonce per message.

    Sealed form: nonce (12 bytes) ‖ ciphertext ‖ tag (16 bytes)."""

    def __init__(self, key: bytes):
        self._aead = AESGCM(key)

    def seal(self, data: bytes | memoryview, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data, aad)

    def open(self, blob: bytes | memoryview, aad: bytes, what: str) -> bytes:
        """The plaintext, or IntegrityError when ``blob`` was altered, moved or sealed
        under another key (GCM cannot tell those apart, and need not)."""
        if len(blob) < OVERHEAD:
            raise IntegrityError(f"{what}: truncated ciphertext ({len(blob)} bytes)")
        mv = memoryview(blob)
        try:
            return self._aead.decrypt(mv[:NONCE_BYTES], mv[NONCE_BYTES:], aad)
        except InvalidTag:
            raise IntegrityError(f"{what}: does not decrypt (altered, moved, or sealed under another key)") \
                from None


class MetadataSealer:
    """Manifests and tags of an encrypted registry, bound to their object keys."""

    def __init__(self, key: RegistryKey):
        self._sealer = Sealer(key.derive("metadata cipher"))

    def seal(self, data: bytes, where: str) -> bytes:
        return SEALED_MAGIC + self._sealer.seal(data, where.encode())

    def open(self, blob: bytes, where: str) -> bytes:
        if not blob.startswith(SEALED_MAGIC):
            # only a writer without the key makes these: an encrypted registry never accepts them
            raise IntegrityError(f"{where} is not encrypted, in an encrypted registry (written without "
                                 "the key): refused")
        return self._sealer.open(memoryview(blob)[len(SEALED_MAGIC):], where.encode(), where)


def is_sealed(blob: bytes) -> bool:
    return blob.startswith(SEALED_MAGIC)
