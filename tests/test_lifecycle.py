"""rm and gc on a real SeaweedFS: what is deleted, what never is, and gc racing a publish."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from modelfs.registry import lifecycle
from modelfs.errors import ModelfsError
from modelfs.registry.lifecycle import Lease, collect
from modelfs.ops.publish import Publisher, scan
from modelfs.registry.layout import Registry

from conftest import cli, objects, one_line_error, tree_digest


def publish(env, bucket, src, name="m", *tags) -> str:
    out = cli(env, "publish", str(src), f"s3://{bucket}/reg", "--name", name, "-q",
              *[a for t in tags for a in ("--tag", t)]).stdout
    return out.split("@")[1].split()[0]


def chunk_keys(s3, bucket) -> set[str]:
    return set(objects(s3, bucket, "reg/chunks/"))


def manifest_chunks(env, bucket, ref) -> set[str]:
    doc = json.loads(cli(env, "inspect", "--json", f"s3://{bucket}/reg/{ref}").stdout)
    return {f"reg/chunks/{h}" for f in doc["files"] for h, _ in f["chunks"]}


@pytest.fixture
def two_versions(env, bucket, sample_model, tmp_path):
    """m@v1 (tag prod) and m@v2 (latest): v2 changed one shard, so each has chunks of its own."""
    v1 = publish(env, bucket, sample_model, "m", "prod")
    src2 = tmp_path / "v2"
    shutil.copytree(sample_model, src2)
    shard = src2 / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2:] = bytes(len(data) - len(data) // 2)  # a new second half
    shard.write_bytes(bytes(data))
    v2 = publish(env, bucket, src2, "m")
    return v1, v2, src2


def test_rm_refuses_a_tagged_version_and_force_takes_its_tags(env, bucket, two_versions, tmp_path):
    v1, v2, src2 = two_versions
    ref = f"s3://{bucket}/reg/m"
    one_line_error(cli(env, "rm", f"{ref}@{v1}", check=False), "tagged prod", "--force")
    one_line_error(cli(env, "rm", f"{ref}@{v2}", check=False), "tagged latest")
    one_line_error(cli(env, "rm", f"{ref}@prod", check=False), "takes a version")
    one_line_error(cli(env, "rm", f"{ref}@{'0' * 20}", check=False), "no version")
    out = cli(env, "rm", "--force", f"{ref}@{v2}").stdout
    assert f"removed m@{v2}" in out and f"latest -> {v1}" in out
    listing = cli(env, "ls", f"s3://{bucket}/reg").stdout
    assert v2 not in listing and v1 in listing
    dest = tmp_path / "pulled"
    cli(env, "pull", f"{ref}@latest", str(dest), "-q")  # latest moved to the remaining version
    cli(env, "rm", "--force", f"{ref}@{v1}")
    one_line_error(cli(env, "inspect", f"{ref}@prod", check=False), "no tag")


def test_gc_dry_run_then_delete_only_what_no_version_uses(env, bucket, two_versions, s3, registry, tmp_path):
    v1, v2, src2 = two_versions
    only_v1 = manifest_chunks(env, bucket, f"m@{v1}") - manifest_chunks(env, bucket, f"m@{v2}")
    assert only_v1
    cli(env, "rm", "--force", f"s3://{bucket}/reg/m@{v1}")
    before = chunk_keys(s3, bucket)

    dry = cli(env, "gc", f"s3://{bucket}/reg", "--grace", "0").stdout
    assert f"would delete: {len(only_v1)} chunk" in dry and "m: 1 version," in dry
    assert chunk_keys(s3, bucket) == before  # a dry run deletes nothing

    young = cli(env, "gc", f"s3://{bucket}/reg", "--delete").stdout  # default grace: 24 h
    assert "deleted: 0 chunks" in young and chunk_keys(s3, bucket) == before

    out = cli(env, "gc", f"s3://{bucket}/reg", "--delete", "--grace", "0s", "-q").stdout
    assert f"deleted: {len(only_v1)} chunk" in out
    assert chunk_keys(s3, bucket) == before - only_v1
    dest = tmp_path / "pulled"
    cli(env, "pull", f"s3://{bucket}/reg/m@{v2}", str(dest), "-q")  # verified: every chunk is there
    assert tree_digest(dest) == tree_digest(src2)


def test_gc_deletes_nothing_while_a_publish_holds_a_lease(env, bucket, two_versions, s3, registry):
    v1, _, _ = two_versions
    cli(env, "rm", "--force", f"s3://{bucket}/reg/m@{v1}")
    before = chunk_keys(s3, bucket)
    with Lease(registry, "publish m (a test)"):
        r = collect(registry, grace=0, delete=True)
    assert r.candidates and r.deleted == 0 and r.stopped_by_lease
    assert chunk_keys(s3, bucket) == before
    assert not objects(s3, bucket, "reg/leases/")  # released on exit
    assert collect(registry, grace=0, delete=True).deleted == len(r.candidates)


def test_a_stale_lease_does_not_block_gc_forever(env, bucket, two_versions, s3, registry, monkeypatch):
    v1, _, _ = two_versions
    cli(env, "rm", "--force", f"s3://{bucket}/reg/m@{v1}")
    registry.store.put(registry.lease_key("crashed-publish"), b"{}")  # its publisher died
    monkeypatch.setattr(lifecycle, "LEASE_TTL_SECONDS", 1.0)
    time.sleep(2.2)  # the store's times have one-second resolution
    assert collect(registry, grace=0, delete=True).deleted > 0


def test_gc_stops_at_an_unreadable_manifest(env, bucket, two_versions, s3, registry):
    v1, _, _ = two_versions
    cli(env, "rm", "--force", f"s3://{bucket}/reg/m@{v1}")
    before = chunk_keys(s3, bucket)
    s3.put_object(Bucket=bucket, Key=f"reg/models/m/versions/{'a' * 20}.json", Body=b"{not json")
    with pytest.raises(ModelfsError, match="cannot read m@a{20}"):
        collect(registry, grace=0, delete=True)
    one_line_error(cli(env, "gc", f"s3://{bucket}/reg", "--delete", "--grace", "0", check=False),
                   "gc stopped")
    assert chunk_keys(s3, bucket) == before


def test_gc_in_the_middle_of_a_publish_never_takes_a_chunk_it_reuses(env, bucket, sample_model, s3, registry,
                                                                      tmp_path):
    """The race: a publish finds a chunk in the store (garbage: its version was removed) and
    reuses it instead of uploading it; a gc that deletes garbage before the publish's
    manifest references it would leave the new version without that chunk. Here a gc
    with no grace runs exactly there (after every chunk was checked, before the manifest
    is written); the version published must read back whole."""
    v = publish(env, bucket, sample_model, "m")
    cli(env, "rm", "--force", f"s3://{bucket}/reg/m@{v}")  # every chunk is garbage now
    garbage = chunk_keys(s3, bucket)
    rounds = []

    class GcBeforeManifest(Registry):
        def put_manifest(self, m):
            rounds.append(collect(registry, grace=0, delete=True))
            return super().put_manifest(m)

    pub = Publisher(GcBeforeManifest(registry.store, registry.ref), concurrency=4)
    result = pub.run(scan(sample_model), "m", ["latest", "prod"])
    assert result.stats.uploaded_chunks == 0 and garbage  # it relied on the garbage being there
    (r,) = rounds
    assert r.candidates and r.deleted == 0 and r.stopped_by_lease
    dest = tmp_path / "pulled"
    cli(env, "pull", f"s3://{bucket}/reg/m@prod", str(dest), "-q")
    assert tree_digest(dest) == tree_digest(sample_model)
    assert collect(registry, grace=0, delete=True).deleted == 0  # all referenced again


def test_diff_names_files_tensors_and_the_bytes_to_fetch(env, bucket, tmp_path):
    from modelfs.dev.sample import layer_tensors, write_safetensors

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    big = layer_tensors(24, 256, dtype="F16")  # ~ 24 × 5 tensors of 128-256 KiB
    write_safetensors(a / "model.safetensors", big, seed=1)
    write_safetensors(a / "head.safetensors", {"x": ("F32", [4, 4]), "y": ("F16", [8]), "z": ("F32", [2]),
                                               "gone": ("F32", [3])}, seed=2)
    (a / "old.txt").write_text("old")
    (a / "config.json").write_text('{"a": 1}')
    shutil.copytree(a, b)
    (b / "old.txt").unlink()
    (b / "new.txt").write_text("new")
    write_safetensors(b / "head.safetensors", {"x": ("F32", [4, 4]), "y": ("BF16", [8]), "z": ("F32", [4]),
                                               "w": ("F32", [1])}, seed=2)
    # overwrite one tensor's bytes in the big file, in place
    import struct
    data = bytearray((a / "model.safetensors").read_bytes())
    n = struct.unpack_from("<Q", data)[0]
    header = json.loads(data[8:8 + n])
    target = "model.layers.12.mlp.up_proj.weight"
    lo, hi = (8 + n + x for x in header[target]["data_offsets"])
    data[lo:hi] = bytes(hi - lo)
    (b / "model.safetensors").write_bytes(bytes(data))
    va, vb = publish(env, bucket, a, "m"), publish(env, bucket, b, "m")

    doc = json.loads(cli(env, "diff", f"s3://{bucket}/reg/m@{va}", f"s3://{bucket}/reg/m@{vb}", "--json").stdout)
    assert [f["path"] for f in doc["files"]["added"]] == ["new.txt"]
    assert [f["path"] for f in doc["files"]["removed"]] == ["old.txt"]
    assert doc["files"]["unchanged"] == 1  # config.json
    changed = {c["path"]: c for c in doc["files"]["changed"]}
    assert set(changed) == {"head.safetensors", "model.safetensors"}
    head = changed["head.safetensors"]["tensors"]
    assert head["added"] == ["w"] and head["removed"] == ["gone"]
    assert head["reshaped"] == [{"name": "z", "from": [2], "to": [4]}]
    assert head["retyped"] == [{"name": "y", "from": "F16", "to": "BF16"}]
    body = changed["model.safetensors"]["tensors"]
    assert target in body["bytes_changed"] and len(body["bytes_changed"]) < len(big) // 2
    assert not body["added"] and not body["removed"] and not body["reshaped"]
    size_b = sum(p.stat().st_size for p in b.iterdir())
    assert 0 < doc["fetch"]["bytes"] < size_b // 2 and doc["fetch"]["of_bytes"] == size_b

    text = cli(env, "diff", f"s3://{bucket}/reg/m@{va}", f"s3://{bucket}/reg/m@{vb}").stdout
    assert "+ new.txt" in text and "- old.txt" in text and "dtype F16 -> BF16" in text
    assert f"~ {target}: bytes" in text and "fetches" in text
    # manifest files work too (chunks from their origin)
    ma, mb = tmp_path / "a.json", tmp_path / "b.json"
    ma.write_text(cli(env, "inspect", "--json", f"s3://{bucket}/reg/m@{va}").stdout)
    mb.write_text(cli(env, "inspect", "--json", f"s3://{bucket}/reg/m@{vb}").stdout)
    assert json.loads(cli(env, "diff", str(ma), str(mb), "--json").stdout) == doc
