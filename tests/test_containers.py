"""docs/containers.md: what can run here runs (bind mounts, propagation, another user), the rest is validated."""

import os
import re
import shlex
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from modelfs.config import resolve

from conftest import as_nobody, cli

DOC = Path(__file__).resolve().parent.parent / "docs" / "containers.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), re.S)


# -- the recipes, validated ---------------------------------------------------------------

def host_layout(tmp_path) -> tuple[str, str]:
    """(mount point, the parent shared with containers) from the doc's TOML blocks, all valid."""
    tomls = blocks("toml")
    for block in blocks("yaml"):  # the ConfigMap's file too
        for doc in yaml.safe_load_all(block):
            if doc and doc.get("kind") == "ConfigMap":
                tomls += list(doc["data"].values())
    mountpoints = set()
    for i, text in enumerate(tomls):
        f = tmp_path / f"{i}.toml"
        f.write_text(text)
        s = resolve(f, {})
        assert s["allow_other"], "containers read as other users: allow_other must be on"
        mountpoints.add(str(s["mountpoint"]))
    assert len(tomls) >= 2 and len(mountpoints) == 1, mountpoints
    mp = mountpoints.pop()
    return mp, os.path.dirname(mp)


def pod_specs(doc: dict) -> list[dict]:
    if doc.get("kind") == "Pod":
        return [doc["spec"]]
    if doc.get("kind") in ("DaemonSet", "Deployment", "StatefulSet", "Job"):
        return [doc["spec"]["template"]["spec"]]
    return []


def test_kubernetes_and_compose_recipes_are_consistent(tmp_path):
    mountpoint, parent = host_layout(tmp_path)
    docs = [d for block in blocks("yaml") for d in yaml.safe_load_all(block) if d]
    specs = [s for d in docs for s in pod_specs(d)]
    assert {d.get("kind") for d in docs} >= {"DaemonSet", "Pod", "ConfigMap"}
    daemons = readers = 0
    for spec in specs:
        volumes = {v["name"]: v for v in spec["volumes"]}
        containers = spec.get("initContainers", []) + spec["containers"]
        daemon_volumes = set()
        for c in containers:
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{c['name']}: no volume {m['name']}"
            command = " ".join(c.get("command", []) + c.get("args", []))
            if "modelfs mount" in command:  # the daemon: privileged, Bidirectional on the parent
                daemons += 1
                assert c["securityContext"]["privileged"] is True
                assert mountpoint in command or "--config" in command
                (m,) = [m for m in c["volumeMounts"] if m.get("mountPropagation") == "Bidirectional"]
                assert m["mountPath"] == parent
                daemon_volumes.add(m["name"])
            else:  # a reader: unprivileged, read-only, HostToContainer, model path under its mount
                readers += 1
                assert "securityContext" not in c
                (m,) = c["volumeMounts"]
                assert m["readOnly"] is True and m["mountPropagation"] == "HostToContainer"
                model = next(a for a in c["args"] if a.startswith("/"))
                assert model.startswith(m["mountPath"] + "/" + os.path.basename(mountpoint) + "/")
                v = volumes[m["name"]]
                assert v.get("hostPath", {}).get("path") == parent or \
                    ("emptyDir" in v and m["name"] in {mm["name"] for cc in containers
                                                       for mm in cc.get("volumeMounts", [])
                                                       if mm.get("mountPropagation") == "Bidirectional"})
        for name in daemon_volumes:
            assert "emptyDir" in volumes[name] or volumes[name]["hostPath"]["path"] == parent
    assert daemons == 2 and readers == 2

    (compose,) = [d for d in docs if "services" in d]
    for svc in compose["services"].values():
        (v,) = svc["volumes"]
        assert (v["type"], v["source"], v["read_only"], v["bind"]["propagation"]) == \
            ("bind", parent, True, "rslave")
        assert any(a.startswith(v["target"] + "/" + os.path.basename(mountpoint) + "/") for a in svc["command"])
    docker = [line for b in blocks("sh") for line in b.replace("\\\n", " ").splitlines() if "docker run" in line]
    (run,) = docker
    (opt,) = [a for a in shlex.split(run) if a.startswith("type=bind")]
    kv = dict(p.partition("=")[::2] for p in opt.split(","))
    assert kv["source"] == parent and kv["bind-propagation"] == "rslave" and "readonly" in kv


# -- what runs here: bind mounts, propagation, another user ---------------------------------

def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def test_bind_mounts_propagation_and_another_user(env, bucket, sample_model, mounts):
    cli(env, "publish", str(sample_model), f"s3://{bucket}/reg", "--name", "m", "-q")
    want = (sample_model / "config.json").read_bytes()
    # pytest's tmp_path is private (0700); "the host" here is a world-traversable directory
    host = Path(tempfile.mkdtemp(prefix="modelfs-host-"))
    os.chmod(host, 0o755)
    parent, view, plain = host / "srv", host / "container-view", host / "plain-bind"
    for d in (parent / "registry", view, plain):
        d.mkdir(parents=True)
        os.chmod(d, 0o755)
    made: list[Path] = []
    try:
        # the host's shared /srv/modelfs, and a container's read-only rslave view of it,
        # made BEFORE the daemon mounts anything (a container started before the service)
        sh("mount", "--bind", str(parent), str(parent))
        made.append(parent)
        sh("mount", "--make-shared", str(parent))
        sh("mount", "--bind", str(parent), str(view))
        made.append(view)
        sh("mount", "--make-rslave", str(view))
        sh("mount", "-o", "remount,bind,ro", str(view))

        mnt = mounts.mount(f"s3://{bucket}/reg", "--allow-other", mnt=parent / "registry")
        through_view = view / "registry" / "m" / "latest" / "config.json"
        r = as_nobody("/bin/cat", str(through_view))
        assert r.returncode == 0 and r.stdout == want, r.stderr
        assert cli(env, "stats", "--json", str(view / "registry")).returncode == 0

        # a plain bind of the mount point itself (docker -v /srv/modelfs/registry:/models) reads too
        sh("mount", "--bind", str(mnt), str(plain))
        made.append(plain)
        r = as_nobody("/bin/cat", str(plain / "m" / "latest" / "config.json"))
        assert r.returncode == 0 and r.stdout == want
        sh("umount", str(plain))
        made.remove(plain)

        # the daemon restarts: the view follows (the new mount propagates into it)
        mounts.unmount(mnt)
        assert not os.path.ismount(view / "registry") and not through_view.exists()
        mounts.mount(f"s3://{bucket}/reg", "--allow-other", mnt=parent / "registry")
        r = as_nobody("/bin/cat", str(through_view))
        assert r.returncode == 0 and r.stdout == want

        # without allow_other, other users are refused even through the view
        mounts.unmount(mnt)
        mounts.mount(f"s3://{bucket}/reg", mnt=parent / "registry")
        r = as_nobody("/bin/cat", str(through_view))
        assert r.returncode != 0 and b"Permission denied" in r.stderr
        with pytest.raises(OSError):  # and the read-only view stays read-only
            (view / "new-file").write_text("x")
    finally:
        mounts.cleanup()
        for m in reversed(made):
            subprocess.run(["umount", "-l", str(m)], capture_output=True)
        subprocess.run(["rm", "-rf", "--one-file-system", str(host)])


def test_unmount_says_when_a_bind_mount_keeps_the_daemon_serving(env, bucket, sample_model, mounts, tmp_path):
    """The kernel ends a FUSE session only with its last mount: a bind of the mount point
    (docker -v /srv/modelfs/registry:…) keeps the daemon serving after `modelfs unmount`."""
    cli(env, "publish", str(sample_model), f"s3://{bucket}/reg", "--name", "m", "-q")
    mnt = mounts.mount(f"s3://{bucket}/reg/m")
    pid = mounts.pid(mnt)
    plain = tmp_path / "bound"
    plain.mkdir()
    sh("mount", "--bind", str(mnt), str(plain))
    try:
        t = time.monotonic()
        r = cli(env, "unmount", str(mnt))
        assert time.monotonic() - t < 10  # no waiting for a daemon that cannot exit yet
        assert f"daemon (pid {pid}) keeps serving other mounts" in r.stderr and str(plain) in r.stderr
        assert not os.path.ismount(mnt)
        assert (plain / "config.json").read_bytes() == (sample_model / "config.json").read_bytes()
    finally:
        subprocess.run(["umount", str(plain)], capture_output=True)
    deadline = time.monotonic() + 30  # the last mount gone, the daemon ends by itself
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] == "Z"
