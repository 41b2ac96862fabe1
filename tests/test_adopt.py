"""``modelfs adopt``: versions read in place from DVC remotes and Git LFS stores.

Real parts: ``dvc`` + ``dvc-s3`` (their own virtualenv, ``.venv-dvc``: their aiobotocore
pins botocore) pushing to the test SeaweedFS, Debian's ``git-lfs`` writing pointers, FUSE
mounts reading through them. The hostile inputs are checked in process.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import cli, gets, objects, one_line_error, ranged_gets, tree_digest
from modelfs.errors import ManifestError, UsageError
from modelfs.format import foreign
from modelfs.format.manifest import loads

ROOT = Path(__file__).resolve().parent.parent
DVC = ROOT / ".venv-dvc" / "bin" / "dvc"


# -- in process: what a checkout may say ------------------------------------------------------

@pytest.mark.parametrize("path", ["../outside", "/etc/passwd", "a/../../b", "nul\x00byte", ""])
def test_a_dvc_output_path_outside_the_checkout_is_refused(tmp_path, path):
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "m.dvc").write_text(json.dumps({"outs": [{"md5": "0" * 32, "size": 1, "hash": "md5",
                                                          "path": path}]}))
    with pytest.raises(UsageError, match="m.dvc"):
        foreign.dvc_outputs(tmp_path)


@pytest.mark.parametrize("out, needle", [
    ({"md5": "xyz", "size": 1, "path": "a"}, "32 hex"),
    ({"md5": "0" * 32, "size": -1, "path": "a"}, "byte count"),
    ({"md5": "0" * 32, "size": 1, "path": "a", "hash": "sha1"}, "md5"),
    ({"size": 1, "path": "a"}, "no md5"),
])
def test_a_malformed_dvc_output_is_refused(tmp_path, out, needle):
    (tmp_path / "x.dvc").write_text(json.dumps({"outs": [out]}))
    with pytest.raises(UsageError, match=needle):
        foreign.dvc_outputs(tmp_path)


@pytest.mark.parametrize("data, needle", [
    (b'{"md5": "x"}', "not a list"),
    (b"[{\"relpath\": \"a\"}]", "md5"),
    (b'[{"md5": "' + b"0" * 32 + b'", "relpath": "../up"}]', "'..'"),
    (b"not json", "not JSON"),
])
def test_a_dir_listing_that_is_not_a_list_of_safe_entries_is_refused(data, needle):
    with pytest.raises(UsageError, match=needle):
        foreign.dir_listing(data, "d")


def test_dvc_2_outputs_and_the_remote_a_checkout_names(tmp_path):
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text(
        "[core]\n    remote = store\n['remote \"store\"']\n    url = s3://bkt/dvc\n"
        "['remote \"other\"']\n    url = s3://other/x\n")
    (tmp_path / ".dvc" / "config.local").write_text("['remote \"store\"']\n    endpointurl = http://127.0.0.1:9/\n")
    assert foreign.dvc_remote(tmp_path) == foreign.DvcRemote("store", "s3://bkt/dvc", "http://127.0.0.1:9")
    assert foreign.dvc_remote(tmp_path, "other").url == "s3://other/x"
    with pytest.raises(UsageError, match="no remote 'nope'"):
        foreign.dvc_remote(tmp_path, "nope")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.bin.dvc").write_text(f"outs:\n- md5: {'ab' * 16}\n  size: 5\n  path: w.bin\n")
    (out,) = foreign.dvc_outputs(tmp_path)  # DVC 2: no `hash: md5`
    assert out.path == "sub/w.bin" and out.legacy and out.key() == f"ab/{'ab' * 15}"


def test_lfs_pointers_are_read_and_a_bad_oid_or_size_refused():
    ok = f"version {foreign.LFS_SPEC}\noid sha256:{'ab' * 32}\nsize 12\n".encode()
    assert foreign.lfs_pointer(ok, "w.bin") == foreign.LfsPointer("w.bin", "ab" * 32, 12)
    assert foreign.lfs_pointer(b"just a small file", "x") is None
    with pytest.raises(UsageError, match="oid"):
        foreign.lfs_pointer(ok.replace(b"ab" * 32, b"zz" * 32), "w.bin")
    with pytest.raises(UsageError, match="size"):
        foreign.lfs_pointer(ok.replace(b"size 12", b"size -3"), "w.bin")
    assert foreign.lfs_key("abcdef" + "0" * 58, "sharded") == f"ab/cd/ef{'0' * 58}"


def _adopted_manifest(**changes) -> bytes:
    doc = {"format": "modelfs-manifest", "format_version": 1, "name": "m", "created": "2026-12-07T00:00:00Z",
           "hashes": {"chunk": "blake3-blocks", "file": "sha256"}, "chunking": {},
           "sources": [{"kind": "dvc", "url": "s3://dvc-bucket/store"}],
           "files": [{"path": "w.bin", "size": 3, "mode": "0644", "sha256": "0" * 64, "chunks": [["1" * 64, 3]],
                      "description": {}, "source": {"source": 0, "key": "files/md5/00/" + "0" * 30}}]}
    for k, v in changes.items():
        if k == "source":
            doc["files"][0]["source"] = v
        else:
            doc[k] = v
    return json.dumps(doc).encode()


def test_an_adopted_manifest_names_where_each_chunk_is():
    m = loads(_adopted_manifest())
    assert m.sources[0].bucket == "dvc-bucket" and m.sources[0].key("a/b") == "store/a/b"
    assert m.foreign_chunks == {"1" * 64: (m.files[0], 0)}
    assert loads(m.to_bytes()) == m  # the canonical form keeps the sources


@pytest.mark.parametrize("changes, needle", [
    ({"source": {"source": 1, "key": "k"}}, "source.source"),
    ({"source": {"source": 0, "key": "../other-bucket/k"}}, "'..'"),
    ({"source": {"source": 0, "key": "/abs"}}, "absolute"),
    ({"source": {"source": 0, "key": "k", "extra": 1}}, "unknown"),
    ({"sources": [{"kind": "ftp", "url": "s3://bkt/p"}]}, "kind"),
    ({"sources": [{"kind": "dvc", "url": "https://bkt/p"}]}, "s3://"),
    ({"sources": [{"kind": "dvc", "url": "s3://bkt/../p"}]}, "'..'"),
    ({"sources": []}, "declares no sources"),
    ({"hashes": {"chunk": "blake3-keyed", "file": "sha256"}}, "adopted"),
])
def test_a_location_outside_the_declared_sources_is_refused(changes, needle):
    with pytest.raises(ManifestError, match=needle):
        loads(_adopted_manifest(**changes))


# -- real DVC, SeaweedFS, FUSE --------------------------------------------------------------------

@pytest.fixture(scope="module")
def dvc_bin() -> Path:
    if not DVC.exists():
        pytest.fail(f"{DVC} is missing: scripts/setup.sh installs dvc and dvc-s3 there")
    return DVC


def _run(cmd: list, cwd: Path, env: dict) -> str:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"{cmd}: {r.stdout}\n{r.stderr}"
    return r.stdout


class DvcRepo:
    """A git + DVC checkout whose remote is a bucket of the test SeaweedFS."""

    def __init__(self, dvc: Path, root: Path, env: dict, endpoint: str, bucket: str):
        self.dvc, self.root, self.bucket = dvc, root, bucket
        self.env = dict(env, DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
                        GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
        root.mkdir()
        _run(["git", "init", "-q"], root, self.env)
        self.run("init", "-q")
        self.run("remote", "add", "-d", "storage", f"s3://{bucket}/dvcstore")
        self.run("remote", "modify", "storage", "endpointurl", endpoint)

    def run(self, *args: str) -> str:
        return _run([self.dvc, *args], self.root, self.env)

    def add_push(self, *paths: str) -> None:
        self.run("add", "-q", *paths)
        self.run("push", "-q")


@pytest.fixture
def dvc_repo(dvc_bin, env, seaweed, s3, tmp_path, sample_model):
    b = f"dvc-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=b)
    repo = DvcRepo(dvc_bin, tmp_path / "repo", env, seaweed.endpoint, b)
    shutil.copytree(sample_model, repo.root / "model")
    # larger than two parts: adopt reads it as ranged GETs (store.download_parts), the rest streamed
    (repo.root / "single.bin").write_bytes(os.urandom(17 << 20) + b"tail")
    repo.add_push("model", "single.bin")
    return repo


def _expected(repo: DvcRepo) -> dict:
    d = {f"model/{k}": v[0] for k, v in tree_digest(repo.root / "model").items() if v[0] != "dir"}
    d["single.bin"] = hashlib.sha256((repo.root / "single.bin").read_bytes()).hexdigest()
    return d


def test_a_dvc_checkout_is_adopted_and_mounted_without_a_byte_uploaded_or_written_there(
        env, bucket, seaweed, s3, dvc_repo, mounts, tmp_path):
    before = objects(s3, dvc_repo.bucket)
    assert any("/files/md5/" in k and k.endswith(".dir") for k in before)  # DVC 3's layout, a directory
    out = cli(env, "adopt", str(dvc_repo.root), f"s3://{bucket}/reg", "--name", "m", "--tag", "prod", "-q").stdout
    assert "from      s3://" + dvc_repo.bucket in out
    assert objects(s3, dvc_repo.bucket) == before  # nothing written in the DVC remote
    ours = objects(s3, bucket)
    assert not [k for k in ours if "/chunks/" in k]  # no chunk uploaded
    model_bytes = sum(v for k, v in before.items() if not k.endswith(".dir"))
    assert sum(ours.values()) < 0.02 * model_bytes  # manifest + table only (tiny model: 2% here)

    mnt = mounts.mount(f"s3://{bucket}/reg/m@prod")
    # a small read fetches a range of the DVC object, not the object
    g, r = gets(seaweed, dvc_repo.bucket), ranged_gets(seaweed, dvc_repo.bucket)
    with open(mnt / "single.bin", "rb") as f:
        f.seek(2 << 20)
        assert f.read(100) == (dvc_repo.root / "single.bin").read_bytes()[2 << 20:(2 << 20) + 100]
    assert gets(seaweed, dvc_repo.bucket) - g == ranged_gets(seaweed, dvc_repo.bucket) - r >= 1
    got = {k: v[0] for k, v in tree_digest(mnt).items() if v[0] != "dir"}
    assert got == _expected(dvc_repo)  # every byte, verified
    info = cli(env, "inspect", f"s3://{bucket}/reg/m@prod").stdout
    assert "adopted" in info and dvc_repo.bucket in info


def test_a_deleted_dvc_object_gives_eio_never_wrong_bytes(env, bucket, s3, dvc_repo, mounts, tmp_path):
    cli(env, "adopt", str(dvc_repo.root), f"s3://{bucket}/reg", "--name", "m", "-q")
    md5 = hashlib.md5((dvc_repo.root / "single.bin").read_bytes()).hexdigest()
    s3.delete_object(Bucket=dvc_repo.bucket, Key=f"dvcstore/files/md5/{md5[:2]}/{md5[2:]}")
    mnt = mounts.mount(f"s3://{bucket}/reg/m@latest")
    with pytest.raises(OSError) as e:
        (mnt / "single.bin").read_bytes()
    assert e.value.errno == errno.EIO
    assert (mnt / "model" / "config.json").read_bytes() == (dvc_repo.root / "model" / "config.json").read_bytes()
    log = next((mounts.cache_dir / "logs").glob(f"*_{mnt.name}.log")).read_text()
    named = [line for line in log.splitlines() if f"files/md5/{md5[:2]}/{md5[2:]}" in line]
    assert named and all("m@" in line for line in named), log[-3000:]


def test_re_adopting_reads_only_what_changed_and_gc_touches_nothing_foreign(env, bucket, s3, dvc_repo, tmp_path):
    reg = f"s3://{bucket}/reg"
    first = cli(env, "adopt", str(dvc_repo.root), reg, "--name", "m", "-q").stdout
    assert "known from earlier adoptions" in first and " 0 known" in first
    (dvc_repo.root / "single.bin").write_bytes(os.urandom(1 << 20))
    dvc_repo.add_push("single.bin")
    again = cli(env, "adopt", str(dvc_repo.root), reg, "--name", "m", "-q").stdout
    assert "read      1 object " in again, again
    v1 = first.split("adopted m@", 1)[1].split()[0]
    d = json.loads(cli(env, "diff", f"{reg}/m@{v1}", f"{reg}/m@latest", "--json").stdout)["files"]
    assert [c["path"] for c in d["changed"]] == ["single.bin"] and not d["added"] and not d["removed"], d
    before = objects(s3, dvc_repo.bucket)
    report = cli(env, "gc", reg, "--grace", "0s", "--delete").stdout
    assert report.count(f"reads s3://{dvc_repo.bucket}/dvcstore in place") == 2, report  # both versions
    assert objects(s3, dvc_repo.bucket) == before
    pulled = tmp_path / "pulled"
    cli(env, "pull", f"{reg}/m@latest", str(pulled))
    assert (pulled / "single.bin").read_bytes() == (dvc_repo.root / "single.bin").read_bytes()


def test_an_object_read_in_ranged_parts_comes_in_order_and_a_shrunk_one_short(seaweed, bucket, s3, monkeypatch):
    """``Store.download_parts``, what adopt reads a large object with: every byte in order
    with several parts in flight; an object shorter than the size asked for (it shrank
    since its HEAD) ends the read short instead of sinking a part that is not whole."""
    from modelfs.config import StoreConfig
    from modelfs.registry.store import Store

    for k, v in seaweed.env().items():
        monkeypatch.setenv(k, v)
    data = os.urandom((5 << 20) + 12345)
    s3.put_object(Bucket=bucket, Key="o", Body=data)
    store = Store(bucket, StoreConfig(endpoint_url=seaweed.endpoint, region="us-east-1"))
    got: list[bytes] = []
    assert store.download_parts("o", len(data), got.append, 1 << 20, 3) == len(data)
    assert b"".join(got) == data and len(got) == 6
    got.clear()
    n = store.download_parts("o", len(data) + (3 << 20), got.append, 1 << 20, 3)  # it "shrank"
    assert n == 5 << 20 and b"".join(got) == data[:n]


def test_an_object_whose_chunks_the_registry_holds_is_adopted_as_a_native_file(env, bucket, s3, dvc_repo, tmp_path):
    """The registry is asked for each object's chunks while the others still stream: a
    file published there before is adopted as native (no source), the others stay foreign."""
    reg = f"s3://{bucket}/reg"
    same = tmp_path / "same"
    same.mkdir()
    shutil.copy(dvc_repo.root / "single.bin", same / "single.bin")
    cli(env, "publish", str(same), reg, "--name", "published", "-q")
    out = cli(env, "adopt", str(dvc_repo.root), reg, "--name", "m", "-q").stdout
    files = json.loads(cli(env, "inspect", "--json", f"{reg}/m@latest").stdout)["files"]
    native = {f["path"] for f in files if "source" not in f}
    # single.bin, and files with no chunk at all (an empty one): every chunk is there
    assert native == {"single.bin"} | {f["path"] for f in files if not f["chunks"]}, native
    assert f"native    {len(native)} files " in out, out


def test_a_size_that_lies_is_refused_and_nothing_is_written(env, bucket, s3, dvc_repo):
    dvcfile = dvc_repo.root / "single.bin.dvc"
    dvcfile.write_text(dvcfile.read_text().replace("size: ", "size: 1"))
    r = cli(env, "adopt", str(dvc_repo.root), f"s3://{bucket}/reg", "--name", "m", "-q", check=False)
    one_line_error(r, "single.bin", "bytes")
    assert not [k for k in objects(s3, bucket) if "/models/" in k]


def test_verify_deep_reports_a_deleted_and_an_overwritten_object(env, bucket, s3, dvc_repo):
    reg = f"s3://{bucket}/reg"
    cli(env, "adopt", str(dvc_repo.root), reg, "--name", "m", "-q")
    assert "all in place" in cli(env, "verify", "--deep", f"{reg}/m@latest").stdout
    md5 = hashlib.md5((dvc_repo.root / "single.bin").read_bytes()).hexdigest()
    key = f"dvcstore/files/md5/{md5[:2]}/{md5[2:]}"
    s3.put_object(Bucket=dvc_repo.bucket, Key=key, Body=os.urandom((17 << 20) + 4))  # same size, other bytes
    cfg = next(k for k in objects(s3, dvc_repo.bucket) if k.endswith("files/md5/" + hashlib.md5(
        (dvc_repo.root / "model" / "config.json").read_bytes()).hexdigest()[:2] + "/" + hashlib.md5(
        (dvc_repo.root / "model" / "config.json").read_bytes()).hexdigest()[2:]))
    s3.delete_object(Bucket=dvc_repo.bucket, Key=cfg)
    r = cli(env, "verify", "--deep", f"{reg}/m@latest", check=False)
    one_line_error(r, "2 of", "moved")
    assert f"single.bin: s3://{dvc_repo.bucket}/{key} overwritten" in r.stdout
    assert f"model/config.json: s3://{dvc_repo.bucket}/{cfg} deleted" in r.stdout


# -- Git LFS: pointers written by git-lfs, objects where a server keeps them --------------------------

@pytest.fixture
def lfs_checkout(env, tmp_path, sample_model):
    """A repository whose safetensors are in Git LFS, and a clone of it without the objects
    (pointer files, as a CI checkout without `git lfs pull` has): (clone, {oid: object file})."""
    e = dict(env, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
             HOME=str(tmp_path))
    src = tmp_path / "origin"
    shutil.copytree(sample_model, src)
    _run(["git", "init", "-q"], src, e)
    _run(["git", "lfs", "install", "--local"], src, e)
    _run(["git", "lfs", "track", "*.safetensors"], src, e)
    _run(["git", "add", "."], src, e)
    _run(["git", "commit", "-qm", "model"], src, e)
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(src), str(clone)], tmp_path, dict(e, GIT_LFS_SKIP_SMUDGE="1"))
    store = {p.name: p for p in (src / ".git" / "lfs" / "objects").rglob("*") if p.is_file()}
    assert store and all(len(k) == 64 for k in store)
    return clone, src, store


@pytest.mark.parametrize("layout", ["sharded", "flat"])
def test_a_git_lfs_checkout_is_adopted_from_its_servers_layout(env, bucket, s3, lfs_checkout, mounts, layout):
    clone, src, store = lfs_checkout
    b = f"lfs-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=b)
    prefix = "lfs" if layout == "sharded" else "org/repo"  # Gitea's, giftless's
    for oid, p in store.items():
        key = f"{prefix}/{oid[:2]}/{oid[2:4]}/{oid[4:]}" if layout == "sharded" else f"{prefix}/{oid}"
        s3.upload_file(str(p), b, key)
    before = objects(s3, b)
    out = cli(env, "adopt", str(clone), f"s3://{bucket}/reg", "--name", "m", "--lfs-store", f"s3://{b}/{prefix}",
              "--lfs-layout", layout, "--with-files", "-q").stdout
    assert f"s3://{b}/{prefix} (git-lfs, {len(store)} files" in out
    assert objects(s3, b) == before
    mnt = mounts.mount(f"s3://{bucket}/reg/m@latest")
    # the pointers read as the files they stand for; Git's own files published beside them
    want = {k: v for k, v in tree_digest(src).items() if not k.startswith(".git") and v[0] != "dir"}
    assert {k: v for k, v in tree_digest(mnt).items() if v[0] != "dir"} == want
    m = json.loads(cli(env, "inspect", "--json", f"s3://{bucket}/reg/m@latest").stdout)
    assert sorted(f["path"] for f in m["files"] if "source" in f) == sorted(
        k for k in want if k.endswith(".safetensors"))
    # the clone itself mounts too, its pointers resolved through the adoption table
    direct = mounts.mount(str(clone), "--registry", f"s3://{bucket}/reg")
    assert {k: v for k, v in tree_digest(direct).items() if v[0] != "dir"} == {
        k: v for k, v in want.items() if k.endswith(".safetensors")}


def test_an_lfs_object_that_is_not_what_its_pointer_says_is_refused(env, bucket, s3, lfs_checkout):
    clone, _, store = lfs_checkout
    b = f"lfs-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=b)
    oids = sorted(store)
    for oid in oids:  # the first object's place holds the second's bytes
        s3.upload_file(str(store[oids[1] if oid == oids[0] else oid]), b, oid)
    r = cli(env, "adopt", str(clone), f"s3://{bucket}/reg", "--name", "m", "--lfs-store", f"s3://{b}",
            "--lfs-layout", "flat", "-q", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert oids[0] in r.stderr or "bytes" in r.stderr, r.stderr
    assert not [k for k in objects(s3, bucket) if "/models/" in k]


def test_an_adopted_checkout_mounts_directly_each_output_at_its_path(env, bucket, s3, dvc_repo, mounts):
    reg = f"s3://{bucket}/reg"
    r = mounts.mount(str(dvc_repo.root), "--registry", reg, check=False)
    one_line_error(r, "never adopted", "modelfs adopt")
    cli(env, "adopt", str(dvc_repo.root), reg, "--name", "m", "-q")
    before = objects(s3, bucket)
    mnt = mounts.mount(str(dvc_repo.root), "--registry", reg)
    got = {k: v[0] for k, v in tree_digest(mnt).items() if v[0] != "dir"}
    assert got == _expected(dvc_repo)
    assert objects(s3, bucket) == before  # a version made on the fly: nothing written


def test_copy_in_makes_the_foreign_store_retirable(env, bucket, s3, dvc_repo, mounts, tmp_path):
    reg = f"s3://{bucket}/reg"
    cli(env, "adopt", str(dvc_repo.root), reg, "--name", "m", "--tag", "prod", "-q")
    out = cli(env, "copy-in", f"{reg}/m@prod", "-q").stdout
    assert "prod" in out and "latest" in out
    for k in objects(s3, dvc_repo.bucket):  # the DVC remote retired
        s3.delete_object(Bucket=dvc_repo.bucket, Key=k)
    m = json.loads(cli(env, "inspect", "--json", f"{reg}/m@prod").stdout)
    assert "sources" not in m and not any("source" in f for f in m["files"])
    mnt = mounts.mount(f"{reg}/m@prod")
    assert {k: v[0] for k, v in tree_digest(mnt).items() if v[0] != "dir"} == _expected(dvc_repo)
    again = cli(env, "copy-in", f"{reg}/m@prod", check=False)
    one_line_error(again, "not an adopted version")


def test_a_host_without_read_access_to_the_foreign_bucket_is_told_so(tmp_path, mounts, sample_model):
    """Adopted files are read in place: a host that may read the registry but not the LFS
    bucket gets EIO and a line that says which bucket it needs."""
    from modelfs.dev.devserver import ACCESS_KEY, SECRET_KEY, SeaweedServer
    import boto3
    reader = {"name": "reader", "credentials": [{"accessKey": "READERKEY", "secretKey": "readersecret"}],
              "actions": ["Read:reg", "List:reg"]}
    with SeaweedServer(tmp_path / "auth-s3", auth=True, identities=(reader,)) as srv:
        admin = dict(os.environ, **srv.env(), XDG_CACHE_HOME=str(tmp_path / "xdg"))
        s3 = boto3.client("s3", endpoint_url=srv.endpoint, region_name="us-east-1", aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET_KEY)
        for b in ("reg", "lfs"):
            s3.create_bucket(Bucket=b)
        repo = tmp_path / "repo"
        repo.mkdir()
        weights = sample_model / "model-00001-of-00002.safetensors"
        pointer = _run(["git", "lfs", "pointer", f"--file={weights}"], tmp_path, admin)
        (repo / "w.safetensors").write_text(pointer)
        s3.upload_file(str(weights), "lfs", hashlib.sha256(weights.read_bytes()).hexdigest())
        cli(admin, "adopt", str(repo), "s3://reg/r", "--name", "m", "--lfs-store", "s3://lfs", "--lfs-layout", "flat",
            "-q")
        mounts.env = dict(admin, AWS_ACCESS_KEY_ID="READERKEY", AWS_SECRET_ACCESS_KEY="readersecret")
        mnt = mounts.mount("s3://reg/r/m@latest")
        try:
            with pytest.raises(OSError) as e:
                (mnt / "w.safetensors").read_bytes()
            assert e.value.errno == errno.EIO
            log = next((mounts.cache_dir / "logs").glob(f"*_{mnt.name}.log")).read_text()
            assert "needs read access to bucket 'lfs'" in log, log[-2000:]
        finally:
            mounts.cleanup()


# -- Git LFS through a real server's batch API (giftless, its objects in the test SeaweedFS) -----------

GIFTLESS = ROOT / ".venv-lfs" / "bin" / "python"


@pytest.fixture
def giftless(env, seaweed, s3, tmp_path):
    """A giftless LFS server (read only, anonymous) keeping objects in a bucket of the test
    SeaweedFS under ``store/<org>/<repo>/<oid>``: (its URL for org/repo, the bucket)."""
    import socket
    import time
    if not GIFTLESS.exists():
        pytest.fail(f"{GIFTLESS} is missing: scripts/setup.sh installs giftless there")
    b = f"giftless-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=b)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "giftless.json"  # YAML's superset: JSON
    cfg.write_text(json.dumps({"TRANSFER_ADAPTERS": {"basic": {
        "factory": "giftless.transfer.basic_external:factory",
        "options": {"storage_class": "giftless.storage.amazon_s3:AmazonS3Storage",
                    "storage_options": {"bucket_name": b, "path_prefix": "store", "endpoint": seaweed.endpoint}}}}}))
    log = open(tmp_path / "giftless.log", "wb")
    proc = subprocess.Popen([str(GIFTLESS), "-m", "flask", "--app", "giftless.wsgi_entrypoint", "run", "--host",
                             "127.0.0.1", "--port", str(port)], env=dict(env, GIFTLESS_CONFIG_FILE=str(cfg)),
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "giftless.log").read_text()
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/org/repo", b
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(10)
        log.close()


def test_a_git_lfs_checkout_is_adopted_through_its_servers_batch_api(env, bucket, s3, lfs_checkout, giftless, mounts):
    clone, src, store = lfs_checkout
    url, b = giftless
    for oid, p in store.items():  # where giftless keeps what `git lfs push` sent it
        s3.upload_file(str(p), b, f"store/org/repo/{oid}")
    _run(["git", "config", "-f", ".lfsconfig", "lfs.url", url], clone, env)  # as a repository says it
    before = objects(s3, b)
    out = cli(env, "adopt", str(clone), f"s3://{bucket}/reg", "--name", "m", "-q").stdout
    assert f"s3://{b} at " in out and "git-lfs" in out
    assert objects(s3, b) == before
    mnt = mounts.mount(f"s3://{bucket}/reg/m@latest")
    want = {k: v for k, v in tree_digest(src).items() if k.endswith(".safetensors")}
    assert {k: v for k, v in tree_digest(mnt).items() if v[0] != "dir"} == want
    # an object the server does not have: one line, nothing written
    s3.delete_object(Bucket=b, Key=f"store/org/repo/{sorted(store)[0]}")
    r = cli(env, "adopt", str(clone), f"s3://{bucket}/reg", "--name", "other", "-q", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "modelfs: error:" in r.stderr, r.stderr


@pytest.mark.parametrize("piece", [4096, 9999, 1 << 20, 7 << 20])
def test_cutting_a_stream_gives_the_chunks_cutting_the_whole_gives(piece):
    """Adopt cuts objects as they stream in; a version's chunk ids must be publish's."""
    import random
    from modelfs.format.chunking import ChunkParams, chunk_hash, cut
    from modelfs.ops.adopt import StreamCutter
    params = ChunkParams(min_size=16 << 10, avg_size=64 << 10, max_size=128 << 10)
    data = random.Random(piece).randbytes(3 << 20) + bytes(200 << 10)  # a run of zeros: max_size cuts
    whole = [(chunk_hash(data[o:o + n]), n) for o, n in cut(data, params)]
    c = StreamCutter(params, window=0)
    for i in range(0, len(data), piece):
        c.feed(data[i:i + piece])
    assert c.close() == whole and len(whole) > 20
