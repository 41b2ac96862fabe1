"""Signed versions and tags (issue 11): keys and checks in-process, then real SeaweedFS + FUSE."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from modelfs.errors import TrustError, UsageError
from modelfs.format.manifest import FileEntry, Manifest, loads
from modelfs.format.trust import SigningKey, TrustedKeys, signed_files

from conftest import cli, one_line_error, tree_digest

MODEL_SIGNING = str(Path(sys.executable).parent / "model_signing")


def _keypair(d: Path, name: str, curve=ec.SECP256R1()) -> tuple[Path, Path]:
    key = ec.generate_private_key(curve)
    priv, pub = d / f"{name}.pem", d / f"{name}.pub.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


@pytest.fixture
def keys(tmp_path) -> dict[str, tuple[Path, Path]]:
    return {"release": _keypair(tmp_path, "release"), "other": _keypair(tmp_path, "other", ec.SECP384R1())}


def _manifest(files: dict[str, bytes]) -> Manifest:
    entries = tuple(FileEntry(p, len(b), 0o644, hashlib.sha256(b).hexdigest(),
                              ((hashlib.sha256(p.encode()).hexdigest(), len(b)),) if b else ())
                    for p, b in sorted(files.items()))
    return Manifest(name="m", created="2026-11-23T00:00:00Z", files=entries, directories=(), chunking={})


# -- in-process: what a signature covers and when it is refused ------------------------------

def test_version_signatures_cover_exactly_the_files_and_only_trusted_keys_pass(keys):
    m = _manifest({"a.bin": b"weights", "sub/b.json": b"{}", ".gitattributes": b"*.bin lfs", "empty": b""})
    assert sorted(signed_files(m)) == ["a.bin", "empty", "sub/b.json"]  # what model_signing verify hashes
    release, other = SigningKey(keys["release"][0]), SigningKey(keys["other"][0])
    sig = release.sign_version(m)
    trusted = TrustedKeys([keys["release"][1]])
    assert trusted.verify_version(m, sig, "m@v") == release.key_id
    assert TrustedKeys([keys["other"][1], keys["release"][1]]).verify_version(m, sig, "m@v") == release.key_id
    tampered = _manifest({"a.bin": b"weightz", "sub/b.json": b"{}", "empty": b""})
    doc = json.loads(sig)
    doc["verificationMaterial"]["publicKey"]["hint"] = other.key_id  # claims another (trusted) key
    cases = [
        (lambda: trusted.verify_version(m, None, "m@v"), "is not signed"),
        (lambda: trusted.verify_version(tampered, sig, "m@v"), "does not match its manifest"),
        (lambda: trusted.verify_version(m, other.sign_version(m), "m@v"), "not a trusted key"),
        (lambda: trusted.verify_version(m, b"{not json", "m@v"), "malformed"),
        (lambda: TrustedKeys([keys["other"][1]]).verify_version(m, json.dumps(doc).encode(), "m@v"),
         "does not verify"),
    ]
    for call, needle in cases:
        with pytest.raises(TrustError, match=needle):
            call()


def test_tag_signatures_bind_model_tag_version_and_sequence(keys):
    release = SigningKey(keys["release"][0])
    trusted = TrustedKeys([keys["release"][1]])
    sig = release.sign_tag("m", "prod", "a" * 20, 7)
    assert trusted.verify_tag("m", "prod", "a" * 20, 7, sig) == release.key_id
    for args in (("m", "prod", "b" * 20, 7), ("m", "prod", "a" * 20, 6), ("m", "staging", "a" * 20, 7)):
        with pytest.raises(TrustError, match="does not verify"):
            trusted.verify_tag(*args, sig)
    with pytest.raises(TrustError, match="not signed"):
        trusted.verify_tag("m", "prod", "a" * 20, 7, None)
    with pytest.raises(TrustError, match="not a trusted key"):
        trusted.verify_tag("m", "prod", "a" * 20, 7, SigningKey(keys["other"][0]).sign_tag("m", "prod", "a" * 20, 7))


def test_bad_key_files_are_one_clear_error(keys, tmp_path):
    (tmp_path / "junk.pem").write_text("hello")
    rsa = tmp_path / "rsa.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(rsa), "2048"], check=True, capture_output=True)
    for call, needle in ((lambda: SigningKey(tmp_path / "junk.pem"), "not an unencrypted PEM private key"),
                         (lambda: SigningKey(rsa), "only elliptic-curve keys"),
                         (lambda: SigningKey(tmp_path / "none.pem"), "cannot read signing key"),
                         (lambda: TrustedKeys([keys["release"][0]]), "not a PEM public key")):
        with pytest.raises(UsageError, match=needle):
            call()


# -- real store and mounts ---------------------------------------------------------------------

def _publish(env, src, reg, *extra) -> str:
    out = cli(env, "publish", str(src), reg, "--name", "m", "-q", *extra).stdout
    return out.split("@")[1].split()[0]


def _model_signing_verify(pub: Path, root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([MODEL_SIGNING, "verify", "key", "--signature", str(root / "model.sig"),
                           "--public_key", str(pub), str(root)], capture_output=True, text=True, timeout=300)


def test_signed_version_pulls_and_mounts_with_a_model_sig_that_model_signing_verifies(
        env, bucket, sample_model, keys, mounts, tmp_path):
    reg = f"s3://{bucket}/reg"
    priv, pub = keys["release"]
    version = _publish(env, sample_model, reg, "--tag", "prod", "--sign-key", str(priv))
    trust = ("--trusted-key", str(pub))
    out = cli(env, "verify", f"{reg}/m@prod", *trust).stdout
    assert f"m@prod -> {version} (tag signed)" in out and "signed by trusted key" in out
    dest = tmp_path / "pulled"
    cli(env, "pull", f"{reg}/m@prod", str(dest), "-q", *trust)
    want = tree_digest(sample_model)
    got = tree_digest(dest)
    assert got.pop("model.sig")[0] and got == want
    r = _model_signing_verify(pub, dest)
    assert r.returncode == 0, r.stdout + r.stderr
    victim = next(p for p in dest.iterdir() if p.suffix == ".safetensors")
    data = bytearray(victim.read_bytes())
    data[100] ^= 1
    victim.write_bytes(bytes(data))
    assert _model_signing_verify(pub, dest).returncode != 0  # one byte changed: refused
    mnt = mounts.mount(f"{reg}/m@prod", *trust)
    assert (mnt / "model.sig").read_bytes() == (dest / "model.sig").read_bytes()
    r = _model_signing_verify(pub, mnt)
    assert r.returncode == 0, r.stdout + r.stderr
    # without --trusted-key a mount still shows the signature: anyone can check it with model_signing
    plain = mounts.mount(f"{reg}/m@{version}")
    assert (plain / "model.sig").exists()
    # an existing, unsigned version signed later (no data read) verifies the same way
    later = _publish(env, sample_model, f"s3://{bucket}/later")
    one_line_error(cli(env, "verify", f"s3://{bucket}/later/m@{later}", *trust, check=False), "is not signed")
    assert "signed m@" in cli(env, "sign", f"s3://{bucket}/later/m", "--sign-key", str(priv)).stdout
    assert "verified" in cli(env, "verify", f"s3://{bucket}/later/m@{later}", *trust).stdout


def test_untrusted_unsigned_swapped_and_tampered_versions_are_refused(env, bucket, s3, sample_model, keys,
                                                                      mounts, tmp_path):
    reg = f"s3://{bucket}/reg"
    priv, pub = keys["release"]
    trust = ("--trusted-key", str(pub))
    signed = _publish(env, sample_model, reg, "--tag", "prod", "--sign-key", str(priv))
    changed = tmp_path / "changed"
    shutil.copytree(sample_model, changed)
    (changed / "config.json").write_text('{"changed": true}')
    unsigned = _publish(env, changed, reg, "--tag", "staging")
    _publish(env, changed, f"s3://{bucket}/reg2", "--sign-key", str(keys["other"][0]))
    sig_key = f"reg/models/m/signatures/{signed}.sig"
    # a copy of a good signature put beside another version
    swapped = _publish(env, changed, f"s3://{bucket}/reg3")
    s3.copy_object(Bucket=bucket, Key=f"reg3/models/m/signatures/{swapped}.sig",
                   CopySource={"Bucket": bucket, "Key": sig_key})
    # a manifest edited by someone with write access (one file's digest and chunks), the signature kept
    doc = json.loads(cli(env, "inspect", "--json", f"{reg}/m@{signed}").stdout)
    doc["files"][0]["sha256"] = "0" * 64
    forged = tmp_path / "forged.modelfs.json"
    forged.write_text(json.dumps(doc))
    cases = [
        (f"{reg}/m@{unsigned}", "is not signed"),
        (f"{reg}/m@staging", "is not signed"),  # an unsigned tag
        (f"s3://{bucket}/reg2/m", "not a trusted key"),
        (f"s3://{bucket}/reg3/m@{swapped}", "does not match its manifest"),
    ]
    for ref, needle in cases:
        one_line_error(cli(env, "verify", ref, *trust, check=False), needle)
        one_line_error(cli(env, "pull", ref, str(tmp_path / "p"), *trust, check=False), needle)
        assert not (tmp_path / "p").exists()
        mnt = tmp_path / f"mnt{len(ref)}-{needle[:3]}"
        mnt.mkdir()
        r = mounts.mount(ref, *trust, mnt=mnt, check=False)
        assert r.returncode != 0 and needle in r.stderr, r.stderr
        assert not os.path.ismount(mnt)
    # the forged manifest as a file (its id changes with its bytes: the signature is looked up
    # under the new id, where there is none) and with the good signature copied to that id
    one_line_error(cli(env, "verify", str(forged), *trust, check=False), "is not signed")
    forged_id = loads(forged.read_bytes()).version_id
    s3.copy_object(Bucket=bucket, Key=f"reg/models/m/signatures/{forged_id}.sig",
                   CopySource={"Bucket": bucket, "Key": sig_key})
    one_line_error(cli(env, "verify", str(forged), *trust, check=False), "does not match its manifest")
    # every file and digest kept, two chunks of a file swapped (other bytes would be served),
    # the good signature copied to the new id: the signature names the version it was made for
    doc = json.loads(cli(env, "inspect", "--json", f"{reg}/m@{signed}").stdout)
    big = max(doc["files"], key=lambda f: len(f["chunks"]))
    assert len(big["chunks"]) >= 2
    big["chunks"][0], big["chunks"][1] = big["chunks"][1], big["chunks"][0]
    borrowed = tmp_path / "borrowed.modelfs.json"
    borrowed.write_text(json.dumps(doc))
    borrowed_id = loads(borrowed.read_bytes()).version_id
    s3.copy_object(Bucket=bucket, Key=f"reg/models/m/signatures/{borrowed_id}.sig",
                   CopySource={"Bucket": bucket, "Key": sig_key})
    one_line_error(cli(env, "verify", str(borrowed), *trust, check=False), "was made for", signed)
    mnt = tmp_path / "mnt-borrowed"
    mnt.mkdir()
    r = mounts.mount(str(borrowed), *trust, mnt=mnt, check=False)
    assert r.returncode != 0 and "was made for" in r.stderr, r.stderr
    assert not os.path.ismount(mnt)
    # a registry mount with --trusted-key shows only what verifies
    whole = mounts.mount(reg, *trust)
    assert os.listdir(whole / "m" / "versions") == [signed]
    assert sorted(os.listdir(whole / "m")) == ["prod", "versions"]
    assert not (whole / "m" / "versions" / unsigned).exists()
    assert "model.sig" in os.listdir(whole / "m" / "prod")
    assert f"@{unsigned}" in cli(env, "ls", reg, *trust).stderr  # logged as hidden


def test_a_rolled_back_tag_is_refused_by_a_host_that_saw_a_later_one(env, bucket, s3, sample_model, keys,
                                                                    mounts, tmp_path):
    reg = f"s3://{bucket}/reg"
    priv, pub = keys["release"]
    trust = ("--trusted-key", str(pub))
    v1 = _publish(env, sample_model, reg, "--tag", "prod", "--sign-key", str(priv))
    old_record = s3.get_object(Bucket=bucket, Key="reg/models/m/tags/prod.json")["Body"].read()
    changed = tmp_path / "changed"
    shutil.copytree(sample_model, changed)
    (changed / "config.json").write_text('{"changed": true}')
    v2 = _publish(env, changed, reg, "--sign-key", str(priv))
    assert "signed, sequence" in cli(env, "tag", f"{reg}/m@{v2}", "prod", "--sign-key", str(priv)).stdout
    mnt = mounts.mount(f"{reg}/m@prod", *trust)
    assert os.getxattr(mnt, "user.modelfs.version").decode() == v2
    mounts.unmount(mnt)
    s3.put_object(Bucket=bucket, Key="reg/models/m/tags/prod.json", Body=old_record)  # validly signed, older
    # a host that never saw the later record cannot tell: the signature is good
    assert v1 in cli(env, "verify", f"{reg}/m@prod", *trust).stdout
    mnt2 = tmp_path / "again"
    mnt2.mkdir()
    time.sleep(1.1)  # past the TTL below: within it a restart would serve v2 as resolved, not ask
    r = mounts.mount(f"{reg}/m@prod", *trust, "--metadata-ttl", "1", mnt=mnt2, check=False)  # it saw v2's sequence
    assert r.returncode != 0 and "refused as a rollback" in r.stderr, r.stderr
    assert not os.path.ismount(mnt2)
    one_line_error(cli(env, "prefetch", f"{reg}/m@prod", "--cache-dir", str(mounts.cache_dir), *trust,
                       check=False), "refused as a rollback")
    # an unsigned record over a signed tag is refused as unsigned
    s3.put_object(Bucket=bucket, Key="reg/models/m/tags/prod.json",
                  Body=json.dumps({"format": "modelfs-tag", "version": v2, "sequence": 1 << 62}).encode())
    one_line_error(cli(env, "verify", f"{reg}/m@prod", *trust, check=False), "is not signed")
