"""The package's shape: each folder imports only what its ``__init__`` says it may, so the
dependencies point one way (cli → mount/ops → transfer → registry → cache → format)."""

import ast
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

PKG = pathlib.Path(__file__).resolve().parent.parent / "modelfs"
HELPERS = {"errors", "units", "config", "logs", "progress", "malloc"}
ALLOWED = {  # part → the parts it may import (besides itself)
    "errors": set(), "units": set(), "logs": set(), "progress": set(), "malloc": set(),
    "config": {"errors", "units"},
    "format": {"errors", "units"},
    "describe": {"format", "errors", "units"},
    "cache": {"format", "errors", "units"},
    "registry": {"cache", "format", "config", "errors", "units"},
    "transfer": {"registry", "cache", "format"} | HELPERS,
    "mount": {"transfer", "registry", "describe", "cache", "format"} | HELPERS,
    "ops": {"transfer", "registry", "describe", "cache", "format"} | HELPERS,
}


def _imports(path: pathlib.Path) -> set[str]:
    here = list(path.relative_to(PKG.parent).with_suffix("").parts[:-1])  # the module's package
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # from . import a, b
                    out |= {f"{target}.{a.name}" for a in node.names}
                    continue
            else:
                target = node.module or ""
            if target.startswith("modelfs"):
                out.add(target)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("modelfs")}
    return out


def test_every_part_imports_only_what_it_may():
    wrong = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        me = rel.parts[1]  # modelfs/mount/reader → mount; modelfs/cache → cache
        if me not in ALLOWED:
            continue  # cli, dev, __main__: the top (may import anything)
        for target in _imports(path):
            part = target.split(".")[1] if target.count(".") else "__init__"
            if part not in (me, "__init__") and part not in ALLOWED[me]:
                wrong.append(f"{rel}: imports {target}")
    assert not wrong, "\n".join(wrong)


def test_every_folder_says_what_it_owns():
    for init in PKG.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc) > 200, f"{init.parent.name}/__init__.py: say what it owns and may import"


def test_the_worker_and_stats_stay_light():
    """A fetch worker imports neither trio nor boto3; ``modelfs stats`` needs no pyfuse3."""
    code = ("import sys, modelfs.transfer.worker as w;"
            "bad = {'trio', 'boto3', 'pyfuse3'} & set(sys.modules); assert not bad, bad;"
            "import modelfs.cli, modelfs.mount.metrics, modelfs.mount.mountpoint, modelfs.mount.xattrs;"
            "assert 'pyfuse3' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_mount_forks_before_anything_heavy_is_imported():
    """What ``modelfs mount`` imports before it forks its helper and daemon: no FUSE, trio,
    boto3, or the key and signature libraries (each process imports what it needs after)."""
    code = ("import sys, modelfs.cli.host, modelfs.mount.background, modelfs.mount.resolving;"
            "bad = {'trio', 'pyfuse3', 'boto3', 'botocore', 'cryptography', 'model_signing'} & set(sys.modules);"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
