"""Signed versions and tags: who may make hosts serve which weights.

A version's signature is an OpenSSF model signing bundle (``model-signing``,
elliptic-curve key pairs, no network): a DSSE envelope over an in-toto statement
that lists every file's SHA-256 — the digests the manifest already holds, so
signing and verifying read no model data. It is exactly what ``model_signing
sign key`` writes for the same directory, which is why ``model_signing verify``
succeeds on a pulled or mounted version (``model.sig`` at its root): the files
model_signing's verifier skips (top-level ``.git*`` and ``model.sig``) are left
out of the statement, and the skip list is recorded in it, as its CLI does.

A tag record may carry a signature too (ECDSA with the same key, over its model,
tag, version and ``sequence``): the sequence goes up with every move, so a writer
to the bucket who puts back an older, validly signed record is caught by any host
that saw a later one (:class:`~modelfs.registry.catalog.Catalog` keeps the last sequence in
the host's cache, across restarts).

``model-signing`` is imported lazily: it pulls in sigstore, which costs ~0.5 s at
import, and only signing and ``--trusted-key`` need it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import TrustError, UsageError
from .manifest import Manifest

SIGNATURE_FILE = "model.sig"
# what model_signing's verifier skips at the top of a model directory (its CLI records the same list)
IGNORED_PATHS = (".git", ".gitignore", ".github", ".gitattributes", SIGNATURE_FILE)
TAG_SIGNATURE_FORMAT = "modelfs-tag-signature-v1"
_CURVES = {"secp256r1": hashes.SHA256, "secp384r1": hashes.SHA384, "secp521r1": hashes.SHA512}


def subject(m: Manifest) -> str:
    """What a version's signature is made for: ``NAME@VERSION``."""
    return f"{m.name}@{m.version_id}"


def signed_files(m: Manifest) -> dict[str, str]:
    """path → SHA-256 of the files a signature of ``m`` lists (all but the ignored ones)."""
    return {f.path: f.sha256 for f in m.files if f.path.split("/", 1)[0] not in IGNORED_PATHS}


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 of the public key's PEM: the id model_signing puts in a bundle's key hint."""
    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def _hash_for(public_key: ec.EllipticCurvePublicKey, path: Path) -> hashes.HashAlgorithm:
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name not in _CURVES:
        raise UsageError(f"{path}: only elliptic-curve keys on P-256, P-384 or P-521 can sign models "
                         "(what model_signing's key signer takes)")
    return _CURVES[public_key.curve.name]()


def _read_pem(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(64 << 10)
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror}") from None


def tag_payload(model: str, tag: str, version: str, sequence: int) -> bytes:
    """The bytes a tag signature covers (canonical JSON; the registry's location is left
    out so that a registry copied elsewhere keeps its signatures)."""
    return json.dumps({"format": "modelfs-tag", "model": model, "tag": tag, "version": version,
                       "sequence": sequence}, sort_keys=True, separators=(",", ":")).encode()


class SigningKey:
    """A private key (PEM) that signs versions and tag records."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            key = serialization.load_pem_private_key(_read_pem(self.path, "signing key"), password=None)
        except (ValueError, TypeError) as e:
            raise UsageError(f"{self.path} is not an unencrypted PEM private key ({e})") from None
        self._hash = _hash_for(key.public_key(), self.path)
        self._key = key
        self.key_id = key_id(key.public_key())

    def sign_version(self, m: Manifest) -> bytes:
        """A model_signing bundle (JSON) over the files' SHA-256 digests of ``m``."""
        from model_signing import manifest as ms_manifest
        from model_signing._hashing import hashing
        from model_signing._signing import sign_ec_key
        from model_signing._signing import signing as ms_signing

        if m.file(SIGNATURE_FILE) is not None:
            raise UsageError(f"{m.name}@{m.version_id} has a file named {SIGNATURE_FILE} at its root, where "
                             "its signature would go: rename it and publish again")
        items = [ms_manifest.FileManifestItem(path=PurePosixPath(p), digest=hashing.Digest("sha256", bytes.fromhex(h)))
                 for p, h in sorted(signed_files(m).items())]
        serialization_type = ms_manifest._FileSerialization("sha256", allow_symlinks=False,
                                                             ignore_paths=list(IGNORED_PATHS))
        # the statement's subject names the version: its id is the manifest's hash, so the
        # signature covers the chunk lists too, not only the files' digests
        payload = ms_signing.Payload(ms_manifest.Manifest(subject(m), items, serialization_type))
        return sign_ec_key.Signer(self.path).sign(payload).bundle.to_json().encode()

    def sign_tag(self, model: str, tag: str, version: str, sequence: int) -> dict[str, str]:
        sig = self._key.sign(tag_payload(model, tag, version, sequence), ec.ECDSA(self._hash))
        return {"format": TAG_SIGNATURE_FORMAT, "key_id": self.key_id, "sig": base64.b64encode(sig).decode()}


@dataclass(frozen=True)
class _Trusted:
    path: Path
    key: ec.EllipticCurvePublicKey
    hash: hashes.HashAlgorithm


class TrustedKeys:
    """Public keys whose signatures a host accepts. Every refusal is a :class:`TrustError`
    with one line that says what was wrong, before any byte of the version is served."""

    def __init__(self, paths: list[Path] | tuple[Path, ...]):
        self._keys: dict[str, _Trusted] = {}
        for p in paths:
            p = Path(p)
            try:
                key = serialization.load_pem_public_key(_read_pem(p, "trusted key"))
            except (ValueError, TypeError) as e:
                raise UsageError(f"{p} is not a PEM public key ({e})") from None
            self._keys[key_id(key)] = _Trusted(p, key, _hash_for(key, p))
        if not self._keys:
            raise UsageError("no trusted key given")

    @property
    def ids(self) -> list[str]:
        return sorted(self._keys)

    def verify_version(self, m: Manifest, signature: bytes | None, what: str) -> str:
        """The id of the trusted key that signed exactly ``m``'s files; TrustError otherwise."""
        if signature is None:
            raise TrustError(f"{what} is not signed, and --trusted-key accepts only signed versions")
        try:
            doc = json.loads(signature)
            hint = doc["verificationMaterial"]["publicKey"]["hint"]
            if not isinstance(hint, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise TrustError(f"the signature of {what} is malformed") from None
        trusted = self._keys.get(hint)
        if trusted is None:
            raise TrustError(f"{what} is signed by key {hint[:16]}, which is not a trusted key")
        name, signed = self._verified_files(signature, trusted, what)
        ours = signed_files(m)
        if signed != ours:
            diff = sorted(set(signed.items()) ^ set(ours.items()))
            raise TrustError(f"the signature of {what} does not match its manifest "
                             f"({len(diff)} differences, first: {diff[0][0]!r})")
        if name != subject(m):
            # the same files and digests, another manifest (other chunks): a borrowed signature
            raise TrustError(f"the signature of {what} was made for {name[:80]!r}, not for this version")
        return hint

    def _verified_files(self, signature: bytes, trusted: _Trusted, what: str) -> tuple[str, dict[str, str]]:
        """(the statement's subject, path → SHA-256) of a signature that verifies."""
        from model_signing._signing import sign_ec_key
        from model_signing._signing import sign_sigstore_pb

        with tempfile.NamedTemporaryFile(prefix="modelfs-sig-") as f:  # model_signing reads bundles from files
            f.write(signature)
            f.flush()
            try:
                sig = sign_sigstore_pb.Signature.read(Path(f.name))
                signed = sign_ec_key.Verifier(trusted.path).verify(sig)
            except InvalidSignature:
                raise TrustError(f"the signature of {what} does not verify with trusted key "
                                 f"{key_id(trusted.key)[:16]}") from None
            except Exception as e:  # model_signing raises ValueError, KeyError, protobuf and JSON errors
                raise TrustError(f"the signature of {what} does not verify: {type(e).__name__}: "
                                 f"{str(e)[:200]}") from None
        out: dict[str, str] = {}
        for rd in signed.resource_descriptors():
            if rd.digest.algorithm != "sha256":
                raise TrustError(f"the signature of {what} uses {rd.digest.algorithm}, not sha256")
            out[str(rd.identifier)] = rd.digest.digest_hex
        return signed.model_name, out

    def verify_tag(self, model: str, tag: str, version: str, sequence: int, signature: Any) -> str:
        """The id of the trusted key that signed this tag record; TrustError otherwise."""
        what = f"tag {model}@{tag}"
        if signature is None:
            raise TrustError(f"{what} is not signed, and --trusted-key accepts only signed tags")
        try:
            if signature.get("format") != TAG_SIGNATURE_FORMAT:
                raise ValueError
            kid, raw = signature["key_id"], base64.b64decode(signature["sig"], validate=True)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise TrustError(f"the signature of {what} is malformed") from None
        trusted = self._keys.get(kid) if isinstance(kid, str) else None
        if trusted is None:
            raise TrustError(f"{what} is signed by key {str(kid)[:16]}, which is not a trusted key")
        try:
            trusted.key.verify(raw, tag_payload(model, tag, version, sequence), ec.ECDSA(trusted.hash))
        except InvalidSignature:
            raise TrustError(f"the signature of {what} does not verify (altered record)") from None
        return kid

